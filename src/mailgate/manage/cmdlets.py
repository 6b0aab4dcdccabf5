"""Cmdlet definitions: names, parameters and the handler behind each.

This is the one list of operations the shell, the REST API and the web admin
center expose. A handler receives the management context and the bound,
converted parameter values (Python names are not used here: keys are the
Exchange parameter names), and returns the objects it outputs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from mailgate.errors import CommandNotFoundError, InvalidValueError, ParameterError

Converter = Callable[[Any], Any]


def _identity(value: Any) -> Any:
    return value


@dataclass
class Param:
    name: str
    convert: Converter = _identity
    type_name: str = "String"
    mandatory: bool = False
    position: int | None = None
    switch: bool = False
    from_pipeline: bool = False      # binds the pipeline object (ByValue / ByPropertyName Identity)
    aliases: tuple[str, ...] = ()
    help: str = ""
    sets: tuple[str, ...] = ()       # parameter sets this parameter belongs to; () = all
    multi: bool = False              # multi-valued: lists and @{Add=...;Remove=...}
    raw: bool = False                # hand the shell value over unconverted (scripts, hashtables)
    # Names a file to read or write where the cmdlet runs. In the shell that is the administrator's own machine
    # and account; over the REST API it would be the server's, so the API refuses such a parameter.
    local_file: bool = False


@dataclass
class Cmdlet:
    name: str
    handler: Callable[..., Any]
    params: list[Param]
    synopsis: str = ""
    description: str = ""
    examples: list[str] = field(default_factory=list)
    needs_runtime: bool = False
    mutates: bool = False
    default_view: str | None = None   # type name whose view formats the output
    builtin: bool = False             # a shell utility (Format-Table...), not a management operation
    # The builtin's form that takes its input as it flows (shell/streams.py): (ctx, args, chunks, per_chunk) →
    # its output's chunks, or None when these arguments need all of the input at once. ``per_chunk(args)`` runs
    # the cmdlet itself on args holding one chunk as its input.
    stream: Callable[..., Any] | None = None

    @property
    def confirm_impact(self) -> str:
        """Exchange's ConfirmImpact: its Remove-* cmdlets are High (the shell asks before they act)."""
        return "High" if self.name.lower().startswith("remove-") else "Medium"

    def param(self, name: str) -> Param:
        """Find a parameter by exact name, alias or unambiguous prefix (case-insensitive)."""
        key = name.lower()
        for p in self.params:
            if p.name.lower() == key or key in (a.lower() for a in p.aliases):
                return p
        matches = [p for p in self.params if p.name.lower().startswith(key)]
        matches += [p for p in self.params if p not in matches and any(a.lower().startswith(key) for a in p.aliases)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ParameterError(f"A parameter cannot be found that matches parameter name '{name}'.",
                                 parameter=name)
        options = " ".join("-" + p.name for p in matches)
        raise ParameterError(f"Parameter cannot be processed because the parameter name '{name}' is ambiguous. "
                             f"Possible matches include: {options}.", parameter=name)

    @property
    def positional(self) -> list[Param]:
        return sorted((p for p in self.params if p.position is not None), key=lambda p: p.position or 0)


COMMON_WRITE_PARAMS = [
    Param("WhatIf", switch=True, type_name="SwitchParameter", help="Show what would change without changing it."),
    Param("Confirm", switch=True, type_name="SwitchParameter",
          help="Ask before the change; -Confirm:$false never asks (the interactive shell asks before Remove-*)."),
    Param("DomainController", help="Accepted for compatibility; ignored."),
]
COMMON_READ_PARAMS = [Param("DomainController", help="Accepted for compatibility; ignored.")]

# PowerShell's ActionPreference; Suspend and Inquire act as Continue here (no workflows, no prompts).
ACTION_PREFERENCES = ("Continue", "SilentlyContinue", "Stop", "Ignore", "Inquire", "Suspend")


def action_preference(value: Any) -> str:
    text = str(value[0] if isinstance(value, list) and len(value) == 1 else value).strip()
    for name in ACTION_PREFERENCES:
        if text.lower() == name.lower():
            return name
    raise InvalidValueError(f'Cannot convert value "{text}" to type "System.Management.Automation.ActionPreference". '
                            f"Specify one of the following enumerator names and try again: "
                            f"{', '.join(ACTION_PREFERENCES)}.")


# Every cmdlet takes these in the shell, as PowerShell's common parameters; the REST API has no use for them.
SHELL_COMMON_PARAMS = [
    Param("ErrorAction", convert=action_preference, aliases=("ea",), type_name="ActionPreference",
          help="What an error does: Continue (shown, the script goes on), SilentlyContinue or Ignore (not shown), "
               "Stop (ends the script unless a try block catches it)."),
    Param("WarningAction", convert=action_preference, aliases=("wa",), type_name="ActionPreference",
          help="SilentlyContinue or Ignore hide the cmdlet's warnings."),
    Param("Verbose", switch=True, aliases=("vb",), type_name="SwitchParameter",
          help="Accepted for compatibility; ignored."),
]
SHELL_COMMON_NAMES = frozenset(p.name for p in SHELL_COMMON_PARAMS)


class Registry:
    def __init__(self) -> None:
        self._cmdlets: dict[str, Cmdlet] = {}
        self._aliases: dict[str, str] = {}

    def add(self, cmdlet: Cmdlet) -> Cmdlet:
        key = cmdlet.name.lower()
        if key in self._cmdlets:
            raise RuntimeError(f"cmdlet {cmdlet.name} defined twice")
        self._cmdlets[key] = cmdlet
        return cmdlet

    def alias(self, alias: str, name: str) -> None:
        self._aliases[alias.lower()] = name.lower()

    def get(self, name: str) -> Cmdlet:
        key = name.lower()
        key = self._aliases.get(key, key)
        if key not in self._cmdlets:
            raise CommandNotFoundError(
                f"The term '{name}' is not recognized as the name of a cmdlet, function, script file, or operable "
                "program. Check the spelling of the name, or if a path was included, verify that the path is correct "
                "and try again.", target=name)
        return self._cmdlets[key]

    def __contains__(self, name: str) -> bool:
        key = name.lower()
        return self._aliases.get(key, key) in self._cmdlets

    def all(self) -> list[Cmdlet]:
        return sorted(self._cmdlets.values(), key=lambda c: c.name)

    def aliases(self) -> dict[str, str]:
        return {a: self._cmdlets[n].name for a, n in self._aliases.items()}


registry = Registry()


def cmdlet(name: str, params: Iterable[Param] = (), *, synopsis: str = "", description: str = "",
           examples: Iterable[str] = (), needs_runtime: bool = False, mutates: bool = False,
           default_view: str | None = None, builtin: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the handler of cmdlet ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        plist = list(params)
        names = {p.name.lower() for p in plist}
        extra = (COMMON_WRITE_PARAMS if mutates else COMMON_READ_PARAMS) + SHELL_COMMON_PARAMS
        plist += [p for p in extra if p.name.lower() not in names]
        # The docstring, as Get-Help shows it to an administrator: its lines dedented, without reST's ``quotes``.
        doc = inspect.cleandoc(fn.__doc__ or "").replace("``", "")
        registry.add(Cmdlet(name=name, handler=fn, params=plist, synopsis=synopsis or doc.split("\n")[0],
                            description=description or doc, examples=list(examples),
                            needs_runtime=needs_runtime, mutates=mutates, default_view=default_view, builtin=builtin))
        return fn

    return wrap


def streams(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as the form of builtin ``name`` that takes its input as it flows (``Cmdlet.stream``)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        registry.get(name).stream = fn
        return fn

    return wrap
