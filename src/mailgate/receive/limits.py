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

    def acquire(self, total_key: str, source_key: str, total_limit: UnlimitedInt,
                source_limit: UnlimitedInt) -> str | None:
        """Count one more connection, or return which limit ("total"/"source") it would exceed."""
        total, per_source = self._counts.get(total_key, 0), self._counts.get(source_key, 0)
        if total_limit.exceeded_by(total + 1):
            return "total"
        if source_limit.exceeded_by(per_source + 1):
            return "source"
        self._counts[total_key] = total + 1
        self._counts[source_key] = per_source + 1
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

    def acquire(self, total_key: str, source_key: str, total_limit: UnlimitedInt,
                source_limit: UnlimitedInt) -> str | None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if not self._add(total_key, 1, total_limit):
                return "total"
            if not self._add(source_key, 1, source_limit):
                self._add(total_key, -1)
                return "source"
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
