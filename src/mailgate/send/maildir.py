"""Mailbox delivery to Maildir folders in the data directory (any Maildir tool
reads them): write to ``tmp/``, sync, rename into ``new/``.

The file name is derived from the message and recipient, so delivering the
same message to the same mailbox twice (after a crash between the rename and
the queue's record of it) finds the earlier copy and does not duplicate it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Iterable

HOSTNAME = socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def mailbox_path(root: Path, primary_address: str) -> Path:
    safe = primary_address.lower().replace("/", "_")
    return root / safe / "Maildir"


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def unique_name(received_at: float, network_id: str, recipient_index: int) -> str:
    return f"{int(received_at)}.{network_id}_{recipient_index}.{HOSTNAME}"


def already_delivered(path: Path, name: str) -> bool:
    if (path / "new" / name).exists():
        return True
    cur = path / "cur"
    try:
        return any(entry.name.split(":2,")[0] == name for entry in os.scandir(cur) if entry.name.startswith(name))
    except FileNotFoundError:
        return False


def deliver(path: Path, name: str, content: Iterable[bytes]) -> Path:
    """Write ``content`` (pieces) into the Maildir at ``path`` under ``name``; returns the final path."""
    ensure_maildir(path)
    if already_delivered(path, name):
        return path / "new" / name
    tmp = path / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for piece in content:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = path / "new" / name
    os.rename(tmp, final)
    dir_fd = os.open(path / "new", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final
