"""Rendering output as Exchange's management shell does: Format-Table,
Format-List, the default view of each object type, and value formatting."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any, Iterable

from mailgate.manage.present import Record
from mailgate.manage.psvalues import dotnet_strftime, wildcard_match

# Default view of each output type: ("table", columns) or ("list", properties or None = all).
DEFAULT_VIEWS: dict[str, tuple[str, list[str] | None]] = {
    "ReceiveConnector": ("table", ["Identity", "Bindings", "Enabled"]),
    "SendConnector": ("table", ["Identity", "AddressSpaces", "Enabled"]),
    "AcceptedDomain": ("table", ["Name", "DomainName", "DomainType", "Default"]),
    "Mailbox": ("table", ["Name", "Alias", "PrimarySmtpAddress"]),
    "TransportServer": ("table", ["Name", "Fqdn", "MessageExpirationTimeout", "ExternalDNSServers"]),
    "FrontendTransportServer": ("table", ["Name", "ReceiveProtocolLogPath", "SendProtocolLogPath"]),
    "TransportConfig": ("list", None),
    "OrganizationConfig": ("list", None),
    "ExchangeServer": ("table", ["Name", "Site", "ServerRole", "Edition", "AdminDisplayVersion"]),
    "Queue": ("table", ["Identity", "DeliveryType", "Status", "MessageCount", "Velocity", "RiskLevel",
                        "OutboundIPPool", "NextHopDomain"]),
    "QueueDigest": ("table", ["GroupByValue", "MessageCount", "DeferredMessageCount", "LockedMessageCount",
                              "StaleMessageCount", "Details"]),
    "Message": ("table", ["Identity", "FromAddress", "Status", "Queue", "Subject"]),
    "MessageTrackingLog": ("table", ["EventId", "Source", "Sender", "Recipients", "MessageSubject"]),
    "TestMailflowResult": ("table", ["TestMailflowResult", "MessageLatencyTime", "IsRemoteTest"]),
    "SmtpConnectivityStatus": ("table", ["Server", "ReceiveConnector", "Binding", "EndPoint", "StatusCode", "Details"]),
    "ExchangeCertificate": ("table", ["Thumbprint", "Services", "Subject"]),
    "ADPermission": ("table", ["Identity", "User", "Deny", "Inherited", "Rights"]),
    "BestPracticeFinding": ("table", ["Severity", "Object", "Rule", "Detail"]),
    "Command": ("table", ["CommandType", "Name", "Synopsis"]),
    "ExportedMessage": ("table", ["Identity", "Path", "Size"]),
    "GroupInfo": ("table", ["Count", "Name", "Group"]),
    "GroupInfoNoElement": ("table", ["Count", "Name"]),
    "MemberDefinition": ("table", ["Name", "MemberType", "Definition"]),
    # Resolve-DnsName, one view per record type, and Test-NetConnection, as Windows prints them
    **{f"DnsRecord_{kind}": ("table", ["Name", "Type", "TTL", "Section", *fields]) for kind, fields in (
        ("A", ["IPAddress"]), ("AAAA", ["IPAddress"]), ("MX", ["NameExchange", "Preference"]), ("TXT", ["Strings"]),
        ("CNAME", ["NameHost"]), ("NS", ["NameHost"]), ("PTR", ["NameHost"]),
        ("SOA", ["PrimaryServer", "NameAdministrator", "SerialNumber"]),
        ("SRV", ["NameTarget", "Priority", "Weight", "Port"]))},
    "ServerComponentState": ("table", ["Server", "Component", "State"]),
    "TestNetConnectionResult": ("list", ["ComputerName", "RemoteAddress", "RemotePort", "SourceAddress",
                                         "TcpTestSucceeded"]),
}


@dataclass
class Formatted:
    """Text made by Format-Table/Format-List; printed as is at the end of the pipeline."""

    lines: list[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def format_value(value: Any, limit: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple, set)):
        items = list(value)
        shown = items if limit < 0 else items[:limit]
        text = ", ".join(format_value(v, limit) for v in shown)
        if 0 <= limit < len(items):
            text += "..."
        return "{" + text + "}"
    if isinstance(value, dt.datetime):
        return format_datetime(value)
    if isinstance(value, float):
        return f"{value:.15g}"
    if isinstance(value, enum.Enum) and not isinstance(value, int):
        return str(value.value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{k}, {format_value(v, limit)}]" for k, v in value.items()) + "}"
    return str(value)


def format_datetime(value: dt.datetime) -> str:
    local = value.astimezone() if value.tzinfo else value
    hour = local.hour % 12 or 12
    return f"{local.month}/{local.day}/{local.year} {hour}:{local.minute:02d}:{local.second:02d} " \
           f"{'AM' if local.hour < 12 else 'PM'}"


def properties_of(obj: Any) -> list[str]:
    if isinstance(obj, Record):
        return obj.keys()
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    return list(getattr(obj, "property_names", ()))


def get_property(obj: Any, name: str) -> Any:
    if isinstance(obj, Record):
        return obj.get(name)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k).lower() == name.lower():
                return v
        return None
    ps_property = getattr(obj, "ps_property", None)   # a value with Exchange's properties (config/values.py)
    if ps_property is not None:
        return ps_property(name)
    getter = getattr(obj, "get", None)
    if callable(getter):
        try:
            return getter(name)
        except TypeError:
            return None
    return None


def expand_columns(objects: list[Any], patterns: list[Any] | None) -> list[Any]:
    """Property patterns (wildcards allowed) → the concrete names present on the objects."""
    if not patterns:
        return []
    available: list[str] = []
    for obj in objects:
        for p in properties_of(obj):
            if p not in available:
                available.append(p)
    out: list[Any] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            out.append(pattern)  # a calculated property (hashtable)
            continue
        if any(ch in pattern for ch in "*?["):
            out += [a for a in available if wildcard_match(pattern, a) and a not in out]
        else:
            match = next((a for a in available if a.lower() == pattern.lower()), pattern)
            out.append(match)
    return out


def _column_title(col: Any) -> str:
    if isinstance(col, dict):
        for key in ("Label", "Name", "N", "L"):
            for k, v in col.items():
                if str(k).lower() == key.lower():
                    return str(v)
        return "Expression"
    return str(col)


def _column_value(obj: Any, col: Any, evaluate: Any) -> Any:
    if isinstance(col, dict):
        expr = next((v for k, v in col.items() if str(k).lower() in ("expression", "e")), None)
        if expr is None:
            return None
        if hasattr(expr, "invoke"):
            result = expr.invoke(obj)
            return result[0] if len(result) == 1 else (result or None)
        return get_property(obj, str(expr))
    return get_property(obj, col)


def _is_number(value: Any) -> bool:
    """What a table right-aligns: numbers, not $true/$false and not enum values (a flags enum such as
    PermissionGroups is an int underneath, and PowerShell shows it as text)."""
    return isinstance(value, (int, float)) and not isinstance(value, (bool, enum.Enum))


@dataclass
class TableLayout:
    """The column widths (and right-aligned columns) of a table printed in parts: set by its first part, kept
    by the rest, as PowerShell sizes a streamed table by its first objects and cuts longer values after them."""

    widths: list[int] | None = None
    numeric: list[bool] | None = None


def render_table(objects: list[Any], columns: list[Any], *, limit: int = 4, width: int | None = None,
                 evaluate: Any = None, hide_headers: bool = False, wrap: bool = False,
                 layout: TableLayout | None = None, closing: bool = True) -> list[str]:
    """A table's lines. With ``layout``, one part of a longer table: the first part (an empty layout) opens it
    and sets the layout, later parts are rows in the same columns; ``closing`` False leaves the table open."""
    titles = [_column_title(c) for c in columns]
    rows: list[list[str]] = []
    numeric = [True] * len(columns)
    for obj in objects:
        row = []
        for i, col in enumerate(columns):
            value = _column_value(obj, col, evaluate)
            if value is not None and not _is_number(value):
                numeric[i] = False
            row.append(format_value(value, limit).replace("\r", " ").replace("\n", " "))
        rows.append(row)
    continued = layout is not None and layout.widths is not None
    if continued:
        widths, numeric = layout.widths, layout.numeric
    else:
        widths = [max([len(t)] + [len(r[i]) for r in rows]) for i, t in enumerate(titles)]
        if width:
            _shrink(widths, [len(t) for t in titles], width)
        if layout is not None:
            layout.widths, layout.numeric = widths, numeric

    def cell(text: str, i: int) -> str:
        w = widths[i]
        if len(text) > w:
            text = text[: max(w - 3, 0)] + "..." if w > 3 else text[:w]
        return text.rjust(w) if numeric[i] and text else text.ljust(w)

    lines = [] if continued else [""]
    if not hide_headers and not continued:   # a title, and its dashes, are cut to the column's width like its values
        lines.append(" ".join(cell(t, i) for i, t in enumerate(titles)).rstrip())
        lines.append(" ".join(cell("-" * min(len(t), widths[i]), i) for i, t in enumerate(titles)).rstrip())
    for r in rows:
        lines.append(" ".join(cell(v, i) for i, v in enumerate(r)).rstrip())
    if closing:
        lines.append("")
    return lines


def _shrink(widths: list[int], minimums: list[int], total: int) -> None:
    """Narrow the widest columns until the table fits ``total`` characters."""
    while sum(widths) + len(widths) - 1 > total:
        i = max(range(len(widths)), key=lambda k: widths[k])
        floor = max(min(minimums[i], 10), 4)
        if widths[i] <= floor:
            break
        widths[i] -= 1


def _present(obj: Any, columns: list[Any]) -> list[Any]:
    """The columns an object has: PowerShell's Format-List leaves out a named property the object lacks
    (Format-Table shows it as an empty column). Calculated properties always stay."""
    names = {p.lower() for p in properties_of(obj)}
    if not names:
        return columns
    return [c for c in columns if not isinstance(c, str) or c.lower() in names]


def render_list(objects: list[Any], properties: list[Any] | None, *, limit: int = 4, evaluate: Any = None) -> list[str]:
    lines = [""]
    for obj in objects:
        cols = _present(obj, properties) if properties else properties_of(obj)
        if not cols and not properties:   # text, a number: printed as itself, as PowerShell's Format-List does
            lines.append(format_value(obj, limit))
            continue
        titles = [_column_title(c) for c in cols]
        pad = max((len(t) for t in titles), default=0)
        for col, title in zip(cols, titles):
            text = format_value(_column_value(obj, col, evaluate), limit)
            parts = text.split("\n") if text else [""]
            lines.append(f"{title.ljust(pad)} : {parts[0]}".rstrip())
            for extra in parts[1:]:
                lines.append(" " * (pad + 3) + extra)
        lines.append("")
    return lines


@dataclass
class OpenOutput:
    """What one chunk of a streamed output left open for the next: the type of its last objects and, when
    they made a table, that table's layout (its header is not printed again)."""

    kind: str | None = None
    layout: TableLayout | None = None


def default_render(objects: list[Any], *, limit: int = 4, width: int | None = None,
                   carry: OpenOutput | None = None) -> list[str]:
    """What PowerShell's Out-Default prints for a batch of pipeline output. With ``carry``, the batch is one
    chunk of a longer output (``objects`` a ``streams.Chunk``, marked first and last): a table or list of the
    same type goes on from the previous chunk, and the last group stays open unless this chunk is the last."""
    continues = carry is not None and not getattr(objects, "first", True)
    ends = carry is None or getattr(objects, "last", True)
    groups: list[tuple[str, list[Any]]] = []
    for obj in objects:
        kind = obj.type_name if isinstance(obj, Record) else ("dict" if isinstance(obj, dict) else "scalar")
        if not groups or groups[-1][0] != kind:
            groups.append((kind, []))
        groups[-1][1].append(obj)
    lines: list[str] = []
    if continues and carry is not None and carry.layout is not None and (not groups or groups[0][0] != carry.kind):
        lines.append("")   # the table the previous chunk left open ends here
    for index, (kind, group) in enumerate(groups):
        going_on = continues and index == 0 and carry is not None and carry.kind == kind
        left_open = not ends and index == len(groups) - 1
        layout = None
        if going_on and carry is not None:
            layout = carry.layout
        elif left_open:
            layout = TableLayout()
        rendered = _render_group(group, limit=limit, width=width, layout=layout, closing=not left_open)
        if going_on and layout is None and rendered[:1] == [""]:
            rendered = rendered[1:]   # a list goes on: its objects are already apart
        lines.extend(rendered)
        if left_open and carry is not None:
            carry.kind, carry.layout = kind, layout if layout is not None and layout.widths is not None else None
    if ends and carry is not None:
        carry.kind, carry.layout = None, None
    return lines


def _render_group(group: list[Any], *, limit: int, width: int | None, layout: TableLayout | None,
                  closing: bool) -> list[str]:
    """Objects of one type, in their default view."""
    first = group[0]
    if isinstance(first, Record):
        view = DEFAULT_VIEWS.get(first.type_name)
        if view is None:
            view = ("table", first.keys()) if len(first.keys()) <= 4 else ("list", None)
        kind, cols = view
        if first.type_name == "MemberDefinition":   # Get-Member: a table per type, under its name
            lines: list[str] = []
            for type_name in dict.fromkeys(m.get("TypeName") for m in group):
                lines.extend(["", f"   TypeName: {type_name}"])
                lines.extend(render_table([m for m in group if m.get("TypeName") == type_name], list(cols),
                                          limit=limit, width=width))
            return lines
        if kind == "table":
            return render_table(group, list(cols or first.keys()), limit=limit, width=width, layout=layout,
                                closing=closing)
        return render_list(group, cols, limit=limit)
    if isinstance(first, dict):
        return render_table([{"Name": k, "Value": v} for obj in group for k, v in obj.items()],
                            ["Name", "Value"], limit=limit, width=width)
    lines = []
    for obj in group:
        if isinstance(obj, Formatted):
            lines.extend(str(obj).split("\n"))
        elif isinstance(obj, dt.datetime):   # a date on its own: long date and time, as Get-Date prints
            lines.append(dotnet_strftime(obj.astimezone() if obj.tzinfo else obj, "F"))
        else:
            lines.append(format_value(obj, limit))
    return lines


def column_names(objects: Iterable[Any]) -> list[str]:
    names: list[str] = []
    for obj in objects:
        for p in properties_of(obj):
            if p not in names:
                names.append(p)
    return names
