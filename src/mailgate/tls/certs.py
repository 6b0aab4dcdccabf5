"""Certificates with the ``cryptography`` package: making, importing, describing,
and turning a stored certificate into an ``ssl.SSLContext``."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets as pysecrets
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailgate.config.model import Certificate
from mailgate.config.values import ExchangeServices


def _name_from_subject(subject: str) -> x509.Name:
    """``"C=US,CN=mail.contoso.com"`` → an X.509 name (Exchange's -SubjectName syntax)."""
    oids = {"CN": NameOID.COMMON_NAME, "C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME,
            "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "L": NameOID.LOCALITY_NAME, "S": NameOID.STATE_OR_PROVINCE_NAME,
            "ST": NameOID.STATE_OR_PROVINCE_NAME, "E": NameOID.EMAIL_ADDRESS}
    attrs = []
    for part in [p.strip() for p in subject.split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        if not sep or key.strip().upper() not in oids:
            raise ValueError(f'"{part}" is not a valid part of a subject name; use e.g. "C=US,O=Contoso,CN=mail.contoso.com"')
        attrs.append(x509.NameAttribute(oids[key.strip().upper()], value.strip()))
    if not attrs:
        raise ValueError("the subject name is empty")
    return x509.Name(attrs)


def _san(domains: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for d in domains:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(d)))
        except ValueError:
            names.append(x509.DNSName(d))
    return x509.SubjectAlternativeName(names)


def new_key(key_size: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def make_self_signed(subject: str, domains: list[str], *, key_size: int = 2048, days: int = 5 * 365) -> tuple[bytes, bytes]:
    key = new_key(key_size)
    name = _name_from_subject(subject)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    if domains:
        builder = builder.add_extension(_san(domains), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def make_request(subject: str, domains: list[str], *, key_size: int = 2048) -> tuple[bytes, bytes]:
    key = new_key(key_size)
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name_from_subject(subject))
    if domains:
        builder = builder.add_extension(_san(domains), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), key_pem(key)


def key_pem(key: Any, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def subject_text(name: x509.Name) -> str:
    """Exchange prints subjects like ``CN=mail.contoso.com, O=Contoso, C=US``."""
    return ", ".join(reversed([attr.rfc4514_string() for attr in name]))


def thumbprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA1()).hex().upper()


@dataclass
class ParsedCertificate:
    cert: x509.Certificate
    chain: list[x509.Certificate]

    @property
    def domains(self) -> list[str]:
        out: list[str] = []
        try:
            cn = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if cn:
                out.append(str(cn[0].value))
        except Exception:  # noqa: BLE001 - malformed subjects still import
            pass
        try:
            san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for value in san.get_values_for_type(x509.DNSName):
                if value not in out:
                    out.append(value)
            for ip in san.get_values_for_type(x509.IPAddress):
                if str(ip) not in out:
                    out.append(str(ip))
        except x509.ExtensionNotFound:
            pass
        return out


def parse_pem_chain(data: bytes) -> ParsedCertificate:
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("no certificate found in the PEM data")
    return ParsedCertificate(certs[0], certs[1:])


def describe(cert_pem: bytes, *, server: str, key_pem_bytes: bytes | None, secrets: Any, services: ExchangeServices,
             friendly_name: str = "Microsoft Exchange", exportable: bool = False, chain_pem: bytes = b"") -> Certificate:
    """A stored Certificate object for PEM data; the private key is encrypted with ``secrets``."""
    parsed = parse_pem_chain(cert_pem)
    cert = parsed.cert
    now = dt.datetime.now(dt.timezone.utc)
    status = "Valid" if cert.not_valid_before_utc <= now <= cert.not_valid_after_utc else "DateInvalid"
    return Certificate(
        thumbprint=thumbprint(cert), friendly_name=friendly_name, subject=subject_text(cert.subject),
        issuer=subject_text(cert.issuer), certificate_domains=parsed.domains,
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        serial_number=format(cert.serial_number, "X"), services=services, has_private_key=key_pem_bytes is not None,
        private_key_exportable=exportable, is_self_signed=cert.issuer == cert.subject, status=status, server=server,
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        chain_pem=chain_pem.decode() if chain_pem else "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in parsed.chain),
        encrypted_private_key=secrets.encrypt(key_pem_bytes) if key_pem_bytes else None,
    )


def private_key_pem(cert: Certificate, secrets: Any) -> bytes:
    if not cert.encrypted_private_key:
        raise ValueError(f"the certificate {cert.thumbprint} has no private key")
    return secrets.decrypt(cert.encrypted_private_key)


# Modern TLS only: 1.2 and 1.3, forward-secret AEAD suites.
TLS12_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1")


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    return ctx


def load_chain_into(ctx: ssl.SSLContext, cert: Certificate, secrets: Any) -> None:
    """Load a stored certificate and its key into ``ctx`` without writing the clear key to disk."""
    passphrase = pysecrets.token_bytes(24)
    key = serialization.load_pem_private_key(private_key_pem(cert, secrets), password=None)
    protected = key_pem(key, passphrase)
    fd, path = tempfile.mkstemp(prefix="mailgate-cert-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(cert.certificate_pem.encode() + cert.chain_pem.encode() + protected)
        ctx.load_cert_chain(path, password=passphrase)
    finally:
        os.unlink(path)


def server_context(cert: Certificate, secrets: Any, *, client_ca_pem: str | None = None,
                   request_client_cert: bool = False) -> ssl.SSLContext:
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    load_chain_into(ctx, cert, secrets)
    if request_client_cert:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        if client_ca_pem:
            ctx.load_verify_locations(cadata=client_ca_pem)
    return ctx
