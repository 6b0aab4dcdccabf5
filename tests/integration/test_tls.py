"""TLS and certificates: the certificate cmdlets, which certificate a connector presents,
TlsAuthLevel on send connectors, and domain security (mutual TLS) between two servers."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from helpers import Server, bind_ports, free_port, make_home, shell, synced, wait_for
from peers import DnsServer, SmtpPeer

SOURCE = "127.0.0.2"


def peer_certificate(port: int, host: str = "127.0.0.1") -> x509.Certificate:
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO t\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        ctx = ssl._create_unverified_context()
        with ctx.wrap_socket(s) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def test_certificate_lifecycle(home, tmp_path):
    r = shell(home, 'New-ExchangeCertificate -SubjectName "C=US,O=Contoso,CN=mail.domain.com" -DomainName '
                    'mail.domain.com,autodiscover.domain.com -Services SMTP -PrivateKeyExportable $true '
                    '-FriendlyName "Mail"\n'
                    'Get-ExchangeCertificate | Where-Object { $_.FriendlyName -eq "Mail" } | '
                    'fl Subject,CertificateDomains,Services,Status,HasPrivateKey,IsSelfSigned')
    assert r.ok, r.err
    assert "Subject            : CN=mail.domain.com, O=Contoso, C=US" in r.out
    assert "CertificateDomains : {mail.domain.com, autodiscover.domain.com}" in r.out
    assert "Services           : SMTP" in r.out and "Status             : Valid" in r.out
    thumb = shell(home, 'Get-ExchangeCertificate | Where-Object { $_.FriendlyName -eq "Mail" } | '
                        'ForEach-Object { $_.Thumbprint }').out.strip()
    assert len(thumb) == 40
    pfx = tmp_path / "mail.pfx"
    r = shell(home, f'Export-ExchangeCertificate {thumb} -Password (ConvertTo-SecureString "pfx-pass" -AsPlainText -Force) '
                    f'-FileName "{pfx}"')
    assert r.ok, r.err and pfx.stat().st_size > 1000
    r = shell(home, f'Enable-ExchangeCertificate -Thumbprint {thumb} -Services IIS\n'
                    f'Get-ExchangeCertificate {thumb} | fl Services')
    assert "Services : IIS, SMTP" in r.out
    # In use by the connectors whose Fqdn it covers, so it can't be removed.
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -Fqdn mail.domain.com')
    refused = shell(home, f"Remove-ExchangeCertificate {thumb}")
    assert not refused.ok and "in use by Receive connector EX01\\Default Frontend EX01" in refused.err
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -Fqdn ex01.domain.com')
    assert shell(home, f"Remove-ExchangeCertificate {thumb}").ok
    # The exported PFX imports back with its key.
    r = shell(home, f'Import-ExchangeCertificate -FileName "{pfx}" -Password (ConvertTo-SecureString "pfx-pass" '
                    '-AsPlainText -Force) -PrivateKeyExportable $true\n'
                    f'Get-ExchangeCertificate {thumb} | fl HasPrivateKey')
    assert r.ok, r.err and "HasPrivateKey : True" in r.out
    wrong = shell(home, f'Import-ExchangeCertificate -FileName "{pfx}" -Password (ConvertTo-SecureString "nope" '
                        '-AsPlainText -Force)')
    assert not wrong.ok
    # Private keys are encrypted at rest.
    db = (home.path / "mailgate.db").read_bytes()
    assert b"BEGIN PRIVATE KEY" not in db and b"BEGIN RSA PRIVATE KEY" not in db


def test_certificate_request_completed_by_import(home, tmp_path):
    request = tmp_path / "mail.req"
    r = shell(home, f'New-ExchangeCertificate -GenerateRequest -SubjectName "CN=mail.domain.com" '
                    f'-DomainName mail.domain.com -RequestFile "{request}"\n'
                    'Get-ExchangeCertificate | fl Status,Subject')
    assert r.ok, r.err and "Status  : PendingRequest" in r.out
    csr = x509.load_pem_x509_csr(request.read_bytes())
    ca = trustme.CA()
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    now = dt.datetime.now(dt.timezone.utc)
    signed = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_cert.subject)
              .public_key(csr.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=90))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("mail.domain.com")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (tmp_path / "signed.pem").write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    r = shell(home, f'Import-ExchangeCertificate -FileName "{tmp_path / "signed.pem"}"\n'
                    'Get-ExchangeCertificate | Where-Object { $_.Subject -eq "CN=mail.domain.com" } | '
                    'fl Status,HasPrivateKey,IsSelfSigned')
    assert r.ok, r.err
    assert "Status        : Valid" in r.out and "HasPrivateKey : True" in r.out and "IsSelfSigned  : False" in r.out
    assert "PendingRequest" not in shell(home, "Get-ExchangeCertificate | fl Status").out


def test_connector_presents_the_certificate_named_by_tls_certificate_name(home, server):
    r = shell(home, 'New-ExchangeCertificate -SubjectName "CN=relay.domain.com" -DomainName relay.domain.com '
                    '-Services SMTP')
    assert r.ok, r.err
    first = peer_certificate(server.ports["frontend"])
    assert first.subject.rfc4514_string() in ("CN=EX01", "CN=relay.domain.com")
    r = shell(home, '$c = Get-ExchangeCertificate | Where-Object { $_.Subject -eq "CN=relay.domain.com" }\n'
                    'Set-ReceiveConnector "Default Frontend EX01" -TlsCertificateName "<I>$($c.Issuer)<S>$($c.Subject)"')
    assert r.ok, r.err
    synced(home)
    assert peer_certificate(server.ports["frontend"]).subject.rfc4514_string() == "CN=relay.domain.com"
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -TlsCertificateName $null -Fqdn ex01.domain.com')
    synced(home)
    assert peer_certificate(server.ports["frontend"]).subject.rfc4514_string() == "CN=EX01"


@pytest.fixture
def ca():
    return trustme.CA()


def _relay_org(home, ports, dns) -> None:
    r = shell(home, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges {SOURCE} -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
Set-TransportService EX01 -InternalDNSServers {dns.address} -TransientFailureRetryInterval 00:00:01 -MessageRetryInterval 00:00:01
''', runtime=None)
    assert r.ok, r.err


def _submit(port: int, rcpt: str, sender: str = "app@domain.com") -> None:
    with smtplib.SMTP("127.0.0.1", port, source_address=(SOURCE, 0), timeout=20) as c:
        assert c.sendmail(sender, [rcpt], b"Subject: tls policy\r\n\r\nx\r\n") == {}


def _queue_error(home, name: str) -> str:
    for block in shell(home, "Get-Queue | fl Identity,Status,LastError").out.split("\n\n"):
        if name in block and "Retry" in block:
            return block
    return ""


def test_certificate_validation_refuses_untrusted_peers_until_their_ca_is_imported(home, ports, ca, tmp_path):
    dns = DnsServer()
    port = free_port("127.0.0.31")
    _relay_org(home, ports, dns)
    dns.add("partner.example", "MX", "10 mx.partner.example.")
    dns.add("mx.partner.example", "A", "127.0.0.31")
    self_signed = trustme.CA().issue_cert("mx.partner.example")   # a CA nobody trusts
    self_signed.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "untrusted.pem"))
    peer = SmtpPeer("127.0.0.31", port, tls_cert=(str(tmp_path / "untrusted.pem"),) * 2)
    shell(home, f"New-SendConnector Partner -AddressSpaces partner.example -Port {port} -RequireTLS $true "
                "-TlsAuthLevel CertificateValidation", runtime=None)
    server = Server(home).start()
    try:
        _submit(ports["frontend"], "a@partner.example")
        block = wait_for(lambda: _queue_error(home, "partner.example"), message="the queue in Retry")
        assert "454 4.7.5 Certificate validation failure" in block and not peer.received
        peer.stop()
        good = ca.issue_cert("mx.partner.example")
        good.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "good.pem"))
        peer = SmtpPeer("127.0.0.31", port, tls_cert=(str(tmp_path / "good.pem"),) * 2)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        r = shell(home, f'Import-ExchangeCertificate -FileName "{tmp_path / "ca.pem"}"\nRetry-Queue EX01\\partner.example')
        assert r.ok, r.err
        got = wait_for(lambda: peer.received, timeout=30, message="delivery after trusting the CA")[0]
        assert got.tls
    finally:
        peer.stop()
        server.stop()
        dns.close()


def test_domain_validation_checks_the_name(home, ports, ca, tmp_path):
    dns = DnsServer()
    port = free_port("127.0.0.32")
    _relay_org(home, ports, dns)
    dns.add("partner.example", "A", "127.0.0.32")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    wrong_name = ca.issue_cert("other.example")
    wrong_name.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "wrong.pem"))
    peer = SmtpPeer("127.0.0.32", port, tls_cert=(str(tmp_path / "wrong.pem"),) * 2)
    r = shell(home, f'Import-ExchangeCertificate -FileName "{tmp_path / "ca.pem"}"\n'
                    f"New-SendConnector Partner -AddressSpaces partner.example -Port {port} -RequireTLS $true "
                    "-TlsAuthLevel DomainValidation -TlsDomain *.partner.example", runtime=None)
    assert r.ok, r.err
    server = Server(home).start()
    try:
        _submit(ports["frontend"], "a@partner.example")
        block = wait_for(lambda: _queue_error(home, "partner.example"))
        assert "4.7.5" in block and "not valid for *.partner.example" in block
        peer.stop()
        right = ca.issue_cert("mx.partner.example")
        right.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "right.pem"))
        peer = SmtpPeer("127.0.0.32", port, tls_cert=(str(tmp_path / "right.pem"),) * 2)
        shell(home, "Retry-Queue EX01\\partner.example")
        assert wait_for(lambda: peer.received, timeout=30)[0].tls
    finally:
        peer.stop()
        server.stop()
        dns.close()


def _import_identity(home, ca: trustme.CA, names: list[str], tmp_path: Path, tag: str) -> None:
    cert = ca.issue_cert(*names)
    path = tmp_path / f"{tag}.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    ca.cert_pem.write_to_path(str(tmp_path / f"{tag}-ca.pem"))
    r = shell(home, f'$c = Import-ExchangeCertificate -FileName "{path}"\n'
                    'Enable-ExchangeCertificate -Thumbprint $c.Thumbprint -Services SMTP -Force\n'
                    f'Import-ExchangeCertificate -FileName "{tmp_path / f"{tag}-ca.pem"}"', runtime=None)
    assert r.ok, r.err


def test_domain_security_between_two_mailgate_organisations(tmp_path, ca):
    """Mutual TLS: a.example (EX01) sends to partner b.example (EX02); each side verifies the other's certificate."""
    dns = DnsServer()
    a = make_home(tmp_path / "a", server="EX01", domain="a.example")
    b = make_home(tmp_path / "b", server="EX02", domain="b.example")
    a_ports = bind_ports(a)
    bind_ports(b)
    b_partner_port = free_port("127.0.0.41")
    _import_identity(a, ca, ["ex01.a.example", "a.example"], tmp_path, "a")
    _import_identity(b, ca, ["ex02.b.example", "b.example"], tmp_path, "b")
    dns.add("b.example", "MX", "10 ex02.b.example.")
    dns.add("ex02.b.example", "A", "127.0.0.41")
    r = shell(a, f'''
New-ReceiveConnector Relay -Bindings 127.0.0.1:{a_ports["frontend"]} -RemoteIPRanges {SOURCE} -Usage Custom `
    -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00
Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
Set-TransportService EX01 -InternalDNSServers {dns.address} -TransientFailureRetryInterval 00:00:01 -MessageRetryInterval 00:00:01
New-SendConnector ToPartner -AddressSpaces b.example -Partner -Port {b_partner_port}
Set-TransportConfig -TLSSendDomainSecureList b.example
''', runtime=None)
    assert r.ok, r.err
    r = shell(b, f'''
New-Mailbox -Name Bob -PrimarySmtpAddress bob@b.example
New-ReceiveConnector FromPartners -Partner -Bindings 127.0.0.41:{b_partner_port} -RemoteIPRanges 127.0.0.0/8 `
    -DomainSecureEnabled $true -TarpitInterval 00:00:00
Set-TransportConfig -TLSReceiveDomainSecureList a.example
''', runtime=None)
    assert r.ok, r.err
    server_a, server_b = Server(a).start(), Server(b).start()
    try:
        _submit(a_ports["frontend"], "bob@b.example", sender="alice@a.example")
        inbox = b.mailbox_dir / "bob@b.example" / "Maildir" / "new"
        wait_for(lambda: inbox.exists() and list(inbox.iterdir()), timeout=30, message="the partner's delivery")
        delivered = next(inbox.iterdir()).read_text().replace("\r\n\t", " ")
        assert "X-MS-Exchange-Organization-AuthAs: Partner" in delivered
        assert "X-MS-Exchange-Organization-AuthDomain: a.example" in delivered
        assert "X-MS-Exchange-Organization-AuthMechanism: 02" in delivered
        # A client without a certificate for a.example is refused by the partner connector.
        with smtplib.SMTP("127.0.0.41", b_partner_port, timeout=20) as c:
            c.starttls(context=ssl._create_unverified_context())
            c.ehlo("spoofer")
            code, text = c.mail("ceo@a.example")
            assert code == 454 and b"4.7.5 Certificate validation failure" in text
        # EX01 presenting a certificate the partner doesn't trust is refused: the queue retries, nothing arrives.
        r = shell(a, 'New-ExchangeCertificate -SubjectName "CN=ex01.a.example" -DomainName a.example -Services SMTP\n'
                     '$c = Get-ExchangeCertificate | Where-Object { $_.Subject -eq "CN=ex01.a.example" }\n'
                     'Set-SendConnector ToPartner -TlsCertificateName "<I>$($c.Issuer)<S>$($c.Subject)"')
        assert r.ok, r.err
        synced(a)
        _submit(a_ports["frontend"], "bob@b.example", sender="alice@a.example")
        assert wait_for(lambda: _queue_error(a, "b.example"), timeout=30)
        assert len(list(inbox.iterdir())) == 1
    finally:
        server_a.stop()
        server_b.stop()
        dns.close()


@pytest.mark.skipif(shutil.which("testssl") is None, reason="testssl.sh is installed by `make test`")
def test_testssl_finds_no_weak_protocols_or_ciphers(home, server):
    out = subprocess.run(["testssl", "--quiet", "--color", "0", "--warnings", "off", "--nodns", "none", "--starttls",
                          "smtp", "-p", "-s", f"127.0.0.1:{server.ports['frontend']}"], capture_output=True,
                         text=True, timeout=240).stdout
    (home.path / "testssl.txt").write_text(out)
    verdicts = {}
    for line in out.splitlines():
        m = re.match(r"^ (SSLv2|SSLv3|TLS 1\.3|TLS 1\.2|TLS 1\.1|TLS 1|NULL ciphers|Anonymous NULL|Export ciphers|LOW:|"
                     r"Triple DES|Obsolete CBC|Strong encryption)(?![\w.]).*?\s{2,}((?:not )?offered)", line)
        if m:
            verdicts[m.group(1)] = m.group(2)
    assert verdicts == {
        "SSLv2": "not offered", "SSLv3": "not offered", "TLS 1": "not offered", "TLS 1.1": "not offered",
        "TLS 1.2": "offered", "TLS 1.3": "offered", "NULL ciphers": "not offered", "Anonymous NULL": "not offered",
        "Export ciphers": "not offered", "LOW:": "not offered", "Triple DES": "not offered",
        "Obsolete CBC": "not offered", "Strong encryption": "offered"}, out


def test_failed_tls_handshakes_give_their_connection_slot_back(home, server):
    """A client that sends STARTTLS and starts its handshake without reading the 220 fails the handshake; the
    session then never got asyncio's connection_lost, its count under MaxInboundConnectionPerSource stayed
    taken, and after that many such attempts the address was refused (421 4.3.2) until a restart."""
    assert shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 3').ok
    synced(home)
    ctx = ssl._create_unverified_context()
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", server.ports["frontend"]), timeout=10) as s:
            s.recv(4096)
            s.sendall(b"EHLO t\r\nSTARTTLS\r\n")   # the 250 and 220 are left unread: TLS reads them as a record
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(s)

    def greeted() -> bool:   # the six slots come back as the server ends those sessions, within moments
        with socket.create_connection(("127.0.0.1", server.ports["frontend"]), timeout=10) as s:
            return s.recv(200).startswith(b"220")

    wait_for(greeted, timeout=10, interval=0.2, message="a new session greeted after the failed handshakes")
    with smtplib.SMTP("127.0.0.1", server.ports["frontend"], timeout=10) as client:
        assert client.ehlo()[0] == 250
        client.starttls(context=ctx)
        assert client.ehlo()[0] == 250
