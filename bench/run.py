"""mailgate against Postfix on this machine, with Postfix's own load tools.

    .venv/bin/python bench/run.py            # the full matrix (13–17 minutes)
    .venv/bin/python bench/run.py --quick    # a smoke run with tiny counts

Servers, all on loopback in the same run, loads interleaved so machine drift hits all alike:
  sink           smtp-sink alone: the protocol ceiling
  postfix        Postfix accepting into its durable queue, then discarding
  postfix-relay  Postfix relaying to an smtp-sink
  mailgate       mailgate with its default settings (durable queue, tracking on) relaying to an smtp-sink
  postfix-hold   Postfix accepting into its hold queue (an access rule's HOLD): acceptance and nothing else
  mailgate-hold  mailgate with its Submission queue suspended (Suspend-Queue): acceptance and nothing else

Figures: acceptance rate (smtp-source), end-to-end relay rate (counted at the sink), accept latency
p50/p99, CPU per 1,000 messages, peak memory, memory per idle session, 5,000 sessions held; each also
as a ratio to Postfix in the same run. Results: bench/results/<date>.json and .md, latest.md.
Every process is started and stopped here by PID; every load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from postfix import Postfix  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable
SOURCE_TIMEOUT = 300


_HANDED_OUT: set[int] = set()


def port(host: str = "127.0.0.1") -> int:
    """A free port, never one handed out before (the kernel may offer a just-closed port again)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            p = s.getsockname()[1]
        if p not in _HANDED_OUT:
            _HANDED_OUT.add(p)
            return p


def cpu_jiffies() -> int:
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    return sum(int(x) for x in parts[:3]) + sum(int(x) for x in parts[5:8])   # user nice system irq softirq steal


def cpu_steal() -> tuple[int, int]:
    """(stolen, all) CPU ticks of the machine so far: time the host gave this VM's CPUs to others (the 8th field
    of /proc/stat's cpu line). A run during which the host takes a share of the CPUs measures the neighbours
    as much as the servers."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:9]]
    return parts[7], sum(parts)


def steal_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    stolen, total = after[0] - before[0], after[1] - before[1]
    return round(100 * stolen / total, 1) if total > 0 else 0.0


def read_proc(path: str) -> str | None:
    """A file under /proc, or None when its process has gone: a server's child (Postfix's smtpd, cleanup) may
    exit between being listed and being read, and reading then fails with ESRCH, not ENOENT (that ended the
    08:30 run half way)."""
    try:
        with open(path) as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_cpu(pid: int, children: bool = False) -> float:
    text = read_proc(f"/proc/{pid}/stat")
    if text is None:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_kb(pid: int, key: str = "VmRSS") -> int:
    return rss_kb(pid, key) + sum(rss_kb(c, key) for c in descendants(pid))


def rss_kb(pid: int, key: str = "VmRSS") -> int:
    for line in (read_proc(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = (read_proc(f"/proc/{p}/task/{p}/children") or "").split()
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


class Sink:
    """smtp-sink with its message counter read from its -c output."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.port = port(host)
        self.host = host
        self.count = 0
        self.proc = subprocess.Popen(["smtp-sink", "-c", "-u", "nobody", "-4", f"{host}:{self.port}", "1024"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(host, self.port)

    def _read(self) -> None:
        buf = b""
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(4096) if hasattr(self.proc.stdout, "read1") else self.proc.stdout.read(4096)
            if not chunk:
                return
            buf = (buf + chunk)[-200:]
            m = re.findall(rb"mesg=(\d+)", buf)
            if m:
                self.count = int(m[-1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def wait_port(host: str, p: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, p), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{p}")


@dataclass
class Target:
    name: str
    host: str
    port: int
    relay_sink: Sink | None = None       # counted for end-to-end figures
    pid: int | None = None               # the server's main process (CPU, memory)
    cpu_children: bool = False           # Postfix: include reaped children (smtpd, cleanup...)
    stop: Any = None
    memory: Any = None                   # callable → current total RSS in KB
    only_loads: tuple[str, ...] = ()     # the loads this server runs (all when empty)
    timed: bool = True                   # measured for accept latency too

    def runs(self, load: "Load") -> bool:
        return not self.only_loads or load.label in self.only_loads

    def cpu(self) -> float:
        if self.pid is None:
            return 0.0
        total = proc_cpu(self.pid, children=self.cpu_children)
        if self.cpu_children:
            total += sum(proc_cpu(c) for c in descendants(self.pid))
        return total


class Mailgate:
    def __init__(self, work: Path, sink: Sink, *, name: str = "mailgate", hold: bool = False) -> None:
        self.home = work / name
        self.port = port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        run = lambda *a, **kw: subprocess.run([PY, "-m", "mailgate.cli", "--home", str(self.home), *a],  # noqa: E731
                                              check=True, capture_output=True, text=True, env=env, **kw)
        run("init", "--server", "BENCH", "--domain", "bench.test")
        # Mailgate's defaults, plus what the bench needs: loopback ports, relay for the load generator,
        # no per-source connection cap (smtp-source uses one address), and a route to the sink.
        run("shell", "-c", f'''
Set-ReceiveConnector "Default Frontend BENCH" -Bindings 127.0.0.1:{port()}
Set-ReceiveConnector "Client Frontend BENCH" -Bindings 127.0.0.1:{port()}
New-ReceiveConnector Load -Bindings 127.0.0.1:{self.port} -RemoteIPRanges 127.0.0.0/8 -Custom `
    -PermissionGroups AnonymousUsers -MaxInboundConnectionPerSource unlimited -MaxInboundConnection unlimited
Add-ADPermission Load -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
New-SendConnector Sink -AddressSpaces sink.test -SmartHosts 127.0.0.1 -Port {sink.port}
''')
        self.log = open(work / f"{name}.log", "w")
        self.proc = subprocess.Popen([PY, "-m", "mailgate.cli", "--home", str(self.home), "serve", "--admin-listen",
                                      "off"], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_port("127.0.0.1", self.port)
        self.env = env
        if hold:   # the categoriser stops: accepted mail stays, durable, in BENCH\Submission
            run("shell", "-c", 'Suspend-Queue "BENCH\\Submission"')

    def queue_empty(self) -> bool:
        out = subprocess.run([PY, "-m", "mailgate.cli", "--home", str(self.home), "shell", "-c",
                              "(Get-Queue | Measure-Object -Property MessageCount -Sum).Sum"],
                             capture_output=True, text=True, env=self.env, timeout=60)
        return out.stdout.strip() in ("0", "0.0")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@dataclass
class Load:
    messages: int
    size: int
    sessions: int
    reuse: bool = False

    @property
    def label(self) -> str:
        size = f"{self.size // 1024}K"
        return f"{self.messages}x{size} c{self.sessions}" + (" reuse" if self.reuse else "")


@dataclass
class Run:
    target: str
    load: str
    rep: int
    seconds: float
    rate: float
    e2e_seconds: float | None = None
    e2e_rate: float | None = None
    server_cpu_per_1000: float | None = None
    machine_cpu_per_1000: float | None = None
    errors: str = ""
    steal_percent: float | None = None   # of the machine's CPU time during the load, taken by the host


def smtp_source(target: Target, load: Load, rcpt: str) -> tuple[float, str]:
    cmd = ["timeout", str(SOURCE_TIMEOUT), "smtp-source", "-4", "-s", str(load.sessions), "-m", str(load.messages),
           "-l", str(load.size), "-f", "bench@client.test", "-t", rcpt, "-M", "client.bench.invalid"]
    if load.reuse:
        cmd.append("-d")
    cmd.append(f"{target.host}:{target.port}")
    start = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    return elapsed, (out.stderr.strip()[:300] if out.returncode else "")


def measure(target: Target, load: Load, rep: int, rcpt: str) -> Run:
    sink = target.relay_sink
    before_sink = sink.count if sink else 0
    cpu0, machine0, steal0 = target.cpu(), cpu_jiffies(), cpu_steal()
    start = time.monotonic()
    seconds, errors = smtp_source(target, load, rcpt)
    run = Run(target.name, load.label, rep, round(seconds, 3), round(load.messages / seconds, 1), errors=errors)
    if sink is not None:
        deadline = time.monotonic() + SOURCE_TIMEOUT
        while sink.count - before_sink < load.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        e2e = time.monotonic() - start
        delivered = sink.count - before_sink
        run.e2e_seconds, run.e2e_rate = round(e2e, 3), round(delivered / e2e, 1)
        if delivered < load.messages:
            run.errors += f" only {delivered}/{load.messages} reached the sink"
    ticks = os.sysconf("SC_CLK_TCK")
    run.server_cpu_per_1000 = round((target.cpu() - cpu0) / load.messages * 1000, 3) if target.pid else None
    run.machine_cpu_per_1000 = round((cpu_jiffies() - machine0) / ticks / load.messages * 1000, 3)
    run.steal_percent = steal_percent(steal0, cpu_steal())
    return run


# ---------------------------------------------------------------------------
# Latency, memory and sessions


async def _latency_client(host: str, p: int, messages: int, sessions: int, size: int) -> list[float]:
    body = b"Subject: latency\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78) + b".\r\n"
    latencies: list[float] = []
    counter = iter(range(messages))

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await reader.readline()
            if not line or line[3:4] == b" ":
                return line

    async def session() -> None:
        reader, writer = await asyncio.open_connection(host, p)
        await reply(reader)
        writer.write(b"EHLO latency.test\r\n")
        await reply(reader)
        for _ in counter:
            writer.write(b"MAIL FROM:<bench@client.test>\r\n")
            await reply(reader)
            writer.write(b"RCPT TO:<rcpt@sink.test>\r\n")
            await reply(reader)
            writer.write(b"DATA\r\n")
            await reply(reader)
            started = time.perf_counter()
            writer.write(body)
            answer = await reply(reader)
            if answer.startswith(b"250"):
                latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        writer.close()

    await asyncio.gather(*(session() for _ in range(sessions)))
    return latencies


def latency(target: Target, messages: int, sessions: int, size: int) -> dict[str, float]:
    before = target.relay_sink.count if target.relay_sink else 0
    values = sorted(asyncio.run(asyncio.wait_for(_latency_client(target.host, target.port, messages, sessions, size),
                                                 SOURCE_TIMEOUT)))
    if target.relay_sink:
        # A relay still delivering this step's mail would load the machine while the next server is measured.
        deadline = time.monotonic() + SOURCE_TIMEOUT
        while target.relay_sink.count - before < len(values) and time.monotonic() < deadline:
            time.sleep(0.02)
    if not values:
        return {}
    return {"p50_ms": round(values[len(values) // 2] * 1000, 2), "p99_ms": round(values[int(len(values) * 0.99)] * 1000, 2)}


def idle_sessions(target: Target, count: int) -> dict[str, Any]:
    """Open ``count`` sessions that wait after the greeting; memory growth per session."""
    base = target.memory()
    socks, greeted = [], 0
    try:
        for i in range(count):
            s = socket.socket()
            s.settimeout(10)
            s.bind((f"127.{(i // 250) % 250 + 1}.{i % 250 + 1}.1", 0))
            s.connect((target.host, target.port))
            socks.append(s)
        for s in socks:
            try:
                if s.recv(64).startswith(b"220"):
                    greeted += 1
            except OSError:
                pass
        time.sleep(1)
        grown = target.memory() - base
    finally:
        for s in socks:
            s.close()
    return {"sessions": count, "greeted": greeted, "kb_per_session": round(grown / count, 1)}


# ---------------------------------------------------------------------------
# Profile


def profile(pid: int, seconds: int, out: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start py-spy on the server and its worker processes (only the thread holding the GIL: where Python
    time goes)."""
    pyspy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    raw = out.with_suffix(".txt")
    proc = subprocess.Popen([pyspy, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--gil", "--subprocesses", "-f", "raw",
                             "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, raw


# Frames on every stack (the program's entry and the event loop) say nothing about where time goes.
_FRAMES_IN_EVERY_SAMPLE = {"<module>", "main", "run_server", "run_event_loop", "Runner.run", "run", "_run_module_as_main",
                           "_run_code", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever",
                           "BaseEventLoop._run_once", "Handle._run"}


def summarise_profile(raw: Path, top: int = 15) -> list[tuple[str, float]]:
    totals: dict[str, int] = {}
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        n += c
        seen = set()
        for frame in stack.split(";"):
            name = frame.split(" (")[0]
            where = frame.rsplit("/", 1)[-1].split(":")[0] if "/" in frame else ""
            key = f"{name} ({where})"
            if key not in seen and name not in _FRAMES_IN_EVERY_SAMPLE and not name.startswith("process ") \
                    and ("mailgate" in frame or "asyncio" in frame or "sqlalchemy" in frame):
                seen.add(key)
                totals[key] = totals.get(key, 0) + c
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(k, round(v * 100 / max(n, 1), 1)) for k, v in ranked]


# ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny counts, one repetition (a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report", type=Path, metavar="RUN.json", help="only rewrite RUN.md (and latest.md) from RUN.json")
    args = parser.parse_args()
    if args.report:
        report = rebuild_report(args.report)
        args.report.with_suffix(".md").write_text(report)
        if "-quick" not in args.report.stem:
            (args.report.parent / "latest.md").write_text(report)
        print(report)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop every server by PID on the way out
    if os.geteuid() != 0 or not shutil.which("smtp-source") or not shutil.which("postfix"):
        print("bench: needs root and Debian's postfix (run `make bench`, which installs it)", file=sys.stderr)
        return 2
    quick = args.quick
    reps = 1 if quick else args.reps
    n = 200 if quick else 10_000
    loads = [Load(n, 2048, 20), Load(n, 51200, 20), Load(max(n // 5, 100), 2048, 1), Load(n, 2048, 100),
             Load(n, 2048, 20, reuse=True)]
    work = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    os.chmod(work, 0o755)
    started = dt.datetime.now(dt.timezone.utc)
    steal_at_start = cpu_steal()
    print(f"bench: working in {work}; {len(loads)} loads x {reps} reps", flush=True)
    sinks = {name: Sink() for name in ("ceiling", "postfix", "mailgate")}
    postfix_accept = Postfix(work / "pf-accept", "127.0.0.1", port(), transports={"sink.test": "discard:"},
                             extra={"default_process_limit": "150"}).start()
    postfix_relay = Postfix(work / "pf-relay", "127.0.0.1", port(),
                            transports={"sink.test": f"smtp:[127.0.0.1]:{sinks['postfix'].port}"},
                            extra={"default_process_limit": "150", "smtp_tls_security_level": "none"}).start()
    # Each server also runs the two 20-session loads holding what it accepts, so that acceptance is compared
    # without the delivery behind it (mailgate's defaults have no discard route; Postfix's discard: is one).
    postfix_hold = Postfix(work / "pf-hold", "127.0.0.1", port(), transports={"sink.test": "discard:"},
                           extra={"default_process_limit": "150",
                                  "smtpd_data_restrictions": "check_client_access static:HOLD"}).start()
    mailgate = Mailgate(work, sinks["mailgate"])
    mailgate_hold = Mailgate(work, sinks["mailgate"], name="mailgate-hold", hold=True)
    held_loads = tuple(load.label for load in loads[:2])

    def master_pid(pf: Postfix) -> int:
        return int((pf.dir / "data" / "master.pid").read_text().split()[0]) if (pf.dir / "data" / "master.pid").exists() \
            else int((pf.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def postfix_memory(pf: Postfix) -> int:
        return tree_rss_kb(master_pid(pf))

    targets = [
        Target("sink", "127.0.0.1", sinks["ceiling"].port, pid=sinks["ceiling"].proc.pid),
        Target("postfix", "127.0.0.1", postfix_accept.port, pid=master_pid(postfix_accept), cpu_children=True,
               memory=lambda: postfix_memory(postfix_accept)),
        Target("postfix-relay", "127.0.0.1", postfix_relay.port, relay_sink=sinks["postfix"],
               pid=master_pid(postfix_relay), cpu_children=True, memory=lambda: postfix_memory(postfix_relay)),
        # mailgate runs a supervisor and worker processes: CPU and memory are the whole process tree's.
        Target("mailgate", "127.0.0.1", mailgate.port, relay_sink=sinks["mailgate"], pid=mailgate.proc.pid,
               cpu_children=True, memory=lambda: tree_rss_kb(mailgate.proc.pid)),
        Target("postfix-hold", "127.0.0.1", postfix_hold.port, pid=master_pid(postfix_hold), cpu_children=True,
               only_loads=held_loads, timed=False),
        Target("mailgate-hold", "127.0.0.1", mailgate_hold.port, pid=mailgate_hold.proc.pid, cpu_children=True,
               only_loads=held_loads, timed=False),
    ]
    by_name = {t.name: t for t in targets}
    runs: list[Run] = []
    extra: dict[str, Any] = {"latency_runs": []}
    lat_n = 400 if quick else 4000
    try:
        # Every server's first thousands of messages (page cache, the queue's first WAL and segment, Python's
        # caches) run slower than the rest; a warm-up load that isn't counted keeps that out of rep 0.
        for t in targets:
            measure(t, Load(max(n // 5, 100), 2048, 20), -1, "rcpt@sink.test")
        for rep in range(reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]   # rotate to cancel drift
            for load in loads:
                for t in (t for t in order if t.runs(load)):
                    r = measure(t, load, rep, "rcpt@sink.test")
                    runs.append(r)
                    e2e = f" e2e {r.e2e_rate}/s" if r.e2e_rate else ""
                    print(f"  rep {rep} {load.label:22} {t.name:13} {r.rate:8.1f}/s{e2e} {r.errors}", flush=True)
                    time.sleep(0.5)
            # Latency repeats like the loads: a single measurement moves too much to compare.
            for t in (t for t in order if t.timed):
                lat = latency(t, lat_n, 20, 2048)
                extra["latency_runs"].append({"target": t.name, "rep": rep, **lat})
                print(f"  rep {rep} latency {'':15} {t.name:13} p50 {lat.get('p50_ms')} ms p99 {lat.get('p99_ms')} ms",
                      flush=True)
                time.sleep(0.5)
        extra["latency"] = latency_medians(extra["latency_runs"])
        print("bench: memory, sessions, profile", flush=True)
        extra["peak_rss_mb"] = {"mailgate": round(tree_rss_kb(mailgate.proc.pid, "VmHWM") / 1024, 1)}
        extra["idle_sessions"] = {
            "mailgate": idle_sessions(by_name["mailgate"], 200 if quick else 2000),
            "postfix": idle_sessions(by_name["postfix"], 50 if quick else 100),
        }
        held = idle_sessions(by_name["mailgate"], 500 if quick else 5000)
        extra["held_sessions"] = {"mailgate": held}
        raw = args.out / f"profile-{started:%Y%m%d-%H%M}"
        args.out.mkdir(parents=True, exist_ok=True)
        spy, raw_file = profile(mailgate.proc.pid, 6 if not quick else 3, raw)
        time.sleep(0.5)
        smtp_source(by_name["mailgate"], Load(n, 2048, 20), "rcpt@sink.test")
        spy.wait(60)
        if raw_file.exists():
            extra["profile"] = summarise_profile(raw_file)
            extra["profile_file"] = raw_file.name
    finally:
        mailgate.stop()
        mailgate_hold.stop()
        postfix_accept.stop()
        postfix_hold.stop()
        postfix_relay.stop()
        for s in sinks.values():
            s.stop()
    extra["steal_percent"] = steal_percent(steal_at_start, cpu_steal())
    report = build_report(runs, [load.label for load in loads], extra, started, quick)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = f"{started:%Y%m%d-%H%M}" + ("-quick" if quick else "")
    (args.out / f"{stamp}.json").write_text(json.dumps({"runs": [r.__dict__ for r in runs], **extra,
                                                        "machine": machine()}, indent=1))
    (args.out / f"{stamp}.md").write_text(report)
    if not quick:
        (args.out / "latest.md").write_text(report)
    print(report)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def latency_medians(lat_runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    names = list(dict.fromkeys(r["target"] for r in lat_runs))
    return {name: {key: median([r[key] for r in lat_runs if r["target"] == name and key in r])
                   for key in ("p50_ms", "p99_ms")} for name in names}


def machine() -> dict[str, Any]:
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "postfix": subprocess.run(["postconf", "-d", "mail_version"], capture_output=True, text=True).stdout.split("=")[-1].strip(),
            **file_costs()}


def file_costs(count: int = 1000) -> dict[str, float]:
    """What the designs differ in, on this machine's disk: creating a 2 KB file (Postfix: one per message),
    appending 2 KB to an open file (mailgate), and fdatasync after the append. CPU µs, sync wall µs. These
    vary a lot between machines of the same kind (≈ 500 µs to create a file on one, ≈ 10 µs on another), and
    with them how fast Postfix is next to mailgate."""
    directory = Path(tempfile.mkdtemp(prefix="mailgate-bench-files-", dir=ROOT))
    data = b"x" * 2048
    try:
        cpu = time.process_time()
        for i in range(count):
            fd = os.open(directory / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
        create = (time.process_time() - cpu) / count
        fd = os.open(directory / "append", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        cpu = time.process_time()
        for _ in range(count):
            os.write(fd, data)
        append = (time.process_time() - cpu) / count
        wall = time.perf_counter()
        for _ in range(count // 5):
            os.write(fd, data)
            os.fdatasync(fd)
        sync = (time.perf_counter() - wall) / (count // 5)
        os.close(fd)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"create_file_us": round(create * 1e6, 1), "append_us": round(append * 1e6, 1),
            "append_fdatasync_us": round(sync * 1e6, 1)}


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


STEAL_WARNING_PERCENT = 5.0


def steal_lines(runs: list[Run], extra: dict[str, Any]) -> list[str]:
    """What the host took of the CPUs during the run (older runs didn't measure it: nothing is said)."""
    if extra.get("steal_percent") is None:
        return []
    measured = [r for r in runs if r.steal_percent is not None]
    worst = max(measured, key=lambda r: r.steal_percent, default=None)
    line = f"CPU time taken by the host (steal) during the run: {extra['steal_percent']} %"
    if worst is not None:
        line += f"; the most during one measurement: {worst.steal_percent} % ({worst.target}, {worst.load}, rep {worst.rep})"
    if max([extra["steal_percent"]] + [r.steal_percent for r in measured]) > STEAL_WARNING_PERCENT:
        line += (". **Over 5 %: the host's other guests took part of these CPUs, so the figures measure them too; "
                 "compare with runs where it is near 0.**")
    else:
        line += "."
    return ["", line]


def build_report(runs: list[Run], labels: list[str], extra: dict[str, Any], started: dt.datetime, quick: bool,
                 m: dict[str, Any] | None = None) -> str:
    m = m or machine()

    def med(name: str, label: str, attr: str = "rate") -> float | None:
        return median([getattr(r, attr) for r in runs if r.target == name and r.load == label])

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a and b else "—"

    lines = [f"# mailgate vs Postfix — {started:%Y-%m-%d %H:%M} UTC" + (" (quick smoke run, not a result)" if quick else ""),
             "", f"Machine: {m['cpus']} × {m['cpu']}, kernel {m['kernel']}, Python {m['python']}, Postfix {m['postfix']}. "
             f"Medians of {max(r.rep for r in runs) + 1} interleaved repetitions; ratio = mailgate / Postfix in the same run.",
             *([] if "create_file_us" not in m else [
                 "", f"This machine's disk: creating a 2 KB file costs {m['create_file_us']} µs of CPU (Postfix makes one "
                 f"per message), appending 2 KB to an open file {m['append_us']} µs (mailgate), fdatasync after an "
                 f"append {m['append_fdatasync_us']} µs."]),
             *steal_lines(runs, extra),
             "", "## Acceptance (messages/s, smtp-source; new connection per message unless 'reuse')", "",
             "| load | sink (ceiling) | postfix | mailgate | mailgate / postfix |", "|---|---:|---:|---:|---:|"]
    for label in labels:
        pf, mg = med("postfix", label), med("mailgate", label)
        lines.append(f"| {label} | {med('sink', label)} | {pf} | {mg} | {ratio(mg, pf)} |")
    held = [label for label in labels if any(r.target == "mailgate-hold" and r.load == label for r in runs)]
    if held:
        lines += ["", "## Acceptance alone (messages/s): each server holds what it accepts", "",
                  "Postfix puts every message in its hold queue (an access rule's HOLD), mailgate keeps it in its "
                  "suspended Submission queue: both sync it to disk before the 250 and do nothing more with it.", "",
                  "| load | postfix-hold | mailgate-hold | mailgate / postfix | CPU ms per message, postfix / mailgate |",
                  "|---|---:|---:|---:|---:|"]
        for label in held:
            pf, mg = med("postfix-hold", label), med("mailgate-hold", label)
            pf_cpu, mg_cpu = (med(n, label, "server_cpu_per_1000") for n in ("postfix-hold", "mailgate-hold"))
            lines.append(f"| {label} | {pf} | {mg} | {ratio(mg, pf)} | {pf_cpu} / {mg_cpu} |")
    lines += ["", "## End-to-end relay to smtp-sink (messages/s, counted at the sink)", "",
              "| load | postfix-relay | mailgate | mailgate / postfix |", "|---|---:|---:|---:|"]
    for label in labels:
        pf, mg = med("postfix-relay", label, "e2e_rate"), med("mailgate", label, "e2e_rate")
        lines.append(f"| {label} | {pf} | {mg} | {ratio(mg, pf)} |")
    lines += ["", "## CPU seconds per 1,000 messages (server processes / whole machine incl. load generator)", "",
              "mailgate relays every message, so its fair peer is postfix-relay.", "",
              "| load | postfix | postfix-relay | mailgate | mailgate / postfix-relay (server) |", "|---|---:|---:|---:|---:|"]
    for label in labels:
        cells = []
        for name in ("postfix", "postfix-relay", "mailgate"):
            cells.append(f"{med(name, label, 'server_cpu_per_1000')} / {med(name, label, 'machine_cpu_per_1000')}")
        cpu_ratio = ratio(med("mailgate", label, "server_cpu_per_1000"), med("postfix-relay", label, "server_cpu_per_1000"))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {cpu_ratio} |")
    lat = extra.get("latency", {})
    if lat:
        pf = lat.get("postfix") or {}
        lat_runs = extra.get("latency_runs") or []
        reps_note = f"medians of {len({r['rep'] for r in lat_runs})} repetitions" if lat_runs else "one measurement"
        lines += ["", f"## Accept latency (end of DATA → 250), 20 sessions, 2 KB, {reps_note}", "",
                  "| server | p50 ms | p99 ms | p50 / postfix | p99 / postfix | p99 of each repetition |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, v in lat.items():
            each = ", ".join(str(r.get("p99_ms")) for r in lat_runs if r["target"] == name)
            lines.append(f"| {name} | {v.get('p50_ms')} | {v.get('p99_ms')} | {ratio(v.get('p50_ms'), pf.get('p50_ms'))} "
                         f"| {ratio(v.get('p99_ms'), pf.get('p99_ms'))} | {each} |")
    idle = extra.get("idle_sessions")
    if idle:
        mg_kb, pf_kb = idle["mailgate"]["kb_per_session"], idle["postfix"]["kb_per_session"]
        lines += ["", "## Memory", "",
                  f"- mailgate peak RSS (supervisor and workers): {extra['peak_rss_mb']['mailgate']} MB",
                  f"- idle sessions, mailgate: {idle['mailgate']['greeted']}/{idle['mailgate']['sessions']} greeted, "
                  f"{mg_kb} KB per session",
                  f"- idle sessions, Postfix (one smtpd process each, default process limit): "
                  f"{idle['postfix']['greeted']}/{idle['postfix']['sessions']} greeted, {pf_kb} KB per session "
                  f"(mailgate / postfix: {ratio(mg_kb, pf_kb)})",
                  f"- sessions held at once by mailgate: {extra['held_sessions']['mailgate']['greeted']}/"
                  f"{extra['held_sessions']['mailgate']['sessions']}"]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for label, want in ((labels[0], 3.0), (labels[1], 3.0)):
        got = med("mailgate", label), med("postfix", label)
        r = got[0] / got[1] if all(got) else 0.0
        lines.append(f"| acceptance ≥ 3× Postfix, {label} | {r:.2f}× | {'yes' if r >= want else f'no ({r / want:.0%} of it)'} |")
    for label in held:
        got = med("mailgate-hold", label), med("postfix-hold", label)
        r = got[0] / got[1] if all(got) else 0.0
        lines.append(f"| acceptance alone ≥ 3× Postfix's, both holding, {label} | {r:.2f}× | "
                     f"{'yes' if r >= 3 else f'no ({r / 3:.0%} of it)'} |")
    got = med("mailgate", labels[0], "e2e_rate"), med("postfix-relay", labels[0], "e2e_rate")
    r = got[0] / got[1] if all(got) else 0.0
    lines.append(f"| end-to-end relay ≥ 2× Postfix, {labels[0]} | {r:.2f}× | {'yes' if r >= 2 else f'no ({r / 2:.0%} of it)'} |")
    if lat.get("postfix") and lat.get("mailgate"):
        r = lat["mailgate"]["p99_ms"] / lat["postfix"]["p99_ms"]
        lines.append(f"| p99 accept latency ≤ Postfix's | {lat['mailgate']['p99_ms']} ms vs {lat['postfix']['p99_ms']} ms "
                     f"| {'yes' if r <= 1 else f'no ({r:.2f}× Postfix)'} |")
    if idle:
        kb = idle["mailgate"]["kb_per_session"]
        held = extra["held_sessions"]["mailgate"]
        lines.append(f"| ≤ 64 KB per idle session | {kb} KB | {'yes' if kb <= 64 else 'no'} |")
        lines.append(f"| 5,000 sessions held on 2 cores | {held['greeted']}/{held['sessions']} | "
                     f"{'yes' if held['greeted'] >= 5000 else 'no'} |")
    if extra.get("profile"):
        lines += ["", f"## Where mailgate's time goes (py-spy, GIL holder, 2 KB × 20 sessions; {extra['profile_file']})",
                  "", "| function (inclusive) | % of samples |", "|---|---:|"]
        lines += [f"| {name} | {pct} |" for name, pct in extra["profile"]]
    failures = [r for r in runs if r.errors]
    if failures:
        lines += ["", "## Errors", ""] + [f"- {r.target} {r.load} rep {r.rep}: {r.errors}" for r in failures]
    return "\n".join(lines) + "\n"


def rebuild_report(path: Path) -> str:
    """The Markdown table again from a run's JSON (after a change to the report's layout)."""
    data = json.loads(path.read_text())
    runs = [Run(**r) for r in data["runs"]]
    labels = list(dict.fromkeys(r.load for r in runs))
    started = dt.datetime.strptime(path.stem.split("-quick")[0], "%Y%m%d-%H%M").replace(tzinfo=dt.timezone.utc)
    extra = {k: v for k, v in data.items() if k not in ("runs", "machine")}
    return build_report(runs, labels, extra, started, "-quick" in path.stem, data.get("machine"))


if __name__ == "__main__":
    sys.exit(main())
