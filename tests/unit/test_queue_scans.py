"""The queue manager's periodic scans (expired mail, mail owed a delay notice) run on the event loop that also
serves SMTP, every few seconds, however long the queue: each must find its rows through an index. The delay
scan read the whole message table, bodies included, each time (0.11 s at 100,000 queued messages)."""

from __future__ import annotations

import time

from mailgate.queue.manager import DELAY_SCAN, EXPIRY_SCAN
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
