"""Certificate cmdlets: New-, Import-, Enable-, Get-, Export-, Remove-ExchangeCertificate."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from mailgate.config.model import Certificate, ReceiveConnector, SendConnector
from mailgate.config.store import ConfigTransaction
from mailgate.config.values import ExchangeServices
from mailgate.errors import NotFoundError, ParameterError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.credentials import SecureString
from mailgate.manage.objects import apply_changes, validate
from mailgate.manage.organisation import smtp_certificate
from mailgate.manage.params import as_list, enum_converter, scalar, to_bool, to_int, to_str
from mailgate.manage.present import Record, present
from mailgate.tls import certs


def _password(value: Any) -> str:
    value = scalar(value)
    if isinstance(value, SecureString):
        return value.reveal()
    return to_str(value)


def _file_data(value: Any) -> bytes:
    value = scalar(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    text = to_str(value).strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("FileData must be the certificate file's bytes, PEM text or base64") from None


def _thumbprint(value: Any) -> str:
    if isinstance(value, Record):
        value = value.get("Thumbprint")
    return to_str(value).replace(" ", "").upper()


def _server(ctx: ManagementContext, args: dict[str, Any], tx: ConfigTransaction) -> str:
    name = args.get("Server") or ctx.server_name
    return ctx.transport_server(name, tx).name


def _find(tx: ConfigTransaction, server: str, thumbprint: str) -> Certificate:
    for cert in tx.list(Certificate, server):
        if cert.thumbprint == thumbprint:
            return cert
    raise NotFoundError(f"The certificate with thumbprint {thumbprint} was not found on server {server}.",
                        target=thumbprint)


def _record(cert: Certificate) -> Record:
    record = present(cert)
    record.set("Identity", cert.identity)
    record.set("RootCAType", "None" if cert.has_private_key else "ThirdParty")
    return record


def users_of(tx: ConfigTransaction, cert: Certificate) -> list[str]:
    """Connectors that present this certificate."""
    certificates = tx.list(Certificate)
    users = []
    for c in tx.list(ReceiveConnector, cert.server):
        try:
            chosen = smtp_certificate(certificates, c.server, c.fqdn, c.tls_certificate_name)
        except ValueError:
            chosen = None
        if chosen is not None and chosen.thumbprint == cert.thumbprint:
            users.append(f"Receive connector {c.identity}")
    for s in tx.list(SendConnector):
        if s.tls_certificate_name:
            try:
                chosen = smtp_certificate(certificates, cert.server, None, s.tls_certificate_name)
            except ValueError:
                chosen = None
            if chosen is not None and chosen.thumbprint == cert.thumbprint:
                users.append(f"Send connector {s.name}")
    return users


_SERVICES = Param("Services", convert=enum_converter(ExchangeServices), type_name="AllowedServices")


@cmdlet("Get-ExchangeCertificate",
        [Param("Thumbprint", position=0, convert=_thumbprint), Param("Server", convert=to_str),
         Param("DomainName", convert=lambda v: [to_str(x).lower() for x in as_list(v)])],
        synopsis="List certificates.", default_view="ExchangeCertificate",
        examples=["Get-ExchangeCertificate | fl Subject,Thumbprint,HasPrivateKey,Services,Status"])
def get_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List this server's certificates (or the one with -Thumbprint)."""
    with ctx.store.reader() as tx:
        server = _server(ctx, args, tx)
        items = tx.list(Certificate, server)
    if args.get("Thumbprint"):
        items = [c for c in items if c.thumbprint == args["Thumbprint"]]
        if not items:
            raise NotFoundError(f"The certificate with thumbprint {args['Thumbprint']} was not found on server {server}.")
    if args.get("DomainName"):
        items = [c for c in items if set(d.lower() for d in c.certificate_domains) & set(args["DomainName"])]
    return [_record(c) for c in items]


@cmdlet("New-ExchangeCertificate",
        [Param("SubjectName", convert=to_str, help='e.g. "C=US,O=Contoso,CN=mail.contoso.com"'),
         Param("DomainName", convert=lambda v: [to_str(x) for x in as_list(v)], multi=True),
         _SERVICES, Param("KeySize", convert=to_int), Param("PrivateKeyExportable", convert=to_bool),
         Param("FriendlyName", convert=to_str), Param("GenerateRequest", switch=True),
         Param("RequestFile", convert=to_str, local_file=True), Param("BinaryEncoded", switch=True), Param("Server", convert=to_str),
         Param("Force", switch=True)],
        synopsis="Create a self-signed certificate or a certificate request.", mutates=True,
        default_view="ExchangeCertificate",
        examples=['New-ExchangeCertificate -SubjectName "CN=mail.contoso.com" -DomainName mail.contoso.com '
                  '-Services SMTP -PrivateKeyExportable $true',
                  'New-ExchangeCertificate -GenerateRequest -SubjectName "CN=mail.contoso.com" '
                  '-DomainName mail.contoso.com -RequestFile .\\mail.req'])
def new_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Make a self-signed certificate (enabled for the given services), or with -GenerateRequest a CSR."""
    key_size = args.get("KeySize") or 2048
    if key_size not in (1024, 2048, 4096):
        raise ParameterError("KeySize must be 1024, 2048 or 4096.", parameter="KeySize")
    with ctx.store.transaction() as tx:
        server = ctx.transport_server(_server(ctx, args, tx), tx)
        subject = args.get("SubjectName") or f"CN={server.name}"
        domains = args.get("DomainName") or ([server.name, server.fqdn] if not args.get("SubjectName") else [])
        try:
            if args.get("GenerateRequest"):
                csr_pem, key_pem = certs.make_request(subject, domains, key_size=key_size)
            else:
                cert_pem, key_pem = certs.make_self_signed(subject, domains, key_size=key_size)
        except ValueError as exc:
            raise ParameterError(f"SubjectName: {exc}.", parameter="SubjectName") from None
        services = args.get("Services")
        if services is None:
            services = ExchangeServices.IMAP | ExchangeServices.POP | ExchangeServices.SMTP
        if args.get("GenerateRequest"):
            csr = x509.load_pem_x509_csr(csr_pem)
            request_id = csr.public_key().public_bytes(serialization.Encoding.DER,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
            pseudo = hashlib.sha1(request_id).hexdigest().upper()
            cert = validate(Certificate, dict(
                thumbprint=pseudo, friendly_name=args.get("FriendlyName") or "Microsoft Exchange",
                subject=certs.subject_text(csr.subject), certificate_domains=domains, server=server.name,
                status="PendingRequest", has_private_key=True, is_self_signed=False,
                private_key_exportable=bool(args.get("PrivateKeyExportable")),
                encrypted_private_key=ctx.secrets.encrypt(key_pem), request_pem=csr_pem.decode(),
                services=ExchangeServices(0)))
            if not ctx.should_process(f"Creating a certificate request for {subject}."):
                return []
            tx.put(cert)
            text = base64.b64encode(csr.public_bytes(serialization.Encoding.DER)).decode() if args.get("BinaryEncoded") \
                else csr_pem.decode()
            if args.get("RequestFile"):
                Path(args["RequestFile"]).write_text(text)
            return [text]
        cert = certs.describe(cert_pem, server=server.name, key_pem_bytes=key_pem, secrets=ctx.secrets,
                              services=services, friendly_name=args.get("FriendlyName") or "Microsoft Exchange",
                              exportable=bool(args.get("PrivateKeyExportable")))
        if not ctx.should_process(f"Creating a self-signed certificate {cert.subject} ({cert.thumbprint})."):
            return []
        tx.put(cert)
    if ExchangeServices.SMTP in cert.services:
        ctx.warn(f"The certificate {cert.thumbprint} is enabled for SMTP: connectors whose Fqdn it covers present it "
                 "(the newest SMTP certificate is the default).")
    return [_record(cert)]


def _load_import(data: bytes, password: str | None) -> tuple[bytes, bytes | None, bytes]:
    """(certificate PEM, key PEM or None, chain PEM) from PEM or PFX data."""
    if b"-----BEGIN" in data:
        parsed = certs.parse_pem_chain(data)
        key_pem = None
        if b"PRIVATE KEY-----" in data:
            key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
            key_pem = certs.key_pem(key)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in parsed.chain)
        return parsed.cert.public_bytes(serialization.Encoding.PEM), key_pem, chain
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password.encode() if password else None)
    except ValueError as exc:
        raise UserError(f"The certificate data can't be read ({exc}); give PEM, or PFX with its -Password.",
                        parameter="FileData") from None
    if cert is None:
        raise UserError("The PFX data holds no certificate.", parameter="FileData")
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (extra or []))
    return cert.public_bytes(serialization.Encoding.PEM), certs.key_pem(key) if key else None, chain


@cmdlet("Import-ExchangeCertificate",
        [Param("FileData", convert=_file_data, type_name="Byte[]"), Param("FileName", convert=to_str, local_file=True),
         Param("Password", convert=_password, type_name="SecureString"), Param("PrivateKeyExportable", convert=to_bool),
         Param("FriendlyName", convert=to_str), Param("Server", convert=to_str)],
        synopsis="Import a certificate (PEM or PFX), or the answer to a certificate request.", mutates=True,
        default_view="ExchangeCertificate",
        examples=["Import-ExchangeCertificate -FileName .\\mail.pfx -Password (ConvertTo-SecureString \"x\" "
                  "-AsPlainText -Force)", "Import-ExchangeCertificate -FileName .\\partner-root-ca.pem"])
def import_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Import a certificate with its key, complete a pending request, or add a trusted root (no key)."""
    data = args.get("FileData")
    if data is None:
        if not args.get("FileName"):
            raise ParameterError("Give -FileData or -FileName.", parameter="FileData")
        try:
            data = Path(args["FileName"]).read_bytes()
        except OSError as exc:
            raise UserError(f"The file {args['FileName']} can't be read: {exc.strerror}.", parameter="FileName") from None
    try:
        cert_pem, key_pem, chain = _load_import(data, args.get("Password"))
    except (ValueError, TypeError) as exc:
        raise UserError(f"The certificate data can't be read: {exc}.", parameter="FileData") from None
    with ctx.store.transaction() as tx:
        server = _server(ctx, args, tx)
        parsed = certs.parse_pem_chain(cert_pem)
        pending = None
        if key_pem is None:
            public = parsed.cert.public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
            for c in tx.list(Certificate, server):
                if c.status == "PendingRequest" and c.request_pem:
                    csr = x509.load_pem_x509_csr(c.request_pem.encode())
                    if csr.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo) == public:
                        pending = c
                        key_pem = ctx.secrets.decrypt(c.encrypted_private_key or "")
                        break
        thumb = certs.thumbprint(parsed.cert)
        if any(c.thumbprint == thumb for c in tx.list(Certificate, server)):
            raise UserError(f"The certificate {thumb} is already on server {server}.", parameter="FileData")
        cert = certs.describe(cert_pem, server=server, key_pem_bytes=key_pem, secrets=ctx.secrets,
                              services=ExchangeServices(0), friendly_name=args.get("FriendlyName")
                              or (pending.friendly_name if pending else "Imported certificate"),
                              exportable=bool(args.get("PrivateKeyExportable")), chain_pem=chain)
        if not ctx.should_process(f"Importing certificate {cert.subject} ({cert.thumbprint})."):
            return []
        if pending is not None:
            tx.delete(pending)
        tx.put(cert)
    if key_pem is None:
        ctx.warn(f"The certificate {cert.thumbprint} has no private key: it is trusted as a root or intermediate for "
                 "validating peers (TlsAuthLevel, domain security), and can't be presented.")
    return [_record(cert)]


@cmdlet("Enable-ExchangeCertificate",
        [Param("Thumbprint", position=0, mandatory=True, convert=_thumbprint, from_pipeline=True), _SERVICES,
         Param("Server", convert=to_str), Param("Force", switch=True), Param("DoNotRequireSsl", switch=True)],
        synopsis="Enable a certificate for services (SMTP).", mutates=True,
        examples=["Enable-ExchangeCertificate -Thumbprint 434AC224C8459924B26521298DE8F5C3B4E5CE1C -Services SMTP"])
def enable_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Add services to a certificate (services are additive); SMTP makes it the default for its names."""
    if args.get("Services") is None:
        raise ParameterError("Cannot process command because of one or more missing mandatory parameters: Services.",
                             parameter="Services")
    with ctx.store.transaction() as tx:
        cert = _find(tx, _server(ctx, args, tx), args["Thumbprint"])
        if not cert.has_private_key or cert.status != "Valid":
            raise UserError(f"The certificate {cert.thumbprint} can't be enabled: "
                            + ("it has no private key." if not cert.has_private_key else f"its status is {cert.status}."))
        updated = apply_changes(cert, {"Services": cert.services | args["Services"]})
        if not ctx.should_process(f"Enabling certificate {cert.thumbprint} for {args['Services']}."):
            return []
        tx.put(updated)
    return []


@cmdlet("Export-ExchangeCertificate",
        [Param("Thumbprint", position=0, mandatory=True, convert=_thumbprint, from_pipeline=True),
         Param("Password", convert=_password, type_name="SecureString"), Param("BinaryEncoded", switch=True),
         Param("FileName", convert=to_str, local_file=True), Param("Server", convert=to_str)],
        synopsis="Export a certificate (PFX with its key when exportable, else PEM).")
def export_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """With -Password: PFX including the private key (only if PrivateKeyExportable). Otherwise the certificate as PEM."""
    with ctx.store.reader() as tx:
        cert = _find(tx, _server(ctx, args, tx), args["Thumbprint"])
    if args.get("Password") is not None:
        if not cert.private_key_exportable:
            raise UserError(f"The private key of certificate {cert.thumbprint} isn't exportable (it was created or "
                            "imported without -PrivateKeyExportable $true).")
        key = serialization.load_pem_private_key(certs.private_key_pem(cert, ctx.secrets), password=None)
        x = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
        data = pkcs12.serialize_key_and_certificates(cert.friendly_name.encode(), key, x, None,
                                                     serialization.BestAvailableEncryption(args["Password"].encode()))
    else:
        data = (cert.certificate_pem + cert.chain_pem).encode()
    if args.get("FileName"):
        Path(args["FileName"]).write_bytes(data)
        return []
    return [data.decode() if args.get("Password") is None and not args.get("BinaryEncoded")
            else base64.b64encode(data).decode()]


@cmdlet("Remove-ExchangeCertificate",
        [Param("Thumbprint", position=0, mandatory=True, convert=_thumbprint, from_pipeline=True),
         Param("Server", convert=to_str)],
        synopsis="Delete a certificate.", mutates=True)
def remove_exchange_certificate(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Delete a certificate that no connector presents."""
    with ctx.store.transaction() as tx:
        cert = _find(tx, _server(ctx, args, tx), args["Thumbprint"])
        users = users_of(tx, cert)
        if users:
            raise UserError(f"The certificate {cert.thumbprint} is in use by {', '.join(users)}. Enable another "
                            "certificate for SMTP or change the connectors' TlsCertificateName first.")
        if not ctx.should_process(f"Removing certificate {cert.thumbprint}."):
            return []
        tx.delete(cert)
    return []


def expiring(cert: Certificate, days: int = 30) -> bool:
    return cert.not_after is not None and cert.not_after - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=days)
