"""Shared test helpers: data directories, the shell in-process, a real `mailgate serve`
process on loopback, and small SMTP utilities."""

from __future__ import annotations

import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from mailgate.config.store import ConfigStore
from mailgate.errors import UserError
from mailgate.home import Home
from mailgate.manage.context import ManagementContext
from mailgate.manage.organisation import initialise
from mailgate.shell.session import LinePrompter, Shell

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


_HANDED_OUT: set[tuple[str, int]] = set()


# pytest-xdist runs tests in several processes at once: each takes only the ports of its own residue, so two of
# them never hand out the same port (a server refuses a binding another program listens on, and two tests'
# servers on one port would each take the other's mail).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
PORTS_FROM, PORTS_TO = 20000, 32000   # Linux's ephemeral ports start at 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, of this test process's residue, below the kernel's ephemeral range (so no
    client connection holds it either; the kernel prefers odd ports for bind(("", 0)), which starved one
    residue). A port this process has handed out before is never given again."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        port = random.randrange(PORTS_FROM, PORTS_TO)
        port -= (port - _WORKER) % _WORKERS
        if port < PORTS_FROM or (host, port) in _HANDED_OUT:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add((host, port))
        return port


def make_home(path: Path, *, server: str = "EX01", domain: str = "domain.com", store: str | None = None) -> Home:
    home, _ = initialise(path, server=server, domain=domain, store_url=store)
    return home


class ShellRun:
    def __init__(self, ok: bool, out: str, err: str) -> None:
        self.ok, self.out, self.err = ok, out, err

    def __repr__(self) -> str:
        return f"ShellRun(ok={self.ok}, out={self.out!r}, err={self.err!r})"


def shell(home: Home, text: str, *, answers: Iterable[str] = (), runtime: Any = "client") -> ShellRun:
    """Run shell text in-process (as `mailgate shell -c`), answering prompts from ``answers``."""
    from mailgate.control import RuntimeClient

    store = ConfigStore(home.store_url)
    rt = RuntimeClient(home, timeout=120) if runtime == "client" else runtime
    ctx = ManagementContext(home, store, runtime=rt)
    out, err = io.StringIO(), io.StringIO()
    sh = Shell(ctx, out=out, err=err)
    ctx.prompter = LinePrompter(iter([a + "\n" for a in answers]), err)
    try:
        ok = sh.run_text(text)
    finally:
        store.dispose()
    return ShellRun(ok, out.getvalue(), err.getvalue())


def cli(home: Home | Path | None, *args: str, stdin: str | None = None, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `mailgate` command line."""
    cmd = [PYTHON, "-m", "mailgate.cli"]
    if home is not None:
        cmd += ["--home", str(home.path if isinstance(home, Home) else home)]
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=ROOT)


class Server:
    """`mailgate serve` in a child process."""

    running: set["Server"] = set()   # started and not yet stopped: conftest stops them after each test

    def __init__(self, home: Home, *, admin: bool = False, preexec: Any = None) -> None:
        self.home = home
        self.preexec = preexec   # run in the child before mailgate starts (e.g. to lower a resource limit)
        self.admin_port = free_port() if admin else None
        self.proc: subprocess.Popen[str] | None = None
        self.log = home.path / "serve.log"

    def start(self, timeout: float = 30, give_up_on: str | None = None) -> "Server":
        """Start ``mailgate serve`` and wait until it runs. ``give_up_on``: text that, once printed, means it won't
        (the start then fails at once instead of at the timeout)."""
        admin = f"127.0.0.1:{self.admin_port}" if self.admin_port else "off"
        offset = len(self.output())
        self._fh = open(self.log, "a")
        self.proc = subprocess.Popen([PYTHON, "-m", "mailgate.cli", "--home", str(self.home.path), "serve",
                                      "--admin-listen", admin], stdout=self._fh, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env={**os.environ, "MAILGATE_LOG_LEVEL": "WARNING"},
                                     preexec_fn=self.preexec)
        Server.running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mailgate serve exited with {self.proc.returncode}:\n{self.output()[offset:]}")
            if "is running" in self.output()[offset:]:
                return self
            if give_up_on is not None and give_up_on in self.output()[offset:]:
                break
            time.sleep(0.05)
        self.kill()   # its workers die with it (PR_SET_PDEATHSIG)
        raise RuntimeError(f"mailgate serve did not start:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
        code = self.proc.returncode
        self.proc = None
        Server.running.discard(self)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._fh.close()
        self.proc = None
        Server.running.discard(self)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message} (last value: {last!r})")


def synced(home: Home, timeout: float = 10.0) -> None:
    """Wait until the running server has loaded the store's current configuration revision."""
    from mailgate.control import RuntimeClient

    store = ConfigStore(home.store_url)
    try:
        wanted = store.revision()
    finally:
        store.dispose()
    client = RuntimeClient(home, timeout=10)

    def loaded() -> bool:
        try:
            return client.call("status")["revision"] >= wanted
        except UserError:   # a worker process still starting
            return False

    wait_for(loaded, timeout=timeout, message="the configuration reload")


def tracking_events(home: Home, *args: str, until: Iterable[str] = (), timeout: float = 20.0) -> list[str]:
    """EventIds of Get-MessageTrackingLog with ``args``, waiting until ``until`` appears in order within them."""
    wanted = list(until)
    command = "Get-MessageTrackingLog " + " ".join(args) + " | ForEach-Object { $_.EventId }"

    def events() -> list[str]:
        got = shell(home, command).out.split()
        it = iter(got)
        return got if all(w in it for w in wanted) else []

    return wait_for(events, timeout=timeout, message=f"tracking events {wanted}") if wanted else \
        shell(home, command).out.split()


def protocol_log(home: Home, direction: str, *, until: Iterable[str], timeout: float = 20.0) -> str:
    """The text of the SmtpReceive or SmtpSend protocol logs (``direction`` "Receive" or "Send"), waiting until
    every string in ``until`` is in it: the logs are written in batches, a quarter second apart."""
    wanted = list(until)
    directory = home.log_dir / "ProtocolLog" / f"Smtp{direction}"

    def text() -> str:
        got = "".join(p.read_text() for p in sorted(directory.rglob("*.LOG")))
        return got if all(w in got for w in wanted) else ""

    return wait_for(text, timeout=timeout, message=f"the {direction} protocol log to hold {wanted}")


def maildir_messages(home: Home, address: str) -> list[bytes]:
    new = home.mailbox_dir / address.lower() / "Maildir" / "new"
    if not new.exists():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]


def bind_ports(home: Home, **extra: str) -> dict[str, int]:
    """Move the default connectors to free loopback ports (tests may not use 25/587); no tarpit."""
    ports = {"frontend": free_port(), "client": free_port()}
    r = shell(home, f'Set-ReceiveConnector "Default Frontend {home.server}" -Bindings 127.0.0.1:{ports["frontend"]} '
                    f'-TarpitInterval 00:00:00\n'
                    f'Set-ReceiveConnector "Client Frontend {home.server}" -Bindings 127.0.0.1:{ports["client"]} '
                    f'-TarpitInterval 00:00:00 -AuthTarpitInterval 00:00:00', runtime=None)
    assert r.ok, r
    return ports


def server_rss_kb(pid: int) -> int:
    """RSS of a server: its process and its worker processes."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        todo += [int(c) for c in open(f"/proc/{p}/task/{p}/children").read().split()]
    return total


class PeakRss:
    """``with PeakRss(pid) as rss:`` samples the server's RSS in a thread; ``rss.growth_mb`` is its peak over
    what it was at the start."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.before = self.peak = server_rss_kb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, server_rss_kb(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join(5)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024
