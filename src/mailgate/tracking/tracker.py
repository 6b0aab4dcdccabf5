"""Message tracking (every state change of a message) and SMTP protocol logging."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

from mailgate.config.model import TransportServer
from mailgate.tracking.logs import (PROTOCOL_FIELDS, SCHEMA_VERSION, TRACKING_FIELDS, BufferedLog, CsvLogWriter,
                                   csv_line, csv_text_line, iso)

log = logging.getLogger("mailgate.tracking")
HELD_EVENTS = 100_000   # events kept for a later write while the log files or the index cannot be written
# How often the writer thread writes what the event loop formatted (the log files and the index). Every 250 ms
# (the other logs' interval) p99 accept latency at 20 sessions was 11.3-11.8 ms, every 50 ms 10.3-10.4 (the two
# side by side, eight repetitions each, both start orders; bench/README.md, seventh round).
FLUSH_SECONDS = 0.05

# Exchange's tracking file field → the key this module uses for it.
_FIELD_KEYS = {f: f.replace("-", "_") for f in TRACKING_FIELDS}
_FIELD_KEYS.update({"date-time": "timestamp", "recipient-address": "recipients", "sender-address": "sender"})
_FILE_KEYS = [_FIELD_KEYS[f] for f in TRACKING_FIELDS]
_DATE_TIME, _LOG_ID, _SCHEMA_VERSION, _TRAFFIC_TYPE = (TRACKING_FIELDS.index(f) for f in (
    "date-time", "log-id", "schema-version", "transport-traffic-type"))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class MessageTracker:
    """Writes tracking events to MSGTRK CSV files and to the store's index, in batches."""

    def __init__(self, store: Any, server: str, log_dir: Path) -> None:
        self.store = store
        self.server = server
        self.enabled = True
        self.subject_logging = True
        self.files = CsvLogWriter(log_dir, "MSGTRK", "Message Tracking Log", TRACKING_FIELDS)
        self._held_lines: list[str] = []                          # written by the writer thread only
        self._held_rows: list[tuple[tuple[Any, ...], tuple[str, ...]]] = []
        self._failing: set[str] = set()
        self._buffer = BufferedLog("tracking-writer", self._flush, FLUSH_SECONDS,
                                   pending=lambda: bool(self._held_lines or self._held_rows))
        self._log_ids = itertools.count(1)
        self._pid = os.getpid()

    def configure(self, server: TransportServer, directory: Path | None) -> None:
        """``directory`` None: MessageTrackingLogPath is $null, which (as in Exchange) turns tracking off."""
        self.enabled = server.message_tracking_log_enabled and directory is not None
        self.subject_logging = server.message_tracking_log_subject_logging_enabled
        self.files.configure(directory or self.files.directory,
                             max_file_size=server.message_tracking_log_max_file_size.bytes,
                             max_age=server.message_tracking_log_max_age.seconds,
                             max_directory_size=server.message_tracking_log_max_directory_size.bytes)
        self.max_age = server.message_tracking_log_max_age.seconds

    def event(self, event_id: str, source: str, **fields: Any) -> None:
        """Record one event; ``fields`` use the store's names (recipients, sender, message_subject...)."""
        if not self.enabled:
            return
        fields["event_id"] = event_id
        fields["source"] = source
        fields.setdefault("timestamp", _now())
        fields["server"] = self.server
        fields.setdefault("server_hostname", self.server)
        if not self.subject_logging:
            fields["message_subject"] = None
        # Formatted now, on the caller's thread; the writer thread only writes (tracking/logs.py). Tuples of
        # strings and numbers only: the garbage collector stops tracking those, so a long buffer costs it nothing.
        self._buffer.add((csv_text_line(self._file_texts(fields)), self.store.tracking_values(fields),
                          tuple(fields.get("recipients") or ())))

    def flush(self) -> None:
        self._buffer.flush_now()

    def close(self) -> None:
        self._buffer.close()
        self.files.close()

    def _file_texts(self, r: dict[str, Any]) -> list[str]:
        """The event's fields in the MSGTRK file's order, as text (lists joined with ";", None empty)."""
        row = list(map(r.get, _FILE_KEYS))
        row[_DATE_TIME] = iso(row[_DATE_TIME])
        row[_LOG_ID] = f"{self._pid:x}-{next(self._log_ids)}"
        row[_SCHEMA_VERSION] = SCHEMA_VERSION
        row[_TRAFFIC_TYPE] = row[_TRAFFIC_TYPE] or "Email"
        return [v if isinstance(v, str) else "" if v is None else ";".join(map(str, v)) if v.__class__ is list
                else str(v) for v in row]

    def _flush(self, events: list[tuple[str, tuple[Any, ...], tuple[str, ...]]]) -> None:
        """Write events to the files and to the index. A part that fails (a full disk, the PostgreSQL server
        away) keeps its events, up to HELD_EVENTS, and writes them with the next batch."""
        lines = self._held_lines + [line for line, _, _ in events]
        rows = self._held_rows + [(values, rcpts) for _, values, rcpts in events]
        self._held_lines = self._attempt("the message tracking log files", lines,
                                         lambda: self.files.write_lines(lines, _now()))
        self._held_rows = self._attempt("the message tracking index", rows, lambda: self.store.insert_tracking_values(
            [values for values, _ in rows], [rcpts for _, rcpts in rows]))

    def _attempt(self, what: str, items: list[Any], write: Any) -> list[Any]:
        """Run ``write``; return what is still to be written (nothing when it succeeded)."""
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop mail flow
            if what not in self._failing:
                self._failing.add(what)
                log.warning("writing %s failed (%s); keeping up to %d events to write when it works again",
                            what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, HELD_EVENTS)
            if len(items) > HELD_EVENTS:
                log.error("%s: %d events dropped (more than %d waiting)", what, len(items) - HELD_EVENTS, HELD_EVENTS)
            return items[-HELD_EVENTS:]
        if what in self._failing:
            self._failing.discard(what)
            log.warning("writing %s works again", what)
        return []

    def prune(self) -> None:
        self.files.prune()
        if getattr(self, "max_age", None):
            self.store.purge_tracking(_now() - dt.timedelta(seconds=self.max_age), self.server)


class ProtocolLog:
    """SmtpReceive or SmtpSend protocol log shared by every connector of one server."""

    def __init__(self, directory: Path, direction: str, *, worker: int = 0, workers: int = 1) -> None:
        prefix, log_type = ("RECV", "SMTP Receive Protocol Log") if direction == "receive" else \
            ("SEND", "SMTP Send Protocol Log")
        self.files = CsvLogWriter(directory, prefix, log_type, PROTOCOL_FIELDS)
        self._buffer = BufferedLog(f"protocol-log-{direction}", self._flush)
        # Session ids from the start time, each worker on its own residue modulo the worker count: workers that
        # start in the same millisecond share the log files and must never hand out the same id.
        self._ids = itertools.count((int(time.time() * 1000) << 12) * workers + worker, workers)
        self.enabled = True

    def configure(self, directory: Path | None, *, max_age: float, max_directory_size: int | None,
                  max_file_size: int | None) -> None:
        """``directory`` None: the log's path is $null, which (as in Exchange) turns this log off for every
        connector; the files already written are still pruned by age and size."""
        self.enabled = directory is not None
        self.files.configure(directory or self.files.directory, max_file_size=max_file_size, max_age=max_age,
                             max_directory_size=max_directory_size)

    def session(self, connector_id: str, local: str, remote: str) -> "ProtocolSession":
        return ProtocolSession(self, connector_id, f"{next(self._ids) & 0xFFFFFFFFFFFFFFFF:016X}", local, remote)

    def add(self, row: list[Any]) -> None:
        if self.enabled:
            self._buffer.add(csv_line(row))

    def _flush(self, lines: list[str]) -> None:
        self.files.write_lines(lines, _now())

    def flush(self) -> None:
        self._buffer.flush_now()

    def close(self) -> None:
        self._buffer.close()
        self.files.close()


class ProtocolSession:
    """The log lines of one SMTP session: ``+`` connect, ``<`` in, ``>`` out, ``*`` information, ``-`` end."""

    __slots__ = ("log", "connector_id", "session_id", "local", "remote", "seq")

    def __init__(self, log: ProtocolLog, connector_id: str, session_id: str, local: str, remote: str) -> None:
        self.log = log
        self.connector_id = connector_id
        self.session_id = session_id
        self.local = local
        self.remote = remote
        self.seq = 0

    def write(self, event: str, data: str = "", context: str = "") -> None:
        self.log.add([iso(_now()), self.connector_id, self.session_id, self.seq, self.local, self.remote, event,
                      data, context])
        self.seq += 1

    def received(self, line: str) -> None:
        self.write("<", line)

    def sent(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace").rstrip("\r\n")
        if "\r\n" in text:  # multi-line replies are logged on one line, as Exchange does
            lines = text.split("\r\n")
            text = lines[0][:3] + " " + " ".join(line[4:] for line in lines)
        self.write(">", text)
