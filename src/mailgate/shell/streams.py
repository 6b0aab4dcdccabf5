"""Pipelines that flow: objects passed down a pipeline a chunk at a time, as PowerShell passes them one at a time.

A cmdlet that reads as it is used (Get-MessageTrackingLog returns an iterator over the store) starts a
``Stream`` when its statement prints its output or pipes it into a command that can take it as it comes
(``Cmdlet.stream``: Where-Object, Select-Object, Format-Table, Export-Csv...). Anything else — a variable, a
sort, a management cmdlet — gets the whole list, as before. So ``Get-MessageTrackingLog -ResultSize Unlimited |
Export-Csv`` over millions of events holds one chunk of them at a time, and ``... | Select -First 1`` stops
reading the store after one.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from mailgate.shell import format as fmt
from mailgate.shell import textfiles

CHUNK = 1000   # objects per chunk: a default -ResultSize (1000) of output still prints as one table


class Stream:
    """Objects flowing down a pipeline, in chunks (lists, never empty); read once."""

    def __init__(self, chunks: Iterable[list[Any]]) -> None:
        self._chunks = iter(chunks)

    @classmethod
    def of(cls, items: Iterable[Any], size: int = CHUNK) -> "Stream":
        def chunks() -> Iterator[list[Any]]:
            chunk: list[Any] = []
            try:
                for item in items:
                    chunk.append(item)
                    if len(chunk) == size:
                        yield chunk
                        chunk = []
            except Exception:   # what was read before an error still goes down the pipeline (not after Ctrl-C)
                if chunk:
                    yield chunk
                raise
            if chunk:
                yield chunk

        return cls(chunks())

    def __iter__(self) -> Iterator[list[Any]]:
        return (chunk for chunk in self._chunks if chunk)

    def materialise(self) -> list[Any]:
        return [item for chunk in self for item in chunk]


class Chunk(list):  # type: ignore[type-arg]
    """One chunk of a streamed output, marked for the renderer: a table opens in the first and closes in the
    last (its header is printed once, its columns keep the widths the first chunk gave them)."""

    def __init__(self, items: list[Any], *, first: bool, last: bool) -> None:
        super().__init__(items)
        self.first = first
        self.last = last


def marked(chunks: Iterable[list[Any]]) -> Iterator[Chunk]:
    """The chunks, each marked first and/or last (one chunk read ahead to know which is last)."""
    first = True
    pending: list[Any] | None = None
    try:
        for chunk in chunks:
            if pending is not None:
                yield Chunk(pending, first=first, last=False)
                first = False
            pending = chunk
    except Exception:   # an error reading ahead: the chunk already read is printed before it
        if pending is not None:
            yield Chunk(pending, first=first, last=True)
        raise
    if pending is not None:
        yield Chunk(pending, first=first, last=True)


def write_printed(chunks: Iterable[list[Any]], path: str, *, limit: int, width: int | None = None,
                  encoding: str | None = None, append: bool = False, no_clobber: bool = False,
                  no_newline: bool = False) -> bool:
    """Write objects to a file as the shell prints them, a chunk at a time (Out-File, ``>``): one table with one
    header, however long. False when there was nothing to write (the caller decides what an empty output makes)."""
    carry = fmt.OpenOutput()
    written = False
    for chunk in marked(chunks):
        lines = fmt.default_render(chunk, limit=limit, width=width, carry=carry)
        text = "".join(lines) if no_newline else "".join(line + "\n" for line in lines)
        textfiles.write_text(path, text, encoding, append=append or written, no_clobber=no_clobber and not written)
        written = True
    return written
