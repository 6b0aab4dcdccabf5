"""A received message while it streams in: the memory all sessions of a process hold for message content is
bounded by one budget — past it bodies go to spool files at once and a growing header block is refused with
452 4.3.1 — and every way a message ends gives its share back."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.queue.store import QueueStore
from mailgate.receive import message as M

HEAD = b"Subject: x\r\nFrom: a@b.example\r\n\r\n"


def incoming(store: QueueStore, max_header: int = 256 * 1024) -> M.IncomingMessage:
    return M.IncomingMessage(store, max_size=None, max_header=max_header, on_headers=lambda block: b"X-Stamp: 1\r\n")


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(M, "MEMORY_BUDGET", 200 * 1024)
    assert M.memory_held() == 0


def test_past_the_budget_a_body_goes_to_a_spool_file_once_larger_than_a_row(store, small_budget):
    crowd = [incoming(store) for _ in range(6)]
    for msg in crowd:                     # six sessions hold 40 KB each: 240 KB, over the 200 KB budget
        msg.add(HEAD + b"y" * 40_000)
    spooled = [msg for msg in crowd if msg._spool_fd >= 0]
    assert spooled and M.memory_held() <= M.MEMORY_BUDGET
    small = incoming(store)
    small.add(HEAD + b"z" * 1000)         # a small body stays in memory even now
    assert small._spool_fd < 0
    refs = [msg.finish() for msg in crowd + [small]]
    assert [r.spool_path is not None for r in refs[:-1]] == [msg in spooled for msg in crowd]
    assert M.memory_held() == 0
    for msg, ref in zip(crowd, refs):     # a spooled body is the same body
        if ref.spool_path:
            data = open(ref.spool_path, "rb").read()
        else:
            data = ref.data if ref.data is not None else store._pread(ref.segment, ref.length, ref.offset)
        assert data == b"X-Stamp: 1\r\n" + HEAD + b"y" * 40_000


def test_past_the_budget_a_header_block_that_keeps_growing_is_refused_with_452(store, small_budget):
    holder = incoming(store)
    holder.add(HEAD + b"y" * 100_000)
    growing = incoming(store)
    for _ in range(20):                   # 4 KB header lines, no end of the header block yet
        growing.add(b"X-Long: " + b"h" * 4000 + b"\r\n")
    assert growing.error is None          # under the budget the block may grow past 64 KB, to MaxHeaderSize
    holder2 = incoming(store)
    holder2.add(b"X-Other: " + b"o" * 30_000 + b"\r\n")    # a header block can't spill: now over the budget
    assert holder2.error is None          # under 64 KB it may still grow
    growing.add(b"X-Long: " + b"h" * 4000 + b"\r\n")
    assert growing.error is not None and (growing.error.code, growing.error.enhanced) == (452, "4.3.1")
    for msg in (holder, holder2, growing):
        msg.abandon()
    assert M.memory_held() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(1, 60_000), max_size=5),
                          st.sampled_from(["finish", "abandon", "fail", "too big"])), max_size=8))
def test_every_way_a_message_ends_gives_its_memory_back(tmp_path_factory, plan):
    M.MEMORY_BUDGET, budget = 100 * 1024, M.MEMORY_BUDGET
    store = QueueStore(tmp_path_factory.mktemp("queue"))
    store.open()
    try:
        for header_lines, sizes, end in plan:
            msg = M.IncomingMessage(store, max_size=50_000 if end == "too big" else None, max_header=8 * 1024,
                                    on_headers=lambda block: b"")
            msg.add(b"X-H: v\r\n" * header_lines)
            msg.add(b"\r\n")
            for size in sizes:
                msg.add(b"b" * size)
            if end == "finish" and msg.error is None:
                ref = msg.finish()
                if ref.spool_path:
                    os.unlink(ref.spool_path)
            elif end == "fail":
                msg._fail(M.R.INSUFFICIENT_RESOURCES)
                msg.abandon()
            else:
                msg.abandon()
            assert M.memory_held() == 0
    finally:
        M.MEMORY_BUDGET = budget
        store.close()
