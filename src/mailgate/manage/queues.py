"""Queue and message cmdlets: Get-Queue, Get-QueueDigest, Get-Message and the
actions on them. They work on the running server through ``ctx.runtime``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from mailgate.errors import ParameterError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.filters import parse_filter
from mailgate.manage.params import (as_list, first_results, result_size, stream_first_results, to_bool,
                                    to_result_size, to_str, to_str_list)
from mailgate.manage.present import Record
from mailgate.manage.psvalues import compare

_INTERNAL_TYPES = {"SmtpDeliveryToMailbox", "SmtpRelayToConnectorSourceServers", "Undefined", "Unreachable",
                   "SmtpRelayToServers", "ShadowRedundancy"}


def _identity(value: Any) -> str:
    if isinstance(value, Record):
        return str(value.get("Identity"))
    return to_str(value)


def _server_part(identity: str | None, parts: int) -> str | None:
    """The server named by an identity of ``parts`` parts (Server\\Queue: 2, Server\\Queue\\Number: 3)."""
    if identity and identity.count("\\") == parts - 1:
        return identity.split("\\")[0]
    return None


def _runtime(ctx: ManagementContext, server: str | None, identity: str | None = None, parts: int = 2) -> Any:
    """The running server a queue command is for: -Server, else the server an identity names, else this one.
    Another server of the organisation is reached through its admin API (``ManagementContext.runtime_for``)."""
    return ctx.runtime_for(server or _server_part(identity, parts))


def _predicate(text: str | None) -> Callable[[Record], bool] | None:
    """-Filter as a test of one record (None: no filter)."""
    if not text:
        return None
    return parse_filter(text, lambda op, left, right: compare(op, left, right), lambda r, p: r.get(p))


def _filter(records: list[Record], text: str | None) -> list[Record]:
    predicate = _predicate(text)
    return records if predicate is None else [r for r in records if predicate(r)]




def _include(record: Record, kinds: list[str]) -> bool:
    for kind in kinds:
        k = kind.lower()
        if k == "empty" and record["MessageCount"] == 0:
            return True
        if k == "internal" and record["DeliveryType"] in _INTERNAL_TYPES:
            return True
        if k == "external" and record["DeliveryType"] not in _INTERNAL_TYPES:
            return True
        if k == str(record["DeliveryType"]).lower():
            return True
    return False


def queues(ctx: ManagementContext, args: dict[str, Any]) -> list[Record]:
    ident = args.get("Identity")
    runtime = _runtime(ctx, args.get("Server"), _identity(ident) if ident is not None else None)
    named_poison = ident is not None and _identity(ident).rpartition("\\")[2].lower() == "poison"
    records: list[Record] = runtime.call("queues", **({"empty_poison": True} if named_poison else {}))
    if ident is not None:
        if args.get("Filter") or args.get("Server"):
            raise ParameterError("Parameter set cannot be resolved: -Identity can't be combined with -Filter or "
                                 "-Server.", parameter="Identity")
        wanted = _identity(ident)
        name = wanted.rpartition("\\")[2].lower()
        if name not in ("*", ""):
            records = [r for r in records if name in (r["Identity"].rpartition("\\")[2].lower(),
                                                      r["QueueIdentity"].rpartition("\\")[2],
                                                      str(r["NextHopDomain"]).lower())]
            if not records:
                where = wanted.split("\\")[0] if "\\" in wanted else ctx.server_name
                raise UserError(f"The queue '{wanted}' couldn't be found on server {where}.", target=wanted)
    records = _filter(records, args.get("Filter"))
    if args.get("Include"):
        records = [r for r in records if _include(r, args["Include"])]
    if args.get("Exclude"):
        records = [r for r in records if not _include(r, args["Exclude"])]
    return first_results(ctx, records, args)


_QUEUE_PARAMS = [
    Param("Identity", position=0, from_pipeline=True, help="Server\\NextHopDomain, Server\\Number or * ."),
    Param("Server", convert=to_str, from_pipeline=True), Param("Filter", convert=to_str, help="e.g. \"MessageCount -gt 10\"."),
]


@cmdlet("Get-Queue", [*_QUEUE_PARAMS, Param("Include", convert=lambda v: [to_str(x) for x in as_list(v)]),
                      Param("Exclude", convert=lambda v: [to_str(x) for x in as_list(v)]),
                      Param("ResultSize", convert=to_result_size), Param("SortOrder", convert=to_str)],
        synopsis="Show the queues of the transport server.", needs_runtime=True, default_view="Queue",
        examples=["Get-Queue", 'Get-Queue -Filter "MessageCount -gt 10"', "Get-Queue -Exclude Empty",
                  "Get-Queue EX01\\Unreachable | fl"])
def get_queue(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show Submission, the delivery queues (one per next hop), Unreachable and Poison."""
    records = queues(ctx, args)
    if args.get("SortOrder"):
        for part in reversed(args["SortOrder"].split(",")):
            part = part.strip()
            desc = part.startswith("-")
            prop = part.lstrip("+-")
            records.sort(key=lambda r: (r.get(prop) is None, str(r.get(prop)) if not isinstance(r.get(prop), (int, float))
                                        else r.get(prop)), reverse=desc)
    return records


@cmdlet("Get-QueueDigest", [Param("Server", convert=lambda v: [to_str(x) for x in as_list(v)]),
                            Param("Forest", switch=True), Param("Filter", convert=to_str),
                            Param("GroupBy", convert=to_str), Param("DetailsLevel", convert=to_str),
                            Param("ResultSize", convert=to_result_size), Param("Timeout", convert=to_str),
                            Param("IncludeLowMessageCount", switch=True,
                                  help="Also show groups with fewer than 10 messages.")],
        synopsis="Summarise the delivery queues, grouped.", needs_runtime=True, default_view="QueueDigest")
def get_queue_digest(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Aggregate delivery queues by NextHopDomain (or -GroupBy); by default groups with at least 10 messages."""
    records = [r for server in (args.get("Server") or [None]) for r in _runtime(ctx, server).call("queues")
               if r["DeliveryType"] not in ("Undefined",)]
    records = _filter(records, args.get("Filter"))
    group_by = args.get("GroupBy") or "NextHopDomain"
    valid = {"DeliveryType", "LastError", "NextHopCategory", "NextHopDomain", "NextHopKey", "Status", "ServerName"}
    if group_by not in valid:
        raise ParameterError(f"GroupBy must be one of {', '.join(sorted(valid))}.", parameter="GroupBy")
    groups: dict[str, list[Record]] = {}
    for r in records:
        key = str(r["Identity"]).split("\\")[0] if group_by == "ServerName" else str(
            r.get("Identity") if group_by == "NextHopKey" else r.get(group_by))
        groups.setdefault(key, []).append(r)
    out = []
    level = (args.get("DetailsLevel") or "Normal").lower()
    for key, items in groups.items():
        total = sum(i["MessageCount"] for i in items)
        if total < 10 and not args.get("IncludeLowMessageCount") and not args.get("Filter"):
            continue
        details = [] if level == "none" else [
            f"{i['Identity']}" + (f" {i['Status']} {i['MessageCount']}" if level == "verbose" else "") for i in items]
        out.append(Record("QueueDigest", {"GroupByValue": key, "MessageCount": total, "DeferredMessageCount": 0,
                                          "LockedMessageCount": 0, "StaleMessageCount": 0, "Details": details}))
    out.sort(key=lambda r: -r["MessageCount"])
    limit = args.get("ResultSize", 1000)
    return out[:limit] if limit else out


def _queue_action(ctx: ManagementContext, args: dict[str, Any], action: str, verb: str) -> list[Any]:
    if args.get("Identity") is None and not args.get("Filter"):
        raise ParameterError(f"{verb}-Queue needs -Identity or -Filter.", parameter="Identity")
    if args.get("Identity") is not None:
        targets = [_identity(args["Identity"])]
    else:
        targets = [r["Identity"] for r in queues(ctx, {"Filter": args["Filter"], "Server": args.get("Server")})]
        if not targets:
            return []
    if not ctx.should_process(f"{verb} queue(s) {_listed(targets)}."):
        return []
    for server, identities in _by_server(ctx, args.get("Server"), targets, 2).items():
        _runtime(ctx, server).call("queue_action", action=action, identities=identities,
                                   resubmit=bool(args.get("Resubmit")))
    return []


def _by_server(ctx: ManagementContext, server: str | None, identities: list[str], parts: int) -> dict[str | None, list[str]]:
    """Identities grouped by the server that holds them (-Server, else an identity's server part)."""
    groups: dict[str | None, list[str]] = {}
    for identity in identities:
        owner = server or _server_part(identity, parts)
        if owner is not None and owner.lower() == ctx.server_name.lower():
            owner = None
        groups.setdefault(owner, []).append(identity)
    return groups


@cmdlet("Suspend-Queue", _QUEUE_PARAMS, synopsis="Stop delivery from a queue.", needs_runtime=True, mutates=True)
def suspend_queue(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Stop delivery from a queue (new mail still enters it). Suspending Submission stops the categoriser."""
    return _queue_action(ctx, args, "suspend", "Suspend")


@cmdlet("Resume-Queue", _QUEUE_PARAMS, synopsis="Resume delivery from a queue.", needs_runtime=True, mutates=True)
def resume_queue(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Resume delivery from a suspended queue."""
    return _queue_action(ctx, args, "resume", "Resume")


@cmdlet("Retry-Queue", [*_QUEUE_PARAMS, Param("Resubmit", convert=to_bool, type_name="Boolean",
                                              help="$true re-runs the categoriser (needed for Unreachable).")],
        synopsis="Try a queue now.", needs_runtime=True, mutates=True,
        examples=["Retry-Queue EX01\\contoso.com", "Retry-Queue EX01\\Unreachable -Resubmit $true"])
def retry_queue(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Connect to the next hop now instead of waiting for the retry interval; -Resubmit re-routes the messages."""
    return _queue_action(ctx, args, "retry", "Retry")


# ---------------------------------------------------------------------------
# Messages


MESSAGE_PAGE = 1000   # messages per request to the running server when a listing is read page by page


def messages(ctx: ManagementContext, args: dict[str, Any]) -> Iterator[Record]:
    """The messages -Identity, -Queue, -Filter and -ResultSize select, read from the running server as they are
    used: a page of messages at a time, so that a queue of hundreds of thousands is never held whole — not by
    the server, not here — and the shell or the REST API shows the first ones at once."""
    queue = args.get("Queue")
    ident = args.get("Identity")
    runtime = _runtime(ctx, args.get("Server") or (_server_part(_identity(queue), 2) if queue else None),
                       _identity(ident) if ident is not None else None, parts=3)
    include = bool(args.get("IncludeRecipientInfo"))
    if ident is not None:
        wanted = _identity(ident)
        number = wanted.rpartition("\\")[2]
        records: list[Record] = runtime.call("messages", include_recipients=include,
                                             message_id=int(number) if number.isascii() and number.isdigit() else None)
        parts = wanted.split("\\")
        queue_part = parts[-2].lower() if len(parts) >= 2 else "*"
        records = [r for r in records if r["Identity"].split("\\")[-1] == number and
                   (queue_part == "*" or r["Queue"].split("\\")[-1].lower() == queue_part)]
        if not records:
            raise UserError(f"The message '{wanted}' couldn't be found on server {ctx.server_name}.", target=wanted)
        return iter(first_results(ctx, _filter(records, args.get("Filter")), args))

    predicate = _predicate(args.get("Filter"))
    # Without a filter no more is read than -ResultSize needs, and one more to tell whether some were left out.
    wanted = None if predicate is not None else result_size(args)

    def pages() -> Iterator[Record]:
        after, read = None, 0
        while True:
            size = MESSAGE_PAGE if wanted is None else max(1, min(MESSAGE_PAGE, wanted + 1 - read))
            page: list[Record] = runtime.call("messages", queue=_identity(queue) if queue else None,
                                              include_recipients=include, limit=size, after=after)
            yield from page
            read += len(page)
            numbers = {_message_number(r) for r in page}
            if len(numbers) < size:
                return
            after = max(numbers)

    return stream_first_results(ctx, (r for r in pages() if predicate is None or predicate(r)), args)


def _listed(identities: list[str], shown: int = 10) -> str:
    """Identities for a confirmation prompt or -WhatIf: the first few and how many more (a -Filter can match
    tens of thousands)."""
    if len(identities) <= shown:
        return ", ".join(identities)
    return f"{', '.join(identities[:shown])} and {len(identities) - shown:,} more ({len(identities):,} in all)"


def _message_number(record: Record) -> int:
    return int(record["Identity"].rpartition("\\")[2])


_MESSAGE_PARAMS = [
    Param("Identity", position=0, from_pipeline=True, help="Server\\Queue\\Number, Queue\\Number or Number."),
    Param("Filter", convert=to_str, help="e.g. \"FromAddress -like '*@contoso.com'\"."),
    Param("Server", convert=to_str, from_pipeline=True),
]


@cmdlet("Get-Message", [*_MESSAGE_PARAMS, Param("Queue", convert=to_str, help="e.g. EX01\\Submission."),
                        Param("IncludeRecipientInfo", switch=True), Param("ResultSize", convert=to_result_size),
                        Param("SortOrder", convert=to_str), Param("IncludeComponentLatencyInfo", switch=True)],
        synopsis="Show messages in the queues.", needs_runtime=True, default_view="Message",
        examples=['Get-Message -Queue "EX01\\Submission"', 'Get-Message -Filter "Status -eq \'Retry\'" | fl'])
def get_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the messages waiting in a queue (or all queues), with -IncludeRecipientInfo for each recipient."""
    piped = args.get("Identity")
    if isinstance(piped, Record) and piped.type_name == "Queue":   # Get-Queue ... | Get-Message: that queue's
        args = {**args, "Identity": None, "Queue": piped.get("Identity")}
    if args.get("Queue") and args.get("Identity") is not None:
        raise ParameterError("-Queue and -Identity can't be used together.", parameter="Queue")
    return messages(ctx, args)


def _refuse_submission(found: list[Any]) -> None:
    """Exchange removes no message from Submission: it is still to be categorised. Refused before anything is
    removed, so a -Filter that also matches messages elsewhere changes nothing either."""
    waiting = [r["Identity"] for r in found if str(r.get("Queue") or "").lower().endswith("\\submission")]
    if waiting:
        queue = waiting[0].rsplit("\\", 1)[0]
        raise UserError(f"Messages in the Submission queue can't be removed ({_listed(waiting)}): they are waiting "
                        f"for the categoriser. Resume-Queue {queue} lets them move to their delivery queues, where "
                        "Remove-Message can take them; with -Filter, add \"-and Queue -ne '" + queue + "'\" to "
                        "leave them out.", target=waiting[0])


def _message_action(ctx: ManagementContext, args: dict[str, Any], action: str, verb: str) -> list[Any]:
    if args.get("Identity") is None and not args.get("Filter"):
        raise ParameterError(f"{verb}-Message needs -Identity or -Filter.", parameter="Identity")
    if args.get("Identity") is not None and args.get("Filter"):
        raise ParameterError("-Identity and -Filter can't be used together.", parameter="Filter")
    if args.get("Identity") is not None:
        found = list(messages(ctx, {"Identity": args["Identity"], "Server": args.get("Server")}))
        if len(found) > 1:
            raise UserError(f"The identity '{_identity(args['Identity'])}' matches {len(found)} copies of the message "
                            "in different queues; give the queue (Server\\Queue\\Number) or use -Filter.",
                            target=_identity(args["Identity"]))
    else:
        found = list(messages(ctx, {"Filter": args["Filter"], "Server": args.get("Server"),
                                    "ResultSize": None}))
    targets = [r["Identity"] for r in found]
    if not targets:
        return []
    if action == "remove":
        _refuse_submission(found)
    if not ctx.should_process(f"{verb} message(s) {_listed(targets)}."):
        return []
    for server, identities in _by_server(ctx, args.get("Server"), targets, 3).items():
        _runtime(ctx, server).call("message_action", action=action, identities=identities,
                                   with_ndr=args.get("WithNDR", True))
    return []


@cmdlet("Suspend-Message", _MESSAGE_PARAMS, synopsis="Hold messages in their queue.", needs_runtime=True, mutates=True)
def suspend_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Hold a message (or those matching -Filter) so it isn't delivered until resumed."""
    return _message_action(ctx, args, "suspend", "Suspend")


@cmdlet("Resume-Message", _MESSAGE_PARAMS, synopsis="Release held messages.", needs_runtime=True, mutates=True)
def resume_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Release a suspended message; a message in Poison is released for another delivery attempt."""
    return _message_action(ctx, args, "resume", "Resume")


@cmdlet("Remove-Message", [*_MESSAGE_PARAMS, Param("WithNDR", convert=to_bool, type_name="Boolean",
                                                   help="$true (default) sends the sender an NDR.")],
        synopsis="Delete messages from the queues.", needs_runtime=True, mutates=True,
        examples=['Remove-Message -Filter "FromAddress -eq \'spam@example.com\'" -WithNDR $false'])
def remove_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Delete a message (or those matching -Filter); -WithNDR $false deletes silently. Messages still in
    Submission can't be removed (as in Exchange): resume the queue and remove them from their delivery queue."""
    return _message_action(ctx, args, "remove", "Remove")


class BinaryData(bytes):
    """Exported message bytes (``FileData``)."""

    def __str__(self) -> str:
        return f"System.Byte[] ({len(self):,} bytes)"


@cmdlet("Redirect-Message", [Param("Server", mandatory=True, convert=to_str, type_name="ServerIdParameter",
                                    help="The server whose delivery queues are drained (name or FQDN)."),
                              Param("Target", mandatory=True, convert=to_str_list, type_name="MultiValuedProperty",
                                    help="The servers that take the mail (FQDN or name), tried in order.")],
        synopsis="Drain a server's delivery queues to other servers of the organisation.", needs_runtime=True,
        mutates=True, examples=["Redirect-Message -Server EX01 -Target ex02.contoso.com"])
def redirect_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Before maintenance: the active messages of every delivery queue on -Server go to the -Target servers,
    relayed as within the organisation (X-EXPS), which deliver them. Suspended messages, Submission,
    Unreachable, Poison and mail for the server's own mailboxes stay. Set HubTransport Draining first
    (Set-ServerComponentState) so that the server takes no new mail meanwhile."""
    from mailgate.manage.transport import resolve_server

    with ctx.store.reader() as tx:
        source = resolve_server(ctx, tx, args["Server"])
        targets = [resolve_server(ctx, tx, target) for target in args["Target"]]
    if not targets:
        raise ParameterError("Redirect-Message needs at least one -Target server.", parameter="Target")
    if any(t.name.lower() == source.name.lower() for t in targets):
        raise ParameterError(f"The target can't be the server being drained ({source.name}).", parameter="Target")
    names = list(dict.fromkeys(t.name for t in targets))
    if not ctx.should_process(f"Redirecting messages from {source.fqdn} to {', '.join(t.fqdn for t in targets)}."):
        return []
    _runtime(ctx, source.name).call("redirect", servers=names)
    return []


@cmdlet("Export-Message", [Param("Identity", position=0, from_pipeline=True, mandatory=True),
                           Param("Path", convert=to_str, local_file=True,
                                 help="A .eml file or a folder to write the message to.")],
        synopsis="Copy a suspended message out as an .eml file.", needs_runtime=True,
        default_view="ExportedMessage",
        examples=['Export-Message EX01\\contoso.com\\12 -Path C:\\Temp\\message.eml',
                  'Get-Message -Queue EX01\\contoso.com | Suspend-Message; Get-Message -Queue EX01\\contoso.com | '
                  'Export-Message -Path .\\export'])
def export_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Export a suspended message: with -Path to a file, else as FileData for AssembleMessage -Path."""
    reply = _runtime(ctx, None, _identity(args["Identity"]), parts=3).call("export", identity=_identity(args["Identity"]))
    data = BinaryData(reply["body"])
    identity = reply["identity"]
    path = args.get("Path")
    written = None
    if path:
        target = Path(path)
        if target.is_dir() or path.endswith(("/", "\\")):
            target.mkdir(parents=True, exist_ok=True)
            target = target / (identity.replace("\\", "_") + ".eml")
        target.write_bytes(data)
        written = str(target)
    return [Record("ExportedMessage", {"Identity": identity, "Path": written, "Size": len(data), "FileData": data})]


@cmdlet("AssembleMessage", [Param("InputObject", from_pipeline=True, raw=True), Param("Path", convert=to_str, mandatory=True)],
        synopsis="Write exported message data (Export-Message output) to a file.", builtin=True)
def assemble_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Write the FileData of Export-Message's output to -Path (one file; a folder for several)."""
    items = [i for i in as_list(args.get("InputObject")) if isinstance(i, Record) and i.get("FileData") is not None]
    if not items:
        raise UserError("AssembleMessage needs the output of Export-Message on its input.")
    path = Path(args["Path"])
    if len(items) > 1 or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        for item in items:
            (path / (item["Identity"].replace("\\", "_") + ".eml")).write_bytes(item["FileData"])
    else:
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(items[0]["FileData"])
    return []
