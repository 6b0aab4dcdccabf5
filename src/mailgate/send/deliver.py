"""Delivery agents the queue manager runs: SMTP/LMTP through send connectors,
and mailbox delivery into Maildir."""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
from pathlib import Path
from typing import Any

from mailgate.config.model import SendConnector
from mailgate.config.values import ErrorPolicies, SmartHostAuthMechanism, parse_lmtp_target
from mailgate.queue.store import StoredBody
from mailgate.receive.headers import without_organisation_headers
from mailgate.routing import dns as D
from mailgate.routing.table import INTRA_ORG_CONNECTOR
from mailgate.send import maildir
from mailgate.send.smtp import (
    ConnectFailure,
    ConnectionLost,
    OutboundMessage,
    Outcome,
    OutRecipient,
    SessionSettings,
    SmtpConnection,
    TlsPolicy,
)
from mailgate.smtp import exps
from mailgate.smtp.client import ProtocolViolation

log = logging.getLogger("mailgate.send")

BATCH = 10   # messages a delivery worker takes at once: one connection carries them back to back
CONNECTION_CACHE_SECONDS = 2.0   # an idle delivery connection waits this long for more mail (Postfix: 2 s)
MAILBOX_REJECTED = "550 5.1.1 RESOLVER.ADR.ExRecipNotFound; not found"


class Delivery:
    """Holds what delivery needs besides the queue manager: secrets, logs, TLS material."""

    def __init__(self, *, secrets: Any, protocol_log: Any, mailbox_root: Path, tls: Any = None) -> None:
        self.secrets = secrets
        self.protocol_log = protocol_log
        self.mailbox_root = mailbox_root
        self.tls = tls                       # tls.runtime.TlsMaterial or None
        self._resolvers: dict[tuple[str, ...], Any] = {}

    def resolver(self, servers: list[str]) -> Any:
        key = tuple(servers)
        r = self._resolvers.get(key)
        if r is None:
            r = D.make_resolver(list(servers))
            self._resolvers[key] = r
        return r

    # -- SMTP ----------------------------------------------------------------------------------
    def session_settings(self, manager: Any, connector: SendConnector | None, domain: str,
                         lmtp: bool = False) -> SessionSettings:
        server = manager.settings.server
        if connector is None:
            return SessionSettings(helo_name=server.fqdn, port=25, lmtp=lmtp)
        secure = domain.lower() in {d.lower() for d in manager.settings.org.tls_send_domain_secure_list} \
            and connector.domain_secure_enabled
        level = connector.tls_auth_level.value if connector.tls_auth_level else "EncryptionOnly"
        tls = TlsPolicy(require=connector.require_tls or secure, ignore_starttls=connector.ignore_starttls,
                        level="DomainValidation" if secure else level,
                        domain=connector.tls_domain or (domain if secure else None))
        if self.tls is not None:
            tls.ca_pem = self.tls.trusted_pem()
            if connector.tls_certificate_name or secure:
                tls.client_context = self.tls.client_loader(connector.tls_certificate_name)
        auth = None
        mech = connector.smart_host_auth_mechanism
        if mech in (SmartHostAuthMechanism.BasicAuth, SmartHostAuthMechanism.BasicAuthRequireTLS) \
                and connector.authentication_credential is not None:
            cred = connector.authentication_credential
            auth = (cred.user_name, self.secrets.decrypt(cred.encrypted_password).decode("utf-8"))
        log_factory = None
        if connector.protocol_logging_level.value == "Verbose":
            def log_factory(local: str, remote: str, _name: str = connector.name) -> Any:
                session = self.protocol_log.session(_name, local, remote)
                session.write("+")
                return session
        return SessionSettings(helo_name=connector.fqdn or server.fqdn, port=connector.port or 25,
                               force_helo=connector.force_helo, tls=tls, auth=auth,
                               auth_require_tls=mech is SmartHostAuthMechanism.BasicAuthRequireTLS,
                               timeout=connector.connection_inactivity_time_out.seconds, lmtp=lmtp, log=log_factory)

    def intra_org_settings(self, manager: Any) -> SessionSettings:
        """The implicit Intra-Organization SMTP Send Connector: to another server of the organisation, over TLS
        when offered, authenticated both ways with X-EXPS (smtp/exps.py)."""
        server = manager.settings.server
        log_factory = None
        if server.intra_org_connector_protocol_logging_level.value == "Verbose":
            def log_factory(local: str, remote: str) -> Any:
                session = self.protocol_log.session(INTRA_ORG_CONNECTOR, local, remote)
                session.write("+")
                return session
        return SessionSettings(helo_name=server.fqdn, port=25, tls=TlsPolicy(), log=log_factory,
                               exchange_auth=(self.secrets.derive(exps.KEY_PURPOSE), server.name))

    async def hosts_for(self, manager: Any, q: Any, connector: SendConnector | None) -> list[D.Host]:
        server = manager.settings.server
        use_external = connector is not None and connector.use_external_dns_servers_enabled
        servers = server.external_dns_servers if use_external else server.internal_dns_servers
        resolver = self.resolver(servers)
        if q.delivery_type == "DnsConnectorDelivery":
            return await D.mx_hosts(resolver, q.next_hop)
        if q.delivery_type == "SmartHostConnectorDelivery" and connector is not None:
            return await D.smart_hosts(resolver, connector.smart_hosts)
        if q.key.startswith("lmtp:"):
            try:
                host, _ = parse_lmtp_target(q.next_hop)
            except ValueError as exc:   # kept from before LmtpTarget was checked: the mail waits for a good one
                raise D.DnsFailure(f"451 4.4.0 {exc}", permanent=False) from None
            return [D.Host(host, (host,))] if _is_ip(host) else [D.Host(host, (await D._addresses(resolver, host)))]
        if q.delivery_type == "SmtpRelayToConnectorSourceServers" and connector is not None:
            return await self._servers(manager, resolver, connector.source_transport_servers,
                                       f"the source servers of {connector.name}")
        if q.delivery_type == "SmtpRelayToServers":   # Redirect-Message's queue: its key names the servers
            return await self._servers(manager, resolver, q.key.partition(":")[2].split(","), q.next_hop)
        raise D.DnsFailure(f"451 4.4.0 No way to reach the next hop {q.next_hop}", permanent=False)

    async def _servers(self, manager: Any, resolver: Any, names: list[str], what: str) -> list[D.Host]:
        """Other servers of the organisation, each at the receive connectors where it takes mail from the others
        (``intra_org_endpoints``); a wildcard binding is reached through the server's FQDN."""
        hosts = []
        for name in names:
            if name.lower() == manager.server_name.lower():
                continue
            fqdn = manager.server_fqdns.get(name.lower()) or name
            for ip, port in manager.server_endpoints.get(name.lower()) or [(None, 25)]:
                if ip is not None:
                    hosts.append(D.Host(fqdn, (ip,), port))
                    continue
                try:
                    addresses = await D._addresses(resolver, fqdn) if not _is_ip(fqdn) else (fqdn,)
                except D.DnsFailure:
                    continue
                if addresses:
                    hosts.append(D.Host(fqdn, addresses, port))
        if not hosts:
            raise D.DnsFailure(f"451 4.4.0 None of {what} could be resolved", permanent=False)
        return hosts

    async def deliver_smtp(self, manager: Any, q: Any) -> None:
        routing = manager.settings.routing
        connector = routing.connector(q.connector) if q.connector else None
        if q.connector and connector is None:
            return  # the connector was removed or disabled: the manager re-routes this queue
        lmtp = q.key.startswith("lmtp:")
        try:
            hosts = await self.hosts_for(manager, q, connector)
        except D.DnsFailure as failure:
            # ErrorPolicies DowngradeDnsFailures: every DNS error is transient (a nonexistent domain too), for a
            # connector whose next hop is expected to be there (a cloud filter, a partner).
            downgraded = connector is not None and ErrorPolicies.DowngradeDnsFailures in connector.error_policies
            if failure.permanent and not downgraded:
                self._fail_window(manager, q, failure.reply)
            else:
                manager.connection_failed(q, failure.reply)
            return
        config = manager.settings
        to_organisation = q.delivery_type in ("SmtpRelayToConnectorSourceServers", "SmtpRelayToServers")
        if to_organisation:
            settings = self.intra_org_settings(manager)
        else:
            settings = self.session_settings(manager, connector, q.next_hop, lmtp=lmtp)
        if lmtp:
            settings.port = parse_lmtp_target(q.next_hop)[1]
            settings.tls = TlsPolicy()
        max_per_connection = connector.smtp_max_messages_per_connection if connector else 20
        # The outbound header firewall: organisation headers go only to the organisation's own servers (the
        # intra-organisation connector, an Internal connector, the LMTP mailbox store).
        keep_organisation_headers = connector is None or connector.usage == "Internal" or to_organisation
        conn: SmtpConnection | None = None
        try:
            while not manager._stopping and not q.suspended:
                room = max_per_connection - conn.messages_sent if conn is not None else max_per_connection
                if room <= 0 and conn is not None:
                    await conn.close()
                    conn, room = None, max_per_connection
                ids = manager.take(q, min(BATCH, max(room, 1)))
                if not ids and q.backlog:
                    # More mail than the window held waits in the store. (Mail that comes due later is offered
                    # by the scheduler's refill, at least once a second.)
                    manager._refill(q, time.time())
                    ids = manager.take(q, min(BATCH, max(room, 1)))
                if not ids:
                    # Keep the connection for mail that follows soon, as Postfix's connection cache does:
                    # a steady trickle then costs one connection, not one per message.
                    # A configuration change (certificates, TLS, credentials) needs a new connection.
                    if conn is not None and not manager._stopping and await q.wait_for_mail(CONNECTION_CACHE_SECONDS) \
                            and manager.settings is config:
                        continue
                    return
                recorded: set[int] = set()
                try:
                    work = self._load_batch(manager, q, ids, keep_organisation_headers)
                    if not work:
                        continue
                    if conn is None:
                        try:
                            conn = await SmtpConnection.open(hosts, settings, domain=q.next_hop)
                        except ConnectFailure as failure:
                            if failure.permanent:
                                self._fail_window(manager, q, failure.reply)
                            manager.connection_failed(q, failure.reply, failure.host, failure.endpoint)
                            return
                        manager.connection_succeeded(q)
                    if not await self._send_batch(manager, q, conn, work, recorded):
                        conn = None
                        return
                finally:
                    manager.release(q, ids, recorded)
        finally:
            if conn is not None:
                await conn.close()

    @staticmethod
    def _load_batch(manager: Any, q: Any, ids: list[int],
                    keep_organisation_headers: bool) -> list[tuple[Any, list[Any], Any, OutboundMessage]]:
        """Each taken message's row, pending recipients here, body and outbound form (without organisation
        headers unless they may be kept); a message that can't be loaded heads for Poison alone."""
        work = []
        for message_id in ids:
            try:
                loaded = manager.load(message_id, q.key)
                if loaded is None or not loaded[1]:
                    continue
                msg, rcpts = loaded
                body = manager.store.body(msg)
                sent = body if keep_organisation_headers else _for_outside(body)
                out = OutboundMessage(
                    id=msg["id"], sender=msg["sender"], size=len(sent) if isinstance(sent, bytes) else sent.size, body=sent, body_type=msg["body_type"],
                    smtputf8=bool(msg["smtputf8"]), envid=msg["envid"], ret=msg["ret"],
                    lines_normalised=bool(msg["lines_normalised"]),
                    recipients=[OutRecipient(r["idx"], r["address"], r["orcpt"], r["notify"]) for r in rcpts])
                work.append((msg, rcpts, body, out))
            except Exception as exc:  # noqa: BLE001 - a message that breaks delivery heads for Poison
                log.exception("loading message %s for %s failed", message_id, q.key)
                manager.processing_error(message_id, exc)
        return work

    @staticmethod
    async def _send_batch(manager: Any, q: Any, conn: SmtpConnection,
                          work: list[tuple[Any, list[Any], Any, OutboundMessage]], recorded: set[int]) -> bool:
        """Send a batch over ``conn``, recording each message's outcomes as they come. False when the connection
        failed (and was closed here): the messages sent or being sent then without a known outcome are deferred,
        the ones not tried yet go back to the queue untouched."""
        def on_result(i: int, outcomes: list[Outcome]) -> None:
            msg, rcpts, body, _ = work[i]
            try:
                manager.record(q, msg, rcpts, outcomes, body=body, remote=conn.host.name or conn.address,
                               remote_ip=conn.address)
                recorded.add(msg["id"])
            except Exception as exc:  # noqa: BLE001 - a message that breaks delivery heads for Poison
                log.exception("recording the outcome of message %s failed", msg["id"])
                manager.processing_error(msg["id"], exc)

        try:
            await conn.send_many([out for *_, out in work], on_result)
            return True
        except (ConnectionLost, OSError, ProtocolViolation, ssl.SSLError, asyncio.TimeoutError) as exc:
            reply = f"421 4.4.2 Connection dropped due to {type(exc).__name__}: {exc}"
            for msg, rcpts, body, _ in work[:conn.current + 1]:
                if msg["id"] not in recorded:
                    manager.record(q, msg, rcpts, [Outcome(r["idx"], "transient", reply) for r in rcpts], body=body)
                    recorded.add(msg["id"])
            manager.connection_failed(q, reply, conn.host.name, conn.endpoint)
        except Exception as exc:  # noqa: BLE001 - the message being handled heads for Poison, the rest wait
            message_id = work[conn.current][0]["id"]
            log.exception("delivering message %s through %s failed", message_id, q.key)
            manager.processing_error(message_id, exc)
        await conn.close(quit=False)
        return False

    def _fail_window(self, manager: Any, q: Any, reply: str) -> None:
        """A permanent next-hop failure (null MX, nonexistent domain): every message here gets an NDR."""
        manager._refill(q, time.time() + 10 * 365 * 86400)
        while True:
            ids = manager.take(q, 50)
            if not ids:
                return
            for message_id in ids:
                loaded = manager.load(message_id, q.key)
                if loaded and loaded[1]:
                    msg, rcpts = loaded
                    manager.record(q, msg, rcpts, [Outcome(r["idx"], "permanent", reply) for r in rcpts],
                                   failure_source="DNS")
                else:
                    manager.release(q, [message_id])

    # -- mailboxes ----------------------------------------------------------------------------------
    def deliver_mailbox(self, settings: Any, work: list[tuple[Any, list[Any]]], bodies: list[Any]) -> list[list[Outcome]]:
        """Runs in a worker thread: write each recipient's copy into its Maildir."""
        routing = settings.routing
        results = []
        for (msg, rcpts), body in zip(work, bodies):
            outcomes = []
            for r in rcpts:
                resolution = routing.resolve(r["address"])
                if resolution.kind != "mailbox" or resolution.mailbox is None:
                    outcomes.append(Outcome(r["idx"], "permanent", MAILBOX_REJECTED))
                    continue
                box = resolution.mailbox
                path = maildir.mailbox_path(self.mailbox_root, box.primary_smtp_address)
                name = maildir.unique_name(msg["received_at"], msg["network_id"], r["idx"])
                trace = f"Return-Path: <{msg['sender']}>\r\nDelivered-To: {r['address']}\r\n".encode()
                try:
                    # Streamed: a spooled 30 MB body is written piece by piece, never held whole.
                    maildir.deliver(path, name, itertools.chain((trace,), body.chunks()))
                except OSError as exc:
                    outcomes.append(Outcome(r["idx"], "transient", f"452 4.3.1 Mailbox delivery failed: {exc.strerror}"))
                    continue
                outcomes.append(Outcome(r["idx"], "delivered", f"250 2.0.0 Delivered to {box.primary_smtp_address}"))
            results.append(outcomes)
        return results


def _for_outside(body: StoredBody) -> Any:
    """The body as it leaves the organisation: its header block without organisation headers."""
    head = body.head()
    outside = without_organisation_headers(head)
    if len(outside) == len(head):
        return body
    if not body.large:
        return outside + body.read()[len(head):]
    return _HeadReplaced(body, len(head), outside)


class _HeadReplaced:
    """A large (spooled) body read in chunks with a different header block in front."""

    large = True

    def __init__(self, body: StoredBody, old_head_length: int, head: bytes) -> None:
        self._body, self._skip, self._head = body, old_head_length, head
        self.size = body.size - old_head_length + len(head)

    def chunks(self) -> Any:
        yield self._head
        yield from self._body.chunks(self._skip)

    def read(self) -> bytes:
        return b"".join(self.chunks())


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
