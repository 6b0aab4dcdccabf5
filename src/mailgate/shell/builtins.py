"""PowerShell's utility commands that Exchange administrators pipe into:
Format-Table/List, Select/Where/Sort/Measure/Group/ForEach-Object, Get-Member, Get-Command,
Get-Help, Get-Date, Write-Host/Output, Out-Null/String/File, Export-Csv, Import-Csv, Get-Content,
Start-Sleep."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import itertools
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from mailgate.config.values import ByteSize, TimeSpan
from mailgate.errors import InvalidValueError, ParameterError, UserError
from mailgate.manage.cmdlets import SHELL_COMMON_NAMES, SHELL_COMMON_PARAMS, Param, cmdlet, registry, streams
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import as_list, to_datetime, to_int, to_str, to_str_list
from mailgate.manage.present import PS_CUSTOM_OBJECT, Record, to_json
from mailgate.manage.psvalues import comparable, compare, dotnet_strftime, to_text, truthy, wildcard_match
from mailgate.shell import format as fmt
from mailgate.shell import textfiles
from mailgate.shell.textfiles import to_file_encoding
from mailgate.shell.evaluator import ScriptBlock, member
from mailgate.shell.streams import Stream, marked, write_printed

_INPUT = Param("InputObject", from_pipeline=True, raw=True, help="The objects to process (from the pipeline).")


def _limit(ctx: ManagementContext) -> int:
    return ctx.shell.enumeration_limit() if ctx.shell else 4


def _width() -> int | None:
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _inputs(args: dict[str, Any]) -> list[Any]:
    return as_list(args.get("InputObject"))


def _props(args: dict[str, Any]) -> list[Any]:
    return as_list(args.get("Property"))


def _value_of(item: Any, prop: Any) -> Any:
    """A -Property value of an object: a name, a calculated property @{Expression=...}, or a script block."""
    if isinstance(prop, ScriptBlock):
        result = prop.invoke(item)
        return result[0] if len(result) == 1 else (result or None)
    return fmt._column_value(item, prop if isinstance(prop, dict) else to_text(prop), None)


_GROUP_BY = Param("GroupBy", raw=True, help="A property (or @{Expression=...}): a table per run of equal values.")


def _grouped(items: list[Any], group_by: Any, render: Callable[[list[Any]], list[str]]) -> list[Any]:
    """-GroupBy of Format-Table and Format-List: a section per run of objects with the same value (PowerShell
    groups runs as they come, so sort first for one section per value), under "   Name: value"."""
    title = fmt._column_title(group_by) if isinstance(group_by, dict) else to_text(group_by)
    lines: list[str] = []
    for value, run in itertools.groupby(items, key=lambda i: fmt.format_value(_value_of(i, group_by), -1)):
        lines += ["", f"   {title}: {value}", *render(list(run))]
    return [fmt.Formatted(lines)]


@cmdlet("Format-Table", [Param("Property", position=0, raw=True), Param("AutoSize", switch=True),
                         Param("Wrap", switch=True), Param("HideTableHeaders", switch=True), _GROUP_BY, _INPUT],
        synopsis="Show objects as a table (alias ft).", builtin=True)
def format_table(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the given properties (wildcards allowed) as table columns sized to their content."""
    items = _inputs(args)
    if not items:
        return []
    if args.get("GroupBy") is not None:
        return _grouped(items, args["GroupBy"], lambda run: format_table(ctx, {**args, "GroupBy": None,
                                                                               "InputObject": run})[0].lines)
    cols = _table_columns(items, args)
    if not cols:
        return [fmt.Formatted([to_text(i) for i in items])]
    return [fmt.Formatted(fmt.render_table(items, cols, limit=_limit(ctx), width=None if args.get("Wrap") else _width(),
                                           hide_headers=bool(args.get("HideTableHeaders"))))]


def _table_columns(items: list[Any], args: dict[str, Any]) -> list[Any]:
    """Format-Table's columns: -Property (wildcards expanded), else the type's table view, else every property."""
    cols = fmt.expand_columns(items, _props(args))
    if not cols:
        first = items[0]
        view = fmt.DEFAULT_VIEWS.get(first.type_name) if isinstance(first, Record) else None
        cols = list(view[1]) if view and view[0] == "table" and view[1] else fmt.column_names(items)
    return cols


@streams("Format-Table")
def format_table_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """One table, printed a chunk at a time: the header once, every column as wide as the first chunk made it
    (longer values later are cut, as PowerShell does). -AutoSize and -GroupBy need all the objects first."""
    if args.get("AutoSize") or args.get("GroupBy") is not None:
        return None

    def tables() -> Iterator[list[Any]]:
        layout = fmt.TableLayout()
        cols: list[Any] | None = None
        for chunk in marked(chunks):
            cols = cols if cols is not None else _table_columns(chunk, args)
            if not cols:
                yield [fmt.Formatted([to_text(i) for i in chunk])]
                continue
            yield [fmt.Formatted(fmt.render_table(chunk, cols, limit=_limit(ctx),
                                                  width=None if args.get("Wrap") else _width(),
                                                  hide_headers=bool(args.get("HideTableHeaders")),
                                                  layout=layout, closing=chunk.last))]

    return tables()


@cmdlet("Format-List", [Param("Property", position=0, raw=True), _GROUP_BY, _INPUT],
        synopsis="Show objects as property lists (alias fl).", builtin=True)
def format_list(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show each object as 'Name : Value' lines; -Property picks and orders the properties (wildcards allowed)."""
    items = _inputs(args)
    if not items:
        return []
    if args.get("GroupBy") is not None:
        return _grouped(items, args["GroupBy"], lambda run: format_list(ctx, {**args, "GroupBy": None,
                                                                              "InputObject": run})[0].lines)
    cols = fmt.expand_columns(items, _props(args))
    return [fmt.Formatted(fmt.render_list(items, cols or None, limit=_limit(ctx)))]


@streams("Format-List")
def format_list_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """Each chunk's objects as lists, one blank line apart as if they were one list."""
    if args.get("GroupBy") is not None:
        return None

    def lists() -> Iterator[list[Any]]:
        for number, chunk in enumerate(chunks):
            out = per_chunk({**args, "InputObject": chunk})
            if number and out and isinstance(out[0], fmt.Formatted) and out[0].lines[:1] == [""]:
                out = [fmt.Formatted(out[0].lines[1:]), *out[1:]]
            yield out

    return lists()


def _each_chunk(args: dict[str, Any], chunks: Iterable[list[Any]], per_chunk: Any) -> Iterator[list[Any]]:
    """A builtin that handles each object on its own, run on each chunk in turn."""
    for chunk in chunks:
        yield per_chunk({**args, "InputObject": chunk})


def _select_props(items: list[Any], props: list[Any]) -> list[Any]:
    cols = fmt.expand_columns(items, props)
    out = []
    for item in items:
        values = {}
        for col in cols:
            title = fmt._column_title(col)
            values[title] = fmt._column_value(item, col, None)
        out.append(Record(_selected_type(item), values))
    return out


def _selected_type(item: Any) -> str:
    """The type of what Select-Object makes, as PowerShell names it ("Selected.<type>"): no formatting view is
    defined for it, so it is shown by its own properties (a table up to four, a list from five)."""
    return f"Selected.{item.type_name}" if isinstance(item, Record) else "Selected"


@cmdlet("Select-Object", [Param("Property", position=0, raw=True), Param("First", convert=to_int),
                          Param("Last", convert=to_int), Param("Skip", convert=to_int),
                          Param("ExpandProperty", convert=to_str), Param("Unique", switch=True),
                          Param("ExcludeProperty", raw=True), _INPUT],
        synopsis="Pick properties or objects (alias select).", builtin=True)
def select_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Keep some properties (calculated ones with @{Name=...;Expression={...}}), or the first/last objects."""
    items = _inputs(args)
    if args.get("Skip"):
        items = items[args["Skip"]:]
    if args.get("First") is not None:
        items = items[: args["First"]]
    if args.get("Last") is not None:
        items = items[-args["Last"]:] if args["Last"] else []
    if args.get("ExpandProperty"):
        out: list[Any] = []
        for item in items:
            value = fmt.get_property(item, args["ExpandProperty"])
            out.extend(value if isinstance(value, list) else ([] if value is None else [value]))
        items = out
    elif args.get("Property") is not None or args.get("ExcludeProperty") is not None:
        props = _props(args) or ["*"]
        items = _select_props(items, props)
        excluded = [to_text(p) for p in as_list(args.get("ExcludeProperty"))]   # names or wildcards (When*)
        if excluded:
            items = [Record(i.type_name, {k: v for k, v in i.items()
                                          if not any(wildcard_match(p, k) for p in excluded)}) for i in items]
    if args.get("Unique"):
        seen, unique = set(), []
        for item in items:
            key = fmt.format_value(list(item.items()) if isinstance(item, Record) else item, -1)
            if key not in seen:
                seen.add(key)
                unique.append(item)
        items = unique
    return items


@streams("Select-Object")
def select_object_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """-Skip and -First counted across chunks (reading stops after the first N); -Last and -Unique need all."""
    if args.get("Last") is not None or args.get("Unique"):
        return None
    skip, first = args.get("Skip") or 0, args.get("First")
    rest = {**args, "Skip": None, "First": None}

    def selected() -> Iterator[list[Any]]:
        to_skip, taken = skip, 0
        for chunk in chunks:
            if to_skip:
                cut = min(to_skip, len(chunk))
                chunk, to_skip = chunk[cut:], to_skip - cut
            if first is not None:
                chunk = chunk[: first - taken]
                taken += len(chunk)
            if chunk:
                yield per_chunk({**rest, "InputObject": chunk})
            if first is not None and taken >= first:
                return

    return selected()


_OPERATOR_SWITCHES = ["EQ", "NE", "GT", "GE", "LT", "LE", "Like", "NotLike", "Match", "NotMatch", "Contains",
                      "NotContains", "In", "NotIn", "CEQ", "CNE", "CLike", "CMatch"]


@cmdlet("Where-Object", [Param("FilterScript", position=0, raw=True, aliases=("Property",)),
                         Param("Value", position=1, raw=True),
                         *[Param(op, switch=True) for op in _OPERATOR_SWITCHES], _INPUT],
        synopsis="Keep the objects that match (alias where, ?).", builtin=True)
def where_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Keep objects for which {script block} is true, or 'Property -op Value' holds."""
    items = _inputs(args)
    test = args.get("FilterScript")
    if isinstance(test, ScriptBlock):
        return [item for item in items if truthy(test.invoke(item))]
    if test is None:
        raise UserError("Where-Object needs a filter: {$_.Property -eq 'value'} or Property -EQ Value.",
                        parameter="FilterScript")
    ops = [op for op in _OPERATOR_SWITCHES if args.get(op)]
    if len(ops) > 1:
        raise UserError("Where-Object takes one comparison operator.", parameter=ops[1])
    prop = to_text(test)
    if not ops:
        return [item for item in items if truthy(fmt.get_property(item, prop))]
    op = "-" + ops[0].lower()
    value = args.get("Value")
    variables = ctx.shell.variables if ctx.shell else {}
    return [item for item in items if truthy(compare(op, fmt.get_property(item, prop), value, variables))]


@streams("Where-Object")
def where_object_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    return _each_chunk(args, chunks, per_chunk)


@cmdlet("Sort-Object", [Param("Property", position=0, raw=True), Param("Descending", switch=True),
                        Param("Unique", switch=True), _INPUT],
        synopsis="Sort objects by properties (alias sort).", builtin=True)
def sort_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Sort by one or more properties (or by value); a property given as @{Expression=...; Descending=$true} (or
    Ascending=$false) sorts its own way, the others as -Descending says."""
    items = _inputs(args)
    props = _props(args)

    def key(item: Any) -> tuple:
        values = [_value_of(item, p) for p in props] if props else [item]
        return tuple(_sort_key(v) for v in values)

    def descending(prop: Any) -> bool:
        if isinstance(prop, dict):
            order = {str(k).lower(): v for k, v in prop.items()}
            if "descending" in order:
                return truthy(order["descending"])
            if "ascending" in order:
                return not truthy(order["ascending"])
        return bool(args.get("Descending"))

    result = list(items)
    for prop in reversed(props or [None]):   # stable sorts, the last key first: each key keeps its direction
        result.sort(key=lambda item: _sort_key(_value_of(item, prop) if prop is not None else item),
                    reverse=descending(prop))
    if args.get("Unique"):
        seen: set[Any] = set()
        result = [i for i in result if not (key(i) in seen or seen.add(key(i)))]  # type: ignore[func-returns-value]
    return result


def _sort_key(value: Any) -> tuple:
    v = comparable(value)
    if v is None:
        return (0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, v)
    if isinstance(v, dt.datetime):
        return (2, v.timestamp())
    return (3, str(v))


@cmdlet("Measure-Object", [Param("Property", position=0, raw=True), Param("Sum", switch=True),
                           Param("Average", switch=True), Param("Maximum", switch=True), Param("Minimum", switch=True),
                           _INPUT],
        synopsis="Count objects, or sum/average a property (alias measure).", builtin=True)
def measure_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Count the objects; with -Property and -Sum/-Average/-Maximum/-Minimum, compute those."""
    return [_measure(args, [_inputs(args)])]


@streams("Measure-Object")
def measure_object_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """The measure of all the chunks, kept as running totals."""
    def measured() -> Iterator[list[Any]]:
        yield [_measure(args, chunks)]

    return measured()


def _measure(args: dict[str, Any], chunks: Iterable[list[Any]]) -> Record:
    props = _props(args)
    prop = to_text(props[0]) if props else None
    statistics = any(args.get(k) for k in ("Sum", "Average", "Maximum", "Minimum"))
    count = numbered = 0
    total: float = 0
    largest = smallest = None
    for chunk in chunks:
        values = [fmt.get_property(i, prop) for i in chunk] if prop else chunk
        count += len(values)
        if statistics:
            numbers = [_number(v) for v in values if v is not None]
            if numbers:
                numbered += len(numbers)
                total += sum(numbers)
                largest = max(numbers) if largest is None else max(largest, *numbers)
                smallest = min(numbers) if smallest is None else min(smallest, *numbers)
    result: dict[str, Any] = {"Count": count, "Average": None, "Sum": None, "Maximum": None, "Minimum": None,
                              "Property": prop}
    if args.get("Sum"):
        result["Sum"] = total
    if args.get("Average"):
        result["Average"] = total / numbered if numbered else None
    if args.get("Maximum"):
        result["Maximum"] = largest
    if args.get("Minimum"):
        result["Minimum"] = smallest
    return Record("MeasureInfo", result)


def _number(value: Any) -> float:
    """A value Measure-Object can add up: a number, text that is one (Import-Csv's columns), a size in bytes."""
    if isinstance(value, ByteSize) and value.bytes is not None:
        return float(value.bytes)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise UserError(f'Input object "{to_text(value)}" is not numeric.') from None


@cmdlet("Group-Object", [Param("Property", position=0, raw=True), Param("NoElement", switch=True),
                         Param("CaseSensitive", switch=True), _INPUT],
        synopsis="Group objects by the values of properties (alias group).", builtin=True)
def group_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """One GroupInfo per distinct value (Count, Name, Group), in the order the values first appear."""
    props = _props(args)
    groups: dict[Any, tuple[list[Any], list[Any]]] = {}
    for item in _inputs(args):
        values = [_value_of(item, p) for p in props] if props else [item]
        name = ", ".join(fmt.format_value(v, -1) for v in values)
        key = name if args.get("CaseSensitive") else name.lower()
        groups.setdefault(key, (values, []))[1].append(item)
    out = []
    for values, members in groups.values():
        record = {"Count": len(members), "Name": ", ".join(fmt.format_value(v, -1) for v in values)}
        if args.get("NoElement"):
            out.append(Record("GroupInfoNoElement", {**record, "Values": values}))
        else:
            out.append(Record("GroupInfo", {**record, "Group": members, "Values": values}))
    return out


def _type_label(value: Any) -> str:
    """The .NET-style type name Get-Member shows for a property's value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "MultiValuedProperty"
    if isinstance(value, dt.datetime):
        return "datetime"
    if value is None:
        return "System.Object"
    return type(value).__name__


# Plain values: their .NET type, and the properties of it the shell reads (shell/evaluator.py's members).
_SCALAR_TYPES = {
    "str": ("System.String", ["Length"]), "int": ("System.Int32", []), "float": ("System.Double", []),
    "bool": ("System.Boolean", []),
    "datetime": ("System.DateTime", ["Date", "Day", "DayOfWeek", "Hour", "Minute", "Month", "Second", "Ticks", "Year"]),
}


def _type_name(item: Any) -> str:
    """An object's type as Get-Member and Export-Csv's #TYPE line name it."""
    if isinstance(item, Record):
        return PS_CUSTOM_OBJECT if item.type_name == "CSV" else item.type_name   # Import-Csv's rows
    scalar = _SCALAR_TYPES.get(type(item).__name__)
    return scalar[0] if scalar else type(item).__name__


@cmdlet("Get-Member", [Param("Name", position=0, raw=True), _INPUT],
        synopsis="List the properties of objects (alias gm).", builtin=True)
def get_member(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """One row per property of each type of input object (wildcards in -Name), as PowerShell lists them."""
    patterns = [to_text(p) for p in as_list(args.get("Name"))]
    out: list[Any] = []
    seen_types: set[str] = set()
    for item in _inputs(args):
        scalar = _SCALAR_TYPES.get(type(item).__name__)
        type_name = _type_name(item)
        if type_name in seen_types:
            continue
        seen_types.add(type_name)
        for name in scalar[1] if scalar else fmt.properties_of(item):
            if patterns and not any(wildcard_match(p, name) for p in patterns):
                continue
            value = member(item, name) if scalar else fmt.get_property(item, name)
            out.append(Record("MemberDefinition", {
                "TypeName": type_name, "Name": name, "MemberType": "Property",
                "Definition": f"{_type_label(value)} {name} {{get;set;}}"}))
    return out


@cmdlet("ForEach-Object", [Param("Process", position=0, raw=True), Param("MemberName", convert=to_str), _INPUT],
        synopsis="Run a script block for each object (alias %, foreach).", builtin=True)
def foreach_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Run {script block} for each input object with $_ set to it."""
    items = _inputs(args)
    block = args.get("Process")
    out: list[Any] = []
    for item in items:
        if isinstance(block, ScriptBlock):
            out.extend(block.invoke(item))
        elif args.get("MemberName") or block is not None:
            value = fmt.get_property(item, args.get("MemberName") or to_text(block))
            out.extend(value if isinstance(value, list) else [value])
    return out


@streams("ForEach-Object")
def foreach_object_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    return _each_chunk(args, chunks, per_chunk)


@cmdlet("Get-Command", [Param("Name", position=0, convert=to_str_list, type_name="String[]"),
                        Param("Noun", convert=to_str_list, type_name="String[]"),
                        Param("Verb", convert=to_str_list, type_name="String[]")],
        synopsis="List the cmdlets this shell knows.", builtin=True, default_view="Command")
def get_command(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List cmdlets, filtered by names (wildcards), -Verb or -Noun; each may be a list (Get-Command Get-*,Set-*)."""
    def matches(patterns: list[str] | None, text: str) -> bool:
        return not patterns or any(wildcard_match(p, text) for p in patterns)

    out = []
    for c in registry.all():
        verb, _, noun = c.name.partition("-")
        if matches(args.get("Name"), c.name) and matches(args.get("Verb"), verb) and matches(args.get("Noun"), noun):
            out.append(Record("Command", {"CommandType": "Cmdlet", "Name": c.name, "Verb": verb, "Noun": noun,
                                          "Synopsis": c.synopsis, "Source": "mailgate"}))
    for name in args.get("Name") or []:   # a name without wildcards that names nothing: PowerShell's error
        if not any(ch in name for ch in "*?") and not any(r["Name"].lower() == name.lower() for r in out):
            registry.get(name)
    return out


@cmdlet("Get-Help", [Param("Name", position=0, convert=to_str), Param("Full", switch=True),
                     Param("Examples", switch=True), Param("Detailed", switch=True), Param("Parameter", convert=to_str)],
        synopsis="Show help for a cmdlet.", builtin=True)
def get_help(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show a cmdlet's syntax, description, parameters and examples."""
    if not args.get("Name"):
        return [fmt.Formatted(["", "mailgate management shell", "",
                               "Get-Command lists the cmdlets; Get-Help <cmdlet> [-Full|-Examples] describes one.",
                               "Multi-valued properties take lists (a,b) or @{Add=...; Remove=...}.", ""])]
    c = registry.get(args["Name"])
    lines = ["", "NAME", f"    {c.name}", "", "SYNOPSIS", f"    {c.synopsis}", "", "SYNTAX"]
    parts = [c.name]
    for p in c.params:
        if p.name == "DomainController" or p.name in SHELL_COMMON_NAMES:
            continue
        name = f"-{p.name}" if p.switch else f"-{p.name} <{p.type_name}>"
        if p.position is not None:
            name = f"[-{p.name}] <{p.type_name}>"
        parts.append(name if p.mandatory else f"[{name}]")
    lines += ["    " + " ".join(parts + ["[<CommonParameters>]"]), ""]
    if args.get("Examples"):
        lines = ["", "NAME", f"    {c.name}", ""]
    else:
        lines += ["DESCRIPTION", *["    " + line for line in c.description.splitlines()], ""]
    if args.get("Full") or args.get("Detailed") or args.get("Parameter"):
        lines.append("PARAMETERS")
        for p in c.params:
            if args.get("Parameter") and not wildcard_match(args["Parameter"], p.name) or \
                    not args.get("Parameter") and p.name in SHELL_COMMON_NAMES:
                continue
            lines.append(f"    -{p.name} <{p.type_name}>")
            if p.help:
                lines.append(f"        {p.help}")
            lines.append(f"        Required? {str(p.mandatory).lower()}    Position? "
                         f"{p.position if p.position is not None else 'named'}")
            lines.append("")
        if not args.get("Parameter"):
            lines += ["    <CommonParameters>", "        This cmdlet supports the common parameters: "
                      + ", ".join(p.name for p in SHELL_COMMON_PARAMS) + ".", ""]
    if c.examples and (args.get("Full") or args.get("Examples") or not args.get("Parameter")):
        lines.append("EXAMPLES")
        for i, ex in enumerate(c.examples, 1):
            lines += [f"    -------------------------- Example {i} --------------------------", f"    {ex}", ""]
    return [fmt.Formatted(lines)]


@cmdlet("Get-Date", [Param("Date", position=0, convert=to_datetime, type_name="DateTime"),
                     Param("Format", convert=to_str)],
        synopsis="The current date and time.", builtin=True)
def get_date(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The current local date and time (or -Date parsed); .AddMinutes(-5) and friends work on it."""
    value = args["Date"] if args.get("Date") is not None else dt.datetime.now().astimezone()
    if args.get("Format"):
        return [dotnet_strftime(value, args["Format"])]
    return [value]


@cmdlet("Write-Host", [Param("Object", position=0, raw=True), Param("ForegroundColor", convert=to_str),
                       Param("BackgroundColor", convert=to_str), Param("NoNewline", switch=True),
                       Param("Separator", convert=to_str)],
        synopsis="Print text on the screen (not into the pipeline or a redirection).", builtin=True)
def write_host(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Print the text for the person at the shell: it is no output, so $x = Write-Host ..., | Out-Null and
    > file leave it on the screen, as in PowerShell."""
    separator = " " if args.get("Separator") is None else args["Separator"]
    ctx.say(separator.join(to_text(item) for item in as_list(args.get("Object"))))
    return []


class WriteErrorException(UserError):
    """What Write-Error reports: an error of the script itself, non-terminating unless -ErrorAction Stop."""

    category = "NotSpecified"
    exception_name = "Microsoft.PowerShell.Commands.WriteErrorException"


@cmdlet("Write-Warning", [Param("Message", position=0, mandatory=True, convert=to_str)],
        synopsis="Print a warning (WARNING: ...).", builtin=True)
def write_warning(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Print the message as a warning; -WarningAction SilentlyContinue hides it."""
    ctx.warn(args["Message"])
    return []


@cmdlet("Write-Verbose", [Param("Message", position=0, mandatory=True, convert=to_str)],
        synopsis="Print a message with -Verbose or $VerbosePreference = 'Continue'.", builtin=True)
def write_verbose(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Print VERBOSE: and the message when asked for with -Verbose or $VerbosePreference; else nothing."""
    shell = ctx.shell
    wanted = shell is not None and (shell.verbose_requested or
                                    to_text(shell.variables.get("verbosepreference")).lower() == "continue")
    return [fmt.Formatted([f"VERBOSE: {args['Message']}"])] if wanted else []


@cmdlet("Write-Error", [Param("Message", position=0, mandatory=True, convert=to_str)],
        synopsis="Report an error (non-terminating unless -ErrorAction Stop).", builtin=True)
def write_error(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Report the message as an error of the script: shown, kept in $Error, and the script goes on."""
    raise WriteErrorException(args["Message"])


@cmdlet("Write-Output", [Param("InputObject", position=0, raw=True)], synopsis="Output objects.", builtin=True)
def write_output(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Pass the objects on."""
    return as_list(args.get("InputObject"))


@cmdlet("Out-Null", [_INPUT], synopsis="Discard output.", builtin=True)
def out_null(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Discard the input."""
    return []


@streams("Out-Null")
def out_null_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    def discarded() -> Iterator[list[Any]]:
        for _ in chunks:
            pass
        return
        yield

    return discarded()


@cmdlet("Out-String", [_INPUT, Param("Stream", switch=True), Param("Width", convert=to_int, type_name="Int32")],
        synopsis="Render objects as text.", builtin=True)
def out_string(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The text the objects would print as: one string, or with -Stream one string per line."""
    lines = fmt.default_render(_inputs(args), limit=_limit(ctx), width=args.get("Width"))
    return lines if args.get("Stream") else ["\n".join(lines)]


@cmdlet("New-TimeSpan", [Param("Start", position=0, convert=to_datetime, type_name="DateTime", aliases=("LastWriteTime",)),
                         Param("End", position=1, convert=to_datetime, type_name="DateTime"),
                         Param("Days", convert=to_int, type_name="Int32"), Param("Hours", convert=to_int, type_name="Int32"),
                         Param("Minutes", convert=to_int, type_name="Int32"),
                         Param("Seconds", convert=to_int, type_name="Int32")],
        synopsis="A time span: from -Start to -End (now when not given), or of -Days/-Hours/-Minutes/-Seconds.",
        builtin=True)
def new_timespan(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """``(New-TimeSpan -Start $msg.DateReceived).TotalMinutes``: how long a message has waited."""
    if args.get("Start") is not None or args.get("End") is not None:
        now = dt.datetime.now().astimezone()
        return [TimeSpan(((args.get("End") or now) - (args.get("Start") or now)).total_seconds())]
    return [TimeSpan((args.get("Days") or 0) * 86400 + (args.get("Hours") or 0) * 3600 + (args.get("Minutes") or 0) * 60
                     + (args.get("Seconds") or 0))]


@cmdlet("Out-Host", [_INPUT, Param("Paging", switch=True)], synopsis="Print objects on the screen now.",
        builtin=True)
def out_host(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Print the objects as the shell prints output, now; nothing goes on down the pipeline."""
    if ctx.shell is not None:
        ctx.shell.emit(_inputs(args))
    return []


@cmdlet("Tee-Object", [Param("FilePath", position=0, convert=to_str, aliases=("Path",)),
                       Param("Variable", convert=to_str), Param("Append", switch=True), _INPUT],
        synopsis="Keep the objects in a variable or a file and pass them on.", builtin=True)
def tee_object(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Save the objects (-Variable name, or -FilePath as Out-File writes them) and pass them on unchanged."""
    items = _inputs(args)
    if bool(args.get("FilePath")) == bool(args.get("Variable")):
        raise ParameterError("Tee-Object needs -FilePath or -Variable (one of them).", parameter="FilePath")
    if args.get("Variable"):
        if ctx.shell is not None:
            ctx.shell.set_variable(args["Variable"].lstrip("$"), list(items))
    else:
        out_file(ctx, {"FilePath": args["FilePath"], "Append": args.get("Append"), "InputObject": items})
    return items


_ENCODING = Param("Encoding", convert=to_file_encoding, type_name="Encoding",
                  help="ASCII, UTF8, Unicode, UTF32, BigEndianUnicode, Default, OEM... as Windows PowerShell names them.")
_NO_CLOBBER = Param("NoClobber", switch=True, aliases=("NoOverwrite",), help="Refuse to replace an existing file.")


@cmdlet("Out-File", [Param("FilePath", position=0, mandatory=True, convert=to_str, aliases=("Path", "LiteralPath")),
                     _ENCODING, Param("Append", switch=True), Param("Force", switch=True), _NO_CLOBBER,
                     Param("Width", convert=to_int, type_name="Int32"), Param("NoNewline", switch=True), _INPUT],
        synopsis="Write output to a file.", builtin=True)
def out_file(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Write what the objects print as to a file (tables cut to -Width columns when it is given)."""
    lines = fmt.default_render(_inputs(args), limit=_limit(ctx), width=_out_file_width(args))
    text = "".join(lines) if args.get("NoNewline") else "\n".join(lines) + "\n"
    textfiles.write_text(args["FilePath"], text, args.get("Encoding"), append=bool(args.get("Append")),
                         no_clobber=bool(args.get("NoClobber")))
    return []


def _out_file_width(args: dict[str, Any]) -> int | None:
    width = args.get("Width")
    if width is not None and width < 2:
        raise InvalidValueError(f"Cannot validate argument on parameter 'Width'. The {width} argument is less than "
                                "the minimum allowed range of 2.", parameter="Width")
    return width


@streams("Out-File")
def out_file_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """The file written a chunk at a time, as the screen would show them (one table, one header)."""
    width = _out_file_width(args)

    def written() -> Iterator[list[Any]]:
        if not write_printed(chunks, args["FilePath"], limit=_limit(ctx), width=width, encoding=args.get("Encoding"),
                             append=bool(args.get("Append")), no_clobber=bool(args.get("NoClobber")),
                             no_newline=bool(args.get("NoNewline"))):
            out_file(ctx, {**args, "InputObject": []})   # nothing came: what Out-File writes for nothing
        return
        yield

    return written()


def _delimiter(args: dict[str, Any]) -> str:
    """-Delimiter (one character), or the list separator with -UseCulture (a comma in this shell's en-US)."""
    delimiter = args.get("Delimiter") or ","
    if len(delimiter) != 1:
        raise InvalidValueError(f"Cannot bind parameter 'Delimiter': \"{delimiter}\" is not one character.",
                                parameter="Delimiter")
    return delimiter


def _csv_field(value: Any) -> str | None:
    """A property value as Export-Csv writes it; multi-valued ones joined with ';' (Windows PowerShell writes
    their type name, System.Object[], which nobody wants in a report)."""
    if value is None:
        return None
    return ";".join(to_text(x) for x in value) if isinstance(value, list) else to_text(value)


def _csv_record(values: list[str | None], delimiter: str) -> str:
    """One CSV line as Windows PowerShell writes it: every value in double quotes, $null as nothing at all."""
    return delimiter.join('"' + v.replace('"', '""') + '"' if v is not None else "" for v in values)


def _csv_lines(items: list[Any], delimiter: str, *, type_line: bool, columns: list[str] | None = None) -> list[str]:
    """Export-Csv's and ConvertTo-Csv's lines: ``#TYPE`` (when asked), the header (unless ``columns`` are those
    of a file being appended to), a line per object."""
    lines = []
    if columns is None:
        columns = fmt.column_names(items)
        if type_line and items:
            lines.append(f"#TYPE {_type_name(items[0])}")
        lines.append(_csv_record(list(columns), delimiter))
    lines += [_csv_record([_csv_field(fmt.get_property(item, c)) for c in columns], delimiter) for item in items]
    return lines


@cmdlet("Export-Csv", [Param("Path", position=0, mandatory=True, convert=to_str, aliases=("LiteralPath", "PSPath")),
                       Param("NoTypeInformation", switch=True, aliases=("NTI",)), _ENCODING,
                       Param("Append", switch=True), Param("Delimiter", position=1, convert=to_str, type_name="Char"),
                       Param("UseCulture", switch=True), Param("Force", switch=True), _NO_CLOBBER, _INPUT],
        synopsis="Write objects to a CSV file.", builtin=True,
        examples=["Get-MessageTrackingLog -EventId FAIL | Export-Csv fails.csv -NoTypeInformation -Encoding UTF8"])
def export_csv(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Write the objects' properties as CSV, as Windows PowerShell does: every value quoted, a ``#TYPE`` line
    unless -NoTypeInformation. -Append adds rows under the file's own header; an object without one of its
    columns is refused unless -Force."""
    _write_csv(args, [_inputs(args)])
    return []


@streams("Export-Csv")
def export_csv_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """The file written a chunk at a time, under the header the first chunk gave it."""
    def written() -> Iterator[list[Any]]:
        _write_csv(args, chunks)
        return
        yield

    return written()


def _write_csv(args: dict[str, Any], chunks: Iterable[list[Any]]) -> None:
    """Export-Csv of the objects in ``chunks``: the first makes the file (or is checked against the header of the
    file -Append adds to); the others are appended in the same columns."""
    delimiter = _delimiter(args)
    path, encoding, append = args["Path"], args.get("Encoding"), bool(args.get("Append"))
    file_header: list[str] | None = None
    if append:
        existing = [line for line in textfiles.existing_text(path, encoding).splitlines()
                    if line.strip() and not line.startswith("#")]
        file_header = next(csv.reader(existing[:1], delimiter=delimiter), None) or None
    header = file_header
    written = False
    for items in chunks:
        if file_header:
            missing = [c for c in file_header if c and not any(fmt.get_property(i, c) is not None or
                                                          c.lower() in (p.lower() for p in fmt.properties_of(i))
                                                          for i in items)]
            if missing and items and not args.get("Force"):
                raise UserError(f"Cannot append CSV content to the following file: {path}. The appended object does "
                                f"not have a property that corresponds to the following column: {missing[0]}. To "
                                "continue with mismatched properties, add the -Force parameter, and then retry the "
                                "command.", target=path)
        lines = _csv_lines(items, delimiter, type_line=not args.get("NoTypeInformation"), columns=header)
        textfiles.write_text(path, "".join(line + "\n" for line in lines), encoding, append=append or written,
                             no_clobber=bool(args.get("NoClobber")) and not written)
        header = header or fmt.column_names(items)
        written = True
    if not written:   # nothing to export: the file is made (or left as it is, with -Append) all the same
        textfiles.write_text(path, "".join(line + "\n" for line in _csv_lines(
            [], delimiter, type_line=not args.get("NoTypeInformation"), columns=header)), encoding, append=append,
            no_clobber=bool(args.get("NoClobber")))


@cmdlet("ConvertTo-Csv", [_INPUT, Param("NoTypeInformation", switch=True, aliases=("NTI",)),
                          Param("Delimiter", position=0, convert=to_str, type_name="Char"),
                          Param("UseCulture", switch=True)],
        synopsis="Objects as CSV lines (strings), as Export-Csv would write them.", builtin=True)
def convert_to_csv(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The CSV text of the objects, one string per line."""
    return _csv_lines(_inputs(args), _delimiter(args), type_line=not args.get("NoTypeInformation"))


@streams("ConvertTo-Csv")
def convert_to_csv_stream(ctx: ManagementContext, args: dict[str, Any], chunks: Stream, per_chunk: Any) -> Any:
    """The header (from the first chunk) once, then each chunk's lines."""
    def converted() -> Iterator[list[Any]]:
        columns: list[str] | None = None
        for chunk in chunks:
            yield _csv_lines(chunk, _delimiter(args), type_line=not args.get("NoTypeInformation"), columns=columns)
            columns = columns or fmt.column_names(chunk)

    return converted()


def _html_cell(value: Any) -> str:
    return html.escape(fmt.format_value(value, -1), quote=False)


@cmdlet("ConvertTo-Html", [_INPUT, Param("Property", position=0, convert=to_str_list, type_name="Object[]"),
                           Param("Title", convert=to_str), Param("Head", convert=to_str_list, type_name="String[]"),
                           Param("Body", convert=to_str_list, type_name="String[]"),
                           Param("PreContent", convert=to_str_list, type_name="String[]"),
                           Param("PostContent", convert=to_str_list, type_name="String[]"),
                           Param("As", convert=to_str, help="Table (default) or List."),
                           Param("Fragment", switch=True), Param("CssUri", convert=to_str)],
        synopsis="Objects as an HTML page (strings), as Windows PowerShell writes it.", builtin=True,
        examples=['Get-MessageTrackingLog -Start "03/13/2026 09:00:00" | ConvertTo-Html > track.html'])
def convert_to_html(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """A table (or -As List: a table per object) of the objects' properties, in a page unless -Fragment; values
    are escaped, -PreContent/-PostContent/-Head/-Body are written as given (they are HTML)."""
    items = _inputs(args)
    columns = args.get("Property") or fmt.column_names(items)
    layout = (args.get("As") or "Table").lower()
    if layout not in ("table", "list"):
        raise InvalidValueError(f'Cannot validate argument on parameter \'As\'. The argument "{args["As"]}" does not '
                                'belong to the set "Table,List".', parameter="As")
    table: list[str] = []
    if items and layout == "table":
        table += ["<table>", "<colgroup>" + "<col/>" * len(columns) + "</colgroup>",
                  "<tr>" + "".join(f"<th>{html.escape(c, quote=False)}</th>" for c in columns) + "</tr>"]
        table += ["<tr>" + "".join(f"<td>{_html_cell(fmt.get_property(i, c))}</td>" for c in columns) + "</tr>"
                  for i in items]
        table.append("</table>")
    for item in items if layout == "list" else []:
        table += ["<table>", *(f"<tr><td>{html.escape(c, quote=False)}:</td><td>{_html_cell(fmt.get_property(item, c))}"
                               "</td></tr>" for c in columns), "</table>"]
    body = [*(args.get("PreContent") or []), *table, *(args.get("PostContent") or [])]
    if args.get("Fragment"):
        return body
    head = args.get("Head") or [f"<title>{html.escape(args.get('Title') or 'HTML TABLE', quote=False)}</title>"]
    if args.get("CssUri"):
        head.append(f'<link rel="stylesheet" type="text/css" href="{html.escape(args["CssUri"])}" />')
    return ['<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN"  '
            '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">',
            '<html xmlns="http://www.w3.org/1999/xhtml">', "<head>", *head, "</head><body>",
            *(args.get("Body") or []), *body, "</body></html>"]


@cmdlet("Get-Content", [Param("Path", position=0, mandatory=True, convert=to_str, aliases=("LiteralPath", "PSPath")),
                        Param("TotalCount", convert=to_int, aliases=("First", "Head")),
                        Param("Tail", convert=to_int, aliases=("Last",)), Param("Raw", switch=True), _ENCODING],
        synopsis="Read a text file: one string per line (alias gc, cat, type).", builtin=True)
def get_content(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The file's lines (without their line ends), or with -Raw the whole text as one string; the first
    -TotalCount or the last -Tail lines. The encoding is the file's byte order mark's unless -Encoding says."""
    if args.get("TotalCount") is not None and args.get("Tail") is not None:
        raise ParameterError("The parameters TotalCount and Tail cannot be used together. Please specify only one "
                             "of these parameters.", parameter="Tail")
    text = textfiles.read_text(args["Path"], args.get("Encoding"))
    if args.get("Raw"):
        return [text]
    lines = text.splitlines()
    count, tail = args.get("TotalCount"), args.get("Tail")
    if count is not None and count >= 0:
        return lines[:count]
    if tail is not None and tail >= 0:
        return lines[len(lines) - tail:] if tail else []
    return lines


@cmdlet("Test-Path", [Param("Path", position=0, mandatory=True, convert=to_str_list, type_name="String[]",
                               aliases=("LiteralPath", "PSPath")),
                         Param("PathType", convert=to_str, help="Any (default), Container (a directory) or Leaf (a file).")],
        synopsis="Whether a file or directory exists (True or False for each path).", builtin=True)
def test_path(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """True or False for each path, as PowerShell answers (a report script checks its folder before writing)."""
    kind = (args.get("PathType") or "Any").lower()
    if kind not in ("any", "container", "leaf"):
        raise InvalidValueError(f'Cannot validate argument on parameter \'PathType\'. The argument "{args["PathType"]}" '
                                'does not belong to the set "Any,Container,Leaf".', parameter="PathType")
    check = {"any": os.path.exists, "container": os.path.isdir, "leaf": os.path.isfile}[kind]
    return [bool(path) and check(path) for path in args["Path"]]


@cmdlet("Out-GridView", [_INPUT, Param("Title", convert=to_str), Param("PassThru", switch=True),
                         Param("Wait", switch=True), Param("OutputMode", convert=to_str)],
        synopsis="(Windows' grid window: not available here; use Format-Table or Export-Csv.)", builtin=True)
def out_gridview(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Out-GridView opens a window on a Windows desktop; this shell has none to open, so it says what to use."""
    raise UserError("Out-GridView needs a graphical desktop, which this shell doesn't have. Use Format-Table (ft "
                    "-AutoSize), Export-Csv to open the rows in a spreadsheet, or the admin center's pages.")


@cmdlet("Import-Csv", [Param("Path", position=0, mandatory=True, convert=to_str, aliases=("LiteralPath", "PSPath")),
                       Param("Delimiter", position=1, convert=to_str, type_name="Char"), Param("UseCulture", switch=True),
                       Param("Header", multi=True, convert=to_str_list), _ENCODING],
        synopsis="Read a CSV file: one object per row, its properties named by the header.", builtin=True)
def import_csv(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Each row as an object whose properties are the columns (-Header names them, else the first row). As in
    PowerShell, a ``#TYPE`` line is skipped, and so is every ``#`` line before the header, except that a
    ``#Fields:`` line is the header: Exchange's protocol and tracking logs read as they are."""
    delimiter = _delimiter(args)
    text = textfiles.read_text(args["Path"], args.get("Encoding"))
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)]
    if rows and rows[0] and rows[0][0][:5].lower() == "#type":
        rows = rows[1:]
    header = args.get("Header")
    while header is None and rows:
        row = rows.pop(0)
        if row and row[0].startswith("#Fields: "):
            header = [row[0][len("#Fields: "):], *row[1:]]
        elif row and not row[0].startswith("#"):
            header = row
    header = header or []
    while len(header) > 1 and header[-1] == "":
        header = header[:-1]
    names = [name or f"H{i + 1}" for i, name in enumerate(header)]
    if len({n.lower() for n in names}) != len(names):
        raise InvalidValueError("The member names in the CSV header aren't unique: " + ", ".join(names) + ".",
                                parameter="Header")
    out = []
    for row in rows:
        if not row:
            continue
        values = row + [None] * (len(names) - len(row))
        out.append(Record("CSV", dict(zip(names, values))))
    return out


def _json_value(value: Any, depth: int) -> Any:
    """``to_json`` cut at ``depth`` levels of objects, below which an object is its text (PowerShell's -Depth)."""
    if isinstance(value, (Record, dict)):
        if depth < 0:   # a record as its identity; a hashtable as its type name, as PowerShell writes them
            return str(value) if isinstance(value, Record) else "System.Collections.Hashtable"
        return {str(k): _json_value(v, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        if depth < 0:
            return to_text(value)
        return [_json_value(v, depth - 1) for v in value]
    return to_json(value)


def _json_depth(value: Any) -> int:
    depth = to_int(value)
    if not 0 <= depth <= 100:
        raise ValueError(f"The {depth} argument is less than the minimum allowed range of 0 or greater than the "
                         "maximum allowed range of 100")
    return depth


@cmdlet("ConvertTo-Json", [Param("Depth", convert=_json_depth),
                           Param("Compress", switch=True), Param("AsArray", switch=True), _INPUT],
        synopsis="Convert objects to JSON text.", builtin=True,
        examples=["Get-ReceiveConnector | Select-Object Name,Bindings,RemoteIPRanges | ConvertTo-Json",
                  "Get-Queue | ConvertTo-Json -Compress"])
def convert_to_json(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """One JSON text for all the piped objects: an object for one (unless -AsArray), an array for several.
    Objects nested deeper than -Depth (default 2) are written as their text, as PowerShell does."""
    items = _inputs(args)
    depth = args.get("Depth")
    values = [_json_value(item, 2 if depth is None else depth) for item in items]
    data: Any = values[0] if len(values) == 1 and not args.get("AsArray") else values
    if args.get("Compress"):
        return [json.dumps(data, separators=(",", ":"), ensure_ascii=False)]
    return [json.dumps(data, indent=2, ensure_ascii=False)]


@cmdlet("Start-Sleep", [Param("Seconds", position=0, convert=lambda v: float(to_str(v))),
                        Param("Milliseconds", convert=to_int)],
        synopsis="Wait.", builtin=True)
def start_sleep(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Wait for the given time (at most one hour)."""
    seconds = args.get("Seconds") or (args.get("Milliseconds") or 0) / 1000
    time.sleep(max(0.0, min(float(seconds), 3600.0)))
    return []


@cmdlet("Clear-Host", [], synopsis="Clear the terminal.", builtin=True)
def clear_host(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Clear the screen of an interactive terminal; elsewhere do nothing."""
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J\x1b[3J")
        sys.stdout.flush()
    return []


for _alias, _name in [("ft", "Format-Table"), ("fl", "Format-List"), ("select", "Select-Object"),
                      ("where", "Where-Object"), ("?", "Where-Object"), ("sort", "Sort-Object"),
                      ("measure", "Measure-Object"), ("group", "Group-Object"), ("gm", "Get-Member"), ("%", "ForEach-Object"), ("foreach", "ForEach-Object"),
                      ("gcm", "Get-Command"), ("help", "Get-Help"), ("echo", "Write-Output"),
                      ("gc", "Get-Content"), ("cat", "Get-Content"), ("type", "Get-Content"), ("ipcsv", "Import-Csv"), ("epcsv", "Export-Csv"),
                      ("sleep", "Start-Sleep"), ("cls", "Clear-Host"), ("clear", "Clear-Host"), ("Out-Default", "Out-Host"),
                      ("tee", "Tee-Object")]:
    registry.alias(_alias, _name)