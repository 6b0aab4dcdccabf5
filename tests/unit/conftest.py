"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest

from mailgate.queue.store import QueueStore


@pytest.fixture
def store(tmp_path):
    """An open queue store in tmp_path/queue."""
    s = QueueStore(tmp_path / "queue")
    s.open()
    yield s
    s.close()
