"""Interleaved A/B of two versions of mailgate on this machine: is a change faster?

    .venv/bin/python bench/ab.py --base HEAD~1 4000x20 1500x1

Starts mailgate twice — the working tree (B) and ``--base`` checked out in a temporary git worktree (A), each
with the bench's settings and its own smtp-sink — and runs each load (MESSAGESxSESSIONS[xKB], 2 KB if not said) on
both, alternating which goes first, ``--reps`` times. Prints the median acceptance rate and mailgate's CPU
per message of each, and B/A. Both servers stay up while they are compared, so the machine's drift (±10–20 % on
this VM) hits both alike.

That is done twice: first with A started before B, then with both restarted, B first. A server's speed depends
on its start as well as on its code (A/A runs on this VM: B/A 0.82 with A started first, 1.12 with B first, in
one pair of runs; 0.97 and 0.99 in another), so the result is the geometric mean of the two rounds' ratios, and
each round's ratio is printed: a difference under ≈ 5 % is not a finding.

``--latency N`` adds, in each repetition, the bench's accept-latency client (N messages of 2 KB at 20 sessions,
timed from the end of the body to the 250) on both, alternated the same way, and prints the medians of p50 and
p99 per round: a server's start moves its p99 by ≈ ±1.5 ms on this VM, so only a difference that holds in both
start orders counts.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def harness(root: Path, name: str) -> ModuleType:
    """bench/run.py of one tree: its Mailgate class runs that tree's src/."""
    spec = importlib.util.spec_from_file_location(name, root / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_speedups(tree: Path) -> None:
    """Compile a checked-out tree's C parts next to their sources, so that A runs its own C and not the Python
    fallbacks. (Built on their own, outside the tree: setuptools would read the tree's pyproject.toml, which older
    setuptools refuse.)"""
    package = tree / "src" / "mailgate"
    for source in sorted(package.glob("*/_*.c")):
        name = f"mailgate.{source.parent.name}.{source.stem}"
        with tempfile.TemporaryDirectory() as tmp:
            script = ("from setuptools import Extension, setup; "
                      f"setup(name='speedups', script_args=['-q', 'build_ext', '--build-lib', 'lib', '--build-temp', "
                      f"'obj'], ext_modules=[Extension({name!r}, [{str(source)!r}])])")
            subprocess.run([sys.executable, "-c", script], cwd=tmp, check=True, capture_output=True)
            for built in (Path(tmp) / "lib" / "mailgate" / source.parent.name).glob(f"{source.stem}*"):
                shutil.copy(built, source.parent)


def stop(servers: dict[str, tuple]) -> None:
    for _, _, mailgate, sink in servers.values():
        mailgate.stop()
        sink.stop()
    servers.clear()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision to compare the working tree against")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latency", type=int, default=0, metavar="N",
                        help="also time N messages' acceptance at 20 sessions in each repetition (p50, p99)")
    parser.add_argument("loads", nargs="*", default=["4000x20", "1500x1"], help="MESSAGESxSESSIONS[xKB] (2 KB)")
    args = parser.parse_args()
    loads = [(*map(int, text.split("x")), 2)[:3] for text in args.loads]
    base = Path(tempfile.mkdtemp(prefix="mailgate-ab-")) / "base"
    subprocess.run(["git", "-C", str(HERE.parent), "worktree", "add", "--detach", str(base), args.base], check=True,
                   capture_output=True)
    build_speedups(base)
    servers: dict[str, tuple] = {}
    results: dict[tuple[int, int, int, str, int], list[tuple[float, float]]] = {}
    latencies: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for round_index, order in enumerate((("A", "B"), ("B", "A"))):
            for label in order:
                root = base if label == "A" else HERE.parent
                run = harness(root, f"bench_run_{label}_{round_index}")
                sink = run.Sink()
                mailgate = run.Mailgate(Path(tempfile.mkdtemp(prefix=f"mailgate-ab-{label}-")), sink)
                target = run.Target(label, "127.0.0.1", mailgate.port, relay_sink=sink, pid=mailgate.proc.pid,
                                    cpu_children=True)
                servers[label] = (run, target, mailgate, sink)
                run.measure(target, run.Load(1500, 2048, 20), 0, "rcpt@sink.test")   # warm-up, not counted
            for rep in range(args.reps):
                for messages, sessions, kb in loads:
                    for label in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                        run, target, _, _ = servers[label]
                        r = run.measure(target, run.Load(messages, kb * 1024, sessions), rep, "rcpt@sink.test")
                        results.setdefault((messages, sessions, kb, label, round_index), []).append(
                            (r.rate, r.server_cpu_per_1000))
                        time.sleep(1)
                for label in ("A", "B") if rep % 2 == 0 else ("B", "A"):
                    if args.latency:
                        run, target, _, _ = servers[label]
                        latencies.setdefault((label, round_index), []).append(
                            run.latency(target, args.latency, 20, 2048))
                        time.sleep(1)
            stop(servers)
        print(f"A = {args.base}, B = the working tree; medians of {args.reps} per round; round 1 started A first, "
              f"round 2 B first")
        for messages, sessions, kb in loads:
            rounds = []
            for round_index in (0, 1):
                a, b = (results[(messages, sessions, kb, label, round_index)] for label in ("A", "B"))
                rate_a, rate_b = (statistics.median(x[0] for x in v) for v in (a, b))
                cpu_a, cpu_b = (statistics.median(x[1] for x in v) for v in (a, b))
                rounds.append((rate_a, rate_b, cpu_a, cpu_b))
            rate_a, rate_b, cpu_a, cpu_b = (statistics.median(r[i] for r in rounds) for i in range(4))
            rate_ratio = statistics.geometric_mean([r[1] / r[0] for r in rounds])
            cpu_ratio = statistics.geometric_mean([r[3] / r[2] for r in rounds])
            each = ", ".join(f"{r[1] / r[0]:.3f}" for r in rounds)
            print(f"{messages} x {kb} KB, {sessions} sessions: A {rate_a:.0f} msg/s, {cpu_a:.3f} ms CPU/msg; "
                  f"B {rate_b:.0f} msg/s, {cpu_b:.3f} ms CPU/msg; B/A rate {rate_ratio:.3f} (rounds: {each}), "
                  f"CPU {cpu_ratio:.3f}")
        for round_index in (0, 1) if args.latency else ():
            each = {label: [lat for lat in latencies[(label, round_index)] if lat] for label in ("A", "B")}
            line = "; ".join(f"{label} p50 {statistics.median(x['p50_ms'] for x in v):.2f} ms, "
                             f"p99 {statistics.median(x['p99_ms'] for x in v):.2f} ms" for label, v in each.items())
            print(f"accept latency, {args.latency} x 2 KB at 20 sessions, round {round_index + 1} "
                  f"({'A' if round_index == 0 else 'B'} started first): {line}")
    finally:
        stop(servers)
        subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
        shutil.rmtree(base.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
