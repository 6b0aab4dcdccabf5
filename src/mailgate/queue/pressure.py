"""Back pressure on the queue's disk, as Exchange's transport applies it (its DatabaseUsedSpace resource).

The share of the queue's file system in use is sampled every second (and at a MAIL FROM when the last
sample is older than 0.1 s) and put in one of three levels:

    Normal   mail is accepted
    Medium   only mail from senders in the organisation's authoritative domains is accepted
    High     every MAIL FROM gets ``452 4.3.1 Insufficient system resources``

Delivery goes on at every level, so the queue drains and frees its space. Exchange's thresholds: High is the
used share at which 500 MB would be left, rounded, at most 99 %; Medium is two points below High, Normal
four. The level falls back only below the next threshold down (hysteresis), so a disk hovering at a
threshold does not flap. A write that fails with ENOSPC puts the level at High at once.

Refusing at MAIL, before the body is sent, keeps room for what the queue itself must still write — the
rows that record deliveries, the WAL, the tracking log — so it can drain a disk that mail filled. In case
the disk fills anyway (a burst between two samples, another program), each queue keeps a reserve file of
up to 16 MB (2 % of the disk at most): when less than that is free, or a write fails for want of space,
it is deleted, which gives the queue the room to record its deliveries and so free its segments; it is
made again when the level is Normal.
Settings: ``[back_pressure]`` in ``mailgate.toml`` (``home.BackPressureSettings``).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("mailgate.queue")

NORMAL, MEDIUM, HIGH = "Normal", "Medium", "High"
LEVELS = (NORMAL, MEDIUM, HIGH)
EXCHANGE_RESERVE_BYTES = 500 * 1024 * 1024   # the fixed constant of Exchange's formula
SAMPLE_SECONDS = 1.0          # the server's own sampling; a new transaction samples too if 0.1 s passed
RESERVE_FILE = "space.reserve"
RESERVE_MAX_BYTES = 16 * 1024 * 1024
RESERVE_SHARE = 0.02


@dataclass(frozen=True)
class Usage:
    total: int      # bytes in the file system
    free: int       # bytes an unprivileged writer may still use

    @property
    def used_percent(self) -> int:
        return round(100 * (self.total - self.free) / self.total) if self.total else 100


def disk_usage(path: Path) -> Usage:
    st = os.statvfs(path)
    return Usage(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether a failed write failed for want of space (a file's ENOSPC, SQLite's SQLITE_FULL)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def high_threshold(total: int, configured: int = 0) -> int:
    """The used share (percent) at which the level is High: the configured one, or Exchange's rule."""
    if configured:
        return configured
    if total <= 0:
        return 0
    return min(99, round(100 * (total - EXCHANGE_RESERVE_BYTES) / total))


class DiskPressure:
    def __init__(self, path: Path, *, enabled: bool = True, high_percent: int = 0,
                 usage: Callable[[Path], Usage] = disk_usage) -> None:
        self.path = path
        self.enabled = enabled
        self.high_percent = high_percent
        self._usage = usage
        self.level = NORMAL
        self.used_percent: int | None = None
        self.reserve = path / RESERVE_FILE
        self._reserve_bytes = 0
        self._sampled_at = 0.0
        if not enabled:
            self.reserve.unlink(missing_ok=True)
        elif self.reserve.exists():   # left by the last run: it counts (and goes first if the disk is full)
            self._reserve_bytes = self.reserve.stat().st_size

    def thresholds(self, total: int) -> tuple[int, int, int]:
        """(Normal, Medium, High) in percent used."""
        high = high_threshold(total, self.high_percent)
        return high - 4, high - 2, high

    def current(self) -> str:
        """The level, sampled again first if the last sample is older than a tenth of a second."""
        if self.enabled and time.monotonic() - self._sampled_at >= 0.1:
            self.sample()
        return self.level

    def sample(self) -> str:
        if not self.enabled:
            return NORMAL
        self._sampled_at = time.monotonic()
        try:
            usage = self._usage(self.path)
        except OSError as exc:   # the queue's directory is gone or unreadable: nothing can be stored either
            return self._move(HIGH, f"the queue disk cannot be read ({exc.strerror})")
        self.used_percent = used = usage.used_percent
        normal, medium, high = self.thresholds(usage.total)
        if used >= high:
            target = HIGH
        elif used >= medium:
            target = MEDIUM if self.level != HIGH else HIGH
        elif used >= normal:
            target = MEDIUM if self.level != NORMAL else NORMAL
        else:
            target = NORMAL
        self._move(target, f"the queue disk {self.path} is {used}% used, {usage.free // 1048576} MB free "
                           f"[Normal={normal}% Medium={medium}% High={high}%]")
        if self.level == NORMAL and not self._reserve_bytes:
            self._make_reserve(usage)
        elif self._reserve_bytes and usage.free < self._reserve_bytes:
            self._release_reserve(f"less than its {self._reserve_bytes // 1024} KB is free")
        return self.level

    def disk_full(self) -> None:
        """A write of the queue failed for want of space: High now, whatever the last sample said, and the
        reserve goes so that the queue can record deliveries (any thread may call this)."""
        if not self.enabled:
            return
        self._move(HIGH, f"writing to the queue disk {self.path} failed: no space left")
        self._release_reserve("a write failed for want of space")

    def _release_reserve(self, why: str) -> None:
        if not self._reserve_bytes:
            return
        self._reserve_bytes = 0
        self.reserve.unlink(missing_ok=True)
        log.warning("back pressure: %s, so %s is deleted to give the queue room to record its deliveries",
                    why, self.reserve)

    def _make_reserve(self, usage: Usage) -> None:
        size = min(RESERVE_MAX_BYTES, int(usage.total * RESERVE_SHARE)) // 4096 * 4096
        if size <= 0 or usage.free < 2 * size:   # not while it would be handed back at the next sample
            return
        try:
            fd = os.open(self.reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:   # no room for it now (or no such call here): tried again at the next sample
            self.reserve.unlink(missing_ok=True)
            return
        self._reserve_bytes = size

    def refuses(self, authoritative_sender: bool) -> bool:
        """Whether a new transaction is refused at this level (Medium lets authoritative senders through)."""
        return self.level == HIGH or (self.level == MEDIUM and not authoritative_sender)

    def _move(self, target: str, why: str) -> str:
        if target != self.level:
            previous, self.level = self.level, target
            refusing = {HIGH: "refusing all new mail (452 4.3.1)",
                        MEDIUM: "refusing mail except from the organisation's authoritative domains (452 4.3.1)",
                        NORMAL: "accepting mail again"}[target]
            log.warning("back pressure %s -> %s: %s; %s", previous, target, why, refusing)
        return self.level
