"""SMTP replies: code, enhanced status code (RFC 3463) and text.

The texts are Exchange's (reference §10.3), so clients and administrators
see what they would see from Exchange.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return self.text if isinstance(self.text, tuple) else (self.text,)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def encode(self, enhanced: bool = True) -> bytes:
        if isinstance(self.text, str):   # one line: most replies, one per command
            prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
            return f"{self.code} {prefix}{self.text}\r\n".encode("utf-8", "replace")
        lines = self.lines
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            prefix = f"{self.enhanced} " if enhanced and self.enhanced and i == 0 else ""
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        first = self.lines[0]
        enh = f"{self.enhanced} " if self.enhanced else ""
        return f"{self.code} {enh}{first}" + ("" if len(self.lines) == 1 else " " + " ".join(self.lines[1:]))

    def with_text(self, text: str) -> "Reply":
        return Reply(self.code, self.enhanced, text)


def parse_enhanced(text: str) -> tuple[str | None, str]:
    """Split ``"2.1.0 Sender OK"`` into ("2.1.0", "Sender OK")."""
    head, _, rest = text.partition(" ")
    parts = head.split(".")
    if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() and len(p) <= 3 for p in parts[1:]):
        return head, rest
    return None, text


R = Reply

# Greeting and session flow
SERVICE_READY = "Microsoft ESMTP MAIL Service ready at {date}"
SENDER_OK = R(250, "2.1.0", "Sender OK")
RECIPIENT_OK = R(250, "2.1.5", "Recipient OK")
START_MAIL_INPUT = R(354, None, "Start mail input; end with <CRLF>.<CRLF>")
RESETTING = R(250, "2.0.0", "Resetting")
OK = R(250, "2.0.0", "OK")
CANNOT_VRFY = R(252, "2.1.5", "Cannot VRFY user")
CLOSING = R(221, "2.0.0", "Service closing transmission channel")
HELP = R(214, None, ("This server supports the following commands:", "HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT"))

# TLS and AUTH
TLS_READY = R(220, "2.0.0", "SMTP server ready")
ONE_STARTTLS = R(503, "5.5.2", "Only one STARTTLS command can be issued per session")
TLS_UNAVAILABLE = R(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_OK = R(235, "2.7.0", "Authentication successful")
AUTH_USERNAME = R(334, None, "VXNlcm5hbWU6")
AUTH_PASSWORD = R(334, None, "UGFzc3dvcmQ6")
AUTH_CONTINUE = R(334, None, "")
AUTH_FAILED = R(535, "5.7.3", "Authentication unsuccessful")
AUTH_UNRECOGNIZED = R(504, "5.7.4", "Unrecognized authentication type")
EXPS_FAILED = R(535, "5.7.3", "Cannot achieve Exchange Server authentication")
AUTH_REQUIRES_TLS = R(451, "5.7.3", "Require STARTTLS to authenticate")
AUTH_TEMPFAIL = R(454, "4.7.0", "Temporary authentication failure")
AUTH_ALREADY = R(503, "5.5.2", "Already authenticated")
AUTH_CANCELLED = R(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = R(501, "5.5.2", "Cannot decode response")
TOO_MANY_LOGON_FAILURES = R(421, "4.7.0", "Too many failed logon attempts, closing transmission channel")

# Sequence and syntax
SEND_HELLO_FIRST = R(503, "5.5.2", "Send hello first")
NEED_MAIL = R(503, "5.5.2", "Need mail command")
NEED_RCPT = R(503, "5.5.2", "Need rcpt command")
SENDER_ALREADY = R(503, "5.5.2", "Sender already specified")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands")
INVALID_DOMAIN = R(501, "5.5.4", "Invalid domain name")
EHLO_NEEDS_DOMAIN = R(501, "5.0.0", "EHLO requires domain address")
INVALID_ARGUMENTS = R(501, "5.5.4", "Invalid arguments")
UNRECOGNIZED_PARAMETER = R(501, "5.5.4", "Unrecognized parameter")
COMMAND_TOO_LONG = R(500, "5.5.2", "Command too long")
UNRECOGNIZED_COMMAND = R(500, "5.3.3", "Unrecognized command")
NOT_IMPLEMENTED = R(502, "5.3.3", "Command not implemented")
INVALID_SENDER = R(501, "5.1.7", "Invalid address")
INVALID_RECIPIENT = R(501, "5.1.3", "Invalid address")
UTF8_NEEDS_SMTPUTF8 = R(553, "5.6.7", "Address contains non-ASCII characters; use the SMTPUTF8 parameter")

# Policy and limits
NOT_AUTHENTICATED = R(530, "5.7.1", "Client was not authenticated")
NO_SUBMIT_PERMISSION = R(550, "5.7.1", "Client does not have permissions to submit to this server")
NO_SEND_AS_PERMISSION = R(550, "5.7.1", "Client does not have permissions to send as this sender")
RELAY_DENIED = R(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain")
RECIPIENT_NOT_FOUND = R(550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup")
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = R(552, "5.3.4", "Header size exceeds fixed maximum size")
BARE_LINEFEEDS = R(554, "5.6.0", "Invalid message content, contains bare linefeeds")
HOP_COUNT_EXCEEDED = R(554, "5.4.6", "Hop count exceeded - possible mail loop")
MUST_STARTTLS = R(530, "5.7.0", "Must issue a STARTTLS command first")
CONCURRENT_CONNECTIONS = R(421, "4.3.2", "The maximum number of concurrent server connections has exceeded a limit, closing transmission channel")
CONCURRENT_PER_SOURCE = R(421, "4.3.2", "The maximum number of concurrent connections has exceeded a limit, closing transmission channel")
RATE_EXCEEDED = R(421, "4.4.2", "Message submission rate for this client has exceeded the configured limit")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors on this connection, closing transmission channel")
TIMEOUT = R(451, "4.7.0", "Timeout waiting for client input")
CONNECTION_TIMEOUT = R(421, "4.4.1", "Connection timed out")
SERVICE_NOT_AVAILABLE = R(421, "4.3.2", "Service not available")
INSUFFICIENT_RESOURCES = R(452, "4.3.1", "Insufficient system resources")
LOCAL_ERROR = R(451, "4.3.0", "Requested action aborted: local error in processing")
DOMAIN_SECURE_REQUIRED = R(451, "4.7.3", "The admin has temporarily disallowed this secure domain")
BINARY_NEEDS_BDAT = R(503, "5.5.1", "BODY=BINARYMIME requires BDAT")
CHUNK_OK = "CHUNK received OK, {n} octets"
QUEUED = "{message_id} [InternalId={internal_id}, Hostname={host}] Queued mail for delivery"
