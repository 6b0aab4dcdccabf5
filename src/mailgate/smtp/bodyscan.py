"""The per-byte work on message content: compiled (``_speedups.c``) where it could be built, else these
pure-Python twins, which give the same results (``tests/unit/test_bodyscan.py`` runs both on the same input).

On a 50 KB message the Python twins make several passes over the bytes (a replace and three counts); the C
functions make one or two memchr passes (bench/README.md, sixth round)."""

from __future__ import annotations


def unstuff_body_py(chunk: bytes) -> tuple[bytes, bool]:
    """A chunk of DATA as the receiving state machine cuts it (never ending inside a CRLF): the leading dot of every
    line after a CRLF removed (RFC 5321 4.5.2), and whether any CR or LF stands outside a CRLF pair."""
    data = chunk.replace(b"\r\n.", b"\r\n")
    lf = data.count(b"\n")
    return data, lf != data.count(b"\r\n") or data.count(b"\r") != lf


def stuff_body_py(content: bytes) -> bytes:
    """Content whose lines end in CRLF as a DATA body: every dot that follows a LF doubled (RFC 5321 4.5.2)."""
    return content.replace(b"\n.", b"\n..")


try:
    from mailgate.smtp._speedups import stuff_body, unstuff_body
    COMPILED = True
except ImportError:   # not built on this machine (setup.py makes it optional)
    stuff_body, unstuff_body = stuff_body_py, unstuff_body_py
    COMPILED = False
