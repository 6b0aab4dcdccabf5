"""A full disk (SPEC C11): the queue's disk on a small tmpfs. Back pressure refuses new mail at MAIL FROM with
Exchange's `452 4.3.1` before the disk runs out; mail already acknowledged is delivered and recorded even
when another program fills the disk to the last byte; the space comes back as the queue drains."""

from __future__ import annotations

import errno
import os
import shutil
import smtplib
import subprocess
import time

import pytest
from helpers import Server, free_port, make_home, shell, wait_for
from mailgate.control import RuntimeClient
from peers import SmtpPeer

PEER = "127.0.0.30"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        problem = f"mounting a 32 MB tmpfs failed (root is needed): {r.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def setup(disk, high_percent: int | None = None):
    home = make_home(disk / "home")
    if high_percent is not None:
        config = home.path / "mailgate.toml"
        text = config.read_text()
        assert "queue_disk_high_percent = 0" in text          # init writes the setting with Exchange's rule
        config.write_text(text.replace("queue_disk_high_percent = 0", f"queue_disk_high_percent = {high_percent}"))
    port, peer_port = free_port(), free_port(PEER)
    r = shell(home, f'''
Set-ReceiveConnector "Default Frontend EX01" -Bindings 127.0.0.1:{port} -TarpitInterval 00:00:00
Set-ReceiveConnector "Client Frontend EX01" -Bindings 127.0.0.1:{free_port()}
Add-ADPermission "Default Frontend EX01" -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient
Set-TransportService EX01 -MessageRetryInterval 00:00:01 -TransientFailureRetryInterval 00:00:01
New-SendConnector Out -AddressSpaces remote.example -SmartHosts {PEER} -Port {peer_port}
''', runtime=None)
    assert r.ok, r.err
    return home, port, peer_port


def fill_to_the_last_byte(path) -> None:
    """Write zeros to `path` until the disk refuses. Unbuffered: a buffered file that hit ENOSPC mid-write keeps
    the rest in its buffer and raises again when it is closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    assert shutil.disk_usage(path.parent).free < 65536


def send(port: int, tag: str, size: int) -> None:
    body = f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * (size // 1000)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail("someone@outside.example", ["user@remote.example"], body)


def pressure(home) -> dict:
    return RuntimeClient(home, timeout=10).call("status")["back_pressure"]


def queued(home) -> int:
    r = shell(home, "(Get-Queue | Measure-Object -Property MessageCount -Sum).Sum")
    assert r.ok, r.err
    return int(float(r.out.strip() or 0))


def test_mail_that_fills_the_queue_disk_is_refused_at_mail_from_and_the_queue_drains_it(small_disk):
    home, port, peer_port = setup(small_disk, high_percent=60)
    server = Server(home).start()
    peer = None
    try:
        acked, refusal = [], None
        for n in range(150):                                    # 150 × 200 KB would be 30 MB: more than fits
            try:
                send(port, f"m{n:03d}", 200_000)
            except smtplib.SMTPSenderRefused as exc:
                refusal = exc
                break
            acked.append(f"m{n:03d}")
        assert refusal is not None, "the disk filled and nothing was refused"
        assert refusal.smtp_code == 452 and b"4.3.1 Insufficient system resources" in refusal.smtp_error
        usage = shutil.disk_usage(small_disk)
        assert usage.free > 4 * 1024 ** 2, "back pressure came too late: the disk ran out"
        assert 40 <= len(acked) < 150
        assert pressure(home)["level"] in ("Medium", "High")     # Medium refuses outside senders too
        report = shell(home, "Test-MailflowBestPractice | Where-Object Rule -eq BackPressure | fl Severity,Detail")
        assert "is refused with 452 4.3.1" in report.out and "back pressure is" in report.out, report
        assert "No space left" not in server.output()
        peer = SmtpPeer(PEER, peer_port)                        # the next hop comes back: the queue drains
        wait_for(lambda: {m.message["X-Tag"] for m in peer.received} >= set(acked), timeout=90,
                 message="every acknowledged message at the next hop")
        tags = [m.message["X-Tag"] for m in peer.received]
        assert len(tags) == len(set(tags)), "a message was delivered twice"
        wait_for(lambda: pressure(home)["level"] == "Normal", timeout=30, message="back pressure back to Normal")
        assert shutil.disk_usage(small_disk).free > usage.free + 10 * 1024 ** 2   # the segments' space is back
        send(port, "after", 200_000)                            # and mail is accepted again
        wait_for(lambda: "after" in {m.message["X-Tag"] for m in peer.received}, timeout=30)
    finally:
        server.stop()
        if peer:
            peer.stop()


def test_a_disk_another_program_filled_still_lets_the_queue_deliver_and_record_its_mail(small_disk):
    home, port, peer_port = setup(small_disk, high_percent=90)  # (Exchange's rule: a 32 MB disk is always High)
    server = Server(home).start()
    peer = None
    filler = small_disk / "filler"
    try:
        acked = []
        for n in range(20):
            send(port, f"q{n:02d}", 100_000)
            acked.append(f"q{n:02d}")
        wait_for(lambda: queued(home) == 20, message="20 queued messages")
        fill_to_the_last_byte(filler)                           # another program takes every byte left
        wait_for(lambda: pressure(home)["level"] == "High", message="back pressure High")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(port, "refused", 1000)
        assert refused.value.smtp_code == 452
        time.sleep(3)   # the disk stays full a while: checkpoints, retries and the log writers take any crumb
        peer = SmtpPeer(PEER, peer_port)
        wait_for(lambda: {m.message["X-Tag"] for m in peer.received} >= set(acked), timeout=90,
                 message="every queued message at the next hop")
        # The deliveries are recorded although the disk was full (the reserve gave the queue room to write
        # them): the queue empties, and nothing is sent again because its outcome could not be stored.
        wait_for(lambda: queued(home) == 0, timeout=30, message="an empty queue")
        tags = [m.message["X-Tag"] for m in peer.received]
        assert sorted(tags) == sorted(acked), "a message was delivered twice: its delivery was not recorded"
        filler.unlink()
        wait_for(lambda: pressure(home)["level"] == "Normal", timeout=30, message="back pressure back to Normal")
        # Tracking events held while the disk was full are written now.
        r = wait_for(lambda: (lambda out: out if out.count("SEND") >= 20 else None)(shell(
            home, "Get-MessageTrackingLog -EventId SEND -ResultSize Unlimited | ForEach-Object { $_.EventId }").out),
            timeout=30, message="the 20 SEND events in the tracking log")
        assert r.count("SEND") == 20
        send(port, "after", 1000)
    finally:
        server.stop()
        if peer:
            peer.stop()


def test_at_medium_only_senders_of_the_authoritative_domains_get_through(home, ports):
    """Medium back pressure (here: High set 2 points above what the disk has in use now) refuses mail from
    outside senders at MAIL FROM and still takes mail from the organisation's own, authenticated, users."""
    import ssl

    used = round(100 * (1 - shutil.disk_usage(home.path).free / shutil.disk_usage(home.path).total))
    if not 10 <= used <= 95:
        pytest.skip(f"the disk here is {used}% used")
    config = home.path / "mailgate.toml"
    config.write_text(config.read_text().replace("queue_disk_high_percent = 0", f"queue_disk_high_percent = {used + 2}"))
    r = shell(home, 'New-Mailbox -Name Kate -PrimarySmtpAddress kate@domain.com '
                    '-Password (ConvertTo-SecureString "Corr3ct-Horse" -AsPlainText -Force)', runtime=None)
    assert r.ok, r.err
    server = Server(home).start()
    try:
        assert pressure(home)["level"] == "Medium"
        with smtplib.SMTP("127.0.0.1", ports["frontend"], timeout=30) as c:
            c.ehlo("outside.example")
            code, reply = c.mail("someone@outside.example")
            assert (code, reply) == (452, b"4.3.1 Insufficient system resources")
        with smtplib.SMTP("127.0.0.1", ports["client"], timeout=30) as c:
            c.starttls(context=ssl._create_unverified_context())
            c.login("kate@domain.com", "Corr3ct-Horse")
            assert c.sendmail("kate@domain.com", ["friend@remote.example"], b"Subject: out\r\n\r\nhi\r\n") == {}
        assert "kate@domain.com" in shell(home, "Get-Message | fl FromAddress").out
    finally:
        server.stop()
