"""Tracking while the disk is full: events that could not be written are kept and written when writing
works again, and a log file never keeps half a line from a failed write."""

from __future__ import annotations

import datetime as dt
import errno
import sqlite3

import mailgate.tracking.logs as logs
from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate.tracking.logs import TRACKING_FIELDS, CsvLogWriter
from mailgate.tracking.tracker import MessageTracker


class FlakyIndex:
    """The store's tracking index, failing like a full disk until ``full`` is cleared."""

    def __init__(self) -> None:
        self.full = True
        self.rows: list[tuple] = []

    def tracking_values(self, r: dict) -> tuple:
        return (r["event_id"], r.get("message_id"))

    def insert_tracking_values(self, values: list[tuple], recipients: list[tuple]) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        self.rows += values


def test_events_that_could_not_be_written_are_written_once_the_disk_has_room(tmp_path, monkeypatch):
    index = FlakyIndex()
    tracker = MessageTracker(index, "EX01", tmp_path / "MessageTracking")
    real_write = tracker.files.write_lines
    disk_full = True

    def write_lines(lines, now):
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(lines, now)

    monkeypatch.setattr(tracker.files, "write_lines", write_lines)
    try:
        for n in range(3):
            tracker.event("RECEIVE", "SMTP", message_id=f"<m{n}@test>", recipients=["a@example.com"])
        tracker.flush()
        assert index.rows == [] and not list((tmp_path / "MessageTracking").glob("*.LOG"))
        index.full, disk_full = False, False
        tracker.event("SEND", "SMTP", message_id="<m0@test>", recipients=["a@example.com"])
        tracker.flush()
        assert index.rows == [("RECEIVE", "<m0@test>"), ("RECEIVE", "<m1@test>"), ("RECEIVE", "<m2@test>"),
                              ("SEND", "<m0@test>")]
        text = next((tmp_path / "MessageTracking").glob("*.LOG")).read_text()
        assert [line.count("<m") for line in text.splitlines() if not line.startswith("#")] == [1, 1, 1, 1]
        tracker.flush()                                        # nothing held any more: nothing written twice
        assert len(index.rows) == 4
    finally:
        tracker.close()


def test_a_failed_write_leaves_no_half_line_in_the_log_file(tmp_path, monkeypatch):
    writer = CsvLogWriter(tmp_path, "MSGTRK", "Message Tracking Log", TRACKING_FIELDS)
    now = dt.datetime.now(dt.timezone.utc)
    writer.write_lines(["first,line\r\n"], now)
    path = next(tmp_path.glob("*.LOG"))
    before = path.read_bytes()
    real_write = logs.os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.os, "write", half_then_full)
    try:
        writer.write_lines(["second,line\r\n"], now)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("the write should have failed")
    monkeypatch.setattr(logs.os, "write", real_write)
    assert path.read_bytes() == before
    writer.write_lines(["second,line\r\n"], now)
    assert path.read_bytes() == before + b"second,line\r\n"
    writer.close()


def test_each_recipients_status_comes_back_whole_though_statuses_contain_semicolons(tmp_path):
    from mailgate.config.store import ConfigStore
    store = ConfigStore(f"sqlite:///{tmp_path / 'config.db'}")
    statuses = ["550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                "554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain b.example"]
    now = dt.datetime.now(dt.timezone.utc)
    store.insert_tracking([{"timestamp": now, "event_id": "FAIL", "source": "SMTP", "server": "EX01",
                            "recipients": ["a@a.example", "b@b.example"], "recipient_status": statuses},
                           {"timestamp": now, "event_id": "FAIL", "source": "SMTP", "server": "EX01",
                            "recipients": ["c@c.example"], "recipient_status": statuses[:1]}])
    # a row written before the separator changed: the statuses joined with ";" are told apart by their codes
    with store.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO message_tracking (timestamp, event_id, source, server, recipients, "
                             "recipient_status) VALUES (?, 'DEFER', 'SMTP', 'EX01', 'a@a.example;b@b.example', ?)",
                             (now.replace(tzinfo=None).isoformat(" ", "microseconds"), ";".join(statuses)))
    rows = store.query_tracking()
    assert [r["recipient_status"] for r in rows] == [statuses, statuses[:1], statuses]
    store.dispose()


def test_workers_started_in_the_same_millisecond_never_share_a_protocol_log_session_id(tmp_path, monkeypatch):
    import time as time_module

    from mailgate.tracking.tracker import ProtocolLog

    monkeypatch.setattr(time_module, "time", lambda: 1796450000.123)
    logs = [ProtocolLog(tmp_path, "receive", worker=w, workers=2) for w in (0, 1)]
    try:
        ids = [log.session("EX01\\R", "127.0.0.1:25", "127.0.0.2:5000").session_id for log in logs for _ in range(500)]
        assert len(set(ids)) == len(ids) == 1000
        assert all(len(i) == 16 for i in ids)
    finally:
        for log in logs:
            log.close()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.text(alphabet='a,"\r\n é;', max_size=6)), min_size=2, max_size=8))
def test_a_log_record_is_written_as_the_csv_module_writes_it(values):
    """Records with nothing to quote take a shortcut (one look at the whole line); both ways give the csv module's
    text (minimal quoting, CRLF)."""
    import csv
    import io
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(values)
    assert logs.csv_line(values) == out.getvalue()


_OFFSETS = st.sampled_from([dt.timedelta(microseconds=1), dt.timedelta(milliseconds=999), dt.timedelta(seconds=1),
                            dt.timedelta(minutes=1), dt.timedelta(hours=1), dt.timedelta(days=1),
                            dt.timedelta(days=31), dt.timedelta(days=365), dt.timedelta(days=366)])


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(9980, 1, 1)),
       st.lists(st.tuples(_OFFSETS, st.booleans(), st.sampled_from([0, 5, -8])), max_size=12))
def test_log_and_index_timestamps_read_as_isoformat_writes_them(start, steps):
    """The logs and the index keep the text of the last second they formatted: times that share it, and times
    that differ from it only in a minute, hour, day, month or year, each get their own text."""
    from mailgate.config.store import _sqlite_timestamp
    when = start
    for offset, backwards, hours in [(dt.timedelta(0), False, 0), *steps]:
        when = when - offset if backwards and when - offset > dt.datetime(1971, 1, 1) else when + offset
        aware = when.replace(tzinfo=dt.timezone.utc).astimezone(dt.timezone(dt.timedelta(hours=hours)))
        assert logs.iso(aware) == when.isoformat(timespec="milliseconds") + "Z"
        assert _sqlite_timestamp(aware) == _sqlite_timestamp(when) == when.isoformat(" ", "microseconds")


_FIELD_VALUES = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(alphabet='a,"\r\n é;', max_size=6),
                          st.lists(st.one_of(st.integers(), st.text(alphabet='a,"é;', max_size=4)), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["client_ip", "message_subject", "recipient_status", "total_bytes",
                                        "source_context", "custom_data", "message_id"]), _FIELD_VALUES),
       st.lists(st.text(alphabet='a,"é;@', max_size=4), max_size=3))
def test_a_tracking_record_holds_each_field_as_text(tmp_path_factory, fields, recipients):
    """Each field of a MSGTRK record reads back as its text: lists joined with ";", nothing for None."""
    import csv
    tracker = MessageTracker(FlakyIndex(), "EX01", tmp_path_factory.mktemp("t"))
    try:
        tracker._buffer.add = lambda event: written.append(event[0])
        written: list[str] = []
        fields["recipients"] = recipients
        tracker.event("RECEIVE", "SMTP", **fields)
        record = dict(zip(TRACKING_FIELDS, next(csv.reader([written[0].removesuffix("\r\n")]))))
    finally:
        tracker.close()
    keys = {"recipients": "recipient-address"}
    for key, value in fields.items():
        wanted = "" if value is None else ";".join(map(str, value)) if isinstance(value, list) else str(value)
        assert record[keys.get(key, key.replace("_", "-"))] == wanted
    assert record["event-id"] == "RECEIVE" and record["transport-traffic-type"] == "Email"
