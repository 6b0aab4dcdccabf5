"""Several worker processes for one server, when one core is not enough.

Each worker is a complete transport service with its own durable queue
(``queue/`` for worker 0, ``queue/w<n>`` for the others); all of them listen
on the same endpoints with SO_REUSEPORT, so the kernel spreads connections.
The supervisor starts them, restarts one that dies, stops them on SIGTERM,
and answers the data directory's control socket by asking every worker and
merging the answers, so Get-Queue and Get-Message show one server.

Workers die with the supervisor (PR_SET_PDEATHSIG): killing ``mailgate serve``
stops everything at once, as a crash would.
"""

from __future__ import annotations

import asyncio
import ctypes
import datetime as dt
import logging
import os
import signal
import sys
import time
from typing import Any

from mailgate.control import ControlServer, call_socket
from mailgate.errors import NotFoundError, UserError
from mailgate.home import Home
from mailgate.manage.present import Record
from mailgate.queue.pressure import LEVELS
from mailgate.receive.limits import SharedCounter

log = logging.getLogger("mailgate.supervisor")
WORKER_STOP_SECONDS = 60   # a worker drains for 10 s; past this it is killed
# A worker that exits is started again after 1 s; one that exits again within RESTART_QUICK seconds of its
# start waits twice as long as the last time, up to RESTART_MAX seconds (it can't start: say so seldom).
RESTART_QUICK, RESTART_MAX = 10.0, 30.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Supervisor:
    def __init__(self, home: Home, workers: int, admin_listen: str | None, announce: Any) -> None:
        self.home = home
        self.count = workers
        self.admin_listen = admin_listen
        self.announce = announce
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._stop = asyncio.Event()
        self._running: set[int] = set()   # workers that have said they are running
        self._started: dict[int, float] = {}
        self._restart_delay: dict[int, float] = {}
        self._announced = False

    # -- workers ---------------------------------------------------------------------
    async def _spawn(self, index: int) -> None:
        args = [sys.executable, "-m", "mailgate.cli", "--home", str(self.home.path), "serve", "--workers",
                str(self.count), "--worker-index", str(index), "--admin-listen",
                (self.admin_listen or self.home.admin_listen) if index == 0 else "off"]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=None,
                                                    preexec_fn=_die_with_parent)
        self.procs[index] = proc
        self._started[index] = time.monotonic()
        asyncio.ensure_future(self._relay_output(index, proc))

    async def _relay_output(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            if "is running" in text:
                # The server is running when every worker is: only then do management answers cover them all.
                self._running.add(index)
                if len(self._running) == self.count and not self._announced:
                    self._announced = True
                    self.announce(f"mailgate {self.home.server} is running with {self.count} worker processes; "
                                  "stop it with Ctrl-C or SIGTERM.")
                continue
            if index == 0 or "can't" in text:
                self.announce(text)
        code = await proc.wait()
        if not self._stopping:
            quick = time.monotonic() - self._started[index] < RESTART_QUICK
            delay = min(2 * self._restart_delay.get(index, 0.5), RESTART_MAX) if quick else 1.0
            self._restart_delay[index] = delay
            self.announce(f"Worker {index} exited with {code}; restarting it in {delay:g} s.")
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            if not self._stopping and not self._stop.is_set():
                await self._spawn(index)

    async def _reload_workers(self) -> None:
        self.announce("SIGHUP: reading the configuration again.")
        for result in await self._all("reload", {}):
            if isinstance(result, BaseException):
                log.warning("a worker didn't reload: %s", result)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # SIGHUP, as most daemons take it: every worker reads the configuration again (a hangup of the terminal
        # reaches the workers too; a second read changes nothing).
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload_workers()))
        SharedCounter.reset(self.home.run_dir / "connections.map", self.count)   # no connection is open yet
        control = ControlServer(self.home.control_socket, self.handle, log)
        await control.start()
        for index in range(self.count):
            await self._spawn(index)
        self.home.pid_file.write_text(f"{os.getpid()}\n")
        await self._stop.wait()
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs.values())), WORKER_STOP_SECONDS)
        except asyncio.TimeoutError:   # a worker that doesn't stop must not keep the server (and its lock)
            for index, proc in self.procs.items():
                if proc.returncode is None:
                    self.announce(f"Worker {index} didn't stop within {WORKER_STOP_SECONDS} s; killing it.")
                    proc.kill()
            await asyncio.gather(*(p.wait() for p in self.procs.values()))
        await control.stop()
        try:
            self.home.pid_file.unlink()
        except FileNotFoundError:
            pass

    # -- the merged control socket -------------------------------------------------------------
    async def _all(self, op: str, args: dict[str, Any]) -> list[Any]:
        results = await asyncio.gather(*(call_socket(self.home.worker_socket(i), op, args)
                                         for i in range(self.count)), return_exceptions=True)
        return list(results)

    @staticmethod
    def _successes(results: list[Any]) -> list[Any]:
        """Every worker's answer; a report from only some workers would mislead, so a silent worker is an
        error. "Not found" from some workers is expected (a queue or message lives in one worker) and is
        an error only when every worker says it."""
        found = [r for r in results if not isinstance(r, BaseException)]
        for index, r in enumerate(results):
            if isinstance(r, NotFoundError):
                continue
            if isinstance(r, UserError):
                raise r
            if isinstance(r, BaseException):
                raise UserError(f"Worker process {index} isn't answering ({type(r).__name__}); it may be restarting. "
                                "Try again in a few seconds.")
        if not found:
            raise next(r for r in results if isinstance(r, NotFoundError))
        return found

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "queues":
            return merge_queues(self._successes(await self._all(op, args)))
        if op == "messages":
            # Each worker returns the records of its first ``limit`` messages; the first ``limit`` of all are
            # among them, each with all of its records.
            results = await self._all(op, args)
            merged = sorted((record for r in self._successes(results) for record in r), key=message_order)
            if args.get("limit") is None:
                return merged
            first = sorted({message_order(r)[0] for r in merged})[:args["limit"]]
            return [r for r in merged if first and message_order(r)[0] <= first[-1]]
        if op == "queue_action" and args.get("action") in ("suspend", "resume"):
            # A suspended queue stays suspended in every worker, including those that hold none of its mail yet.
            keys = sorted({key for found in self._successes(await self._all("queue_keys", args)) for key in found})
            counts = self._successes(await self._all(op, {**args, "keys": keys}))
            return max(counts)
        if op in ("queue_action", "message_action", "redirect"):
            # Each worker acts on what it holds.
            return sum(r for r in self._successes(await self._all(op, args)) if isinstance(r, int))
        if op == "reload":
            # A worker that is restarting loads the configuration as it starts, so it may be silent here.
            good = [r for r in await self._all(op, args) if not isinstance(r, BaseException)]
            if not good:
                raise UserError("no worker process answered")
            return any(good)
        if op == "export":
            results = await self._all(op, args)
            for result in results:
                if not isinstance(result, BaseException):
                    return result
            # The worker that holds the message says why it can't be exported (not suspended, say).
            for result in results:
                if isinstance(result, UserError) and not isinstance(result, NotFoundError):
                    raise result
            raise NotFoundError(f"The message '{args.get('identity')}' couldn't be found.")
        if op == "submit":
            return await call_socket(self.home.worker_socket(0), op, args)
        if op == "metrics":
            return [w for found in self._successes(await self._all(op, args)) for w in found]
        if op == "status":
            statuses = self._successes(await self._all(op, args))
            first = dict(statuses[0])
            for key in ("received", "delivered", "failed", "commits", "sessions"):
                first[key] = sum(s.get(key, 0) for s in statuses)
            first["revision"] = min(s["revision"] for s in statuses)
            first["back_pressure"] = max((s["back_pressure"] for s in statuses if s.get("back_pressure")),
                                         key=lambda bp: LEVELS.index(bp["level"]), default=None)
            first["workers"] = len(statuses)
            return first
        raise UserError(f"Unknown runtime operation '{op}'.")


_STATUS_ORDER = {"Suspended": 0, "Active": 1, "Retry": 2, "Ready": 3}


def message_order(record: Record) -> tuple[int, str]:
    """Messages in the order one worker lists them: by internal id (a number), then queue."""
    queue, _, number = record["Identity"].rpartition("\\")
    return (int(number) if number.isdigit() else 0, queue)


def merge_queues(per_worker: list[list[Record]]) -> list[Record]:
    """One record per queue — its identity and its connector: two send connectors to the same smart host have
    queues of the same name, which stay apart — with counts and rates summed, the most telling status and
    error."""
    merged: dict[tuple[str, str], Record] = {}
    for records in per_worker:
        for r in records:
            key = (r["Identity"], str(r.get("NextHopConnector")))
            have = merged.get(key)
            if have is None:
                merged[key] = Record(r.type_name, dict(r.items()))
                continue
            for key in ("MessageCount", "DeferredMessageCount", "LockedMessageCount"):
                have.set(key, (have.get(key) or 0) + (r.get(key) or 0))
            for key in ("IncomingRate", "OutgoingRate", "Velocity"):
                have.set(key, round((have.get(key) or 0) + (r.get(key) or 0), 2))
            have.set("MessageCountsPerPriority", [a + b for a, b in zip(have.get("MessageCountsPerPriority") or [],
                                                                          r.get("MessageCountsPerPriority") or [])])
            if _STATUS_ORDER.get(r["Status"], 9) < _STATUS_ORDER.get(have["Status"], 9):
                have.set("Status", r["Status"])
            have.set("RetryCount", max(have.get("RetryCount") or 0, r.get("RetryCount") or 0))
            for key, pick in (("FirstRetryTime", min), ("NextRetryTime", min), ("LastRetryTime", max)):
                values = [v for v in (have.get(key), r.get(key)) if isinstance(v, dt.datetime)]
                have.set(key, pick(values) if values else None)
            if r.get("LastError") and (not have.get("LastError") or (r.get("LastRetryTime") and have.get(
                    "LastRetryTime") and r["LastRetryTime"] > have["LastRetryTime"])):
                have.set("LastError", r["LastError"])
    return sorted(merged.values(), key=lambda r: r["QueueIdentity"])
