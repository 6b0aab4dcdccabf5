"""Exchange-format CSV logs: message tracking (MSGTRK) and SMTP protocol logs
(RECV/SEND), plus the tracking index in the store.

Events are formatted when they happen (a CSV line, and for tracking the index
row) and a background thread writes what gathered every quarter second (tracking:
every 50 ms, tracker.FLUSH_SECONDS). The
thread does only the writes: Python work in a helper thread holds the GIL in
slices of up to 5 ms that the event loop waits for, which showed as a third
of the p99 accept latency when the thread formatted the rows itself. Files
are hourly (``PREFIXyyyymmddhh-n.LOG``, UTC) as real Exchange servers write
them, roll over at the maximum file size, and are pruned by age and by the
directory's total size.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from mailgate.utctext import SecondText

log = logging.getLogger("mailgate.tracking")

TRACKING_FIELDS = [
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname", "source-context", "connector-id",
    "source", "event-id", "internal-message-id", "message-id", "network-message-id", "recipient-address",
    "recipient-status", "total-bytes", "recipient-count", "related-recipient-address", "reference",
    "message-subject", "sender-address", "return-path", "message-info", "directionality", "tenant-id",
    "original-client-ip", "original-server-ip", "custom-data", "transport-traffic-type", "log-id", "schema-version",
]
PROTOCOL_FIELDS = ["date-time", "connector-id", "session-id", "sequence-number", "local-endpoint", "remote-endpoint",
                   "event", "data", "context"]
SCHEMA_VERSION = "15.02.0000.000"


_NEEDS_QUOTES = re.compile(r'[,"\r\n]')
_QUOTE_OR_LINE_END = re.compile(r'["\r\n]')


def csv_line(values: list[Any]) -> str:
    """One CSV record as the csv module writes it (minimal quoting, CRLF)."""
    return csv_text_line(["" if value is None else value if isinstance(value, str) else str(value) for value in values])


def csv_text_line(texts: list[str]) -> str:
    """``csv_line`` of fields that are text already."""
    line = ",".join(texts)
    # Most records need no quotes: no comma but the separators, no quote, no line end. One look at the whole
    # line instead of one per field (tracking writes two or three records per message).
    if line.count(",") == len(texts) - 1 and not _QUOTE_OR_LINE_END.search(line):
        return line + "\r\n"
    return ",".join('"' + text.replace('"', '""') + '"' if _NEEDS_QUOTES.search(text) else text
                    for text in texts) + "\r\n"


_ISO_SECOND = SecondText("T")


def iso(ts: dt.datetime) -> str:
    """``2026-12-04T18:00:00.123Z``: UTC, milliseconds (truncated), as Exchange's logs write it."""
    if ts.tzinfo is not dt.timezone.utc:
        ts = ts.astimezone(dt.timezone.utc)
    return f"{_ISO_SECOND(ts)}.{ts.microsecond // 1000:03d}Z"


class CsvLogWriter:
    """Appends CSV rows to hourly files with Exchange's header lines."""

    def __init__(self, directory: Path, prefix: str, log_type: str, fields: list[str]) -> None:
        self.directory = directory
        self.prefix = prefix
        self.log_type = log_type
        self.fields = fields
        self.max_file_size = 10 * 1024 * 1024
        self.max_age: float | None = 30 * 86400
        self.max_directory_size: int | None = 1000 * 1024 * 1024
        self._hour = ""
        self._seq = 1
        self._fd = -1
        self._path: Path | None = None

    def configure(self, directory: Path, *, max_file_size: int | None, max_age: float | None,
                  max_directory_size: int | None) -> None:
        if directory != self.directory:
            self.close()
            self.directory = directory
        self.max_file_size = max_file_size or 10 * 1024 * 1024
        self.max_age = max_age if max_age else None
        self.max_directory_size = max_directory_size

    def _file_for(self, now: dt.datetime) -> int:
        """The descriptor of the current file. Several worker processes may append to the same file: every
        batch is one write() on an O_APPEND descriptor, and only the process that creates a file writes its
        header lines."""
        hour = now.strftime("%Y%m%d%H")
        if self._fd >= 0 and hour == self._hour and os.fstat(self._fd).st_size < self.max_file_size:
            return self._fd
        self.close()
        if hour != self._hour:
            self._hour, self._seq = hour, 1
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            path = self.directory / f"{self.prefix}{hour}-{self._seq}.LOG"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
                header = (f"#Software: mailgate\r\n#Version: {SCHEMA_VERSION}\r\n#Log-type: {self.log_type}\r\n"
                          f"#Date: {iso(now)}\r\n#Fields: {','.join(self.fields)}\r\n")
                os.write(fd, header.encode())
            except FileExistsError:
                if path.stat().st_size >= self.max_file_size:
                    self._seq += 1
                    continue
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            break
        self._fd, self._path = fd, path
        return fd

    def write_lines(self, lines: list[str], now: dt.datetime) -> None:
        """Append lines made by ``csv_line`` in one write."""
        if not lines:
            return
        fd = self._file_for(now)
        data = "".join(lines).encode("utf-8")
        view = memoryview(data)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:   # no half line is left behind: the caller may write the same lines again
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def prune(self, now: float | None = None) -> int:
        """Delete files older than the maximum age, then the oldest until under the size limit."""
        if not self.directory.exists():
            return 0
        now = now or time.time()
        files = sorted(self.directory.glob(f"{self.prefix}*.LOG"), key=lambda p: p.stat().st_mtime)
        current = self._path if self._fd >= 0 else None
        removed = 0
        if self.max_age:
            for path in list(files):
                if path != current and now - path.stat().st_mtime > self.max_age:
                    path.unlink(missing_ok=True)
                    files.remove(path)
                    removed += 1
        if self.max_directory_size:
            total = sum(p.stat().st_size for p in files)
            for path in list(files):
                if total <= self.max_directory_size or path == current:
                    break
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                removed += 1
        return removed


class BufferedLog:
    """A thread that flushes buffered rows to a writer (and an optional sink) every ``interval``."""

    def __init__(self, name: str, flush: Callable[[list[Any]], None], interval: float = 0.25,
                 pending: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self._rows: list[Any] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()   # one flush at a time: rows reach the files in order
        self._flush = flush
        self._pending = pending               # the writer holds rows from a failed flush to write again
        self._failed = False
        self._interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, row: Any) -> None:
        with self._lock:
            self._rows.append(row)

    def flush_now(self) -> None:
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows and not self._pending():
                return
            try:
                self._flush(rows)
            except Exception as exc:  # noqa: BLE001 - logging must never take the server down
                if not self._failed:   # once per outage, not every quarter second of a full disk
                    log.warning("%s: writing %d log rows failed (%s); rows are dropped until writing works again",
                                self.name, len(rows), exc)
                self._failed = True
            else:
                if self._failed:
                    log.warning("%s: writing works again", self.name)
                self._failed = False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush_now()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush_now()
