"""PowerShell's value semantics that the shell and the management core share:
truthiness, conversion to text, number literals, hashtables, and comparison
operators (-eq, -like, -match ... with PowerShell's type coercion)."""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import math
import re
from typing import Any

from mailgate.config.values import ByteSize, ExchangeEnum, ExchangeFlag, TimeSpan, UnlimitedInt
from mailgate.errors import UserError


class ShellError(UserError):
    """A runtime error of the shell language itself (bad operator use, unknown member...)."""

    category = "InvalidOperation"
    exception_name = "RuntimeException"


class CIDict(dict):
    """A PowerShell hashtable: keys compare case-insensitively, order is kept."""

    def _key(self, key: Any) -> Any:
        if isinstance(key, str):
            for k in self.keys():
                if isinstance(k, str) and k.lower() == key.lower():
                    return k
        return key

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._key(key))

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(self._key(key), value)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(self._key(key), default)


def truthy(value: Any) -> bool:
    if isinstance(value, list):
        if not value:
            return False
        if len(value) == 1:
            return truthy(value[0])
        return True
    if isinstance(value, str):
        return bool(value)
    if value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return bool(value)
    return True


def to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, list):
        return " ".join(to_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dt.datetime):
        from mailgate.shell.format import format_datetime

        return format_datetime(value)
    if isinstance(value, ExchangeEnum):
        return value.value
    return str(value)


_NUMBER_SUFFIX = {"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40, "pb": 1 << 50}


def parse_number(text: str) -> int | float:
    if text.lower().startswith("0x"):
        return int(text, 16)
    mult = 1
    if text[-2:].lower() in _NUMBER_SUFFIX:
        mult = _NUMBER_SUFFIX[text[-2:].lower()]
        text = text[:-2]
    value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    value = value * mult
    if isinstance(value, float) and value.is_integer() and mult > 1:
        return int(value)
    return value


def _coerce_like(left: Any, right: Any) -> Any:
    """Convert ``right`` to the type of ``left``, as PowerShell does for comparisons."""
    if right is None or left is None:
        return right
    try:
        if isinstance(left, bool):
            return truthy(right) if not isinstance(right, str) else right.strip().lower() in ("true", "$true", "1")
        if isinstance(left, int) and not isinstance(right, (int, float)):
            return parse_number(str(right).strip())
        if isinstance(left, float) and not isinstance(right, (int, float)):
            return float(str(right))
        if isinstance(left, (ByteSize, TimeSpan, UnlimitedInt)) and not isinstance(right, type(left)):
            return type(left).parse(right)
        if isinstance(left, dt.datetime) and isinstance(right, str):
            from mailgate.manage.params import to_datetime

            return to_datetime(right)
        if isinstance(left, str) and not isinstance(right, (str, list, tuple, dict)):
            return to_text(right)   # "2" -ge 10 compares text, as in PowerShell (Import-Csv's values are text)
    except (ValueError, TypeError):
        raise ShellError(f'Cannot compare "{to_text(left)}" with "{to_text(right)}": "{to_text(right)}" can\'t be '
                         f"converted to the type of the left operand.") from None
    return right


def comparable(value: Any) -> Any:
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, (ExchangeEnum, ExchangeFlag)):
        return str(value).lower()
    if isinstance(value, ByteSize):
        return math.inf if value.bytes is None else value.bytes
    if isinstance(value, UnlimitedInt):
        return math.inf if value.value is None else value.value
    if isinstance(value, TimeSpan):
        return value.seconds
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.astimezone()
    if isinstance(value, (int, float, bool, dt.datetime)) or value is None:
        return value
    return str(value).lower()


MAX_WILDCARD_PATTERN = 1024   # characters; identities and -like patterns come from clients of the API too


def wildcard_match(pattern: str, text: str, *, case_sensitive: bool = False) -> bool:
    """PowerShell's wildcards (``*``, ``?``, ``[set]``), as -like and identities use them. A pattern without
    them is compared as text; one with them is compiled once (a small cache: patterns come from users)."""
    if not case_sensitive:
        pattern, text = pattern.lower(), text.lower()
    if not any(c in pattern for c in "*?["):
        return text == pattern
    if len(pattern) > MAX_WILDCARD_PATTERN:
        raise ShellError(f"The wildcard pattern is too long ({len(pattern):,} characters; at most "
                         f"{MAX_WILDCARD_PATTERN:,}).")
    return _wildcard_regex(pattern).match(text) is not None


@functools.lru_cache(maxsize=256)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _scalar_compare(op: str, left: Any, right: Any, variables: dict[str, Any] | None) -> bool:
    base = op.lstrip("-")
    case_sensitive = base.startswith("c") and base not in ("contains",)
    if base[0] in "ci" and base[1:] in ("eq", "ne", "gt", "ge", "lt", "le", "like", "notlike", "match", "notmatch"):
        base = base[1:]
    if base in ("like", "notlike"):
        text, pattern = to_text(left), to_text(right)
        ok = wildcard_match(pattern, text, case_sensitive=case_sensitive)
        return ok if base == "like" else not ok
    if base in ("match", "notmatch"):
        try:
            m = re.search(to_text(right), to_text(left), 0 if case_sensitive else re.IGNORECASE)
        except (re.error, OverflowError) as exc:   # OverflowError: a repetition {n} too large
            raise ShellError(f'The regular expression "{right}" is not valid: {exc}') from None
        if m and base == "match" and variables is not None:
            variables["matches"] = CIDict({i: g for i, g in enumerate([m.group(0), *m.groups()])})
        return bool(m) if base == "match" else not m
    right = _coerce_like(left, right)
    if case_sensitive and isinstance(left, str) and isinstance(right, str):
        a, b = left, right
    else:
        a, b = comparable(left), comparable(right)
    if base == "eq":
        return a == b
    if base == "ne":
        return a != b
    try:
        if base == "gt":
            return a > b
        if base == "ge":
            return a >= b
        if base == "lt":
            return a < b
        if base == "le":
            return a <= b
    except TypeError:
        raise ShellError(f'Cannot compare "{to_text(left)}" and "{to_text(right)}".') from None
    raise ShellError(f"Unknown comparison operator {op}")


def text_operator(op: str, left: Any, right: Any) -> Any:
    """-join, -split and -replace (regular expressions, case-insensitive unless -csplit/-creplace)."""
    base = op.lstrip("-").lower()
    if base == "join":
        return to_text(right).join(to_text(i) for i in (left if isinstance(left, list) else [left]))
    flags = 0 if base.startswith("c") else re.IGNORECASE
    if base.endswith("split"):
        pattern = to_text(right[0] if isinstance(right, list) and right else right)
        items = left if isinstance(left, list) else [left]
        try:
            return [part for i in items for part in re.split(pattern, to_text(i), flags=flags)]
        except (re.error, OverflowError) as exc:   # OverflowError: a repetition {n} too large
            raise ValueError(f'The regular expression pattern "{pattern}" is not valid: {exc}.') from None
    pattern, replacement = (right + [""])[:2] if isinstance(right, list) else (right, "")
    pattern, replacement = to_text(pattern), re.sub(r"\$(\d+)", r"\\\1", to_text(replacement))   # $1 → \1
    try:
        if isinstance(left, list):
            return [re.sub(pattern, replacement, to_text(i), flags=flags) for i in left]
        return re.sub(pattern, replacement, to_text(left), flags=flags)
    except (re.error, OverflowError) as exc:
        raise ValueError(f'The regular expression pattern "{pattern}" is not valid: {exc}.') from None


_FORMAT_ITEM = re.compile(r"\{\{|\}\}|\{(\d+)\s*(?:,\s*(-?\d+)\s*)?(?::([^{}]*))?\}|[{}]")
_FORMAT_ALIGNMENT_MAX = 10_000


def format_operator(template: Any, args: Any) -> str:
    """``"{0,-20} {1:N0}" -f $a,$b``: .NET composite formatting as Exchange's shell does it (en-US): an index,
    an optional alignment (negative: left), an optional format (N, F, D, P, X, E, custom 0.00 and #,##0; date
    formats such as yyyy-MM-dd HH:mm:ss); ``{{`` and ``}}`` are braces."""
    values = args if isinstance(args, list) else [args]
    text = to_text(template)

    def item(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if m.group(1) is None:
            raise ValueError("Error formatting a string: Input string was not in a correct format.")
        index = int(m.group(1))
        if index >= len(values):
            raise ValueError("Error formatting a string: Index (zero based) must be greater than or equal to zero and "
                             "less than the size of the argument list.")
        out = _format_value(values[index], m.group(3))
        if m.group(2):
            width = int(m.group(2))
            if abs(width) > _FORMAT_ALIGNMENT_MAX:
                raise ValueError(f"Error formatting a string: an alignment of {width} is more than "
                                 f"{_FORMAT_ALIGNMENT_MAX:,}.")
            out = out.ljust(-width) if width < 0 else out.rjust(width)
        return out

    return _FORMAT_ITEM.sub(item, text)


def _format_value(value: Any, spec: str | None) -> str:
    if not spec:
        return to_text(value)
    if isinstance(value, dt.datetime):
        return dotnet_strftime(value, spec)
    number = value
    if isinstance(value, str):
        try:
            number = parse_number(value)
        except ValueError:
            return value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return to_text(value)
    code, digits = spec[0].upper(), spec[1:]
    if digits.isdigit() or digits == "":
        places = int(digits) if digits else None
        if places is not None and places > 99:
            raise ValueError("Error formatting a string: a precision over 99.")
        if code in "NF":
            p = 2 if places is None else places
            return f"{number:,.{p}f}" if code == "N" else f"{number:.{p}f}"
        if code == "P":
            return f"{number * 100:,.{2 if places is None else places}f} %"
        if code == "E":
            return f"{number:.{6 if places is None else places}E}".replace("E+", "E+0").replace("E-", "E-0")
        if code in "DX" and isinstance(number, int):
            p = places or 0
            return f"{number:0{p}d}" if code == "D" else f"{number:0{p}{'X' if spec[0] == 'X' else 'x'}}"
    if set(spec) <= set("0#,.%"):   # a custom number format
        decimals = spec.split(".", 1)[1] if "." in spec else ""
        shown = number * 100 if "%" in spec else number
        text = f"{shown:{',' if ',' in spec else ''}.{len(decimals)}f}"
        return text + ("%" if "%" in spec else "")
    raise ValueError(f'Error formatting a string: the format "{spec}" is not one this shell knows.')


# .NET's standard date formats (one letter) as the custom formats they stand for in en-US; "u", "r" and "U" are
# written in UTC.
_STANDARD_DATE_FORMATS = {
    "d": "M/d/yyyy", "D": "dddd, MMMM d, yyyy", "f": "dddd, MMMM d, yyyy h:mm tt", "F": "dddd, MMMM d, yyyy h:mm:ss tt",
    "g": "M/d/yyyy h:mm tt", "G": "M/d/yyyy h:mm:ss tt", "m": "MMMM d", "M": "MMMM d", "o": "yyyy-MM-ddTHH:mm:ss.fffffffK",
    "O": "yyyy-MM-ddTHH:mm:ss.fffffffK", "r": "ddd, dd MMM yyyy HH:mm:ss 'GMT'", "R": "ddd, dd MMM yyyy HH:mm:ss 'GMT'",
    "s": "yyyy-MM-ddTHH:mm:ss", "t": "h:mm tt", "T": "h:mm:ss tt", "u": "yyyy-MM-dd HH:mm:ss'Z'",
    "U": "dddd, MMMM d, yyyy h:mm:ss tt", "y": "MMMM yyyy", "Y": "MMMM yyyy",
}
# A custom format's specifiers: runs of one letter (yyyy, MM, d, fff...), quoted text, \x, and %x.
_DATE_TOKENS = re.compile(r"'[^']*'?|\"[^\"]*\"?|\\.|%|(y+|M+|d+|h+|H+|m+|s+|f+|F+|t+|z+|K)|.", re.S)


def dotnet_strftime(value: dt.datetime, fmt: str) -> str:
    """A date in a .NET format string, standard ("s", "o", "G"...) or custom ("yyyy-MM-dd HH:mm:ss.fff",
    "M/d/yyyy h:mm tt", "dddd 'at' HH:mm"), as en-US writes it."""
    if len(fmt) == 1 and fmt in _STANDARD_DATE_FORMATS:
        if fmt in "urRU" and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc)
        fmt = _STANDARD_DATE_FORMATS[fmt]
    out = []
    for match in _DATE_TOKENS.finditer(fmt):
        token, spec = match.group(0), match.group(1)
        if spec is None:
            if token[:1] in ("'", '"'):
                out.append(token[1:-1] if len(token) > 1 and token[-1] == token[0] else token[1:])
            elif token.startswith("\\"):
                out.append(token[1:])
            elif token != "%":   # "%d": the single specifier that follows
                out.append(token)
            continue
        out.append(_date_part(value, spec))
    return "".join(out)


def _date_part(value: dt.datetime, spec: str) -> str:
    letter, n = spec[0], len(spec)
    if letter == "y":
        return str(value.year % 100) if n == 1 else f"{value.year % 100:02d}" if n == 2 else f"{value.year:0{n}d}"
    if letter == "M":
        return value.strftime("%B") if n >= 4 else value.strftime("%b") if n == 3 else f"{value.month:0{n}d}"
    if letter == "d":
        return value.strftime("%A") if n >= 4 else value.strftime("%a") if n == 3 else f"{value.day:0{n}d}"
    if letter in "hH":
        hour = value.hour if letter == "H" else (value.hour % 12 or 12)
        return f"{hour:0{min(n, 2)}d}"
    if letter == "m":
        return f"{value.minute:0{min(n, 2)}d}"
    if letter == "s":
        return f"{value.second:0{min(n, 2)}d}"
    if letter in "fF":
        digits = f"{value.microsecond:06d}0"[:min(n, 7)]
        return digits if letter == "f" else digits.rstrip("0")
    if letter == "t":
        return value.strftime("%p")[:1 if n == 1 else 2]
    offset = value.utcoffset() if value.tzinfo is not None else None
    if letter == "K":
        if offset is None:
            return ""
        return "Z" if value.tzinfo is dt.timezone.utc else _offset_text(offset, 3)
    return _offset_text(offset or (dt.datetime.now().astimezone().utcoffset() or dt.timedelta()), min(n, 3))


def _offset_text(offset: dt.timedelta, width: int) -> str:
    """+5, +05 or +05:00 (z, zz, zzz) for an offset from UTC."""
    minutes = int(offset.total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("+", minutes)
    hours, minutes = divmod(minutes, 60)
    return f"{sign}{hours}" if width == 1 else f"{sign}{hours:02d}" if width == 2 else f"{sign}{hours:02d}:{minutes:02d}"


def compare(op: str, left: Any, right: Any, variables: dict[str, Any] | None = None) -> Any:
    base = op.lstrip("-").lower()
    if base in ("contains", "notcontains", "ccontains", "icontains"):
        items = left if isinstance(left, list) else [left]
        found = any(_scalar_compare("-eq", i, right, variables) for i in items)
        return found if "not" not in base else not found
    if base in ("in", "notin"):
        items = right if isinstance(right, list) else [right]
        found = any(_scalar_compare("-eq", i, left, variables) for i in items)
        return found if base == "in" else not found
    if isinstance(left, list):
        return [item for item in left if _scalar_compare(op, item, right, variables)]
    return _scalar_compare(op, left, right, variables)


