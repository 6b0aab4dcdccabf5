"""The queue store's write path: statements run at once in the open transaction, the commit thread commits
and syncs; a failing job leaves no trace; rows whose body a crash cut short are dropped at start-up."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time

import pytest
from mailgate.queue.store import INLINE_BYTES, BodyRef, NewMessage, NewRecipient, QueueStore


def message(body: BodyRef, subject: str) -> NewMessage:
    now = time.time()
    return NewMessage(network_id=subject, message_id=f"<{subject}@test>", sender="a@example.com", subject=subject,
                      size=body.length, received_at=now, expires_at=now + 3600, body=body,
                      recipients=[NewRecipient("b@example.com", "example.com")])


def subjects(directory) -> list[str]:
    with sqlite3.connect(directory / "queue.db") as db:
        return [row[0] for row in db.execute("SELECT subject FROM message ORDER BY id")]


def test_an_acknowledged_message_is_committed_and_its_body_readable(store, tmp_path):
    ref = store.append_body([b"Subject: one\r\n\r\nbody\r\n"])
    store.submit(message(ref, "one")).result(timeout=10)
    assert subjects(tmp_path / "queue") == ["one"]          # another connection sees it: committed
    row = store.reader().execute("SELECT * FROM message").fetchone()
    assert store.read_body(row) == b"Subject: one\r\n\r\nbody\r\n"


def test_a_small_body_lives_in_its_row_and_needs_no_segment(tmp_path):
    """Most mail fits in its row: one WAL sync makes it durable, and it survives a restart."""
    directory = tmp_path / "queue"
    store = QueueStore(directory)
    store.open()
    small = store.append_body([b"Subject: small\r\n\r\n", b"x" * 2000 + b"\r\n"])
    assert small.segment is None and small.data is not None
    store.submit(message(small, "small")).result(timeout=10)
    assert not store._segment_dirty                         # nothing for the segment's sync to do
    store.close()
    assert all(p.stat().st_size == 0 for p in (directory / "segments").iterdir())
    store = QueueStore(directory)
    store.open()
    try:
        row = store.reader().execute("SELECT * FROM message").fetchone()
        assert store.read_body(row) == b"Subject: small\r\n\r\n" + b"x" * 2000 + b"\r\n"
        # A row given without its body (as the delivery shortcut may hold it) reads it from the store.
        shortcut = {**dict(row), "body": None}
        assert store.read_body(shortcut) == store.read_body(row)
    finally:
        store.close()


def test_a_failing_job_leaves_no_trace_and_the_rest_of_its_transaction_commits(store, tmp_path):
    bad = store.execute("INSERT INTO counter (name, value) VALUES (?, ?)", [("twice", 1), ("twice", 2)], many=True)
    good = store.submit(message(store.append_body([b"x\r\n"]), "kept"))
    with pytest.raises(sqlite3.IntegrityError):
        bad.result(timeout=10)
    good.result(timeout=10)
    assert subjects(tmp_path / "queue") == ["kept"]
    with sqlite3.connect(tmp_path / "queue" / "queue.db") as db:
        assert db.execute("SELECT count(*) FROM counter WHERE name='twice'").fetchone()[0] == 0


def test_a_job_failing_after_others_in_its_transaction_takes_out_only_its_own_part(store, tmp_path):
    """Jobs share the open transaction and have no savepoint each: the one that fails part-way (its first row
    written, its second refused) is taken out by rolling back and running the others again; they commit as if
    nothing had happened, their results intact."""
    from mailgate.queue.store import DELIVERED

    wake, store._wake = store._wake, threading.Event()   # the commit thread sleeps until the jobs are in
    try:
        kept = message(store.append_body([b"a\r\n"]), "kept")
        delivered = message(store.append_body([b"b\r\n"]), "delivered")
        jobs = [store.submit(kept), store.submit(delivered),
                store.record(delivered.id, [(0, DELIVERED, "250 ok", time.time(), 0)])]
        bad = store.execute("INSERT INTO counter (name, value) VALUES (?, ?)", [("twice", 1), ("twice", 2)], many=True)
        jobs.append(store.submit(message(store.append_body([b"c\r\n"]), "after")))
    finally:
        store._wake = wake
    with pytest.raises(sqlite3.IntegrityError):
        bad.result(timeout=10)
    assert [job.result(timeout=10) for job in jobs] == [True, True, True, True]   # the outcome: deleted
    assert subjects(tmp_path / "queue") == ["kept", "after"]
    assert store.committed_messages == 3     # each counted once, though two ran twice
    with sqlite3.connect(tmp_path / "queue" / "queue.db") as db:
        assert db.execute("SELECT count(*) FROM counter WHERE name='twice'").fetchone()[0] == 0


def test_rows_whose_body_a_crash_cut_short_are_dropped_at_open(tmp_path, caplog):
    """A queue written by an earlier release (its rows were committed before their body was synced) can hold,
    after a machine crash, the rows of a message that was never acknowledged without all of its body.
    Start-up drops those and keeps the rest."""
    directory = tmp_path / "queue"
    store = QueueStore(directory)
    store.open()
    first = store.append_body([b"Subject: whole\r\n\r\n" + b"a" * INLINE_BYTES + b"\r\n"])   # to a segment
    second = store.append_body([b"Subject: cut\r\n\r\n" + b"b" * INLINE_BYTES + b"\r\n"])
    assert first.segment is not None and second.segment == first.segment
    path, fd = store.new_spool_file()
    with open(fd, "wb") as fh:
        fh.write(b"Subject: spooled\r\n\r\n" + b"c" * 1000)
    spooled = BodyRef(None, 0, 1020, path)
    for ref, name in ((first, "whole"), (second, "cut"), (spooled, "spooled")):
        store.submit(message(ref, name)).result(timeout=10)
    store.close()
    # What the disk may hold after such a crash: the segment and the spool file shorter than the rows say.
    segment = directory / "segments" / f"{first.segment:08d}.seg"
    with open(segment, "r+b") as fh:
        fh.truncate(second.offset + 10)
    with open(path, "r+b") as fh:
        fh.truncate(500)
    store = QueueStore(directory)
    with caplog.at_level(logging.WARNING, logger="mailgate.queue"):
        store.open()
    try:
        assert subjects(directory) == ["whole"]
        assert "dropping 2 message(s)" in caplog.text
        row = store.reader().execute("SELECT * FROM message").fetchone()
        assert store.read_body(row).startswith(b"Subject: whole")
    finally:
        store.close()


def test_a_transaction_rolled_back_whole_fails_every_job_in_it(store, tmp_path):
    """When SQLite gives up the whole transaction (disk full, I/O error), every job run in it fails — none
    is reported committed — and the next write starts a new transaction."""
    with sqlite3.connect(tmp_path / "queue" / "queue.db") as db:   # a statement that ends the transaction
        db.execute("CREATE TRIGGER boom BEFORE INSERT ON counter WHEN NEW.name='boom' "
                   "BEGIN SELECT RAISE(ROLLBACK, 'simulated disk full'); END")
    wake, store._wake = store._wake, threading.Event()   # the commit thread sleeps until the jobs are in
    try:
        first = store.submit(message(store.append_body([b"a\r\n"]), "first"))
        boom = store.execute("INSERT INTO counter (name, value) VALUES (?, ?)", ("boom", 1))
    finally:
        store._wake = wake
    for fut in (first, boom):
        with pytest.raises(sqlite3.Error, match="simulated disk full"):
            fut.result(timeout=10)
    later = store.submit(message(store.append_body([b"b\r\n"]), "later"))
    later.result(timeout=10)
    assert subjects(tmp_path / "queue") == ["later"]


def test_a_queue_from_before_inline_bodies_is_upgraded_at_open(tmp_path):
    directory = tmp_path / "queue"
    store = QueueStore(directory)
    store.open()
    store.submit(message(store.append_body([b"Subject: old\r\n\r\n" + b"o" * INLINE_BYTES]), "old")).result(timeout=10)
    store.close()
    with sqlite3.connect(directory / "queue.db") as db:   # the schema of an earlier release
        db.execute("ALTER TABLE message DROP COLUMN body")
        db.execute("ALTER TABLE message DROP COLUMN lines_normalised")
    store = QueueStore(directory)
    store.open()
    try:
        store.submit(message(store.append_body([b"Subject: new\r\n\r\nn\r\n"]), "new")).result(timeout=10)
        rows = store.reader().execute("SELECT * FROM message ORDER BY id").fetchall()
        assert [store.read_body(row)[:12] for row in rows] == [b"Subject: old", b"Subject: new"]
        assert [row["lines_normalised"] for row in rows] == [0, 0]   # not known for the old one: checked on sending
    finally:
        store.close()


def segment_body(tag: bytes, size: int = INLINE_BYTES + 1000) -> list[bytes]:
    """A body too large for its row: it goes to the active segment."""
    return [b"Subject: " + tag + b"\r\n\r\n" + tag[:1] * size + b"\r\n"]


def test_a_body_on_its_way_to_a_commit_keeps_its_segment_when_the_segment_is_rotated_and_freed(store, monkeypatch):
    """A body is appended before its rows are committed, possibly in the next commit batch. If the segment
    rotates meanwhile and its last committed message is delivered (freed), the segment must still stay:
    the body about to be acknowledged is in it."""
    import mailgate.queue.store as qs

    first = store.append_body(segment_body(b"first"))
    store.submit(message(first, "first")).result(timeout=10)
    waiting = store.append_body(segment_body(b"waiting"))            # appended; its commit comes later
    monkeypatch.setattr(qs, "SEGMENT_BYTES", waiting.offset + waiting.length + 1)
    rotated = store.append_body(segment_body(b"rotated"))            # does not fit: a new segment
    assert rotated.segment != waiting.segment == first.segment
    store.remove_messages([store.reader().execute("SELECT id FROM message").fetchone()[0]]).result(timeout=10)
    store.submit(message(waiting, "waiting")).result(timeout=10)     # acknowledged now
    row = store.reader().execute("SELECT * FROM message WHERE subject='waiting'").fetchone()
    assert store.read_body(row).startswith(b"Subject: waiting\r\n")


def test_the_active_segment_gives_its_space_back_once_nothing_refers_to_it(store, tmp_path, monkeypatch):
    """On a disk that mail filled, the queue must be able to drain it: once every body in the active
    segment has been delivered (or its message failed to commit), the segment's space is returned
    (from RECLAIM_ACTIVE_BYTES up; a smaller one is kept for the next bodies rather than churn files)."""
    import mailgate.queue.store as qs

    monkeypatch.setattr(qs, "RECLAIM_ACTIVE_BYTES", 2 * INLINE_BYTES)
    refs = [store.append_body(segment_body(b"m%d" % i)) for i in range(3)]
    for i, ref in enumerate(refs):
        store.submit(message(ref, f"m{i}")).result(timeout=10)
    segment = tmp_path / "queue" / "segments" / f"{refs[0].segment:08d}.seg"
    assert segment.stat().st_size >= 3 * INLINE_BYTES
    ids = [row[0] for row in store.reader().execute("SELECT id FROM message")]
    store.remove_messages(ids[:2]).result(timeout=10)
    assert segment.stat().st_size >= 3 * INLINE_BYTES                # one body is still queued
    store.remove_messages(ids[2:]).result(timeout=10)
    assert not segment.exists()                                      # deleted, not reused in place
    small = store.append_body(segment_body(b"small"))                # under RECLAIM_ACTIVE_BYTES: kept
    store.submit(message(small, "small")).result(timeout=10)
    store.remove_messages([store.reader().execute("SELECT id FROM message").fetchone()[0]]).result(timeout=10)
    assert (tmp_path / "queue" / "segments" / f"{small.segment:08d}.seg").exists()
    again = store.append_body(segment_body(b"again"))               # bodies go on in the next segment
    assert again.segment == small.segment and again.offset == small.length
    store.submit(message(again, "again")).result(timeout=10)
    row = store.reader().execute("SELECT * FROM message WHERE subject='again'").fetchone()
    assert store.read_body(row).startswith(b"Subject: again\r\n")


def test_a_body_that_cannot_be_synced_fails_its_commit_and_leaves_no_row(store, tmp_path, monkeypatch):
    """Bodies are synced before the COMMIT of their rows: a failed sync (an I/O error) undoes the commit, so no
    row is committed whose body may not be on disk; the next commit syncs that segment again."""
    real_fdatasync = os.fdatasync
    calls: list[int] = []

    def fdatasync_failing_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "simulated I/O error")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync_failing_once)
    lost = store.append_body(segment_body(b"lost"))
    assert lost.segment is not None
    with pytest.raises(OSError, match="simulated I/O error"):
        store.submit(message(lost, "lost")).result(timeout=10)
    assert subjects(tmp_path / "queue") == []
    kept = store.append_body(segment_body(b"kept"))
    store.submit(message(kept, "kept")).result(timeout=10)
    assert subjects(tmp_path / "queue") == ["kept"]
    assert len(calls) == 2   # the segment was synced again for the second commit
    row = store.reader().execute("SELECT * FROM message").fetchone()
    assert store.read_body(row) == b"".join(segment_body(b"kept"))


def test_a_body_whose_message_failed_to_commit_does_not_hold_its_segment(store, tmp_path, monkeypatch):
    import mailgate.queue.store as qs

    monkeypatch.setattr(qs, "RECLAIM_ACTIVE_BYTES", 1)
    with sqlite3.connect(tmp_path / "queue" / "queue.db") as db:
        db.execute("CREATE TRIGGER full BEFORE INSERT ON message WHEN NEW.subject='full' "
                   "BEGIN SELECT RAISE(ROLLBACK, 'database or disk is full'); END")
    ref = store.append_body(segment_body(b"full"))
    with pytest.raises(sqlite3.Error):
        store.submit(message(ref, "full")).result(timeout=10)
    segment = tmp_path / "queue" / "segments" / f"{ref.segment:08d}.seg"
    assert not segment.exists()


def test_a_delivered_message_that_a_power_loss_brings_back_never_points_at_another_body(tmp_path, monkeypatch):
    """The delete of a delivered message is not synced: after a power loss its rows may come back while its
    segment is gone. They must be dropped at start-up — never read bytes that now belong to other mail."""
    import mailgate.queue.store as qs

    monkeypatch.setattr(qs, "RECLAIM_ACTIVE_BYTES", 1)
    directory = tmp_path / "queue"
    store = QueueStore(directory)
    store.open()
    first = store.append_body(segment_body(b"delivered"))
    store.submit(message(first, "delivered")).result(timeout=10)
    db = store.reader()
    row = dict(db.execute("SELECT * FROM message").fetchone())
    rcpts = [dict(r) for r in db.execute("SELECT * FROM recipient")]
    store.remove_messages([row["id"]]).result(timeout=10)          # delivered: rows and segment go
    later = store.append_body(segment_body(b"later", INLINE_BYTES + 5000))   # longer than the first
    store.submit(message(later, "later")).result(timeout=10)
    store.close()
    with sqlite3.connect(directory / "queue.db") as con:             # what a power loss may undo: the delete
        con.execute(f"INSERT INTO message ({','.join(row)}) VALUES ({','.join('?' * len(row))})", list(row.values()))
        for r in rcpts:
            con.execute(f"INSERT INTO recipient ({','.join(r)}) VALUES ({','.join('?' * len(r))})", list(r.values()))
    store = QueueStore(directory)
    store.open()
    try:
        assert subjects(directory) == ["later"]
        kept = store.reader().execute("SELECT * FROM message").fetchone()
        assert store.read_body(kept).startswith(b"Subject: later\r\n")
    finally:
        store.close()


@pytest.mark.parametrize("damage", ["overwritten", "garbled"])
def test_a_damaged_queue_database_is_a_clear_error_that_names_the_file_and_the_way_out(tmp_path, damage):
    from mailgate.errors import UserError

    first = QueueStore(tmp_path / "q")
    first.open()
    first.close()
    path = tmp_path / "q" / "queue.db"
    if damage == "overwritten":
        path.write_bytes(b"\x13" * 4096)
    else:   # a page in the middle of the file scribbled over
        data = bytearray(path.read_bytes())
        data[100:4096] = b"\xff" * (4096 - 100)
        path.write_bytes(bytes(data))
    with pytest.raises(UserError) as raised:
        QueueStore(tmp_path / "q").open()
    message = raised.value.message
    assert f"The queue database {path} is damaged" in message and ".recover" in message and "aside" in message



def test_a_delivery_outcome_rides_on_the_commit_that_new_mail_starts(store, tmp_path, monkeypatch):
    """An outcome has nothing to sync: it waits (OUTCOME_COMMIT_DELAY) for the commit that new mail starts, which
    takes both, instead of a commit of its own."""
    import asyncio

    from mailgate.queue import store as store_module
    monkeypatch.setattr(store_module, "OUTCOME_COMMIT_DELAY", 60)    # only new mail can carry it here

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        first = message(store.append_body([b"Subject: first\r\n\r\nx\r\n"]), "first")
        await asyncio.wrap_future(store.submit(first))
        commits = store.commits
        outcome = store.record(first.id, [(0, store_module.DELIVERED, "250 ok", time.time(), 0)])
        for _ in range(5):
            await asyncio.sleep(0)
        assert not outcome.done() and store.commits == commits     # no commit of its own at the turn's end
        await asyncio.wrap_future(store.submit(message(store.append_body([b"Subject: second\r\n\r\ny\r\n"]),
                                                       "second")))
        assert outcome.done() and store.commits == commits + 1     # one commit took both
        assert subjects(tmp_path / "queue") == ["second"]          # the delivered message is gone

    asyncio.run(scenario())


def test_a_delivery_outcome_commits_alone_when_no_new_mail_comes(store, tmp_path):
    import asyncio

    from mailgate.queue.store import DELIVERED

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        only = message(store.append_body([b"Subject: only\r\n\r\nx\r\n"]), "only")
        await asyncio.wrap_future(store.submit(only))
        outcome = store.record(only.id, [(0, DELIVERED, "250 ok", time.time(), 0)])
        deadline = time.monotonic() + 10
        while not outcome.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert outcome.done() and subjects(tmp_path / "queue") == []

    asyncio.run(scenario())


def test_the_event_loop_does_not_wait_for_a_commit_in_progress(store, tmp_path, monkeypatch):
    """Writes made on the event loop while the commit thread holds the write connection return at once (every
    session of the worker waited there), and run after the commit, in the order they were made. (The commit
    thread's path: where the loop commits itself, test_queue_loop_commits.py.)"""
    import asyncio

    entered, release = threading.Event(), threading.Event()
    bound_wal = store._bound_wal

    def slow_commit() -> None:   # runs in the commit thread, holding the write connection, after each COMMIT
        entered.set()
        release.wait(10)
        bound_wal()

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop(), commits_on_loop=False)
        first = message(store.append_body([b"Subject: first\r\n\r\nx\r\n"]), "first")
        monkeypatch.setattr(store, "_bound_wal", slow_commit)
        committed_first = asyncio.wrap_future(store.submit(first))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        threading.Timer(2, release.set).start()   # the old behaviour waited here until this
        second = message(store.append_body([b"Subject: second\r\n\r\ny\r\n"]), "second")
        insert = store.submit(second)
        rename = store.execute("UPDATE message SET subject='renamed' WHERE id=?", (second.id,))
        assert not release.is_set()            # both returned while the commit was still going on
        release.set()
        await committed_first
        assert await asyncio.wrap_future(rename) == 1    # ran after the insert it depends on
        assert await asyncio.wrap_future(insert)
        assert subjects(tmp_path / "queue") == ["first", "renamed"]

    asyncio.run(scenario())
