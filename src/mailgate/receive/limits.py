"""Counting open connections per receive connector and per source, for
MaxInboundConnection and MaxInboundConnectionPerSource.

One process counts in a dict. Several worker processes share one table in a
memory-mapped file in the data directory's run/ folder, guarded by a file
lock, so the limits hold for the server as a whole whichever worker the
kernel hands a connection to.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from pathlib import Path

from mailgate.config.values import UnlimitedInt

SLOTS = 8192


def _slot_struct(workers: int) -> struct.Struct:
    return struct.Struct(f"<Q{workers}i")   # key hash, then each worker's count


class LocalCounter:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def acquire(self, limits: list[tuple[str, UnlimitedInt]]) -> int | None:
        """Count one more connection under each (key, limit), or return the index of the limit it would
        exceed (and count nothing)."""
        for i, (key, limit) in enumerate(limits):
            if limit.exceeded_by(self._counts.get(key, 0) + 1):
                return i
        for key, _ in limits:
            self._counts[key] = self._counts.get(key, 0) + 1
        return None

    def release(self, *keys: str) -> None:
        for key in keys:
            left = self._counts.get(key, 1) - 1
            if left <= 0:
                self._counts.pop(key, None)
            else:
                self._counts[key] = left


class SharedCounter:
    """An open-addressing table of counters in a shared file; all workers map the same file.

    Each slot is a key hash and one count per worker, and a worker only ever changes its own column: a worker
    that dies (kill -9) can't release what it counted, so its successor zeroes that column when it starts
    (with one shared count, a killed worker's open sessions stayed counted until the server restarted, and an
    address that had them could be refused 421 4.3.2 for good). A limit is checked against the sum."""

    def __init__(self, path: Path, workers: int, worker: int) -> None:
        self.path = path
        self.workers, self.worker = workers, worker
        self._slot = _slot_struct(workers)
        size = SLOTS * self._slot.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._clear_own_column()

    @staticmethod
    def reset(path: Path, workers: int) -> None:
        """Start from zero (the supervisor does this before starting its workers)."""
        with open(path, "wb") as fh:
            fh.truncate(SLOTS * _slot_struct(workers).size)

    def _clear_own_column(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            for slot in range(SLOTS):
                values = list(self._slot.unpack_from(self._map, slot * self._slot.size))
                if values[1 + self.worker]:
                    values[1 + self.worker] = 0
                    self._slot.pack_into(self._map, slot * self._slot.size, *values)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1

    def _find(self, h: int, create: bool) -> int | None:
        start = h % SLOTS
        free = None
        for i in range(SLOTS):
            slot = (start + i) % SLOTS
            key, *counts = self._slot.unpack_from(self._map, slot * self._slot.size)
            if key == h:
                return slot
            if key == 0:
                if create:
                    return free if free is not None else slot
                return None
            if sum(counts) <= 0 and free is None:
                free = slot   # a key whose connections all ended may be reused
        return free if create else None

    def _add(self, key: str, delta: int, limit: UnlimitedInt | None = None) -> bool:
        h = self._hash(key)
        slot = self._find(h, create=delta > 0)
        if slot is None:
            return True
        stored, *counts = self._slot.unpack_from(self._map, slot * self._slot.size)
        if stored != h:   # a free slot taken for this key
            counts = [0] * self.workers
        if limit is not None and limit.exceeded_by(sum(counts) + delta):
            return False
        counts[self.worker] = max(0, counts[self.worker] + delta)
        self._slot.pack_into(self._map, slot * self._slot.size, h, *counts)
        return True

    def acquire(self, limits: list[tuple[str, UnlimitedInt]]) -> int | None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            for i, (key, limit) in enumerate(limits):
                if not self._add(key, 1, limit):
                    for counted, _ in limits[:i]:
                        self._add(counted, -1)
                    return i
            return None
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def release(self, *keys: str) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            for key in keys:
                self._add(key, -1)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
