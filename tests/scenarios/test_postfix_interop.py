"""Interoperation with a real Postfix both ways over STARTTLS, and swaks against each connector."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess

import pytest
import trustme
from helpers import Server, free_port, maildir_messages, protocol_log, shell, synced, tracking_events, wait_for
from postfix import Postfix, available

pytestmark = pytest.mark.skipif(not available(), reason="Postfix (installed by `make test`) and root are needed")


def test_postfix_relays_to_mailgate_over_mandatory_starttls(home, server, tmp_path):
    shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com")
    synced(home)
    port = free_port("127.0.0.50")
    pf = Postfix(tmp_path / "pf", "127.0.0.50", port, smtp_tls="encrypt",
                 transports={"domain.com": f"smtp:[127.0.0.1]:{server.ports['frontend']}"}).start()
    try:
        with smtplib.SMTP("127.0.0.50", port, timeout=30) as c:
            assert c.sendmail("alice@postfix.test", ["admin@domain.com"], b"Subject: from postfix\r\n\r\nhi\r\n") == {}
        msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"), timeout=60,
                       message="Postfix's delivery to mailgate")[0].replace(b"\r\n\t", b" ")
        assert b"Subject: from postfix" in msg
        assert re.search(rb"Received: from mx\.postfix\.test \(127\.0\.0\.1\) by ex01\.domain\.com .* with ESMTPS "
                         rb"\(version=TLSv1\.[23]", msg)
        assert "TLS connection established to 127.0.0.1" in pf.log_text()
    finally:
        pf.stop()


def test_mailgate_relays_to_postfix_with_require_tls(home, ports, tmp_path):
    ca = trustme.CA()
    ca.issue_cert("mx.postfix.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "pf.pem"))
    port = free_port("127.0.0.51")
    pf = Postfix(tmp_path / "pf", "127.0.0.51", port, tls_cert=(tmp_path / "pf.pem", tmp_path / "pf.pem")).start()
    r = shell(home, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges 127.0.0.2 -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-SendConnector ToPostfix -AddressSpaces postfix.test -SmartHosts 127.0.0.51 -Port {port} -RequireTLS $true
''', runtime=None)
    assert r.ok, r.err
    srv = Server(home).start()
    try:
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=("127.0.0.2", 0), timeout=30) as c:
            assert c.sendmail("app@domain.com", ["alice@postfix.test"], b"Subject: to postfix\r\n\r\nhello\r\n") == {}
        got = wait_for(lambda: pf.mailbox("alice"), timeout=60, message="delivery into Postfix")[0]
        assert b"Subject: to postfix" in got and b"X-Source: SMTP:EX01\\Relay" in got
        log = pf.log_text()
        assert "TLS connection established from" in log and "TLSv1." in log
    finally:
        srv.stop()
        pf.stop()


def test_mailgate_sends_bdat_to_postfix_and_resets_after_a_refused_transaction(home, ports, tmp_path):
    """Postfix offers CHUNKING and PIPELINING: mailgate sends each message as MAIL, RCPT, BDAT LAST and the
    body in one go, unstuffed. A message whose only recipient Postfix refuses leaves the transaction open
    (the chunk is consumed and refused), so the next message on that connection starts with RSET."""
    port = free_port("127.0.0.54")
    pf = Postfix(tmp_path / "pf", "127.0.0.54", port).start()
    r = shell(home, f'''
New-Mailbox -Name Sender -PrimarySmtpAddress app@domain.com
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges 127.0.0.2 -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-SendConnector ToPostfix -AddressSpaces postfix.test -SmartHosts 127.0.0.54 -Port {port} -ProtocolLoggingLevel Verbose
''', runtime=None)
    assert r.ok, r.err
    srv = Server(home).start()
    body = b"Subject: chunked\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"
    try:
        # One client session: both messages land in one worker's queue and leave over one connection.
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=("127.0.0.2", 0), timeout=30) as c:
            assert c.sendmail("app@domain.com", ["nobody@postfix.test"], b"Subject: refused\r\n\r\nx\r\n") == {}
            assert c.sendmail("app@domain.com", ["alice@postfix.test"], body) == {}
        got = wait_for(lambda: pf.mailbox("alice"), timeout=60, message="delivery into Postfix")[0]
        assert b"\n.leading dot\n..two dots\n.\nafter a lone dot\n" in got.replace(b"\r\n", b"\n")
        ndr = wait_for(lambda: maildir_messages(home, "app@domain.com"), timeout=60, message="the NDR")[0]
        assert b"Undeliverable: refused" in ndr and b"5.1.1" in ndr

        def sent_commands() -> list[str]:
            sent = "".join(p.read_text() for p in (home.log_dir / "ProtocolLog" / "SmtpSend").glob("SEND*.LOG"))
            commands = [line.split(",")[7] for line in sent.splitlines() if ",>," in line]
            return commands if "RCPT TO:<alice@postfix.test>" in commands else []

        commands = wait_for(sent_commands, message="the send protocol log")   # it is written in batches
        assert any(re.fullmatch(r"BDAT \d+ LAST", c) for c in commands) and "DATA" not in commands
        refused_at = next(i for i, c in enumerate(commands) if c == "RCPT TO:<nobody@postfix.test>")
        assert commands.index("RCPT TO:<alice@postfix.test>") > commands.index("RSET", refused_at)
        assert "RSET" not in commands[:refused_at]
    finally:
        srv.stop()
        pf.stop()


def test_recipients_beyond_postfixs_limit_go_in_further_transactions_at_once(home, ports, tmp_path):
    """Postfix with smtpd_recipient_limit 2 answers "452 4.5.3 Error: too many recipients" to the third RCPT of a
    transaction. mailgate sends those recipients in further transactions on the same connection (RFC 5321
    4.5.3.1.10), not after MessageRetryInterval (ten minutes here): every mailbox has the message at once, and
    the tracking log has one SEND for the five recipients and no DEFER."""
    port = free_port("127.0.0.56")
    boxes = tuple(f"user{n}" for n in range(5))
    pf = Postfix(tmp_path / "pf", "127.0.0.56", port, mailboxes=boxes, extra={"smtpd_recipient_limit": "2"}).start()
    r = shell(home, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges 127.0.0.2 -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-SendConnector ToPostfix -AddressSpaces postfix.test -SmartHosts 127.0.0.56 -Port {port} -ProtocolLoggingLevel Verbose
Set-TransportService EX01 -MessageRetryInterval 00:10:00
''', runtime=None)
    assert r.ok, r.err
    srv = Server(home).start()
    try:
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=("127.0.0.2", 0), timeout=30) as c:
            assert c.sendmail("app@domain.com", [f"{b}@postfix.test" for b in boxes],
                              b"Subject: to five\r\n\r\nhello\r\n") == {}
        wait_for(lambda: all(pf.mailbox(b) for b in boxes), timeout=60, message="the message in all five mailboxes")
        assert all(len(pf.mailbox(b)) == 1 for b in boxes)
        # The limit was met: Postfix refused three RCPTs, then one, and one connection carried it all.
        log = protocol_log(home, "Send", until=["452 4.5.3"])
        assert log.count("452 4.5.3 Error: too many recipients") == 4 and log.count("MAIL FROM:<app@domain.com>") == 3
        assert log.count("EHLO ") == 1
        events = tracking_events(home, "-Sender app@domain.com", until=["RECEIVE", "SEND"])
        assert events == ["RECEIVE", "SEND"]   # the message's outcomes are recorded once, no recipient deferred
        count = shell(home, "Get-MessageTrackingLog -EventId SEND | ForEach-Object { $_.RecipientCount }").out.split()
        assert count == ["5"]
        assert shell(home, "(Get-Queue | Measure-Object -Property MessageCount -Sum).Sum").out.strip() == "0"
    finally:
        srv.stop()
        pf.stop()


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by `make test`")
def test_swaks_against_each_connector(home, server):
    r = shell(home, f'''
New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com -Password (ConvertTo-SecureString "Adm1n!pass" -AsPlainText -Force)
New-ReceiveConnector InternalRelay -Bindings 127.0.0.1:{server.ports["frontend"]} -RemoteIPRanges 127.0.0.0/29 `
    -Usage Custom -PermissionGroups AnonymousUsers -RequireTLS $true -TarpitInterval 00:00:00
''')
    assert r.ok, r.err
    synced(home)

    def swaks(*args: str) -> str:
        out = subprocess.run(["swaks", "--server", "127.0.0.1", "--helo", "client.example", "--from",
                              "s@client.example", *args], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    fe, cl = str(server.ports["frontend"]), str(server.ports["client"])
    # Default Frontend (client outside 127.0.0.0/29): anonymous mail to a mailbox.
    out = swaks("--port", fe, "--to", "admin@domain.com", "--local-interface", "127.0.0.20")
    assert re.search(r"<-\s+250 2\.6\.0", out), out
    # Client Frontend: STARTTLS then AUTH with the mailbox's password.
    out = swaks("--port", cl, "--to", "x@remote.example", "--tls", "--auth", "LOGIN", "--auth-user", "admin",
                "--auth-password", "Adm1n!pass", "--from", "admin@domain.com")
    assert re.search(r"<~\s+235 2\.7\.0 Authentication successful", out) and re.search(r"<~\s+250 2\.6\.0", out), out
    # InternalRelay (client inside the range): refuses mail without TLS, takes it with TLS.
    out = swaks("--port", fe, "--to", "admin@domain.com", "--local-interface", "127.0.0.3")
    assert re.search(r"<\*\*\s+530 5\.7\.0 Must issue a STARTTLS command first", out), out
    out = swaks("--port", fe, "--to", "admin@domain.com", "--local-interface", "127.0.0.3", "--tls")
    assert re.search(r"<~\s+250 2\.6\.0", out), out
    wait_for(lambda: len(maildir_messages(home, "admin@domain.com")) == 2)


def test_domain_security_with_postfix_both_ways(home, ports, tmp_path):
    """Mutual TLS between mailgate (domain.com) and a Postfix partner (postfix.test), each side requiring and
    verifying the other's certificate; a side without a valid certificate is refused both ways."""
    from peers import DnsServer

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("mx.postfix.test", "postfix.test").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "pf.pem"))
    ca.issue_cert("ex01.domain.com", "domain.com").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "ex01.pem"))
    dns = DnsServer()
    dns.add("postfix.test", "MX", "10 mx.postfix.test.")
    dns.add("mx.postfix.test", "A", "127.0.0.52")
    pf_port, partner_port = free_port("127.0.0.52"), free_port("127.0.0.42")
    pem = str(tmp_path / "pf.pem")
    postfix_tls = {
        # as a server: TLS required, and a client certificate signed by the partners' CA
        "smtpd_tls_cert_file": pem, "smtpd_tls_key_file": pem, "smtpd_tls_security_level": "encrypt",
        "smtpd_tls_ask_ccert": "yes", "smtpd_tls_req_ccert": "yes", "smtpd_tls_CAfile": str(tmp_path / "ca.pem"),
        # as a client: TLS required, presenting its certificate
        "smtp_tls_cert_file": pem, "smtp_tls_key_file": pem, "smtp_tls_CAfile": str(tmp_path / "ca.pem")}
    r = shell(home, f'''
$c = Import-ExchangeCertificate -FileName "{tmp_path / "ex01.pem"}"
Enable-ExchangeCertificate -Thumbprint $c.Thumbprint -Services SMTP -Force
Import-ExchangeCertificate -FileName "{tmp_path / "ca.pem"}"
New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges 127.0.0.2 -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-ReceiveConnector FromPartners -Partner -Bindings 127.0.0.42:{partner_port} -RemoteIPRanges 127.0.0.0/8 `
    -DomainSecureEnabled $true -TarpitInterval 00:00:00
New-SendConnector ToPartner -AddressSpaces postfix.test -Partner -Port {pf_port}
Set-TransportService EX01 -InternalDNSServers {dns.address} -TransientFailureRetryInterval 00:00:01 -MessageRetryInterval 00:00:01
Set-TransportConfig -TLSSendDomainSecureList postfix.test -TLSReceiveDomainSecureList postfix.test
''', runtime=None)
    assert r.ok, r.err
    partner = Postfix(tmp_path / "pf", "127.0.0.52", pf_port, smtp_tls="encrypt", extra=postfix_tls,
                      transports={"domain.com": f"smtp:[127.0.0.42]:{partner_port}"}).start()
    no_cert = Postfix(tmp_path / "nocert", "127.0.0.53", free_port("127.0.0.53"), smtp_tls="encrypt",
                      transports={"domain.com": f"smtp:[127.0.0.42]:{partner_port}"}).start()
    srv = Server(home).start()
    try:
        # mailgate → Postfix: Postfix accepts only because mailgate presented a certificate it trusts.
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=("127.0.0.2", 0), timeout=30) as c:
            assert c.sendmail("app@domain.com", ["alice@postfix.test"], b"Subject: secure out\r\n\r\nx\r\n") == {}
        got = wait_for(lambda: partner.mailbox("alice"), timeout=60, message="delivery into Postfix")[0]
        assert b"Subject: secure out" in got
        assert re.search(r"Trusted TLS connection established from \S+\[127\.0\.0\.1\]", partner.log_text())

        # Postfix → mailgate: accepted as the partner postfix.test (mail submitted to Postfix with its sendmail).
        subprocess.run(["sendmail", "-C", str(partner.config), "-f", "alice@postfix.test", "admin@domain.com"],
                       input=b"Subject: secure in\r\n\r\nfrom the partner\r\n", check=True, timeout=30)
        msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"), timeout=60,
                       message="the partner's delivery to mailgate")[0].replace(b"\r\n\t", b" ")
        assert b"Subject: secure in" in msg
        assert b"X-MS-Exchange-Organization-AuthAs: Partner" in msg
        assert b"X-MS-Exchange-Organization-AuthDomain: postfix.test" in msg

        # A Postfix without a client certificate is refused by the partner connector, and keeps its mail.
        subprocess.run(["sendmail", "-C", str(no_cert.config), "-f", "mallory@postfix.test", "admin@domain.com"],
                       input=b"Subject: spoofed\r\n\r\nx\r\n", check=True, timeout=30)
        wait_for(lambda: "4.7.5" in no_cert.log_text(), timeout=60, message="the refusal in Postfix's log")
        assert "Certificate validation failure" in no_cert.log_text()
        assert not no_cert.queue_empty()

        # mailgate presenting a certificate Postfix doesn't trust is refused: the queue retries, nothing arrives.
        r = shell(home, 'New-ExchangeCertificate -SubjectName "CN=ex01.domain.com" -DomainName domain.com -Services SMTP\n'
                        '$c = Get-ExchangeCertificate | Where-Object { $_.Subject -eq "CN=ex01.domain.com" }\n'
                        'Set-SendConnector ToPartner -TlsCertificateName "<I>$($c.Issuer)<S>$($c.Subject)"')
        assert r.ok, r.err
        synced(home)
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=("127.0.0.2", 0), timeout=30) as c:
            assert c.sendmail("app@domain.com", ["alice@postfix.test"], b"Subject: untrusted\r\n\r\nx\r\n") == {}

        def retrying() -> str:
            for block in shell(home, "Get-Queue | fl Identity,Status,LastError").out.split("\n\n"):
                if "postfix.test" in block and "Retry" in block:
                    return block
            return ""

        assert wait_for(retrying, timeout=60)
        assert len(partner.mailbox("alice")) == 1
        assert len(maildir_messages(home, "admin@domain.com")) == 1
    finally:
        srv.stop()
        partner.stop()
        no_cert.stop()
        dns.close()
