"""Text files the shell's Out-File, Export-Csv, Get-Content and Import-Csv write and read, with Windows
PowerShell's ``-Encoding`` names.

Administrators' scripts say ``-Encoding UTF8`` (or ``Unicode``, ``ASCII``...) because Windows PowerShell 5.1, the
Exchange Management Shell's host, writes UTF-16 or ASCII files by default. The names keep their 5.1 meaning
(``UTF8`` and ``Unicode`` write a byte order mark, ``ASCII`` writes ``?`` for what it can't hold); ``Default`` is
this system's encoding, UTF-8. Without ``-Encoding`` files are written as UTF-8 without a mark (PowerShell 7's
default) and read by their byte order mark, UTF-8 when they have none.
"""

from __future__ import annotations

import codecs
import os
from typing import Any

from mailgate.errors import InvalidValueError, UserError

# -Encoding name (lower case) → (Python codec, byte order mark written at the start of a new file).
ENCODINGS: dict[str, tuple[str, bytes]] = {
    "ascii": ("ascii", b""),
    "utf8": ("utf-8", codecs.BOM_UTF8),
    "utf8bom": ("utf-8", codecs.BOM_UTF8),
    "utf8nobom": ("utf-8", b""),
    "unicode": ("utf-16-le", codecs.BOM_UTF16_LE),
    "string": ("utf-16-le", codecs.BOM_UTF16_LE),
    "unknown": ("utf-16-le", codecs.BOM_UTF16_LE),
    "bigendianunicode": ("utf-16-be", codecs.BOM_UTF16_BE),
    "utf32": ("utf-32-le", codecs.BOM_UTF32_LE),
    "bigendianutf32": ("utf-32-be", codecs.BOM_UTF32_BE),
    "utf7": ("utf-7", b""),
    "default": ("utf-8", b""),
    "oem": ("cp437", b""),
}
_NAMES = ("ASCII", "BigEndianUnicode", "BigEndianUTF32", "Default", "OEM", "String", "Unicode", "Unknown", "UTF7",
          "UTF8", "UTF8BOM", "UTF8NoBOM", "UTF32")
# Longest first: the UTF-32 little-endian mark begins with the UTF-16 one.
_MARKS = [(codecs.BOM_UTF32_LE, "utf32"), (codecs.BOM_UTF32_BE, "bigendianutf32"), (codecs.BOM_UTF8, "utf8"),
          (codecs.BOM_UTF16_LE, "unicode"), (codecs.BOM_UTF16_BE, "bigendianunicode")]


def to_file_encoding(value: Any) -> str:
    """An -Encoding argument, checked against the names Windows PowerShell accepts (any case)."""
    name = str(value).strip()
    if name.lower() not in ENCODINGS:
        raise InvalidValueError(f"Cannot validate argument on parameter 'Encoding'. The argument \"{name}\" does not "
                                f"belong to the set \"{','.join(_NAMES)}\" specified by the ValidateSet attribute. "
                                "Supply an argument that is in the set and then try the command again.",
                                parameter="Encoding")
    return name.lower()


def marked_encoding(data: bytes) -> str | None:
    """The -Encoding name of the byte order mark ``data`` starts with, None without one."""
    return next((name for mark, name in _MARKS if data.startswith(mark)), None)


def write_text(path: str, text: str, encoding: str | None, *, append: bool = False,
               no_clobber: bool = False) -> None:
    """Write (or append) ``text``; a new or empty file starts with the encoding's byte order mark. Appending
    without an encoding keeps the one the file's mark names (a UTF-16 file from Windows stays UTF-16)."""
    if no_clobber and not append and os.path.exists(path):
        raise UserError(f"The file '{path}' already exists.")
    if append and encoding is None and os.path.exists(path):
        with open(path, "rb") as fh:
            encoding = marked_encoding(fh.read(4))
    codec, mark = ENCODINGS[encoding or "utf8nobom"]
    data = text.encode(codec, errors="replace")
    with open(path, "ab" if append else "wb") as fh:
        if fh.tell() == 0:
            data = mark + data
        fh.write(data)


def read_text(path: str, encoding: str | None = None) -> str:
    """A text file's contents: in ``encoding`` if one is named, else by its byte order mark (UTF-8 without one).
    The mark is not part of the text; bytes that don't decode become U+FFFD."""
    with open(path, "rb") as fh:
        data = fh.read()
    if encoding is not None:
        codec, mark = ENCODINGS[encoding]
        return data.removeprefix(mark).decode("utf-8-sig" if codec == "utf-8" else codec, errors="replace")
    marked = marked_encoding(data)
    if marked is None:
        return data.decode("utf-8", errors="replace")
    codec, mark = ENCODINGS[marked]
    return data[len(mark):].decode(codec, errors="replace")


def existing_text(path: str, encoding: str | None) -> str:
    """The text already in a file that is about to be appended to ("" when there is none)."""
    try:
        return read_text(path, encoding)
    except FileNotFoundError:
        return ""
