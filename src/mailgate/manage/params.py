"""Converting parameter values to what the model needs, with Exchange-style errors.

Values arrive from the shell (strings, booleans, lists, hashtables) or from
JSON (the REST API). Each converter raises ``ValueError`` with a message for
the user; the binder turns it into an error naming the parameter.
"""

from __future__ import annotations

import datetime as dt
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from mailgate.config.model import ConfigObject
from mailgate.config.values import GIVEN, ExchangeEnum, ExchangeFlag
from mailgate.errors import InvalidValueError


@dataclass
class MultiValuedChange:
    """``@{Add=...; Remove=...}`` applied to a multi-valued property."""

    add: list[Any]
    remove: list[Any]

    def apply(self, current: list[Any]) -> list[Any]:
        result = list(current)
        for item in self.remove:
            if item not in result:
                raise ValueError(f'the value "{item}" is not present and can\'t be removed')
            result.remove(item)
        for item in self.add:
            if item in result:
                raise ValueError(f'the value "{item}" is already present')
            result.append(item)
        return result

    def apply_to(self, current: list[Any], parameter: str) -> list[Any]:
        """``apply`` for a parameter of a cmdlet: a value added twice or removed though absent is the
        administrator's error, named with the parameter (as Exchange refuses it)."""
        try:
            return self.apply(current)
        except ValueError as exc:
            raise InvalidValueError(f"Cannot change parameter '{parameter}': {exc}.", parameter=parameter) from None


def multi_valued(element: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The converter of a multi-valued parameter whose values ``element`` converts: a list (None: empty), or
    ``@{Add=...; Remove=...}`` as a MultiValuedChange."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            keys = {k.lower(): v for k, v in value.items()}
            unknown = set(keys) - {"add", "remove"}
            if unknown:
                raise ValueError(f"only Add and Remove can change a multi-valued property, not {', '.join(sorted(unknown))}")
            return MultiValuedChange([element(v) for v in as_list(keys.get("add"))],
                                     [element(v) for v in as_list(keys.get("remove"))])
        # A list is its values, each once (as Exchange's collections: a repeated value is refused, not dropped).
        return MultiValuedChange([element(v) for v in as_list(value)], []).apply([])
    return convert


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(as_list(v) if isinstance(v, (list, tuple)) else [v])
        return out
    return [value]


def scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return scalar(value[0])
        raise ValueError("a single value is required, not a list")
    return value


def to_bool(value: Any) -> bool:
    value = scalar(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "$true", "1", "false", "$false", "0"):
        return value.strip().lower() in ("true", "$true", "1")
    raise ValueError(f'Cannot convert value "{value}" to type "System.Boolean". Boolean parameters accept only '
                     "Boolean values and numbers, such as $True, $False, 1 or 0.")


def to_str(value: Any) -> str:
    value = scalar(value)
    if value is None:
        raise ValueError("a value is required")
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def to_optional_str(value: Any) -> str | None:
    value = scalar(value)
    if value is None:
        return None
    text = to_str(value)
    return text or None


def to_int(value: Any, *, bits: int = 32) -> int:
    """A System.Int32 (``bits=64``: Int64), from a number or its text."""
    value = scalar(value)
    type_name = f"System.Int{bits}"
    if isinstance(value, bool):
        raise ValueError(f'Cannot convert value "{value}" to type "{type_name}"')
    try:
        number = int(str(value).replace(",", "").strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f'Cannot convert value "{value}" to type "{type_name}". Error: "Input string was not '
                         'in a correct format."') from None
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise ValueError(f'Cannot convert value "{value}" to type "{type_name}". Error: "Value was either too '
                         f'large or too small for an Int{bits}."')
    return number


def to_int64(value: Any) -> int:
    return to_int(value, bits=64)


DEFAULT_RESULT_SIZE = 1000   # what Get-Message, Get-Queue, Get-Mailbox and Get-MessageTrackingLog return unasked


def result_size(args: dict[str, Any]) -> int | None:
    """The most items a Get- cmdlet returns: -ResultSize, or 1000 when it isn't given; None is Unlimited.
    Ask the source for one more, so that ``first_results`` can tell whether some were left out."""
    return args["ResultSize"] if "ResultSize" in args else DEFAULT_RESULT_SIZE


def first_results(ctx: Any, items: list[Any], args: dict[str, Any]) -> list[Any]:
    """``items`` cut to the result size; as in Exchange, a warning when the default size left some out."""
    limit = result_size(args)
    if limit is None or len(items) <= limit:
        return items
    _warn_results_left_out(ctx, args)
    return items[:limit]


def stream_first_results(ctx: Any, items: Iterator[Any], args: dict[str, Any]) -> Iterator[Any]:
    """``first_results`` for items read as they are needed (the caller asks for one more than the result size,
    so that the warning can be given)."""
    limit = result_size(args)
    for count, item in enumerate(items):
        if limit is not None and count == limit:
            _warn_results_left_out(ctx, args)
            return
        yield item


def _warn_results_left_out(ctx: Any, args: dict[str, Any]) -> None:
    if "ResultSize" not in args:
        ctx.warn(f"Only the first {DEFAULT_RESULT_SIZE} items are shown. -ResultSize N returns up to N, "
                 "-ResultSize Unlimited returns them all.")


def to_result_size(value: Any) -> int | None:
    """-ResultSize: 1 to 2,147,483,647, or Unlimited (None)."""
    if to_str(value).strip().lower() == "unlimited":
        return None
    size = to_int(value)
    if size < 1:
        raise ValueError("ResultSize must be a positive number or Unlimited")
    return size


def smtp_address(value: Any) -> str:
    from mailgate.config.values import parse_smtp_address

    return parse_smtp_address(to_str(value))


def to_str_list(value: Any) -> list[str]:
    return [to_str(v) for v in as_list(value)]


# What .NET's DateTime.Parse takes in en-US and administrators type: Exchange's documentation writes
# "09/01/2018 5:00 PM"; month names ("Dec 4, 2026", "4 December 2026") and two-digit years also parse.
_DATE_FORMATS = tuple(f"{day} {time}".strip() for day in (
    "%m/%d/%Y", "%m/%d/%y", "%Y-%m-%d", "%b %d, %Y", "%B %d, %Y", "%b %d %Y", "%B %d %Y", "%d %b %Y", "%d %B %Y",
    "%A, %B %d, %Y") for time in ("%H:%M:%S", "%I:%M:%S %p", "%H:%M", "%I:%M %p", "%I %p", "")) + ("%Y-%m-%dT%H:%M:%S",)


def to_datetime(value: Any) -> dt.datetime:
    value = scalar(value)
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.astimezone()
    return _parse_date(" ".join(str(value).split()))


@functools.lru_cache(maxsize=256)   # a filter compares every object with the same text: parse it once
def _parse_date(text: str) -> dt.datetime:
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).astimezone()
        except ValueError:
            continue
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.astimezone()
    except ValueError:
        raise ValueError(f'Cannot convert value "{text}" to type "System.DateTime"; use "MM/dd/yyyy HH:mm:ss" '
                         "or ISO 8601") from None


def enum_converter(cls: type[ExchangeEnum] | type[ExchangeFlag]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if issubclass(cls, ExchangeFlag):
            return cls.parse([to_str(v) for v in as_list(value)])
        return cls.parse(to_str(value))

    convert.enum_class = cls  # type: ignore[attr-defined]   # its values, for the shell's tab completion
    return convert


def value_choices(param: Any) -> list[str]:
    """The values a parameter takes from a fixed set, as the shell offers them on Tab: $true/$false for a
    Boolean, the names of an enum (Usage, PermissionGroups, AuthMechanism, DomainType...)."""
    if param.type_name == "Boolean":
        return ["$true", "$false"]
    cls = getattr(param.convert, "enum_class", None)
    if cls is None:
        return []
    if issubclass(cls, ExchangeFlag):
        return [cls._empty_name(), *(str(m.name) for m in cls)]
    return [m.value for m in cls]


def _pydantic_message(exc: PydanticValidationError) -> str:
    err = exc.errors()[0]
    msg = str(err.get("msg", ""))
    return msg.removeprefix("Value error, ")


class FieldConverter:
    """Converts a value for one field of a model, using the field's own type rules."""

    def __init__(self, model: type[ConfigObject], field_name: str) -> None:
        info = model.model_fields[field_name]
        self.field_name = field_name
        self.annotation = info.annotation  # pydantic keeps a field's own validators in info.metadata
        self.is_list = typing.get_origin(self.annotation) is list
        if self.is_list:
            element = typing.get_args(self.annotation)[0]
            base = typing.get_args(element)[0] if typing.get_origin(element) is typing.Annotated else element
        else:
            element = info.rebuild_annotation()
            base = self.annotation
        self._element = TypeAdapter(element)
        self._flag = isinstance(base, type) and issubclass(base, ExchangeFlag)
        plain = next((a for a in typing.get_args(base) if a is not type(None)), base) \
            if typing.get_origin(base) in (typing.Union, types.UnionType) else base
        self.enum_class = plain if isinstance(plain, type) and issubclass(plain, (ExchangeEnum, ExchangeFlag)) \
            else None   # its values, for the shell's tab completion

    def element(self, value: Any) -> Any:
        if isinstance(value, bool) and self.annotation is not bool and "bool" not in str(self.annotation):
            raise ValueError(f'Cannot convert value "{value}" for this parameter')
        if self.annotation is bool:
            return to_bool(value)
        if self.annotation in (int, int | None):
            return to_int(value) if value is not None else None
        try:
            return self._element.validate_python(value, context=GIVEN)
        except PydanticValidationError as exc:
            raise ValueError(_pydantic_message(exc)) from None

    def __call__(self, value: Any) -> Any:
        if self.is_list:
            return multi_valued(self.element)(value)
        if self._flag:
            return self.element([to_str(v) for v in as_list(value)])
        value = scalar(value)
        if value is None:
            if "None" in str(self.annotation):
                return None
            raise ValueError("$null is not allowed for this parameter")
        return self.element(value)


def field_converter(model: type[ConfigObject], field_name: str) -> FieldConverter:
    return FieldConverter(model, field_name)
