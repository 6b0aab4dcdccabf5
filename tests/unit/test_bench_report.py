"""The benchmark's report (bench/run.py, not run in CI): figures from a run become the tables and the targets."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"
LABELS = ["10000x2K c20", "10000x50K c20"]
MACHINE = {"cpus": 2, "cpu": "Test CPU", "kernel": "6", "python": "3.11", "postfix": "3.7"}


@functools.cache
def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_acceptance_alone_is_compared_between_the_two_holding_servers():
    bench = load_bench()
    labels = ["10000x2K c20", "10000x50K c20", "2000x2K c1"]
    rates = {"postfix": 900.0, "mailgate": 1400.0, "postfix-hold": 1000.0, "mailgate-hold": 3100.0}
    runs = []
    for rep in range(3):
        for label in labels:
            for target, rate in rates.items():
                if target.endswith("-hold") and label not in labels[:2]:
                    continue
                # The middle repetition is the median: the report must take it, not the mean or the last.
                factor = {0: 0.5, 1: 1.0, 2: 3.0}[rep]
                runs.append(bench.Run(target, label, rep, 10.0, rate * factor, server_cpu_per_1000=1.0 * factor))
    report = bench.build_report(runs, labels, {}, dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc), False, MACHINE)

    section = report.split("## Acceptance alone")[1].split("##")[0]
    assert "| 10000x2K c20 | 1000.0 | 3100.0 | 3.10 | 1.0 / 1.0 |" in section
    assert "| 10000x50K c20 | 1000.0 | 3100.0 | 3.10 |" in section
    assert "2000x2K c1" not in section          # the holding servers ran the two 20-session loads only
    targets = report.split("## Targets")[1]
    assert "| acceptance ≥ 3× Postfix, 10000x2K c20 | 1.56× | no (52% of it) |" in targets
    assert "| acceptance alone ≥ 3× Postfix's, both holding, 10000x2K c20 | 3.10× | yes |" in targets


def test_a_run_without_holding_servers_reports_as_before():
    bench = load_bench()
    runs = [bench.Run(t, "10000x2K c20", 0, 10.0, r) for t, r in (("postfix", 1000.0), ("mailgate", 1500.0))]
    report = bench.build_report(runs, ["10000x2K c20", "10000x50K c20"], {},
                                dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc), False, MACHINE)
    assert "Acceptance alone" not in report
    assert "| acceptance ≥ 3× Postfix, 10000x2K c20 | 1.50× | no (50% of it) |" in report


def test_cpu_time_taken_by_the_host_is_reported_and_warned_of():
    """A run on a VM whose host gives the CPUs to other guests measures them too: the report says how much was
    taken, over the whole run and at the worst measurement, and warns above 5 %."""
    bench = load_bench()
    runs = [bench.Run("postfix", "10000x2K c20", 0, 10.0, 1000.0, steal_percent=0.4),
            bench.Run("mailgate", "10000x2K c20", 0, 10.0, 1500.0, steal_percent=18.2)]
    started = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)
    report = bench.build_report(runs, LABELS, {"steal_percent": 7.5}, started, False, MACHINE)
    assert ("CPU time taken by the host (steal) during the run: 7.5 %; the most during one measurement: 18.2 % "
            "(mailgate, 10000x2K c20, rep 0). **Over 5 %") in report
    calm = [bench.Run("postfix", "10000x2K c20", 0, 10.0, 1000.0, steal_percent=0.2)]
    report = bench.build_report(calm, LABELS, {"steal_percent": 0.1}, started, False, MACHINE)
    assert "steal) during the run: 0.1 %; the most during one measurement: 0.2 % (postfix, 10000x2K c20, rep 0)." in report
    assert "Over 5 %" not in report
    # A run recorded before steal was measured says nothing of it.
    assert "steal" not in bench.build_report(calm, LABELS, {}, started, False, MACHINE)
    before, after = (10, 1000), (85, 2000)
    assert bench.steal_percent(before, after) == 7.5
    stolen, total = bench.cpu_steal()
    assert 0 <= stolen <= total


def test_a_child_that_exits_while_it_is_read_counts_nothing_and_stops_nothing(monkeypatch):
    """A server's child may exit between being listed and having its /proc files read; the read then fails with
    ESRCH (a run of `make bench` ended half way on it). Its figures count as nothing; the rest still count."""
    bench = load_bench()
    gone = 4_000_000   # above any pid_max: a process that has just gone
    real_open = open

    class Vanished:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            raise ProcessLookupError(3, "No such process")

    def fake_open(path, *args, **kwargs):
        return Vanished() if f"/proc/{gone}/" in str(path) else real_open(path, *args, **kwargs)

    monkeypatch.setattr(bench, "open", fake_open, raising=False)
    monkeypatch.setattr(bench, "descendants", lambda pid: [gone])
    me = bench.proc_cpu(os.getpid())
    assert me > 0
    target = bench.Target("server", "127.0.0.1", 25, pid=os.getpid(), cpu_children=True)
    assert target.cpu() >= me
    assert bench.proc_cpu(gone) == 0.0
    assert bench.rss_kb(gone) == 0
    assert bench.tree_rss_kb(os.getpid()) == bench.rss_kb(os.getpid()) > 0
