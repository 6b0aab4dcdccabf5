"""Pipelines that flow (shell/streams.py): a cmdlet that reads as it is used (Get-MessageTrackingLog) is read a
chunk at a time by the commands that can take it so, and what they print or write is what the whole list gives."""

from __future__ import annotations

import gc
import io
import sys
import weakref
from pathlib import Path

from mailgate.errors import UserError
from mailgate.manage.cmdlets import Param, cmdlet, registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import to_int
from mailgate.manage.present import Record
from mailgate.shell.session import Shell
from mailgate.shell.streams import CHUNK


class _Counted(Record):
    """A Record that can be watched (weakref) to count how many are alive."""


class _Probe:
    """What Test-Stream has handed out: how many objects were read, and the most alive at one time."""
    read = 0
    alive = 0
    most_alive = 0

    @classmethod
    def reset(cls) -> None:
        gc.collect()   # the objects of an earlier run (a finished shell is a cycle) go before counting starts
        cls.read = cls.alive = cls.most_alive = 0

    @classmethod
    def made(cls, record: Record) -> Record:
        cls.read += 1
        cls.alive += 1
        cls.most_alive = max(cls.most_alive, cls.alive)
        weakref.finalize(record, cls.gone)
        return record

    @classmethod
    def gone(cls) -> None:
        cls.alive -= 1


if "Test-Stream" not in registry:
    @cmdlet("Test-Stream", [Param("Count", position=0, convert=to_int), Param("WideAfter", convert=to_int),
                            Param("FailAfter", convert=to_int), Param("Warn", switch=True)])
    def _test_stream(ctx, args):
        """Count records (N, Name, Size), made as they are read, like Get-MessageTrackingLog's."""
        count = min(args.get("Count") or 0, 100_000)   # the cmdlet fuzz test gives it every odd value

        def records():
            for n in range(1, count + 1):
                if args.get("FailAfter") is not None and n > args["FailAfter"]:
                    raise UserError("the store went away")
                wide = args.get("WideAfter") is not None and n > args["WideAfter"]
                name = f"item-{n:05d}" + ("-wide" * 4 if wide else "")
                yield _Probe.made(_Counted("StreamProbe", {"N": n, "Name": name, "Size": n * 10}))
            if args.get("Warn"):
                ctx.warn("there were more")
        return records()


class _Home:
    server = "EX01"
    path = "/nonexistent"


def run(text: str) -> tuple[bool, str, str]:
    _Probe.reset()
    ctx = ManagementContext(_Home(), store=None, runtime=None)  # type: ignore[arg-type]
    out, err = io.StringIO(), io.StringIO()
    ok = Shell(ctx, out=out, err=err).run_text(text)
    return ok, out.getvalue(), err.getvalue()


def test_select_first_stops_reading_after_the_first_chunk(monkeypatch):
    unraisable: list = []   # a generator closed early that doesn't stop cleanly says so only here
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    ok, out, err = run("Test-Stream 5000 | Select-Object -First 3 | Format-List N")
    gc.collect()
    assert ok, err
    assert [line for line in out.splitlines() if line] == ["N : 1", "N : 2", "N : 3"]
    assert _Probe.read <= CHUNK   # the list way read all 5000 first
    assert not unraisable, unraisable[0].exc_value


def test_skip_and_first_count_across_chunks():
    ok, out, err = run(f"Test-Stream 3000 | Select-Object -Skip {CHUNK - 1} -First 3 -Property N | "
                       "Format-Table -HideTableHeaders")
    assert ok, err
    assert out.split() == [str(CHUNK), str(CHUNK + 1), str(CHUNK + 2)]


def test_measure_and_export_hold_a_chunk_at_a_time(tmp_path: Path):
    ok, out, err = run("Test-Stream 5000 | Measure-Object -Property Size -Sum -Average -Maximum -Minimum | "
                       "Format-List Count,Sum,Average,Maximum,Minimum")
    assert ok, err
    assert [line.split(":")[1].strip() for line in out.splitlines() if line] == \
        ["5000", "125025000", "25005", "50000", "10"]
    assert _Probe.most_alive <= 2 * CHUNK + 1, _Probe.most_alive   # chunk being read + the one read ahead
    ok, _, err = run(f"Test-Stream 5000 | Where-Object {{ $_.N % 2 }} | "
                     f"Export-Csv '{tmp_path / 'odd.csv'}' -NoTypeInformation")
    assert ok, err
    assert _Probe.most_alive <= 2 * CHUNK + 1, _Probe.most_alive
    lines = (tmp_path / "odd.csv").read_text().splitlines()
    assert lines[0] == '"N","Name","Size"' and len(lines) == 2501
    assert lines[1] == '"1","item-00001","10"' and lines[-1] == '"4999","item-04999","49990"'
    for tail in (f"| Out-File '{tmp_path / 'all.txt'}'", "| Format-Table", "| Format-List", "| ConvertTo-Csv",
                 "| Out-Null", "| ForEach-Object { $_.N }", "| Select-Object N", f"> '{tmp_path / 'all.txt'}'",
                 "> $null", f"| Select-Object N >> '{tmp_path / 'all.txt'}'"):
        ok, _, err = run(f"Test-Stream 5000 {tail}")
        assert ok, err
        assert _Probe.most_alive <= 3 * CHUNK, (tail, _Probe.most_alive)   # a few chunks, not all 5000


def test_what_flows_prints_and_writes_what_the_whole_list_gives(tmp_path: Path):
    for tail in ("", " | Format-Table", " | Format-Table N,Name", " | Format-List", " | Select-Object N,Name",
                 " | ForEach-Object { $_.Name }", " | Where-Object Size -GT 19990", " | ConvertTo-Csv"):
        ok, streamed, err = run(f"Test-Stream 2500{tail}")
        assert ok, err
        ok, listed, err = run(f"$all = Test-Stream 2500; $all{tail}")
        assert ok, err
        assert streamed == listed, tail
    assert run("Test-Stream 2500")[1].count("Name") == 1   # one table, one header
    for writer in ("Export-Csv", "Out-File", "Out-File -Encoding Unicode", "Format-List | Out-File", ">",
                   "Select-Object N >"):
        pipe = "" if writer.startswith(">") else "| "
        ok, _, err = run(f"Test-Stream 2500 {pipe}{writer} '{tmp_path / 'a'}'; "
                         f"$all = Test-Stream 2500; $all {pipe}{writer} '{tmp_path / 'b'}'")
        assert ok, err
        assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes(), writer
        assert _Probe.most_alive == 2500   # the second one held them all; the first ran before it, chunk by chunk


def test_a_streamed_table_keeps_the_widths_of_its_first_chunk():
    """As PowerShell sizes a table by its first objects: a longer value further down is cut, not re-laid out."""
    ok, out, err = run(f"Test-Stream {CHUNK + 2} -WideAfter {CHUNK} | Format-Table N,Name")
    assert ok, err
    rows = [line for line in out.splitlines() if line.strip()]
    assert len(rows) == 2 + CHUNK + 2
    assert len({len(row) for row in rows[2:]}) == 1   # every row as wide as the first chunk's
    assert rows[-1] == "1002 item-01..."


def test_warnings_and_errors_of_a_streamed_cmdlet_come_when_it_has_been_read():
    ok, out, err = run("Test-Stream 1500 -Warn | Measure-Object")
    assert ok, err
    assert out.count("WARNING: there were more") == 1 and "Count    : 1500" in out
    ok, out, err = run(f"Test-Stream 3000 -FailAfter {CHUNK + 10}")
    assert not ok
    assert "the store went away" in err
    assert out.count("item-") == CHUNK + 10   # what was read before is printed, the table is closed
    assert out.endswith("\n\n")
    ok, out, err = run(f"Test-Stream 3000 -FailAfter {CHUNK + 10} -ErrorAction Stop; 'not run'")
    assert not ok and "the store went away" in err
    assert out.count("item-") == CHUNK + 10 and "not run" not in out


def test_commands_that_need_everything_still_get_everything():
    ok, out, err = run("Test-Stream 2500 | Sort-Object N -Descending | Select-Object -First 1 | Format-List N")
    assert ok, err
    assert out.split() == ["N", ":", "2500"]
    ok, out, err = run("Test-Stream 2500 | Select-Object -Last 2 | Format-List N")
    assert ok, err
    assert out.split() == ["N", ":", "2499", "N", ":", "2500"]
    ok, out, err = run("$x = Test-Stream 2500; $x.Count")
    assert ok, err
    assert out.strip() == "2500"


def test_get_message_tracking_log_flows_from_the_store(tmp_path: Path):
    """The real reader: 2,500 events of a store, counted and exported as they are read, one header printed, and
    the store usable at once after a search cut short (its reads hold no transaction open)."""
    import datetime as dt

    from mailgate.config.store import ConfigStore

    store = ConfigStore(f"sqlite:///{tmp_path / 'config.db'}")
    base = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.timezone.utc)
    store.insert_tracking([{"timestamp": base + dt.timedelta(seconds=i), "event_id": "RECEIVE", "source": "SMTP",
                            "server": "EX01", "sender": f"s{i}@a.example", "recipients": [f"r{i}@b.example"],
                            "internal_message_id": i, "message_subject": f"subject {i:04d}"} for i in range(2500)])

    def shell(text: str) -> tuple[bool, str, str]:
        ctx = ManagementContext(_Home(), store=store, runtime=None)  # type: ignore[arg-type]
        out, err = io.StringIO(), io.StringIO()
        ok = Shell(ctx, out=out, err=err).run_text(text)
        return ok, out.getvalue(), err.getvalue()

    ok, out, err = shell("Get-MessageTrackingLog -ResultSize Unlimited | Select-Object -First 2 -ExpandProperty "
                         "InternalMessageId; Get-MessageTrackingLog -ResultSize Unlimited | Measure-Object")
    assert ok, err
    assert out.split()[:2] == ["0", "1"] and "Count    : 2500" in out
    ok, out, err = shell("Get-MessageTrackingLog -ResultSize Unlimited")
    assert ok, err
    assert out.count("MessageSubject") == 1 and out.count("subject ") == 2500
    ok, out, err = shell(f"Get-MessageTrackingLog -ResultSize Unlimited | Export-Csv '{tmp_path / 'all.csv'}'; "
                         "Get-MessageTrackingLog")
    assert ok, err
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 2 + 2500
    assert out.count("subject ") == 1000 and out.count("WARNING: Only the first 1000 items are shown") == 1


def test_a_file_that_cannot_be_written_is_a_clear_error_when_output_flows_to_it(tmp_path: Path):
    for tail in ("| Out-File", "| Export-Csv", ">"):
        ok, out, err = run(f"Test-Stream 1500 {tail} '{tmp_path / 'no' / 'such' / 'x.txt'}'; 'next'")
        assert not ok and "This is a bug" not in err, err
        assert "No such file or directory" in err, err
        assert out.strip() == "next"
