"""One SMTP session on a receive connector: an asyncio Protocol that drives the
sans-I/O ``ServerProtocol`` and applies the connector's policy.

Processing is synchronous for the common path (EHLO, MAIL, RCPT, body bytes)
and pauses for the few things that wait: a durable commit, a password check,
the TLS handshake, a tarpit delay. While paused the session stops reading, so
its buffers stay bounded; replies to pipelined commands are sent together.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from mailgate.queue.pressure import NORMAL, is_disk_full
from mailgate.queue.store import NewMessage
from mailgate.receive import rights as R
from mailgate.receive.headers import HeaderBlock, fold, message_id_of, rfc5322_date
from mailgate.receive.message import IncomingMessage
from mailgate.receive.policy import ConnectorPolicy, ReceiveConfig
from mailgate.smtp import exps
from mailgate.smtp import replies as RP
from mailgate.smtp import server as S
from mailgate.smtp.address import Address
from mailgate.smtp.replies import Reply

if TYPE_CHECKING:
    from mailgate.receive.listeners import ReceiveServer

log = logging.getLogger("mailgate.receive")

_RESERVED_TLDS = {"test", "example", "invalid", "localhost"}
_RESERVED_SLDS = {"example.com", "example.net", "example.org"}

# X-MS-Exchange-Organization-AuthMechanism codes (reference §9.2)
_AUTH_CODES = {"none": "00", "mutualtls": "02", "tlsauthlogin": "06", "login": "07", "exchangeserver": "0B",
               "secureexternal": "10"}


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _subject_of(cert: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


class SmtpSession(asyncio.Protocol):
    def __init__(self, server: "ReceiveServer") -> None:
        self.server = server
        self.transport: Any = None
        self._out: list[bytes] = []
        self._blocked = False
        self._closing = False
        self._draining = False                    # the server is stopping: the next command gets 421
        self._reading_paused = False
        self._write_paused = False
        self.authenticated: str | None = None     # the mailbox's primary address
        self.org_server: str | None = None        # the organisation server that authenticated with X-EXPS
        self._via_data = False                    # the current message came with DATA (not BDAT)
        self.auth_mechanism = "none"
        self._auth_state: dict[str, Any] | None = None
        self.logon_failures = 0
        self.protocol_errors = 0
        self.tls_info: tuple[str, str] | None = None
        self.peer_cert: dict[str, Any] | None = None
        self.partner_domain: str | None = None   # set once domain security verified the partner's certificate
        self.helo = ""
        self._reset_envelope()
        self.messages = 0

    # -- connection lifecycle --------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # noqa: C901 - one place for the admission rules
        self.transport = transport
        self.started = self.last_activity = time.monotonic()
        self.config: ReceiveConfig = self.server.config
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        v6 = ":" in peer[0]
        self.remote = f"[{peer[0]}]:{peer[1]}" if v6 else f"{peer[0]}:{peer[1]}"
        self.local = f"[{sock[0]}]:{sock[1]}" if ":" in sock[0] else f"{sock[0]}:{sock[1]}"
        self.client_ip = peer[0]
        if v6 and peer[0].lower().startswith("::ffff:"):
            self.client_ip = str(ipaddress.ip_address(peer[0].split("%")[0]).ipv4_mapped)
        connector, self.local_ip = self.config.select(sock[0], sock[1], peer[0])
        self.local_address = sock[0]
        self.server.sessions.add(self)
        if self.config.refusing is not None:   # maintenance (Set-ServerComponentState): no new sessions
            transport.write(RP.SERVICE_NOT_AVAILABLE.encode())
            self.server.refused += 1
            self._close()
            return
        if connector is None:
            transport.write(f"554 5.7.1 {self.config.fqdn} No receive connector on this server accepts connections "
                            f"from {self.client_ip} to {self.local}\r\n".encode())
            self.server.refused += 1
            self._close()
            return
        self.policy: ConnectorPolicy = self.config.policies[connector.guid]
        self.connector = connector
        self.machine = S.ServerProtocol(self.policy.extensions(tls=False))
        self.plog = self.server.protocol_log.session(connector.identity, self.local, self.remote) \
            if self.policy.verbose_log and self.server.protocol_log.enabled else None
        if self.plog:
            self.plog.write("+")
        # Connections are counted only under the limits that are set: an unlimited count is never read.
        limits = [(k, limit) for k, limit in ((connector.guid, connector.max_inbound_connection),
                                              (f"{connector.guid}|{self.client_ip}", self.policy.per_source_limit))
                  if limit.value is not None]
        if limits:
            exceeded = self.server.counter.acquire(limits)
            if exceeded is not None:
                self._refuse(RP.CONCURRENT_CONNECTIONS if limits[exceeded][0] == connector.guid
                             else RP.CONCURRENT_PER_SOURCE)
                return
            self._counted = tuple(k for k, _ in limits)
        self.rights = self._compute_rights()
        if self.plog:
            self.plog.write("*", R.log_tokens(self.rights), "Set Session Permissions")
        self._write(self.policy.banner())
        self._arm_timer()

    def _refuse(self, reply: Reply) -> None:
        self._write(reply.encode())
        self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        """What ending a session releases (its connection counts, timer, unfinished message, place in the
        server's sessions). Once only: both asyncio's connection_lost and a failed STARTTLS come here, and after
        a failed TLS handshake asyncio never calls connection_lost (the slot stayed counted: twenty such
        attempts locked a client's address out until a restart)."""
        if getattr(self, "_ended", False):
            return
        self._ended = True
        self._release_connection_counts()
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        if self.message is not None:
            self.message.abandon()
            self.message = None
        if getattr(self, "plog", None):
            self.plog.write("-", "", "Remote" if not self._closing else "Local")
        if getattr(self, "machine", None) is not None:
            self.server.on_event("session_end", {"tls": self.machine.tls})
        self.server.sessions.discard(self)
        self._closing = True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        want_pause = self._blocked or self._write_paused
        if self.transport is None or self._closing:
            return
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()

    def _release_connection_counts(self) -> None:
        """Give back this session's places under MaxInboundConnection(PerSource), once. A session the server
        ends gives them back before its last reply: a client that reads 221 and connects again at once may
        reach another worker before this one has seen the close (1 in 30 such reconnections got 421 4.3.2
        with every place but this one taken)."""
        counted = getattr(self, "_counted", None)
        if counted:
            self._counted = None
            self.server.counter.release(*counted)

    def _close(self) -> None:
        if not self._closing:
            self._closing = True
            self._release_connection_counts()
            self.transport.close()

    def shutdown(self) -> None:
        """The server is stopping: end the session with 421 now, unless a message's body is arriving or being
        committed. That message may still be taken (``ReceiveServer.drain`` waits for it, within its grace):
        the client is answered, and its next command gets the 421 (``_process``)."""
        if self._closing:
            return
        self._draining = True
        machine = getattr(self, "machine", None)
        if self._blocked or (machine is not None and machine.state in S.BODY_STATES):
            return
        self._write(machine.reply(RP.SERVICE_NOT_AVAILABLE) if machine is not None
                    else RP.SERVICE_NOT_AVAILABLE.encode())
        self._close()

    # -- timers ------------------------------------------------------------------------
    def _arm_timer(self) -> None:
        c = self.connector
        now = time.monotonic()
        deadline = min(self.last_activity + c.connection_inactivity_timeout.seconds,
                       self.started + c.connection_timeout.seconds)
        self._timer = asyncio.get_running_loop().call_later(max(0.05, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        if self._closing:
            return
        c = self.connector
        now = time.monotonic()
        if now - self.started >= c.connection_timeout.seconds:
            self._write(self.machine.reply(RP.CONNECTION_TIMEOUT))
            self._close()
        elif now - self.last_activity >= c.connection_inactivity_timeout.seconds and not self._blocked:
            self._write(self.machine.reply(RP.TIMEOUT))
            self._close()
        else:
            self._arm_timer()

    # -- input --------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_activity = time.monotonic()
        self.machine.feed(data)
        if not self._blocked:
            self._process()

    def _process(self) -> None:
        machine = self.machine
        try:
            while not self._blocked and not self._closing:
                event = machine.next_event()
                if event is S.NEED_DATA:
                    break
                if self._draining and machine.state not in S.BODY_STATES:   # a command after the last message
                    self._reply(RP.SERVICE_NOT_AVAILABLE)
                    break
                self._dispatch(event)
        except Exception:  # noqa: BLE001 - a bug must end this session, not the server
            log.exception("session from %s on %s failed", self.client_ip, self.connector.identity)
            self._out.append(RP.LOCAL_ERROR.encode())
            self._flush()
            self._close()
            return
        self._flush()
        self._update_reading()

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._flush()

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            data = b"".join(self._out)
            if self.plog:
                for chunk in self._out:
                    self.plog.sent(chunk)
            self.transport.write(data)
        self._out = []

    def _reply(self, reply: Reply) -> None:
        self._out.append(self.machine.reply(reply))
        if reply.code >= 400:
            self.server.on_event("reject", {"code": reply.enhanced or str(reply.code)})
        if reply.code == 421:
            self._release_connection_counts()
            self._flush()
            self._close()

    def _block(self) -> None:
        self._blocked = True
        self._flush()
        self._update_reading()

    def _unblock(self) -> None:
        self._blocked = False
        if not self._closing:
            self._process()

    def _reply_later(self, reply: Reply, delay: float) -> None:
        """Send a reply after ``delay`` seconds (tarpitting), holding back later commands."""
        if delay <= 0:
            self._reply(reply)
            return
        self._block()

        def send() -> None:
            if self._closing:
                return
            self._reply(reply)
            self._unblock()

        asyncio.get_running_loop().call_later(delay, send)

    def _protocol_error(self, reply: Reply) -> None:
        self.protocol_errors += 1
        limit = self.connector.max_protocol_errors
        if limit.value is not None and self.protocol_errors > limit.value:
            self._reply(reply)
            self._reply(RP.TOO_MANY_ERRORS)
            return
        self._reply(reply)

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, ev: Any) -> None:
        if self.plog and not isinstance(ev, (S.BodyChunk, S.AuthResponse)):
            self._log_command(ev)
        if isinstance(ev, S.BodyChunk):
            if self.message is not None:
                self.message.add(ev.data)
        elif isinstance(ev, S.RcptTo):
            self._on_rcpt(ev)
        elif isinstance(ev, S.MailFrom):
            self._on_mail(ev)
        elif isinstance(ev, S.Hello):
            self._on_hello(ev)
        elif isinstance(ev, S.Data):
            self._on_data()
        elif isinstance(ev, S.Bdat):
            self._on_bdat(ev)
        elif isinstance(ev, S.BodyEnd):
            self._on_body_end(ev)
        elif isinstance(ev, S.Simple):
            self._on_simple(ev)
        elif isinstance(ev, S.Auth):
            self._on_auth(ev)
        elif isinstance(ev, S.AuthResponse):
            if self.plog:
                self.plog.received("***")
            self._on_auth_response(ev)
        elif isinstance(ev, S.BadCommand):
            self._protocol_error(ev.reply)

    def _log_command(self, ev: Any) -> None:
        if isinstance(ev, S.Auth):
            self.plog.received(f"AUTH {ev.mechanism}" + (" ***" if ev.initial else ""))
        elif isinstance(ev, S.BodyEnd):
            self.plog.write("*", "", f"{self.message.received if self.message else 0} bytes of message data received")
        elif isinstance(ev, S.Hello):
            self.plog.received(f"{ev.verb} {ev.domain}")
        elif isinstance(ev, S.MailFrom):
            self.plog.received(f"MAIL FROM:{ev.address.bracketed()}")
        elif isinstance(ev, S.RcptTo):
            self.plog.received(f"RCPT TO:{ev.raw}")
        elif isinstance(ev, S.Data):
            self.plog.received("DATA")
        elif isinstance(ev, S.Bdat):
            self.plog.received(f"BDAT {ev.size}" + (" LAST" if ev.last else ""))
        elif isinstance(ev, S.Simple):
            self.plog.received(f"{ev.verb} {ev.arg}".strip())
        elif isinstance(ev, S.BadCommand):
            self.plog.received(ev.line[:200])

    # -- commands ---------------------------------------------------------------------------------
    def _on_hello(self, ev: S.Hello) -> None:
        self.helo = ev.domain
        self._reset_envelope()
        self.machine.ext = self.policy.extensions(tls=self.machine.tls)
        self._reply(self.policy.ehlo_reply(ev.verb, self.client_ip, self.machine.tls))

    def _on_simple(self, ev: S.Simple) -> None:
        verb = ev.verb
        if verb == "QUIT":
            self._release_connection_counts()
            self._reply(RP.CLOSING)
            self._flush()
            self._close()
        elif verb == "RSET":
            self._reset_envelope()
            self._reply(RP.RESETTING)
        elif verb == "NOOP":
            self._reply(RP.OK)
        elif verb == "HELP":
            self._reply(RP.HELP)
        elif verb == "VRFY":
            self._reply(RP.CANNOT_VRFY)
        elif verb == "EXPN":
            self._reply(RP.NOT_IMPLEMENTED)
        elif verb == "STARTTLS":
            self._on_starttls()

    def _on_starttls(self) -> None:
        ctx = self.policy.ssl_context
        if ctx is None:
            self._reply(RP.TLS_UNAVAILABLE)
            return
        self._reply(RP.TLS_READY)
        self._block()
        asyncio.ensure_future(self._start_tls(ctx))

    async def _start_tls(self, ctx: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, ctx, server_side=True, ssl_handshake_timeout=30)
        except BaseException as exc:   # a failed handshake (any error), or the server stopping
            if self.plog:
                self.plog.write("*", "", f"TLS negotiation failed with error {type(exc).__name__}")
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            self._end()
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            return
        if transport is None:   # the connection closed during the handshake
            self._closing = True
            self._end()
            return
        self.transport = transport
        ssl_obj = transport.get_extra_info("ssl_object")
        cipher = transport.get_extra_info("cipher") or ("", "", 0)
        self.tls_info = (ssl_obj.version() if ssl_obj else "TLS", cipher[0])
        self.machine.tls_started()
        self.machine.ext = self.policy.extensions(tls=True)
        self.peer_cert = transport.get_extra_info("peercert") or None
        self.rights = self._compute_rights()
        if self.plog:
            self.plog.write("*", "", f"TLS protocol {self.tls_info[0]} negotiation succeeded using {self.tls_info[1]}")
            self.plog.write("*", "", "Client certificate: " + (_subject_of(self.peer_cert) if self.peer_cert
                                                                 else "'EmptyCertificate'"))
        self._unblock()

    # -- authentication ------------------------------------------------------------------------
    def _on_auth(self, ev: S.Auth) -> None:
        if self.authenticated or self.org_server:
            self._protocol_error(RP.AUTH_ALREADY)
            return
        if ev.exps:
            self._on_exps(ev)
            return
        if self.policy.auth_needs_tls(self.machine.tls):
            self._reply(RP.AUTH_REQUIRES_TLS)
            return
        offered = self.policy.auth_mechanisms(self.machine.tls)
        if ev.mechanism not in offered:
            self._protocol_error(RP.AUTH_UNRECOGNIZED)
            return
        if ev.mechanism == "PLAIN":
            if ev.initial is None:
                self._auth_state = {"mech": "PLAIN"}
                self._reply(RP.AUTH_CONTINUE)
            else:
                self._auth_plain(ev.initial)
        else:  # LOGIN
            if ev.initial is not None:
                user = self._b64(ev.initial)
                if user is None:
                    return
                self._auth_state = {"mech": "LOGIN", "user": user}
                self._reply(RP.AUTH_PASSWORD)
            else:
                self._auth_state = {"mech": "LOGIN"}
                self._reply(RP.AUTH_USERNAME)

    def _on_exps(self, ev: S.Auth) -> None:
        """Exchange Server authentication: the client proves it holds the organisation's key (smtp/exps.py)."""
        key = self.server.server_auth_key
        if ev.mechanism not in self.policy.exps_mechanisms(self.machine.tls) or key is None or ev.initial is not None:
            self._protocol_error(RP.AUTH_UNRECOGNIZED)
            return
        challenge = exps.new_challenge()
        self._auth_state = {"mech": "X-EXPS", "challenge": challenge}
        self._reply(Reply(334, None, base64.b64encode(challenge).decode()))

    def _exps_response(self, line: str, challenge: bytes) -> None:
        self._auth_state = None
        key = self.server.server_auth_key
        server = exps.verify_client(key, challenge, line, self.config.org_servers) if key else None
        if server is None:   # the proof doesn't match the organisation's key
            self._fail_logon(RP.EXPS_FAILED, "X-EXPS")
            return
        self.org_server = server
        self.auth_mechanism = "exchangeserver"
        self.rights = self._compute_rights()
        if self.plog:
            self.plog.write("*", R.log_tokens(self.rights), f"Inbound X-EXPS {exps.MECHANISM} succeeded for "
                                                            f"organisation server {server}")
        self._reply(Reply(235, "2.7.0", f"Authentication successful {exps.server_proof(key, challenge, server)}"))

    def _b64(self, text: str) -> str | None:
        try:
            return base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._auth_state = None
            self._protocol_error(RP.AUTH_BAD_BASE64)
            return None

    def _on_auth_response(self, ev: S.AuthResponse) -> None:
        state = self._auth_state
        if state is None:
            self._protocol_error(RP.BAD_SEQUENCE)
            return
        if ev.line.strip() == "*":
            self._auth_state = None
            self._reply(RP.AUTH_CANCELLED)
            return
        if state["mech"] == "X-EXPS":
            self._exps_response(ev.line, state["challenge"])
            return
        if state["mech"] == "PLAIN":
            self._auth_plain(ev.line.strip())
            return
        value = self._b64(ev.line.strip())
        if value is None:
            return
        if "user" not in state:
            state["user"] = value
            self._reply(RP.AUTH_PASSWORD)
        else:
            self._verify(state["user"], value, "LOGIN")

    def _auth_plain(self, token: str) -> None:
        value = self._b64(token)
        if value is None:
            return
        parts = value.split("\0")
        if len(parts) != 3:
            self._auth_state = None
            self._protocol_error(RP.AUTH_BAD_BASE64)
            return
        authzid, user, password = parts
        if authzid and authzid.lower() != user.lower():
            self._auth_state = None
            self._fail_logon()
            return
        self._verify(user, password, "PLAIN")

    def _verify(self, user: str, password: str, mechanism: str) -> None:
        self._auth_state = None
        self._block()
        future = asyncio.ensure_future(self.server.authenticate(user, password))

        def done(fut: asyncio.Future[Any]) -> None:
            if self._closing:
                return
            mailbox = None if fut.cancelled() or fut.exception() else fut.result()
            if mailbox is None:
                self._blocked = False
                self._fail_logon()  # may block again for AuthTarpitInterval
                if not self._blocked:
                    self._unblock()
                return
            self.authenticated = mailbox.primary_smtp_address
            self._mailbox_addresses = tuple(mailbox.addresses())
            self.auth_mechanism = "tlsauthlogin" if self.machine.tls else "login"
            self.rights = self._compute_rights()
            if self.plog:
                self.plog.write("*", R.log_tokens(self.rights), f"Inbound AUTH {mechanism} succeeded for {user}")
            self._reply(RP.AUTH_OK)
            self._unblock()

        future.add_done_callback(done)

    def _fail_logon(self, reply: Reply = RP.AUTH_FAILED, what: str = "AUTH") -> None:
        """A failed AUTH or X-EXPS: answered after AuthTarpitInterval; MaxLogonFailures ends the session."""
        self.logon_failures += 1
        if self.plog:
            self.plog.write("*", "", f"Inbound {what} failed because of LogonDenied")
        limit = self.connector.max_logon_failures
        if limit and self.logon_failures >= limit:
            self._reply(reply)
            self._reply(RP.TOO_MANY_LOGON_FAILURES)
            return
        self._reply_later(reply, self.connector.auth_tarpit_interval.seconds)

    # -- rights -------------------------------------------------------------------------------------
    def _compute_rights(self) -> R.Right:
        principals = R.session_principals(
            authenticated_as=self.authenticated, mailbox_names=getattr(self, "_mailbox_addresses", ()),
            partner=self.partner_domain is not None, externally_secured=self.policy.externally_secured,
            exchange_server=self.org_server is not None)
        return self.policy.rights(tuple(principals))

    # -- the envelope ---------------------------------------------------------------------------------
    def _reset_envelope(self) -> None:
        self.sender: Address | None = None
        self.mail_params: Any = None
        self.recipients: list[tuple[Address, Any]] = []
        msg = getattr(self, "message", None)
        if msg is not None:
            msg.abandon()
        self.message: IncomingMessage | None = None
        self.internal_id = 0

    def _domain_secured(self, domain: str) -> bool:
        """Domain security: TLS with a client certificate that verified and names the sender's domain."""
        from mailgate.send.smtp import _verify_name

        if not self.machine.tls or not self.peer_cert or not _verify_name(self.peer_cert, domain):
            if self.plog:
                self.plog.write("*", "", f"Domain secure check for {domain} failed: "
                                         + ("no TLS" if not self.machine.tls else "no valid client certificate for it"))
            return False
        if self.partner_domain != domain:
            self.partner_domain = domain
            self.rights = self._compute_rights()
            if self.plog:
                self.plog.write("*", R.log_tokens(self.rights), f"Domain secured partner {domain}")
        return True

    def _tarpit(self) -> float:
        return 0.0 if self.authenticated or self.org_server else self.connector.tarpit_interval.seconds

    def _on_mail(self, ev: S.MailFrom) -> None:
        c = self.connector
        if c.require_tls and not self.machine.tls:
            self._reply(RP.MUST_STARTTLS)
            return
        domain = ev.address.domain.lower()
        if c.domain_secure_enabled and domain in self.policy.domain_secure_domains:
            if not self._domain_secured(domain):
                self._reply(Reply(454, "4.7.5", f"Certificate validation failure: mail from the secure domain {domain} "
                                                "must arrive over TLS with a valid client certificate for that domain"))
                return
        elif self.partner_domain is not None:
            self.partner_domain = None
            self.rights = self._compute_rights()
        if R.Right.Submit not in self.rights:
            reply = RP.NOT_AUTHENTICATED if not self.authenticated and self.policy.auth_mechanisms(True) \
                else RP.NO_SUBMIT_PERMISSION
            self._reply(reply)
            return
        size = ev.params.size
        if size is not None and not c.max_message_size.allows(size) and R.Right.BypassMessageSizeLimit not in self.rights:
            self._reply(RP.MESSAGE_TOO_BIG)
            return
        sender = ev.address
        if not sender.is_null and R.Right.AcceptAnySender not in self.rights:
            if self.authenticated:
                if sender.lower() not in getattr(self, "_mailbox_addresses", ()):
                    self._reply(RP.NO_SEND_AS_PERMISSION)
                    return
            elif self.config.routing.is_authoritative(sender.domain) and \
                    R.Right.AcceptAuthoritativeDomainSender not in self.rights:
                self._reply(RP.NO_SEND_AS_PERMISSION)
                return
        pressure = self.server.pressure
        if pressure is not None and pressure.current() != NORMAL and \
                pressure.refuses(not sender.is_null and self.config.routing.is_authoritative(sender.domain)):
            self._reply(RP.INSUFFICIENT_RESOURCES)
            return
        if c.message_rate_limit.value is not None and not self._within_message_rate(c):
            self._reply(RP.RATE_EXCEEDED)
            return
        self.sender = sender
        self.mail_params = ev.params
        self.recipients = []
        self._reply(RP.SENDER_OK)

    def _within_message_rate(self, c: Any) -> bool:
        """MessageRateLimit: transactions per minute from one source (MessageRateSource: the client's IP address,
        the authenticated user, or both), counted across the worker processes; each count lasts a minute."""
        source = c.message_rate_source.value
        keys = []
        if source in ("IPAddress", "All"):
            keys.append(f"rate|{c.guid}|ip|{self.client_ip}")
        if source in ("User", "All") and self.authenticated:
            keys.append(f"rate|{c.guid}|user|{self.authenticated.lower()}")
        if not keys:
            return True
        if self.server.counter.acquire([(key, c.message_rate_limit) for key in keys]) is not None:
            return False
        asyncio.get_running_loop().call_later(60, self.server.counter.release, *keys)
        return True

    def _on_rcpt(self, ev: S.RcptTo) -> None:
        c = self.connector
        address = ev.address
        if not address.domain:
            if address.local.lower() == "postmaster":
                address = Address(address.local, self.config.routing.default_domain or self.policy.fqdn)
            elif c.default_domain:
                address = Address(address.local, c.default_domain.lower())
            else:
                self._protocol_error(RP.INVALID_RECIPIENT)
                return
        if len(self.recipients) >= c.max_recipients_per_message and \
                R.Right.BypassMessageSizeLimit not in self.rights:
            self._reply(RP.TOO_MANY_RECIPIENTS)
            return
        domain = address.domain
        labels = domain.strip("[]").split(".")
        if not domain.startswith("["):
            if c.reject_single_label_recipient_domains and len(labels) == 1:
                self._reply(Reply(501, "5.1.6", "Recipient addresses in single label domains not accepted"))
                return
            if (c.reject_reserved_top_level_recipient_domains and labels[-1] in _RESERVED_TLDS) or \
                    (c.reject_reserved_second_level_recipient_domains and ".".join(labels[-2:]) in _RESERVED_SLDS):
                self._reply(Reply(501, "5.1.4", "Recipient address reserved by RFC 2606"))
                return
        resolution = self.config.routing.resolve(str(address))
        if resolution.kind == "external" and R.Right.AcceptAnyRecipient not in self.rights:
            self._reply_later(RP.RELAY_DENIED, self._tarpit())
            return
        if resolution.kind == "unknown":
            self._reply_later(RP.RECIPIENT_NOT_FOUND, self._tarpit())
            return
        self.recipients.append((address, ev.params))
        self._reply(RP.RECIPIENT_OK)

    def _start_message(self) -> None:
        c = self.connector
        max_size = None if R.Right.BypassMessageSizeLimit in self.rights else c.max_message_size.bytes
        self.internal_id = self.server.store.allocate_id()
        self.network_id = str(uuid.uuid4())
        self.relayed_directionality: str | None = None
        self.message = IncomingMessage(self.server.store, max_size=max_size, max_header=c.max_header_size.bytes or 262144,
                                       on_headers=self._stamp_headers)

    def _on_data(self) -> None:
        if self.connector.require_tls and not self.machine.tls:
            self._reply(RP.MUST_STARTTLS)
            return
        if not self.recipients:
            self._reply(RP.NEED_RCPT)
            return
        self._start_message()
        self._via_data = True   # the state machine turned every line ending into CRLF (or refused the message)
        self._reply(RP.START_MAIL_INPUT)

    def _on_bdat(self, ev: S.Bdat) -> None:
        if self.message is None and self.recipients and self.sender is not None:
            if self.connector.require_tls and not self.machine.tls:
                return  # refused at the end of the chunk (the chunk is read either way)
            self._start_message()
            self._via_data = False   # BDAT content is stored as sent

    def _on_body_end(self, ev: S.BodyEnd) -> None:
        msg = self.message
        if msg is None:
            # BDAT after a refused RCPT list, or refused for TLS: the chunk was read and is dropped.
            self._reply(RP.MUST_STARTTLS if self.connector.require_tls and not self.machine.tls else RP.NEED_RCPT)
            self._reset_envelope()
            return
        if not ev.last:
            if msg.error is None:
                self._reply(Reply(250, "2.6.0", RP.CHUNK_OK.format(n=msg.received)))
            else:
                self._reply(msg.error)
                self._reset_envelope()
            return
        error = msg.error
        if error is None and ev.bare_linefeeds and self.connector.bare_linefeed_rejection_enabled:
            error = RP.BARE_LINEFEEDS
        if error is None and msg.headers is not None and self._hops_exceeded(msg.headers):
            error = RP.HOP_COUNT_EXCEEDED
        if error is not None:
            self._reply(error)
            self._reset_envelope()
            return
        self._commit(msg)

    def _hops_exceeded(self, headers: HeaderBlock) -> bool:
        """A loop: more Received headers than MaxHopCount, or more added by the organisation's own servers than
        MaxLocalHopCount (0: no local limit)."""
        c = self.connector
        if headers.count("Received") > c.max_hop_count:
            return True
        if not c.max_local_hop_count:
            return False
        return sum(1 for host in headers.received_by() if host in self.config.org_fqdns) > c.max_local_hop_count

    # -- headers ---------------------------------------------------------------------------------------
    def _stamp_headers(self, block: HeaderBlock) -> bytes:
        """Header firewall, then the trace and audit headers this server adds (prepended)."""
        block.strip(self.rights)
        self.subject = block.get("Subject")
        self.message_id = message_id_of(block)
        hops = block.count("Received")
        self._hop_exceeded = hops > self.connector.max_hop_count
        fqdn = self.policy.fqdn
        tls = self.tls_info
        if self.authenticated:
            proto = "ESMTPSA" if tls else "ESMTPA"
        else:
            proto = "ESMTPS" if tls else ("ESMTP" if self.machine.esmtp else "SMTP")
        with_clause = f"{proto} (version={tls[0]}, cipher={tls[1]})" if tls else proto
        recipient = f" for <{self.recipients[0][0]}>" if len(self.recipients) == 1 else ""
        lines = [fold("Received", f"from {self.helo or 'unknown'} ({self.client_ip}) by {fqdn} ({self.local_address}) "
                                  f"with {with_clause} id {self.internal_id}{recipient}; {rfc5322_date()}")]
        relayed_id = block.get("X-MS-Exchange-Organization-Network-Message-Id") if self.org_server else None
        if relayed_id and _is_uuid(relayed_id):
            # From another server of the organisation: its headers stand, and the message keeps its network id,
            # so tracking follows it from server to server.
            self.network_id = relayed_id
            directionality = block.get("X-MS-Exchange-Organization-MessageDirectionality")
            self.relayed_directionality = directionality if directionality in ("Incoming", "Originating") else None
        else:
            lines.append(self._audit_headers())
            lines.append(f"X-MS-Exchange-Organization-Network-Message-Id: {self.network_id}\r\n".encode())
        if self.message_id is None:
            self.message_id = f"<{self.network_id}@{fqdn}>"
            lines.append(fold("Message-ID", self.message_id))
        return b"".join(lines)

    def _audit_headers(self) -> bytes:
        """The organisation and X-Source headers: the same for every message from one client address in one
        session state (kept by the connector's policy)."""
        peer = _subject_of(self.peer_cert) if self.peer_cert else None
        key = (self.client_ip, self.authenticated, self.auth_mechanism, self.org_server, self.tls_info,
               self.partner_domain, peer)
        return self.policy.per_client(key, self._build_audit_headers)

    def _build_audit_headers(self) -> bytes:
        fqdn = self.policy.fqdn
        tls = self.tls_info
        auth_as = "Internal" if (self.authenticated or self.org_server or self.policy.externally_secured) \
            else "Anonymous"
        mech = _AUTH_CODES["secureexternal"] if self.policy.externally_secured else _AUTH_CODES[self.auth_mechanism]
        if self.partner_domain:
            auth_as, mech = "Partner", _AUTH_CODES["mutualtls"]
        org = [
            ("X-MS-Exchange-Organization-AuthSource", fqdn),
            ("X-MS-Exchange-Organization-AuthAs", auth_as),
            ("X-MS-Exchange-Organization-AuthMechanism", mech),
            ("X-MS-Exchange-Organization-MessageDirectionality", "Originating" if self.authenticated else "Incoming"),
            ("X-MS-Exchange-Organization-OriginalClientIPAddress", self.client_ip),
            ("X-Source", f"SMTP:{self.policy.identity}"),
            ("X-Source-IP", self.client_ip),
            ("X-Source-Auth", self.authenticated or "anonymous"),
            ("X-Source-AuthMechanism", {"none": "None", "login": "Login", "tlsauthlogin": "TLSAuthLogin"}.get(
                self.auth_mechanism, "None") if not self.policy.externally_secured else "ExternalAuthoritative"),
            ("X-Source-TLS", f"{tls[0]} {tls[1]}" if tls else "none"),
        ]
        if self.partner_domain:
            org.insert(3, ("X-MS-Exchange-Organization-AuthDomain", self.partner_domain))
        if self.peer_cert:
            org.append(("X-Source-TLS-Peer", _subject_of(self.peer_cert)))
        if self.authenticated:
            org.append(("X-Originating-IP", f"[{self.client_ip}]"))
        return b"".join(fold(name, value) for name, value in org)

    # -- commit ------------------------------------------------------------------------------------------
    def _commit(self, msg: IncomingMessage) -> None:
        try:
            body = msg.finish()
        except OSError as exc:
            self._storage_failed(exc, "storing a message body failed")
            self._reply(RP.INSUFFICIENT_RESOURCES)
            self._reset_envelope()
            return
        sender = self.sender or Address.null()
        params = self.mail_params
        now = time.time()
        pipeline = self.server.pipeline
        directionality = self.relayed_directionality or ("Originating" if self.authenticated else "Incoming")
        recipients = pipeline.categorise([(str(a), p.orcpt, ",".join(p.notify) if p.notify else None)
                                          for a, p in self.recipients], msg.stored_size, self.config,
                                         originating=directionality == "Originating")
        new = NewMessage(
            id=self.internal_id, network_id=self.network_id, message_id=self.message_id, sender=str(sender),
            subject=self.subject, size=msg.stored_size, received_at=now,
            expires_at=now + self.config.server.message_expiration_timeout.seconds, recipients=recipients, body=body,
            source=f"SMTP:{self.policy.identity}", source_ip=self.client_ip, client_hostname=self.helo,
            connector=self.policy.identity, auth_as=self.authenticated,
            directionality=directionality,
            envid=params.envid if params else None, ret=params.ret if params else None,
            body_type=params.body if params else None, smtputf8=bool(params and params.smtputf8),
            in_submission=any(r.queue == "Submission" for r in recipients),
            lines_normalised=self._via_data)
        self.message = None
        self._block()
        self.messages += 1

        def done(fut: Any) -> None:
            if self._closing and self.transport is None:
                return
            exc = fut.exception()
            if exc is not None:
                reply = RP.INSUFFICIENT_RESOURCES if self._storage_failed(exc, f"committing message {new.id} failed") \
                    else RP.LOCAL_ERROR
            else:
                reply = Reply(250, "2.6.0", RP.QUEUED.format(message_id=new.message_id, internal_id=new.id,
                                                             host=self.policy.fqdn))
            self._reset_envelope()
            if not self._closing:
                self._reply(reply)
                self._unblock()

        pipeline.submit(new, self._receive_event_fields(new), on_durable=done)

    def _storage_failed(self, exc: BaseException, what: str) -> bool:
        """Log a failed write of the queue; True when the disk is full (back pressure goes High)."""
        if is_disk_full(exc):
            log.warning("%s: the queue disk is full (%s)", what, exc)
            if self.server.pressure is not None:
                self.server.pressure.disk_full()
            return True
        log.error("%s: %s", what, exc)
        return False

    def _receive_event_fields(self, new: NewMessage) -> dict[str, Any]:
        return dict(client_ip=self.client_ip, client_hostname=self.helo, server_ip=self.local_address,
                    server_hostname=self.policy.fqdn, connector_id=self.policy.identity,
                    source_context=f"{self.plog.session_id if self.plog else ''};{len(self.recipients)} recipients",
                    original_client_ip=self.client_ip,
                    message_info=" ".join(filter(None, [*(self.tls_info or ()), _subject_of(self.peer_cert)
                                                         if self.peer_cert else None])) or None)
