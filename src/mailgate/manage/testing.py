"""Test-Mailflow and Test-SmtpConnectivity."""

from __future__ import annotations

import email
import email.utils
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from mailgate.config.model import Mailbox, ReceiveConnector, TransportServer
from mailgate.config.values import TimeSpan
from mailgate.errors import ParameterError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import smtp_address, to_bool, to_int, to_str
from mailgate.manage.present import Record
from mailgate.send import maildir


def _system_mailbox(ctx: ManagementContext, server: str) -> Mailbox:
    with ctx.store.reader() as tx:
        boxes = [m for m in tx.list(Mailbox) if m.recipient_type_details == "ArbitrationMailbox"
                 and m.name.lower() == f"systemmailbox{{{server}}}".lower()]
    if not boxes:
        raise UserError(f"Server {server} has no system mailbox to send the probe from; it is created by "
                        "'mailgate init'. Recreate it or test with -TargetEmailAddress from another server.")
    return boxes[0]


def _result(result: str, latency: float | None, remote: bool, details: str) -> Record:
    return Record("TestMailflowResult", {"TestMailflowResult": result,
                                         "MessageLatencyTime": TimeSpan(latency or 0.0),
                                         "IsRemoteTest": remote, "Details": details, "Identity": None,
                                         "IsValid": True, "ObjectState": "New"})


@cmdlet("Test-Mailflow",
        [Param("Identity", position=0, convert=to_str, help="The source server (default: this server)."),
         Param("TargetEmailAddress", convert=smtp_address, type_name="SmtpAddress"),
         Param("TargetMailboxServer", convert=to_str, type_name="ServerIdParameter[]"),
         Param("TargetDatabase", convert=to_str),
         Param("AutoDiscoverTargetMailboxServer", switch=True),
         Param("TargetEmailAddressDisplayName", convert=to_str),
         Param("ExecutionTimeout", convert=to_int, type_name="Int32", help="Seconds to wait (default 240)."),
         Param("ActiveDirectoryTimeout", convert=to_int), Param("ErrorLatency", convert=to_int),
         Param("MonitoringContext", convert=to_bool)],
        synopsis="Send a probe message and measure its delivery.", needs_runtime=True,
        default_view="TestMailflowResult",
        examples=['Test-Mailflow -TargetEmailAddress "admin@domain.com"', "Test-Mailflow EX01",
                  "Test-Mailflow -TargetMailboxServer EX02"])
def test_mailflow(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Send a probe from the server's system mailbox and wait until it is delivered (or sent on, for remote targets)."""
    source = args.get("Identity") or ctx.server_name
    if source.lower() != ctx.server_name.lower():
        raise ParameterError(f"Test-Mailflow runs the probe from this server ({ctx.server_name}); run it on {source} "
                             "to test from there.", parameter="Identity")
    targets = [k for k in ("TargetEmailAddress", "TargetMailboxServer", "TargetDatabase") if args.get(k)]
    if len(targets) > 1:
        raise ParameterError("Use only one of -TargetEmailAddress, -TargetMailboxServer and -TargetDatabase.",
                             parameter=targets[1])
    timeout = args.get("ExecutionTimeout") or 240
    sender = _system_mailbox(ctx, ctx.server_name).primary_smtp_address
    if args.get("TargetEmailAddress"):
        target, remote = args["TargetEmailAddress"], True
    elif args.get("TargetMailboxServer") or args.get("TargetDatabase"):
        name = args.get("TargetMailboxServer") or args["TargetDatabase"].removeprefix("Mailbox Database ")
        with ctx.store.reader() as tx:
            servers = {s.name.lower(): s.name for s in tx.list(TransportServer)}
        if name.lower() not in servers:
            raise UserError(f"The server '{name}' isn't a transport server of this organisation.",
                            parameter="TargetMailboxServer")
        target, remote = _system_mailbox(ctx, servers[name.lower()]).primary_smtp_address, True
    else:
        target, remote = sender, False
    probe_id = uuid.uuid4()
    fqdn = ctx.local_server().fqdn
    body = (f"From: Microsoft System Attendant <{sender}>\r\nTo: <{target}>\r\n"
            f"Subject: Test-Mailflow {probe_id}\r\nDate: {email.utils.formatdate(localtime=True)}\r\n"
            f"Message-ID: <{probe_id}@{fqdn}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            f"\r\nThis is a Test-Mailflow probe message\r\n").encode()
    tracked = ctx.local_server().message_tracking_log_enabled
    started, wall_started = time.monotonic(), time.time()
    submitted = ctx.runtime.call("submit", sender=sender, recipients=[target], body=body, source="STOREDRIVER")
    internal_id = submitted["internal_id"]
    deadline = started + timeout
    left_queue_at: float | None = None
    held_at: float | None = None   # when the probe was first seen held by a suspension
    next_look = started + 1.0
    while time.monotonic() < deadline:
        queued = None   # the probe's entries in the queues, asked of the server at most once a round
        if time.monotonic() >= next_look:   # a probe that can't move (no route, suspended): say so now, not at the timeout
            next_look = time.monotonic() + 2.0
            queued = ctx.runtime.call("messages", message_id=internal_id)
            if any(m["Queue"].endswith("\\Unreachable") for m in queued):
                return _failure(ctx, remote, _why_pending(ctx, internal_id, target, timeout))
            held = _held_by_suspension(ctx, queued, target)
            if held is None:
                held_at = None
            elif held_at is None:
                held_at = time.monotonic()
            elif time.monotonic() - held_at >= _HELD_GRACE_SECONDS:   # seen held twice: not a Resume on its way
                return _failure(ctx, remote, held)
        if tracked:
            rows = ctx.store.query_tracking(network_message_id=submitted["network_id"], server=ctx.server_name,
                                            limit=None)
            for row in rows:
                if row["event_id"] == "DELIVER" or row["event_id"] == "SEND":
                    latency = time.monotonic() - started
                    return [_result("Success", latency, remote, f"{row['event_id']} to {target} at "
                                    f"{row.get('server_hostname') or fqdn}")]
                if row["event_id"] == "FAIL":
                    status = ";".join(row["recipient_status"]) or "the message failed"
                    return _failure(ctx, remote, f"The probe to {target} failed: {status}")
        else:
            # Message tracking is off (MessageTrackingLogEnabled $false): what reaches the target's or the system
            # mailbox here — the probe, or its NDR — and whether the probe is still queued tell the outcome instead.
            arrived = _arrived_in_mailbox(ctx, sender, str(probe_id), wall_started) or (
                _arrived_in_mailbox(ctx, target, str(probe_id), wall_started) if target != sender else None)
            if arrived is not None:
                subject, report = arrived
                if subject.startswith("Undeliverable:"):
                    return _failure(ctx, remote, f"The probe to {target} failed: {report or 'an NDR came back'}")
                return [_result("Success", time.monotonic() - started, remote, f"DELIVER to {target} at {fqdn}")]
            if left_queue_at is None:
                if queued is None:
                    queued = ctx.runtime.call("messages", message_id=internal_id)
                if not queued:
                    left_queue_at = time.monotonic()
            if left_queue_at is not None and time.monotonic() - left_queue_at > _NDR_GRACE_SECONDS:
                return [_result("Success", left_queue_at - started, remote,
                                f"SEND to {target}: the probe left the queues and no NDR came back (message "
                                "tracking is off on this server, so that is all Test-Mailflow can see)")]
        time.sleep(0.2)
    return _failure(ctx, remote, _why_pending(ctx, internal_id, target, timeout))


# With tracking off, a probe that has left the queues is taken as sent once this long has passed without an NDR.
_NDR_GRACE_SECONDS = 3.0
# A probe held by a suspended queue at two looks this far apart fails then, naming the way out,
# instead of waiting out ExecutionTimeout (240 s) in an administrator's shell.
_HELD_GRACE_SECONDS = 2.0


def _held_by_suspension(ctx: ManagementContext, queued: list[dict[str, Any]], target: str) -> str | None:
    """Why the probe can't move, when what holds it is a queue an administrator suspended; None otherwise."""
    if not queued:
        return None
    queues = {q["Identity"]: q for q in ctx.runtime.call("queues")}
    for m in queued:
        q = queues.get(m["Queue"])
        if q is not None and q["Status"] == "Suspended":
            return (f"The probe to {target} is waiting in queue {m['Queue']}, which is suspended: "
                    f"Resume-Queue \"{m['Queue']}\" lets it go on.")
    return None


def _arrived_in_mailbox(ctx: ManagementContext, mailbox: str, probe_id: str, since: float) -> tuple[str, str] | None:
    """(Subject, the NDR's status lines) of the first message that reached ``mailbox``'s Maildir since ``since``
    and names ``probe_id`` (the probe itself, or the NDR that quotes it); None if none has yet."""
    folder = maildir.mailbox_path(ctx.home.mailbox_dir, mailbox)
    for sub in ("new", "cur"):
        try:
            entries = [e for e in os.scandir(folder / sub) if e.stat().st_mtime >= since - 1]
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                data = Path(entry.path).read_bytes()
            except FileNotFoundError:   # moved from new/ to cur/ by a mail reader
                continue
            if probe_id.encode() in data:
                message = email.message_from_bytes(data)
                status = [line.strip() for line in data.decode("utf-8", "replace").splitlines()
                          if line.startswith(("Status:", "Diagnostic-Code:"))]
                return str(message.get("Subject", "")), "; ".join(status)
    return None


def _why_pending(ctx: ManagementContext, internal_id: int, target: str, timeout: int) -> str:
    messages = ctx.runtime.call("messages", message_id=internal_id)
    if not messages:
        return f"The probe to {target} wasn't delivered within {timeout} seconds."
    m = messages[0]
    queue = m["Queue"]
    if queue.endswith("\\Unreachable"):
        return (f"The probe to {target} is in {queue}: no send connector routes it (A matching connector cannot be "
                "found to route the external recipient). Create one with New-SendConnector.")
    queues = {q["Identity"]: q for q in ctx.runtime.call("queues")}
    q = queues.get(queue)
    error = (q and q["LastError"]) or m["LastError"]
    status = q["Status"] if q else m["Status"]
    return (f"The probe to {target} is waiting in queue {queue} (status {status})"
            + (f"; last error: {error}" if error else "") + f", not delivered within {timeout} seconds.")


def _failure(ctx: ManagementContext, remote: bool, reason: str) -> list[Any]:
    ctx.fail(reason)
    return [_result("Failure", None, remote, reason)]


# ---------------------------------------------------------------------------
# Test-SmtpConnectivity


def _probe(host: str, port: int, timeout: float = 5.0) -> tuple[str, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            data = b""
            while not data.endswith(b"\r\n") or (len(data) > 3 and data.split(b"\r\n")[-2][3:4] == b"-"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                if len(data) > 8192:
                    break
            try:
                sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
    except OSError as exc:
        return "Unable to connect", f"{exc.strerror or exc} ({host}:{port})"
    text = data.decode("utf-8", "replace").strip()
    code = text[:3]
    if code == "220":
        return "Success", text
    if code.startswith("4"):
        return "Transient error", text
    if code.startswith("5"):
        return "Permanent error", text
    return "External error", f"not an SMTP greeting: {text[:80]!r}" if text else "the connection closed without a greeting"


@cmdlet("Test-SmtpConnectivity", [Param("Identity", position=0, from_pipeline=True, help="The server (default: this one)."),
                                  Param("MonitoringContext", convert=to_bool)],
        synopsis="Connect to every binding of every receive connector.", default_view="SmtpConnectivityStatus",
        examples=["Test-SmtpConnectivity", "Get-TransportService | Test-SmtpConnectivity"])
def test_smtp_connectivity(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Check that each binding answers with its banner; bindings the server couldn't open are reported with why."""
    ident = args.get("Identity")
    server = ctx.server_name if ident is None else str(ident.get("Identity") if hasattr(ident, "get") else ident)
    if server.lower() != ctx.server_name.lower():
        raise UserError(f"Test-SmtpConnectivity tests this server ({ctx.server_name}); run it on {server}.")
    with ctx.store.reader() as tx:
        connectors = [c for c in tx.list(ReceiveConnector, ctx.server_name) if c.enabled]
    bind_errors: dict[str, str] = {}
    if ctx.has_runtime():
        try:
            status = ctx.runtime.call("status")
            bind_errors = {item["endpoint"]: item["error"] for item in status["listeners"] if item["error"]}
        except UserError:
            bind_errors = {}
    out = []
    for c in connectors:
        for b in c.bindings:
            host = ("127.0.0.1" if b.version == 4 else "::1") if b.is_wildcard else str(b.address)
            endpoint = f"[{host}]:{b.port}" if b.version == 6 else f"{host}:{b.port}"
            error = _bind_error_for(bind_errors, b)
            if error:
                status_code, details = "External error", error
            else:
                status_code, details = _probe(host, b.port)
            out.append(Record("SmtpConnectivityStatus", {"Server": ctx.server_name, "ReceiveConnector": c.name,
                                                         "Binding": str(b), "EndPoint": endpoint,
                                                         "StatusCode": status_code, "Details": details}))
            if status_code != "Success":
                ctx.fail(f'Receive connector "{c.identity}" binding {b}: {status_code}: {details}')
    return out


def _bind_error_for(errors: dict[str, str], binding: Any) -> str | None:
    for endpoint, error in errors.items():
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]")
        if int(port) == binding.port and (host == str(binding.address) or host in ("0.0.0.0", "::")
                                          and binding.version == (6 if host == "::" else 4)):
            return error
    return None
