"""Test-MailflowBestPractice: each rule found, its printed Fix removes it; the seed's configuration is clean
of errors; Test-ReceiveConnectorSelection agrees with what the live server does."""

from __future__ import annotations

import socket

import pytest
import seed
from helpers import Server, cli, maildir_messages, shell, synced, wait_for


def findings(home, runtime=None) -> list[dict[str, str]]:
    r = shell(home, "Test-MailflowBestPractice -RetryThreshold 00:00:01 | ForEach-Object { "
                    '$_.Severity + "|" + $_.Object + "|" + $_.Rule + "|" + $_.Fix }', runtime=runtime)
    out = []
    for line in r.out.splitlines():
        if line.count("|") >= 3:
            severity, obj, rule, fix = line.split("|", 3)
            out.append({"Severity": severity, "Object": obj, "Rule": rule, "Fix": fix})
    return out


def finding(home, rule: str, obj: str | None = None, runtime=None) -> dict[str, str] | None:
    for f in findings(home, runtime):
        if f["Rule"] == rule and (obj is None or f["Object"] == obj):
            return f
    return None


BREAKS = [
    ("InternetFacingRelay", "Error",
     'New-ReceiveConnector Open -Bindings 0.0.0.0:2601 -Internet\n'
     'Add-ADPermission Open -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient',
     "EX01\\Open"),
    ("WideRelayRange", "Warning",
     'New-ReceiveConnector Wide -Bindings 0.0.0.0:2602 -RemoteIPRanges 10.0.0.0/16 -Custom -PermissionGroups AnonymousUsers\n'
     'Add-ADPermission Wide -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient',
     "EX01\\Wide"),
    ("AnonymousRelay", "Info",
     'New-ReceiveConnector Secured -Bindings 0.0.0.0:2603 -RemoteIPRanges 10.1.1.5 -Custom '
     '-PermissionGroups ExchangeServers -AuthMechanism ExternalAuthoritative', "EX01\\Secured"),
    ("BasicAuthWithoutTls", "Warning",
     'Set-ReceiveConnector "Client Frontend EX01" -AuthMechanism Tls,BasicAuth', "EX01\\Client Frontend EX01"),
    ("CredentialsWithoutTls", "Warning",
     '$c = New-Object PSCredential("u", (ConvertTo-SecureString "p" -AsPlainText -Force))\n'
     'New-SendConnector ISP -AddressSpaces "*" -SmartHosts smtp.relay.com -SmartHostAuthMechanism BasicAuth '
     '-AuthenticationCredential $c', "ISP"),
    ("PartnerWithoutTls", "Warning",
     'New-ReceiveConnector Partners -Partner -Bindings 0.0.0.0:2604 -RemoteIPRanges 10.2.0.0/24',
     "EX01\\Partners"),
    ("ProtocolLoggingOff", "Warning",
     'Set-ReceiveConnector "Default Frontend EX01" -ProtocolLoggingLevel None', "EX01\\Default Frontend EX01"),
    ("AmbiguousRoute", "Warning",
     'New-SendConnector A1 -AddressSpaces contoso.example\nNew-SendConnector B1 -AddressSpaces contoso.example', "B1"),
    ("NoPostmaster", "Warning",
     "New-AcceptedDomain Fabrikam -DomainName fabrikam.example -DomainType Authoritative", "Fabrikam"),
    ("CertificateExpiring", "Warning",
     None, None),
]


@pytest.mark.parametrize("rule,severity,breaking,obj", [b for b in BREAKS if b[2]], ids=[b[0] for b in BREAKS if b[2]])
def test_each_rule_is_found_and_its_fix_removes_it(home, rule, severity, breaking, obj):
    assert finding(home, rule, obj) is None
    r = shell(home, breaking)
    assert r.ok, r.err
    found = finding(home, rule, obj)
    assert found is not None, findings(home)
    assert found["Severity"] == severity and found["Fix"]
    fixed = shell(home, found["Fix"])
    assert fixed.ok, (found["Fix"], fixed.err)
    assert finding(home, rule, obj) is None, findings(home)


def test_expiring_certificate_is_found_and_replaced(home, tmp_path):
    import datetime as dt

    import trustme
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = trustme.CA()
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    leaf_key = __import__("cryptography.hazmat.primitives.asymmetric.rsa", fromlist=["rsa"]).generate_private_key(
        public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME,
                                                                                  "ex01.domain.com")]))
            .issuer_name(issuer.subject).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=300)).not_valid_after(now + dt.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("ex01.domain.com")]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "soon.pem").write_bytes(pem)
    r = shell(home, f'$c = Import-ExchangeCertificate -FileName "{tmp_path / "soon.pem"}"\n'
                    'Enable-ExchangeCertificate $c.Thumbprint -Services SMTP')
    assert r.ok, r.err
    found = finding(home, "CertificateExpiring")
    assert found and found["Severity"] == "Warning"
    assert shell(home, found["Fix"]).ok
    assert finding(home, "CertificateExpiring") is None


def test_runtime_rules_bindings_and_queues(home, ports):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    taken = held.getsockname()[1]
    shell(home, f'New-ReceiveConnector Blocked -Bindings 127.0.0.1:{taken} -RemoteIPRanges 10.0.0.1 -Custom\n'
                'New-SendConnector Out -AddressSpaces down.example -SmartHosts 127.0.0.99 -Port 9\n'
                'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com', runtime=None)
    server = Server(home).start()
    try:
        blocked = finding(home, "BindingUnavailable", "EX01\\Blocked", runtime="client")
        assert blocked and blocked["Severity"] == "Error" and "already in use" not in blocked["Fix"]
        result = cli(home, "doctor")
        assert result.returncode != 0 and "BindingUnavailable" in result.stdout
        assert shell(home, blocked["Fix"]).ok
        synced(home)
        assert finding(home, "BindingUnavailable", "EX01\\Blocked", runtime="client") is None
        shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -RemoteIPRanges 127.0.0.1,0.0.0.0-255.255.255.255')
        synced(home)
        import smtplib

        with smtplib.SMTP("127.0.0.1", ports["client"], timeout=20):
            pass
        r = shell(home, 'Test-Mailflow -TargetEmailAddress x@down.example -ExecutionTimeout 2')
        assert not r.ok
        stuck = wait_for(lambda: finding(home, "QueueInRetry", runtime="client"), timeout=30)
        assert stuck["Fix"].startswith('Retry-Queue "EX01\\[127.0.0.99]"')
    finally:
        server.stop()
        held.close()


def test_init_plus_the_seed_has_no_error(home, tmp_path):
    script = tmp_path / "seed.ps1"
    script.write_text(seed.configuration_script())
    assert cli(home, "shell", "-f", str(script), stdin="u\np\n").returncode == 0
    found = findings(home)
    assert not [f for f in found if f["Severity"] == "Error"], found
    rules = {f["Rule"] for f in found}
    assert "AmbiguousRoute" in rules and "CredentialsWithoutTls" in rules   # the document's two smart-host caveats
    assert not any(f["Object"] == "EX01\\InternalRelay" for f in found)    # the model of a well-scoped relay
    assert cli(home, "doctor").returncode == 0


def test_connector_selection_agrees_with_the_live_server(home, server):
    port = server.ports["frontend"]
    shell(home, f'New-ReceiveConnector Printers -Bindings 127.0.0.1:{port} -RemoteIPRanges 127.0.0.0/29 -Custom '
                '-PermissionGroups AnonymousUsers -Banner "220 printers"\n'
                f'New-ReceiveConnector OnePrinter -Bindings 127.0.0.1:{port} -RemoteIPRanges 127.0.0.5 -Custom '
                '-PermissionGroups AnonymousUsers -Banner "220 one printer"\n'
                'Add-ADPermission OnePrinter -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                '-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient')
    synced(home)
    banners = {"EX01\\Printers": b"220 printers", "EX01\\OnePrinter": b"220 one printer",
               "EX01\\Default Frontend EX01": b"220 ex01.domain.com"}
    for source in ("127.0.0.2", "127.0.0.5", "127.0.0.7", "127.0.0.9", "127.0.1.1"):
        predicted = shell(home, f"Test-ReceiveConnectorSelection -RemoteIPAddress {source} "
                                f"-LocalEndPoint 127.0.0.1:{port} | fl ReceiveConnector,AnonymousCanRelay")
        connector = [line.split(" : ")[1] for line in predicted.out.splitlines() if line.startswith("ReceiveConnector")][0]
        can_relay = "AnonymousCanRelay : True" in predicted.out
        with socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=10) as s:
            f = s.makefile("rb")
            banner = f.readline()
            assert banner.startswith(banners[connector]), (source, connector, banner)
            s.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@remote.example>\r\nQUIT\r\n")
            replies = [f.readline() for _ in range(20)]
            rcpt = [r for r in replies if r[:3] in (b"250", b"550") and (b"2.1.5" in r or b"5.7.54" in r)][0]
            assert rcpt.startswith(b"250") == can_relay, (source, connector, rcpt)


def test_postmaster_refused_until_the_printed_fix_then_delivered_to_its_mailbox(home, server):
    """Exchange creates no postmaster; the rule's Fix gives the address to the system mailbox, and the running
    server then takes mail for <postmaster> (RFC 5321 §4.5.1) and delivers it there."""
    def rcpt_reply(path: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", server.ports["frontend"]), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x\r\nMAIL FROM:<someone@remote.example>\r\nRCPT TO:" + path + b"\r\nQUIT\r\n")
            replies = [f.readline() for _ in range(20)]
            return [r for r in replies if b"2.1.5" in r or b"5.1.10" in r][0]

    assert rcpt_reply(b"<postmaster>").startswith(b"550 5.1.10")
    found = finding(home, "NoPostmaster", "domain.com")
    assert found is not None and "postmaster@domain.com" in found["Fix"], findings(home)
    assert '"SystemMailbox{EX01}" -Arbitration' in found["Fix"]    # the command runs on Exchange too
    assert shell(home, found["Fix"]).ok
    synced(home)
    assert finding(home, "NoPostmaster", "domain.com") is None
    assert rcpt_reply(b"<Postmaster>").startswith(b"250 2.1.5")
    import smtplib
    with smtplib.SMTP("127.0.0.1", server.ports["frontend"], timeout=30) as c:
        c.sendmail("someone@remote.example", ["postmaster@domain.com"], b"Subject: abuse report\r\n\r\nhello\r\n")
    system = "SystemMailbox{EX01}@domain.com"
    wait_for(lambda: maildir_messages(home, system), timeout=20, message="the report in the system mailbox")
    assert b"Subject: abuse report" in maildir_messages(home, system)[0]


def test_a_pickup_directory_others_may_write_to_is_an_error(home, tmp_path):
    shared = tmp_path / "shared-pickup"
    shared.mkdir()
    shared.chmod(0o777)
    assert shell(home, f'Set-TransportService -PickupDirectoryPath "{shared}"').ok
    found = finding(home, "WritablePickupDirectory")
    assert found is not None and found["Severity"] == "Error" and found["Fix"] == f"chmod go-w {shared}"
    shared.chmod(0o755)
    assert finding(home, "WritablePickupDirectory") is None
    assert shell(home, "Set-TransportService -PickupDirectoryPath $null").ok   # off: nothing to check
    shared.chmod(0o777)
    assert finding(home, "WritablePickupDirectory") is None
