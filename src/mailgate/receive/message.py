"""Assembling a received message while it streams in: the header block is
collected (bounded by MaxHeaderSize), filtered and stamped; the body is kept in
memory up to ``SPILL_BYTES`` and streamed to a spool file beyond that, so a
session's memory stays bounded whatever the client sends.

All sessions of a process share one budget for content held in memory
(``MEMORY_BUDGET``): past it, a message still arriving goes to a spool file at
once, and a header block that keeps growing is refused with 452 4.3.1 — so
thousands of clients sending large messages slowly cost disk, not memory."""

from __future__ import annotations

import os
from typing import Callable

from mailgate.queue.store import INLINE_BYTES, SPILL_BYTES, BodyRef, QueueStore
from mailgate.receive.headers import HeaderBlock
from mailgate.smtp import replies as R
from mailgate.smtp.replies import Reply

HEADER_END = b"\r\n\r\n"
MEMORY_BUDGET = 64 * 1024 * 1024        # content held in memory by all sessions of this process
MIN_SPILL_BYTES = INLINE_BYTES          # over budget, a body spills once it is larger than a queue row holds
HEADERS_UNDER_PRESSURE = 64 * 1024      # over budget, a header block may grow this far, not to MaxHeaderSize


class _HeldInMemory:
    """Bytes of message content that this process's sessions hold in memory."""

    total = 0


def memory_held() -> int:
    return _HeldInMemory.total


class IncomingMessage:
    def __init__(self, store: QueueStore, *, max_size: int | None, max_header: int,
                 on_headers: Callable[[HeaderBlock], bytes]) -> None:
        self.store = store
        self.max_size = max_size
        self.max_header = max_header
        self.on_headers = on_headers        # filters the block in place, returns the header lines to prepend
        self.received = 0                   # bytes the client sent (the size limits apply to these)
        self.error: Reply | None = None
        self.headers: HeaderBlock | None = None
        self._head = bytearray()
        self._parts: list[bytes] = []
        self._buffered = 0
        self._spool_path: str | None = None
        self._spool_fd = -1
        self.stored_size = 0

    def add(self, data: bytes) -> None:
        self.received += len(data)
        if self.error is not None:
            return
        if self.max_size is not None and self.received > self.max_size:
            self._fail(R.MESSAGE_TOO_BIG)
            return
        if self.headers is None:
            start = max(0, len(self._head) - 3)
            self._head += data
            _HeldInMemory.total += len(data)
            if self._head.startswith(b"\r\n"):
                end, skip = 0, 2      # no header fields at all
            else:
                end = self._head.find(HEADER_END, start)
                skip = 4
            if end < 0:
                if len(self._head) > self.max_header:
                    self._fail(R.HEADER_TOO_BIG)
                elif len(self._head) > HEADERS_UNDER_PRESSURE and _HeldInMemory.total > MEMORY_BUDGET:
                    self._fail(R.INSUFFICIENT_RESOURCES)
                return
            if end > self.max_header:
                self._fail(R.HEADER_TOO_BIG)
                return
            self._headers_done(bytes(self._head[:end + 2]) if end else b"", bytes(self._head[end + skip:]))
            return
        self._out(data)

    def _headers_done(self, head: bytes, rest: bytes) -> None:
        block = HeaderBlock.parse(head)
        self.headers = block
        prefix = self.on_headers(block)
        self._release_head()
        self._out(prefix + block.encode() + b"\r\n")
        if rest:
            self._out(rest)

    def _out(self, data: bytes) -> None:
        self.stored_size += len(data)
        if self._spool_fd >= 0:
            _write_all(self._spool_fd, data)
            return
        self._parts.append(data)
        self._buffered += len(data)
        _HeldInMemory.total += len(data)
        if self._buffered > SPILL_BYTES or (self._buffered > MIN_SPILL_BYTES and _HeldInMemory.total > MEMORY_BUDGET):
            self._spool_path, self._spool_fd = self.store.new_spool_file()
            for part in self._parts:
                _write_all(self._spool_fd, part)
            self._release_parts()

    def _release_head(self) -> None:
        _HeldInMemory.total -= len(self._head)
        self._head = bytearray()

    def _release_parts(self) -> list[bytes]:
        parts = self._parts
        _HeldInMemory.total -= self._buffered
        self._parts, self._buffered = [], 0
        return parts

    def _fail(self, reply: Reply) -> None:
        self.error = reply
        self._release_head()
        self._release_parts()
        self._close_spool(remove=True)

    def finish(self) -> BodyRef:
        """Store the body (segment append or the spool file); durable after the store's next commit."""
        if self.headers is None:
            # The message ended inside the header block (no blank line): all of it is headers.
            head = bytes(self._head)
            if head and not head.endswith(b"\r\n"):
                head += b"\r\n"
            self._release_head()
            self._headers_done(head, b"")
        if self._spool_fd >= 0:
            path = self._spool_path
            self._close_spool(remove=False)
            return BodyRef(None, 0, self.stored_size, path)
        return self.store.append_body(self._release_parts())

    def abandon(self) -> None:
        self._release_head()
        self._release_parts()
        self._close_spool(remove=True)

    def _close_spool(self, *, remove: bool) -> None:
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1
            if remove and self._spool_path:
                try:
                    os.unlink(self._spool_path)
                except FileNotFoundError:
                    pass
            if remove:
                self._spool_path = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
