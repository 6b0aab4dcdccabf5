"""The server side of SMTP as a state machine without I/O (in the manner of h11).

Bytes go in with ``feed()``; ``next_event()`` returns what the client did
(a command, a piece of message body, the end of the body) or ``NEED_DATA``.
The caller decides policy and answers with ``reply()``, which returns the bytes
to send and moves the machine to its next state. Sequence and syntax rules
live here, so the machine answers malformed or out-of-order commands itself
with a ``BadCommand`` event that carries the reply to send.

Security properties held here:
- only ``<CRLF>.<CRLF>`` ends DATA (bare LF or CR never do: no SMTP smuggling);
  bare CR and LF inside the body are normalised to CRLF, or reported when the
  connector rejects them;
- a command line is bounded (``max_line``), the input buffer only ever holds
  one partial line, a partial terminator, or pipelined complete commands;
- after STARTTLS is accepted, everything already buffered is discarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Union

from mailgate.smtp import replies as R
from mailgate.smtp import to_crlf
from mailgate.smtp.address import (
    Address,
    AddressError,
    MailParams,
    ParamError,
    RcptParams,
    parse_domain,
    parse_mail_params,
    parse_path,
    parse_rcpt_params,
    split_path,
)
from mailgate.smtp.bodyscan import unstuff_body
from mailgate.smtp.replies import Reply

DATA_END = b"\r\n.\r\n"
_BDAT_RE = re.compile(r"^(\d{1,10})(?:\s+(LAST))?\s*$", re.I)
# A command line that isn't UTF-8: its argument can't be valid (EHLO's domain, MAIL's and RCPT's address).
_NOT_UTF8_REPLIES = {"EHLO": R.INVALID_DOMAIN, "HELO": R.INVALID_DOMAIN, "MAIL": R.INVALID_SENDER,
                     "RCPT": R.INVALID_RECIPIENT}


class State(Enum):
    CONNECTED = auto()      # greeting sent, no HELO/EHLO yet
    READY = auto()          # greeted, no transaction
    MAIL = auto()           # MAIL FROM accepted
    RCPT = auto()           # at least one RCPT accepted
    DATA = auto()           # reading a DATA body
    BDAT = auto()           # reading a BDAT chunk
    BDAT_WAIT = auto()      # between BDAT chunks (a transaction with body in progress)
    AUTH = auto()           # waiting for an AUTH response line
    TLS_PENDING = auto()    # 220 sent to STARTTLS; nothing is read until TLS is up
    CLOSED = auto()


# A message's body is arriving (or, in BDAT_WAIT, more chunks of it are due).
BODY_STATES = frozenset({State.DATA, State.BDAT, State.BDAT_WAIT})


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(slots=True)
class Hello:
    verb: str       # HELO or EHLO
    domain: str


@dataclass(slots=True)
class MailFrom:
    address: Address
    params: MailParams


@dataclass(slots=True)
class RcptTo:
    address: Address
    params: RcptParams
    raw: str


@dataclass(slots=True)
class Data:
    pass


@dataclass(slots=True)
class Bdat:
    size: int
    last: bool


@dataclass(slots=True)
class BodyChunk:
    data: bytes


@dataclass(slots=True)
class BodyEnd:
    """End of a DATA body (``.``) or of a BDAT chunk; answer it with ``reply()``."""

    last: bool = True
    bare_linefeeds: bool = False


@dataclass(slots=True)
class Simple:
    verb: str       # RSET NOOP QUIT HELP VRFY EXPN STARTTLS
    arg: str = ""


@dataclass(slots=True)
class Auth:
    mechanism: str
    initial: str | None
    exps: bool = False      # X-EXPS (Exchange Server authentication) rather than AUTH


@dataclass(slots=True)
class AuthResponse:
    line: str


@dataclass(slots=True)
class BadCommand:
    """A command the machine itself refuses; send ``reply`` (counts as a protocol error)."""

    reply: Reply
    line: str = ""


Event = Union[Hello, MailFrom, RcptTo, Data, Bdat, BodyChunk, BodyEnd, Simple, Auth, AuthResponse, BadCommand]


@dataclass(slots=True)
class Extensions:
    """What the connector offers; decides which parameters are accepted."""

    pipelining: bool = True
    eightbitmime: bool = True
    binarymime: bool = True
    chunking: bool = True
    dsn: bool = True
    smtputf8: bool = True
    enhanced_status_codes: bool = True
    starttls: bool = False
    auth: tuple[str, ...] = ()
    exps: tuple[str, ...] = ()       # X-EXPS mechanisms (Exchange Server authentication)
    require_ehlo_domain: bool = False
    reject_bare_linefeeds: bool = False


@dataclass
class ServerProtocol:
    ext: Extensions = field(default_factory=Extensions)
    max_line: int = 4096

    def __post_init__(self) -> None:
        self.state = State.CONNECTED
        self._buf = bytearray()
        self._pending: object | None = None   # the command awaiting reply()
        self._skipping_line = False            # discarding the rest of an over-long line
        self._body_started = False
        self._end_pending = False
        self._bdat_prev_state = State.CONNECTED
        self._bdat_left = 0
        self._bdat_last = False
        self._bare_lf = False
        self.esmtp = False
        self.tls = False
        self.rcpt_count = 0
        self.body_utf8 = False
        self.binary = False
        self.message_bytes = 0

    # -- input ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.state is State.TLS_PENDING or self.state is State.CLOSED:
            return  # plaintext after STARTTLS, or anything after QUIT, is discarded
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def awaiting_reply(self) -> bool:
        return self._pending is not None

    def next_event(self) -> Event | _NeedData:
        if self._pending is not None:
            raise RuntimeError("reply() to the previous command first")
        state = self.state
        if state is State.DATA:
            return self._next_data()
        if state is State.BDAT:
            return self._next_bdat()
        if state in (State.TLS_PENDING, State.CLOSED):
            return NEED_DATA
        line = self._next_line()
        if line is None:
            return NEED_DATA
        if isinstance(line, BadCommand):
            self._pending = line
            return line
        if state is State.AUTH:
            event: Event = AuthResponse(line)
        else:
            event = self._parse_command(line)
        if not isinstance(event, Bdat):  # BDAT is answered at the end of its chunk
            self._pending = event
        return event

    # -- lines -------------------------------------------------------------------------
    def _next_line(self) -> str | BadCommand | None:
        buf = self._buf
        while True:
            nl = buf.find(b"\n")
            if self._skipping_line:
                if nl < 0:
                    buf.clear()
                    return None
                del buf[: nl + 1]
                self._skipping_line = False
                continue
            if nl < 0:
                if len(buf) > self.max_line:
                    buf.clear()
                    self._skipping_line = True
                    return BadCommand(R.COMMAND_TOO_LONG)
                return None
            if nl > self.max_line:
                del buf[: nl + 1]
                return BadCommand(R.COMMAND_TOO_LONG)
            raw = bytes(buf[:nl])
            del buf[: nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:   # refused with the reply to the command's own bad argument, as Exchange does
                text = raw.decode("latin-1")
                return BadCommand(_NOT_UTF8_REPLIES.get(text.split(" ", 1)[0].upper(), R.UNRECOGNIZED_COMMAND), text)

    def _parse_command(self, line: str) -> Event:
        verb, _, arg = line.strip(" ").partition(" ")
        verb = verb.upper()
        arg = arg.strip()
        state = self.state
        if "\x00" in line:
            return BadCommand(R.UNRECOGNIZED_COMMAND, line)
        if verb in ("EHLO", "HELO"):
            if not arg:
                return BadCommand(R.EHLO_NEEDS_DOMAIN if verb == "EHLO" else R.INVALID_DOMAIN, line)
            domain = arg.split()[0]
            if self.ext.require_ehlo_domain:
                try:
                    parse_domain(domain)
                except ValueError:
                    return BadCommand(R.INVALID_DOMAIN, line)
            return Hello(verb, domain)
        if verb in ("RSET", "NOOP", "QUIT", "HELP", "VRFY", "EXPN"):
            if verb in ("RSET", "QUIT") and arg:
                return BadCommand(R.INVALID_ARGUMENTS, line)
            return Simple(verb, arg)
        if verb == "STARTTLS":
            if arg:
                return BadCommand(R.INVALID_ARGUMENTS, line)
            if self.tls:
                return BadCommand(R.ONE_STARTTLS, line)
            if not self.ext.starttls:
                return BadCommand(R.UNRECOGNIZED_COMMAND, line)
            if state in (State.MAIL, State.RCPT, State.BDAT_WAIT):
                return BadCommand(R.BAD_SEQUENCE, line)
            return Simple("STARTTLS")
        if verb == "AUTH" or (verb == "X-EXPS" and self.ext.exps):
            if state is State.CONNECTED:
                return BadCommand(R.SEND_HELLO_FIRST, line)
            if state is not State.READY:
                return BadCommand(R.BAD_SEQUENCE, line)
            parts = arg.split()
            if not parts or len(parts) > 2:
                return BadCommand(R.INVALID_ARGUMENTS, line)
            return Auth(parts[0].upper(), parts[1] if len(parts) > 1 else None, exps=verb == "X-EXPS")
        if verb == "MAIL":
            return self._parse_mail(arg, line)
        if verb == "RCPT":
            return self._parse_rcpt(arg, line)
        if verb == "DATA":
            if arg:
                return BadCommand(R.INVALID_ARGUMENTS, line)
            if state is State.CONNECTED:
                return BadCommand(R.SEND_HELLO_FIRST, line)
            if state in (State.READY,):
                return BadCommand(R.NEED_MAIL, line)
            if state is State.MAIL:
                return BadCommand(R.NEED_RCPT, line)
            if state is State.BDAT_WAIT or self.binary:
                return BadCommand(R.BAD_SEQUENCE if state is State.BDAT_WAIT else R.BINARY_NEEDS_BDAT, line)
            return Data()
        if verb == "BDAT":
            if not self.ext.chunking:
                return BadCommand(R.UNRECOGNIZED_COMMAND, line)
            m = _BDAT_RE.match(arg)
            if not m:
                return BadCommand(R.INVALID_ARGUMENTS, line)
            size, last = int(m.group(1)), bool(m.group(2))
            # The chunk must be read whatever the reply, so the machine enters BDAT right away.
            self._start_bdat(size, last)
            return Bdat(size, last)
        return BadCommand(R.UNRECOGNIZED_COMMAND, line)

    def _parse_mail(self, arg: str, line: str) -> Event:
        if self.state is State.CONNECTED:
            return BadCommand(R.SEND_HELLO_FIRST, line)
        if self.state in (State.MAIL, State.RCPT, State.BDAT_WAIT):
            return BadCommand(R.SENDER_ALREADY, line)
        if not arg.upper().startswith("FROM:"):
            return BadCommand(R.INVALID_ARGUMENTS, line)
        try:
            path, rest = split_path(arg[5:])
            params = parse_mail_params(rest, eightbit=self.ext.eightbitmime, binary=self.ext.binarymime and self.ext.chunking,
                                       smtputf8=self.ext.smtputf8, dsn=self.ext.dsn) if rest else MailParams()
        except ParamError:
            return BadCommand(R.UNRECOGNIZED_PARAMETER, line)
        except AddressError:
            return BadCommand(R.INVALID_SENDER, line)
        try:
            address = parse_path(path, utf8=params.smtputf8, allow_null=True)
        except (AddressError, ValueError):
            if not params.smtputf8 and not path.isascii():
                return BadCommand(R.UTF8_NEEDS_SMTPUTF8, line)
            return BadCommand(R.INVALID_SENDER, line)
        return MailFrom(address, params)

    def _parse_rcpt(self, arg: str, line: str) -> Event:
        if self.state is State.CONNECTED:
            return BadCommand(R.SEND_HELLO_FIRST, line)
        if self.state in (State.READY,):
            return BadCommand(R.NEED_MAIL, line)
        if self.state is State.BDAT_WAIT:
            return BadCommand(R.BAD_SEQUENCE, line)
        if not arg.upper().startswith("TO:"):
            return BadCommand(R.INVALID_ARGUMENTS, line)
        try:
            path, rest = split_path(arg[3:])
            params = parse_rcpt_params(rest, dsn=self.ext.dsn) if rest else RcptParams()
        except ParamError:
            return BadCommand(R.UNRECOGNIZED_PARAMETER, line)
        except AddressError:
            return BadCommand(R.INVALID_RECIPIENT, line)
        try:
            address = parse_path(path, utf8=self.body_utf8, allow_null=False, allow_unqualified=True)
        except (AddressError, ValueError):
            if not self.body_utf8 and not path.isascii():
                return BadCommand(R.UTF8_NEEDS_SMTPUTF8, line)
            return BadCommand(R.INVALID_RECIPIENT, line)
        return RcptTo(address, params, path)

    # -- bodies ---------------------------------------------------------------------------
    def _next_data(self) -> Event | _NeedData:
        buf = self._buf
        if self._end_pending:
            self._end_pending = False
            return self._end_data()
        if not self._body_started:
            # The CRLF that ended the DATA line counts as the start of the terminator.
            if buf[:3] == b".\r\n":
                del buf[:3]
                return self._end_data()
            if len(buf) < 3 and b".\r\n".startswith(bytes(buf)):
                return NEED_DATA
            self._body_started = True
            if buf[:1] == b".":
                del buf[:1]  # dot-unstuffing of the first line
        idx = buf.find(DATA_END)
        if idx >= 0:
            chunk = bytes(buf[: idx + 2])
            del buf[: idx + 5]
            if chunk:
                self._end_pending = True
                return self._chunk(chunk)
            return self._end_data()
        keep = _partial_terminator(buf)
        emit = len(buf) - keep
        if emit <= 0:
            return NEED_DATA
        chunk = bytes(buf[:emit])
        del buf[:emit]
        return self._chunk(chunk)

    def _chunk(self, raw: bytes) -> BodyChunk:
        data, bare = unstuff_body(raw)
        if bare:
            self._bare_lf = True
            if not self.ext.reject_bare_linefeeds:
                data = to_crlf(data)
        self.message_bytes += len(data)
        return BodyChunk(data)

    def _end_data(self) -> BodyEnd:
        end = BodyEnd(last=True, bare_linefeeds=self._bare_lf)
        self._pending = end
        return end

    def _start_bdat(self, size: int, last: bool) -> None:
        self._bdat_left = size
        self._bdat_last = last
        self._bdat_prev_state = self.state
        self.state = State.BDAT

    def _next_bdat(self) -> Event | _NeedData:
        if self._bdat_left > 0:
            if not self._buf:
                return NEED_DATA
            n = min(self._bdat_left, len(self._buf))
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._bdat_left -= n
            self.message_bytes += n
            return BodyChunk(data)
        prev = self._bdat_prev_state
        if prev not in (State.RCPT, State.BDAT_WAIT):
            error = {State.CONNECTED: R.SEND_HELLO_FIRST, State.READY: R.NEED_MAIL, State.MAIL: R.NEED_RCPT}
            bad = BadCommand(error.get(prev, R.BAD_SEQUENCE), "BDAT")
            self._pending = bad
            return bad
        end = BodyEnd(last=self._bdat_last)
        self._pending = end
        return end

    # -- replies ---------------------------------------------------------------------------------
    def reply(self, reply: Reply) -> bytes:
        """Answer the pending command; returns the bytes to send."""
        event = self._pending
        if event is None:
            # Unsolicited replies (timeouts, shutdown) end the session.
            if reply.code == 421:
                self.state = State.CLOSED
            return reply.encode(self.ext.enhanced_status_codes)
        self._pending = None
        ok = reply.is_positive
        state = self.state
        if isinstance(event, Hello):
            if ok:
                self._reset_transaction()
                self.state = State.READY
                self.esmtp = event.verb == "EHLO"
        elif isinstance(event, MailFrom):
            if ok:
                self.state = State.MAIL
                self.rcpt_count = 0
                self.body_utf8 = event.params.smtputf8
                self.binary = event.params.body == "BINARYMIME"
                self.message_bytes = 0
        elif isinstance(event, RcptTo):
            if ok:
                self.state = State.RCPT
                self.rcpt_count += 1
        elif isinstance(event, Data):
            if reply.code == 354:
                self.state = State.DATA
                self._body_started = False
                self._bare_lf = False
                self.message_bytes = 0
        elif isinstance(event, BadCommand):
            if state is State.BDAT:  # a BDAT out of sequence: its chunk was read, the state stays
                self.state = self._bdat_prev_state
        elif isinstance(event, BodyEnd):
            if state is State.DATA:
                self._reset_transaction()
                self.state = State.READY
            elif state is State.BDAT:
                if event.last or not ok:
                    self._reset_transaction()
                    self.state = State.READY
                else:
                    self.state = State.BDAT_WAIT
        elif isinstance(event, Simple):
            verb = event.verb
            if verb == "RSET" and ok:
                self._reset_transaction()
                if state is not State.CONNECTED:
                    self.state = State.READY
            elif verb == "QUIT":
                self.state = State.CLOSED
            elif verb == "STARTTLS" and reply.code == 220:
                self._buf.clear()  # no plaintext command survives into the TLS session
                self.state = State.TLS_PENDING
        elif isinstance(event, Auth):
            if reply.code == 334:
                self.state = State.AUTH
        elif isinstance(event, AuthResponse):
            if reply.code == 334:
                self.state = State.AUTH
            else:
                self.state = State.READY
        if reply.code == 421:
            self.state = State.CLOSED
        return reply.encode(self.ext.enhanced_status_codes)

    def _reset_transaction(self) -> None:
        self._end_pending = False
        self.rcpt_count = 0
        self.body_utf8 = False
        self.binary = False
        self._body_started = False
        self._bare_lf = False
        self.message_bytes = 0

    def tls_started(self) -> None:
        """TLS is up after STARTTLS: back to the initial state (EHLO again, RFC 3207)."""
        self.tls = True
        self._buf.clear()
        self._reset_transaction()
        self.state = State.CONNECTED
        self.esmtp = False

    @property
    def in_transaction(self) -> bool:
        return self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT, State.BDAT_WAIT)


def _partial_terminator(buf: bytearray) -> int:
    """Length of the longest suffix of ``buf`` that could begin ``<CRLF>.<CRLF>``."""
    tail = bytes(buf[-4:])
    for n in (4, 3, 2, 1):
        if len(tail) >= n and DATA_END.startswith(tail[-n:]):
            return n
    return 0
