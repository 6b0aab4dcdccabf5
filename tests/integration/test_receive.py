"""Receive connectors on loopback with real clients (smtplib, aiosmtplib, swaks)."""

from __future__ import annotations

import asyncio
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import aiosmtplib
import pytest
from helpers import (PeakRss, Server, free_port, maildir_messages, server_rss_kb, shell, synced, tracking_events,
                     wait_for)

from mailgate.receive.pickup import POLL_SECONDS


def unverified() -> ssl.SSLContext:
    return ssl._create_unverified_context()


def smtp(port: int, source: str = "127.0.0.1", timeout: float = 20) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=timeout)


def test_two_connectors_on_one_port_chosen_by_source_address(home, server):
    port = server.ports["frontend"]
    r = shell(home, f'New-ReceiveConnector -Name InternalRelay -Bindings 127.0.0.1:{port} -RemoteIPRanges 127.0.0.0/29 '
                    f'-Usage Custom -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00 -Banner "220 relay ready"\n'
                    'Get-ReceiveConnector InternalRelay | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                    '-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient')
    assert r.ok, r.err

    def banner_from(source: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
            return s.recv(200)

    synced(home)
    assert banner_from("127.0.0.2").startswith(b"220 relay ready")
    # Inside 127.0.0.0/29: the relay connector, which may relay.
    with smtp(port, "127.0.0.2") as c:
        c.ehlo("printer.local")
        assert c.sendmail("printer@domain.com", ["someone@remote.example"], b"Subject: scan\r\n\r\nscan\r\n") == {}
    # Outside it: Default Frontend, which refuses to relay but takes mail for the organisation.
    assert banner_from("127.0.0.9").startswith(b"220 ex01.domain.com")
    with smtp(port, "127.0.0.9") as c:
        c.ehlo("laptop.local")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            c.sendmail("x@remote.example", ["someone@remote.example"], b"Subject: relay\r\n\r\nno\r\n")
        code, text = refused.value.recipients["someone@remote.example"]
        assert code == 550 and text.startswith(b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
        c.rset()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as unknown:
            c.sendmail("x@remote.example", ["nobody@domain.com"], b"x")
        assert unknown.value.recipients["nobody@domain.com"][1].startswith(b"5.1.10 RESOLVER.ADR.RecipientNotFound")
    queued = shell(home, "Get-Message | fl FromAddress,Queue,Subject")
    assert "printer@domain.com" in queued.out and "EX01\\Unreachable" in queued.out


def test_anonymous_mail_to_a_mailbox_is_delivered_with_audit_headers(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com')
    synced(home)
    forged = (b"X-MS-Exchange-Organization-AuthAs: Internal\r\nX-Source-Auth: ceo@domain.com\r\n"
              b"Subject: hello\r\nFrom: a@b.example\r\n\r\nbody\r\n")
    with smtp(server.ports["frontend"], "127.0.0.3") as c:
        c.ehlo("client.example")
        assert c.sendmail("a@b.example", ["ADMIN@domain.com"], forged) == {}
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"), message="delivery to the Maildir")[0]
    head = msg.split(b"\r\n\r\n", 1)[0].decode()
    assert "X-MS-Exchange-Organization-AuthAs: Anonymous" in head and "AuthAs: Internal" not in head
    assert "X-Source-Auth: anonymous" in head and "ceo@domain.com" not in head
    assert "X-Source: SMTP:EX01\\Default Frontend EX01" in head and "X-Source-IP: 127.0.0.3" in head
    assert head.startswith("Return-Path: <a@b.example>\r\nDelivered-To: ADMIN@domain.com\r\nReceived: from client.example")
    assert "Message-ID: <" in head  # added when the client sent none


def test_an_internationalised_domain_takes_mail_in_either_form(home, server):
    """A domain in Unicode reaches its mailboxes whether a sender writes it in A-labels (``xn--``, a sender
    without SMTPUTF8, or Postfix downgrading for one) or in U-labels with SMTPUTF8, whichever form the accepted
    domain and the mailbox were given in; an unknown name there is 550 5.1.10, not a relay refusal."""
    r = shell(home, '''New-AcceptedDomain -Name Buecher -DomainName "bücher.example"
New-Mailbox -Name Kate -PrimarySmtpAddress "kate@bücher.example"
New-AcceptedDomain -Name Mueller -DomainName xn--mller-kva.example
New-Mailbox -Name Lee -PrimarySmtpAddress lee@xn--mller-kva.example
New-Mailbox -Name Max -PrimarySmtpAddress max@müller.example''')
    assert r.ok, r.err
    # One domain, so one accepted domain and one owner per address, in either form.
    twice = shell(home, '''New-AcceptedDomain -Name Again -DomainName müller.example
New-Mailbox -Name Kate2 -PrimarySmtpAddress kate@xn--bcher-kva.example''')
    assert 'The domain müller.example is already the accepted domain "Mueller"' in twice.err
    assert 'The address kate@xn--bcher-kva.example is already used by mailbox "Kate"' in twice.err
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        c.ehlo("client.example")
        for rcpt, options in [("kate@xn--bcher-kva.example", []), ("KATE@XN--BCHER-KVA.EXAMPLE", []),
                              ("kate@bücher.example", ["SMTPUTF8"]), ("lee@müller.example", ["SMTPUTF8"]),
                              ("lee@xn--mller-kva.example", []), ("max@xn--mller-kva.example", [])]:
            assert c.sendmail("a@b.example", [rcpt], f"Subject: to {rcpt}\r\n\r\nx\r\n".encode(),
                              mail_options=options) == {}, rcpt
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            c.sendmail("a@b.example", ["nobody@xn--bcher-kva.example"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.recipients["nobody@xn--bcher-kva.example"][1].startswith(b"5.1.10")
    wait_for(lambda: len(maildir_messages(home, "kate@bücher.example")) == 3, message="Kate's three messages")
    wait_for(lambda: len(maildir_messages(home, "lee@xn--mller-kva.example")) == 2, message="Lee's two messages")
    wait_for(lambda: len(maildir_messages(home, "max@müller.example")) == 1, message="Max's message")
    # Message tracking finds Kate's three messages by her address in either form.
    for form in ("kate@bücher.example", "kate@xn--bcher-kva.example"):
        assert tracking_events(home, f'-Recipients "{form}" -EventId RECEIVE', until=["RECEIVE"] * 3).count(
            "RECEIVE") == 3, form


def test_audit_headers_are_each_clients_own(home, ports):
    """The audit headers are built once per client address and session state and kept by the connector's policy;
    with one worker every session meets the same cache: another client, the first over TLS, and the first again
    in plain text each get their own."""
    settings = home.path / "mailgate.toml"
    settings.write_text(settings.read_text().replace('workers = "auto"', "workers = 1"))
    assert "workers = 1" in settings.read_text()
    Server(home).start()
    shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com")
    synced(home)
    for n, (source, tls) in enumerate((("127.0.0.3", False), ("127.0.0.4", False), ("127.0.0.3", True),
                                       ("127.0.0.3", False))):
        with smtp(ports["frontend"], source) as c:
            c.ehlo("client.example")
            if tls:
                c.starttls(context=unverified())
                c.ehlo("client.example")
            assert c.sendmail("a@b.example", ["admin@domain.com"], f"Subject: message {n}\r\n\r\nbody\r\n") == {}
        msg = wait_for(lambda: [m for m in maildir_messages(home, "admin@domain.com")
                                if f"Subject: message {n}\r\n".encode() in m], message=f"message {n}")[0]
        head = msg.split(b"\r\n\r\n", 1)[0].decode()
        assert f"X-Source-IP: {source}\r\n" in head and f"OriginalClientIPAddress: {source}\r\n" in head, head
        assert ("X-Source-TLS: TLSv1." in head) is tls and ("X-Source-TLS: none" in head) is not tls, head


def test_send_mail_message_tries_a_connector_from_the_shell(home, server, tmp_path):
    """Windows PowerShell's Send-MailMessage, as administrators test a connector: the message arrives with its
    headers and attachment, a refusal quotes the server's reply, a recipient refused among others is reported
    while the others get the message, -UseSsl verifies the certificate, AUTH needs a connection that offers it."""
    shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com")
    synced(home)
    (tmp_path / "report.txt").write_text("queue report")
    port, client_port = server.ports["frontend"], server.ports["client"]
    sent = shell(home, f'$PSEmailServer = "127.0.0.1"\n'
                       f'Send-MailMessage -From printer@b.example -To admin@domain.com,nobody@domain.com -Subject '
                       f'"Relay test" -Body "<b>hi</b>" -BodyAsHtml -Port {port} -Priority High '
                       f'-DeliveryNotificationOption OnFailure -Attachments {tmp_path / "report.txt"}')
    assert not sent.ok and "RecipientNotFound" in sent.err and "(nobody@domain.com)" in sent.err
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"), message="the Send-MailMessage message")[0]
    head, body = msg.split(b"\r\n\r\n", 1)
    assert b"Subject: Relay test" in head and b"X-Priority: 1" in head and b"From: printer@b.example" in head
    assert b"Content-Type: text/html" in body and b'filename="report.txt"' in body
    relay = shell(home, f"Send-MailMessage -From a@b.example -To x@remote.example -Subject hi -SmtpServer 127.0.0.1 "
                        f"-Port {port}")
    assert not relay.ok and "The server response was: 550 5.7.54 SMTP; Unable to relay" in relay.err
    tls = shell(home, f"Send-MailMessage -From a@b.example -To admin@domain.com -Subject hi -SmtpServer 127.0.0.1 "
                      f"-Port {port} -UseSsl")
    assert not tls.ok and "The remote certificate is invalid" in tls.err
    # What administrators do for a self-signed certificate, as with .NET: a validation callback that says yes.
    trusted = shell(home, "[System.Net.ServicePointManager]::ServerCertificateValidationCallback = { $true }\n"
                          f"Send-MailMessage -From a@b.example -To admin@domain.com -Subject 'over tls' "
                          f"-SmtpServer 127.0.0.1 -Port {port} -UseSsl")
    assert trusted.ok, trusted.err
    over_tls = wait_for(lambda: [m for m in maildir_messages(home, "admin@domain.com") if b"over tls" in m])[0]
    assert b"X-Source-TLS: TLSv1." in over_tls
    auth = shell(home, f'Send-MailMessage -From a@b.example -To admin@domain.com -Subject hi -SmtpServer 127.0.0.1 '
                       f'-Port {client_port} -Credential (New-Object System.Management.Automation.PSCredential('
                       f'"kate", (ConvertTo-SecureString "x" -AsPlainText -Force)))')
    assert not auth.ok and "doesn't offer AUTH on this connection" in auth.err
    closed = shell(home, f"Send-MailMessage -From a@b.example -To admin@domain.com -Subject hi -SmtpServer 127.0.0.1 "
                         f"-Port {free_port('127.0.0.1')}")
    assert not closed.ok and "Unable to connect to the remote server" in closed.err
    ascii_only = shell(home, f"Send-MailMessage -From a@b.example -To admin@domain.com -Subject ascii -Body 'h\u00e9llo' "
                             f"-Encoding ASCII -SmtpServer 127.0.0.1 -Port {port}")
    assert ascii_only.ok, ascii_only.err   # what ASCII can't hold becomes "?", as in .NET
    assert b"h?llo" in wait_for(lambda: [m for m in maildir_messages(home, "admin@domain.com") if b"ascii" in m])[0]
    assert len(maildir_messages(home, "admin@domain.com")) == 3


def test_send_mail_message_refuses_line_breaks_and_non_addresses_before_sending(home, server):
    """A CR or LF in -Subject, -From, -To or an attachment's name would write a header or an SMTP command of its
    own: each is a clear error and nothing is sent, as is a server name that can't be one; a -To of several
    comma-separated addresses reaches all of them, as .NET's does."""
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n"
                       "New-Mailbox -Name Kim -PrimarySmtpAddress kim@domain.com").ok
    synced(home)
    send = f'Send-MailMessage -SmtpServer 127.0.0.1 -Port {server.ports["frontend"]} '
    attempts = {
        "-From a@b.example -To admin@domain.com -Subject \"hi`r`nBcc: kim@domain.com\"": "form required for a subject",
        "-From \"a@b.example`r`nRCPT TO:<kim@domain.com>\" -To admin@domain.com -Subject hi": "an e-mail address",
        "-From a@b.example -To \"admin@domain.com>`nDATA\" -Subject hi": "an e-mail address",
        "-From a@b.example -To admin -Subject hi": "an e-mail address",
        "-From a@b.example -To admin@domain.com -Cc \"kim@domain.com`0\" -Subject hi": "an e-mail address",
        "-From a@b.example -To admin@domain.com -Subject hi -Attachments \"a`r`nb.txt\"": "Illegal characters in path",
    }
    for arguments, error in attempts.items():
        r = shell(home, send + arguments)
        assert not r.ok and error in r.err and "bug" not in r.err, (arguments, r.err)
    r = shell(home, 'Send-MailMessage -SmtpServer ("x" * 70) -From a@b.example -To admin@domain.com -Subject hi')
    assert not r.ok and "is not a host name" in r.err, r.err   # (a label over 63 characters: never looked up)
    r = shell(home, send + '-From "Printer <a@b.example>" -To "admin@domain.com, Kim <kim@domain.com>" -Subject both')
    assert r.ok, r.err
    for box in ("admin@domain.com", "kim@domain.com"):
        got = wait_for(lambda: maildir_messages(home, box), message=f"the message at {box}")
        assert len(got) == 1 and b"Subject: both" in got[0], got


def test_require_tls_refuses_mail_before_starttls(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'Set-ReceiveConnector "Default Frontend EX01" -RequireTLS $true')
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        c.ehlo("x")
        code, text = c.mail("a@b.example")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        c.starttls(context=unverified())
        c.ehlo("x")
        assert c.mail("a@b.example")[0] == 250
        assert c.rcpt("admin@domain.com")[0] == 250
        code, text = c.data(b"Subject: over tls\r\n\r\nok\r\n")
        assert code == 250 and b"Queued mail for delivery" in text
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"))[0].replace(b"\r\n\t", b" ")
    assert b"with ESMTPS (version=TLSv1." in msg and b"X-Source-TLS: TLSv1." in msg


def test_client_frontend_offers_auth_only_after_starttls(home, server):
    shell(home, 'New-Mailbox -Name Kate -PrimarySmtpAddress kate@domain.com '
                '-Password (ConvertTo-SecureString "Corr3ct-Horse" -AsPlainText -Force)')
    synced(home)
    with smtp(server.ports["client"]) as c:
        c.ehlo("laptop")
        assert not c.has_extn("auth") and c.has_extn("starttls")
        assert c.docmd("AUTH PLAIN AGthdGUAQ29ycjNjdC1Ib3JzZQ==")[0] == 451
        assert c.mail("kate@domain.com")[0] == 530  # ExchangeUsers: not authenticated, no Submit right
        c.rset()
        c.starttls(context=unverified())
        c.ehlo("laptop")
        assert set(c.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            c.login("kate", "wrong")
        assert bad.value.smtp_code == 535
        c.login("kate@domain.com", "Corr3ct-Horse")
        # Authenticated users relay (ExchangeUsers) but may only send as themselves.
        assert c.mail("boss@domain.com")[0] == 550
        c.rset()
        assert c.sendmail("kate@domain.com", ["friend@remote.example"], b"Subject: out\r\n\r\nhi\r\n") == {}
    got = shell(home, "Get-Message | fl FromAddress,Queue")
    assert "kate@domain.com" in got.out


def test_logon_failures_end_the_session(home, server):
    shell(home, 'Set-ReceiveConnector "Client Frontend EX01" -MaxLogonFailures 2')
    synced(home)
    with smtp(server.ports["client"]) as c:
        c.starttls(context=unverified())
        c.ehlo("x")
        assert c.docmd("AUTH PLAIN", "AHUAcA==")[0] in (334, 535)
        code, _ = c.docmd("AUTH PLAIN AHUAcA==")
        assert code in (535, 421)
        with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
            for _ in range(3):
                c.docmd("AUTH PLAIN AHUAcA==")
                c.noop()


def test_limits_are_enforced_with_exchange_replies(home, server):
    port = server.ports["frontend"]
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'Set-ReceiveConnector "Default Frontend EX01" -MaxMessageSize 64KB -MaxRecipientsPerMessage 2 '
                '-MaxProtocolErrors 2 -MaxHeaderSize 2KB')
    synced(home)
    with smtp(port) as c:
        c.ehlo("x")
        assert c.esmtp_features["size"] == "65536"
        assert c.mail("a@b.example", ["SIZE=1000000"])[0] == 552
        c.mail("a@b.example")
        assert c.rcpt("admin@domain.com")[0] == 250
        assert c.rcpt("admin@domain.com")[0] == 250
        assert c.rcpt("admin@domain.com") == (452, b"4.5.3 Too many recipients")
        code, text = c.data(b"Subject: big\r\n\r\n" + b"x" * 70000 + b"\r\n")
        assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
        c.mail("a@b.example")
        c.rcpt("admin@domain.com")
        code, text = c.data(b"X-Long: " + b"y" * 3000 + b"\r\n\r\nbody\r\n")
        assert (code, text) == (552, b"5.3.4 Header size exceeds fixed maximum size")
    with smtp(port) as c:
        c.ehlo("x")
        assert c.docmd("BOGUS")[0] == 500
        assert c.docmd("BOGUS")[0] == 500
        code, text = c.docmd("BOGUS")
        assert code == 500
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.noop()
            c.noop()


def test_connection_limits_and_timeouts(home, server):
    port = server.ports["frontend"]
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 2 '
                '-ConnectionInactivityTimeout 00:00:02 -ConnectionTimeout 00:00:04')
    synced(home)
    held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0)) for _ in range(2)]
    for s in held:
        assert s.recv(100).startswith(b"220")
    third = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0))
    assert third.recv(200).startswith(b"421 4.3.2 The maximum number of concurrent connections has exceeded a limit")
    other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.6", 0))
    assert other.recv(100).startswith(b"220")
    # Idle sessions are closed after ConnectionInactivityTimeout with Exchange's reply.
    held[0].settimeout(10)
    assert held[0].recv(200) == b"451 4.7.0 Timeout waiting for client input\r\n"
    # A session that keeps talking still ends at ConnectionTimeout.
    other.close()
    other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.6", 0))
    other.settimeout(1)
    deadline = time.monotonic() + 10
    got = b""
    while time.monotonic() < deadline and b"421" not in got:
        other.sendall(b"NOOP\r\n")
        try:
            got += other.recv(200)
        except socket.timeout:
            pass
        time.sleep(0.5)
    assert b"421 4.4.1 Connection timed out" in got
    for s in held + [third, other]:
        s.close()
    # MaxInboundConnectionPercentagePerSource: 3 % of MaxInboundConnection 100 is 3 connections per source,
    # fewer than MaxInboundConnectionPerSource 10.
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 10 '
                '-MaxInboundConnection 100 -MaxInboundConnectionPercentagePerSource 3 -ConnectionInactivityTimeout 00:01:00 '
                '-ConnectionTimeout 00:02:00')
    synced(home)
    time.sleep(0.5)   # the closed sessions above are released
    held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.7", 0)) for _ in range(4)]
    greetings = sorted(s.recv(200)[:9] for s in held)   # two workers may accept them in either order
    assert greetings == [b"220 ex01."] * 3 + [b"421 4.3.2"], greetings
    for s in held:
        s.close()


def test_tarpit_delays_refusals_of_anonymous_recipients(home, server):
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -TarpitInterval 00:00:02')
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        c.ehlo("x")
        c.mail("a@b.example")
        started = time.monotonic()
        assert c.rcpt("x@remote.example")[0] == 550
        assert time.monotonic() - started >= 1.9


def test_config_changes_reach_new_sessions_without_restart(home, server):
    port = free_port()
    r = shell(home, f'New-ReceiveConnector Later -Bindings 127.0.0.1:{port} -RemoteIPRanges 127.0.0.1 -Usage Custom '
                    '-PermissionGroups AnonymousUsers -Banner "220 later"')
    assert r.ok, r.err
    started = time.monotonic()

    def answers() -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                return s.recv(100)
        except OSError:
            return b""

    assert wait_for(answers, timeout=5).startswith(b"220 later")
    assert time.monotonic() - started < 5
    shell(home, 'Set-ReceiveConnector Later -Banner "220 changed"')
    wait_for(lambda: answers().startswith(b"220 changed"), timeout=5)
    shell(home, "Remove-ReceiveConnector Later")
    wait_for(lambda: answers() == b"", timeout=5, message="the listener to close")


def test_no_matching_connector_refuses_the_connection(home, server):
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -RemoteIPRanges 127.0.0.1')
    synced(home)
    with socket.create_connection(("127.0.0.1", server.ports["frontend"]), source_address=("127.0.0.7", 0)) as s:
        assert s.recv(300).startswith(b"554 5.7.1 ex01.domain.com No receive connector on this server accepts "
                                      b"connections from 127.0.0.7")


def test_maintenance_mode_refuses_new_sessions_and_keeps_delivering(home, server):
    """Set-ServerComponentState HubTransport Draining (Exchange's maintenance procedure): new connections get
    421 4.3.2, a session already open finishes its message, and the server takes mail again once no requester
    holds the component (a second requester's Active doesn't end the Maintenance requester's Draining)."""
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com").ok
    synced(home)
    port = server.ports["frontend"]

    def banner() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(300)

    assert banner().startswith(b"220 ")
    open_session = smtp(port)
    open_session.ehlo("printer.test")
    r = shell(home, "Set-ServerComponentState EX01 -Component HubTransport -State Draining -Requester Maintenance; "
                    "Set-ServerComponentState EX01 -Component HubTransport -State Active -Requester Functional")
    assert r.ok, r.err
    synced(home)
    assert banner() == b"421 4.3.2 Service not available\r\n"
    states = shell(home, "Get-ServerComponentState EX01 | ForEach-Object { $_.Component + '=' + $_.State }").out.split()
    assert states == ["ServerWideOffline=Active", "HubTransport=Draining", "FrontendTransport=Active"], states
    open_session.sendmail("app@outside.test", ["admin@domain.com"], b"Subject: in flight\r\n\r\nbody\r\n")
    open_session.quit()
    wait_for(lambda: maildir_messages(home, "admin@domain.com"), message="the message of the open session delivered")
    r = shell(home, "Set-ServerComponentState EX01 -Component ServerWideOffline -State Draining -Requester Maintenance")
    assert not r.ok and "Only HubTransport and FrontendTransport can be Draining" in r.err
    # A file dropped into Pickup waits too (two of the reader's polls), and is taken once the server is back.
    dropped = home.path / "Pickup" / "dropped.eml"
    wait_for(dropped.parent.exists, message="the Pickup directory")
    dropped.write_bytes(b"From: app@domain.com\r\nTo: admin@domain.com\r\nSubject: dropped\r\n\r\nx\r\n")
    time.sleep(2 * POLL_SECONDS + 1.5)
    assert dropped.exists()
    assert shell(home, "Set-ServerComponentState EX01 -Component HubTransport -State Active -Requester Maintenance").ok
    synced(home)
    assert banner().startswith(b"220 ")
    wait_for(lambda: any(b"Subject: dropped" in m for m in maildir_messages(home, "admin@domain.com")), timeout=30,
             message="the Pickup file delivered once the server takes mail again")
    assert "HubTransport Active" in " ".join(shell(home, "Get-ServerComponentState EX01 -Component HubTransport | "
                                                        "ft Component,State -HideTableHeaders").out.split())


def test_aiosmtplib_pipelined_and_chunked_submission(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com')
    synced(home)

    async def send() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.ports["frontend"], start_tls=False)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("pipelining") and client.supports_extension("chunking")
        errors, response = await client.sendmail("a@b.example", ["admin@domain.com"],
                                                 b"Subject: aiosmtplib\r\n\r\n.leading dot\r\nend\r\n")
        assert not errors and "Queued mail for delivery" in response
        await client.quit()

    asyncio.run(send())
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"))[0]
    assert msg.endswith(b"\r\n\r\n.leading dot\r\nend\r\n")


def test_bdat_from_a_raw_client(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com')
    synced(home)
    body = b"Subject: chunked\r\n\r\nline one\r\nline two\r\n"
    with socket.create_connection(("127.0.0.1", server.ports["frontend"]), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO raw\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<admin@domain.com>\r\n"
                  + f"BDAT {len(body[:10])}\r\n".encode() + body[:10]
                  + f"BDAT {len(body[10:])} LAST\r\n".encode() + body[10:])
        replies = [f.readline() for _ in range(4)]
        assert replies[2].startswith(b"250 2.6.0 CHUNK received OK, 10 octets")
        assert b"Queued mail for delivery" in replies[3]
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"))[0]
    assert msg.endswith(body.split(b"\r\n\r\n", 1)[1])


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by `make test`")
def test_swaks_plain_and_starttls(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com')
    synced(home)
    port = str(server.ports["frontend"])
    for extra in ([], ["--tls"]):
        out = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", port, "--from", "s@client.example",
                              "--to", "admin@domain.com", "--helo", "client.example", *extra], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        marker = r"<~\s+250 2\.6\.0" if extra else r"<-\s+250 2\.6\.0"
        assert re.search(marker, out.stdout), out.stdout
        if extra:
            assert "=== TLS started with cipher TLSv1." in out.stdout
    wait_for(lambda: len(maildir_messages(home, "admin@domain.com")) == 2)


def test_memory_stays_bounded_for_idle_sessions_and_a_30mb_message(home, server):
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource unlimited '
                '-MaxInboundConnection unlimited -MaxMessageSize 64MB\n'
                'Set-TransportConfig -MaxReceiveSize 64MB')   # the organisation's own limit is 10 MB
    synced(home)
    pid = server.proc.pid
    base = server_rss_kb(pid)
    sockets = []
    for i in range(400):
        s = socket.create_connection(("127.0.0.1", server.ports["frontend"]), source_address=(f"127.0.1.{i % 200 + 1}", 0))
        sockets.append(s)
    for s in sockets:
        s.recv(100)
    idle_growth = server_rss_kb(pid) - base
    assert idle_growth / len(sockets) < 64, f"{idle_growth / len(sockets):.1f} KB per idle session"
    for s in sockets:
        s.close()
    # The peak while the message is received and then delivered to the mailbox (which streams it too).
    with PeakRss(pid) as rss:
        with smtp(server.ports["frontend"], timeout=120) as c:
            c.ehlo("x")
            line = b"x" * 998 + b"\r\n"
            body = b"Subject: big\r\n\r\n" + line * (30 * 1024 * 1024 // len(line))
            assert c.sendmail("a@b.example", ["admin@domain.com"], body) == {}
        assert wait_for(lambda: maildir_messages(home, "admin@domain.com"), timeout=60)[0].endswith(line)
    growth_mb = rss.growth_mb
    assert growth_mb < 20, f"RSS grew {growth_mb:.1f} MB while receiving and delivering a 30 MB message"


def test_organisation_size_limits_give_exchange_ndrs(home, server):
    """Set-TransportConfig's MaxReceiveSize (to mailboxes) and MaxSendSize (from authenticated senders of the
    organisation): a message above one is accepted by SMTP (the connector's 36 MB allows it) and answered with
    Exchange's NDR when categorised; below both, or after the administrator raises a limit, it is delivered."""
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'New-Mailbox -Name Kate -PrimarySmtpAddress kate@domain.com '
                '-Password (ConvertTo-SecureString "Corr3ct-Horse" -AsPlainText -Force)')
    assert "MaxReceiveSize : 10 MB (10,485,760 bytes)" in shell(home, "Get-TransportConfig | fl MaxReceiveSize").out
    r = shell(home, "Set-TransportConfig -MaxReceiveSize 1MB -MaxSendSize 2MB")
    assert r.ok, r.err
    synced(home)
    line = b"y" * 998 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (1536 * 1024 // len(line))        # 1.5 MB
    with smtp(server.ports["frontend"]) as c:   # anonymous, from outside: only MaxReceiveSize applies
        assert c.sendmail("someone@remote.example", ["admin@domain.com"], b"Subject: small\r\n\r\nok\r\n") == {}
        assert c.sendmail("kate@domain.com", ["admin@domain.com"], big) == {}
    with smtp(server.ports["client"]) as c:     # Kate, authenticated: MaxSendSize applies to everything she sends
        c.ehlo("laptop")
        c.starttls(context=unverified())
        c.ehlo("laptop")
        c.login("kate@domain.com", "Corr3ct-Horse")
        assert c.sendmail("kate@domain.com", ["friend@remote.example"], big + line * 1024) == {}   # 2.5 MB
    ndrs = wait_for(lambda: [m for m in maildir_messages(home, "kate@domain.com")] if
                    len(maildir_messages(home, "kate@domain.com")) >= 2 else None, timeout=30, message="two NDRs")
    text = b"\n".join(ndrs)
    assert all(len(n) > 1_000_000 for n in ndrs)   # the originals attached (InternalDsnMaxMessageAttachSize 10 MB)
    assert b"RESOLVER.RST.RecipSizeLimit; message too large for this recipient" in text
    assert b"RESOLVER.RST.SendSizeLimit.Org; message too large for this organization" in text
    assert [m for m in maildir_messages(home, "admin@domain.com") if b"Subject: small" in m]
    assert not [m for m in maildir_messages(home, "admin@domain.com") if b"Subject: big" in m]
    # One FAIL and one NDR per refused message (a rescan of Submission must not categorise it twice); the
    # NDRs themselves, each with the 1.5 MB original attached, are not held to the 1 MB limit.
    def failed() -> list[str]:
        return sorted(shell(home, 'Get-MessageTrackingLog -EventId FAIL | ForEach-Object { "$($_.Recipients)" }').out.split())

    wait_for(lambda: len(failed()) >= 2, message="both FAIL events")
    time.sleep(1.5)   # a second categorisation would have logged by now
    assert failed() == ["admin@domain.com", "friend@remote.example"]
    # The administrator raises the organisation's limit: the same message is delivered.
    assert shell(home, "Set-TransportConfig -MaxReceiveSize 10MB -MaxRecipientEnvelopeLimit 2 "
                       "-InternalDsnMaxMessageAttachSize 512KB").ok
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        assert c.sendmail("someone@remote.example", ["admin@domain.com"], big) == {}
    wait_for(lambda: [m for m in maildir_messages(home, "admin@domain.com") if b"Subject: big" in m], timeout=30)
    # MaxRecipientEnvelopeLimit: Kate may address two recipients, not three (the connector would take 200).
    with smtp(server.ports["client"]) as c:
        c.ehlo("laptop")
        c.starttls(context=unverified())
        c.ehlo("laptop")
        c.login("kate@domain.com", "Corr3ct-Horse")
        assert c.sendmail("kate@domain.com", ["admin@domain.com", "kate@domain.com"], b"Subject: two\r\n\nok\r\n") == {}
        assert c.sendmail("kate@domain.com", ["admin@domain.com", "kate@domain.com", "x@remote.example"],
                          b"Subject: three\r\n\n" + big[big.index(b"\r\n\r\n") + 4:]) == {}
    ndr = wait_for(lambda: [m for m in maildir_messages(home, "kate@domain.com") if b"RecipLimit" in m], timeout=30)
    assert b"550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients" in ndr[0]
    # Kate is internal: over InternalDsnMaxMessageAttachSize, her NDR carries the original's headers only.
    assert b"Subject: three" in ndr[0] and len(ndr[0]) < 100_000
    wait_for(lambda: [m for m in maildir_messages(home, "admin@domain.com") if b"Subject: two" in m], timeout=30)
    assert not [m for m in maildir_messages(home, "admin@domain.com") if b"Subject: three" in m]


def test_message_rate_limit_per_source_across_workers(home, server):
    """MessageRateLimit 3 per minute from one IP address: the fourth transaction, on a new connection (which
    may land on the other worker process), gets Exchange's 421 4.4.2; another address is not affected."""
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'Set-ReceiveConnector "Default Frontend EX01" -MessageRateLimit 3 -TarpitInterval 00:00:00')
    synced(home)
    for n in range(3):
        with smtp(server.ports["frontend"], source="127.0.0.31") as c:
            assert c.sendmail("a@remote.example", ["admin@domain.com"], f"Subject: {n}\r\n\r\nx\r\n".encode()) == {}
    with smtp(server.ports["frontend"], source="127.0.0.31") as c:
        c.ehlo("x")
        code, text = c.mail("a@remote.example")
        assert (code, text) == (421, b"4.4.2 Message submission rate for this client has exceeded the configured limit")
    with smtp(server.ports["frontend"], source="127.0.0.32") as c:
        assert c.sendmail("b@remote.example", ["admin@domain.com"], b"Subject: other\r\n\r\nx\r\n") == {}
    assert "MessageRateLimit : 3" in shell(home, 'Get-ReceiveConnector "Default Frontend EX01" | fl MessageRateLimit').out


def test_local_hops_are_counted_against_max_local_hop_count(home, server):
    """A message that has passed through this organisation's own servers more than MaxLocalHopCount (8) times is
    a loop (554 5.4.6); as many Received headers from other hosts are within MaxHopCount (30)."""
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                'Set-ReceiveConnector "Default Frontend EX01" -TarpitInterval 00:00:00')
    synced(home)

    def message(hops: int, by: str) -> bytes:
        received = "".join(f"Received: from hop{i}.example (10.0.0.{i}) by {by} (10.1.0.1) with ESMTP id {i}; "
                           f"Fri, 4 Dec 2026 10:00:0{i % 10} +0000\r\n" for i in range(hops))
        return f"{received}Subject: hops\r\n\r\nx\r\n".encode()

    with smtp(server.ports["frontend"]) as c:
        assert c.sendmail("a@remote.example", ["admin@domain.com"], message(8, "EX01.domain.com")) == {}
        assert c.sendmail("a@remote.example", ["admin@domain.com"], message(12, "mx.remote.example")) == {}
        with pytest.raises(smtplib.SMTPDataError) as looped:
            c.sendmail("a@remote.example", ["admin@domain.com"], message(9, "ex01.domain.com"))
        assert looped.value.smtp_code == 554 and b"5.4.6" in looped.value.smtp_error
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxLocalHopCount 0')   # 0: no local limit
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        assert c.sendmail("a@remote.example", ["admin@domain.com"], message(9, "ex01.domain.com")) == {}


def test_a_low_open_files_limit_is_raised_so_sessions_are_not_capped_by_it(home, ports):
    """Started with a soft limit of 256 open files (a login shell's or systemd's default is 1,024), the server
    raises it to the hard limit: 600 sessions from 30 addresses are all greeted."""
    import resource

    from helpers import Server

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard limit on open files here is {hard}")
    server = Server(home, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))).start()
    sockets = []
    try:
        for pid in [server.proc.pid] + [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()]:
            limits = open(f"/proc/{pid}/limits").read()
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert int(line.split()[3]) > 256, line
        for i in range(600):
            sockets.append(socket.create_connection(("127.0.0.1", ports["frontend"]), timeout=10,
                                                    source_address=(f"127.0.2.{1 + i // 20}", 0)))
        greeted = 0
        for s in sockets:
            s.settimeout(10)
            greeted += s.recv(4).startswith(b"220")
        assert greeted == 600
    finally:
        for s in sockets:
            s.close()
        server.stop()


def test_an_ipv6_binding_listens_and_ipv6_remote_ranges_choose_the_connector(home, server):
    """Bindings and RemoteIPRanges in IPv6: [::1]:port listens, a range that holds ::1 wins over the default
    connector's ::/0 on the same binding, and the trace and audit headers name the IPv6 client."""
    port = free_port("::1")
    shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com')
    r = shell(home, f'New-ReceiveConnector Wide6 -Bindings "[::1]:{port}" -RemoteIPRanges "::/0" -Custom '
                    f'-PermissionGroups AnonymousUsers -Banner "220 any v6" -TarpitInterval 00:00:00\n'
                    f'New-ReceiveConnector Loop6 -Bindings "[::1]:{port}" -RemoteIPRanges "::1/128" -Custom '
                    f'-PermissionGroups AnonymousUsers -Banner "220 loopback v6" -TarpitInterval 00:00:00')
    assert r.ok, r.err
    synced(home)
    with smtplib.SMTP("::1", port, timeout=20) as c:
        c.ehlo("v6.client.example")
        assert c.sendmail("a@remote.example", ["admin@domain.com"], b"Subject: six\r\n\r\nover IPv6\r\n") == {}
    with socket.create_connection(("::1", port), timeout=5) as s:
        assert s.recv(200).startswith(b"220 loopback v6")
    msg = wait_for(lambda: maildir_messages(home, "admin@domain.com"), message="delivery to the Maildir")[0]
    head = msg.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").decode()
    assert "Received: from v6.client.example (::1) by ex01.domain.com (::1)" in head, head
    assert "X-Source: SMTP:EX01\\Loop6" in head and "X-Source-IP: ::1" in head, head


def test_queued_mail_and_mailboxes_are_private_to_the_servers_account(home, server):
    """The data directory is private from init on, and what the server writes in it (queue, Maildir, logs, its
    kept configuration) has no group or other permissions; a directory others can look into is warned about."""
    import stat

    assert home.path.stat().st_mode & 0o777 == 0o700
    shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com")
    synced(home)
    with smtp(server.ports["frontend"]) as c:
        c.sendmail("a@remote.example", ["admin@domain.com"], b"Subject: private\r\n\r\nsecret\r\n")
    wait_for(lambda: maildir_messages(home, "admin@domain.com"))
    written = [p for d in ("queue", "mailboxes", "logs", "run") for p in (home.path / d).rglob("*")]
    written.append(home.path / "config-cache.json")
    assert any(p.name == "queue.db" for p in written) and any(p.parent.name == "new" for p in written)
    exposed = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in written if p.stat().st_mode & 0o077]
    assert not exposed, exposed
    server.stop()
    home.path.chmod(0o755)
    server.start()
    assert f"chmod 700 {home.path}" in server.output()
