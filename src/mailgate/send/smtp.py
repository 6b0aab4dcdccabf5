"""Outbound SMTP (and LMTP) sessions on the sans-I/O ``smtp.client`` helpers.

A ``SmtpConnection`` is opened to the first reachable host of a next hop,
negotiates STARTTLS and AUTH as the send connector's policy says, and then
carries messages one transaction after another (pipelined when the peer
offers PIPELINING), reporting each recipient's outcome.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from mailgate.routing.dns import Host
from mailgate.smtp import client as C
from mailgate.smtp import exps
from mailgate.smtp.address import a_labels
from mailgate.smtp.replies import Reply

EXPS_FAILED = "454 4.7.3 Cannot achieve Exchange Server authentication"
FAILOVER = ("Attempted failover to alternate host, but that did not succeed. Either there are no alternate hosts, "
            "or delivery failed to all alternate hosts. The last endpoint attempted was {endpoint}")


@dataclass(slots=True)
class OutRecipient:
    idx: int
    address: str
    orcpt: str | None = None
    notify: str | None = None


@dataclass(slots=True)
class OutboundMessage:
    id: int
    sender: str
    size: int
    recipients: list[OutRecipient]
    body: Any                  # bytes, or a queue StoredBody read in chunks
    body_type: str | None = None
    smtputf8: bool = False
    envid: str | None = None
    ret: str | None = None
    lines_normalised: bool = False   # every line ends in CRLF already (see queue.store.NewMessage)


@dataclass(slots=True)
class Outcome:
    idx: int
    kind: str          # delivered | transient | permanent
    reply: str
    relayed: bool = False  # accepted by a peer without DSN support (we owe a "relayed" DSN)
    over_limit: bool = False   # refused as beyond the peer's recipients per transaction (``_over_recipient_limit``)


@dataclass
class TlsPolicy:
    require: bool = False
    ignore_starttls: bool = False
    level: str = "EncryptionOnly"             # EncryptionOnly | CertificateValidation | DomainValidation
    domain: str | None = None                 # name the certificate must carry (DomainValidation)
    client_context: Callable[[ssl.SSLContext], None] | None = None   # loads our client certificate
    ca_pem: str | None = None                 # extra trusted roots (imported certificates)


@dataclass
class SessionSettings:
    helo_name: str
    port: int = 25
    force_helo: bool = False
    tls: TlsPolicy = field(default_factory=TlsPolicy)
    auth: tuple[str, str] | None = None
    auth_require_tls: bool = False
    timeout: float = 600.0
    connect_timeout: float = 30.0
    lmtp: bool = False
    log: Any = None                           # a ProtocolSession factory (local, remote) → session, or None
    exchange_auth: tuple[bytes, str] | None = None   # (organisation key, this server's name): X-EXPS, smtp/exps.py


class ConnectFailure(Exception):
    """No host of the next hop could be used; ``reply`` is the queue's LastError."""

    def __init__(self, reply: str, endpoint: str = "", host: str = "", permanent: bool = False) -> None:
        super().__init__(reply)
        self.reply = reply
        self.endpoint = endpoint
        self.host = host
        self.permanent = permanent


class ConnectionLost(Exception):
    pass


def _endpoint(address: str, port: int) -> str:
    return f"{address}:{port}" if ":" not in address else f"[{address}]:{port}"


def _verify_name(cert: dict[str, Any], wanted: str) -> bool:
    names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    wanted = wanted.lower().rstrip(".")
    for name in names:
        name = name.lower().rstrip(".")
        if wanted.startswith("*."):
            if name == wanted or (name.startswith("*.") and name[2:] == wanted[2:]):
                return True
            if name.endswith(wanted[1:]) and name.count(".") == wanted.count("."):
                return True
        elif name == wanted:
            return True
        elif name.startswith("*.") and wanted.endswith(name[1:]) and wanted.count(".") == name.count("."):
            return True
    return False


def client_context(policy: TlsPolicy) -> ssl.SSLContext:
    from mailgate.tls.certs import harden

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    harden(ctx)
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.check_hostname = False
    if policy.level in ("CertificateValidation", "DomainValidation"):
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_default_certs()
        if policy.ca_pem:
            ctx.load_verify_locations(cadata=policy.ca_pem)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if policy.client_context is not None:
        policy.client_context(ctx)
    return ctx


class SmtpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: SessionSettings,
                 host: Host, address: str, log: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.settings = settings
        self.host = host
        self.address = address
        self.endpoint = _endpoint(address, host.port or settings.port)
        self.parser = C.ReplyParser()
        self.pending: list[Reply] = []
        self.extensions: dict[str, str] = {}
        self.tls: tuple[str, str] | None = None
        self.peer_certificate: dict[str, Any] | None = None
        self.log = log
        self.messages_sent = 0
        self._in_transaction = False   # MAIL was accepted and the transaction didn't end: RSET before the next
        self.current = 0               # which message of ``send_many``'s list is being handled
        self.banner = ""
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None   # while a reply is awaited: when the wait began
        self._timed_out = False
        self._watchdog = self._loop.call_later(self._watch_period(), self._watch)

    def _watch_period(self) -> float:
        return max(0.05, self.settings.timeout / 10)

    def _watch(self) -> None:
        """The reply timeout, kept by one timer per connection that looks every tenth of the timeout: a timer
        made and cancelled around every reply (``asyncio.timeout``) cost ≈ 4 % of the server's time under load.
        A reply awaited for longer than the timeout ends the connection, so the wait sees it closed."""
        if self.writer.is_closing():
            return
        since = self._waiting_since
        if since is not None and self._loop.time() - since >= self.settings.timeout:
            self._timed_out = True
            self.writer.transport.abort()
            return
        self._watchdog = self._loop.call_later(self._watch_period(), self._watch)

    # -- opening -----------------------------------------------------------------------
    @classmethod
    async def open(cls, hosts: list[Host], settings: SessionSettings, *, domain: str = "") -> "SmtpConnection":
        last_error = "no hosts"
        last_endpoint = ""
        last_host = ""
        for host in hosts:
            port = host.port or settings.port
            for address in host.addresses:
                endpoint = _endpoint(address, port)
                last_endpoint, last_host = endpoint, host.name or address
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(address, port, limit=1 << 20), settings.connect_timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                    last_error = (f'441 4.4.1 Error encountered while communicating with primary target IP address: '
                                  f'"Failed to connect: {reason}."')
                    continue
                sock = writer.get_extra_info("sockname")
                local = f"{sock[0]}:{sock[1]}" if sock else ""
                log = settings.log(local, endpoint) if settings.log else None
                conn = cls(reader, writer, settings, host, address, log)
                try:
                    await conn._handshake(domain)
                    return conn
                except _HostRefused as refusal:
                    last_error = (f'451 4.4.0 Primary target IP address responded with: "{refusal.reply}." ')
                    await conn.close(quit=False)
                    if refusal.fatal:
                        raise ConnectFailure(refusal.reply, endpoint, last_host) from None
                except ssl.SSLCertVerificationError as exc:
                    last_error = f"454 4.7.5 Certificate validation failure: {exc.verify_message or exc.reason}."
                    await conn.close(quit=False)
                except (ConnectionLost, OSError, asyncio.TimeoutError, ssl.SSLError, C.ProtocolViolation) as exc:
                    last_error = f'421 4.4.2 Connection dropped: {type(exc).__name__}: {exc}'
                    await conn.close(quit=False)
        raise ConnectFailure(f"{last_error.rstrip()} {FAILOVER.format(endpoint=last_endpoint)}", last_endpoint, last_host)

    async def _handshake(self, domain: str) -> None:
        banner = await self._reply()
        self.banner = str(banner)
        if banner.code != 220:
            raise _HostRefused(str(banner), fatal=False)
        await self._hello()
        policy = self.settings.tls
        offered = "STARTTLS" in self.extensions
        if offered and not policy.ignore_starttls:
            reply = await self._command(b"STARTTLS\r\n")
            if reply.code != 220:
                if policy.require:
                    raise _HostRefused(f"451 5.7.3 STARTTLS is required to send mail; the peer answered {reply}",
                                       fatal=False)
            else:
                await self._start_tls(policy, domain)
                await self._hello()
        elif policy.require:
            raise _HostRefused("451 5.7.3 STARTTLS is required to send mail", fatal=False)
        if self.settings.exchange_auth is not None:
            await self._exchange_authenticate()
        elif self.settings.auth is not None:
            await self._authenticate()

    async def _exchange_authenticate(self) -> None:
        """X-EXPS to another server of the organisation; its answer must prove it holds the key too."""
        key, server = self.settings.exchange_auth  # type: ignore[misc]
        if exps.MECHANISM not in self.extensions.get("X-EXPS", "").upper().split():
            raise _HostRefused(f"{EXPS_FAILED}: {self.host.name or self.address} doesn't offer X-EXPS "
                               f"{exps.MECHANISM}", fatal=False)
        reply = await self._command(f"X-EXPS {exps.MECHANISM}\r\n".encode())
        if reply.code == 334:
            try:
                line, challenge = exps.client_response(key, reply.lines[0], server)
            except (ValueError, IndexError):
                raise _HostRefused(f"{EXPS_FAILED}: the challenge isn't base64", fatal=False) from None
            reply = await self._command(line + b"\r\n", secret=True)
            if reply.code == 235 and exps.verify_server(key, challenge, server, reply.lines[-1]):
                return
            if reply.code == 235:
                raise _HostRefused(f"{EXPS_FAILED}: {self.host.name or self.address} couldn't prove it belongs to "
                                   f"the organisation", fatal=False)
        raise _HostRefused(f"{EXPS_FAILED}: {reply}", fatal=False)

    async def _hello(self) -> None:
        verb = "LHLO" if self.settings.lmtp else ("HELO" if self.settings.force_helo else "EHLO")
        reply = await self._command(C.ehlo_command(self.settings.helo_name, verb))
        if reply.code != 250 and verb == "EHLO":
            reply = await self._command(C.ehlo_command(self.settings.helo_name, "HELO"))
        if reply.code != 250:
            raise _HostRefused(str(reply), fatal=False)
        self.extensions = {}
        if verb != "HELO":
            for line in reply.lines[1:]:
                key, _, value = line.partition(" ")
                self.extensions[key.upper()] = value

    async def _start_tls(self, policy: TlsPolicy, domain: str) -> None:
        ctx = client_context(policy)
        server_name = self.host.name or None
        await self.writer.start_tls(ctx, server_hostname=server_name)
        ssl_obj = self.writer.get_extra_info("ssl_object")
        self.tls = (ssl_obj.version() or "TLS", (ssl_obj.cipher() or ("",))[0])
        self.peer_certificate = ssl_obj.getpeercert() if policy.level != "EncryptionOnly" else None
        if self.log:
            self.log.write("*", "", f"TLS negotiation succeeded: {self.tls[0]} {self.tls[1]}")
        if policy.level == "DomainValidation":
            wanted = policy.domain or domain
            if not self.peer_certificate or not _verify_name(self.peer_certificate, wanted):
                raise _HostRefused(f"454 4.7.5 Certificate validation failure: the certificate of {self.host.name or self.address} "
                                   f"is not valid for {wanted}", fatal=False)

    async def _authenticate(self) -> None:
        user, password = self.settings.auth  # type: ignore[misc]
        if self.settings.auth_require_tls and self.tls is None:
            raise _HostRefused("530 5.7.0 The smart host requires TLS before the credentials can be sent "
                               "(SmartHostAuthMechanism BasicAuthRequireTLS)", fatal=False)
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            reply = await self._command(C.auth_plain(user, password), secret=True)
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN\r\n")
            if reply.code == 334:
                reply = await self._command(base64.b64encode(user.encode()) + b"\r\n", secret=True)
            if reply.code == 334:
                reply = await self._command(base64.b64encode(password.encode()) + b"\r\n", secret=True)
        else:
            raise _HostRefused("530 5.7.0 The smart host doesn't offer AUTH PLAIN or LOGIN, so the connector's "
                               "credentials can't be used", fatal=False)
        if reply.code != 235:
            raise _HostRefused(str(reply), fatal=False)

    # -- I/O ------------------------------------------------------------------------------------
    async def _reply(self) -> Reply:
        """The next reply, which must be complete within the timeout: a peer that trickles a byte at a time
        doesn't hold the connection longer than one that says nothing."""
        if not self.pending:
            self._waiting_since = self._loop.time()
            try:
                while not self.pending:
                    data = await self.reader.read(65536)
                    if not data:
                        raise ConnectionLost("timed out waiting for the peer" if self._timed_out
                                             else "the peer closed the connection")
                    self.pending.extend(self.parser.feed(data))
            finally:
                self._waiting_since = None
        reply = self.pending.pop(0)
        if self.log:
            self.log.write("<", str(reply))
        return reply

    async def _command(self, data: bytes, *, secret: bool = False) -> Reply:
        self._send(data, secret=secret)
        await self._drain()
        return await self._reply()

    async def _drain(self) -> None:
        """Wait until what was written can be buffered again, within the timeout: a peer that stops reading
        (a full window) ends the attempt instead of holding it for ever."""
        transport = self.writer.transport
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
            # At or below the low-water mark writing is never paused: nothing to wait for, no timer to set
            # (drain still raises if the connection is lost).
            await self.writer.drain()
            return
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise ConnectionLost("timed out sending to the peer (it stopped reading)") from None

    def _send(self, data: bytes, *, secret: bool = False) -> None:
        self._log_sent(data, secret=secret)
        self.writer.write(data)

    def _log_sent(self, commands: bytes, *, secret: bool = False) -> None:
        if self.log:
            for line in commands.decode("utf-8", "replace").split("\r\n")[:-1] or [""]:
                self.log.write(">", "***" if secret else line)

    def _log_message(self, msg: OutboundMessage) -> None:
        if self.log:
            self.log.write("*", "", f"sending message with RecordId {msg.id}")

    # -- transactions ------------------------------------------------------------------------------
    async def send(self, msg: OutboundMessage) -> list[Outcome]:
        """One message: each recipient's outcome."""
        results: dict[int, list[Outcome]] = {}
        await self.send_many([msg], results.__setitem__)
        return results[0]

    async def send_many(self, msgs: list[OutboundMessage], on_result: Callable[[int, list[Outcome]], None]) -> None:
        """Messages one transaction after another; ``on_result(i, outcomes)`` as soon as message i's are known.
        An exception (the connection failed) leaves the rest unreported; ``current`` says which message was
        being handled then.

        To a peer that pipelines but doesn't offer CHUNKING, a message's body and its dot go out in the same
        write as the next message's MAIL, RCPT and DATA (RFC 2920 lets the message content open a command
        group): one round trip per message instead of two.

        A peer out of room for recipients answers 452 to the RCPTs beyond its limit (Exchange after
        MaxRecipientsPerMessage, Postfix after smtpd_recipient_limit); when the same transaction delivered to
        the others, the refused ones go at once in a further transaction (RFC 5321 4.5.3.1.10), see
        ``_Transactions``."""
        plan = _Transactions(msgs, on_result)
        self.current = 0
        try:
            await self._send_planned(plan)
        except BaseException:
            plan.report_unfinished()
            raise

    async def _send_planned(self, plan: "_Transactions") -> None:
        carry = b""                                                    # a body and its dot, not yet written
        awaiting: _Awaited | None = None                               # whose reply ends `carry`
        while plan.todo or awaiting is not None:
            if not plan.todo:   # the last reply may still add a transaction (``_Transactions.report``)
                await self._end_carried(carry, awaiting, plan)
                carry, awaiting = b"", None
                continue
            i, msg = plan.todo.popleft()
            self.current = max(self.current, i)
            if self._in_transaction:   # the previous message ended early (no recipient, DATA refused, BDAT failed)
                if not await self.reset():
                    raise ConnectionLost("the peer refused RSET after an unfinished transaction")
                self._in_transaction = False
            envelope = self._prepare(msg)
            if isinstance(envelope, list):
                plan.report(i, msg, envelope)
                continue
            chainable = envelope.pipelining and not envelope.use_bdat and not self.settings.lmtp
            body = _in_memory(msg.body) if chainable else None
            if body is None:
                if awaiting is not None:
                    await self._end_carried(carry, awaiting, plan)
                    carry, awaiting = b"", None
                plan.report(i, msg, await self._transaction(msg, envelope))
                continue
            commands = b"".join([envelope.mail, *envelope.rcpts, b"DATA\r\n"])
            self._log_sent(commands)
            self.writer.write(carry + commands)
            carry = b""
            await self._drain()
            if awaiting is not None:
                self._finish(awaiting, [await self._reply()], plan)
                awaiting = None
            mail_reply = await self._reply()
            rcpt_replies = [await self._reply() for _ in envelope.rcpts]
            data_reply = await self._reply()
            accepted, outcomes = await self._settle(msg, envelope, mail_reply, rcpt_replies, data_reply)
            if accepted is None:
                plan.report(i, msg, outcomes)
                continue
            self._log_message(msg)
            stuffer = C.DotStuffer(normalised=msg.lines_normalised)
            carry = stuffer.feed(body) + stuffer.finish()
            awaiting = _Awaited(i, msg, accepted, outcomes, envelope.dsn)
            self._in_transaction = False   # the dot in `carry` ends it, whatever the reply

    async def _end_carried(self, carry: bytes, awaiting: "_Awaited", plan: "_Transactions") -> None:
        self.writer.write(carry)
        await self._drain()
        self._finish(awaiting, [await self._reply()], plan)

    def _finish(self, awaiting: "_Awaited", final: list[Reply], plan: "_Transactions") -> None:
        plan.report(awaiting.i, awaiting.msg,
                    awaiting.outcomes + self._final_outcomes(awaiting.accepted, final, awaiting.dsn))

    def _prepare(self, msg: OutboundMessage) -> "_Envelope | list[Outcome]":
        """The commands of a message's envelope, or its outcomes if this peer can't take it."""
        ext = self.extensions
        size_limit = ext.get("SIZE", "")
        if size_limit.isdigit() and int(size_limit) and msg.size > int(size_limit):
            return [Outcome(r.idx, "permanent", f"552 5.3.4 Message size exceeds fixed maximum message size of the "
                                                f"peer ({int(size_limit):,} bytes)") for r in msg.recipients]
        sender, recipients = msg.sender, [r.address for r in msg.recipients]
        needs_utf8 = not sender.isascii() or not all(a.isascii() for a in recipients)
        if needs_utf8 and "SMTPUTF8" not in ext:
            # Only a domain in Unicode can be written for such a peer: in A-labels, as Postfix does (RFC 5890).
            ascii_sender, ascii_recipients = _in_a_labels(sender), [_in_a_labels(a) for a in recipients]
            if ascii_sender is None or None in ascii_recipients:
                return [Outcome(r.idx, "permanent", "553 5.6.7 The peer doesn't support SMTPUTF8, which the "
                                                    "addresses of this message need") for r in msg.recipients]
            sender, recipients, needs_utf8 = ascii_sender, ascii_recipients, False
        binary = msg.body_type == "BINARYMIME"
        if binary and not ("BINARYMIME" in ext and "CHUNKING" in ext):
            return [Outcome(r.idx, "permanent", "554 5.6.3 The message is BINARYMIME and the peer doesn't support "
                                                "it; conversion isn't possible") for r in msg.recipients]
        dsn = "DSN" in ext
        body = msg.body_type if msg.body_type in ("8BITMIME", "BINARYMIME") and msg.body_type in ext else None
        try:
            # SMTPUTF8 goes with an envelope that needs it, and whenever the sender asked for it (its header may
            # hold UTF-8 with an ASCII envelope, RFC 6532) and the peer offers it, as Postfix passes it on.
            mail = C.mail_command(sender, size=msg.size if "SIZE" in ext else None, body=body,
                                  smtputf8=(needs_utf8 or msg.smtputf8) and "SMTPUTF8" in ext, ret=msg.ret if dsn else None,
                                  envid=msg.envid if dsn else None)
            rcpts = [C.rcpt_command(address, notify=tuple(r.notify.split(",")) if dsn and r.notify else None,
                                    orcpt=r.orcpt if dsn else None) for r, address in zip(msg.recipients, recipients)]
        except ValueError as exc:
            return [Outcome(r.idx, "permanent", f"550 5.1.3 {exc}") for r in msg.recipients]
        # Like Exchange, the body goes as BDAT whenever the peer offers CHUNKING (LMTP keeps DATA, whose
        # reply is per recipient).
        use_bdat = "CHUNKING" in ext and (binary or not self.settings.lmtp)
        return _Envelope(mail, rcpts, use_bdat, "PIPELINING" in ext, dsn)

    async def _settle(self, msg: OutboundMessage, envelope: "_Envelope", mail_reply: Reply,
                      rcpt_replies: list[Reply], data_reply: Reply | None) -> tuple[list[OutRecipient] | None,
                                                                                    list[Outcome]]:
        """The envelope's replies: the recipients whose body may follow (None: the transaction is over) and
        the outcomes known so far."""
        if mail_reply.code != 250:
            if data_reply is not None and data_reply.code == 354:
                await self._abort_data()
            return None, self._all(msg, mail_reply)
        self._in_transaction = True
        accepted = [r for r, reply in zip(msg.recipients, rcpt_replies) if reply.code in (250, 251)]
        outcomes = [_rcpt_outcome(r, reply) for r, reply in zip(msg.recipients, rcpt_replies)
                    if reply.code not in (250, 251)]
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                await self._abort_data()
                self._in_transaction = False
            return None, outcomes
        if not envelope.use_bdat and (data_reply is None or data_reply.code != 354):
            reply = data_reply or Reply(451, "4.4.0", "DATA was not accepted")
            return None, outcomes + [Outcome(r.idx, _kind(reply), str(reply)) for r in accepted]
        return accepted, outcomes

    def _final_outcomes(self, accepted: list[OutRecipient], final: list[Reply], dsn: bool) -> list[Outcome]:
        """The accepted recipients' outcomes from the reply (LMTP: the replies) to the end of the body."""
        self.messages_sent += 1
        outcomes = []
        for i, r in enumerate(accepted):
            reply = final[i] if self.settings.lmtp else final[0]
            kind = "delivered" if reply.code == 250 else _kind(reply)
            outcomes.append(Outcome(r.idx, kind, str(reply), relayed=kind == "delivered" and not dsn))
        return outcomes

    async def _transaction(self, msg: OutboundMessage, envelope: "_Envelope") -> list[Outcome]:
        """A transaction that ends in its own round trip: BDAT, LMTP, a peer that doesn't pipeline, a body
        read from its file piece by piece."""
        mail, rcpts, use_bdat, pipelining = envelope.mail, envelope.rcpts, envelope.use_bdat, envelope.pipelining
        # A BDAT body held in memory goes in the same write as the envelope: MAIL, every RCPT, "BDAT n LAST"
        # and the body (RFC 2920, RFC 3030), one round trip per message.
        inline = _in_memory(msg.body) if use_bdat and pipelining else None
        bdat_reply: Reply | None = None
        if pipelining:
            commands = b"".join([mail, *rcpts, b"" if use_bdat else b"DATA\r\n"])
            if inline is not None:
                commands += f"BDAT {len(inline)} LAST\r\n".encode()
                self._log_sent(commands)
                self._log_message(msg)
                self.writer.write(commands + inline)
            else:
                self._send(commands)
            await self._drain()
            mail_reply = await self._reply()
            rcpt_replies = [await self._reply() for _ in rcpts]
            data_reply = await self._reply() if not use_bdat else None
            if inline is not None:
                bdat_reply = await self._reply()
                # RFC 3030: after a refused BDAT the client resets before the next transaction.
                self._in_transaction = bdat_reply.code != 250
        else:
            mail_reply = await self._command(mail)
            if mail_reply.code != 250:
                return self._all(msg, mail_reply)
            rcpt_replies = [await self._command(r) for r in rcpts]
            data_reply = None
            if not use_bdat and any(r.code in (250, 251) for r in rcpt_replies):
                data_reply = await self._command(b"DATA\r\n")
        accepted, outcomes = await self._settle(msg, envelope, mail_reply, rcpt_replies, data_reply)
        if accepted is None:
            return outcomes
        if use_bdat:
            final = [bdat_reply if bdat_reply is not None else await self._send_bdat(msg)]
        else:
            self._log_message(msg)
            stuffer = C.DotStuffer(normalised=msg.lines_normalised)
            pending = b""
            for chunk in _chunks(msg.body):
                if pending:
                    self.writer.write(pending)
                    await self._drain()
                pending = stuffer.feed(chunk)
            self.writer.write(pending + stuffer.finish())   # the last piece and the terminator together
            await self._drain()
            if self.settings.lmtp:
                final = [await self._reply() for _ in accepted]
            else:
                final = [await self._reply()]
        self._in_transaction = use_bdat and final[0].code != 250   # a refused BDAT chunk leaves it open
        return outcomes + self._final_outcomes(accepted, final, envelope.dsn)

    async def _send_bdat(self, msg: OutboundMessage) -> Reply:
        """The body as BDAT chunks; every chunk but the last is answered before the next goes out."""
        self._log_message(msg)
        previous: bytes | None = None
        for chunk in _chunks(msg.body):
            if previous is not None:
                reply = await self._command(f"BDAT {len(previous)}\r\n".encode() + previous)
                if reply.code != 250:
                    return reply
            previous = chunk
        previous = previous or b""
        return await self._command(f"BDAT {len(previous)} LAST\r\n".encode() + previous)

    async def _abort_data(self) -> None:
        """DATA was accepted but no recipient was: send an empty body so the session stays in step."""
        self.writer.write(b".\r\n")
        await self._drain()
        await self._reply()

    @staticmethod
    def _all(msg: OutboundMessage, reply: Reply) -> list[Outcome]:
        return [Outcome(r.idx, _kind(reply), str(reply)) for r in msg.recipients]

    async def reset(self) -> bool:
        try:
            return (await self._command(b"RSET\r\n")).code == 250
        except (ConnectionLost, OSError):
            return False

    async def close(self, *, quit: bool = True) -> None:
        try:
            if quit and not self.writer.is_closing():
                self._send(b"QUIT\r\n")
                await asyncio.wait_for(self.writer.drain(), 5)
                try:
                    await asyncio.wait_for(self._reply(), 5)
                except (ConnectionLost, asyncio.TimeoutError, C.ProtocolViolation):
                    pass
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self._watchdog.cancel()
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass
            if self.log:
                self.log.write("-", "", "Local")


class _HostRefused(Exception):
    def __init__(self, reply: str, *, fatal: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.fatal = fatal


@dataclass(slots=True)
class _Envelope:
    mail: bytes
    rcpts: list[bytes]
    use_bdat: bool
    pipelining: bool
    dsn: bool


@dataclass(slots=True)
class _Awaited:
    """A chained message whose body went out with the next envelope: its reply is read after that one's."""
    i: int
    msg: OutboundMessage
    accepted: list[OutRecipient]
    outcomes: list[Outcome]
    dsn: bool


class _Transactions:
    """The transactions ``send_many`` has still to make, and the reporting of each message's outcomes.

    A message whose transaction delivered to some recipients while the peer refused others as over its limit
    (``Outcome.over_limit``) gets a further transaction, made next, for those; its outcomes are reported
    once, all together, when no recipient is left to try at once. A 452 to every recipient, or in a
    transaction that delivered nothing, is the peer's trouble, not its limit: reported as it is, for a retry.
    If the connection fails first, ``report_unfinished`` reports such a message with what is known and the
    452s (those recipients wait for the retry), so nothing delivered is sent again."""

    def __init__(self, msgs: list[OutboundMessage], on_result: Callable[[int, list[Outcome]], None]) -> None:
        self.todo: deque[tuple[int, OutboundMessage]] = deque(enumerate(msgs))
        self._on_result = on_result
        self._known: dict[int, list[Outcome]] = {}      # outcomes of a message whose further transaction is due
        self._refused: dict[int, list[Outcome]] = {}    # the 452s that transaction is trying again

    def report(self, i: int, msg: OutboundMessage, outcomes: list[Outcome]) -> None:
        known = self._known.pop(i, [])
        self._refused.pop(i, None)
        refused = [o for o in outcomes if o.over_limit]
        if refused and any(o.kind == "delivered" for o in outcomes):
            again = {o.idx for o in refused}
            self._known[i] = known + [o for o in outcomes if o.idx not in again]
            self._refused[i] = refused
            self.todo.appendleft((i, replace(msg, recipients=[r for r in msg.recipients if r.idx in again])))
            return
        self._on_result(i, known + outcomes)

    def report_unfinished(self) -> None:
        for i, known in self._known.items():
            self._on_result(i, known + self._refused[i])
        self._known.clear()
        self._refused.clear()


def _chunks(body: Any) -> Any:
    return [body] if isinstance(body, bytes) else body.chunks()


def _in_memory(body: Any) -> bytes | None:
    """The whole body, unless it is large enough to be read from its file piece by piece."""
    return body if isinstance(body, bytes) else None if body.large else body.read()


def _in_a_labels(address: str) -> str | None:
    """``address`` with its domain in A-labels (``xn--``), or None when its local part isn't ASCII (nothing can
    stand for it without SMTPUTF8) or its domain isn't a valid internationalised name."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    ascii_domain = a_labels(domain) if at and local.isascii() else None
    return f"{local}@{ascii_domain}" if ascii_domain is not None else None


def _over_recipient_limit(reply: Reply) -> bool:
    """A RCPT refused because the transaction has as many recipients as the peer takes: 452 (RFC 5321
    4.5.3.1.10), or the 552 "too many recipients" of RFC 821, which RFC 5321 says to take as 452."""
    if reply.code == 452:
        return True
    return reply.code == 552 and (reply.enhanced == "5.5.3" or "too many recipients" in " ".join(reply.lines).lower())


def _rcpt_outcome(recipient: OutRecipient, reply: Reply) -> Outcome:
    if _over_recipient_limit(reply):
        return Outcome(recipient.idx, "transient", str(reply), over_limit=True)
    return Outcome(recipient.idx, _kind(reply), str(reply))


def _kind(reply: Reply) -> str:
    if reply.code >= 500:
        return "permanent"
    return "transient"

