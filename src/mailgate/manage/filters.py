"""OPATH filters as Exchange's queue and message cmdlets take them:
``-Filter "MessageCount -gt 10 -and Status -eq 'Retry'"``.

Grammar (recursive descent)::

    expr   := term (("-and" | "-or") term)*
    term   := "-not" term | "(" expr ")" | NAME OP value
    value  := 'text' | "text" | NUMBER | $true | $false | $null | WORD
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from mailgate.errors import InvalidValueError

_TOKEN = re.compile(r"""\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<op>-[A-Za-z]+)|(?P<sq>'(?:[^']|'')*')|(?P<dq>"(?:[^"]|"")*")"""
                    r"""|(?P<var>\$(?:true|false|null))|(?P<word>[^\s()'"]+))""", re.I)
_COMPARISONS = {"-eq", "-ne", "-gt", "-ge", "-lt", "-le", "-like", "-notlike", "-match", "-notmatch", "-contains",
                "-notcontains"}


@dataclass
class _Tok:
    kind: str
    text: str


def _tokens(text: str) -> list[_Tok]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise InvalidValueError(f'The filter "{text}" is not valid near "{text[pos:pos + 20]}".', parameter="Filter")
        pos = m.end()
        kind = m.lastgroup or ""
        out.append(_Tok(kind, m.group(kind)))
    return out


Predicate = Callable[[Any], bool]


def parse_filter(text: str, compare: Callable[[str, Any, Any], Any], get: Callable[[Any, str], Any]) -> Predicate:
    toks = _tokens(text)
    pos = 0

    def peek() -> _Tok | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> _Tok:
        nonlocal pos
        if pos >= len(toks):
            raise InvalidValueError(f'The filter "{text}" ends too early.', parameter="Filter")
        tok = toks[pos]
        pos += 1
        return tok

    def value(tok: _Tok) -> Any:
        if tok.kind == "sq":
            return tok.text[1:-1].replace("''", "'")
        if tok.kind == "dq":
            return tok.text[1:-1].replace('""', '"')
        if tok.kind == "var":
            return {"$true": True, "$false": False, "$null": None}[tok.text.lower()]
        if tok.kind == "word":
            if re.fullmatch(r"-?\d+", tok.text):
                return int(tok.text)
            return tok.text
        raise InvalidValueError(f'The filter "{text}" has "{tok.text}" where a value should be.', parameter="Filter")

    def term() -> Predicate:
        tok = take()
        if tok.kind == "op" and tok.text.lower() == "-not":
            inner = term()
            return lambda obj: not inner(obj)
        if tok.kind == "lp":
            inner = expr()
            close = take()
            if close.kind != "rp":
                raise InvalidValueError(f'The filter "{text}" is missing ")".', parameter="Filter")
            return inner
        if tok.kind != "word":
            raise InvalidValueError(f'The filter "{text}" has "{tok.text}" where a property name should be.',
                                    parameter="Filter")
        prop = tok.text
        op = take()
        if op.kind != "op" or op.text.lower() not in _COMPARISONS:
            raise InvalidValueError(f'The filter "{text}" has "{op.text}" where a comparison operator (-eq, -gt, '
                                    f'-like ...) should be.', parameter="Filter")
        operand = value(take())
        operator = op.text.lower()
        return lambda obj: bool(compare(operator, get(obj, prop), operand))

    def expr() -> Predicate:
        left = term()
        while True:
            tok = peek()
            if tok is None or tok.kind != "op" or tok.text.lower() not in ("-and", "-or"):
                return left
            take()
            right = term()
            if tok.text.lower() == "-and":
                left = (lambda a, b: lambda obj: a(obj) and b(obj))(left, right)
            else:
                left = (lambda a, b: lambda obj: a(obj) or b(obj))(left, right)

    predicate = expr()
    if pos != len(toks):
        raise InvalidValueError(f'The filter "{text}" has unexpected text "{toks[pos].text}".', parameter="Filter")
    return predicate
