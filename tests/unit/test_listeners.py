"""Who else listens on a receive endpoint bound with SO_REUSEPORT: this server's own processes may share it,
another program may not; where /proc can't tell, nobody is taken for a stranger."""

from __future__ import annotations

import socket
import subprocess
import sys

from helpers import free_port

from mailgate.receive import listeners
from mailgate.receive.listeners import shared_with_another_program


def reuse_port_listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1)
    return sock


def test_only_a_listener_of_another_program_counts(monkeypatch):
    port = free_port()
    ours = reuse_port_listener(port)
    sibling = reuse_port_listener(port)   # held by this process: one of "this server's" sockets
    try:
        assert not shared_with_another_program(ours, socket.AF_INET, "127.0.0.1", port)
        other = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); "
            f"s.bind(('0.0.0.0', {port})); s.listen(1); print('up', flush=True); sys.stdin.read()")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "up"
            # The other program's wildcard listener overlaps 127.0.0.1.
            assert shared_with_another_program(ours, socket.AF_INET, "127.0.0.1", port)

            real_listdir = listeners.os.listdir

            def hardened(path: str) -> list[str]:
                if path.endswith("/fd"):
                    raise PermissionError(13, "Permission denied", path)
                return real_listdir(path)

            monkeypatch.setattr(listeners.os, "listdir", hardened)
            assert not shared_with_another_program(ours, socket.AF_INET, "127.0.0.1", port)
        finally:
            other.kill()
            other.wait()
    finally:
        ours.close()
        sibling.close()
