"""A receive connector compiled for sessions: what it advertises, whom it
accepts, which certificate it presents. Rebuilt whenever the configuration
changes; a session keeps the policy it started with."""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import ipaddress
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mailgate.config.model import BANNER_MAX, ReceiveConnector, TransportServer
from mailgate.config.values import AuthMechanism, PermissionGroups, SizeMode, UnlimitedInt
from mailgate.receive import rights as R
from mailgate.receive.selection import select_connector
from mailgate.routing.table import RoutingTable
from mailgate.smtp import exps
from mailgate.smtp.replies import Reply
from mailgate.smtp.server import Extensions

# Entries of a policy's per-client cache (audit headers by client address and session state); cleared when full.
PER_CLIENT_CACHE = 1024


@dataclass
class ConnectorPolicy:
    connector: ReceiveConnector
    server: TransportServer
    ssl_context: ssl.SSLContext | None = None
    domain_secure_domains: frozenset[str] = frozenset()
    _rights_cache: dict[tuple[str, ...], R.Right] = field(default_factory=dict)
    _extensions_cache: dict[bool, Extensions] = field(default_factory=dict)
    _banner_cache: tuple[int, bytes] = (0, b"")
    _per_client_cache: dict[tuple[Any, ...], bytes] = field(default_factory=dict)

    @functools.cached_property
    def identity(self) -> str:
        return self.connector.identity

    @functools.cached_property
    def fqdn(self) -> str:
        return self.connector.fqdn or self.server.fqdn

    @functools.cached_property
    def verbose_log(self) -> bool:
        return self.connector.protocol_logging_level.value == "Verbose"

    @functools.cached_property
    def per_source_limit(self) -> UnlimitedInt:
        """Connections at once from one IP address: MaxInboundConnectionPerSource, or fewer if
        MaxInboundConnectionPercentagePerSource of MaxInboundConnection is fewer (Exchange applies both)."""
        c = self.connector
        per_source, total = c.max_inbound_connection_per_source.value, c.max_inbound_connection.value
        if total is None:
            return c.max_inbound_connection_per_source
        share = max(1, total * c.max_inbound_connection_percentage_per_source // 100)
        return UnlimitedInt(share if per_source is None else min(per_source, share))

    @property
    def offers_tls(self) -> bool:
        return AuthMechanism.Tls in self.connector.auth_mechanism and self.ssl_context is not None

    @functools.cached_property
    def externally_secured(self) -> bool:
        return AuthMechanism.ExternalAuthoritative in self.connector.auth_mechanism

    def auth_mechanisms(self, tls: bool) -> tuple[str, ...]:
        am = self.connector.auth_mechanism
        if AuthMechanism.BasicAuth not in am:
            return ()
        if AuthMechanism.BasicAuthRequireTLS in am and not tls:
            return ()
        return ("LOGIN", "PLAIN")

    def exps_mechanisms(self, tls: bool) -> tuple[str, ...]:
        """Exchange Server authentication (X-EXPS): for connectors that take the ExchangeServers group with the
        ExchangeServer mechanism; after STARTTLS when the connector can offer TLS."""
        c = self.connector
        if AuthMechanism.ExchangeServer not in c.auth_mechanism or PermissionGroups.ExchangeServers not in \
                c.permission_groups or (self.offers_tls and not tls):
            return ()
        return (exps.MECHANISM,)

    def auth_needs_tls(self, tls: bool) -> bool:
        am = self.connector.auth_mechanism
        return AuthMechanism.BasicAuth in am and AuthMechanism.BasicAuthRequireTLS in am and not tls

    def extensions(self, tls: bool) -> Extensions:
        ext = self._extensions_cache.get(tls)
        if ext is None:
            ext = self._extensions_cache[tls] = self._make_extensions(tls)
        return ext

    def _make_extensions(self, tls: bool) -> Extensions:
        c = self.connector
        return Extensions(
            pipelining=c.pipelining_enabled, eightbitmime=c.eight_bit_mime_enabled,
            binarymime=c.binary_mime_enabled and c.chunking_enabled, chunking=c.chunking_enabled,
            dsn=c.delivery_status_notification_enabled, smtputf8=c.smtp_utf8_enabled,
            enhanced_status_codes=c.enhanced_status_codes_enabled, starttls=self.offers_tls and not tls,
            auth=self.auth_mechanisms(tls), exps=self.exps_mechanisms(tls), require_ehlo_domain=c.require_ehlo_domain,
            reject_bare_linefeeds=c.bare_linefeed_rejection_enabled,
        )

    def banner(self) -> bytes:
        if self.connector.banner:
            # check_banner refuses anything but one printable line; a value stored before that rule is
            # made one here, so it can never put a line break or an unfinished "220-" on the wire.
            text = "".join(ch for ch in self.connector.banner[3:] if " " <= ch <= "~").strip(" -")
            return (f"220 {text}"[:BANNER_MAX] if text else "220").encode() + b"\r\n"
        second = int(time.time())
        if self._banner_cache[0] != second:   # the date in the banner changes once a second
            date = email.utils.format_datetime(dt.datetime.now().astimezone())
            self._banner_cache = (second, f"220 {self.fqdn} mailgate ESMTP MAIL Service ready at {date}\r\n".encode())
        return self._banner_cache[1]

    def ehlo_reply(self, verb: str, client_ip: str, tls: bool) -> Reply:
        greeting = f"{self.fqdn} Hello [{client_ip}]"
        if verb == "HELO":
            return Reply(250, None, greeting)
        c = self.connector
        lines = [greeting]
        if c.size_enabled is SizeMode.Enabled:
            lines.append(f"SIZE {c.max_message_size.bytes}")
        elif c.size_enabled is SizeMode.EnabledWithoutValue:
            lines.append("SIZE")
        if c.pipelining_enabled:
            lines.append("PIPELINING")
        if c.delivery_status_notification_enabled:
            lines.append("DSN")
        if c.enhanced_status_codes_enabled:
            lines.append("ENHANCEDSTATUSCODES")
        if self.offers_tls and not tls:
            lines.append("STARTTLS")
        mechanisms = self.auth_mechanisms(tls)
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        exps_mechanisms = self.exps_mechanisms(tls)
        if exps_mechanisms:
            lines.append("X-EXPS " + " ".join(exps_mechanisms))
        if c.eight_bit_mime_enabled:
            lines.append("8BITMIME")
        if c.binary_mime_enabled and c.chunking_enabled:
            lines.append("BINARYMIME")
        if c.chunking_enabled:
            lines.append("CHUNKING")
        if c.smtp_utf8_enabled:
            lines.append("SMTPUTF8")
        return Reply(250, None, tuple(lines))

    def per_client(self, key: tuple[Any, ...], build: Callable[[], bytes]) -> bytes:
        """Bytes a session derives from this policy and its client's address and state (the audit headers):
        built once per key for this configuration revision. A client that connects for every message (most
        do) would otherwise have them built anew each time."""
        value = self._per_client_cache.get(key)
        if value is None:
            if len(self._per_client_cache) >= PER_CLIENT_CACHE:
                self._per_client_cache.clear()
            value = self._per_client_cache[key] = build()
        return value

    def rights(self, principals: tuple[str, ...]) -> R.Right:
        cached = self._rights_cache.get(principals)
        if cached is None:
            cached = R.effective_rights(self.connector, list(principals))
            self._rights_cache[principals] = cached
        return cached


@dataclass
class ReceiveConfig:
    """Everything sessions read, from one configuration revision."""

    revision: int
    server: TransportServer
    connectors: list[ReceiveConnector]
    policies: dict[str, ConnectorPolicy]
    routing: RoutingTable
    submission_suspended: bool = False
    org_servers: dict[str, str] = field(default_factory=dict)   # the organisation's servers, lower-case name → name
    org_fqdns: frozenset[str] = frozenset()                      # and their FQDNs, lower case (local hops)
    refusing: str | None = None   # why no new session is taken (Set-ServerComponentState), None when mail is taken

    _selection: dict[tuple[str, int, str], tuple[ReceiveConnector | None, Any]] = field(default_factory=dict)

    @functools.cached_property
    def fqdn(self) -> str:
        return self.server.fqdn

    def select(self, local: str, port: int, remote: str) -> tuple[ReceiveConnector | None, Any]:
        """The connector for a connection (cached per endpoint pair for this revision) and the local address."""
        key = (local, port, remote)
        hit = self._selection.get(key)
        if hit is None:
            local_ip = ipaddress.ip_address(local.split("%")[0])
            connector = select_connector(self.connectors, local_ip, port, ipaddress.ip_address(remote.split("%")[0]))
            if len(self._selection) > 50_000:
                self._selection.clear()
            hit = self._selection[key] = (connector, local_ip)
        return hit
