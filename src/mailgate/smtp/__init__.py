"""SMTP without I/O: the server and client state machines, addresses, replies."""

import re

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


def to_crlf(data: bytes) -> bytes:
    """Every line ending (CRLF, bare CR, bare LF) as CRLF: the one rule for making content SMTP's."""
    return _LINE_ENDINGS.sub(b"\r\n", data)
