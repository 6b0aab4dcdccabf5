"""The durable queue of one server: envelopes, recipient state and small
bodies in SQLite (``queue/queue.db``), larger bodies in append-only segment
files, the largest in files of their own.

Why this shape (measured on the project's machines, see docs/architecture.md):
creating a file costs 0.1–0.6 ms of CPU there, so a file per message caps any
design near Postfix's rate, while appending to an open file costs microseconds
and ``fdatasync`` ~0.2 ms. So bodies up to ``INLINE_BYTES`` (most mail) go into
the message's row, and one sync of the WAL makes the whole message durable;
bodies up to ``SPILL_BYTES`` are appended to the active segment (so the WAL
doesn't carry them, and the checkpoint doesn't copy them again), larger ones
get a file of their own; everything that arrived since the last commit is
committed in one go (group commit, adaptive: the next commit starts as soon as
the previous one ends).

Who does what: a write's statements run at once, on the calling thread (the
event loop), inside the open transaction. Then, where the sync thread
(``queue/_syncer.c``) is built, the event loop commits: at the end of a turn
that wrote something it syncs the new bodies through the sync thread, runs
COMMIT (``synchronous=NORMAL``: no sync) and has the sync thread sync the WAL,
which signals an eventfd the loop reads; no thread waits for the GIL between
the steps ("commits on the event loop", below). Elsewhere a commit thread
does the same steps with SQLite's ``synchronous=FULL``, which syncs the WAL
inside the COMMIT. Done the other way round — the statements on a writer
thread — every statement waits for the event loop to hand over the GIL, which
was the largest part of a commit's time under load (bench/README.md).

Durability rule: a message is acknowledged (``250``) only after its body is
synced and then its rows are committed and the WAL synced. So a committed row's
body is on disk, even after a crash of the machine (a killed process loses
nothing the kernel holds); ``open`` still drops a row whose body is missing or
cut short (a queue written by an earlier release, which synced bodies after the
commit, may hold such rows of messages never acknowledged). A failed body sync
undoes its commit; a failed WAL sync (on the loop's path, after the COMMIT)
leaves the rows but acknowledges nothing: the sender tries again, and the mail
may come twice but is never lost. Unreferenced segment bytes and spool files
are garbage and are removed at start-up too.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mailgate.errors import UserError, is_damaged_sqlite
from mailgate.queue.pressure import is_disk_full

try:   # compiled at install (setup.py); without it, or without eventfd, commits run on the commit thread
    from mailgate.queue._syncer import Syncer
except ImportError:  # pragma: no cover - a platform without a C compiler
    Syncer = None
LOOP_COMMITS_AVAILABLE = Syncer is not None and hasattr(os, "eventfd")

log = logging.getLogger("mailgate.queue")

SEGMENT_BYTES = 64 * 1024 * 1024
RECLAIM_ACTIVE_BYTES = 4 * 1024 * 1024   # an unused active segment this large is deleted, the next one opened
INLINE_BYTES = 16 * 1024
SPILL_BYTES = 1024 * 1024
CHECKPOINT_SECONDS = 0.5
# Delivery outcomes alone (nothing to sync) don't start a commit of their own: they wait this long for one that
# new mail starts, whose pages they mostly share (the same index and table leaves). At 20 sessions relaying, commits
# fell from 0.80 to 0.62 per message and WAL bytes written from 47 to 40 KB (bench/README.md, sixth round).
OUTCOME_COMMIT_DELAY = 0.02
# On the loop's path, when writes came while a commit was in flight (the load is high), the next commit starts no
# sooner than this after that one landed, so that it takes more of them: at 20 sessions, without the gap the loop
# made 1.5 times the commit thread's commits (≈ 1.5 messages per commit instead of 2.3), and spent 7 % more CPU
# per message on them (bench/README.md, item 33). A single session's next message comes later than this.
COMMIT_GAP = 0.001
WAL_LIMIT_BYTES = 32 * 1024 * 1024
ID_BLOCK = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY,
    network_id TEXT NOT NULL,
    message_id TEXT,
    sender TEXT NOT NULL,
    subject TEXT,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    source TEXT,
    source_ip TEXT,
    client_hostname TEXT,
    connector TEXT,
    auth_as TEXT,
    directionality TEXT,
    envid TEXT,
    ret TEXT,
    body_type TEXT,
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    segment INTEGER,
    offset INTEGER,
    length INTEGER NOT NULL,
    spool_path TEXT,
    body BLOB,
    lines_normalised INTEGER NOT NULL DEFAULT 0,
    in_submission INTEGER NOT NULL DEFAULT 0,
    submission_suspended INTEGER NOT NULL DEFAULT 0,
    poison INTEGER NOT NULL DEFAULT 0,
    error_count INTEGER NOT NULL DEFAULT 0,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    is_dsn INTEGER NOT NULL DEFAULT 0,
    priority TEXT NOT NULL DEFAULT 'Normal'
);
CREATE TABLE IF NOT EXISTS recipient (
    message INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    address TEXT NOT NULL,
    orcpt TEXT,
    notify TEXT,
    queue TEXT NOT NULL,
    status TEXT NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (message, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS recipient_due ON recipient(queue, status, next_attempt);
CREATE INDEX IF NOT EXISTS message_expiry ON message(expires_at);
CREATE INDEX IF NOT EXISTS message_submission ON message(in_submission) WHERE in_submission=1;
-- Poisoned messages (few): Get-Queue counts them and Get-Message lists them without reading the whole table.
CREATE INDEX IF NOT EXISTS message_poison ON message(id) WHERE poison=1;
-- Messages that may still owe their sender a delay notice (queue/manager.py DELAY_SCAN): without it, that scan
-- read the whole message table, bodies and all, on the event loop every few seconds (0.11 s at 100,000 messages).
CREATE INDEX IF NOT EXISTS message_undelayed ON message(received_at)
    WHERE delay_notified=0 AND is_dsn=0 AND sender != '';
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS queue_state (
    queue TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0
);
"""

# Columns added to ``message`` since the first release, added at ``open`` to a queue that lacks them.
ADDED_COLUMNS = {"body": "BLOB", "lines_normalised": "INTEGER NOT NULL DEFAULT 0"}

# Recipient status values: pending ones are delivered, final ones are kept until the message is done.
READY, RETRY, DELIVERED, FAILED = "Ready", "Retry", "Delivered", "Failed"
PENDING = (READY, RETRY)


@dataclass(slots=True)
class BodyRef:
    """Where a body is: in the row (``data``), in a segment, or in a spool file of its own."""

    segment: int | None
    offset: int
    length: int
    spool_path: str | None = None
    data: bytes | None = None


@dataclass(slots=True)
class NewRecipient:
    address: str
    queue: str
    orcpt: str | None = None
    notify: str | None = None
    status: str = READY
    last_error: str | None = None
    # Tracking only: event RESOLVE (``related`` = the mailbox's primary address) or REDIRECT (``related`` = the
    # address whose mailbox forwarded to this one).
    related: str | None = None
    event: str | None = None


@dataclass(slots=True)
class NewMessage:
    network_id: str
    message_id: str | None
    sender: str
    subject: str | None
    size: int
    received_at: float
    expires_at: float
    recipients: list[NewRecipient]
    body: BodyRef
    source: str = ""
    source_ip: str | None = None
    client_hostname: str | None = None
    connector: str | None = None
    auth_as: str | None = None
    directionality: str = "Incoming"
    envid: str | None = None
    ret: str | None = None
    body_type: str | None = None
    smtputf8: bool = False
    in_submission: bool = False
    is_dsn: bool = False
    lines_normalised: bool = False   # every line ends in CRLF (received with DATA): sending needn't check
    id: int = 0   # assigned by the store


class _Wakeup:
    """``threading.Event``'s set and wait for the one commit thread, on a bare lock that is held while there is
    nothing to do: ``set`` is one C call, where ``Event.set`` takes a condition and notifies in Python (≈ 3 % of
    the event loop's time under load)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:   # set already
            pass

    def wait(self) -> None:
        """Return once set, and clear it."""
        self._lock.acquire()


class _Commit(concurrent.futures.Future):  # type: ignore[type-arg]
    """The future of a write. Its commit may be waiting for the event loop's turn to end (``QueueStore.loop``);
    a caller that blocks on it has it committed at once (``QueueStore.commit_now``: on the loop, right there), or
    a caller on the loop would wait forever."""

    def __init__(self, store: "QueueStore") -> None:
        super().__init__()
        self._store = store

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._store.commit_now()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():   # done callbacks (asyncio.wrap_future's) read it too: no wake-up for those
            self._store.commit_now()
        return super().exception(timeout)


@dataclass(slots=True)
class _Job:
    kind: str                      # "insert" | "sql" | "record" | "remove"
    payload: Any
    future: concurrent.futures.Future[Any] | None
    fsync_paths: tuple[str, ...] = ()
    result: Any = True
    # what the commit thread does once the job's transaction is committed
    inserted: list[NewMessage] = field(default_factory=list)
    freed_segments: list[int] = field(default_factory=list)
    freed_spools: list[str] = field(default_factory=list)
    after: Callable[[], None] | None = None

    @property
    def can_wait(self) -> bool:
        """Delivery outcomes alone wait up to OUTCOME_COMMIT_DELAY for the next commit (``_run``)."""
        return self.kind == "record" and not self.inserted


# What a flight (a batch handed to the sync thread, or a checkpoint) is for: see ``QueueStore._start_commit``.
BODIES, WAL, CHECKPOINT = "bodies", "wal", "checkpoint"


@dataclass(slots=True)
class _Flight:
    phase: str
    jobs: list[_Job]
    fds: list[int] = field(default_factory=list)   # BODIES: descriptors the flight owns (closed when it lands)
    segment: bool = False                           # BODIES: the active segment is among them
    checkpoint_next: bool = False                   # WAL: a checkpoint follows, new statements wait for it
    thread: threading.Thread | None = None          # CHECKPOINT: the thread running it


def _sync_error(error_number: int) -> OSError:
    return OSError(error_number, f"the queue's files could not be synced: {os.strerror(error_number)}")


class QueueStore:
    def __init__(self, directory: Path, id_base: int = 0) -> None:
        self.dir = directory
        self.id_base = id_base            # worker processes number their messages from different bases
        self.segment_dir = directory / "segments"
        self.spool_dir = directory / "spool"
        self.db_path = directory / "queue.db"
        self._lock = threading.Lock()               # guards the active segment and the id counter
        self._sql_lock = threading.Lock()           # guards the write connection and its open transaction
        self._conn: sqlite3.Connection | None = None
        self._in_transaction = False
        self._pending: list[_Job] = []               # run in the open transaction, waiting for its commit
        self._deferred: list[_Job] = []              # the loop's jobs that came during a commit (``_run``)
        self._wake = _Wakeup()
        self._stopping = False
        self._committer: threading.Thread | None = None
        self.loop: Any = None                        # see attach_loop
        self._loop_thread = 0
        self._wake_pending = False
        self._late_wake_pending = False
        # Commits on the event loop (``attach_loop``): the sync thread, the eventfd it signals, the WAL's descriptor
        self._syncer: Any = None
        self._eventfd = -1
        self._wal_fd = -1
        self._flight: _Flight | None = None
        self._sealed = False             # new statements wait in ``_deferred`` (the open transaction is committing)
        self._commit_wanted = False
        self._commit_scheduled = False
        self._gap_until = 0.0
        self._segment_fd = -1
        self._segment_no = 0
        self._segment_size = 0
        self._segment_dirty = False
        # segment → bodies in it that a committed row refers to or that are on their way to a commit (counted
        # at append, so a segment never goes while a body in it may still be acknowledged)
        self._live: dict[int, int] = {}
        self._read_fds: dict[int, int] = {}
        self._next_id = 1
        self._read_local = threading.local()
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.commits = 0
        self.committed_messages = 0
        self.on_disk_full: Callable[[], None] = lambda: None   # back pressure's hook (queue/pressure.py)

    # -- opening and recovery ------------------------------------------------------
    def open(self) -> None:
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not is_damaged_sqlite(exc):
                raise
            raise UserError(
                f"The queue database {self.db_path} is damaged ({exc}), so the messages queued in it can't be "
                f"read and this queue can't start. To try to save them: sqlite3 {self.db_path} .recover > "
                f"recovered.sql. To start this queue empty (its messages are lost): stop mailgate and move "
                f"{self.db_path} and its -wal and -shm files aside.") from None

    def _open(self) -> None:
        for d in (self.dir, self.segment_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
        for name, declaration in ADDED_COLUMNS.items():   # a queue made by an earlier release
            if name not in columns:
                conn.execute(f"ALTER TABLE message ADD COLUMN {name} {declaration}")
        # Internal message ids never repeat (tracking refers to them): continue above the stored high-water mark.
        used = conn.execute("SELECT max(id) FROM message").fetchone()[0] or 0
        mark = conn.execute("SELECT value FROM counter WHERE name='message_id'").fetchone()
        self._next_id = max(used, mark[0] if mark else 0, self.id_base) + 1
        self._id_mark = self._next_id + ID_BLOCK
        conn.execute("INSERT OR REPLACE INTO counter (name, value) VALUES ('message_id', ?)", (self._id_mark,))
        self._drop_bodiless(conn)
        self._live = {seg: n for seg, n in conn.execute(
            "SELECT segment, count(*) FROM message WHERE segment IS NOT NULL GROUP BY segment")}
        spooled = {os.path.basename(row[0])
                   for row in conn.execute("SELECT spool_path FROM message WHERE spool_path IS NOT NULL")}
        conn.close()
        # Garbage from before a crash: segments and spool files no committed row refers to.
        existing = sorted(int(p.stem) for p in self.segment_dir.glob("*.seg") if p.stem.isdigit())
        for seg in existing:
            if seg not in self._live:
                (self.segment_dir / f"{seg:08d}.seg").unlink(missing_ok=True)
        for path in self.spool_dir.iterdir():
            if path.name not in spooled:
                path.unlink(missing_ok=True)
        self._segment_no = max(existing + [0])
        self._open_new_segment()
        self._conn = self._connect()
        self._conn.execute("PRAGMA synchronous=FULL")         # COMMIT syncs the WAL (module docstring)
        self._conn.execute("PRAGMA wal_autocheckpoint=0")     # the checkpoint thread copies the WAL
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        self._stopping = False
        self._committer = threading.Thread(target=self._commit_loop, name="queue-commit", daemon=True)
        self._committer.start()
        self._checkpoint_stop.clear()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="queue-checkpoint", daemon=True)
        self._checkpointer.start()

    def _drop_bodiless(self, conn: sqlite3.Connection) -> None:
        """Rows can reach the disk before their body (module docstring): such a message was never
        acknowledged, and delivering what is on disk would send a truncated message, so it goes."""
        lost: list[int] = []
        for seg, end in conn.execute("SELECT segment, max(offset + length) FROM message WHERE segment IS NOT NULL"
                                     " GROUP BY segment").fetchall():
            path = self._segment_path(seg)
            size = path.stat().st_size if path.exists() else 0
            if size < end:
                lost += [row[0] for row in conn.execute(
                    "SELECT id FROM message WHERE segment=? AND offset + length > ?", (seg, size))]
        for msg_id, stored, length in conn.execute(
                "SELECT id, spool_path, length FROM message WHERE spool_path IS NOT NULL").fetchall():
            path = self.spool_file(stored)
            if not os.path.exists(path) or os.path.getsize(path) < length:
                lost.append(msg_id)
        if lost:
            log.warning("dropping %d message(s) whose body a crash cut short before they were acknowledged: %s",
                        len(lost), ", ".join(map(str, lost[:20])))
            conn.execute("BEGIN IMMEDIATE")
            self._delete(conn, lost)
            conn.execute("COMMIT")

    def close(self) -> None:
        self._leave_loop_commits()
        self._run_deferred(wait=True)
        if self._committer is not None:
            self._stopping = True
            self._wake.set()
            self._committer.join(timeout=30)
            self._committer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._checkpointer is not None:
            self._checkpoint_stop.set()
            self._checkpointer.join(timeout=30)
            self._checkpointer = None
        with self._lock:
            if self._segment_fd >= 0:
                os.close(self._segment_fd)
                self._segment_fd = -1
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def reader(self) -> sqlite3.Connection:
        """A read connection for the calling thread."""
        conn = getattr(self._read_local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.row_factory = sqlite3.Row
            self._read_local.conn = conn
        return conn

    # -- bodies ------------------------------------------------------------------------------
    def _segment_path(self, seg: int) -> Path:
        return self.segment_dir / f"{seg:08d}.seg"

    def _open_new_segment(self, sync: bool = True) -> None:
        if self._segment_fd >= 0:
            if sync:   # bodies appended since the writer's last sync must not be lost
                os.fdatasync(self._segment_fd)
            os.close(self._segment_fd)
        self._segment_no += 1
        self._segment_fd = os.open(self._segment_path(self._segment_no), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_size = 0

    def append_body(self, parts: Iterable[bytes]) -> BodyRef:
        """Keep a small body for its row, or append it to the active segment; durable after the next commit."""
        data = b"".join(parts)
        if len(data) <= INLINE_BYTES:
            return BodyRef(None, 0, len(data), data=data)
        with self._lock:
            if self._segment_size + len(data) > SEGMENT_BYTES and self._segment_size:
                self._open_new_segment()
            offset = self._segment_size
            view = memoryview(data)
            while view:
                written = os.write(self._segment_fd, view)
                view = view[written:]
            self._segment_size += len(data)
            self._segment_dirty = True
            self._live[self._segment_no] = self._live.get(self._segment_no, 0) + 1
            return BodyRef(self._segment_no, offset, len(data))

    def _drop_references(self, segments: Iterable[int]) -> None:
        """Bodies in these segments are no longer needed (delivered, or their message never committed).
        A segment nothing refers to any more is deleted — the active one too, once it holds
        RECLAIM_ACTIVE_BYTES, after opening the next — so a queue that mail filled gives its disk back as it
        drains. (Never emptied and
        reused in place: the delete of a delivered message is not synced, and a row that a power loss brought
        back must find its segment gone, and be dropped at start-up, not point into other messages' bodies.)"""
        with self._lock:
            for seg in segments:
                left = self._live.get(seg, 0) - 1
                if left > 0:
                    self._live[seg] = left
                    continue
                self._live.pop(seg, None)
                if seg == self._segment_no:
                    if self._segment_size < RECLAIM_ACTIVE_BYTES:   # not worth a new file yet: keep appending
                        continue
                    self._open_new_segment(sync=False)
                fd = self._read_fds.pop(seg, None)
                if fd is not None:
                    os.close(fd)
                self._segment_path(seg).unlink(missing_ok=True)

    @staticmethod
    def _new_bodies(job: "_Job") -> list[int]:
        """The segments of the bodies a job's new messages bring (an insert's message, a record's DSNs)."""
        if job.kind == "insert":
            messages = [job.payload]
        elif job.kind == "record":
            messages = job.payload[2]
        else:
            return []
        return [m.body.segment for m in messages if m.body.segment is not None]

    def _fail(self, jobs: Iterable["_Job"], exc: BaseException) -> None:
        """Jobs whose statements were rolled back: their waiters hear why, their bodies are let go."""
        if is_disk_full(exc):
            self.on_disk_full()
        for job in jobs:
            self._drop_references(self._new_bodies(job))
            if job.future is not None and not job.future.done():
                job.future.set_exception(exc)

    def spool_file(self, stored: str) -> str:
        """Where a spooled body is now. Rows keep the file's name (rows of earlier releases its whole path), and
        it is looked for in this queue's spool directory, so a data directory that was moved or restored
        elsewhere still finds its large messages (they used to be dropped as cut short, and their files
        deleted)."""
        return str(self.spool_dir / os.path.basename(stored))

    def new_spool_file(self) -> tuple[str, int]:
        """A file for a large body; the caller writes it and passes the path to ``submit``."""
        path = str(self.spool_dir / f"{uuid.uuid4().hex}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return path, fd

    def body(self, msg: Any) -> "StoredBody":
        """The content of a queued message (``msg`` has id/body/segment/offset/length/spool_path)."""
        data = msg["body"]
        if data is None and msg["segment"] is None and msg["spool_path"] is None:   # in the row, not loaded
            data = self.reader().execute("SELECT body FROM message WHERE id=?", (msg["id"],)).fetchone()[0]
        spool = self.spool_file(msg["spool_path"]) if msg["spool_path"] else None
        return StoredBody(self, msg["segment"], msg["offset"], msg["length"], spool, data)

    def read_body(self, msg: Any) -> bytes:
        return self.body(msg).read()

    def _pread(self, segment: int, length: int, offset: int) -> bytes:
        with self._lock:
            fd = self._read_fds.get(segment)
            if fd is None:
                fd = os.open(self._segment_path(segment), os.O_RDONLY)
                self._read_fds[segment] = fd
        return os.pread(fd, length, offset)

    def attach_loop(self, loop: Any, commits_on_loop: bool | None = None) -> None:
        """Called on the event loop's thread. Writes made there are committed once per turn of the loop, so that
        one commit takes everything the turn produced (waking a thread per write cost ~2 %): by the loop itself
        where the sync thread is available (``commits_on_loop``, the default then), else by the commit thread."""
        self._leave_loop_commits()   # a former loop's
        self.loop, self._loop_thread = loop, threading.get_ident()
        self._wake_pending = self._late_wake_pending = False   # a wake-up a former loop owed died with it
        if commits_on_loop is None:
            commits_on_loop = LOOP_COMMITS_AVAILABLE
        if commits_on_loop and self._conn is not None:
            self._enter_loop_commits()

    # -- writes -------------------------------------------------------------------------------
    def allocate_id(self) -> int:
        with self._lock:
            value = self._next_id
            self._next_id += 1
            raise_mark = self._next_id >= self._id_mark
            if raise_mark:
                self._id_mark += ID_BLOCK
                mark = self._id_mark
        if raise_mark:   # outside the segment lock: the commit thread takes the two locks the other way round
            self._run(_Job("sql", ("INSERT OR REPLACE INTO counter (name, value) VALUES ('message_id', ?)",
                                   (mark,), False, None), None))
        return value

    def submit(self, msg: NewMessage) -> concurrent.futures.Future[Any]:
        """Queue a new message; the future resolves once it is durable."""
        if not msg.id:
            msg.id = self.allocate_id()
        fut: concurrent.futures.Future[Any] = _Commit(self)
        paths = (msg.body.spool_path,) if msg.body.spool_path else ()
        self._run(_Job("insert", msg, fut, paths))
        return fut

    def execute(self, sql: str, params: Iterable[Any] = (), *, many: bool = False,
                after: Callable[[], None] | None = None) -> concurrent.futures.Future[Any]:
        """Run a write statement now, in the open transaction; the future resolves (to the number of rows
        changed) after its commit, and ``after`` runs then."""
        fut: concurrent.futures.Future[Any] = _Commit(self)
        self._run(_Job("sql", (sql, list(params) if many else tuple(params), many, after), fut))
        return fut

    def record(self, message: int, updates: list[tuple[Any, ...]], dsns: list[NewMessage] | None = None,
               extra: list[tuple[str, tuple[Any, ...]]] | None = None) -> concurrent.futures.Future[Any]:
        """Apply delivery outcomes of one message atomically: recipient updates
        ``(idx, status, last_error, next_attempt, add_retries)``, the DSNs they cause, and extra statements;
        then delete the message if no recipient is left pending. The future resolves to True when deleted."""
        dsns = dsns or []
        for d in dsns:
            if not d.id:
                d.id = self.allocate_id()
        fut: concurrent.futures.Future[Any] = _Commit(self)
        paths = tuple(d.body.spool_path for d in dsns if d.body.spool_path)
        self._run(_Job("record", (message, updates, dsns, extra or []), fut, paths))
        return fut

    def remove_messages(self, ids: list[int]) -> concurrent.futures.Future[Any]:
        """Delete messages whose recipients are all final; frees their segment space."""
        fut: concurrent.futures.Future[Any] = _Commit(self)
        self._run(_Job("remove", ids, fut))
        return fut

    def _run(self, job: _Job) -> None:
        """Run a job's statements in the open transaction (a failing job leaves no trace: ``_take_out``) and
        hand it to the commit thread. A failure resolves the job's future at once.

        On the event loop a job that comes while the commit thread is committing (it holds the write
        connection) is not waited for: it joins ``_deferred`` and runs, in order, once the commit is over
        (``_run_deferred``, called by whichever side sees the connection free). Waiting held every session of
        the worker: ≈ 3 % of the loop's time at 20 sessions, up to 5 ms at once."""
        if self._conn is None:
            raise RuntimeError("the queue store isn't open")
        if self._on_loop():
            self._deferred.append(job)
            self._run_deferred()
            return
        with self._sql_lock:
            if self._sealed:   # the open transaction is being committed: the loop runs the job after it
                self._deferred.append(job)
                return
            ran = self._apply_in_transaction(job)
        if ran:
            self._wake_for(job)

    def _on_loop(self) -> bool:
        loop = self.loop
        return loop is not None and threading.get_ident() == self._loop_thread and loop.is_running()

    def _run_deferred(self, wait: bool = False) -> None:
        """Run the deferred jobs if the write connection is free (or once it is, with ``wait``). The commit
        thread calls for this after every commit that found jobs deferred, so none waits for more traffic."""
        if not self._deferred or not self._sql_lock.acquire(blocking=wait):
            return
        try:
            if self._sealed:   # the loop runs them once the sealed transaction is committed (``_land``)
                return
            jobs, self._deferred = self._deferred, []
            if self._conn is None:   # closed meanwhile: nothing of them was written
                self._fail(jobs, RuntimeError("the queue store isn't open"))
                return
            ran = [job for job in jobs if self._apply_in_transaction(job)]
        finally:
            self._sql_lock.release()
        for job in ran:
            self._wake_for(job)

    def _apply_in_transaction(self, job: _Job) -> bool:
        """A job's statements in the open transaction, under ``_sql_lock``; it then waits for the commit. False
        when they failed (rolled back, the future resolved with the error)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the queue store isn't open")
        try:
            if not self._in_transaction:
                conn.execute("BEGIN IMMEDIATE")
                self._in_transaction = True
            self._apply(conn, job)
        except BaseException as exc:  # noqa: BLE001 - the waiter hears about it; nothing of the job stays
            self._take_out(job, exc)
            if not isinstance(exc, Exception):
                raise
            return False
        self._pending.append(job)
        return True

    def _take_out(self, job: _Job, exc: BaseException) -> None:
        """A job failed, maybe part-way, in the transaction the other pending jobs are in. A savepoint per job
        could undo its part alone, but costs every job: SQLite copies each page a job changes in case it is
        rolled back (a message's insert 11.5 → 18 µs, its outcome 12.5 → 20 µs). So the rare failure pays
        instead: the transaction is rolled back and the other jobs run again."""
        self._fail([job], exc)
        conn = self._conn
        assert conn is not None
        if not conn.in_transaction:
            if self._in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error): so went every job in it.
                self._fail(self._pending, exc)
                self._pending = []
                self._in_transaction = False
            return
        conn.execute("ROLLBACK")
        self._in_transaction = False
        again, self._pending = self._pending, []
        for other in again:
            other.inserted.clear()   # _apply adds them again (what else it records, it sets anew)
            self._apply_in_transaction(other)

    def _wake_for(self, job: _Job) -> None:
        """Tell the commit thread about a job that ran: once per turn of the loop, later for outcomes alone."""
        loop = self.loop
        if self._on_loop():
            if job.can_wait:
                if not self._late_wake_pending:
                    self._late_wake_pending = True
                    loop.call_later(OUTCOME_COMMIT_DELAY, self._wake_late)
            elif self._syncer is not None:
                self._request_commit()
            elif not self._wake_pending:
                self._wake_pending = True
                loop.call_soon(self._wake_after_turn)
        else:
            self._request_commit()

    def _wake_after_turn(self) -> None:
        self._wake_pending = False
        self._wake.set()

    def commit_now(self) -> None:
        """Someone waits for what was written (an administrator's action, a caller blocking on a future): commit
        it now, deferred jobs and outcomes too, instead of letting them wait up to OUTCOME_COMMIT_DELAY. On the
        loop, when the loop commits, that means here and now: the caller may block the loop on the result."""
        if self._syncer is not None and self._on_loop():
            self._drain_loop_commits()
            return
        if self._on_loop():
            self._run_deferred(wait=True)
        self._request_commit()

    def _wake_late(self) -> None:
        """Commit the outcomes still waiting, unless a commit since took them."""
        self._late_wake_pending = False
        if self._pending:
            self._request_commit()

    def _request_commit(self) -> None:
        """Have what was written committed: by the commit thread, or at the end of the loop's turn (later, when
        a commit is in flight: the sync thread syncs one batch at a time, and the next starts as it lands)."""
        if self._syncer is None:
            self._wake.set()
            return
        self._commit_wanted = True
        if self._commit_scheduled:
            return
        self._commit_scheduled = True
        if self._on_loop():
            self.loop.call_soon(self._commit_turn)
            return
        try:
            if not self.loop.is_running():
                raise RuntimeError("the loop doesn't run")
            self.loop.call_soon_threadsafe(self._commit_turn)
        except RuntimeError:   # no loop to commit on any more (stopped or closed): back to the commit thread
            self._commit_scheduled = False
            self._leave_loop_commits()
            self._wake.set()

    def _apply(self, conn: sqlite3.Connection, job: _Job) -> None:
        if job.kind == "insert":
            self._insert(conn, job.payload)
            job.inserted.append(job.payload)
        elif job.kind == "sql":
            sql, params, many, job.after = job.payload
            if many:
                conn.executemany(sql, params)
            else:
                job.result = conn.execute(sql, params).rowcount
        elif job.kind == "remove":
            job.freed_segments, job.freed_spools = self._delete(conn, job.payload)
        elif job.kind == "record":
            message, updates, dsns, extra = job.payload
            for dsn in dsns:
                self._insert(conn, dsn)
                job.inserted.append(dsn)
            conn.executemany(
                "UPDATE recipient SET status=?, last_error=?, next_attempt=?, retry_count=retry_count+?"
                " WHERE message=? AND idx=?",
                [(st, err, nxt, inc, message, idx) for idx, st, err, nxt, inc in updates])
            for sql, params in extra:
                conn.execute(sql, params)
            # Nothing left to deliver (and the message not removed meanwhile): one statement, as it runs for
            # every delivered message on the event loop.
            done = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM recipient WHERE message=? AND status IN (?,?))"
                                " AND EXISTS (SELECT 1 FROM message WHERE id=?)",
                                (message, READY, RETRY, message)).fetchone()[0]
            if done:
                job.freed_segments, job.freed_spools = self._delete(conn, [message])
            job.result = bool(done)

    def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database off the event loop and the commit thread. This connection keeps
        ``synchronous=FULL``: it syncs the database file before SQLite may reuse the copied part of the WAL."""
        conn = self._connect()
        failing = False
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    if not failing:   # once per outage (a full disk fails it twice a second)
                        log.warning("queue checkpoint failed (%s); the WAL grows until it succeeds", exc)
                    failing = True
                else:
                    if failing:
                        log.warning("queue checkpoint works again")
                    failing = False
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def _commit_loop(self) -> None:
        """Group commit: whatever ran since the last commit is committed together, then synced."""
        while True:
            self._wake.wait()
            if self._syncer is not None and not self._stopping:   # the loop commits (``attach_loop``)
                continue
            with self._sql_lock:
                jobs, self._pending = self._pending, []
                stopping = self._stopping
                error: Exception | None = None
                if self._in_transaction:
                    assert self._conn is not None
                    try:
                        if any(job.inserted for job in jobs):   # new messages (a DSN is one)
                            self._sync_bodies(jobs)
                        self._conn.execute("COMMIT")   # synchronous=FULL: SQLite syncs the WAL before it returns
                    except Exception as exc:  # noqa: BLE001 - every waiter must hear about the failure
                        error = self._undo_transaction(jobs, exc)
                    self._in_transaction = False
                    if error is None:
                        self.commits += 1
                        self._bound_wal()
            if self._deferred:   # jobs the loop made while this commit held the connection (``_run``)
                try:
                    self.loop.call_soon_threadsafe(self._run_deferred)
                except RuntimeError:   # the loop is closed: close() runs them
                    pass
            if error is not None:
                self._fail(jobs, error)
            elif jobs:
                self._finish(jobs)
            if stopping:
                return

    def _bound_wal(self) -> None:
        """Under steady load the checkpoint thread never finds the WAL caught up just before a commit, so it
        never rewinds. Checkpointing the little it hasn't copied here, between two transactions (with SQLite's
        syncs on for it, see ``_checkpoint_loop``), lets the next one rewind it and bounds its size."""
        assert self._conn is not None
        if self.commits % 64 == 0 and os.path.getsize(f"{self.db_path}-wal") > WAL_LIMIT_BYTES:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _body_fds(self, jobs: list[_Job]) -> tuple[list[int], bool]:
        """Descriptors of what must be synced before the commit that makes new messages' rows durable: the
        active segment (when bodies were appended since its last sync), new spool files and their directory;
        and whether the segment is among them. The caller closes them."""
        fds: list[int] = []
        segment = False
        try:
            with self._lock:
                # A duplicate stays valid even if the loop thread rotates the segment meanwhile.
                if self._segment_dirty:
                    fds.append(os.dup(self._segment_fd))
                    self._segment_dirty, segment = False, True
            spools = [path for job in jobs for path in job.fsync_paths]
            fds += [os.open(path, os.O_RDONLY) for path in spools]
            if spools:
                fds.append(os.open(self.spool_dir, os.O_RDONLY))
        except OSError:
            self._bodies_unsynced(fds, segment)
            raise
        return fds, segment

    def _bodies_unsynced(self, fds: list[int], segment: bool) -> None:
        """Close a failed body sync's descriptors; the segment's bodies still want syncing."""
        for fd in fds:
            os.close(fd)
        if segment:
            with self._lock:
                self._segment_dirty = True

    def _sync_bodies(self, jobs: list[_Job]) -> None:
        """The commit thread's sync of new bodies before the COMMIT (a failure fails the commit: nothing of it is
        acknowledged)."""
        fds, segment = self._body_fds(jobs)
        try:
            for fd in fds:
                os.fdatasync(fd)
        except OSError:
            self._bodies_unsynced(fds, segment)
            raise
        for fd in fds:
            os.close(fd)

    # -- commits on the event loop -------------------------------------------------------------------
    # Where the sync thread (queue/_syncer.c) is available, the loop commits: at the end of a turn that wrote
    # something, it runs COMMIT itself (SQLite writes the WAL, ≈ 50 µs; synchronous=NORMAL, so no sync) and
    # hands the WAL's descriptor to the sync thread, which syncs it without the GIL and signals an eventfd; the
    # loop reads it and resolves the futures (``_land``). A commit that brings new bodies in the segment or in
    # spool files syncs them first, in a flight of their own (BODIES), with the transaction sealed: statements
    # that come meanwhile wait in ``_deferred`` and go into the next transaction. So the order is the commit
    # thread's (bodies, COMMIT, WAL) and nothing waits for the GIL between the steps (bench/README.md, items 32
    # and 33). One flight at a time; the next commit starts as one lands (under load, COMMIT_GAP later).
    def _enter_loop_commits(self) -> None:
        assert self._conn is not None and Syncer is not None
        with self._sql_lock:
            self._conn.execute("PRAGMA synchronous=NORMAL")   # the COMMIT doesn't sync; a checkpoint still does
            self._wal_fd = os.open(f"{self.db_path}-wal", os.O_RDONLY | os.O_CLOEXEC)   # made by journal_mode=WAL
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._syncer = Syncer(self._eventfd)
        self.loop.add_reader(self._eventfd, self._on_synced)
        if self._in_transaction:
            self._request_commit()

    def _leave_loop_commits(self) -> None:
        """Commit and sync what is written, then hand commits back to the commit thread (``close``, or no loop
        to commit on). Run on the loop while it runs (the loop's state is the loop's), else here."""
        if self._syncer is None:
            return
        loop = self.loop
        if loop is not None and loop.is_running() and not self._on_loop():
            done: concurrent.futures.Future[None] = concurrent.futures.Future()

            def leave() -> None:
                try:
                    self._leave_loop_commits()
                    done.set_result(None)
                except BaseException as exc:  # noqa: BLE001 - the closing thread raises it
                    done.set_exception(exc)

            try:
                loop.call_soon_threadsafe(leave)
            except RuntimeError:   # closed since
                pass
            else:
                done.result(timeout=60)
                return
        self._drain_loop_commits()
        syncer, self._syncer = self._syncer, None
        if syncer is None:
            return
        try:
            loop.remove_reader(self._eventfd)
        except Exception:  # noqa: BLE001 - a closed loop has no readers left
            pass
        syncer.close()
        os.close(self._eventfd)
        os.close(self._wal_fd)
        self._eventfd = self._wal_fd = -1
        if self._conn is not None:
            with self._sql_lock:
                self._conn.execute("PRAGMA synchronous=FULL")   # the commit thread's COMMIT syncs the WAL

    def _commit_turn(self) -> None:
        """The end of a turn of the loop that wrote something: commit it, unless a flight is out."""
        self._commit_scheduled = False
        if self._syncer is not None and self._flight is None and self._commit_wanted:
            wait = self._gap_until - self.loop.time()
            if wait > 0:
                self._commit_scheduled = True
                self.loop.call_later(wait, self._commit_turn)
                return
            self._commit_wanted = False
            self._start_commit()

    def _start_commit(self) -> None:
        """Commit the open transaction: sync its new bodies first (a BODIES flight), else COMMIT and sync the WAL."""
        error: Exception | None = None
        with self._sql_lock:
            if not self._in_transaction:
                return
            jobs, self._pending = self._pending, []
            try:
                fds, segment = self._body_fds(jobs) if any(job.inserted for job in jobs) else ([], False)
            except OSError as exc:
                error = self._undo_transaction(jobs, exc)
            else:
                if fds:
                    self._sealed = True
                    self._fly(_Flight(BODIES, jobs, fds, segment), fds)
                    return
                error = self._commit_sealed(jobs)
        if error is not None:
            self._fail(jobs, error)
        self._run_deferred()

    def _commit_sealed(self, jobs: list[_Job]) -> Exception | None:
        """COMMIT (its bodies are synced), then sync the WAL; under ``_sql_lock``. The error, if it failed."""
        assert self._conn is not None
        try:
            self._conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every waiter must hear about the failure
            return self._undo_transaction(jobs, exc)
        self._in_transaction = False
        self.commits += 1
        # Under steady load the checkpoint thread never catches up with the WAL, which then never rewinds: now
        # and then, between two transactions, a checkpoint runs with new statements held back (``_land``).
        big = self.commits % 64 == 0 and os.fstat(self._wal_fd).st_size > WAL_LIMIT_BYTES
        self._sealed = big
        self._fly(_Flight(WAL, jobs, checkpoint_next=big), [self._wal_fd])
        return None

    def _undo_transaction(self, jobs: list[_Job], exc: Exception) -> Exception:
        """Roll the open transaction back after its commit failed, on either path (under ``_sql_lock``); the
        caller fails the jobs."""
        assert self._conn is not None
        if not is_disk_full(exc):   # a full disk is back pressure's to report (queue/pressure.py)
            log.error("queue commit failed, %d writes undone: %s", len(jobs), exc)
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._in_transaction = self._sealed = False
        return exc

    def _fly(self, flight: _Flight, fds: list[int]) -> None:
        self._flight = flight
        self._syncer.sync(fds)

    def _on_synced(self) -> None:
        """The eventfd's reader: a batch is synced."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:   # already read, and the batch taken, by a caller that waited for it
            pass
        self._collect()

    def _collect(self) -> None:
        syncer = self._syncer
        error = syncer.take() if syncer is not None else None
        if error is None:
            return
        flight, self._flight = self._flight, None
        assert flight is not None
        self._land(flight, error)

    def _land(self, flight: _Flight, error_number: int) -> None:
        """A flight is over: go on with its commit, or finish or fail its jobs; then start the next commit."""
        if flight.phase == BODIES:
            error: Exception | None = None
            with self._sql_lock:
                self._sealed = False
                if error_number:
                    self._bodies_unsynced(flight.fds, flight.segment)
                    error = self._undo_transaction(flight.jobs, _sync_error(error_number))
                else:
                    for fd in flight.fds:
                        os.close(fd)
                    error = self._commit_sealed(flight.jobs)
            if error is not None:
                self._fail(flight.jobs, error)
            self._run_deferred()
        elif flight.phase == WAL:
            if error_number:
                # Committed but maybe not on disk: nothing is acknowledged (the senders try again, and the mail
                # may then come twice), nothing is undone (the rows are there and may be delivered).
                sync_error = _sync_error(error_number)
                log.error("queue commit not synced, %d writes not acknowledged: %s", len(flight.jobs), sync_error)
                if is_disk_full(sync_error):
                    self.on_disk_full()
                for job in flight.jobs:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(sync_error)
            else:
                self._finish(flight.jobs)
            if flight.checkpoint_next:
                self._flight = _Flight(CHECKPOINT, [])
                self._flight.thread = threading.Thread(target=self._checkpoint_sealed, args=(self._flight,),
                                                       name="queue-wal-checkpoint", daemon=True)
                self._flight.thread.start()
                return
        else:   # CHECKPOINT
            self._sealed = False
            self._run_deferred()
        self._gap_until = self.loop.time() + COMMIT_GAP if self._commit_wanted else 0.0   # see COMMIT_GAP
        if self._flight is None and self._commit_wanted:
            self._commit_turn()

    def _checkpoint_sealed(self, flight: _Flight) -> None:
        """A CHECKPOINT flight's thread: copy the WAL into the database between two transactions, so that the
        next one rewinds it (synchronous=NORMAL: SQLite syncs the WAL and the database for it)."""
        try:
            with self._sql_lock:
                assert self._conn is not None
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception as exc:  # noqa: BLE001 - the checkpoint thread tries again, and says so
            log.warning("queue checkpoint failed: %s", exc)
        try:
            self.loop.call_soon_threadsafe(self._checkpoint_landed, flight)
        except RuntimeError:   # the loop is closed: the closing thread lands it (``_drain_loop_commits``)
            pass

    def _checkpoint_landed(self, flight: _Flight) -> None:
        if self._flight is flight:
            self._flight = None
            self._land(flight, 0)

    def _drain_loop_commits(self) -> None:
        """Commit and sync everything written so far, on the calling thread, waiting for the flight out."""
        for _ in range(1000):   # bounded: each round lands a flight or starts a commit
            flight = self._flight
            if flight is not None and flight.phase == CHECKPOINT:
                assert flight.thread is not None
                flight.thread.join()
                self._checkpoint_landed(flight)
            elif flight is not None:
                self._syncer.wait()
                self._collect()
            else:
                self._run_deferred(wait=True)
                if not self._in_transaction:
                    return
                self._commit_wanted = False
                self._start_commit()

    def _finish(self, jobs: list[_Job]) -> None:
        """After the commit (synced): free space, resolve the futures."""
        self.committed_messages += sum(len(job.inserted) for job in jobs)
        for job in jobs:
            self._drop_references(job.freed_segments)
            for path in job.freed_spools:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        for job in jobs:
            if job.after is not None:
                job.after()
            if job.future is not None and not job.future.done():
                job.future.set_result(job.result)

    def _insert(self, conn: sqlite3.Connection, m: NewMessage) -> None:
        conn.execute(
            "INSERT INTO message (id, network_id, message_id, sender, subject, size, received_at, expires_at, source,"
            " source_ip, client_hostname, connector, auth_as, directionality, envid, ret, body_type, smtputf8,"
            " segment, offset, length, spool_path, body, lines_normalised, in_submission, is_dsn)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (m.id, m.network_id, m.message_id, m.sender, m.subject, m.size, m.received_at, m.expires_at, m.source,
             m.source_ip, m.client_hostname, m.connector, m.auth_as, m.directionality, m.envid, m.ret, m.body_type,
             int(m.smtputf8), m.body.segment, m.body.offset, m.body.length,
             os.path.basename(m.body.spool_path) if m.body.spool_path else None, m.body.data,   # see spool_file
             int(m.lines_normalised), int(m.in_submission),
             int(m.is_dsn)))
        conn.executemany(
            "INSERT INTO recipient (message, idx, address, orcpt, notify, queue, status, next_attempt, last_error)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            [(m.id, i, r.address, r.orcpt, r.notify, r.queue, r.status, m.received_at, r.last_error)
             for i, r in enumerate(m.recipients)])

    def _delete(self, conn: sqlite3.Connection, ids: list[int]) -> tuple[list[int], list[str]]:
        segs: list[int] = []
        spools: list[str] = []
        for chunk_start in range(0, len(ids), 500):
            chunk = ids[chunk_start:chunk_start + 500]
            marks = ",".join("?" * len(chunk))
            for seg, spool in conn.execute(f"SELECT segment, spool_path FROM message WHERE id IN ({marks})", chunk):
                if seg is not None:
                    segs.append(seg)
                if spool:
                    spools.append(self.spool_file(spool))
            conn.execute(f"DELETE FROM recipient WHERE message IN ({marks})", chunk)
            conn.execute(f"DELETE FROM message WHERE id IN ({marks})", chunk)
        return segs, spools

    # -- queue numbers (Exchange shows queues as Server\<number> too) -------------------------------
    def queue_numbers(self) -> dict[str, tuple[int, bool]]:
        rows = self.reader().execute("SELECT queue, number, suspended FROM queue_state").fetchall()
        return {r["queue"]: (r["number"], bool(r["suspended"])) for r in rows}



class StoredBody:
    """A queued message's content. Small bodies come with their row or live in a segment and are read
    whole; large ones (spooled) are read in chunks, so delivering a 30 MB message doesn't hold 30 MB in
    memory."""

    CHUNK = 256 * 1024

    def __init__(self, store: QueueStore, segment: int | None, offset: int, length: int, spool_path: str | None,
                 data: bytes | None = None) -> None:
        self.store = store
        self.segment = segment
        self.offset = offset
        self.size = length
        self.spool_path = spool_path
        self._cache: bytes | None = data

    @property
    def large(self) -> bool:
        return self.spool_path is not None

    def read(self) -> bytes:
        if self._cache is not None:
            return self._cache
        if self.spool_path:
            with open(self.spool_path, "rb") as fh:
                return fh.read()
        assert self.segment is not None
        self._cache = self.store._pread(self.segment, self.size, self.offset)
        return self._cache

    def chunks(self, start: int = 0) -> Iterable[bytes]:
        """The body from byte ``start`` on, in pieces of at most CHUNK bytes when it is spooled."""
        if not self.spool_path:
            yield self.read()[start:] if start else self.read()
            return
        with open(self.spool_path, "rb") as fh:
            fh.seek(start)
            while True:
                chunk = fh.read(self.CHUNK)
                if not chunk:
                    return
                yield chunk

    def head(self, limit: int = 512 * 1024) -> bytes:
        """The start of the message up to and including the blank line after the headers."""
        if not self.spool_path:
            data = self.read()
        else:
            with open(self.spool_path, "rb") as fh:
                data = fh.read(limit)
        end = data.find(b"\r\n\r\n")
        return data[: end + 4] if end >= 0 else data[:limit]


def merge_queue(source: Path, target: Path) -> int:
    """Move every message of the queue in ``source`` into the queue in ``target`` (both stopped), then delete
    ``source``. Used when a server runs with fewer worker processes than before."""
    import shutil

    if not (source / "queue.db").exists():
        shutil.rmtree(source, ignore_errors=True)
        return 0
    src, dst = QueueStore(source), QueueStore(target)
    src.open()
    dst.open()
    moved = 0
    try:
        db = src.reader()
        for m in db.execute("SELECT * FROM message ORDER BY id").fetchall():
            rcpts = db.execute("SELECT * FROM recipient WHERE message=? ORDER BY idx", (m["id"],)).fetchall()
            body = src.body(m)
            if body.large:
                path, fd = dst.new_spool_file()
                with os.fdopen(fd, "wb") as fh:
                    for chunk in body.chunks():
                        fh.write(chunk)
                ref = BodyRef(None, 0, body.size, path)
            else:
                ref = dst.append_body([body.read()])
            new = NewMessage(
                id=m["id"], network_id=m["network_id"], message_id=m["message_id"], sender=m["sender"],
                subject=m["subject"], size=m["size"], received_at=m["received_at"], expires_at=m["expires_at"],
                recipients=[NewRecipient(r["address"], r["queue"], r["orcpt"], r["notify"], r["status"], r["last_error"])
                            for r in rcpts],
                body=ref, source=m["source"] or "", source_ip=m["source_ip"], client_hostname=m["client_hostname"],
                connector=m["connector"], auth_as=m["auth_as"], directionality=m["directionality"], envid=m["envid"],
                ret=m["ret"], body_type=m["body_type"], smtputf8=bool(m["smtputf8"]),
                in_submission=bool(m["in_submission"]), is_dsn=bool(m["is_dsn"]),
                lines_normalised=bool(m["lines_normalised"]))
            dst.submit(new).result(timeout=60)
            dst.execute("UPDATE message SET poison=?, error_count=?, delay_notified=? WHERE id=?",
                        (m["poison"], m["error_count"], m["delay_notified"], m["id"])).result(timeout=60)
            moved += 1
    finally:
        src.close()
        dst.close()
    shutil.rmtree(source, ignore_errors=True)
    return moved
