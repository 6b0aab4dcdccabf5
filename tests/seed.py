"""The user's document (tests/scenarios/seed.md, a verbatim copy) split into its sections'
PowerShell blocks, so tests type exactly what the document says."""

from __future__ import annotations

import re
from pathlib import Path

SEED = Path(__file__).parent / "scenarios" / "seed.md"


def sections() -> dict[int, list[str]]:
    """Section number → its ```powershell blocks, in order."""
    text = SEED.read_text(encoding="utf-8")
    out: dict[int, list[str]] = {}
    current = 0
    for part in re.split(r"^(## .*)$", text, flags=re.M):
        m = re.match(r"## \S*\s*(\d+)\.", part)
        if m:
            current = int(m.group(1))
            out.setdefault(current, [])
            continue
        if current:
            out[current] += re.findall(r"```powershell\n(.*?)```", part, flags=re.S)
    return out


def commands(*numbers: int) -> str:
    """The blocks of the given sections joined into one script."""
    secs = sections()
    return "\n".join(block for n in numbers for block in secs[n])


def configuration_script() -> str:
    """The configuration commands of sections 1-3 (connectors and TLS)."""
    return commands(1, 2, 3)


def command_containing(text: str) -> str:
    """The one block of the document that contains ``text``, as written (continuation lines and all)."""
    found = [block for blocks in sections().values() for block in blocks if text in block]
    assert len(found) == 1, f"{len(found)} blocks of the document contain {text!r}"
    return found[0].rstrip("\n")
