"""Commits made by the event loop (queue/store.py, "commits on the event loop"): the loop runs COMMIT and the
sync thread (queue/_syncer.c) syncs, bodies before the COMMIT and the WAL after it; statements made while a
commit's bodies are synced wait for the next transaction; a failed sync acknowledges nothing; a caller blocking
on the loop and ``close`` wait for the flight out."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import sqlite3
import time

import pytest
from mailgate.queue import store as store_module
from mailgate.queue.store import INLINE_BYTES, BodyRef, NewMessage, NewRecipient, QueueStore

pytestmark = pytest.mark.skipif(not store_module.LOOP_COMMITS_AVAILABLE and not os.environ.get("CI"),
                                reason="queue/_syncer.c is not built here")


def test_the_sync_thread_is_built_where_ci_runs():
    assert store_module.LOOP_COMMITS_AVAILABLE, "queue/_syncer.c was not built (pip install -e . builds it)"


def message(body: BodyRef, subject: str) -> NewMessage:
    now = time.time()
    return NewMessage(network_id=subject, message_id=f"<{subject}@test>", sender="a@example.com", subject=subject,
                      size=body.length, received_at=now, expires_at=now + 3600, body=body,
                      recipients=[NewRecipient("b@example.com", "example.com")])


def segment_body(tag: bytes) -> list[bytes]:
    """A body too large for its row: it goes to the active segment, and its commit has bodies to sync."""
    return [b"Subject: " + tag + b"\r\n\r\n" + tag[:1] * (INLINE_BYTES + 1000) + b"\r\n"]


def small_body(tag: bytes) -> list[bytes]:
    return [b"Subject: " + tag + b"\r\n\r\n" + tag + b"\r\n"]


def subjects(directory) -> list[str]:
    return subjects_of(directory / "queue.db")


def subjects_of(database) -> list[str]:
    db = sqlite3.connect(database)
    try:
        return [row[0] for row in db.execute("SELECT subject FROM message ORDER BY id")]
    finally:
        db.close()


class HeldSyncer:
    """Stands in for the sync thread: a batch is synced, for real, when the test releases it (or someone waits)."""

    def __init__(self, eventfd: int) -> None:
        self.eventfd = eventfd
        self.batches: list[list[int]] = []
        self.busy = False
        self.result: int | None = None

    def sync(self, fds) -> None:
        assert not self.busy and self.result is None, "one batch at a time"
        self.batches.append(list(fds))
        self.busy = True

    def release(self) -> None:
        assert self.busy
        for fd in self.batches[-1]:
            os.fdatasync(fd)
        self.busy, self.result = False, 0
        os.eventfd_write(self.eventfd, 1)

    def take(self) -> int | None:
        result, self.result = self.result, None
        return result

    def wait(self) -> None:
        if self.busy:
            self.release()

    def close(self) -> None:
        self.wait()


def hold_syncs(store: QueueStore) -> HeldSyncer:
    store._syncer.close()
    store._syncer = held = HeldSyncer(store._eventfd)
    return held


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"waited 10 s for {what}"
        await asyncio.sleep(0.001)


def test_bodies_are_synced_before_the_commit_and_writes_meanwhile_wait_for_the_next_one(store, tmp_path):
    queue = tmp_path / "queue"

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        held = hold_syncs(store)
        first = store.submit(message(store.append_body(segment_body(b"first")), "first"))
        await until(lambda: held.busy, "the first commit")
        assert store._flight.phase == store_module.BODIES and len(held.batches[0]) == 1   # the segment
        second = message(store.append_body(small_body(b"second")), "second")
        insert = store.submit(second)
        rename = store.execute("UPDATE message SET subject='renamed' WHERE id=?", (second.id,))
        assert len(store._deferred) == 2             # returned at once, kept out of the transaction being committed
        assert subjects(queue) == []                 # nothing committed before its body is on disk
        held.release()
        await until(lambda: held.busy, "the WAL's sync")
        assert held.batches[1] == [store._wal_fd]
        assert subjects(queue) == ["first"] and not first.done()   # committed, not acknowledged before the sync
        held.release()
        assert await asyncio.wrap_future(first)
        await until(lambda: held.busy, "the second commit")
        assert held.batches[2] == [store._wal_fd]    # nothing new in the segment: the WAL only
        held.release()
        assert await asyncio.wrap_future(rename) == 1    # ran after the insert it depends on
        assert await asyncio.wrap_future(insert)
        assert subjects(queue) == ["first", "renamed"]

    asyncio.run(scenario())


def test_a_body_that_cannot_be_synced_fails_its_commit_and_leaves_no_row(store, tmp_path):
    """The sync thread's failure (here EINVAL: the segment is a pipe) undoes the commit; the next commit syncs
    the segment again."""
    queue = tmp_path / "queue"

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        reader, writer = os.pipe()
        segment_fd, segment_size = store._segment_fd, store._segment_size
        store._segment_fd = writer
        try:
            lost = store.append_body(segment_body(b"lost"))
            with pytest.raises(OSError, match="could not be synced") as raised:
                await asyncio.wrap_future(store.submit(message(lost, "lost")))
            assert raised.value.errno == errno.EINVAL
        finally:
            store._segment_fd, store._segment_size = segment_fd, segment_size
            os.close(reader)
            os.close(writer)
        assert subjects(queue) == [] and store._segment_dirty
        assert not store._in_transaction and not store._sealed
        kept = store.append_body(segment_body(b"kept"))
        await asyncio.wrap_future(store.submit(message(kept, "kept")))
        assert not store._segment_dirty
        row = store.reader().execute("SELECT * FROM message").fetchone()
        assert row["subject"] == "kept" and store.read_body(row) == b"".join(segment_body(b"kept"))

    asyncio.run(scenario())


def test_a_wal_that_cannot_be_synced_acknowledges_nothing_and_the_queue_goes_on(store, tmp_path):
    """Committed but maybe not on disk: the waiter hears the error (the sender will try again), the row stays."""
    queue = tmp_path / "queue"

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        reader, writer = os.pipe()
        wal_fd, store._wal_fd = store._wal_fd, writer
        try:
            with pytest.raises(OSError, match="could not be synced"):
                await asyncio.wrap_future(store.submit(message(store.append_body(small_body(b"unsure")), "unsure")))
        finally:
            store._wal_fd = wal_fd
            os.close(reader)
            os.close(writer)
        assert subjects(queue) == ["unsure"]
        assert await asyncio.wrap_future(store.submit(message(store.append_body(small_body(b"next")), "next")))
        assert subjects(queue) == ["unsure", "next"]

    asyncio.run(scenario())


def test_a_caller_blocking_on_the_loop_gets_its_commit_there_after_the_flight_out(store, tmp_path):
    """An administrator's action may block the loop on a write's result: the loop can't read the eventfd then,
    so the result waits for the flight out itself and commits what is left (it used to hang, in the prototype)."""

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        held = hold_syncs(store)
        first = store.submit(message(store.append_body(segment_body(b"first")), "first"))
        await until(lambda: held.busy, "the first commit")
        queued = message(store.append_body(small_body(b"queued")), "queued")
        store.submit(queued)
        renamed = store.execute("UPDATE message SET subject='renamed' WHERE id=?", (queued.id,)).result(timeout=10)
        assert renamed == 1 and first.done() and not held.busy
        assert len(held.batches) == 3    # the first's bodies and WAL, then the second transaction's WAL
        assert subjects(tmp_path / "queue") == ["first", "renamed"]

    asyncio.run(scenario())


def test_close_with_a_commit_in_flight_finishes_it_and_releases_its_descriptors(tmp_path):
    queue = tmp_path / "queue"
    store = QueueStore(queue)
    store.open()

    async def scenario() -> concurrent.futures.Future:
        store.attach_loop(asyncio.get_running_loop())
        held = hold_syncs(store)
        pending = store.submit(message(store.append_body(segment_body(b"inflight")), "inflight"))
        await until(lambda: held.busy, "the commit")
        descriptors = (store._wal_fd, store._eventfd)
        await asyncio.to_thread(store.close)
        for fd in descriptors:
            with pytest.raises(OSError):
                os.fstat(fd)
        return pending

    pending = asyncio.run(scenario())
    assert pending.result(timeout=0) is True
    reopened = QueueStore(queue)
    reopened.open()
    try:
        row = reopened.reader().execute("SELECT * FROM message").fetchone()
        assert row["subject"] == "inflight" and reopened.read_body(row) == b"".join(segment_body(b"inflight"))
    finally:
        reopened.close()



def test_the_sync_thread_reports_each_batch_once_with_its_first_error(tmp_path):
    from mailgate.queue._syncer import Syncer

    eventfd = os.eventfd(0, os.EFD_CLOEXEC)
    syncer = Syncer(eventfd)
    good = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    reader, writer = os.pipe()
    try:
        assert syncer.take() is None                   # nothing handed over
        syncer.sync([good])
        syncer.wait()
        assert os.eventfd_read(eventfd) == 1
        assert syncer.take() == 0 and syncer.take() is None
        syncer.sync([good, writer, good])              # a pipe can't be synced
        syncer.wait()
        with pytest.raises(RuntimeError):
            syncer.sync([good])                        # the last result is not collected yet
        assert syncer.take() == errno.EINVAL
        with pytest.raises(ValueError):
            syncer.sync([-1])
        syncer.close()
        with pytest.raises(RuntimeError):
            syncer.sync([good])
    finally:
        for fd in (eventfd, good, reader, writer):
            os.close(fd)


def test_a_large_wal_is_checkpointed_between_two_transactions_with_new_writes_held_back(tmp_path, monkeypatch):
    """Under steady load the checkpoint thread never catches up with the WAL: now and then (every 64th commit,
    when the WAL is past WAL_LIMIT_BYTES) a checkpoint runs after the WAL's sync, and writes wait for it."""
    monkeypatch.setattr(store_module, "CHECKPOINT_SECONDS", 3600)   # the periodic checkpoint stays out of it
    monkeypatch.setattr(store_module, "WAL_LIMIT_BYTES", 0)
    queue = tmp_path / "queue"
    store = QueueStore(queue)
    store.open()
    checkpoints: list[bool] = []
    checkpoint_sealed = store._checkpoint_sealed

    def counted(flight) -> None:
        checkpoints.append(store._sealed)
        checkpoint_sealed(flight)

    monkeypatch.setattr(store, "_checkpoint_sealed", counted)

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        store.commits = 63                        # the next commit is the 64th
        assert await asyncio.wrap_future(store.submit(message(store.append_body(small_body(b"one")), "one")))
        await until(lambda: checkpoints, "the checkpoint")
        assert checkpoints == [True]              # ran, with new writes held back
        later = message(store.append_body(small_body(b"two")), "two")
        assert await asyncio.wrap_future(store.submit(later))
        assert checkpoints == [True] and not store._sealed

    try:
        asyncio.run(scenario())
        copy = tmp_path / "copy.db"
        copy.write_bytes((queue / "queue.db").read_bytes())   # the database file alone, without its WAL
        assert subjects_of(copy) == ["one"]
    finally:
        store.close()


def test_writes_that_came_during_a_commit_wait_for_the_gap_and_a_lone_write_does_not(store, monkeypatch):
    """COMMIT_GAP: under load (writes came while a commit was in flight) the next commit waits a little after
    the landing, to take more of them; a write after a quiet commit (one session's next message) commits at the
    end of its turn."""
    monkeypatch.setattr(store_module, "COMMIT_GAP", 3600)

    async def scenario() -> None:
        store.attach_loop(asyncio.get_running_loop())
        held = hold_syncs(store)
        quiet = store.submit(message(store.append_body(small_body(b"quiet")), "quiet"))
        await until(lambda: held.busy, "the first commit")
        held.release()
        await asyncio.wrap_future(quiet)
        lone = store.submit(message(store.append_body(small_body(b"lone")), "lone"))
        await until(lambda: held.busy, "the lone write's commit")   # no gap: nothing came during the last one
        during = store.submit(message(store.append_body(small_body(b"during")), "during"))
        held.release()
        await asyncio.wrap_future(lone)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not held.busy and not during.done()   # held back by the gap
        store.commit_now()                           # an administrator's action doesn't wait for it
        assert during.done() and during.result()

    asyncio.run(scenario())
