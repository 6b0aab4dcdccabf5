"""Listening sockets for every enabled binding of this server's receive
connectors, kept in step with the configuration: bindings that appear are
opened, bindings that disappear are closed, within one reload."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from mailgate.config.values import IPBinding
from mailgate.receive.limits import LocalCounter
from mailgate.receive.policy import ReceiveConfig
from mailgate.receive.session import SmtpSession

log = logging.getLogger("mailgate.receive")

Endpoint = tuple[int, str, int]   # (family, address, port)


@dataclass
class BindError:
    endpoint: str
    connectors: list[str]
    message: str


def desired_endpoints(config: ReceiveConfig) -> dict[Endpoint, list[str]]:
    """The sockets to open, with the connectors that use each; a wildcard binding covers its port."""
    wanted: dict[Endpoint, list[str]] = {}
    bindings: list[tuple[IPBinding, str]] = []
    for c in config.connectors:
        if c.enabled:
            bindings += [(b, c.identity) for b in c.bindings]
    wildcard_ports = {(b.version, b.port) for b, _ in bindings if b.is_wildcard}
    for b, identity in bindings:
        family = socket.AF_INET if b.version == 4 else socket.AF_INET6
        if not b.is_wildcard and (b.version, b.port) in wildcard_ports:
            address = "0.0.0.0" if b.version == 4 else "::"
        else:
            address = str(b.address)
        wanted.setdefault((family, address, b.port), []).append(identity)
    return wanted


def _describe_bind_error(exc: OSError, endpoint: str, connectors: list[str], port: int) -> str:
    who = ", ".join(f'"{c}"' for c in connectors)
    example = connectors[0] if connectors else "<connector>"
    host = endpoint.rsplit(":", 1)[0]
    if exc.errno == errno.EADDRNOTAVAIL:   # the address is the problem: suggest every address of this host
        host = "[::]" if host.startswith("[") else "0.0.0.0"
    fix = (f'change the binding: Set-ReceiveConnector "{example}" -Bindings '
           f'{host}:{port + 2500 if port < 1024 else port + 1}')
    if exc.errno == errno.EACCES:
        return (f"Receive connector {who} can't listen on {endpoint}: permission denied. Ports below 1024 need root "
                f"or the CAP_NET_BIND_SERVICE capability; run mailgate as root, grant the capability, or {fix}")
    if exc.errno == errno.EADDRINUSE:
        return (f"Receive connector {who} can't listen on {endpoint}: the address is already in use by another "
                f"program (see: ss -ltnp 'sport = :{port}'). Stop that program or {fix}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"Receive connector {who} can't listen on {endpoint}: that address isn't configured on this host. "
                f"Use an address of this host or 0.0.0.0, e.g. {fix}")
    if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
        return f"Receive connector {who} can't listen on {endpoint}: this host has no IPv6 support."
    return f"Receive connector {who} can't listen on {endpoint}: {exc.strerror or exc}"


def _listening_inodes(family: int, address: str, port: int) -> set[int]:
    """The socket inodes of every TCP listener on ``port`` whose address overlaps ``address`` (equal, or either
    one the wildcard), from /proc/net/tcp or tcp6."""
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    wanted = socket.inet_pton(family, address)
    wildcard = bytes(len(wanted))
    found: set[int] = set()
    try:
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                host, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:   # 0A: LISTEN
                    continue
                # The kernel prints the address as 32-bit words in host byte order.
                raw = b"".join(int(host[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(host), 8))
                if raw == wanted or wildcard in (raw, wanted):
                    found.add(inode)
    except OSError:
        pass
    return found


def _this_servers_sockets() -> set[int] | None:
    """The socket inodes held by this server's processes: this worker's supervisor and its children; None when
    one of them can't be looked into (a hardened /proc): then nobody is taken for a stranger."""
    supervisor = os.getppid()
    pids = {supervisor, os.getpid()}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == supervisor:
                        pids.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    inodes: set[int] = set()
    for pid in pids:
        links = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except FileNotFoundError:   # closed meanwhile
                    continue
        except FileNotFoundError:   # the process ended meanwhile
            continue
        except PermissionError:
            return None
        inodes.update(int(link[8:-1]) for link in links if link.startswith("socket:["))
    return inodes


def shared_with_another_program(sock: socket.socket, family: int, address: str, port: int) -> bool:
    """Whether another program listens where ``sock`` (bound with SO_REUSEPORT) was just bound. SO_REUSEPORT,
    which lets this server's workers share their endpoints, lets any process of the same user that sets it bind
    them too: a second mailgate (another data directory, the same binding) would silently take half of the
    connections. Only this server's supervisor and workers may share them."""
    others = _listening_inodes(family, address, port) - {os.fstat(sock.fileno()).st_ino}
    if not others:
        return False
    ours = _this_servers_sockets()
    return ours is not None and bool(others - ours)


class ReceiveServer:
    """Owns the listening sockets and the state every session shares."""

    def __init__(self, *, store: Any, pipeline: Any, tracker: Any, protocol_log: Any,
                 authenticate: Callable[[str, str], Awaitable[Any]], config: ReceiveConfig,
                 reuse_port: bool = False) -> None:
        self.store = store
        self.pipeline = pipeline
        self.tracker = tracker
        self.protocol_log = protocol_log
        self.authenticate = authenticate
        self.server_auth_key: bytes | None = None   # the organisation's X-EXPS key (smtp/exps.py)
        self.config = config
        self.reuse_port = reuse_port
        self.sessions: set[SmtpSession] = set()
        self.counter: Any = LocalCounter()     # a SharedCounter when several workers share the limits
        self.pressure: Any = None              # the queue disk's back pressure (queue/pressure.py), when watched
        self.refused = 0
        self.listeners: dict[Endpoint, asyncio.AbstractServer] = {}
        self.bind_errors: dict[Endpoint, BindError] = {}
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self.on_change: Callable[[str], None] | None = None   # reports opened/closed listeners and errors
        self.on_event: Callable[[str, dict[str, Any]], None] = lambda kind, data: None   # metrics

    def _make_socket(self, family: int, address: str, port: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(1024)
            if self.reuse_port and shared_with_another_program(sock, family, address, port):
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def apply(self, config: ReceiveConfig) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        wanted = desired_endpoints(config)
        for endpoint in list(self.listeners):
            if endpoint not in wanted:
                server = self.listeners.pop(endpoint)
                server.close()
                self._report(f"Stopped listening on {_text(endpoint)}")
        for endpoint, connectors in wanted.items():
            if endpoint in self.listeners:
                continue
            family, address, port = endpoint
            try:
                sock = self._make_socket(family, address, port)
            except OSError as exc:
                message = _describe_bind_error(exc, _text(endpoint), connectors, port)
                previous = self.bind_errors.get(endpoint)
                self.bind_errors[endpoint] = BindError(_text(endpoint), connectors, message)
                if previous is None or previous.message != message:
                    self._report(message, error=True)
                continue
            server = await self.loop.create_server(lambda: SmtpSession(self), sock=sock)
            self.listeners[endpoint] = server
            self.bind_errors.pop(endpoint, None)
            self._report(f"Listening on {_text(endpoint)} for {', '.join(connectors)}")
        for endpoint in list(self.bind_errors):
            if endpoint not in wanted:
                del self.bind_errors[endpoint]

    def _report(self, message: str, *, error: bool = False) -> None:
        (log.error if error else log.info)(message)
        if self.on_change:
            self.on_change(message)

    def status(self) -> list[dict[str, Any]]:
        out = [{"endpoint": _text(e), "listening": True, "error": None} for e in self.listeners]
        out += [{"endpoint": b.endpoint, "listening": False, "error": b.message} for b in self.bind_errors.values()]
        return out

    async def stop_listening(self) -> None:
        for server in self.listeners.values():
            server.close()
        self.listeners.clear()

    async def drain(self, grace: float) -> None:
        """End each session with 421 once it is between messages; a message whose body is arriving or being
        committed may finish first, within ``grace`` seconds; what is left then is cut off unanswered."""
        deadline = self.loop.time() + grace
        for session in list(self.sessions):
            session.shutdown()
        while self.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            for session in list(self.sessions):
                session.shutdown()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.abort()


def _text(endpoint: Endpoint) -> str:
    family, address, port = endpoint
    return f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"
