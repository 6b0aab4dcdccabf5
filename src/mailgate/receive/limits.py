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
_SLOT = struct.Struct("<Qi4x")   # key hash, count


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
    """An open-addressing table of counters in a shared file; all workers map the same file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < SLOTS * _SLOT.size:
                os.ftruncate(fd, SLOTS * _SLOT.size)
            self._map = mmap.mmap(fd, SLOTS * _SLOT.size)
        finally:
            os.close(fd)
        self._lock_fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)

    @staticmethod
    def reset(path: Path) -> None:
        """Start from zero (the supervisor does this before starting its workers)."""
        with open(path, "wb") as fh:
            fh.truncate(SLOTS * _SLOT.size)

    @staticmethod
    def _hash(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1

    def _find(self, h: int, create: bool) -> int | None:
        start = h % SLOTS
        free = None
        for i in range(SLOTS):
            slot = (start + i) % SLOTS
            key, count = _SLOT.unpack_from(self._map, slot * _SLOT.size)
            if key == h:
                return slot
            if key == 0:
                if create:
                    return free if free is not None else slot
                return None
            if count <= 0 and free is None:
                free = slot   # a key whose connections all ended may be reused
        return free if create else None

    def _add(self, key: str, delta: int, limit: UnlimitedInt | None = None) -> bool:
        h = self._hash(key)
        slot = self._find(h, create=delta > 0)
        if slot is None:
            return True
        stored, count = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        count = count if stored == h else 0
        if limit is not None and limit.exceeded_by(count + delta):
            return False
        _SLOT.pack_into(self._map, slot * _SLOT.size, h, max(0, count + delta))
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
