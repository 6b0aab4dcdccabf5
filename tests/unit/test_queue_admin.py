"""Acting on many queued messages at once (Suspend-Message -Filter over a long queue): the worker's event loop,
which also serves SMTP, keeps running, and each message is found by its key, not by walking its queue."""

from __future__ import annotations

import asyncio
import time

from mailgate.queue import admin as admin_module
from mailgate.queue.admin import QueueAdmin
from mailgate.queue.manager import QueueManager
from mailgate.queue.store import NewMessage, NewRecipient

QUEUE = "dns:internet:remote.example"


def held_messages(store, count: int) -> list[int]:
    ids = []
    for n in range(count):
        now = time.time()
        new = NewMessage(network_id=f"n{n}", message_id=f"<{n}@test>", sender="a@example.com", subject=f"s{n}",
                         size=10, received_at=now, expires_at=now + 3600,
                         body=store.append_body([b"Subject: x\r\n\r\nbody\r\n"]),
                         recipients=[NewRecipient(f"b{n}@remote.example", QUEUE)])
        store.submit(new)
        ids.append(new.id)
    store.execute("SELECT 1").result(timeout=30)   # everything before it is committed
    return ids


def test_suspending_many_messages_gives_the_event_loop_back_and_uses_the_primary_key(store):
    ids = held_messages(store, 1200)
    manager = QueueManager(store=store, tracker=None, server_name="EX01", mailbox_root=None,  # type: ignore[arg-type]
                           deliver_smtp=None, deliver_mailbox=None)  # type: ignore[arg-type]
    admin = QueueAdmin(manager, "EX01")
    statements: set[str] = set()
    execute = store.execute

    def recorded(sql, params=(), **kw):
        if "recipient" in sql:
            statements.add(sql)
        return execute(sql, params, **kw)

    store.execute = recorded   # type: ignore[method-assign]
    ticks = 0

    async def main() -> int:
        nonlocal ticks
        loop = asyncio.get_running_loop()
        acting = True

        def tick() -> None:   # another job of the loop (an SMTP session, say): runs while the action runs
            nonlocal ticks
            ticks += 1
            if acting:
                loop.call_soon(tick)

        loop.call_soon(tick)
        try:
            return await admin.message_action("suspend", [str(i) for i in ids])
        finally:
            acting = False

    assert asyncio.run(main()) == 1200
    assert ticks >= 1200 // admin_module.ACTION_BATCH, ticks
    db = store.reader()
    assert db.execute("SELECT count(*) FROM recipient WHERE suspended=1").fetchone()[0] == 1200
    # Every statement the action ran finds its rows by the message (the primary key), not through the
    # recipient_due index on the queue, which walks every message of the queue for each one.
    assert statements
    for sql in statements:
        plan = " ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, (0,) * sql.count("?")))
        assert "PRIMARY KEY" in plan, (sql, plan)


def test_removing_messages_commits_at_once_though_outcomes_alone_may_wait_for_new_mail(store, monkeypatch):
    """Remove-Message -WithNDR $false writes outcomes only, which the store lets wait for the next commit of new
    mail (OUTCOME_COMMIT_DELAY); an administrator waiting for the action has them committed at once."""
    from mailgate.queue import store as store_module
    monkeypatch.setattr(store_module, "OUTCOME_COMMIT_DELAY", 600)   # no new mail comes: they would wait 10 min

    class Tracker:
        def event(self, *args, **kwargs) -> None:
            pass

    ids = held_messages(store, 3)
    manager = QueueManager(store=store, tracker=Tracker(), server_name="EX01", mailbox_root=None,  # type: ignore[arg-type]
                           deliver_smtp=None, deliver_mailbox=None)  # type: ignore[arg-type]
    admin = QueueAdmin(manager, "EX01")

    async def main() -> int:
        store.attach_loop(asyncio.get_running_loop())
        manager.queue(QUEUE)             # the queue known (its first lookup writes, and wakes the commit thread)
        for _ in range(3):
            await asyncio.sleep(0)
        return await asyncio.wait_for(admin.message_action("remove", [str(i) for i in ids], with_ndr=False), 60)

    assert asyncio.run(main()) == 3
    assert store.reader().execute("SELECT count(*) FROM message").fetchone()[0] == 0
