"""Errors a user can cause, each with a message meant for that user.

Anything else raised inside mailgate is a bug and is logged with its traceback.
The class names follow the exception names Exchange prints in its
``CategoryInfo`` line, so an administrator recognises them.
"""

from __future__ import annotations

import re


# What SQLite says of a file that isn't (or is no longer) a sound database: a disk fault, a file overwritten.
SQLITE_DAMAGED = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})


def is_damaged_sqlite(exc: BaseException | None) -> bool:
    return getattr(exc, "sqlite_errorname", "") in SQLITE_DAMAGED


_SURROGATE = re.compile("[\ud800-\udfff]")


def not_text(value: str, *, from_bytes: bool = True) -> tuple[int, str] | None:
    """Where ``value`` stops being Unicode text, and why: a byte that wasn't UTF-8 (when ``value`` was decoded
    from bytes, Python keeps such bytes as U+DC80-U+DCFF) or a lone surrogate (JSON can spell one). Such a
    string can't be stored, logged or sent on, so it must be refused where it comes in."""
    found = _SURROGATE.search(value)
    if found is None:
        return None
    code = ord(found.group())
    if from_bytes and 0xDC80 <= code <= 0xDCFF:
        return found.start(), f"a byte that isn't UTF-8 (0x{code - 0xDC00:02X})"
    return found.start(), f"a lone surrogate (U+{code:04X}), which isn't a character"


class UserError(Exception):
    """Base class: an error caused by input, shown to the user without a traceback."""

    category = "InvalidOperation"
    exception_name = "InvalidOperationException"

    def __init__(self, message: str, *, parameter: str | None = None, target: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.target = target


class InvalidValueError(UserError):
    """A parameter value that cannot be converted or is out of range."""

    category = "InvalidArgument"
    exception_name = "ParameterBindingException"


class ParameterError(UserError):
    """Unknown, ambiguous, missing or conflicting parameters."""

    category = "InvalidArgument"
    exception_name = "ParameterBindingException"


class NotFoundError(UserError):
    """An identity that matches no object."""

    category = "NotSpecified"
    exception_name = "ManagementObjectNotFoundException"


class AmbiguousIdentityError(UserError):
    category = "NotSpecified"
    exception_name = "ManagementObjectAmbiguousException"


class ConflictError(UserError):
    """The change conflicts with another object (binding clash, duplicate name...)."""

    category = "InvalidOperation"
    exception_name = "ConnectorMappingConflictException"

    def __init__(self, message: str, *, parameter: str | None = None, target: str = "",
                 exception_name: str | None = None) -> None:
        super().__init__(message, parameter=parameter, target=target)
        if exception_name:
            self.exception_name = exception_name


class ValidationError(UserError):
    """The object would be invalid (cross-field rules)."""

    category = "InvalidData"
    exception_name = "DataValidationException"


class CommandNotFoundError(UserError):
    category = "ObjectNotFound"
    exception_name = "CommandNotFoundException"


class ParseError(UserError):
    category = "ParserError"
    exception_name = "ParseException"


class RuntimeUnavailableError(UserError):
    """The operation needs the running transport service and it is not running."""

    category = "ResourceUnavailable"
    exception_name = "TransportServiceNotRunningException"
