"""The Pickup and Replay directories, as Exchange's transport service has them: a program or an administrator
drops a message file (``*.eml``) in, and the server submits it.

- Pickup: the envelope comes from the headers, as Exchange reads a pickup file: the sender from ``Sender:``
  (else ``From:``), the recipients from ``To:``, ``Cc:`` and ``Bcc:`` (``Bcc:`` is removed from the message).
  Limits: ``PickupDirectoryMaxHeaderSize``, ``PickupDirectoryMaxRecipientsPerMessage``.
- Replay: the file starts with ``X-Sender:`` and ``X-Receiver:`` lines, the envelope, as ``Export-Message``
  writes them; they are removed and the rest goes on unchanged (a message exported from one server's queue
  is replayed on another).

Both are read at most ``PickupDirectoryMaxMessagesPerMinute`` files a minute. A file is claimed by renaming
it to ``.tmp``, submitted, and deleted once the queue has it (durable); one that can't be submitted as it is
becomes ``.bad`` and is tracked as BADMAIL. After a crash the ``.tmp`` files are read again: a message may then
go twice, never be lost. Only worker 0 reads the directories (a rename is atomic, but one reader keeps the
per-minute limit the server's).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from mailgate.errors import UserError
from mailgate.receive.headers import HeaderBlock
from mailgate.smtp import to_crlf
from mailgate.smtp.address import AddressError, parse_mailbox

log = logging.getLogger("mailgate.pickup")

POLL_SECONDS = 5.0   # as Exchange's pickup polling interval
# A file changed this recently may still be being written (a program that writes in place, not by rename):
# it waits for the next scan.
SETTLE_SECONDS = 1.0


class BadMessage(Exception):
    """A file that isn't a message this directory can submit; the reason is said in the BADMAIL event."""


@dataclass
class Envelope:
    sender: str
    recipients: list[str]
    body: bytes


@dataclass
class DirectorySettings:
    pickup: Path | None
    replay: Path | None
    per_minute: int
    max_header_size: int
    max_recipients: int
    max_size: int | None = None   # the organisation's MaxSendSize: a larger file is refused, not read


def _address(text: str, what: str) -> str:
    try:
        return str(parse_mailbox(text.strip().strip("<>").strip(), utf8=True))
    except (AddressError, ValueError):
        raise BadMessage(f"{what} {text.strip()[:100]!r} isn't an address") from None


def pickup_envelope(data: bytes, *, max_header_size: int, max_recipients: int) -> Envelope:
    """The envelope of a Pickup file and the message to submit (without ``Bcc:``)."""
    data = to_crlf(data)
    end = data.find(b"\r\n\r\n")
    head, rest = (data, b"") if end < 0 else (data[: end + 2], data[end + 2:])
    if len(head) > max_header_size:
        raise BadMessage(f"the header is larger than PickupDirectoryMaxHeaderSize ({max_header_size} bytes)")
    block = HeaderBlock.parse(head)
    if block.malformed:
        raise BadMessage("the header isn't a header block (RFC 5322)")
    sender_field = block.get("Sender") or block.get("From")
    if not sender_field:
        raise BadMessage("it has no From: or Sender: header")
    senders = [a for _, a in email.utils.getaddresses([sender_field]) if a]
    if not senders:
        raise BadMessage(f"the sender {sender_field[:100]!r} isn't an address")
    sender = _address(senders[0], "the sender")
    fields = [value for name in ("To", "Cc", "Bcc") for value in block.get_all(name)]
    recipients = list(dict.fromkeys(_address(a, "the recipient") for _, a in email.utils.getaddresses(fields) if a))
    if not recipients:
        raise BadMessage("it has no recipient in To:, Cc: or Bcc:")
    if len(recipients) > max_recipients:
        raise BadMessage(f"it has {len(recipients)} recipients, more than PickupDirectoryMaxRecipientsPerMessage "
                         f"({max_recipients})")
    kept = [raw for name, raw in block.fields if name != b"bcc"]
    # As Exchange completes a pickup file: the fields a program may leave out.
    if block.get("Date") is None:
        kept.append(f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode())
    if block.get("Message-ID") is None:
        kept.append(f"Message-ID: {email.utils.make_msgid(domain=sender.rpartition('@')[2] or None)}\r\n".encode())
    return Envelope(sender, recipients, b"".join(kept) + (rest or b"\r\n"))


_ENVELOPE_FIELDS = ("x-sender", "x-receiver")
_END_OF_INJECTED = "x-endofinjectedxheaders"


def replay_envelope(data: bytes) -> Envelope:
    """The envelope of a Replay file and the message after it. The file starts with X-Sender: and X-Receiver:
    lines (parameters may follow the address); Exchange's exports put more X- lines with them, up to and with
    X-EndOfInjectedXHeaders:. The envelope lines go; the rest is the message, unchanged."""
    data = to_crlf(data)
    lines: list[tuple[str, str, int]] = []   # (lower-case name, value, end of the line)
    position = 0
    while (end := data.find(b"\r\n", position)) > position:
        name, colon, value = data[position:end].decode("utf-8", "replace").partition(":")
        if not colon:
            break
        lines.append((name.strip().lower(), value.strip(), end + 2))
        position = end + 2
    marker = next((i for i, line in enumerate(lines) if line[0] == _END_OF_INJECTED), None)
    if marker is not None:
        injected = lines[: marker + 1]
    else:
        injected = []
        for line in lines:
            if line[0] not in _ENVELOPE_FIELDS:
                break
            injected.append(line)
    sender: str | None = None
    recipients: list[str] = []
    for name, value, _ in injected:
        address = value.split(None, 1)[0] if value else ""
        if name == "x-sender":
            sender = "" if address == "<>" else _address(address, "X-Sender")
        elif name == "x-receiver":
            recipients.append(_address(address, "X-Receiver"))
    if sender is None or not recipients:
        raise BadMessage("a Replay file starts with X-Sender: and X-Receiver: lines (the envelope)")
    return Envelope(sender, list(dict.fromkeys(recipients)), data[injected[-1][2]:])


Submit = Callable[[str, list[str], bytes, str], Awaitable[Any]]
Track = Callable[[str, str], None]


def _unused(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix``, or, when a file already has that name, with the time added (as Exchange names
    a second .tmp): a rename never replaces another file."""
    target = path.with_suffix(suffix)
    if target.exists():
        target = path.with_name(f"{path.stem}{time.strftime('%Y%m%d%H%M%S')}{time.time_ns() % 10**9}{suffix}")
    return target


class PickupReader:
    """Reads the Pickup and Replay directories of this server while it runs."""

    def __init__(self, settings: Callable[[], DirectorySettings], submit: Submit, bad: Track) -> None:
        self.settings = settings
        self.submit = submit
        self.bad = bad
        self._window_start = 0.0
        self._taken = 0
        self._prepared: set[Path] = set()
        self._last_problem = ""

    def _prepare(self, directory: Path) -> None:
        """Create the directory, and put back the files a crash left claimed (.tmp)."""
        if directory in self._prepared:
            return
        directory.mkdir(parents=True, exist_ok=True)
        for claimed in directory.glob("*.tmp"):
            claimed.rename(_unused(claimed, ".eml"))
        self._prepared.add(directory)

    def _allowance(self, per_minute: int) -> int:
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._taken = now, 0
        return max(0, per_minute - self._taken)

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self.scan()
                self._last_problem = ""
            except OSError as exc:   # a directory that can't be made or read: said once, tried again each scan
                problem = f"the Pickup/Replay directories can't be read: {exc}"
                if problem != self._last_problem:
                    log.warning("%s", problem)
                self._last_problem = problem
            except Exception:  # noqa: BLE001 - a bug: logged, and the directories are read again next time
                log.exception("reading the Pickup/Replay directories failed")
            try:
                await asyncio.wait_for(stopping.wait(), POLL_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def scan(self) -> int:
        """Submit what the directories hold, within the per-minute limit; the number of files taken."""
        settings = self.settings()
        taken = 0
        for directory, replay in ((settings.pickup, False), (settings.replay, True)):
            if directory is None:
                continue
            self._prepare(directory)
            now = time.time()
            files = []
            for path in directory.glob("*.eml"):
                try:
                    files.append((path.stat().st_mtime, path))
                except FileNotFoundError:   # taken away meanwhile
                    continue
            for mtime, path in sorted(files):
                if now - mtime < SETTLE_SECONDS:
                    continue
                if self._allowance(settings.per_minute) <= 0:
                    return taken
                claimed = _unused(path, ".tmp")
                try:
                    path.rename(claimed)
                except FileNotFoundError:
                    continue
                self._taken += 1
                taken += 1
                if not await self._take(claimed, replay, settings):
                    return taken   # the queue can't take mail now: the rest waits too
        return taken

    async def _take(self, claimed: Path, replay: bool, settings: DirectorySettings) -> bool:
        """Submit one claimed file; False when the queue can't take mail now (the file is put back)."""
        source = "Replay" if replay else "Pickup"
        try:
            size = claimed.stat().st_size
            if settings.max_size is not None and size > settings.max_size:
                raise BadMessage(f"it is {size} bytes, larger than the organisation's MaxSendSize "
                                 f"({settings.max_size} bytes)")
            data = await asyncio.to_thread(claimed.read_bytes)
            envelope = replay_envelope(data) if replay else pickup_envelope(
                data, max_header_size=settings.max_header_size, max_recipients=settings.max_recipients)
        except BadMessage as exc:
            bad = _unused(claimed, ".bad")
            claimed.rename(bad)
            self.bad(f"{source} file {claimed.with_suffix('.eml').name}: {exc}", str(bad))
            return True
        except OSError:   # can't be read (its permissions): left for the next scan, as Exchange does
            claimed.rename(_unused(claimed, ".eml"))
            raise
        try:
            await self.submit(envelope.sender, envelope.recipients, envelope.body, source)
        except UserError as exc:   # the queue can't take it now (a full disk): the file waits for the next scan
            log.warning("%s file %s waits: %s", source, claimed.with_suffix(".eml").name, exc.message)
            claimed.rename(_unused(claimed, ".eml"))
            return False
        os.unlink(claimed)
        return True
