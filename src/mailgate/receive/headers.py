"""The header block of a received message: parsed once, filtered by the header
firewall, and read for the values tracking needs (Subject, Message-ID)."""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass, field

from mailgate.receive.rights import Right

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_RECEIVED_BY = re.compile(rb"\bby\s+([A-Za-z0-9.\-]+)", re.IGNORECASE)


@dataclass
class HeaderBlock:
    fields: list[tuple[bytes, bytes]] = field(default_factory=list)   # (lower-case name, raw field incl. CRLF)
    malformed: bool = False

    @classmethod
    def parse(cls, data: bytes) -> "HeaderBlock":
        """Split a header block (without the blank line) into fields, keeping folded lines with their field."""
        block = cls()
        for line in data.split(b"\r\n"):
            if not line:
                continue
            if line[:1] in (b" ", b"\t") and block.fields:
                name, raw = block.fields[-1]
                block.fields[-1] = (name, raw + line + b"\r\n")
                continue
            m = _FIELD_NAME.match(line)
            if m is None:
                block.malformed = True
                name = b""
            else:
                name = m.group(1).lower()
            block.fields.append((name, line + b"\r\n"))
        return block

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every field of that name, unfolded, in order."""
        key = name.lower().encode()
        return [re.sub(rb"\r\n[ \t]+", b" ", raw.split(b":", 1)[1]).strip().decode("utf-8", "replace")
                for n, raw in self.fields if n == key]

    def received_by(self) -> list[str]:
        """The host after "by" in each Received header (lower case; "" where there is none)."""
        hosts = []
        for n, raw in self.fields:
            if n == b"received":
                m = _RECEIVED_BY.search(raw)
                hosts.append(m.group(1).decode("ascii", "replace").lower().rstrip(".") if m else "")
        return hosts

    def count(self, name: str) -> int:
        key = name.lower().encode()
        return sum(1 for n, _ in self.fields if n == key)

    def strip(self, rights: Right) -> int:
        """Remove headers the client may not set (Exchange's header firewall); returns how many."""
        keep = []
        removed = 0
        for name, raw in self.fields:
            if name.startswith(b"x-ms-exchange-organization-") and Right.AcceptOrganizationHeaders not in rights:
                removed += 1
            elif name.startswith(b"x-ms-exchange-forest-") and Right.AcceptForestHeaders not in rights:
                removed += 1
            elif name.startswith(b"x-source") and Right.AcceptOrganizationHeaders not in rights:
                removed += 1  # our audit headers: only this server writes them
            elif (name == b"received" or name.startswith(b"resent-")) and Right.AcceptRoutingHeaders not in rights:
                removed += 1
            else:
                keep.append((name, raw))
        self.fields = keep
        return removed

    def encode(self) -> bytes:
        return b"".join(raw for _, raw in self.fields)


# Organisation and forest headers in a header block: a field and its folded lines (the outbound header firewall).
_ORGANISATION_FIELDS = re.compile(rb"^x-ms-exchange-(?:organization|forest)-[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                                  re.IGNORECASE | re.MULTILINE)


def without_organisation_headers(head: bytes) -> bytes:
    """The header block ``head`` (CRLF line endings) without X-MS-Exchange-Organization-* and -Forest-* fields,
    which Exchange sends only over connectors to its own servers (ms-Exch-Send-Headers-Organization/-Forest)."""
    return _ORGANISATION_FIELDS.sub(b"", head)


def message_id_of(block: HeaderBlock) -> str | None:
    value = block.get("Message-ID")
    if not value:
        return None
    m = re.search(r"<[^<>\s]+>", value)
    return m.group(0) if m else value.strip()


_date_cache: tuple[int, str] = (0, "")


def rfc5322_date() -> str:
    """The current date for trace headers (formatted once a second: it is on every message)."""
    global _date_cache
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


def fold(name: str, value: str) -> bytes:
    """A header field, folded at spaces to stay under 78 characters per line where possible."""
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line.encode("utf-8") + b"\r\n"
    out, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > 78:
            out.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n".join(out).encode("utf-8") + b"\r\n"
