"""TLS material a running server hands to delivery: roots it trusts beyond the
system store (imported certificates without private keys) and its own
certificates for presenting as a client (mutual TLS)."""

from __future__ import annotations

import ssl
from typing import Any, Callable

from mailgate.config.values import ExchangeServices
from mailgate.manage.organisation import smtp_certificate
from mailgate.tls import certs


class TlsMaterial:
    def __init__(self, service: Any) -> None:
        self.service = service

    def _certificates(self) -> list[Any]:
        return list(self.service.snapshot.get("ExchangeCertificate", []))

    def trusted_pem(self) -> str | None:
        pems = [c.certificate_pem + c.chain_pem for c in self._certificates() if not c.has_private_key]
        return "".join(pems) or None

    def client_loader(self, tls_certificate_name: str | None) -> Callable[[ssl.SSLContext], None] | None:
        server = self.service.server_object
        try:
            cert = smtp_certificate(self._certificates(), server.name, server.fqdn, tls_certificate_name)
        except ValueError:
            cert = None
        if cert is None or ExchangeServices.SMTP not in cert.services and not tls_certificate_name:
            return None
        secrets = self.service.secrets

        def load(ctx: ssl.SSLContext) -> None:
            certs.load_chain_into(ctx, cert, secrets)

        return load
