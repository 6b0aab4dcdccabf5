"""The REST API and the web admin center, served by the running server.

Every cmdlet of the management core is an endpoint ``POST /api/cmdlets/<Name>``
whose JSON body holds the cmdlet's parameters by their Exchange names; the
OpenAPI document lists each with its parameters. Requests carry the admin
token from ``mailgate.toml`` as ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import itertools
import json
import logging
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

import sqlalchemy as sa
import uvicorn
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ConfigDict, create_model

from mailgate.api.metrics import CONTENT_TYPE, Metrics
from mailgate.config.store import UNREACHABLE_ERRORS, is_unreachable, unreachable_reason
from mailgate.control import RuntimeClient, decode, encode, error_payload, org_runtime_token
from mailgate.errors import CommandNotFoundError, InvalidValueError, ParameterError, UserError, not_text
from mailgate.home import admin_address
from mailgate.manage import load_cmdlets
from mailgate.manage.cmdlets import SHELL_COMMON_NAMES, Cmdlet, registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.present import to_json

log = logging.getLogger("mailgate.api")
STATIC = Path(__file__).with_name("static")
# What another server of the organisation may ask of this one (the queue cmdlets' -Server and Server\ identities).
REMOTE_RUNTIME_OPS = frozenset({"queues", "messages", "queue_action", "message_action", "redirect", "export",
                                "status"})


# The admin center runs only its own script, can't be framed by another site (clickjacking), and its
# content types are taken as sent. (Mail-derived text, such as subjects, is only ever set as text by app.js.)
ADMIN_CENTER_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
}
MAX_BODY_BYTES = 4 * 1024 * 1024   # a request body larger than this is refused (413) before it is read


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``MAX_BODY_BYTES`` — by Content-Length at once, and a body
    without one once that much has streamed in — so that nobody, with the token or without (FastAPI reads the
    body before it checks the token), can make the server hold more. The body is read here and replayed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return   # the client went away
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                await self._refuse(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send: Any) -> None:
        body = (b'{"detail":"the request body is larger than %d bytes, or its Content-Length is not a number"}'
                % MAX_BODY_BYTES)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class InProcessRuntime:
    """The runtime operations of the server this API runs in, callable from worker threads."""

    def __init__(self, service: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    def call(self, op: str, **args: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(self.service.handle(op, args), self.loop).result(timeout=300)


def _not_text_within(value: Any) -> str | None:
    """Why a JSON value isn't text, looking into its lists and objects (keys too), or None. Iterative: JSON
    nested hundreds deep must not exhaust the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            bad = not_text(item, from_bytes=False)
            if bad is not None:
                return bad[1]
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _invoke(service: Any, runtime: InProcessRuntime, cmd: Cmdlet, params: dict[str, Any]) -> dict[str, Any]:
    """Run one cmdlet as the shell would (conversion, validation, -WhatIf), returning JSON."""
    from mailgate.shell.binder import NamedArg, bind, convert

    ctx = ManagementContext(service.home, service.store, runtime=runtime, secrets=service.secrets)
    for name, value in params.items():
        bad = _not_text_within(value)
        if bad is not None:
            raise InvalidValueError(f"Cannot process argument transformation on parameter '{name}'. The value holds "
                                    f"{bad}; send text.", parameter=name)
        if value is not None and cmd.param(name).local_file:
            raise ParameterError(f"-{name} names a file, which over the REST API would be a file of the server, "
                                 "read or written with its rights. Leave it out: send the content as FileData, or "
                                 "take it from the result's FileData.", parameter=name)
    elements = [NamedArg(name, value) for name, value in params.items() if value is not None]
    for name, value in params.items():
        if value is True and cmd.param(name).switch:
            elements = [e for e in elements if e.name != name] + [NamedArg(name)]
    args = convert(cmd, bind(cmd, elements))
    ctx.whatif = bool(args.get("WhatIf"))
    result = cmd.handler(ctx, args) or []
    if isinstance(result, Iterator):
        # Output read as it is used (Get-MessageTrackingLog): the first page is read before the answer starts, so
        # that an error there still gets its status code; a longer output is sent as it is read.
        first = list(itertools.islice(result, STREAMED_PAGE))
        if len(first) == STREAMED_PAGE:
            return StreamedOutput(ctx, first, result)
        result = first
    return {"output": to_json(list(result)), "warnings": ctx.warnings, "messages": ctx.messages, "errors": ctx.errors}


STREAMED_PAGE = 500


class StreamedOutput:
    """A cmdlet's answer sent while its output is read: ``{"output": [...], "warnings": ..., "errors": ...}`` as
    for any cmdlet, with a few hundred records in memory at a time. An error after the answer has begun can't
    change its status: the output ends there and the error is in ``errors``."""

    def __init__(self, ctx: ManagementContext, first: list[Any], rest: Iterator[Any]) -> None:
        self.ctx, self.first, self.rest = ctx, first, rest

    def chunks(self) -> Iterator[bytes]:
        yield b'{"output":['
        page, separator = self.first, b""
        while page:
            yield separator + b",".join(_json_bytes(to_json(item)) for item in page)
            separator = b","
            try:
                page = list(itertools.islice(self.rest, STREAMED_PAGE))
            except Exception as exc:   # noqa: BLE001 - the status is sent already: the error goes in "errors"
                if isinstance(exc, UserError):
                    reason = exc.message
                elif is_unreachable(exc):
                    reason = f"the organisation's store can't be reached ({unreachable_reason(exc)})"
                else:
                    log.error("reading a streamed answer failed", exc_info=True)
                    reason = f"an internal error ({type(exc).__name__}: {exc}); this is a bug in mailgate"
                self.ctx.errors.append(f"The output was cut short by {reason}.")
                page = []
        ctx = self.ctx
        yield b"]," + _json_bytes({"warnings": ctx.warnings, "messages": ctx.messages, "errors": ctx.errors})[1:]


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def build_app(service: Any, loop: asyncio.AbstractEventLoop) -> FastAPI:
    load_cmdlets(shell=False)
    app = FastAPI(title="mailgate", version="0.1.0",
                  description="Every management cmdlet of mailgate over HTTP. Send the admin token from "
                              "mailgate.toml as 'Authorization: Bearer <token>'.")
    app.add_middleware(_BodyLimit)
    # With several worker processes, the supervisor's control socket answers for all of them.
    runtime: Any = InProcessRuntime(service, loop) if service.workers == 1 else RuntimeClient(service.home)
    metrics: Metrics = service.metrics

    def authorise(request: Request) -> None:
        header = request.headers.get("authorization", "")
        # Only in the header: a token in the URL would be kept in access logs, browser history and Referer headers.
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not service.home.admin_token or not hmac.compare_digest(token.encode(), service.home.admin_token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong admin token",
                                headers={"WWW-Authenticate": "Bearer"})

    def store_unreachable(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=503, content={
            "error": f"The organisation's store can't be reached ({unreachable_reason(exc)}).",
            "category": "ResourceUnavailable"})

    for error in UNREACHABLE_ERRORS:
        app.add_exception_handler(error, store_unreachable)

    @app.exception_handler(sa.exc.DatabaseError)
    async def store_damaged(request: Request, exc: Exception) -> JSONResponse:
        if not is_unreachable(exc):   # any other database error is a bug: the server's own 500
            raise exc
        return store_unreachable(request, exc)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        status = 404 if isinstance(exc, CommandNotFoundError) else 400
        return JSONResponse(status_code=status, content={"error": exc.message, "parameter": exc.parameter,
                                                         "category": exc.category, "exception": exc.exception_name})

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        """Liveness: the server name and whether its listeners are up."""
        status = service.status()
        return {"server": status["server"], "listening": sum(1 for item in status["listeners"] if item["listening"]),
                "bindErrors": [item["error"] for item in status["listeners"] if item["error"]]}

    @app.get("/api/status", dependencies=[Depends(authorise)])
    async def status() -> Any:
        """The server's counters and listeners (all worker processes together)."""
        return to_json(await run_in_threadpool(runtime.call, "status"))

    @app.get("/api/cmdlets", dependencies=[Depends(authorise)])
    async def cmdlets() -> list[dict[str, Any]]:
        """Every cmdlet with its parameters."""
        return [{"name": c.name, "synopsis": c.synopsis, "needsRuntime": c.needs_runtime,
                 "parameters": [{"name": p.name, "type": p.type_name, "mandatory": p.mandatory, "switch": p.switch,
                                 "help": p.help} for p in c.params if p.name not in SHELL_COMMON_NAMES]}
                for c in registry.all() if not c.builtin]

    for cmd in registry.all():
        if cmd.builtin:
            continue
        _add_cmdlet_route(app, service, runtime, cmd, authorise)

    @app.post("/api/cmdlets/{name}", dependencies=[Depends(authorise)], include_in_schema=False)
    async def other_cmdlet(name: str) -> Any:
        """A cmdlet named in another case goes to its own endpoint (names are case-insensitive, as in the
        shell); any other name gets the shell's CommandNotFound error."""
        cmd = registry.get(name)   # an unknown name: CommandNotFoundError, answered 404 with the shell's message
        if cmd.builtin:
            raise CommandNotFoundError(f"{cmd.name} is a command of the shell, not of the API: GET /api/cmdlets "
                                       "lists the API's cmdlets.", target=name)
        return RedirectResponse(f"/api/cmdlets/{cmd.name}", status_code=307)   # 307 keeps the method and body

    org_token = org_runtime_token(service.secrets)

    @app.post("/api/runtime", include_in_schema=False)
    async def runtime_operation(request: Request) -> Any:
        """Queue operations for another server of the organisation (``Get-Queue -Server``): the caller shows the
        token derived from the organisation's key; the reply has the control socket's shape."""
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.removeprefix("Bearer ").encode(), org_token.encode()):
            raise HTTPException(status_code=401, detail="not a server of this organisation",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await request.json()
            op, args = body["op"], decode(body.get("args") or {})
        except (ValueError, KeyError, TypeError):
            raise HTTPException(status_code=400, detail="expected {\"op\": ..., \"args\": {...}}") from None
        if op not in REMOTE_RUNTIME_OPS or not isinstance(args, dict):
            raise HTTPException(status_code=403, detail=f"'{op}' isn't an operation other servers may call")
        try:
            result = await run_in_threadpool(lambda: runtime.call(op, **args))
        except UserError as exc:
            return {"ok": False, "error": error_payload(exc)}
        return {"ok": True, "result": encode(result)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        queues = await run_in_threadpool(runtime.call, "queues")
        status = await run_in_threadpool(runtime.call, "status")
        workers = await run_in_threadpool(runtime.call, "metrics")
        return Response(content=metrics.render(workers, queues, status), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=ADMIN_CENTER_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _add_cmdlet_route(app: FastAPI, service: Any, runtime: InProcessRuntime, cmd: Cmdlet, authorise: Any) -> None:
    fields: dict[str, Any] = {p.name: (Optional[Any], None) for p in cmd.params
                              if p.name != "DomainController" and p.name not in SHELL_COMMON_NAMES}
    model = create_model(f"{cmd.name.replace('-', '')}Parameters", __config__=ConfigDict(extra="forbid"), **fields)

    async def endpoint(params: Any = None) -> Any:
        values = params.model_dump(exclude_none=True) if params is not None else {}
        answer = await run_in_threadpool(_invoke, service, runtime, cmd, values)
        if isinstance(answer, StreamedOutput):
            return StreamingResponse(answer.chunks(), media_type="application/json")
        return answer

    # The body model is made at run time, so FastAPI is given it through the signature.
    endpoint.__signature__ = inspect.Signature([inspect.Parameter(  # type: ignore[attr-defined]
        "params", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=Body(default=None), annotation=Optional[model])])
    endpoint.__name__ = cmd.name.replace("-", "_").lower()
    endpoint.__doc__ = cmd.description
    app.add_api_route(f"/api/cmdlets/{cmd.name}", endpoint, methods=["POST"], summary=cmd.synopsis,
                      dependencies=[Depends(authorise)], tags=[cmd.name.split("-", 1)[-1]])


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the transport server owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    def __init__(self, server: uvicorn.Server, task: asyncio.Task[Any]) -> None:
        self.server = server
        self.task = task

    async def stop(self) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, 10)
        except asyncio.TimeoutError:
            self.task.cancel()


def _admin_socket(listen: str) -> socket.socket:
    """The API's listening socket, bound here so that a busy or bad address is a clear error (uvicorn would
    exit the process)."""
    hint = "Change [admin] listen in mailgate.toml, or pass --admin-listen HOST:PORT or --admin-listen off."
    try:
        host, port_number = admin_address(listen)
    except ValueError:
        raise UserError(f"The admin API can't listen on '{listen}': it isn't HOST:PORT. {hint}") from None
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port_number))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"The admin API can't listen on {listen}: {exc.strerror or exc}. {hint}") from None
    return sock


async def start_api(service: Any, listen: str) -> ApiServer:
    sock = _admin_socket(listen)
    app = build_app(service, asyncio.get_running_loop())
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = _QuietServer(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    for _ in range(100):
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        task.cancel()
        sock.close()
        raise UserError(f"The admin API didn't start on {listen}.")
    return ApiServer(server, task)
