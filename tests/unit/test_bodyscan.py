"""The compiled per-byte functions (smtp/_speedups.c) give what their pure-Python twins give, on any input."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mailgate.smtp import bodyscan

# Content made of the bytes that matter (line endings, dots) among ordinary text, cut anywhere.
pieces = st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.", b"\r\n..", b"text", b" ", b"\x00"]),
                  max_size=60).map(b"".join)


def compiled():
    if not bodyscan.COMPILED:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("smtp/_speedups.c was not built (pip install -e . builds it; gcc and Python's headers needed)")
        pytest.skip("smtp/_speedups.c is not built here")
    from mailgate.smtp import _speedups
    return _speedups


@pytest.mark.parametrize("chunk, unstuffed, bare", [
    (b"", b"", False),
    (b"a\r\n..b\r\n", b"a\r\n.b\r\n", False),
    (b"a\r\n.\r\n.b", b"a\r\n\r\nb", False),          # two stuffed lines in a row
    (b".a\r\nb", b".a\r\nb", False),                    # the first line's dot is the state machine's to remove
    (b"a\n.b", b"a\n.b", True),                         # a bare LF: its dot is not a stuffed one
    (b"a\rb\r\n", b"a\rb\r\n", True),
    (b"a\n\r", b"a\n\r", True),                         # as many CRs as LFs, but not in pairs
])
@pytest.mark.parametrize("implementation", ["python", "compiled"])
def test_unstuff_body(implementation, chunk, unstuffed, bare):
    unstuff = bodyscan.unstuff_body_py if implementation == "python" else compiled().unstuff_body
    assert unstuff(chunk) == (unstuffed, bare)


@settings(max_examples=600, deadline=None)
@given(pieces)
def test_unstuff_body_compiled_and_python_agree(chunk):
    assert compiled().unstuff_body(chunk) == bodyscan.unstuff_body_py(chunk)


@pytest.mark.parametrize("content, stuffed", [
    (b"", b""),
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n"),
    (b"a\r\n..\r\n.\r\n", b"a\r\n...\r\n..\r\n"),    # a line of dots, and a line that would end DATA
    (b".a\r\nb.\r\n.", b".a\r\nb.\r\n.."),            # the first line's dot is DotStuffer's to double
])
@pytest.mark.parametrize("implementation", ["python", "compiled"])
def test_stuff_body(implementation, content, stuffed):
    stuff = bodyscan.stuff_body_py if implementation == "python" else compiled().stuff_body
    assert stuff(content) == stuffed


@settings(max_examples=600, deadline=None)
@given(pieces)
def test_stuff_body_compiled_and_python_agree(content):
    assert compiled().stuff_body(content) == bodyscan.stuff_body_py(content)


@pytest.mark.parametrize("name", ["unstuff_body", "stuff_body"])
def test_the_compiled_functions_refuse_what_is_not_bytes(name):
    with pytest.raises(TypeError):
        getattr(compiled(), name)(bytearray(b"a"))
