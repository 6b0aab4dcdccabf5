"""Real network peers the tests start on loopback: a DNS server (dnspython),
SMTP servers (aiosmtpd) that receive, refuse, defer, demand TLS or AUTH, and a
scripted pipelining server that keeps the bytes of each read."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any, Callable

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session


class DnsServer:
    """An authoritative-only UDP DNS server for test zones: ``records[(name, type)] = [rdata, ...]``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.queries: list[tuple[str, str]] = []
        self.fail = False     # answer SERVFAIL to everything
        self.silent = False   # answer nothing (a resolver times out)
        self.negative_ttl: int | None = 1   # how long a "no such name/record" may be cached (None: no SOA)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._running = True
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}#{self.port}"

    def add(self, name: str, rtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rtype.upper()), []).extend(values)

    def _serve(self) -> None:
        while self._running:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - garbage in a test: ignore it
                continue
            if self.silent:
                continue
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if self.fail:
                response.set_rcode(dns.rcode.SERVFAIL)
                self.sock.sendto(response.to_wire(), addr)
                continue
            for question in query.question:
                name = question.name.to_text(omit_final_dot=True).lower()
                rtype = dns.rdatatype.to_text(question.rdtype)
                self.queries.append((name, rtype))
                values = self.records.get((name, rtype))
                if values:
                    response.answer.append(dns.rrset.from_text(question.name, 60, "IN", rtype, *values))
                    continue
                if not any(n == name for n, _ in self.records):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                if self.negative_ttl is not None:   # as a real server: an SOA whose minimum bounds the caching
                    response.authority.append(dns.rrset.from_text(
                        question.name, self.negative_ttl, "IN", "SOA",
                        f"ns.test. hostmaster.test. 1 60 60 60 {self.negative_ttl}"))
            self.sock.sendto(response.to_wire(), addr)

    def close(self) -> None:
        self._running = False
        self.sock.close()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    auth: str | None
    mail_options: list[str] = field(default_factory=list)

    @property
    def message(self) -> Any:
        return message_from_bytes(self.data)


class _Handler:
    def __init__(self, peer: "SmtpPeer") -> None:
        self.peer = peer

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]) -> str:
        reply = self.peer.rcpt_reply(address) if self.peer.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.peer.data_reply:
            reply = self.peer.data_reply()
            if reply:
                return reply
        self.peer.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.original_content or envelope.content, session.ssl is not None,
                                           getattr(session, "mg_user", None), list(envelope.mail_options)))
        return "250 2.0.0 OK queued"


class SmtpPeer:
    """An aiosmtpd server on ``host:port`` with optional STARTTLS, required AUTH and scripted replies."""

    def __init__(self, host: str, port: int, *, tls_cert: tuple[str, str] | None = None, require_tls: bool = False,
                 auth: dict[str, str] | None = None) -> None:
        self.received: list[Received] = []
        self.rcpt_reply: Callable[[str], str | None] | None = None
        self.data_reply: Callable[[], str | None] | None = None
        self.auth_attempts: list[str] = []
        kwargs: dict[str, Any] = {}
        if tls_cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*tls_cert)
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = require_tls
        if auth is not None:
            users = auth

            def authenticator(server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
                if isinstance(data, LoginPassword):
                    user, password = data.login.decode(), data.password.decode()
                    self.auth_attempts.append(user)
                    if users.get(user) == password:
                        session.mg_user = user
                        return AuthResult(success=True)
                return AuthResult(success=False, handled=False)

            kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=False)
        self.controller = Controller(_Handler(self), hostname=host, port=port, ready_timeout=10, **kwargs)
        self.controller.start()
        self.host, self.port = host, port

    def stop(self) -> None:
        self.controller.stop()


class LmtpPeer:
    """An LMTP server (aiosmtpd's LMTP) that answers the end of DATA once per recipient, as RFC 2033 asks
    (aiosmtpd itself sends one line: ``data_reply(recipient)`` gives each, joined into one push)."""

    def __init__(self, host: str, port: int, data_reply: Callable[[str], str] | None = None) -> None:
        from aiosmtpd.lmtp import LMTP

        self.received: list[Received] = []
        self.data_reply = data_reply or (lambda rcpt: "250 2.0.0 OK delivered")
        peer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
                peer.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                              envelope.original_content or envelope.content, False, None))
                return "\r\n".join(peer.data_reply(rcpt) for rcpt in envelope.rcpt_tos)

        class LmtpController(Controller):
            def factory(self) -> Any:
                return LMTP(self.handler)

        self.controller = LmtpController(Handler(), hostname=host, port=port, ready_timeout=10)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class _ListeningPeer:
    """A TCP server that keeps every connection it accepts and hands each to ``_serve`` on its own thread."""

    def __init__(self, host: str, port: int, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)   # inherited by connections
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen()
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        pass

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accepting thread, so the port is free at once
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for conn in self.connections:
            conn.close()


class StallingPeer(_ListeningPeer):
    """A TCP server that accepts connections and never says a word (a hung or overloaded next hop)."""


class DeafPeer(_ListeningPeer):
    """A next hop that misbehaves: ``"trickle"`` sends its greeting a byte at a time and never ends the line;
    ``"deaf"`` speaks SMTP up to DATA's 354 and then stops reading (its small receive window fills); ``"babble"``
    answers EHLO with a multi-line reply that goes on (40 MB of "250-" lines, then it hangs up); ``"junk"`` is
    not an SMTP server (it greets with an HTTP error)."""

    def __init__(self, host: str, port: int, mode: str) -> None:
        assert mode in ("trickle", "deaf", "babble", "junk")
        self.mode = mode
        self.data_started = threading.Event()
        super().__init__(host, port, receive_buffer=4096)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.mode == "trickle":
                for byte in b"220 a greeting that never ends" * 100:
                    if self._stop.wait(0.3):
                        return
                    conn.sendall(bytes([byte]))
                return
            if self.mode == "junk":
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self._stop.wait(5)
                return
            conn.sendall(b"220 deaf.example ESMTP\r\n")
            lines = conn.makefile("rb")
            while not self._stop.is_set():
                line = lines.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO") and self.mode == "babble":
                    for _ in range(10_000):
                        conn.sendall((b"250-" + b"x" * 60 + b"\r\n") * 64)
                    return
                if verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250 deaf.example\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    self.data_started.set()
                    self._stop.wait()            # never reads again
                    return
                else:
                    conn.sendall(b"250 OK\r\n")
        except OSError:
            return


class PipeliningPeer:
    """A scripted SMTP server offering PIPELINING only. It keeps every read as it arrived and the messages
    it accepted; ``rcpt_reply`` may refuse addresses, ``max_recipients`` answers ``limit_reply`` to the RCPTs of
    a transaction beyond that many (as Postfix's smtpd_recipient_limit does) and ``hang_up_after_dots`` closes
    the connection, without replying, once that many bodies have ended."""

    def __init__(self, rcpt_reply: Callable[[str], str] | None = None, hang_up_after_dots: int | None = None,
                 max_recipients: int | None = None, limit_reply: str = "452 4.5.3 Error: too many recipients") -> None:
        self.reads: list[bytes] = []
        self.connections: list[list[bytes]] = []   # the reads of each connection, in the order they opened
        self.accepted_on: list[int] = []           # for each message taken, the index of its connection
        self.hung_up_on: int | None = None         # the connection closed at the dot
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_reply = rcpt_reply or (lambda address: "250 2.1.5 Ok")
        self.hang_up_after_dots = hang_up_after_dots
        self.max_recipients = max_recipients
        self.limit_reply = limit_reply
        self.dots = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._session, host, port)
        return self.server.sockets[0].getsockname()[1]

    def start_in_thread(self, host: str, port: int) -> "PipeliningPeer":
        """Serve from a thread of its own (for a test that drives a mailgate server)."""
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.start(host, port), self.loop).result(10)
        return self

    def stop_thread(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        mine: list[bytes] = []
        self.connections.append(mine)
        index = len(self.connections) - 1
        buffer, in_data, sender, rcpts, body = b"", False, "", [], b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                self.reads.append(chunk)
                mine.append(chunk)
                buffer += chunk
                out = b""
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        body, buffer, in_data = body + buffer[:end + 2], buffer[end + 5:], False
                        self.dots += 1
                        if self.dots == self.hang_up_after_dots:
                            self.hung_up_on = index
                            writer.write(out)
                            writer.close()
                            return
                        self.messages.append((sender, rcpts, body))
                        self.accepted_on.append(index)
                        out += b"250 2.0.0 Ok: queued\r\n"
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    command = line.decode()
                    verb = command[:4].upper()
                    if verb == "EHLO":
                        out += b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                    elif verb == "MAIL":
                        sender, rcpts, body = command[10:].strip("<>"), [], b""
                        out += b"250 2.1.0 Ok\r\n"
                    elif verb == "RCPT":
                        address = command[8:].strip("<>")
                        reply = self.rcpt_reply(address)
                        if self.max_recipients is not None and len(rcpts) >= self.max_recipients:
                            reply = self.limit_reply
                        if reply.startswith("250"):
                            rcpts.append(address)
                        out += reply.encode() + b"\r\n"
                    elif verb == "DATA":
                        if rcpts:
                            in_data = True
                            out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
                        else:
                            out += b"554 5.5.1 Error: no valid recipients\r\n"
                    elif verb == "RSET":
                        out += b"250 2.0.0 Ok\r\n"
                    elif verb == "QUIT":
                        writer.write(out + b"221 2.0.0 Bye\r\n")
                        writer.close()
                        return
                    else:
                        out += b"502 5.5.2 Error: command not recognized\r\n"
                writer.write(out)
        except ConnectionError:
            return

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


class TcpProxy:
    """A loopback TCP forwarder to ``target`` that a test can cut (every connection dropped, new ones refused)
    and restore on the same port: a database or peer that goes away and comes back."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        from helpers import free_port

        self.target, self.host = target, host
        self.port = free_port(host)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self.restore()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._call(self._close())

    def restore(self) -> None:
        self._call(self._listen())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
