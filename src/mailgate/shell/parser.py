"""Parsing shell text with the Lark grammar in ``grammar.lark``."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path

import lark
from lark import Tree

from mailgate.errors import ParseError, not_text

GRAMMAR = Path(__file__).with_name("grammar.lark")


NESTED_TOO_DEEPLY = ("The statement is nested too deeply to run: split it into several statements, or use "
                     "variables for the inner expressions.")


PARSER_OPTIONS = {"parser": "lalr", "lexer": "contextual", "propagate_positions": True, "maybe_placeholders": False}


@functools.cache
def _parser() -> lark.Lark:
    """The LALR parser of the grammar. Building its tables takes ≈ 0.4 s, most of a `shell -c` run, so the
    built parser is kept in the user's cache directory, one file per grammar, Lark and Python version."""
    grammar = GRAMMAR.read_text(encoding="utf-8")
    cached = _cache_path(grammar)
    if cached is not None and _trusted(cached):
        try:
            with cached.open("rb") as f:
                return lark.Lark.load(f)
        except Exception:  # noqa: BLE001 - a damaged or foreign cache file: build the parser again
            pass
    built = lark.Lark(grammar, **PARSER_OPTIONS)
    if cached is not None:
        _save(built, cached)
    return built


def _cache_path(grammar: str) -> Path | None:
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:   # no home directory to find
        return None
    key = hashlib.sha256(f"{grammar}{PARSER_OPTIONS}{lark.__version__}{sys.version_info[:2]}".encode()).hexdigest()
    return base / "mailgate" / f"shell-parser-{key[:24]}.pickle"


def _trusted(path: Path) -> bool:
    """Loading unpickles the file: only one that this user wrote, in a folder nobody else may write."""
    try:
        for st in (path.parent.stat(), path.stat()):
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def _save(parser: lark.Lark, path: Path) -> None:
    """Best effort, atomically (shells starting together each see a whole file or none)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".shell-parser-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            parser.save(f)
        os.replace(temporary, path)
    except Exception:  # noqa: BLE001 - the shell works without its cache
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def parse(text: str) -> Tree:
    """Parse a script; raises ParseError with PowerShell's position format on bad input."""
    bad = not_text(text)
    if bad is not None:
        position, what = bad
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        src_line = text.splitlines()[line - 1]
        raise ParseError(f"At line:{line} char:{column}\n+ {src_line.encode('utf-8', 'replace').decode()}\n"
                         f"+ {' ' * (column - 1)}~\nThe text holds {what}; save the script as UTF-8. Nothing was run.")
    try:
        return _parser().parse(text)
    except lark.exceptions.UnexpectedInput as exc:
        line = getattr(exc, "line", 1) or 1
        column = getattr(exc, "column", 1) or 1
        src_line = text.splitlines()[line - 1] if text.splitlines() and line - 1 < len(text.splitlines()) else ""
        if isinstance(exc, lark.exceptions.UnexpectedToken):
            token = exc.token
            what = "end of input" if token.type == "$END" else f"token '{token}'"
            reason = f"Unexpected {what} in expression or statement."
            if _ends_with_redirection(text, exc):
                reason = "Missing file specification after redirection operator."
            elif token.type == "$END":
                reason = "Missing closing ')', '}' or quote, or an incomplete statement."
        elif isinstance(exc, lark.exceptions.UnexpectedCharacters):
            char = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else ""
            reason = f"Unexpected character '{char}'; check for a missing quote or a stray symbol."
            if char in "\"'\u201c\u201d\u2018\u2019":
                reason = "The string is missing the terminator: " + char
        else:
            reason = "The statement is incomplete."
        pointer = " " * (column - 1) + "~"
        raise ParseError(f"At line:{line} char:{column}\n+ {src_line}\n+ {pointer}\n{reason}") from None
    except lark.exceptions.LarkError as exc:  # pragma: no cover - defensive: never crash on input
        raise ParseError(f"The input could not be parsed: {exc}") from None
    except RecursionError:
        raise ParseError(NESTED_TOO_DEEPLY) from None


def _ends_with_redirection(text: str, exc: lark.exceptions.UnexpectedToken) -> bool:
    """The statement stopped right after a redirection operator ("Get-Queue >", "Get-Queue > | ...")."""
    if exc.token.type == "$END":   # lark keeps no token history at the end of the input
        return text.rstrip().endswith(">")
    return bool(exc.token_history) and getattr(exc.token_history[-1], "type", None) == "FILE_REDIRECT"


def is_incomplete(text: str) -> bool:
    """True when more lines could complete the statement (for the interactive prompt)."""
    if text.rstrip().endswith("`") or text.rstrip().endswith("|"):
        return True
    try:
        _parser().parse(text)
    except lark.exceptions.UnexpectedToken as exc:   # "Get-Queue >" wants no more lines: it lacks its file
        return exc.token.type == "$END" and not _ends_with_redirection(text, exc)
    except lark.exceptions.UnexpectedCharacters as exc:
        rest = text[exc.pos_in_stream:]
        return rest[:1] in "\"'" and rest.count(rest[0]) % 2 == 1
    except (lark.exceptions.LarkError, RecursionError):
        return False
    return False
