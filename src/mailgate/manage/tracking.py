"""Get-MessageTrackingLog: the tracking index in the store, filtered as Exchange filters it."""

from __future__ import annotations

import time
from typing import Any, Iterator

from mailgate.errors import InvalidValueError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import (as_list, first_results, result_size, stream_first_results, to_datetime, to_int,
                                    to_int64, to_result_size, to_str)
from mailgate.manage.present import Record

_ORDER = [
    ("Timestamp", "timestamp"), ("ClientIp", "client_ip"), ("ClientHostname", "client_hostname"),
    ("ServerIp", "server_ip"), ("ServerHostname", "server_hostname"), ("SourceContext", "source_context"),
    ("ConnectorId", "connector_id"), ("Source", "source"), ("EventId", "event_id"),
    ("InternalMessageId", "internal_message_id"), ("MessageId", "message_id"),
    ("NetworkMessageId", "network_message_id"), ("Recipients", "recipients"), ("RecipientStatus", "recipient_status"),
    ("TotalBytes", "total_bytes"), ("RecipientCount", "recipient_count"),
    ("RelatedRecipientAddress", "related_recipient_address"), ("Reference", "reference"),
    ("MessageSubject", "message_subject"), ("Sender", "sender"), ("ReturnPath", "return_path"),
    ("Directionality", "directionality"), ("TenantId", "tenant_id"), ("OriginalClientIp", "original_client_ip"),
    ("MessageInfo", "message_info"), ("MessageLatency", "message_latency"),
]


def tracking_record(row: dict[str, Any]) -> Record:
    props = {name: row.get(key) for name, key in _ORDER}
    props["Timestamp"] = row["timestamp"].astimezone()
    props["MessageLatencyType"] = "None" if row.get("message_latency") is None else "EndToEnd"
    props["EventData"] = []
    props["TransportTrafficType"] = row.get("transport_traffic_type") or "Email"
    props["Server"] = row.get("server")
    props["SchemaVersion"] = "15.02.0000.000"
    return Record("MessageTrackingLog", props)




_PARAMS = [
    Param("Start", convert=to_datetime, type_name="DateTime", help='e.g. "03/13/2026 09:00:00" or (Get-Date).AddHours(-1)'),
    Param("End", convert=to_datetime, type_name="DateTime"),
    Param("Sender", convert=to_str), Param("Recipients", convert=lambda v: [to_str(x) for x in as_list(v)], multi=True),
    Param("MessageId", convert=to_str), Param("InternalMessageId", convert=to_int64),
    Param("NetworkMessageId", convert=to_str), Param("MessageSubject", convert=to_str), Param("EventId", convert=to_str),
    Param("Source", convert=to_str), Param("Reference", convert=to_str), Param("Server", convert=to_str, from_pipeline=True),
    Param("ResultSize", convert=to_result_size, help="Default 1000; Unlimited for all."),
    Param("Follow", switch=True, help="Keep printing new events as they happen (mailgate extension)."),
    Param("FollowSeconds", convert=to_int, help="With -Follow: stop after this many seconds."),
]


def _id_and_record(row: dict[str, Any]) -> tuple[int, Record]:
    return row["id"], tracking_record(row)


def query(ctx: ManagementContext, args: dict[str, Any], *, after_id: int | None = None,
          limit: int | None = 1000) -> list[tuple[int, Record]]:
    """The events ``args`` select, each as its id and its record."""
    return list(_events(ctx, args, after_id=after_id, limit=limit))


def _events(ctx: ManagementContext, args: dict[str, Any], *, after_id: int | None = None,
            limit: int | None = 1000) -> Iterator[tuple[int, Record]]:
    """The events ``args`` select, read from the store a page at a time as they are asked for."""
    server = args.get("Server") or ctx.server_name
    return ctx.store.iter_tracking(start=args.get("Start"), end=args.get("End"), sender=args.get("Sender"),
                                    recipients=args.get("Recipients"), message_id=args.get("MessageId"),
                                    internal_message_id=args.get("InternalMessageId"),
                                    network_message_id=args.get("NetworkMessageId"), subject=args.get("MessageSubject"),
                                    event_id=args.get("EventId"), source=args.get("Source"), server=server,
                                    reference=args.get("Reference"), limit=limit, after_id=after_id,
                                    convert=_id_and_record)


@cmdlet("Get-MessageTrackingLog", _PARAMS, synopsis="Search the message tracking log.",
        default_view="MessageTrackingLog",
        examples=['Get-MessageTrackingLog -Recipients "admin@domain.com"',
                  "Get-MessageTrackingLog -Start (Get-Date).AddMinutes(-5) | ft",
                  'Get-MessageTrackingLog -EventId FAIL -ResultSize Unlimited | fl',
                  "Get-MessageTrackingLog -Follow"])
def get_message_tracking_log(ctx: ManagementContext, args: dict[str, Any]) -> Iterator[Any] | list[Any]:
    """Events of messages on this server (or -Server), oldest first; filters combine with AND, -Recipients with OR.
    The events are read as they are used (a REST client receives them as they are read): -ResultSize Unlimited
    over a large log holds one page of it, not all of it."""
    if args.get("Follow") and ctx.shell is None:   # nothing to stream to: the request would never end
        raise InvalidValueError("-Follow streams events to the management shell; over the REST API, ask again "
                                "with -Start set to the time of the last event you have.", parameter="Follow")
    limit = result_size(args)
    if not args.get("Follow"):
        events = _events(ctx, args, limit=None if limit is None else limit + 1)
        return (record for _, record in stream_first_results(ctx, events, args))
    events = first_results(ctx, query(ctx, args, limit=None if limit is None else limit + 1), args)
    records = [record for _, record in events]
    shell = ctx.shell
    if shell is not None:
        shell.emit(records)
    last = events[-1][0] if events else ctx.store.last_tracking_id()
    deadline = time.monotonic() + args["FollowSeconds"] if args.get("FollowSeconds") else None
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1.0)
            new = query(ctx, {**args, "Start": None}, after_id=last, limit=None)
            if new:
                last = new[-1][0]
                if shell is not None:
                    shell.emit([record for _, record in new])
    except KeyboardInterrupt:
        pass
    return []
