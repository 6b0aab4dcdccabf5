"""Binding a command's arguments to a cmdlet's parameters, as PowerShell does:
named parameters by unambiguous prefix, switches, positional arguments,
pipeline input, mandatory checks and conversion with errors that name the
parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailgate.errors import InvalidValueError, ParameterError, UserError
from mailgate.manage.cmdlets import Cmdlet, Param
from mailgate.manage.params import to_bool
from mailgate.manage.present import Record

NO_VALUE = object()


@dataclass
class NamedArg:
    name: str
    value: Any = NO_VALUE   # NO_VALUE: "-Name" with nothing attached


@dataclass
class PositionalArg:
    value: Any


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def bind(cmdlet: Cmdlet, elements: list[NamedArg | PositionalArg]) -> dict[str, Any]:
    """Bind command elements to parameters; values are not yet converted."""
    bound: dict[str, Any] = {}
    positionals: list[Any] = []
    i = 0
    while i < len(elements):
        el = elements[i]
        i += 1
        if isinstance(el, PositionalArg):
            positionals.append(el.value)
            continue
        param = cmdlet.param(el.name)
        if param.name in bound:
            raise ParameterError(f"Cannot bind parameter because parameter '{param.name}' is specified more than once. "
                                 "To provide multiple values to parameters that can accept multiple values, use the "
                                 "array syntax. For example, \"-parameter value1,value2,value3\".", parameter=param.name)
        if param.switch:
            bound[param.name] = True if el.value is NO_VALUE else _switch_value(param, el.value)
            continue
        if el.value is not NO_VALUE:
            bound[param.name] = el.value
            continue
        if i < len(elements) and isinstance(elements[i], PositionalArg):
            bound[param.name] = elements[i].value  # type: ignore[union-attr]
            i += 1
            continue
        raise ParameterError(f"Missing an argument for parameter '{param.name}'. Specify a parameter of type "
                             f"'{param.type_name}' and try again.", parameter=param.name)
    free = [p for p in cmdlet.positional if p.name not in bound]
    for value in positionals:
        if not free:
            raise ParameterError(f"A positional parameter cannot be found that accepts argument '{_describe(value)}'.",
                                 parameter=None)
        bound[free.pop(0).name] = value
    return bound


def _transformation_error(param: Param, exc: Exception) -> InvalidValueError:
    """PowerShell's words for a value that doesn't convert to its parameter's type, with the reason as a sentence."""
    reason = str(exc).rstrip(".")
    return InvalidValueError(f"Cannot process argument transformation on parameter '{param.name}'. "
                             f"{reason[:1].upper()}{reason[1:]}.", parameter=param.name)


def _switch_value(param: Param, value: Any) -> bool:
    try:
        return to_bool(value)
    except ValueError as exc:
        raise _transformation_error(param, exc) from None


def convert(cmdlet: Cmdlet, bound: dict[str, Any]) -> dict[str, Any]:
    """Convert bound raw values and check mandatory parameters."""
    out: dict[str, Any] = {}
    for name, value in bound.items():
        param = cmdlet.param(name)
        if param.switch or param.raw or param.from_pipeline and not _has_converter(param):
            if param.name == "Identity":
                value = _one_identity(value)
                if value is None:   # as if not given: a mandatory identity is then reported missing
                    continue
            out[name] = value
            continue
        try:
            out[name] = param.convert(value)
        except UserError:
            raise
        except (ValueError, TypeError) as exc:
            raise _transformation_error(param, exc) from None
    missing = [p.name for p in cmdlet.params if p.mandatory and p.name not in out]
    if missing:
        raise ParameterError("Cannot process command because of one or more missing mandatory parameters: "
                             f"{' '.join(missing)}.", parameter=missing[0])
    return out


def _one_identity(value: Any) -> Any:
    """Exchange's -Identity takes one object (an IdParameter): a one-element list is that element, more or
    fewer is a binding error, not a list the cmdlet has to cope with."""
    if isinstance(value, dict):   # a hashtable is no identity (it was looked up by its Python text)
        raise InvalidValueError("Cannot process argument transformation on parameter 'Identity'. Cannot convert the "
                                '"System.Collections.Hashtable" value of type "System.Collections.Hashtable" to an '
                                "identity; give a name, an identity or a GUID.", parameter="Identity")
    if not isinstance(value, list):
        return value
    if len(value) == 1 and not isinstance(value[0], (list, dict)):
        return value[0]
    raise InvalidValueError("Cannot process argument transformation on parameter 'Identity'. Cannot convert the "
                            '"System.Object[]" value of type "System.Object[]" to the single identity the parameter '
                            "takes; run the command once per object (for example through a pipeline).",
                            parameter="Identity")


def _has_converter(param: Param) -> bool:
    return param.convert.__name__ != "_identity"


# What Get-TransportService, Get-ExchangeServer and Get-FrontendTransportService output: server objects.
SERVER_OBJECT_TYPES = frozenset({"TransportServer", "ExchangeServer", "FrontendTransportServer"})


def pipeline_param(cmdlet: Cmdlet, item: Any = None) -> Param | None:
    """The parameter a piped object binds to. A server object goes to -Server where that takes pipeline input
    (``Get-TransportService | Get-Queue``, ``| Get-MessageTrackingLog``: PowerShell binds it by its type); anything
    else to the cmdlet's first other pipeline parameter (-Identity, -InputObject)."""
    piped = [p for p in cmdlet.params if p.from_pipeline]
    server = next((p for p in piped if p.name == "Server"), None)
    if server is not None and isinstance(item, Record) and item.type_name in SERVER_OBJECT_TYPES:
        return server
    return next((p for p in piped if p is not server), server)
