"""Creating an organisation (``mailgate init``) or adding a server to one."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

from mailgate.config.model import (AcceptedDomain, Certificate, Mailbox, OrganizationConfig, ReceiveConnector,
                                   TransportConfig, TransportServer)
from mailgate.config.secrets import ENV_KEY, SecretBox
from mailgate.config.store import ConfigStore, default_sqlite_url
from mailgate.config.values import ExchangeServices, is_domain, normalise_domain
from mailgate.errors import UserError
from mailgate.home import Home, resolve_store_url
from mailgate.manage.domains_mailboxes import system_mailbox
from mailgate.manage.objects import validate
from mailgate.manage.receive_connectors import default_connectors
from mailgate.tls import certs


def default_server_name() -> str:
    return socket.gethostname().split(".")[0].upper() or "MAILGATE"


def initialise(path: Path, *, server: str | None, domain: str | None, store_url: str | None) -> tuple[Home, list[str]]:
    """Create the data directory and, when the organisation is new, its default objects.

    Returns the home and a list of lines describing what was created.
    """
    if (path / "mailgate.toml").exists():
        raise UserError(f"{path} is already a mailgate data directory; use another --home or remove it first.")
    name = (server or default_server_name()).strip()
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 15:
        raise UserError(f'"{name}" is not a valid server name: use up to 15 letters, digits, "-" or "_".')
    domain_name = normalise_domain(domain or "contoso.com")
    if not is_domain(domain_name) or "." not in domain_name:
        raise UserError(f'"{domain}" is not a valid domain name.')
    url = resolve_store_url(store_url or default_sqlite_url(path), path)
    if store_url is None:
        path.mkdir(parents=True, exist_ok=True)   # the new organisation's SQLite file lives here
    store = ConfigStore(url)
    try:
        with store.transaction() as tx:
            others = [s.name for s in tx.list(TransportServer)]
        if others and not (path / "secret.key").exists() and not os.environ.get(ENV_KEY):
            # A key made here would lock this server out of what the others stored, and out of X-EXPS.
            raise UserError(f"The organisation of {', '.join(others)} already lives in this store, and its servers "
                            f"share one secret key: copy secret.key from {others[0]}'s data directory to "
                            f"{path / 'secret.key'} (or set {ENV_KEY}), then run init again.")
        path.mkdir(parents=True, exist_ok=True)
        secrets = SecretBox.for_home(path, create=True)
        home = Home.create(path, name, url)
        created: list[str] = []
        with store.transaction() as tx:
            existing = tx.list(TransportServer)
            if any(s.name.lower() == name.lower() for s in existing):
                raise UserError(f'The organisation already has a server named "{name}".')
            fqdn = f"{name.lower()}.{domain_name}"
            server_obj = validate(TransportServer, dict(name=name, fqdn=fqdn))
            tx.put(server_obj)
            created.append(f"Transport server {name} ({fqdn})")
            new_org = not existing
            if not new_org:
                created.append(f"Joined the organisation of {', '.join(s.name for s in existing)} "
                               f"(sharing its secret key)")
            if new_org:
                tx.put(TransportConfig())
                tx.put(OrganizationConfig())
                tx.put(validate(AcceptedDomain, dict(name=domain_name, domain_name=domain_name, default=True)))
                created.append(f"Accepted domain {domain_name} (Authoritative, default)")
            default_domain = next((d.domain_name for d in tx.list(AcceptedDomain) if d.default), domain_name)
            for connector in default_connectors(server_obj):
                tx.put(connector)
                created.append(f"Receive connector {connector.identity} {{{', '.join(map(str, connector.bindings))}}}")
            box = system_mailbox(default_domain.removeprefix("*."), name)
            if tx.get(Mailbox, box.store_key()) is None:
                tx.put(box)
                created.append(f"System mailbox {box.primary_smtp_address}")
            cert_pem, key_pem = certs.make_self_signed(f"CN={name}", [name, fqdn])
            cert = certs.describe(cert_pem, server=name, key_pem_bytes=key_pem, secrets=secrets,
                                  services=ExchangeServices.IMAP | ExchangeServices.POP | ExchangeServices.SMTP)
            tx.put(cert)
            created.append(f"Self-signed certificate CN={name} ({cert.thumbprint}), enabled for SMTP")
        return home, created
    finally:
        store.dispose()


def smtp_certificate(certificates: list[Certificate], server: str, fqdn: str | None = None,
                     name: str | None = None) -> Certificate | None:
    """The certificate a connector presents: by TlsCertificateName, else matching Fqdn, else the newest SMTP one."""
    mine = [c for c in certificates if c.server.lower() == server.lower() and c.has_private_key
            and c.status == "Valid"]
    if name:
        issuer, subject = _split_tls_name(name)
        for cert in mine:
            if _same_dn(cert.issuer, issuer) and _same_dn(cert.subject, subject):
                return cert
        return None
    # Preference among matching certificates: not about to expire (30 days), CA-issued over self-signed,
    # then the latest expiry.
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    smtp = sorted((c for c in mine if ExchangeServices.SMTP in c.services),
                  key=lambda c: (c.not_after is None or c.not_after > soon, not c.is_self_signed,
                                 c.not_after or c.when_created, c.when_created), reverse=True)
    if fqdn:
        for cert in smtp:
            if any(_name_matches(d, fqdn) for d in cert.certificate_domains):
                return cert
    return smtp[0] if smtp else None


def _split_tls_name(text: str) -> tuple[str, str]:
    """``<I>issuer<S>subject`` → (issuer, subject)."""
    upper = text.upper()
    if not upper.startswith("<I>") or "<S>" not in upper:
        raise ValueError(f'"{text}" is not a TLS certificate name; use "<I>issuer<S>subject"')
    pos = upper.index("<S>")
    return text[3:pos], text[pos + 3:]


def _same_dn(a: str, b: str) -> bool:
    def norm(x: str) -> list[str]:
        return sorted(p.strip().lower().replace(" ", "") for p in x.split(",") if p.strip())

    return norm(a) == norm(b)


def _name_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") == pattern.count(".")
    return pattern == host


def connectors_of(snapshot: dict[str, list], server: str) -> list[ReceiveConnector]:
    return [c for c in snapshot.get("ReceiveConnector", []) if c.server.lower() == server.lower()]  # type: ignore[union-attr]
