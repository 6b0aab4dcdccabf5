"""Routing and delivery: DNS MX to real peers, smart hosts with AUTH, TLS policy,
retries, NDRs, expiry, and the queue cmdlets on a running server."""

from __future__ import annotations

import email
import os
import re
import smtplib
import time

import pytest
import trustme
from helpers import Server, free_port, maildir_messages, shell, synced, tracking_events, wait_for
from peers import DnsServer, LmtpPeer, PipeliningPeer, SmtpPeer

RELAY_SOURCE = "127.0.0.2"


@pytest.fixture
def dns_server():
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def peer_port():
    return free_port("127.0.0.20")


@pytest.fixture
def org(home, ports, dns_server, peer_port):
    """EX01 with a relay connector for 127.0.0.2, a sender mailbox, fast retries, the test DNS server,
    and a DNS send connector whose next hops listen on ``peer_port``."""
    r = shell(home, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges {RELAY_SOURCE} -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-Mailbox -Name Sender -PrimarySmtpAddress sender@domain.com
Set-TransportService EX01 -InternalDNSServers {dns_server.address} -TransientFailureRetryInterval 00:00:01 `
    -MessageRetryInterval 00:00:01 -OutboundConnectionFailureRetryInterval 00:00:02 -TransientFailureRetryCount 2
New-SendConnector Outbound -AddressSpaces "*" -Port {peer_port} -Internet
''', runtime=None)
    assert r.ok, r.err
    srv = Server(home)
    srv.ports = ports
    srv.start()
    yield srv
    srv.stop()


def submit(server: Server, sender: str, recipients: list[str], body: bytes, options: tuple = ()) -> None:
    with smtplib.SMTP("127.0.0.1", server.ports["frontend"], source_address=(RELAY_SOURCE, 0), timeout=30) as c:
        c.ehlo("app.local")
        refused = c.sendmail(sender, recipients, body, rcpt_options=list(options))
        assert refused == {}


def ndrs(home) -> list[email.message.Message]:
    return [email.message_from_bytes(m) for m in maildir_messages(home, "sender@domain.com")]


def test_mail_for_a_remote_domain_goes_by_mx(home, org, dns_server, peer_port):
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["kate@remote.example"], b"Subject: by mx\r\n\r\nhello\r\n")
        got = wait_for(lambda: peer.received, message="delivery to the MX")[0]
        assert got.rcpt_tos == ["kate@remote.example"] and got.mail_from == "sender@domain.com"
        assert b"Subject: by mx" in got.data and b"Received: from app.local" in got.data
        assert tracking_events(home, "-Recipients kate@remote.example", until=["RECEIVE", "SEND"]) == ["RECEIVE", "SEND"]
    finally:
        peer.stop()


def test_notify_success_gives_a_relayed_or_delivered_notice_and_a_dsn_event(home, org, dns_server, peer_port):
    """NOTIFY=SUCCESS (RFC 3461): relayed to a peer that doesn't offer DSN, the sender gets a "relayed" notice;
    delivered to a mailbox, a "delivered" one. Each is logged as a DSN event of the original message with the
    notice's Message-ID as Reference, as failures and delays were (the success notices had none)."""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        assert shell(home, "New-Mailbox -Name Kim -PrimarySmtpAddress kim@domain.com").ok
        synced(home)
        submit(org, "sender@domain.com", ["kate@remote.example", "kim@domain.com"],
               b"Subject: notify me\r\n\r\nhello\r\n", options=("NOTIFY=SUCCESS",))
        wait_for(lambda: peer.received and len(ndrs(home)) == 2, message="the two success notices")
        reports = {m["Subject"]: m for m in ndrs(home)}
        assert set(reports) == {"Relayed: notify me", "Delivered: notify me"}, list(reports)
        for subject, action, rcpt in (("Relayed: notify me", "relayed", "kate@remote.example"),
                                      ("Delivered: notify me", "delivered", "kim@domain.com")):
            status = reports[subject].get_payload()[1].as_string()
            assert f"Action: {action}" in status and rcpt in status

        def dsn_events() -> list[str]:   # the tracking writer flushes every 250 ms
            out = shell(home, 'Get-MessageTrackingLog -MessageSubject "notify me" -EventId DSN | '
                              'ForEach-Object { "$($_.Recipients) $($_.Reference)" }').out
            lines = sorted(line for line in out.split("\n") if line.strip())
            return lines if len(lines) >= 2 else []

        events = wait_for(dsn_events, message="the two DSN events")
        assert len(events) == 2, events
        assert sorted(e.split()[0] for e in events) == ["kate@remote.example", "kim@domain.com"]
        references = {e.split()[1] for e in events}
        assert references == {m["Message-ID"] for m in reports.values()}
    finally:
        peer.stop()


def test_the_next_mx_is_used_when_the_first_refuses_connections(home, org, dns_server, peer_port):
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.", "20 mx2.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.21")   # nothing listens there
    dns_server.add("mx2.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["kate@remote.example"], b"Subject: second mx\r\n\r\nx\r\n")
        assert wait_for(lambda: peer.received)[0].rcpt_tos == ["kate@remote.example"]
    finally:
        peer.stop()


def test_a_domain_without_mx_is_reached_at_its_address_and_null_mx_is_refused(home, org, dns_server, peer_port):
    dns_server.add("plain.example", "A", "127.0.0.20")
    dns_server.add("nomail.example", "MX", "0 .")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["a@plain.example"], b"Subject: a record\r\n\r\nx\r\n")
        wait_for(lambda: peer.received)
        submit(org, "sender@domain.com", ["b@nomail.example"], b"Subject: null mx\r\n\r\nx\r\n")
        ndr = wait_for(lambda: ndrs(home), message="the NDR")[0]
        assert ndr["Subject"] == "Undeliverable: null mx"
        status = ndr.get_payload()[1].get_payload()
        assert "Status: 5.1.10" in str(status[1]) and "b@nomail.example" in str(status[1])
    finally:
        peer.stop()


def test_smart_host_with_basic_auth_uses_the_stored_credentials(home, org, peer_port):
    peer = SmtpPeer("127.0.0.22", peer_port, auth={"relayuser": "relay-secret"})
    try:
        r = shell(home, f'''
$pw = ConvertTo-SecureString "relay-secret" -AsPlainText -Force
$cred = New-Object System.Management.Automation.PSCredential("relayuser", $pw)
New-SendConnector -Name "SmartHost Connector" -Usage Internet -AddressSpaces "partner.example" `
    -SmartHosts 127.0.0.22 -SmartHostAuthMechanism BasicAuth -AuthenticationCredential $cred -Port {peer_port}
''')
        assert r.ok, r.err
        synced(home)
        submit(org, "sender@domain.com", ["x@partner.example"], b"Subject: via smart host\r\n\r\nx\r\n")
        got = wait_for(lambda: peer.received)[0]
        assert got.auth == "relayuser" and got.rcpt_tos == ["x@partner.example"]
        queues = shell(home, "Get-Queue | ft Identity,DeliveryType,NextHopDomain")
        assert "SmartHostConnectorDelivery" in queues.out and "[127.0.0.22]" in queues.out
    finally:
        peer.stop()


def test_wrong_smart_host_password_leaves_the_queue_in_retry(home, org, peer_port):
    peer = SmtpPeer("127.0.0.22", peer_port, auth={"relayuser": "other"})
    try:
        shell(home, f'$c = New-Object PSCredential("relayuser", (ConvertTo-SecureString "wrong" -AsPlainText -Force))\n'
                    f'New-SendConnector SH -AddressSpaces partner.example -SmartHosts 127.0.0.22 '
                    f'-SmartHostAuthMechanism BasicAuth -AuthenticationCredential $c -Port {peer_port}')
        synced(home)
        submit(org, "sender@domain.com", ["x@partner.example"], b"Subject: denied\r\n\r\nx\r\n")
        q = wait_for(lambda: [line for line in shell(home, "Get-Queue | ft Identity,Status,LastError -Wrap").out
                              .splitlines() if "127.0.0.22" in line and "Retry" in line])
        assert "535" in q[0]
        assert not peer.received
    finally:
        peer.stop()


def test_require_tls_waits_for_a_peer_that_offers_starttls(home, org, dns_server, peer_port, tmp_path):
    dns_server.add("secure.example", "MX", "10 mx.secure.example.")
    dns_server.add("mx.secure.example", "A", "127.0.0.23")
    shell(home, "Set-SendConnector Outbound -RequireTLS $true")
    synced(home)
    plain = SmtpPeer("127.0.0.23", peer_port)
    try:
        submit(org, "sender@domain.com", ["a@secure.example"], b"Subject: must be encrypted\r\n\r\nx\r\n")
        retry = wait_for(lambda: [r for r in shell(home, "Get-Queue | fl Identity,Status,LastError").out.split("\n\n")
                                  if "secure.example" in r and "Retry" in r])
        assert "451 5.7.3 STARTTLS is required to send mail" in retry[0]
        assert not plain.received
    finally:
        plain.stop()
    ca = trustme.CA()
    cert = ca.issue_cert("mx.secure.example", "127.0.0.23")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "peer.pem"))
    tls = SmtpPeer("127.0.0.23", peer_port, tls_cert=(str(tmp_path / "peer.pem"), str(tmp_path / "peer.pem")))
    try:
        assert shell(home, "Retry-Queue EX01\\secure.example").ok
        got = wait_for(lambda: tls.received, timeout=30)[0]
        assert got.tls and got.rcpt_tos == ["a@secure.example"]
    finally:
        tls.stop()


def test_ignore_starttls_sends_in_the_clear_to_a_peer_that_offers_it(home, org, dns_server, peer_port, tmp_path):
    """SPEC C4's IgnoreSTARTTLS (it had no test): opportunistic TLS by default, none with -IgnoreSTARTTLS $true."""
    dns_server.add("offers.example", "MX", "10 mx.offers.example.")
    dns_server.add("mx.offers.example", "A", "127.0.0.24")
    cert = trustme.CA().issue_cert("mx.offers.example", "127.0.0.24")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "peer.pem"))
    peer = SmtpPeer("127.0.0.24", peer_port, tls_cert=(str(tmp_path / "peer.pem"), str(tmp_path / "peer.pem")))
    try:
        submit(org, "sender@domain.com", ["a@offers.example"], b"Subject: opportunistic\r\n\r\nx\r\n")
        assert wait_for(lambda: peer.received, timeout=30)[0].tls   # offered, so taken, unverified
        assert shell(home, "Set-SendConnector Outbound -IgnoreSTARTTLS $true").ok
        synced(home)
        submit(org, "sender@domain.com", ["b@offers.example"], b"Subject: in the clear\r\n\r\nx\r\n")
        second = wait_for(lambda: peer.received[1:], timeout=30)[0]
        assert second.rcpt_tos == ["b@offers.example"] and not second.tls
        refused = shell(home, "Set-SendConnector Outbound -RequireTLS $true")   # the two contradict each other
        assert not refused.ok and "IgnoreSTARTTLS" in refused.err
    finally:
        peer.stop()


def test_a_4xx_is_retried_after_the_retry_interval(home, org, dns_server, peer_port):
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    answers = ["451 4.3.0 try again later"]
    peer.rcpt_reply = lambda address: answers.pop() if answers else None
    try:
        submit(org, "sender@domain.com", ["kate@remote.example"], b"Subject: deferred once\r\n\r\nx\r\n")
        got = wait_for(lambda: peer.received, timeout=30)[0]
        assert got.rcpt_tos == ["kate@remote.example"]
        assert tracking_events(home, "-Recipients kate@remote.example", until=["RECEIVE", "DEFER", "SEND"]) == \
            ["RECEIVE", "DEFER", "SEND"]
        assert not ndrs(home)
    finally:
        peer.stop()


def test_mail_delayed_past_delay_notification_timeout_gives_its_sender_one_delay_notice(home, org, dns_server,
                                                                                          peer_port):
    """SPEC C3 (it had no test): once a message has waited DelayNotificationTimeout, its sender gets one
    "Delivery delayed" notice (RFC 3464, action delayed) for the recipients that ask for it, and the message is
    still delivered when the next hop takes it; NOTIFY=FAILURE gets none."""
    assert shell(home, "Set-TransportService EX01 -DelayNotificationTimeout 00:00:02").ok
    synced(home)
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    busy = [True]
    peer.rcpt_reply = lambda address: "451 4.7.1 Greylisted, try again later" if busy[0] else None
    try:
        submit(org, "sender@domain.com", ["kate@remote.example"], b"Subject: slow one\r\n\r\nx\r\n")
        submit(org, "sender@domain.com", ["lee@remote.example"], b"Subject: quiet one\r\n\r\nx\r\n",
               options=("NOTIFY=FAILURE",))
        notice = wait_for(lambda: ndrs(home), timeout=30, message="the delay notice")[0]
        assert notice["Subject"] == "Delivery delayed: slow one" and notice["From"].endswith("@domain.com>")
        report = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status")
        status = str(report.get_payload()[1])
        assert "Action: delayed" in status and "rfc822;kate@remote.example" in status and "4.7.1" in status
        time.sleep(6)   # another scan of the queue: still one notice, and none for NOTIFY=FAILURE
        assert len(ndrs(home)) == 1
        busy[0] = False
        shell(home, "Retry-Queue EX01\\remote.example")
        wait_for(lambda: len(peer.received) == 2, timeout=30, message="both messages, once the next hop takes them")
        assert len(ndrs(home)) == 1
    finally:
        peer.stop()


def test_mail_to_a_unicode_domain_reaches_a_peer_without_smtputf8_in_a_labels(home, org, dns_server, peer_port):
    """A client sends with SMTPUTF8 to kate@bücher.example; the MX, which doesn't offer SMTPUTF8, is found under
    the domain's A-label name and gets the address in A-labels, as Postfix would send it; no NDR."""
    dns_server.add("xn--bcher-kva.example", "MX", "10 mx1.xn--bcher-kva.example.")
    dns_server.add("mx1.xn--bcher-kva.example", "A", "127.0.0.20")
    peer = PipeliningPeer().start_in_thread("127.0.0.20", peer_port)
    try:
        with smtplib.SMTP("127.0.0.1", org.ports["frontend"], source_address=(RELAY_SOURCE, 0), timeout=30) as c:
            c.ehlo("app.local")
            assert c.sendmail("sender@domain.com", ["kate@bücher.example"], b"Subject: idn\r\n\r\nx\r\n",
                              mail_options=["SMTPUTF8"]) == {}
        sender, rcpts, _ = wait_for(lambda: peer.messages, timeout=30, message="delivery to the IDN domain's MX")[0]
        assert (sender, rcpts) == ("sender@domain.com", ["kate@xn--bcher-kva.example"])
        assert b"SMTPUTF8" not in b"".join(peer.reads)
        assert not ndrs(home)
    finally:
        peer.stop_thread()


def test_smtputf8_asked_for_by_the_sender_goes_on_to_a_peer_that_offers_it(home, org, dns_server, peer_port):
    """An ASCII envelope with a UTF-8 header, sent with SMTPUTF8 (RFC 6532): the next hop offers SMTPUTF8, so
    the MAIL command says it too and the header arrives as it was; without SMTPUTF8 from the sender, none."""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        with smtplib.SMTP("127.0.0.1", org.ports["frontend"], source_address=(RELAY_SOURCE, 0), timeout=30) as c:
            c.ehlo("app.local")
            assert c.sendmail("sender@domain.com", ["kate@remote.example"], "Subject: Grüße\r\n\r\nx\r\n".encode(),
                              mail_options=["SMTPUTF8"]) == {}
            assert c.sendmail("sender@domain.com", ["lee@remote.example"], b"Subject: plain\r\n\r\nx\r\n") == {}
        wait_for(lambda: len(peer.received) == 2, timeout=30, message="both messages at the next hop")
        by_rcpt = {r.rcpt_tos[0]: r for r in peer.received}
        assert "SMTPUTF8" in by_rcpt["kate@remote.example"].mail_options
        assert "Subject: Grüße".encode() in by_rcpt["kate@remote.example"].data
        assert "SMTPUTF8" not in by_rcpt["lee@remote.example"].mail_options
    finally:
        peer.stop()


def test_a_5xx_for_one_of_three_recipients_gives_one_ndr_for_that_one(home, org, dns_server, peer_port):
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    peer.rcpt_reply = lambda address: "550 5.1.1 User unknown" if address.startswith("bad@") else None
    assert shell(home, "Set-TransportConfig -ExternalPostmasterAddress Bounces@Domain.com").ok
    synced(home)
    try:
        submit(org, "sender@domain.com", ["a@remote.example", "bad@remote.example", "c@remote.example"],
               b"Subject: three\r\nMessage-ID: <three@domain.com>\r\n\r\nx\r\n")
        got = wait_for(lambda: peer.received)[0]
        assert sorted(got.rcpt_tos) == ["a@remote.example", "c@remote.example"]
        ndr = wait_for(lambda: ndrs(home))[0]
        assert ndr["Subject"] == "Undeliverable: three" and ndr.get_content_type() == "multipart/report"
        assert ndr["From"] == "Mail Delivery System <Bounces@domain.com>"
        report = str(ndr.get_payload()[1])
        assert "Final-Recipient: rfc822;bad@remote.example" in report and "Status: 5.1.1" in report
        assert "a@remote.example" not in report and "c@remote.example" not in report
        assert "Diagnostic-Code: smtp;550 5.1.1 User unknown" in report
        assert ndr.get_payload()[2].get_content_type() == "message/rfc822"
        time.sleep(1)
        assert len(ndrs(home)) == 1
    finally:
        peer.stop()


def test_expiry_gives_an_ndr_and_the_null_sender_never_gets_one(home, org, dns_server):
    dns_server.add("down.example", "MX", "10 mx.down.example.")
    dns_server.add("mx.down.example", "A", "127.0.0.24")   # nobody listens
    shell(home, "Set-TransportService EX01 -MessageExpirationTimeout 00:00:06")
    synced(home)
    submit(org, "sender@domain.com", ["a@down.example"], b"Subject: expires\r\n\r\nx\r\n")
    submit(org, "<>", ["b@down.example"], b"Subject: bounce of a bounce\r\n\r\nx\r\n")
    ndr = wait_for(lambda: ndrs(home), timeout=40, message="the expiry NDR")[0]
    assert ndr["Subject"] == "Undeliverable: expires"
    assert ndr["From"] == "Mail Delivery System <postmaster@domain.com>"   # no ExternalPostmasterAddress set
    report = str(ndr.get_payload()[1])
    assert "Status: 4.4.7" in report and "a@down.example" in report
    wait_for(lambda: "b@down.example" not in shell(home, "Get-Message | fl Recipients -IncludeRecipientInfo").out
             and not shell(home, 'Get-Message -Filter "FromAddress -eq \'<>\'"').out.strip(), timeout=30)
    assert len(ndrs(home)) == 1
    assert tracking_events(home, "-EventId FAIL", until=["FAIL", "FAIL"]) == ["FAIL", "FAIL"]
    fails = shell(home, "Get-MessageTrackingLog -EventId FAIL | ft Source,Recipients")
    assert "QUEUE" in fails.out and "b@down.example" in fails.out


def test_queue_cmdlets_suspend_resume_remove_export(home, org, dns_server, peer_port, tmp_path):
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["a@remote.example"], b"Subject: warm up\r\n\r\nx\r\n")
        wait_for(lambda: peer.received)
        assert shell(home, "Suspend-Queue EX01\\remote.example").ok
        for i in range(3):
            submit(org, "sender@domain.com", ["a@remote.example"], f"Subject: held {i}\r\n\r\nx\r\n".encode())
        listing = wait_for(lambda: [r for r in shell(home, "Get-Queue EX01\\remote.example | fl Status,MessageCount").out
                                    .split("\n\n") if "MessageCount : 3" in r])
        assert "Suspended" in listing[0]
        msgs = shell(home, 'Get-Message -Queue "EX01\\remote.example" | ft Identity,Subject')
        assert msgs.out.count("held") == 3 and len(peer.received) == 1
        first = [line.split()[0] for line in msgs.out.splitlines() if "held 0" in line][0]
        assert shell(home, f'Remove-Message -Identity "{first}" -WithNDR $false').ok
        second = [line.split()[0] for line in msgs.out.splitlines() if "held 1" in line][0]
        r = shell(home, f'Suspend-Message "{second}"\nExport-Message "{second}" -Path "{tmp_path / "held.eml"}"')
        assert r.ok, r.err
        assert b"Subject: held 1" in (tmp_path / "held.eml").read_bytes()
        filtered = shell(home, 'Get-Queue -Filter "MessageCount -gt 1"').out
        assert [line.split()[0] for line in filtered.splitlines() if "remote" in line] == ["EX01\\remote.example"]
        assert "remote" not in shell(home, 'Get-Queue -Filter "MessageCount -gt 2"').out
        # The script-block form Exchange's documentation uses is the same filter.
        block = shell(home, 'Get-Queue -Filter {MessageCount -gt 1 -and NextHopDomain -like "remote.*"} | ft Identity')
        assert block.ok and "EX01\\remote.example" in block.out, block.err
        held = shell(home, "Get-Message -Filter {Subject -like 'held*'} | Measure-Object | % Count")
        assert held.out.split() == ["2"], held.err
        piped = shell(home, "Get-Queue EX01\\remote.example | Get-Message | ft Subject -HideTableHeaders")
        assert sorted(piped.out.split()) == ["1", "2", "held", "held"], piped.err
        # Server objects piped in bind to -Server, as Exchange's multi-server one-liners rely on.
        servers = shell(home, "Get-TransportService | Get-Message | Measure-Object | % Count\n"
                              "Get-ExchangeServer | Get-Queue | ? {$_.MessageCount -gt 0} | % Identity")
        assert servers.out.split() == ["2", "EX01\\remote.example"], servers.err
        # The empty Poison queue answers when named, and is not listed because it was.
        assert shell(home, "Get-Queue EX01\\Poison | % MessageCount").out.split() == ["0"]
        assert "Poison" not in shell(home, "Get-Queue | ft Identity").out
        shell(home, "Resume-Queue EX01\\remote.example")
        wait_for(lambda: len(peer.received) == 2, message="the unsuspended message")
        assert b"held 2" in peer.received[1].data
        shell(home, f'Resume-Message "{second}"')
        wait_for(lambda: len(peer.received) == 3)
        assert tracking_events(home, "-EventId DROP", until=["DROP"]) == ["DROP"]
        assert not ndrs(home)
    finally:
        peer.stop()


_FAULT = """
import os
FLAG = os.environ.get("MAILGATE_TEST_FAULT_FLAG")
if FLAG:   # a processing fault for marked messages while the flag file exists (test_delivery.py's poison test)
    import mailgate.send.deliver as deliver
    original = deliver._for_outside
    def faulty(body):
        if os.path.exists(FLAG) and b"X-Fault-Test:" in body.head():
            raise RuntimeError("injected processing fault")
        return original(body)
    deliver._for_outside = faulty
"""


def test_a_message_whose_processing_fails_goes_to_poison_and_resume_message_releases_it(home, org, dns_server,
                                                                                         peer_port, tmp_path,
                                                                                         monkeypatch):
    """SPEC C3: a message that breaks processing (here a fault injected into the server for marked messages) is
    tried PoisonThreshold (2) times, then waits in EX01\\Poison — listed, suspended, never retried or expired —
    while other mail flows; Resume-Message releases it and it is delivered."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(_FAULT)
    flag = tmp_path / "fault-on"
    flag.touch()
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'inject'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("MAILGATE_TEST_FAULT_FLAG", str(flag))
    org.stop()
    org.start()   # with the fault in its processes
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["a@remote.example"], b"X-Fault-Test: yes\r\nSubject: breaks\r\n\r\nx\r\n")
        submit(org, "sender@domain.com", ["a@remote.example"], b"Subject: fine\r\n\r\nx\r\n")
        wait_for(lambda: any(b"Subject: fine" in m.data for m in peer.received), message="the healthy message")
        listing = wait_for(lambda: [line for line in shell(home, "Get-Queue | ft Identity,Status,MessageCount").out
                                    .splitlines() if line.startswith("EX01\\Poison")], timeout=60,
                           message="the Poison queue")
        assert listing[0].split()[1:] == ["Suspended", "1"]
        poisoned = shell(home, "Get-Message -Queue EX01\\Poison | fl Identity,Status,Subject").out
        assert "Status   : Suspended" in poisoned and "Subject  : breaks" in poisoned
        assert tracking_events(home, "-EventId POISONMESSAGE", until=["POISONMESSAGE"]) == ["POISONMESSAGE"]
        shell(home, "Retry-Queue EX01\\remote.example")   # nothing takes it out of Poison but Resume-Message
        time.sleep(1)
        assert not any(b"Subject: breaks" in m.data for m in peer.received)
        flag.unlink()   # the fault is mended
        identity = [line.split(":", 1)[1].strip() for line in poisoned.splitlines() if line.startswith("Identity")][0]
        released = shell(home, f"Resume-Message {identity}")
        assert released.ok, released.err
        wait_for(lambda: any(b"Subject: breaks" in m.data for m in peer.received), message="the released message")
        assert "Poison" not in shell(home, "Get-Queue | ft Identity").out   # empty again, so not listed
    finally:
        peer.stop()


def test_two_connectors_to_one_smart_host_each_keep_their_own_messages_manageable(home, org, peer_port, tmp_path):
    """Two send connectors to the same smart host address (here on two ports) have two queues of the same name,
    EX01\\[127.0.0.20]. A message of the second was resolved to the first queue by that name: Suspend-Message
    changed nothing, and Export-Message then hid the worker's reason behind "couldn't be found"."""
    peer = SmtpPeer("127.0.0.20", peer_port)
    dead_port = free_port("127.0.0.20")
    try:
        r = shell(home, f"New-SendConnector Live -AddressSpaces live.example -SmartHosts [127.0.0.20] -Port {peer_port}\n"
                        f"New-SendConnector Dead -AddressSpaces dead.example -SmartHosts [127.0.0.20] -Port {dead_port}")
        assert r.ok, r.err
        synced(home)
        for _ in range(8):   # each on its own connection: every worker process gets some and opens Live's queue
            submit(org, "sender@domain.com", ["a@live.example"], b"Subject: live\r\n\r\nx\r\n")
        wait_for(lambda: len(peer.received) == 8)
        submit(org, "sender@domain.com", ["a@dead.example"], b"Subject: stuck\r\n\r\nx\r\n")
        stuck = wait_for(lambda: [line.split()[0] for line in shell(home, "Get-Message | ft Identity,Subject").out
                                  .splitlines() if "stuck" in line])[0]
        assert stuck.startswith("EX01\\[127.0.0.20]\\")
        # The queues are told apart by NextHopConnector, the connector's GUID as in Exchange
        dead_guid = shell(home, "(Get-SendConnector Dead).Guid").out.strip()
        rows = shell(home, "Get-Queue | ft NextHopConnector,MessageCount -HideTableHeaders").out
        assert [line.split() for line in rows.splitlines() if dead_guid in line] == [[dead_guid, "1"]], rows
        exported = shell(home, f'Export-Message "{stuck}" -Path "{tmp_path / "stuck.eml"}"')
        assert not exported.ok and "must be suspended" in exported.err, exported.err
        assert shell(home, f'Suspend-Message "{stuck}"').ok
        assert "Suspended" in shell(home, f'Get-Message "{stuck}" | fl Status').out
        assert shell(home, f'Export-Message "{stuck}" -Path "{tmp_path / "stuck.eml"}"').ok
        assert b"Subject: stuck" in (tmp_path / "stuck.eml").read_bytes()
        assert shell(home, f'Remove-Message "{stuck}" -WithNDR $false').ok
        wait_for(lambda: "stuck" not in shell(home, "Get-Message | ft Subject").out, message="the removed message")
    finally:
        peer.stop()


def test_mailboxes_of_a_domain_with_an_lmtp_target_are_delivered_by_lmtp_one_reply_per_recipient(home, org):
    """Set-AcceptedDomain -LmtpTarget: its mailboxes' mail goes to an external store by LMTP (SPEC C5). Each
    recipient has its own reply to the end of DATA: one delivered, one deferred and delivered alone later (never
    twice to the first); the organisation headers go along (the store is the organisation's own)."""
    port = free_port("127.0.0.20")
    full = {"bob@domain.com": True}
    peer = LmtpPeer("127.0.0.20", port, lambda rcpt: "452 4.2.2 Mailbox full" if full.get(rcpt)
                    else "250 2.0.0 OK delivered")
    try:
        r = shell(home, "New-Mailbox -Name Alice -PrimarySmtpAddress alice@domain.com\n"
                        "New-Mailbox -Name Bob -PrimarySmtpAddress bob@domain.com\n"
                        f'Set-AcceptedDomain domain.com -LmtpTarget "127.0.0.20:{port}"')
        assert r.ok, r.err
        for bad in ("store host:24", "127.0.0.20:99999", "[not-an-ip]:24"):
            refused = shell(home, f'Set-AcceptedDomain domain.com -LmtpTarget "{bad}"')
            assert not refused.ok and "LMTP target" in refused.err, bad
        synced(home)
        submit(org, "someone@example.org", ["alice@domain.com", "bob@domain.com"], b"Subject: lmtp\r\n\r\nhi\r\n")
        wait_for(lambda: peer.received, message="the LMTP delivery")
        first = peer.received[0]
        assert sorted(first.rcpt_tos) == ["alice@domain.com", "bob@domain.com"]
        assert b"X-MS-Exchange-Organization-AuthSource" in first.data
        assert tracking_events(home, '-MessageSubject lmtp -EventId DEFER', until=["DEFER"]) == ["DEFER"]
        full["bob@domain.com"] = False
        assert shell(home, f"Retry-Queue EX01\\127.0.0.20:{port}").ok
        wait_for(lambda: len(peer.received) == 2, message="the deferred recipient's second attempt")
        assert peer.received[1].rcpt_tos == ["bob@domain.com"]
        assert not maildir_messages(home, "alice@domain.com")   # the store has the mail, not the Maildir
    finally:
        peer.stop()


def test_correcting_a_connector_retries_its_queue_now_not_after_the_retry_interval(home, org, peer_port):
    """A smart host connector with a wrong port: its mail waits in Retry for OutboundConnectionFailureRetryInterval
    (ten minutes here). Once the administrator corrects the port, the queue tries again at once with the new
    settings, as Retry-Queue would (it waited out the interval the wrong settings had earned)."""
    peer = SmtpPeer("127.0.0.20", peer_port)
    wrong = free_port("127.0.0.20")
    try:
        r = shell(home, "Set-TransportService EX01 -TransientFailureRetryCount 0 "
                        "-OutboundConnectionFailureRetryInterval 00:10:00\n"
                        f"New-SendConnector Partner -AddressSpaces partner.example -SmartHosts [127.0.0.20] -Port {wrong}")
        assert r.ok, r.err
        synced(home)
        submit(org, "sender@domain.com", ["a@partner.example"], b"Subject: wrong port\r\n\r\nx\r\n")
        wait_for(lambda: "Retry" in shell(home, "Get-Message -Filter {Subject -eq 'wrong port'} | fl Status").out,
                 message="the message in Retry")
        assert shell(home, f"Set-SendConnector Partner -Port {peer_port}").ok
        wait_for(lambda: peer.received, timeout=30, message="delivery once the port is corrected")
        assert peer.received[0].rcpt_tos == ["a@partner.example"]
    finally:
        peer.stop()


def test_no_connector_means_unreachable_until_one_is_created(home, org, dns_server, peer_port):
    shell(home, "Set-SendConnector Outbound -AddressSpaces only.example")
    synced(home)
    submit(org, "sender@domain.com", ["a@elsewhere.example"], b"Subject: nowhere\r\n\r\nx\r\n")
    wait_for(lambda: "MessageCount : 1" in shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount").out)
    # Each message says why it is there, as Exchange's Get-Message does.
    why = shell(home, "Get-Message -Queue EX01\\Unreachable | fl LastError")
    assert "LastError : A matching connector cannot be found to route the external recipient" in why.out, why.err
    listed = shell(home, "Get-Message -Queue EX01\\Unreachable -IncludeRecipientInfo | fl Recipients").out
    assert "a@elsewhere.example;Ready;0;A matching connector cannot be found" in listed
    # Each recipient is an object with Exchange's RecipientInfo properties (the administrator's one-liner).
    rows = shell(home, "Get-Message -Queue EX01\\Unreachable -IncludeRecipientInfo | "
                       "Select-Object -ExpandProperty Recipients | ft Address,Type,Status,FinalDestination").out
    assert "a@elsewhere.example External Ready <No Matching Connector>" in [" ".join(r.split())
                                                                            for r in rows.splitlines()]
    dns_server.add("elsewhere.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        shell(home, 'Set-SendConnector Outbound -AddressSpaces @{Add="*"}')
        assert wait_for(lambda: peer.received, timeout=30)[0].rcpt_tos == ["a@elsewhere.example"]
    finally:
        peer.stop()


def test_a_reused_connection_is_reset_after_a_message_whose_recipients_were_all_refused(home, org, dns_server,
                                                                                        peer_port):
    """The second message goes over the first one's connection (connection reuse): after a transaction
    without an accepted recipient, the client must RSET, or the peer sees a nested MAIL and refuses it."""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    peer.rcpt_reply = lambda address: "550 5.1.1 User unknown" if address.startswith("gone@") else None
    try:
        # One client session, so that both messages are in the same worker's queue.
        with smtplib.SMTP("127.0.0.1", org.ports["frontend"], source_address=(RELAY_SOURCE, 0), timeout=30) as c:
            c.ehlo("app.local")
            assert c.sendmail("sender@domain.com", ["gone@remote.example"], b"Subject: refused\r\n\r\nx\r\n") == {}
            assert c.sendmail("sender@domain.com", ["here@remote.example"], b"Subject: second\r\n\r\nx\r\n") == {}
        got = wait_for(lambda: peer.received, timeout=30, message="the second message")
        assert got[0].rcpt_tos == ["here@remote.example"]
        ndr = wait_for(lambda: ndrs(home))
        assert len(ndr) == 1 and ndr[0]["Subject"] == "Undeliverable: refused"
    finally:
        peer.stop()


def _bdat_submit(server: Server, sender: str, recipient: str, body: bytes) -> bytes:
    """One message sent with BDAT (smtplib has no BDAT); returns the server's reply to the chunk."""
    import socket

    with socket.create_connection(("127.0.0.1", server.ports["frontend"]), timeout=30,
                                  source_address=(RELAY_SOURCE, 0)) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            while True:
                line = f.readline()
                if line[3:4] != b"-":
                    return line

        reply()
        for command in (b"EHLO app.local\r\n", f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{recipient}>\r\n".encode()):
            s.sendall(command)
            assert reply().startswith(b"250")
        s.sendall(f"BDAT {len(body)} LAST\r\n".encode() + body)
        answer = reply()
        s.sendall(b"QUIT\r\n")
        return answer


def test_bare_line_feeds_of_a_bdat_body_cannot_end_data_at_the_next_hop(home, org, dns_server, peer_port):
    """A body received with BDAT is stored as sent; relayed to a peer without CHUNKING (so with DATA), its bare
    CR and LF become CRLF, so "\\n.\\n" in it can't end the message there and smuggle a second one. (Bodies
    received with DATA were normalised on the way in, and only those skip the check when sent.)"""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        body = (b"Subject: smuggle\r\n\r\nfirst\n.\nMAIL FROM:<evil@x.example>\nRCPT TO:<kate@remote.example>\n"
                b"DATA\nSubject: smuggled\n\nsecond\r\n")
        assert _bdat_submit(org, "sender@domain.com", "kate@remote.example", body).startswith(b"250")
        got = wait_for(lambda: peer.received, message="the relayed message")
        time.sleep(1)
        assert len(peer.received) == 1 and got[0].mail_from == "sender@domain.com"
        # (the peer hands over the content unstuffed: the "." line arrived as ".." and is text)
        assert b"first\r\n.\r\nMAIL FROM:<evil@x.example>\r\n" in got[0].data, got[0].data
    finally:
        peer.stop()


def test_a_peer_hanging_up_mid_batch_loses_and_duplicates_nothing(home, org, dns_server, peer_port):
    """Mail waiting in a queue leaves in one batch over one connection; to a peer without CHUNKING each body
    shares a write with the next envelope. The peer takes the first message and hangs up at the second one's
    dot: the first is delivered once, the second and third (its envelope was on the wire) are deferred and
    delivered at the retry, each exactly once."""
    dns_server.add("remote.example", "A", "127.0.0.20")
    # Nothing listens yet: the queue goes into retry; suspended, it keeps the three messages until resumed.
    submit(org, "sender@domain.com", ["r1@remote.example"], b"Subject: batch 1\r\n\nbody 1\r\n")
    wait_for(lambda: "Retry" in shell(home, "Get-Queue EX01\\remote.example | fl Status").out)
    assert shell(home, "Suspend-Queue EX01\\remote.example").ok
    for n in (2, 3):
        submit(org, "sender@domain.com", [f"r{n}@remote.example"], f"Subject: batch {n}\r\n\nbody {n}\r\n".encode())
    wait_for(lambda: "MessageCount : 3" in shell(home, "Get-Queue EX01\\remote.example | fl MessageCount").out)
    time.sleep(1.5)   # the first message's own retry time (MessageRetryInterval 1 s) has come
    peer = PipeliningPeer(hang_up_after_dots=2).start_in_thread("127.0.0.20", peer_port)
    try:
        assert shell(home, "Resume-Queue EX01\\remote.example").ok
        wait_for(lambda: len(peer.messages) >= 3, timeout=30, message="three messages at the peer")
        time.sleep(1.5)   # a duplicate would arrive now
        delivered = [rcpts[0] for _, rcpts, _ in peer.messages]
        assert sorted(delivered) == ["r1@remote.example", "r2@remote.example", "r3@remote.example"]
        # Which messages share a connection depends on the queue's window when it resumes; chained they are.
        assert any(b"\r\n.\r\nMAIL FROM:<sender@domain.com>" in b"".join(c) for c in peer.connections)
        # Deferred: exactly the messages on the connection the peer dropped that it hadn't taken — the one whose
        # dot it dropped and any whose envelope was on the wire after that dot.
        dropped = peer.hung_up_on
        on_the_wire = set(re.findall(r"RCPT TO:<([^>]+)>", b"".join(peer.connections[dropped]).decode()))
        taken = {rcpts[0] for (_, rcpts, _), on in zip(peer.messages, peer.accepted_on) if on == dropped}
        deferred = shell(home, 'Get-MessageTrackingLog -EventId DEFER | ForEach-Object { "$($_.Recipients)" }').out
        assert {a for a in delivered if a in deferred} == on_the_wire - taken != set()
    finally:
        peer.stop_thread()


def retrying(home, domain: str) -> dict[str, str] | None:
    """Status, MessageCount and LastError of the delivery queue for ``domain`` once it is in Retry."""
    r = shell(home, f'Get-Queue | Where-Object {{ $_.NextHopDomain -eq "{domain}" }} | fl Status,MessageCount,LastError')
    assert r.ok, r.err
    queue = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in r.out.splitlines()) if v}
    return queue if queue.get("Status") == "Retry" else None


@pytest.mark.parametrize("failure", ["servfail", "silent"])
def test_a_dns_failure_defers_mail_and_delivery_follows_when_dns_answers_again(home, org, dns_server, peer_port,
                                                                                failure):
    """DNS servers that fail (SERVFAIL) or don't answer (timeout) are a transient failure: the message waits
    in Retry with a 4.4.3 error, no NDR, and goes out once DNS works again."""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    setattr(dns_server, "fail" if failure == "servfail" else "silent", True)
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["kate@remote.example"], b"Subject: dns down\r\n\r\nx\r\n")
        queue = wait_for(lambda: retrying(home, "remote.example"), timeout=60, message="the queue in Retry")
        assert "4.4.3" in queue["LastError"] and "DNS" in queue["LastError"], queue
        assert queue["MessageCount"] == "1" and not peer.received and not ndrs(home)
        dns_server.fail = dns_server.silent = False
        got = wait_for(lambda: peer.received, timeout=60, message="delivery once DNS answers")[0]
        assert got.rcpt_tos == ["kate@remote.example"]
        assert not ndrs(home)
        assert tracking_events(home, "-Recipients kate@remote.example", until=["RECEIVE", "SEND"])[-1] == "SEND"
    finally:
        peer.stop()


def test_a_next_hop_that_hangs_is_given_up_after_the_inactivity_timeout_and_holds_up_no_other(
        home, org, dns_server, peer_port):
    """A next hop that accepts the connection and never answers: the attempt ends after the send connector's
    ConnectionInactivityTimeOut and the message waits in Retry, while mail for other next hops flows; when
    the host answers again, the message is delivered."""
    from peers import StallingPeer

    dns_server.add("slow.example", "MX", "10 mx.slow.example.")
    dns_server.add("mx.slow.example", "A", "127.0.0.21")
    dns_server.add("fast.example", "MX", "10 mx.fast.example.")
    dns_server.add("mx.fast.example", "A", "127.0.0.20")
    assert shell(home, "Set-SendConnector Outbound -ConnectionInactivityTimeOut 00:00:02").ok
    synced(home)
    stalling = StallingPeer("127.0.0.21", peer_port)
    fast = SmtpPeer("127.0.0.20", peer_port)
    slow = None
    try:
        submit(org, "sender@domain.com", ["kate@slow.example"], b"Subject: to the slow one\r\n\r\nx\r\n")
        wait_for(lambda: stalling.connections, message="a connection to the hung host")
        submit(org, "sender@domain.com", ["joe@fast.example"], b"Subject: to the fast one\r\n\r\nx\r\n")
        assert wait_for(lambda: fast.received, timeout=10, message="the other next hop served meanwhile")[0] \
            .rcpt_tos == ["joe@fast.example"]
        queue = wait_for(lambda: retrying(home, "slow.example"), timeout=30, message="the hung next hop's queue in Retry")
        assert queue["MessageCount"] == "1" and "LED=4" in queue["LastError"], queue     # transient: no NDR
        assert "timed out" in queue["LastError"] and "mx.slow.example" in queue["LastError"], queue
        stalling.stop()
        slow = SmtpPeer("127.0.0.21", peer_port)
        got = wait_for(lambda: slow.received, timeout=60, message="delivery once the host answers")[0]
        assert got.rcpt_tos == ["kate@slow.example"] and not ndrs(home)
    finally:
        stalling.stop()
        fast.stop()
        if slow:
            slow.stop()


def test_error_policies_downgrade_dns_failures_keeps_mail_for_a_domain_dns_does_not_know(home, org, dns_server,
                                                                                          peer_port):
    """A nonexistent domain is an NDR by default; with -ErrorPolicies DowngradeDnsFailures the connector
    treats every DNS error as transient, and the message goes out once the domain resolves."""
    peer = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["a@unknown.example"], b"Subject: default policy\r\n\r\nx\r\n")
        ndr = wait_for(lambda: ndrs(home), message="the NDR for a nonexistent domain")[0]
        assert "5.4.4" in str(ndr.get_payload()[1])
        assert shell(home, "Set-SendConnector Outbound -ErrorPolicies DowngradeDnsFailures,DowngradeCustomFailures").ok
        synced(home)
        submit(org, "sender@domain.com", ["b@later.example"], b"Subject: downgraded\r\n\r\nx\r\n")
        queue = wait_for(lambda: retrying(home, "later.example"), timeout=30, message="the queue in Retry")
        assert "5.4.4" in queue["LastError"] and queue["MessageCount"] == "1"
        time.sleep(2)                                            # retried meanwhile (1 s interval): no NDR
        assert len(ndrs(home)) == 1 and not peer.received
        dns_server.add("later.example", "A", "127.0.0.20")
        assert wait_for(lambda: peer.received, timeout=30)[0].rcpt_tos == ["b@later.example"]
        assert len(ndrs(home)) == 1
    finally:
        peer.stop()


def test_organisation_headers_leave_only_over_internal_connectors(home, org, dns_server, peer_port):
    """The outbound header firewall: X-MS-Exchange-Organization-* (and -Forest-*) go only to the organisation's
    own servers — over an Internet connector they are removed from small, segment and spooled bodies alike,
    over an Internal one they stay; the rest of the message is sent byte for byte."""
    dns_server.add("remote.example", "MX", "10 mx1.remote.example.")
    dns_server.add("mx1.remote.example", "A", "127.0.0.20")
    internet, internal = SmtpPeer("127.0.0.20", peer_port), SmtpPeer("127.0.0.23", peer_port)
    try:
        assert shell(home, f"New-SendConnector ToBranch -Usage Internal -AddressSpaces branch.example "
                           f"-SmartHosts 127.0.0.23 -Port {peer_port} -DNSRoutingEnabled $false").ok
        synced(home)
        forest = b"X-MS-Exchange-Forest-RulesExecuted: kept\r\n"   # trusted only from the organisation's servers
        for n, size in enumerate((100, 100_000, 1_500_000)):       # in the row, in a segment, spooled to a file
            text = b"".join(b"line %d X-MS-Exchange-Organization-AuthAs: in the body\r\n" % i for i in range(size // 48))
            body = b"Subject: size %d\r\nX-Mailer: app\r\n\r\n" % n + text
            submit(org, "sender@domain.com", ["kate@remote.example", "bo@branch.example"], forest + body)
            out = wait_for(lambda: len(internet.received) > n and internet.received[n], message="the Internet copy")
            kept = wait_for(lambda: len(internal.received) > n and internal.received[n], message="the Internal copy")
            head, _, rest = out.data.partition(b"\r\n\r\n")
            assert b"x-ms-exchange-" not in head.lower(), head
            assert rest == text and b"X-Mailer: app" in head and b"X-Source: SMTP:EX01\\Relay" in head
            kept_head = kept.data.partition(b"\r\n\r\n")[0]
            assert b"X-MS-Exchange-Organization-AuthAs: Anonymous" in kept_head, kept_head
            assert b"X-MS-Exchange-Organization-Network-Message-Id:" in kept_head
            assert kept.data.endswith(text) and len(kept.data) > len(out.data)
    finally:
        internet.stop()
        internal.stop()


def test_an_mx_with_only_an_ipv6_address_is_reached_over_ipv6(home, org, dns_server, peer_port):
    dns_server.add("six.example", "MX", "10 mx6.six.example.")
    dns_server.add("mx6.six.example", "AAAA", "::1")
    peer = SmtpPeer("::1", peer_port)
    try:
        submit(org, "sender@domain.com", ["ann@six.example"], b"Subject: over v6\r\n\r\nhello\r\n")
        got = wait_for(lambda: peer.received, message="delivery to the IPv6 MX")[0]
        assert got.rcpt_tos == ["ann@six.example"] and b"Subject: over v6" in got.data
        queue = shell(home, "Get-Queue six.example | fl NextHopDomain,MessageCount,LastError").out
        assert "NextHopDomain : six.example" in queue and "LastError     :" in queue, queue
    finally:
        peer.stop()


def test_ndrs_with_a_monitored_code_are_copied_to_the_exchange_recipients_reply_recipient(home, org, dns_server,
                                                                                          peer_port):
    """GenerateCopyOfDSNFor (5.4.4 among its defaults): an NDR with such a code also goes to the mailbox that
    Set-OrganizationConfig makes the Microsoft Exchange recipient's reply recipient; without one the copies are
    discarded, as in Exchange, and NDRs with other codes are never copied."""
    dns_server.add("remote.example", "A", "127.0.0.20")
    peer = SmtpPeer("127.0.0.20", peer_port)
    peer.rcpt_reply = lambda address: "550 5.1.1 User unknown" if address.startswith("bad@") else None

    def copies() -> list[email.message.Message]:
        return [email.message_from_bytes(m) for m in maildir_messages(home, "ndr@domain.com")]

    try:
        assert shell(home, "New-Mailbox -Name 'NDR Monitor' -PrimarySmtpAddress ndr@domain.com").ok
        synced(home)
        submit(org, "sender@domain.com", ["a@nowhere.example"], b"Subject: no reply recipient\r\n\r\nx\r\n")
        wait_for(lambda: len(ndrs(home)) == 1, message="the first NDR")

        r = shell(home, "Set-OrganizationConfig -MicrosoftExchangeRecipientReplyRecipient 'NDR Monitor'")
        assert r.ok, r.err
        synced(home)
        submit(org, "sender@domain.com", ["b@nowhere.example"], b"Subject: copied\r\n\r\nx\r\n")
        copy = wait_for(copies, message="the copy of the 5.4.4 NDR")[0]
        assert copy["Subject"] == "Undeliverable: copied" and "Status: 5.4.4" in str(copy.get_payload()[1])
        assert copy["To"] and "sender@domain.com" in copy["To"]          # the same report the sender gets
        wait_for(lambda: len(ndrs(home)) == 2, message="the sender's NDR")

        submit(org, "sender@domain.com", ["bad@remote.example"], b"Subject: not monitored\r\n\r\nx\r\n")
        wait_for(lambda: len(ndrs(home)) == 3, message="the 5.1.1 NDR")
        assert shell(home, 'Set-TransportConfig -GenerateCopyOfDSNFor @{Add="5.1.1"}').ok
        synced(home)
        submit(org, "sender@domain.com", ["bad@remote.example"], b"Subject: now monitored\r\n\r\nx\r\n")
        wait_for(lambda: len(ndrs(home)) == 4, message="the second 5.1.1 NDR")
        wait_for(lambda: len(copies()) == 2, message="the copy of the 5.1.1 NDR")
        assert sorted(m["Subject"] for m in copies()) == ["Undeliverable: copied", "Undeliverable: now monitored"]
    finally:
        peer.stop()


def test_mail_to_the_microsoft_exchange_recipient_goes_to_its_reply_recipient(home, org):
    """The address Get-OrganizationConfig shows for the Microsoft Exchange recipient takes mail once a reply
    recipient is set, and delivers it there; before that it is an unknown recipient."""
    shown = shell(home, "(Get-OrganizationConfig).MicrosoftExchangeRecipientPrimarySmtpAddress")
    address = shown.out.strip()
    assert address.lower() == "microsoftexchange329e71ec88ae4615bbc36ab6ce41109e@domain.com", shown
    with smtplib.SMTP("127.0.0.1", org.ports["frontend"], source_address=(RELAY_SOURCE, 0), timeout=30) as c:
        c.ehlo("app.local")
        c.mail("sender@domain.com")
        assert c.rcpt(address)[0] == 550
    assert shell(home, "New-Mailbox -Name Postmaster -PrimarySmtpAddress pm@domain.com\n"
                       "Set-OrganizationConfig -MicrosoftExchangeRecipientReplyRecipient Postmaster").ok
    synced(home)
    submit(org, "sender@domain.com", [address], b"Subject: to the exchange recipient\r\n\r\nx\r\n")
    got = wait_for(lambda: maildir_messages(home, "pm@domain.com"), message="delivered to the reply recipient")
    assert b"Subject: to the exchange recipient" in got[0]


@pytest.mark.parametrize("mode", ["trickle", "deaf"])
def test_a_next_hop_that_trickles_or_stops_reading_is_given_up_after_the_inactivity_timeout(
        home, org, dns_server, peer_port, mode):
    """A greeting sent a byte at a time (each read resets a per-read timer), or a peer that stops reading in
    the middle of a 6 MB body (the write waits for window): each attempt ends after ConnectionInactivityTimeOut
    and the message waits in Retry with a transient error, no NDR."""
    from peers import DeafPeer

    dns_server.add("slow.example", "A", "127.0.0.21")
    assert shell(home, "Set-SendConnector Outbound -ConnectionInactivityTimeOut 00:00:02\n"
                       "Set-TransportService EX01 -TransientFailureRetryInterval 00:01:00").ok   # stays in Retry
    synced(home)
    peer = DeafPeer("127.0.0.21", peer_port, mode)
    try:
        body = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * (6_000_000 // 1000)
        submit(org, "sender@domain.com", ["kate@slow.example"], body)
        started = time.monotonic()
        queue = wait_for(lambda: retrying(home, "slow.example"), timeout=30, message="the queue in Retry")
        assert time.monotonic() - started < 20
        assert queue["MessageCount"] == "1" and "LED=4" in queue["LastError"] and "timed out" in queue["LastError"], queue
        if mode == "deaf":
            assert peer.data_started.is_set()
        assert not ndrs(home)
    finally:
        peer.stop()


@pytest.mark.parametrize("mode", ["babble", "junk"])
def test_a_next_hop_that_is_not_an_smtp_server_or_never_ends_its_reply_defers_the_mail(
        home, org, dns_server, peer_port, mode):
    """A next hop that answers EHLO with a reply that never ends (40 MB of "250-" lines), or that isn't an SMTP
    server at all (an HTTP error for a greeting): the attempt ends at once as a protocol error, without reading
    the flood, and the message waits in Retry with a transient error, no NDR; mail for another next hop flows."""
    from peers import DeafPeer

    dns_server.add("odd.example", "A", "127.0.0.21")
    dns_server.add("fine.example", "A", "127.0.0.20")
    assert shell(home, "Set-TransportService EX01 -TransientFailureRetryInterval 00:01:00").ok   # stays in Retry
    synced(home)
    odd = DeafPeer("127.0.0.21", peer_port, mode)
    fine = SmtpPeer("127.0.0.20", peer_port)
    try:
        submit(org, "sender@domain.com", ["kate@odd.example"], b"Subject: to the odd one\r\n\r\nx\r\n")
        started = time.monotonic()
        queue = wait_for(lambda: retrying(home, "odd.example"), timeout=30, message="the queue in Retry")
        assert time.monotonic() - started < 10   # not the inactivity timeout: the reply itself is refused
        assert queue["MessageCount"] == "1" and "LED=4" in queue["LastError"], queue
        assert ("too many reply lines" if mode == "babble" else "not an SMTP reply") in queue["LastError"], queue
        submit(org, "sender@domain.com", ["joe@fine.example"], b"Subject: to the fine one\r\n\r\nx\r\n")
        assert wait_for(lambda: fine.received, message="the other next hop served")[0].rcpt_tos == ["joe@fine.example"]
        assert not ndrs(home)
    finally:
        odd.stop()
        fine.stop()
