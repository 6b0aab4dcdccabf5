"""Hostile clients, all at once, against a live server (SPEC C2 hardening, C11): random bytes, lines without an
end, header bombs, STARTTLS with garbage or smuggled commands behind it, absurd BDAT sizes, clients that vanish
mid-message. Each gets its reply or its connection closed; meanwhile and afterwards the server serves ordinary
mail, its memory stays bounded, and nothing a client didn't finish sending is stored."""

from __future__ import annotations

import random
import re
import smtplib
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from helpers import PeakRss, maildir_messages, shell, synced, wait_for

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -]")


class Client:
    """A raw socket session: what the server sent, read until it closes or falls silent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = b""
        self.banner = self.read_until(b"\r\n")

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:   # the server may close on us mid-flood: what it said before is in .received
            pass

    def read_until(self, marker: bytes, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.received and time.monotonic() < deadline:
            if not self._read(max(0.05, deadline - time.monotonic())):
                break
        return self.received

    def read_to_close(self, timeout: float = 15) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(deadline - time.monotonic()):
            pass
        return self.received

    def _read(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, socket.timeout, ConnectionResetError):
            return False
        self.received += chunk
        return bool(chunk)

    def close(self) -> None:
        self.sock.close()


ENVELOPE = b"EHLO hostile.example\r\nMAIL FROM:<x@hostile.example>\r\nRCPT TO:<admin@domain.com>\r\n"


def in_data(port: int) -> Client:
    """A session that has sent its envelope and DATA, and read the 354."""
    c = Client(port)
    c.send(ENVELOPE + b"DATA\r\n")
    c.read_until(b"354 ")
    return c


def random_bytes(port: int, seed: int) -> None:
    rnd = random.Random(seed)
    c = Client(port)
    for _ in range(rnd.randint(1, 6)):
        c.send(rnd.randbytes(rnd.randint(1, 3000)))
    c.sock.settimeout(0.5)
    c._read(0.5)
    c.close()
    lines = [line for line in c.received.split(b"\r\n") if line]
    assert all(REPLY_LINE.match(line) for line in lines), c.received[-300:]


def endless_line(port: int) -> None:
    c = Client(port)
    for _ in range(80):   # 8 MB without a line end
        c.send(b"x" * 100_000)
    assert b"500 5.5.2 Command too long" in c.read_until(b"500 5.5.2"), c.received[-300:]
    c.close()


def header_line_bomb(port: int) -> None:
    c = in_data(port)
    c.send(b"Subject: " + b"x" * 3_000_000 + b"\r\n\r\nbody\r\n.\r\n")
    assert b"552 5.3.4" in c.read_until(b"552 5.3.4"), c.received[-300:]
    c.close()


def many_headers(port: int) -> None:
    c = in_data(port)
    c.send(b"".join(b"X-Filler-%d: v\r\n" % i for i in range(150_000)) + b"\r\nbody\r\n.\r\n")
    assert b"552 5.3.4" in c.read_until(b"552 5.3.4"), c.received[-300:]
    c.close()


def half_close_in_data(port: int) -> None:
    c = in_data(port)
    c.send(b"Subject: half-sent\r\n\r\nno end of data follows\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    assert b"250 2.6.0" not in c.read_to_close()
    c.close()


def reset_in_data(port: int) -> None:
    c = in_data(port)
    c.send(b"Subject: cut-off\r\n\r\n" + b"line\r\n" * 5000)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close with a RST
    c.close()


def starttls_then_garbage(port: int) -> None:
    c = Client(port)
    c.send(b"EHLO hostile.example\r\nSTARTTLS\r\n")
    c.read_until(b"220 2.0.0")
    c.send(random.Random(3).randbytes(6000))
    c.received = b""
    c.read_to_close()   # the handshake fails: the server closes
    assert c.received == b"", c.received[:200]
    c.close()


def starttls_with_smuggled_commands(port: int) -> None:
    """Commands pipelined behind STARTTLS were sent in plaintext: they are discarded, never answered in TLS."""
    c = Client(port)
    c.send(b"EHLO hostile.example\r\nSTARTTLS\r\nMAIL FROM:<evil@hostile.example>\r\nRCPT TO:<admin@domain.com>\r\n")
    c.read_until(b"220 2.0.0")
    time.sleep(0.3)
    assert c.received.endswith(b"220 2.0.0 SMTP server ready\r\n"), c.received[-200:]
    tls = ssl._create_unverified_context().wrap_socket(c.sock, server_hostname="ex01.domain.com")
    tls.sendall(b"NOOP\r\n")
    time.sleep(0.3)   # any answer to the smuggled commands would come before NOOP's
    assert tls.recv(4000) == b"250 2.0.0 OK\r\n", "commands sent before the TLS handshake were answered in TLS"
    tls.sendall(b"EHLO hostile.example\r\n")
    assert b"250 " in tls.recv(4000)
    tls.close()


def absurd_bdat(port: int) -> None:
    c = Client(port)
    c.send(ENVELOPE + b"BDAT 99999999999999999999999999 LAST\r\nBDAT -1\r\nRSET\r\nQUIT\r\n")
    out = c.read_to_close()
    assert out.count(b"501 5.5.4") == 2 and b"221 " in out, out[-300:]
    c.close()


def test_hostile_clients_at_once_leave_the_server_serving_bounded_and_storing_nothing_half_sent(home, server):
    assert shell(home, 'New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com\n'
                       'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource unlimited '
                       '-MaxInboundConnection unlimited').ok
    synced(home)
    port = server.ports["frontend"]
    attacks: list[Callable[[], None]] = [lambda s=s: random_bytes(port, s) for s in range(120)]
    attacks += [lambda: endless_line(port), lambda: header_line_bomb(port), lambda: many_headers(port),
                lambda: half_close_in_data(port), lambda: reset_in_data(port), lambda: starttls_then_garbage(port),
                lambda: starttls_with_smuggled_commands(port), lambda: absurd_bdat(port)] * 2
    random.Random(5).shuffle(attacks)
    delivered_meanwhile: list[dict] = []
    with PeakRss(server.proc.pid, interval=0.01) as rss, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(a) for a in attacks]
        # An ordinary client in the middle of it all.
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as ok:
            delivered_meanwhile.append(ok.sendmail("a@example.org", ["admin@domain.com"],
                                                   b"Subject: meanwhile\r\n\r\nordinary mail\r\n"))
        for f in futures:
            f.result(timeout=120)   # each attack's own assertions
    assert delivered_meanwhile == [{}]
    # 16 MB: less than one of the floods; a server that buffered one whole would pass it (2-3 MB measured).
    assert rss.growth_mb < 16, f"the server grew {rss.growth_mb:.1f} MB under hostile clients"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as ok:
        assert ok.sendmail("a@example.org", ["admin@domain.com"], b"Subject: after\r\n\r\nordinary mail\r\n") == {}
    wait_for(lambda: len(maildir_messages(home, "admin@domain.com")) >= 2, message="the two ordinary messages")
    time.sleep(1)   # anything half-sent that had been stored would be delivered by now
    subjects = sorted(re.search(rb"^Subject: (.*)$", m, re.M)[1].strip() for m in maildir_messages(home, "admin@domain.com"))
    assert subjects == [b"after", b"meanwhile"], subjects   # no attack finished a message
    assert "Traceback" not in server.output(), server.output()[-3000:]
