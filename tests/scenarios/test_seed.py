"""The user's document, section by section: its commands typed verbatim into
`mailgate shell` against a running `mailgate serve`, then proven with real traffic.

Tests may only use loopback, so each test separates out, after the document's
commands, the commands that map its addresses to 127.x (the "loopback mapping").
"""

from __future__ import annotations

import email
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
import seed
import trustme
from helpers import Server, bind_ports, cli, free_port, make_home, maildir_messages, protocol_log, shell, synced, tracking_events, wait_for
from peers import DnsServer, SmtpPeer
from postfix import Postfix, available

PRINTER = "127.0.0.2"      # inside InternalRelay's mapped range 127.0.0.0/29
LAPTOP = "127.0.0.9"       # outside it


class Organisation:
    """EX01 with accepted domain domain.com, served on loopback, with a test DNS server."""

    def __init__(self, tmp: Path) -> None:
        self.home = make_home(tmp / "EX01", server="EX01", domain="domain.com")
        self.ports = bind_ports(self.home)
        self.dns = DnsServer()
        r = shell(self.home, f"Set-TransportService EX01 -InternalDNSServers {self.dns.address} "
                             "-TransientFailureRetryInterval 00:00:01 -MessageRetryInterval 00:00:01\n"
                             "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com", runtime=None)
        assert r.ok, r.err
        self.server = Server(self.home).start()

    def type(self, text: str) -> subprocess.CompletedProcess[str]:
        """Type commands (and answers to prompts) into `mailgate shell`, line by line, as a user would."""
        return cli(self.home, "shell", stdin=text)

    def sections(self, *numbers: int, answers: str = "") -> subprocess.CompletedProcess[str]:
        result = self.type(seed.commands(*numbers).rstrip("\n") + "\n" + answers)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def map_internal_relay(self) -> None:
        # loopback mapping: the document's 0.0.0.0:25 and 192.168.0.0/24 become Default Frontend's port and 127.0.0.0/29
        r = self.type(f'Set-ReceiveConnector "InternalRelay" -Bindings 127.0.0.1:{self.ports["frontend"]} '
                      f'-RemoteIPRanges 127.0.0.0/29 -TarpitInterval 00:00:00')
        assert r.returncode == 0, r.stderr
        synced(self.home)

    def close(self) -> None:
        self.server.stop()
        self.dns.close()


@pytest.fixture
def org(tmp_path):
    o = Organisation(tmp_path)
    yield o
    o.close()


def client(org: Organisation, source: str) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", org.ports["frontend"], source_address=(source, 0), timeout=30)
    c.ehlo("device.local")
    return c


def tls(c: smtplib.SMTP) -> None:
    c.starttls(context=ssl._create_unverified_context())
    c.ehlo("device.local")


def test_section_1_receive_connectors(org):
    out = org.sections(1).stdout
    listing = out.split("\n\n")[0]
    assert "Default Frontend EX01" in listing and "Client Frontend EX01" in listing and "InternalRelay" not in listing
    org.map_internal_relay()
    shown = org.type("Get-ReceiveConnector | ft Name,Bindings,RemoteIPRanges").stdout
    assert "InternalRelay" in shown and "{127.0.0.0/29}" in shown
    # The printer, inside the range, gets InternalRelay: TLS required (the document's -RequireTLS $true).
    with client(org, PRINTER) as c:
        assert c.mail("scanner@domain.com") == (530, b"5.7.0 Must issue a STARTTLS command first")
        c.rset()
        tls(c)
        assert c.sendmail("scanner@domain.com", ["admin@domain.com"], b"Subject: scan\r\n\r\npage 1\r\n") == {}
        # Anonymous relay is not granted by the document's commands (AnonymousUsers only): refused.
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            c.sendmail("scanner@domain.com", ["someone@fabrikam.example"], b"Subject: out\r\n\r\nx\r\n")
        assert refused.value.recipients["someone@fabrikam.example"][0] == 550
        assert b"5.7.54" in refused.value.recipients["someone@fabrikam.example"][1]
    scan = wait_for(lambda: maildir_messages(org.home, "admin@domain.com"))[0]
    assert b"X-Source: SMTP:EX01\\InternalRelay" in scan and f"X-Source-IP: {PRINTER}".encode() in scan
    # Relay for the printer only once granted (Exchange's documented way).
    r = org.type('Get-ReceiveConnector "InternalRelay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                 '-ExtendedRights "Ms-Exch-SMTP-Accept-Any-Recipient"')
    assert r.returncode == 0, r.stderr
    synced(org.home)
    with client(org, PRINTER) as c:
        tls(c)
        assert c.sendmail("scanner@domain.com", ["someone@fabrikam.example"], b"Subject: out\r\n\r\nx\r\n") == {}
    # A laptop outside the range lands on Default Frontend and can't relay.
    with client(org, LAPTOP) as c:
        assert not c.has_extn("auth")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            c.sendmail("laptop@fabrikam.example", ["someone@fabrikam.example"], b"Subject: relay?\r\n\r\nx\r\n")
        assert b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain" in \
            refused.value.recipients["someone@fabrikam.example"][1]


def test_section_2_send_connectors(org, tmp_path):
    org.sections(1)
    out = org.sections(2, answers="relayuser\nrelay-secret\n")
    assert "User:" in out.stderr and "Password for user relayuser:" in out.stderr
    assert "OutboundInternet" in out.stdout and "SmartHost Connector" in out.stdout
    # loopback mapping: DNS for the remote domain and smtp.relay.com, and the peers' ports
    mx_port, relay_port = free_port("127.0.0.21"), free_port("127.0.0.22")
    org.dns.add("fabrikam.example", "MX", "10 mail.fabrikam.example.")
    org.dns.add("mail.fabrikam.example", "A", "127.0.0.21")
    org.dns.add("smtp.relay.com", "A", "127.0.0.22")
    org.map_internal_relay()
    r = org.type(f'Set-SendConnector "OutboundInternet" -Port {mx_port}\n'
                 f'Set-SendConnector "SmartHost Connector" -Port {relay_port}\n'
                 'Get-ReceiveConnector "InternalRelay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                 '-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient')
    assert r.returncode == 0, r.stderr
    synced(org.home)
    if available():
        mx = Postfix(tmp_path / "postfix", "127.0.0.21", mx_port, domain="fabrikam.example", mailboxes=("kate",)).start()
    else:
        pytest.skip("Postfix is installed by `make test`")
    relay = SmtpPeer("127.0.0.22", relay_port, auth={"relayuser": "relay-secret"})
    try:
        # OutboundInternet (DNS routing) wins the tie on "*" by name: delivered by MX to a real Postfix.
        with client(org, PRINTER) as c:
            tls(c)
            c.sendmail("scanner@domain.com", ["kate@fabrikam.example"], b"Subject: by mx\r\n\r\nhello kate\r\n")
        got = wait_for(lambda: mx.mailbox("kate"), timeout=30, message="Postfix delivery")[0]
        assert b"hello kate" in got and b"by mx" in got
        # With OutboundInternet off, the smart host connector sends through smtp.relay.com with the prompted credentials.
        org.type('Set-SendConnector "OutboundInternet" -Enabled $false')
        synced(org.home)
        with client(org, PRINTER) as c:
            tls(c)
            c.sendmail("scanner@domain.com", ["kate@fabrikam.example"], b"Subject: via isp\r\n\r\nx\r\n")
        via = wait_for(lambda: relay.received, timeout=30)[0]
        assert via.auth == "relayuser" and via.rcpt_tos == ["kate@fabrikam.example"]
    finally:
        relay.stop()
        mx.stop()


def test_section_3_tls_and_secure_routing(org, tmp_path):
    org.sections(1)
    org.sections(2, answers="relayuser\nrelay-secret\n")
    org.map_internal_relay()
    mx_port = free_port("127.0.0.23")
    org.dns.add("fabrikam.example", "MX", "10 mail.fabrikam.example.")
    org.dns.add("mail.fabrikam.example", "A", "127.0.0.23")
    r = org.type(f'Set-SendConnector "OutboundInternet" -Port {mx_port}\n'
                 'Get-ReceiveConnector "InternalRelay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                 '-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient')
    assert r.returncode == 0
    org.sections(3)
    synced(org.home)
    shown = org.type('Get-SendConnector "OutboundInternet" | fl RequireTLS').stdout
    assert "RequireTLS : True" in shown
    # Plaintext to the relay connector fails the way Exchange fails it; TLS succeeds.
    with client(org, PRINTER) as c:
        assert c.mail("scanner@domain.com") == (530, b"5.7.0 Must issue a STARTTLS command first")
    plain_peer = SmtpPeer("127.0.0.23", mx_port)      # offers no STARTTLS
    try:
        with client(org, PRINTER) as c:
            tls(c)
            c.sendmail("scanner@domain.com", ["kate@fabrikam.example"], b"Subject: secret\r\n\r\nconfidential\r\n")
        retry = wait_for(lambda: [b for b in org.type("Get-Queue | fl Identity,Status,LastError").stdout.split("\n\n")
                                  if "fabrikam.example" in b and "Retry" in b], timeout=30)
        assert "451 5.7.3 STARTTLS is required to send mail" in retry[0]
        assert not plain_peer.received
    finally:
        plain_peer.stop()
    ca = trustme.CA()
    ca.issue_cert("mail.fabrikam.example").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mx.pem"))
    if not available():
        pytest.skip("Postfix is installed by `make test`")
    mx = Postfix(tmp_path / "postfix", "127.0.0.23", mx_port, domain="fabrikam.example", mailboxes=("kate",),
                 tls_cert=(tmp_path / "mx.pem", tmp_path / "mx.pem")).start()
    try:
        assert org.type("Retry-Queue EX01\\fabrikam.example").returncode == 0
        got = wait_for(lambda: mx.mailbox("kate"), timeout=30)[0]
        assert b"confidential" in got
        assert "Anonymous TLS connection established" in mx.log_text() or "TLS connection established" in mx.log_text()
    finally:
        mx.stop()


def test_section_4_mail_flow_testing(org):
    result = org.sections(4)
    block = [b for b in result.stdout.split("\n\n") if "TestMailflowResult" in b][0]
    row = block.strip().splitlines()[2].split()
    assert row[0] == "Success" and row[1].startswith("00:00:") and row[2] == "True"  # -TargetEmailAddress: remote
    events = tracking_events(org.home, '-Recipients "admin@domain.com"', until=["RECEIVE", "SUBMIT", "DELIVER"])
    assert events == ["RECEIVE", "SUBMIT", "DELIVER"]
    again = org.type(seed.sections()[4][1]).stdout
    assert "RECEIVE" in again and "SUBMIT" in again and "DELIVER" in again and "STOREDRIVER" in again
    probe = maildir_messages(org.home, "admin@domain.com")[0]
    assert b"Subject: Test-Mailflow " in probe and b"This is a Test-Mailflow probe message" in probe


def test_section_5_mail_queue_monitoring(org):
    org.sections(1)
    org.sections(2, answers="relayuser\nrelay-secret\n")
    org.map_internal_relay()
    org.type('Get-ReceiveConnector "InternalRelay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
             '-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient\n'
             f'Set-SendConnector "OutboundInternet" -Port {free_port("127.0.0.24")}\n'
             # The organisation retries every second; the queue must stay in Retry while section 5 looks at it.
             'Set-TransportService EX01 -TransientFailureRetryInterval 00:10:00')
    org.dns.add("fabrikam.example", "MX", "10 mail.fabrikam.example.")
    org.dns.add("mail.fabrikam.example", "A", "127.0.0.24")    # that peer is down
    synced(org.home)
    with client(org, PRINTER) as c:
        tls(c)
        c.sendmail("scanner@domain.com", ["kate@fabrikam.example"], b"Subject: held for a down peer\r\n\r\nx\r\n")
    wait_for(lambda: "Retry" in org.type("Get-Queue").stdout, timeout=30)
    out = org.sections(5).stdout
    queue_lines = [line for line in out.splitlines() if line.startswith("EX01\\")]
    held = [line for line in queue_lines if "fabrikam.example" in line][0]
    assert "DnsConnectorDelivery" in held and "Retry" in held and " 1 " in held
    assert any(line.startswith("EX01\\Submission") for line in queue_lines)
    messages = org.type("Get-Message | fl Identity,FromAddress,Status,Queue,Subject,LastError").stdout
    assert "held for a down peer" in messages and "Status      : Retry" in messages and "441 4.4.1" in messages
    # A message in Submission shows there (the categoriser is held to show it).
    org.type("Suspend-Queue EX01\\Submission")
    with client(org, PRINTER) as c:
        tls(c)
        c.sendmail("scanner@domain.com", ["admin@domain.com"], b"Subject: waiting in submission\r\n\r\nx\r\n")
    out = org.type(seed.sections()[5][0]).stdout
    assert "waiting in submission" in out and "EX01\\Submission\\" in out
    # As in Exchange, no message is removed from Submission: refused with the way out, and the message stays.
    refused = org.type("Get-Message -Queue EX01\\Submission | Remove-Message -WithNDR $false -Confirm:$false")
    assert refused.returncode != 0 and "Submission queue can't be removed" in refused.stderr
    assert "waiting in submission" in org.type(seed.sections()[5][0]).stdout
    org.type("Resume-Queue EX01\\Submission")
    wait_for(lambda: maildir_messages(org.home, "admin@domain.com"), timeout=30)


def test_section_6_best_practices(org):
    org.sections(1)
    org.sections(2, answers="relayuser\nrelay-secret\n")
    org.sections(3)
    org.map_internal_relay()
    # Enable logging and review X-Source headers for auditing.
    r = org.type('Set-ReceiveConnector "InternalRelay" -ProtocolLoggingLevel Verbose')
    assert r.returncode == 0
    synced(org.home)
    with client(org, LAPTOP) as c:   # no anonymous relay on the internet-facing connector
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("x@fabrikam.example", ["y@fabrikam.example"], b"x")
    with client(org, PRINTER) as c:
        tls(c)
        c.sendmail("scanner@domain.com", ["admin@domain.com"], b"Subject: audited\r\n\r\nx\r\n")
    msg = email.message_from_bytes(wait_for(lambda: maildir_messages(org.home, "admin@domain.com"))[0])
    assert msg["X-Source"] == "SMTP:EX01\\InternalRelay" and msg["X-Source-IP"] == PRINTER
    assert msg["X-Source-Auth"] == "anonymous" and msg["X-MS-Exchange-Organization-AuthAs"] == "Anonymous"
    assert msg["X-Source-TLS"].startswith("TLSv1.")

    def relay_lines() -> list[str]:
        log = protocol_log(org.home, "Receive", until=[])
        lines = [line for line in log.splitlines() if ",EX01\\InternalRelay," in line]
        return lines if any("250 2.6.0" in line for line in lines) else []

    assert any("STARTTLS" in line for line in wait_for(relay_lines, message="the relay's session in the log"))
    # Regularly test connectors and queue performance.
    assert "Success" in org.type("Test-SmtpConnectivity").stdout
    report = org.type("Test-MailflowBestPractice | ft Severity,Object,Rule")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "Error" not in "".join(line.split()[0] for line in report.stdout.splitlines()[3:] if line.strip())
