"""The shell's parser is built once and kept in the user's cache directory; a cache file it cannot trust or
read is ignored, never unpickled or fatal."""

from __future__ import annotations

import os
import stat

import pytest

from mailgate.errors import ParseError
from mailgate.shell import parser

SCRIPT = 'Get-ReceiveConnector "InternalRelay" | ft Name,Bindings\n$x = @{Add="10.0.0.1"}\n'


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parser._parser.cache_clear()
    yield tmp_path / "mailgate"
    parser._parser.cache_clear()


def cache_files(folder):
    return sorted(p for p in folder.iterdir() if p.name.startswith("shell-parser-")) if folder.exists() else []


def fresh_parse(text):
    parser._parser.cache_clear()
    return parser.parse(text)


def test_the_built_parser_is_kept_private_and_parses_alike_when_loaded(cache_home):
    built = fresh_parse(SCRIPT)
    [kept] = cache_files(cache_home)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600 and stat.S_IMODE(cache_home.stat().st_mode) == 0o700
    loaded_before = kept.stat().st_mtime_ns
    assert fresh_parse(SCRIPT) == built             # loaded from the file: the same tree, positions included
    assert kept.stat().st_mtime_ns == loaded_before  # and not written again
    with pytest.raises(ParseError, match="At line:1 char:11"):
        fresh_parse('Get-Queue "unterminated\n')


def test_a_damaged_cache_file_is_rebuilt(cache_home):
    fresh_parse(SCRIPT)
    [kept] = cache_files(cache_home)
    kept.write_bytes(b"not a parser")
    assert fresh_parse(SCRIPT).children
    assert kept.stat().st_size > 10_000             # written again, whole


def test_a_cache_file_others_may_write_is_never_loaded(cache_home, monkeypatch):
    fresh_parse(SCRIPT)
    [kept] = cache_files(cache_home)
    kept.chmod(0o666)
    loads = []
    monkeypatch.setattr(parser.lark.Lark, "load", classmethod(lambda cls, f: loads.append(f)))
    assert fresh_parse(SCRIPT).children
    assert loads == []
    os.chmod(kept, 0o600)
    cache_home.chmod(0o777)
    fresh_parse(SCRIPT)
    assert loads == []


def test_no_writable_cache_directory_still_parses(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))   # a file where the folder should be
    try:
        assert fresh_parse(SCRIPT).children
    finally:
        parser._parser.cache_clear()
