"""Message tracking, protocol logs, Test-Mailflow and Test-SmtpConnectivity."""

from __future__ import annotations

import base64
import csv
import smtplib
import socket
import ssl
import time

import pytest
from helpers import Server, free_port, protocol_log, shell, synced, tracking_events, wait_for
from peers import DnsServer, SmtpPeer

from mailgate.tracking.logs import TRACKING_FIELDS, CsvLogWriter

SOURCE = "127.0.0.2"


@pytest.fixture
def flow(home, ports):
    dns = DnsServer()
    port = free_port("127.0.0.20")
    dns.add("remote.example", "MX", "10 mx.remote.example.")
    dns.add("mx.remote.example", "A", "127.0.0.20")
    dns.add("failing.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", port)
    peer.rcpt_reply = lambda a: "550 5.1.1 User unknown" if a.endswith("@failing.example") else None
    r = shell(home, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges {SOURCE} -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00 -ProtocolLoggingLevel Verbose
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com -EmailAddresses SMTP:admin@domain.com,smtp:boss@domain.com
Set-TransportService EX01 -InternalDNSServers {dns.address}
New-SendConnector Outbound -AddressSpaces "*" -Port {port} -ProtocolLoggingLevel Verbose
''', runtime=None)
    assert r.ok, r.err
    server = Server(home).start()
    server.ports = ports
    yield server, peer
    server.stop()
    peer.stop()
    dns.close()


def send(port: int, sender: str, rcpt: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, source_address=(SOURCE, 0), timeout=20) as c:
        assert c.sendmail(sender, [rcpt], f"Subject: {subject}\r\n\r\nbody\r\n".encode()) == {}


def test_event_chains_filters_and_csv_files(home, flow):
    server, peer = flow
    port = server.ports["frontend"]
    send(port, "admin@domain.com", "kate@remote.example", "to mx")
    send(port, "someone@remote.example", "boss@domain.com", "to alias")
    send(port, "admin@domain.com", "ghost@failing.example", "to failing")
    send(port, "admin@domain.com", "x@nonexistent.example", "to nowhere")
    assert tracking_events(home, "-Recipients kate@remote.example", until=["RECEIVE", "SEND"]) == ["RECEIVE", "SEND"]
    assert tracking_events(home, '-MessageSubject "to alias"', until=["RECEIVE", "RESOLVE", "DELIVER"]) == \
        ["RECEIVE", "RESOLVE", "DELIVER"]
    assert tracking_events(home, "-Recipients ghost@failing.example", until=["RECEIVE", "FAIL", "DSN"]) == \
        ["RECEIVE", "FAIL", "DSN"]
    assert tracking_events(home, "-Recipients x@nonexistent.example", until=["RECEIVE", "FAIL", "DSN"]) == \
        ["RECEIVE", "FAIL", "DSN"]
    # The NDRs themselves (two) are tracked on their way to admin@domain.com's mailbox; once both are
    # delivered no more events come, and the counts below are final.
    wait_for(lambda: tracking_events(home, "-Recipients admin@domain.com -Sender '<>'").count("DELIVER") == 2,
             message="both NDRs delivered")
    fail = shell(home, "Get-MessageTrackingLog -Recipients x@nonexistent.example -EventId FAIL | fl Source,RecipientStatus")
    assert "Source          : DNS" in fail.out and "5.4.4" in fail.out
    fail = shell(home, "Get-MessageTrackingLog -Recipients ghost@failing.example -EventId FAIL | fl Source,RecipientStatus")
    assert "Source          : SMTP" in fail.out and "550 5.1.1 User unknown" in fail.out
    # Each filter narrows.
    everything = shell(home, "Get-MessageTrackingLog -ResultSize Unlimited | Measure-Object | fl Count").out
    total = int(everything.split(":")[1])
    assert total >= 12
    counts = {}
    for args in ["-EventId SEND", '-Sender "someone@remote.example"', '-MessageSubject "to "', "-ResultSize 3",
                 "-Recipients kate@remote.example,boss@domain.com", "-Start (Get-Date).AddMinutes(-10)",
                 "-End (Get-Date).AddMinutes(-10)", "-Server EX01", "-Source STOREDRIVER"]:
        out = shell(home, f"Get-MessageTrackingLog {args} | Measure-Object | fl Count").out
        counts[args] = int(out.split(":")[1])
    assert counts["-EventId SEND"] == 1
    assert counts['-Sender "someone@remote.example"'] == 3   # RECEIVE, RESOLVE, DELIVER
    assert counts["-ResultSize 3"] == 3
    assert counts["-Recipients kate@remote.example,boss@domain.com"] == 4   # RESOLVE names admin@
    assert counts["-Start (Get-Date).AddMinutes(-10)"] == total and counts["-End (Get-Date).AddMinutes(-10)"] == 0
    assert counts["-Server EX01"] == total and 0 < counts["-Source STOREDRIVER"] < total
    message_id = shell(home, 'Get-MessageTrackingLog -MessageSubject "to mx" -EventId RECEIVE | '
                             'ForEach-Object { $_.MessageId }').out.strip()
    assert [e for e in shell(home, f'Get-MessageTrackingLog -MessageId "{message_id}" | ForEach-Object {{ $_.EventId }}')
            .out.split()] == ["RECEIVE", "SEND"]
    # The CSV files carry the same events.
    time.sleep(0.5)
    rows = []
    for path in sorted((home.log_dir / "MessageTracking").glob("MSGTRK*.LOG")):
        lines = path.read_text().splitlines()
        assert lines[0] == "#Software: mailgate" and lines[2] == "#Log-type: Message Tracking Log"
        assert lines[4] == "#Fields: " + ",".join(TRACKING_FIELDS)
        rows += list(csv.DictReader(lines[5:], fieldnames=TRACKING_FIELDS))
    assert len(rows) == total
    kate = [r["event-id"] for r in rows if r["recipient-address"] == "kate@remote.example"]
    assert kate == ["RECEIVE", "SEND"]
    send_row = [r for r in rows if r["event-id"] == "SEND"][0]
    assert send_row["source"] == "SMTP" and send_row["recipient-status"].startswith("250")
    assert send_row["date-time"].endswith("Z")


def test_protocol_logs_show_the_session_and_never_the_credentials(home, flow):
    server, peer = flow
    shell(home, 'New-Mailbox -Name Kate -PrimarySmtpAddress kate@domain.com '
                '-Password (ConvertTo-SecureString "Tr0ub4dor&3" -AsPlainText -Force)\n'
                'Set-ReceiveConnector "Client Frontend EX01" -ProtocolLoggingLevel Verbose')
    synced(home)
    with smtplib.SMTP("127.0.0.1", server.ports["client"], timeout=20) as c:
        c.starttls(context=ssl._create_unverified_context())
        c.ehlo("laptop")
        c.login("kate", "Tr0ub4dor&3")
        c.sendmail("kate@domain.com", ["kate@remote.example"], b"Subject: logged\r\n\r\nx\r\n")
    wait_for(lambda: peer.received)

    def ended_session() -> str:   # the log once the session's last line ("-") is in it: it is written in batches
        text = protocol_log(home, "Receive", until=["#Log-type: SMTP Receive Protocol Log"])
        lines = [line for line in text.splitlines() if "Client Frontend EX01" in line]
        return text if lines and lines[-1].split(",")[6] == "-" else ""

    receive = wait_for(ended_session, message="the end of the session in the receive log")
    lines = [line for line in receive.splitlines() if "Client Frontend EX01" in line]
    events = [line.split(",")[6] for line in lines]
    assert events[0] == "+" and events[-1] == "-" and ">" in events and "<" in events and "*" in events
    assert any("STARTTLS" in line for line in lines) and any("TLS protocol TLSv1." in line for line in lines)
    assert any("Inbound AUTH PLAIN succeeded for kate" in line for line in lines)
    assert "Tr0ub4dor&3" not in receive
    assert base64.b64encode(b"\0kate\0Tr0ub4dor&3").decode() not in receive
    session_ids = {line.split(",")[2] for line in lines}
    assert len(session_ids) == 1
    protocol_log(home, "Send", until=["#Log-type: SMTP Send Protocol Log", "Outbound", "RCPT TO:<kate@remote.example>"])


@pytest.mark.timeout(150)   # the probe no connector routes must not wait out its 240 s ExecutionTimeout
def test_test_mailflow_success_and_failure_with_the_reason(home, flow):
    server, peer = flow
    ok = shell(home, 'Test-Mailflow -TargetEmailAddress "admin@domain.com" | fl')
    assert ok.ok, ok.err
    assert "TestMailflowResult : Success" in ok.out and "IsRemoteTest       : True" in ok.out
    latency = [line for line in ok.out.splitlines() if line.startswith("MessageLatencyTime")][0]
    assert latency.split(" : ")[1].startswith("00:00:")
    local = shell(home, "Test-Mailflow")
    assert local.ok and "Success" in local.out and "False" in local.out
    # A mailbox made just before is the probe's target: the server reads the change before it routes the probe
    # (it used to route by the configuration its once-a-second poll had read: 550 5.1.1 RESOLVER.ADR.ExRecipNotFound).
    fresh = shell(home, 'New-Mailbox -Name New -PrimarySmtpAddress new@domain.com\n'
                        'Test-Mailflow -TargetEmailAddress "new@domain.com" | % TestMailflowResult')
    assert fresh.ok and fresh.out.split()[-1] == "Success", fresh.err
    remote = shell(home, 'Test-Mailflow -TargetEmailAddress "kate@remote.example"')
    assert remote.ok and "Success" in remote.out
    shell(home, "Remove-SendConnector Outbound")
    synced(home)
    # No connector routes the probe: said as soon as it is in Unreachable, not after ExecutionTimeout (240 s).
    broken = shell(home, 'Test-Mailflow -TargetEmailAddress "kate@remote.example"')
    assert not broken.ok
    assert "Failure" in broken.out
    assert "Unreachable" in broken.err and "New-SendConnector" in broken.err


@pytest.mark.timeout(120)   # the probe in a suspended queue must not wait out its 240 s ExecutionTimeout
def test_test_mailflow_says_when_a_suspended_queue_holds_the_probe(home, flow):
    assert shell(home, 'Suspend-Queue "EX01\\Submission"').ok
    held = shell(home, 'Test-Mailflow -TargetEmailAddress "admin@domain.com"')
    assert not held.ok and "Failure" in held.out
    assert 'Resume-Queue "EX01\\Submission"' in held.err, held.err
    assert shell(home, 'Get-Message -Queue "EX01\\Submission" | % Subject').out.startswith("Test-Mailflow ")
    assert shell(home, 'Resume-Queue "EX01\\Submission"').ok
    again = shell(home, 'Test-Mailflow -TargetEmailAddress "admin@domain.com" | % TestMailflowResult')
    assert again.ok and again.out.split()[-1] == "Success", again.err
    wait_for(lambda: not shell(home, 'Get-Message -Queue "EX01\\Submission"').out.strip(),
             message="the held probe to leave Submission once it is resumed")


def test_test_mailflow_tells_the_outcome_with_message_tracking_off(home, flow):
    """MessageTrackingLogEnabled $false: the probe is still followed — it reaching the system mailbox, or its NDR
    coming back there, or it leaving the queue with none — instead of waiting out ExecutionTimeout."""
    assert shell(home, "Set-TransportService EX01 -MessageTrackingLogEnabled $false").ok
    synced(home)
    local = shell(home, "Test-Mailflow -ExecutionTimeout 60 | fl TestMailflowResult,Details")
    assert local.ok and "TestMailflowResult : Success" in local.out and "DELIVER" in local.out, local.out + local.err
    mailbox = shell(home, 'Test-Mailflow -TargetEmailAddress "admin@domain.com" -ExecutionTimeout 60 | fl Details')
    assert mailbox.ok and "DELIVER to admin@domain.com" in mailbox.out, mailbox.out + mailbox.err
    remote = shell(home, 'Test-Mailflow -TargetEmailAddress "kate@remote.example" -ExecutionTimeout 60 | fl Details')
    assert remote.ok and "SEND to kate@remote.example" in remote.out, remote.out + remote.err
    failed = shell(home, 'Test-Mailflow -TargetEmailAddress "bad@failing.example" -ExecutionTimeout 60')
    assert not failed.ok and "Failure" in failed.out and "5.1.1" in failed.err, failed.out + failed.err
    assert not shell(home, "Get-MessageTrackingLog -ResultSize Unlimited").out.strip()


def test_test_smtp_connectivity_reports_each_binding(home, flow):
    server, _ = flow
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    taken = held.getsockname()[1]
    try:
        shell(home, f'New-ReceiveConnector Blocked -Bindings 127.0.0.1:{taken} -RemoteIPRanges 10.0.0.1 -Usage Custom')
        synced(home)
        result = shell(home, "Test-SmtpConnectivity | ft ReceiveConnector,Binding,StatusCode")
        assert not result.ok
        rows = {line.split()[0]: line for line in result.out.splitlines()[3:] if line.strip()}
        assert "Success" in rows["Relay"] and "Success" in rows["Default"] and "Success" in rows["Client"]
        assert "External error" in rows["Blocked"]
        details = shell(home, "Test-SmtpConnectivity | Where-Object ReceiveConnector -eq Blocked | fl Details").out
        assert "already in use" in details
        # the fix keeps the binding's address and moves only the port
        assert f'Set-ReceiveConnector "EX01\\Blocked" -Bindings 127.0.0.1:{taken + 1}' in " ".join(details.split())
    finally:
        held.close()


def test_follow_mode_prints_new_events(home, flow):
    server, _ = flow
    import threading

    def later() -> None:
        time.sleep(1.0)
        send(server.ports["frontend"], "x@remote.example", "admin@domain.com", "followed")

    threading.Thread(target=later, daemon=True).start()
    out = shell(home, "Get-MessageTrackingLog -Start (Get-Date) -Follow -FollowSeconds 4 | ft EventId,MessageSubject")
    assert "followed" in out.out and "DELIVER" in out.out


def test_log_retention_by_age_and_size(tmp_path):
    writer = CsvLogWriter(tmp_path, "MSGTRK", "Message Tracking Log", TRACKING_FIELDS)
    import os

    for i in range(5):
        p = tmp_path / f"MSGTRK202601010{i}-1.LOG"
        p.write_text("x" * 1000)
        os.utime(p, (time.time() - (5 - i) * 86400, time.time() - (5 - i) * 86400))
    writer.configure(tmp_path, max_file_size=None, max_age=3.5 * 86400, max_directory_size=None)
    assert writer.prune() == 2
    writer.configure(tmp_path, max_file_size=None, max_age=None, max_directory_size=2500)
    assert writer.prune() == 1
    assert len(list(tmp_path.glob("*.LOG"))) == 2


def test_log_paths_are_shown_where_the_logs_are_and_a_new_path_is_used_at_once(home, flow, tmp_path):
    server, peer = flow
    shown = shell(home, "Get-TransportService EX01 | fl *LogPath").out
    assert f"MessageTrackingLogPath : {home.log_dir / 'MessageTracking'}" in shown, shown
    assert f"ReceiveProtocolLogPath : {home.log_dir / 'ProtocolLog' / 'SmtpReceive'}" in shown, shown
    assert f"SendProtocolLogPath    : {home.log_dir / 'ProtocolLog' / 'SmtpSend'}" in shown, shown
    moved = tmp_path / "receive-logs"
    assert shell(home, f"Set-TransportService EX01 -ReceiveProtocolLogPath {moved}").ok
    synced(home)
    assert f"ReceiveProtocolLogPath : {moved}" in shell(home, "Get-TransportService EX01 | fl *LogPath").out
    send(server.ports["frontend"], "app@domain.com", "kate@remote.example", "logged elsewhere")
    wait_for(lambda: "EX01\\Relay" in "".join(p.read_text() for p in moved.glob("RECV*.LOG")),
             message="the session logged in the new place")


def test_a_log_path_of_null_turns_that_log_off_and_a_relative_path_is_refused(home, flow):
    """Exchange: a log path set to $null turns that log off (the preferred way is ProtocolLoggingLevel None or
    MessageTrackingLogEnabled $false, so it warns); a log path must be a full path."""
    server, peer = flow
    port = server.ports["frontend"]

    def sessions() -> set[str]:   # the receive protocol log's session ids
        return {row[2] for p in home.log_dir.joinpath("ProtocolLog", "SmtpReceive").glob("RECV*.LOG")
                for row in csv.reader(p.read_text().splitlines()) if row and not row[0].startswith("#")}

    send(port, "app@domain.com", "kate@remote.example", "before")
    tracking_events(home, '-MessageSubject "before"', until=["RECEIVE", "SEND"])
    logged_before = wait_for(sessions, message="the first session in the receive protocol log")
    off = shell(home, "Set-TransportService EX01 -ReceiveProtocolLogPath $null -MessageTrackingLogPath $null")
    assert off.ok, off.err
    unlogged = [line for line in off.out.splitlines() if line.startswith("WARNING: ReceiveProtocolLogPath is $null")]
    assert len(unlogged) == 1 and "Relay" in unlogged[0] and "Default Frontend EX01" in unlogged[0], off
    assert "WARNING: MessageTrackingLogPath is $null" in off.out, off
    shown = shell(home, "Get-TransportService EX01 | fl *LogPath").out
    assert "ReceiveProtocolLogPath :\n" in shown and "MessageTrackingLogPath :\n" in shown, shown
    synced(home)
    send(port, "app@domain.com", "kate@remote.example", "unlogged")
    wait_for(lambda: any(m.message["Subject"] == "unlogged" for m in peer.received), message="delivered")

    back = shell(home, 'Set-TransportService EX01 -ReceiveProtocolLogPath "" -MessageTrackingLogPath ""')
    assert back.ok and "WARNING" not in back.out, back
    synced(home)
    send(port, "app@domain.com", "kate@remote.example", "logged again")
    tracking_events(home, '-MessageSubject "logged again"', until=["RECEIVE", "SEND"])
    wait_for(lambda: len(sessions()) == len(logged_before) + 1, message="the third session logged")
    assert tracking_events(home, '-MessageSubject "unlogged"') == []
    # The send protocol log stayed on: all three deliveries are in it.
    wait_for(lambda: "".join(p.read_text() for p in home.log_dir.joinpath("ProtocolLog", "SmtpSend").glob(
        "SEND*.LOG")).count("sending message with RecordId") == 3, message="three deliveries in the send log")

    for bad in ("logs/relative", "relative"):
        r = shell(home, f"Set-TransportService EX01 -SendProtocolLogPath {bad}")
        assert not r.ok and "is not a full path" in r.err, r
    assert f"SendProtocolLogPath    : {home.log_dir / 'ProtocolLog' / 'SmtpSend'}" in \
        shell(home, "Get-TransportService EX01 | fl *LogPath").out
