"""Reading the tracking log a page at a time: each page costs the same wherever it is in the log."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from mailgate.config.store import ConfigStore


def test_a_page_deep_in_the_log_is_read_as_cheaply_as_the_first(tmp_path):
    """SQLite's work per page, counted in virtual-machine steps (a progress handler on each connection the
    store takes): the last page of 20,000 events must not walk the index from the start of the log (it did:
    a full search of a long log grew with the square of its length)."""
    store = ConfigStore(f"sqlite:///{tmp_path / 'config.db'}")
    base = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.timezone.utc)
    # Ten events share each timestamp, so a page often ends inside a run of equal times.
    store.insert_tracking([{"timestamp": base + dt.timedelta(seconds=i // 10), "event_id": "RECEIVE", "source": "SMTP",
                            "server": "EX01", "recipients": [f"r{i}@b.example"]} for i in range(20_000)])
    steps: list[int] = []

    def count_steps(dbapi_connection, record, proxy) -> None:
        steps.append(0)

        def tick() -> int:
            steps[-1] += 1
            return 0

        dbapi_connection.set_progress_handler(tick, 100)

    sa.event.listen(store.engine, "checkout", count_steps)
    ids = [event["id"] for event in store.iter_tracking(server="EX01", limit=None, page=1000)]
    sa.event.remove(store.engine, "checkout", count_steps)
    assert len(ids) == 20_000 and len(set(ids)) == 20_000   # every event once, none skipped at a page's edge
    pages = [s for s in steps if s]
    assert len(pages) >= 20
    assert pages[-2] < 2 * pages[1], pages   # the same work per page (it grew with every page, 3 times at the 20th)
