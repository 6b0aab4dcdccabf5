"""The queue manager's periodic scans (expired mail, mail owed a delay notice) run on the event loop that also
serves SMTP, every few seconds, however long the queue: each must find its rows through an index. The delay
scan read the whole message table, bodies included, each time (0.11 s at 100,000 queued messages)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

from mailgate.queue import manager as manager_module
from mailgate.queue.admin import QueueAdmin
from mailgate.queue.manager import DELAY_SCAN, EXPIRY_SCAN, REFILL_WALK, SUBMISSION_WAITING, QueueManager
from mailgate.queue.store import NewMessage, NewRecipient

HOUR = 3600.0


def queued(store, name: str, *, age: float, sender: str = "a@example.com", is_dsn: bool = False) -> int:
    received = time.time() - age
    new = NewMessage(network_id=name, message_id=f"<{name}@test>", sender=sender, subject=name, size=10,
                     received_at=received, expires_at=received + 48 * HOUR, is_dsn=is_dsn,
                     body=store.append_body([b"Subject: x\r\n\r\nbody\r\n"]),
                     recipients=[NewRecipient(f"{name}@remote.example", "dns:internet:remote.example")])
    store.submit(new)
    return new.id


def plan(db, sql: str) -> str:
    return " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, (0,) * sql.count("?")))


def test_the_periodic_scans_search_an_index_instead_of_reading_every_message(store):
    for n in range(50):
        queued(store, f"young{n}", age=60)
    old = queued(store, "old", age=5 * HOUR)
    queued(store, "old-dsn", age=5 * HOUR, is_dsn=True)        # a DSN never gets a delay notice
    queued(store, "old-bounce", age=5 * HOUR, sender="")       # nor does mail from the null sender
    store.execute("SELECT 1").result(timeout=30)
    db = store.reader()
    for sql in (EXPIRY_SCAN, DELAY_SCAN):
        assert plan(db, sql).startswith("SEARCH message USING INDEX"), (sql, plan(db, sql))

    cutoff = time.time() - 4 * HOUR
    assert [row["id"] for row in db.execute(DELAY_SCAN, (cutoff,))] == [old]
    store.execute("UPDATE message SET delay_notified=1 WHERE id=?", (old,)).result(timeout=30)
    assert db.execute(DELAY_SCAN, (cutoff,)).fetchall() == []


def test_get_queue_and_get_message_read_the_queue_off_the_event_loop_and_poison_through_an_index(store):
    """Get-Queue counts every queued recipient and Get-Message -Queue sorts a queue's messages: at a long queue
    that took 0.1 s per call at 25,000 messages, during which the worker's SMTP sessions waited. The reading runs
    in a thread; the Poison queue's count and listing search an index instead of reading every message."""
    for n in range(30):
        queued(store, f"m{n}", age=60)
    store.execute("UPDATE message SET poison=1 WHERE id=?", (queued(store, "bad", age=60),)).result(timeout=30)
    manager = QueueManager(store=store, tracker=None, server_name="EX01", mailbox_root=None,  # type: ignore[arg-type]
                           deliver_smtp=None, deliver_mailbox=None)  # type: ignore[arg-type]
    admin = QueueAdmin(manager, "EX01")
    statements: list[tuple[int, str]] = []   # (thread, statement) of every read
    reader = store.reader

    def recording_reader():
        conn = reader()
        conn.set_trace_callback(lambda sql: statements.append((threading.get_ident(), sql)))
        return conn

    store.reader = recording_reader   # type: ignore[method-assign]

    async def main():
        loop_thread = threading.get_ident()
        queues = await admin.queues()
        remote = next(q["Identity"] for q in queues if q["MessageCount"] == 30)
        listed = await admin.messages(remote, limit=5)
        poison = await admin.messages("EX01\\Poison")
        return loop_thread, queues, listed, poison

    loop_thread, queues, listed, poison = asyncio.run(main())
    counts = {q["Identity"]: q["MessageCount"] for q in queues}
    assert counts["EX01\\Poison"] == 1 and sum(counts.values()) == 31, counts
    assert len(listed) == 5 and [m["Queue"] for m in poison] == ["EX01\\Poison"]
    queue_reads = [(thread, sql) for thread, sql in statements if "FROM message" in sql or "FROM recipient" in sql]
    assert queue_reads and all(thread != loop_thread for thread, _ in queue_reads), queue_reads
    db = reader()
    for _, sql in statements:
        if "poison=1" in sql:
            plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "USING INDEX message_poison" in plan, (sql, plan)   # not a bare "SCAN message"


def test_refilling_a_delivery_queue_reads_only_as_far_as_its_window(store, monkeypatch):
    """A queue's window is refilled from the store in due order, Ready and Retry mail merged. With a backlog
    (a next hop that was down) that ran on the event loop at every refill, and sorted every due recipient of
    the queue first: 0.1 s at 50,000 messages. Each status is now one walk of recipient_due in due order."""
    monkeypatch.setattr(manager_module, "WINDOW", 5)
    key = "dns:internet:remote.example"
    ids = [queued(store, f"m{n}", age=60) for n in range(12)]
    # Due times out of id order, alternating statuses; one suspended, one poisoned: those two are never offered.
    now = time.time()
    for n, message in enumerate(ids):
        store.execute("UPDATE recipient SET status=?, next_attempt=? WHERE message=?",
                      ("Retry" if n % 2 else "Ready", now - 100 + (n * 7) % 12, message))
    store.execute("UPDATE recipient SET suspended=1 WHERE message=?", (ids[0],))
    store.execute("UPDATE message SET poison=1 WHERE id=?", (ids[7],)).result(timeout=30)
    manager = QueueManager(store=store, tracker=None, server_name="EX01", mailbox_root=None,  # type: ignore[arg-type]
                           deliver_smtp=None, deliver_mailbox=None)  # type: ignore[arg-type]
    q = manager.queue(key)
    manager._refill(q, now)
    due = sorted((ids[n] for n in range(12) if n not in (0, 7)), key=lambda m: (ids.index(m) * 7) % 12)
    assert manager.take(q, 10) == due[:5] and q.backlog

    db = store.reader()
    plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + REFILL_WALK, (key, "Ready", now)))
    assert "recipient_due" in plan and "TEMP B-TREE" not in plan, plan


class RecordingReader:
    """The store's reader, recording each statement it runs."""

    def __init__(self, db, statements: list[str]) -> None:
        self.db, self.statements = db, statements

    def execute(self, sql, params=()):
        self.statements.append(sql)
        return self.db.execute(sql, params)


def test_an_idle_queue_looks_in_the_store_now_and_then_and_at_once_when_told(store, monkeypatch):
    """At one message at a time the manager ticks for every message, and each tick looked in the store for due mail
    of every queue with nothing in memory, and for mail in Submission: three queries on the event loop per message,
    18 % of its busy time. An idle queue now looks at most every IDLE_REFILL_SECONDS, and at the next tick when
    something changed the store behind memory's back (an administrator, mail a delivery gave back untried)."""
    key = "dns:internet:remote.example"
    clock = [time.time()]
    monkeypatch.setattr(manager_module, "time", SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    statements: list[str] = []
    db = store.reader()
    monkeypatch.setattr(store, "reader", lambda: RecordingReader(db, statements))
    delivered: list[int] = []

    async def deliver(manager, q):   # a delivery that takes what is offered and gives it back untried
        taken = manager.take(q, 10)
        delivered.extend(taken)
        manager.release(q, taken)

    manager = QueueManager(store=store, tracker=None, server_name="EX01", mailbox_root=None,  # type: ignore[arg-type]
                           deliver_smtp=deliver, deliver_mailbox=None)  # type: ignore[arg-type]
    q = manager.queue(key)
    manager.queue("Submission")
    unlimited = SimpleNamespace(value=None)
    manager.settings = SimpleNamespace(server=SimpleNamespace(  # type: ignore[assignment]
        max_outbound_connections=unlimited, max_per_domain_outbound_connections=unlimited,
        queue_max_idle_time=SimpleNamespace(seconds=3600)))

    def looks() -> list[str]:
        statements.clear()
        manager._tick()
        return [s for s in statements if s in (REFILL_WALK, SUBMISSION_WAITING)]

    async def main() -> None:
        assert looks() == [SUBMISSION_WAITING, REFILL_WALK, REFILL_WALK]   # the first tick looks
        assert looks() == []                                               # the next ones don't, for a while
        message = queued(store, "behind", age=60)   # due mail memory wasn't told of...
        store.execute("SELECT 1").result(timeout=30)
        assert looks() == [] and not q.ready
        clock[0] += manager_module.IDLE_REFILL_SECONDS   # ...is found IDLE_REFILL_SECONDS later
        assert looks() == [SUBMISSION_WAITING, REFILL_WALK, REFILL_WALK]
        for _ in range(50):
            if delivered:
                break
            await asyncio.sleep(0.01)
        assert delivered == [message]
        # The delivery gave it back untried: the queue looks again at its next tick, and offers it again.
        assert REFILL_WALK in looks() and list(q.ready) == [message]
        manager.take(q, 10)
        assert looks() == []
        manager.refill_soon()   # what an administrator's action or a configuration change calls
        assert looks() == [SUBMISSION_WAITING, REFILL_WALK, REFILL_WALK]
        for task in list(manager._tasks):
            task.cancel()

    asyncio.run(main())
