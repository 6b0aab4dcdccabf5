"""The control channel between management clients (the shell) and a running
server: one JSON request and one JSON reply per connection over a Unix socket
in the data directory. Only the operations that need the running transport
(queues, messages, test submissions, listener state) go through it; the
configuration is read and written in the store directly.

The socket file is created with mode 0600, so file-system permissions decide
who may manage the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from mailgate import errors
from mailgate.errors import RuntimeUnavailableError, UserError
from mailgate.home import Home
from mailgate.manage.present import Record
from mailgate.queue.pressure import is_disk_full

MAX_REQUEST = 16 * 1024 * 1024

# A Unix socket's address holds at most 107 bytes, so a data directory deep in the file system would give
# socket paths too long to bind or connect to. Linux resolves /proc/self/fd/<fd>/<name> through an open
# descriptor of the directory: short whatever the directory's path.
_SUN_PATH_MAX = 100


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for the socket file ``path``, usable while the block runs (bind or connect in it)."""
    text = str(path)
    if len(os.fsencode(text)) < _SUN_PATH_MAX:
        yield text
        return
    try:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        yield text   # no directory, no socket: connecting fails as it would for a short path
        return
    try:
        yield f"/proc/self/fd/{directory}/{path.name}"
    finally:
        os.close(directory)


def encode(value: Any) -> Any:
    if isinstance(value, Record):
        return {"__record__": value.type_name, "props": {k: encode(v) for k, v in value.items()}, "text": value.text}
    if isinstance(value, dt.datetime):
        return {"__dt__": value.isoformat()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, bytes):
        import base64

        return {"__bytes__": base64.b64encode(value).decode()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "__record__" in value:
            return Record(value["__record__"], {k: decode(v) for k, v in value["props"].items()}, value.get("text"))
        if "__dt__" in value:
            return dt.datetime.fromisoformat(value["__dt__"])
        if "__bytes__" in value:
            import base64

            return base64.b64decode(value["__bytes__"])
        return {k: decode(v) for k, v in value.items()}
    return value


def error_payload(exc: UserError) -> dict[str, Any]:
    return {"type": type(exc).__name__, "message": exc.message, "parameter": exc.parameter, "target": exc.target}


def _raise_error(payload: dict[str, Any]) -> None:
    cls = getattr(errors, payload.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, UserError)):
        cls = UserError
    raise cls(payload.get("message", "error"), parameter=payload.get("parameter"), target=payload.get("target") or "")


class RuntimeClient:
    """Calls operations of the running server; each call is one connection."""

    def __init__(self, home: Home, timeout: float = 300.0) -> None:
        self.home = home
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                with unix_address(self.home.control_socket) as address:
                    sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError):
                raise RuntimeUnavailableError(
                    f"The transport service on server {self.home.server} isn't running, so queues and messages "
                    f"can't be managed. Start it with: mailgate --home {self.home.path} serve") from None
            sock.sendall(json.dumps({"op": op, "args": encode(args)}).encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            raise UserError(f"The transport service did not answer '{op}' within {self.timeout:.0f} s.") from None
        finally:
            sock.close()
        reply = json.loads(b"".join(chunks) or b"{}")
        if not reply.get("ok"):
            _raise_error(reply.get("error") or {"message": "the server closed the connection"})
        return decode(reply.get("result"))


ORG_RUNTIME_PURPOSE = "mailgate runtime operations between servers"


def org_runtime_token(secrets: Any) -> str:
    """The bearer token one server of the organisation shows another's admin API (derived from the shared key)."""
    return secrets.derive(ORG_RUNTIME_PURPOSE).hex()


class RemoteRuntime:
    """Calls operations of another server of the organisation through its admin API (``POST /api/runtime``)."""

    def __init__(self, server: str, url: str, secrets: Any, timeout: float = 120.0) -> None:
        self.server = server
        self.url = url.rstrip("/") + "/api/runtime"
        self.token = org_runtime_token(secrets)
        self.timeout = timeout

    def call(self, op: str, **args: Any) -> Any:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.url, data=json.dumps({"op": op, "args": encode(args)}).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            raise RuntimeUnavailableError(f"Server {self.server}'s admin API at {self.url} refused '{op}': "
                                          f"HTTP {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:
            raise RuntimeUnavailableError(f"Server {self.server}'s transport service can't be reached at {self.url} "
                                          f"({getattr(exc, 'reason', exc)}).") from None
        if not reply.get("ok"):
            _raise_error(reply.get("error") or {"message": f"server {self.server} gave no answer"})
        return decode(reply.get("result"))


Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def call_socket(path: Path, op: str, args: dict[str, Any], timeout: float = 300.0) -> Any:
    """One request to a control socket from inside an event loop (used to reach worker processes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        with unix_address(path) as address:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), timeout)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REQUEST)
    except BaseException:
        sock.close()
        raise
    try:
        writer.write(json.dumps({"op": op, "args": encode(args)}).encode() + b"\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    reply = json.loads(data or b"{}")
    if not reply.get("ok"):
        _raise_error(reply.get("error") or {"message": "the worker closed the connection"})
    return decode(reply.get("result"))


class ControlServer:
    """Serves control requests on a Unix socket (the data directory's, or a worker's own)."""

    def __init__(self, path: Any, handler: Handler, log: Any) -> None:
        self.path = path
        self.handler = handler
        self.log = log
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            with unix_address(path) as address:
                sock.bind(address)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            request = json.loads(line or b"{}")
            op = request.get("op", "")
            try:
                result = await self.handler(op, decode(request.get("args") or {}))
                reply = {"ok": True, "result": encode(result)}
            except UserError as exc:
                reply = {"ok": False, "error": error_payload(exc)}
            except Exception as exc:  # noqa: BLE001 - a bug: log it, answer the client
                if is_disk_full(exc):   # not a bug: say what the administrator can do
                    problem = UserError(f"The queue's disk is full, so {op} could not be recorded ({exc}). Free "
                                        "space on it; delivery and the queue's bookkeeping resume by themselves.")
                else:
                    self.log.exception("control operation %s failed", op)
                    problem = UserError(f"internal error in {op}: {exc}")
                reply = {"ok": False, "error": error_payload(problem)}
            writer.write(json.dumps(reply).encode())
            await writer.drain()
        except (ValueError, ConnectionError):
            pass
        finally:
            writer.close()
