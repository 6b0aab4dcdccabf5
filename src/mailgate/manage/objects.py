"""Shared machinery for cmdlets over stored configuration objects:
parameters generated from model fields, applying changes, finding by identity.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, TypeVar

from pydantic import ValidationError as PydanticValidationError

from mailgate.config.model import ConfigObject, RuleViolation
from mailgate.config.store import ConfigTransaction
from mailgate.config.values import ExchangeEnum, ExchangeFlag
from mailgate.errors import AmbiguousIdentityError, InvalidValueError, NotFoundError, ValidationError
from mailgate.manage.cmdlets import Param
from mailgate.manage.params import FieldConverter, MultiValuedChange

T = TypeVar("T", bound=ConfigObject)

INTERNAL_FIELDS = {"guid", "when_created", "when_changed"}


def exchange_name(model: type[ConfigObject], field_name: str) -> str:
    info = model.model_fields[field_name]
    return info.alias or field_name


# Our value types → the parameter types Exchange's help shows (Get-Help's syntax lines).
_EXCHANGE_TYPE_NAMES = {"str": "String", "bool": "Boolean", "int": "Int32", "float": "Double", "datetime": "DateTime",
                        "ByteSize": "ByteQuantifiedSize", "UnlimitedInt": "Unlimited", "TimeSpan": "EnhancedTimeSpan",
                        "AuthMechanism": "AuthMechanisms", "SmartHostAuthMechanism": "AuthMechanisms",
                        "MessageRateSource": "MessageRateSourceFlags"}


def _type_name(annotation: Any) -> str:
    """The type a field's parameter shows in help: Exchange's name for it (``str | None`` is a String)."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is list:
        return "MultiValuedProperty"
    if type(None) in getattr(annotation, "__args__", ()) and len(args) == 1:   # Optional: the type it holds
        return _type_name(args[0])
    if getattr(annotation, "__metadata__", None):   # Annotated[T, ...]
        return _type_name(annotation.__origin__)
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return _EXCHANGE_TYPE_NAMES.get(text, text)


def field_params(model: type[ConfigObject], *, exclude: Iterable[str] = (), only: Iterable[str] | None = None,
                 help: dict[str, str] | None = None) -> list[Param]:
    """A parameter for each settable field of ``model``, named and typed as the field."""
    excluded = set(exclude) | INTERNAL_FIELDS
    wanted = set(only) if only is not None else None
    params = []
    for name, info in model.model_fields.items():
        if name in excluded or (wanted is not None and name not in wanted):
            continue
        conv = FieldConverter(model, name)
        annotation = info.annotation
        type_name = _type_name(annotation)
        element = annotation.__args__[0] if conv.is_list else annotation  # type: ignore[union-attr]
        if isinstance(element, type) and issubclass(element, (ExchangeEnum, ExchangeFlag)):
            type_name = _EXCHANGE_TYPE_NAMES.get(element.__name__, element.__name__)
        params.append(Param(exchange_name(model, name), convert=conv, type_name=type_name, multi=conv.is_list,
                            help=(help or {}).get(name, "")))
    return params


def field_for(model: type[ConfigObject], exchange: str) -> str:
    key = exchange.lower()
    for name, info in model.model_fields.items():
        if (info.alias or name).lower() == key:
            return name
    raise KeyError(exchange)


def apply_changes(obj: T, changes: dict[str, Any]) -> T:
    """A copy of ``obj`` with ``changes`` (Exchange names → converted values), validated."""
    model = type(obj)
    data = obj.model_dump(by_alias=False)
    for exchange, value in changes.items():
        name = field_for(model, exchange)
        if isinstance(value, MultiValuedChange):
            value = value.apply_to(list(getattr(obj, name)), exchange)
        data[name] = value
    data["when_changed"] = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    return validate(model, data)


def validate(model: type[T], data: dict[str, Any]) -> T:
    try:
        new = model.model_validate(data)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc", ("?",))
        field = str(loc[0])
        param = exchange_name(model, field) if field in model.model_fields else field
        raise InvalidValueError(f"Cannot process argument transformation on parameter '{param}'. "
                                f"{str(err.get('msg', '')).removeprefix('Value error, ')}", parameter=param) from None
    check(new)
    return new


def check(obj: ConfigObject) -> None:
    try:
        obj.check()
    except RuleViolation as rule:
        raise ValidationError(rule.message, parameter=rule.parameter, target=obj.identity) from None


def not_found(kind_text: str, identity: str) -> NotFoundError:
    return NotFoundError(f"The operation couldn't be performed because object '{identity}' couldn't be found "
                         f"among the {kind_text}.", target=identity)


def find_one(tx: ConfigTransaction, model: type[T], identity: Any, *, kind_text: str,
             match: Any = None) -> T:
    """Find one object by Identity: Name (or Server\\Name), Guid, or a record/object carrying them."""
    found = find(tx, model, identity, match=match)
    text = identity_text(identity)
    if not found:
        raise not_found(kind_text, text)
    if len(found) > 1:
        names = ", ".join(o.identity for o in found)
        raise AmbiguousIdentityError(f"The identity '{text}' matches several objects ({names}); "
                                     "give the full identity.", target=text)
    return found[0]


def identity_text(identity: Any) -> str:
    if hasattr(identity, "get") and not isinstance(identity, dict):
        ident = identity.get("Identity")
        if ident is not None:
            return str(ident)
    if isinstance(identity, ConfigObject):
        return identity.identity
    return str(identity)


def find(tx: ConfigTransaction, model: type[T], identity: Any, *, match: Any = None) -> list[T]:
    guid = None
    if isinstance(identity, ConfigObject):
        guid = identity.guid
    elif hasattr(identity, "get") and not isinstance(identity, dict) and identity.get("Guid"):
        guid = identity.get("Guid")
    objects = tx.list(model)
    if guid:
        return [o for o in objects if o.guid == guid]
    text = identity_text(identity).strip()
    key = text.lower()
    exact = [o for o in objects if o.guid.lower() == key or o.identity.lower() == key]
    if exact:
        return exact
    if match is not None:
        return [o for o in objects if match(o, key)]
    return [o for o in objects if getattr(o, "name", "").lower() == key]
