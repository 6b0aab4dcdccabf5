"""Worker processes: one server to the administrator, restarted when one dies, queues kept when their number drops."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

from helpers import ROOT, Server, bind_ports, cli, free_port, maildir_messages, make_home, shell, synced, wait_for


def serve(home, workers: int) -> subprocess.Popen[str]:
    log = open(home.path / f"serve-{workers}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "mailgate.cli", "--home", str(home.path), "serve", "--admin-listen",
                             "off", "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_for(lambda: "is running" in (home.path / f"serve-{workers}.log").read_text(), timeout=30)
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def workers_of(pid: int) -> list[int]:
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def send(ports, source: str, n: int = 1) -> None:
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", ports["frontend"], source_address=(source, 0), timeout=20) as c:
            assert c.sendmail("a@b.example", ["x@remote.example"], f"Subject: m{i}\r\n\r\nx\r\n".encode()) == {}


def test_one_server_to_the_administrator(home, ports):
    shell(home, f'New-ReceiveConnector Relay -Bindings 127.0.0.1:{ports["frontend"]} -RemoteIPRanges 127.0.0.0/24 '
                '-Custom -PermissionGroups AnonymousUsers -TarpitInterval 00:00:00\n'
                'Add-ADPermission Relay -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights '
                'ms-Exch-SMTP-Accept-Any-Recipient', runtime=None)
    proc = serve(home, 2)
    try:
        assert len(workers_of(proc.pid)) == 2
        for i in range(2, 22):
            send(ports, f"127.0.0.{i}")
        queues = shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount")
        assert "MessageCount : 20" in queues.out
        ids = shell(home, "Get-Message -ResultSize Unlimited | ForEach-Object { $_.Identity }").out.split()
        assert len(ids) == 20 and len(set(ids)) == 20
        assert any(int(i.rsplit("\\", 1)[1]) > 10**12 for i in ids), "both workers took connections"
        # An action on a message reaches the worker that holds it.
        assert shell(home, f'Remove-Message "{ids[-1]}" -WithNDR $false').ok
        assert "MessageCount : 19" in shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount").out
        # A worker that dies is replaced; the server keeps accepting.
        victim = workers_of(proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(workers_of(proc.pid)) == 2 and victim not in workers_of(proc.pid), timeout=30)
        synced(home)
        send(ports, "127.0.0.30", 4)
        assert "MessageCount : 23" in shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount").out
    finally:
        stop(proc)
    # With one worker again, the other worker's queue is merged in: nothing is left behind.
    proc = serve(home, 1)
    try:
        assert "MessageCount : 23" in shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount").out
        assert not (home.queue_dir / "w1").exists()
    finally:
        stop(proc)


def test_connection_limits_hold_across_workers(home, ports):
    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 3', runtime=None)
    proc = serve(home, 2)
    import socket

    try:
        held = [socket.create_connection(("127.0.0.1", ports["frontend"]), source_address=("127.0.0.9", 0))
                for _ in range(6)]
        greetings = [s.recv(200) for s in held]
        assert sum(g.startswith(b"220") for g in greetings) == 3
        assert sum(b"421 4.3.2" in g for g in greetings) == 3
        for s in held:
            s.close()

        def greeted() -> bool:   # a slot comes back as its worker ends the session
            with socket.create_connection(("127.0.0.1", ports["frontend"]), source_address=("127.0.0.9", 0)) as again:
                return again.recv(200).startswith(b"220")

        wait_for(greeted, timeout=10, interval=0.2, message="a new session greeted from the address")
    finally:
        stop(proc)
    assert cli(home, "shell", "-c", "Get-ReceiveConnector").returncode == 0


def test_a_killed_worker_gives_back_the_connections_it_counted(home, ports):
    """kill -9 of a worker under load: the sessions it held were counted under MaxInboundConnectionPerSource in
    the table the workers share, and stayed counted (the address got 421 4.3.2) until the server restarted."""
    import asyncio
    import socket

    from mailgate.control import call_socket

    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 6', runtime=None)
    proc = serve(home, 2)

    def connect() -> tuple[socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", ports["frontend"]), source_address=("127.0.0.11", 0))
        s.settimeout(10)
        return s, s.recv(200)

    try:
        held = [connect() for _ in range(6)]
        assert all(g.startswith(b"220") for _, g in held)
        sessions = [asyncio.run(call_socket(home.worker_socket(i), "status", {}))["sessions"] for i in range(2)]
        assert sum(sessions) == 6
        victim_index = 0 if sessions[0] >= sessions[1] else 1
        victim = next(pid for pid in workers_of(proc.pid)
                      if f"--worker-index\0{victim_index}\0" in open(f"/proc/{pid}/cmdline").read())
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(workers_of(proc.pid)) == 2 and victim not in workers_of(proc.pid), timeout=30)
        def answers() -> bool:   # the successor is serving (the dead worker's socket file is still there)
            try:
                return asyncio.run(call_socket(home.worker_socket(victim_index), "status", {}, timeout=5)) is not None
            except OSError:
                return False

        wait_for(answers, timeout=30, interval=0.2, message="the new worker")
        for s, _ in held:
            s.close()

        def six_greeted() -> bool:   # the slots come back as the surviving worker ends those sessions
            again = [connect() for _ in range(6)]
            for s, _ in again:
                s.close()
            return [g[:3] for _, g in again] == [b"220"] * 6

        wait_for(six_greeted, timeout=10, interval=0.2, message="six sessions greeted from the address again")
    finally:
        stop(proc)


def test_a_client_that_reconnects_as_soon_as_it_reads_221_is_not_refused(home, ports):
    """Four threads of one client, each ending its session with QUIT and connecting again as soon as it reads the
    221, never hold more than four sessions: under MaxInboundConnectionPerSource 4 none may be refused. The
    session's place used to be given back only when the worker saw the close, so a reconnection that reached
    the other worker first got 421 4.3.2 (1 in 30)."""
    import socket
    import threading

    shell(home, 'Set-ReceiveConnector "Default Frontend EX01" -MaxInboundConnectionPerSource 4', runtime=None)
    proc = serve(home, 2)
    banners: list[bytes] = []

    def sessions(count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", ports["frontend"]), source_address=("127.0.0.12", 0),
                                          timeout=10) as s, s.makefile("rb") as replies:
                banner = replies.readline()
                banners.append(banner)
                if banner.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    assert replies.readline().startswith(b"221")

    try:
        threads = [threading.Thread(target=sessions, args=(200,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(banners) == 800
        assert [b for b in banners if not b.startswith(b"220")] == []
    finally:
        stop(proc)


def test_a_second_serve_on_the_same_data_directory_is_refused_and_the_first_goes_on(home, ports):
    """Two servers on one data directory would write the same queue files, and SO_REUSEPORT would let the
    second bind the same ports silently: the second `serve` stops at once with the reason."""
    from helpers import Server

    first = Server(home).start()
    try:
        second = cli(home, "serve", "--admin-listen", "off", timeout=60)
        assert second.returncode == 2
        assert "already running" in second.stderr and str(first.proc.pid) in second.stderr, second.stderr
        with smtplib.SMTP("127.0.0.1", ports["frontend"], timeout=10) as c:
            assert c.ehlo()[0] == 250
    finally:
        first.stop()
    again = Server(home).start()   # once stopped, the directory is free again (also after kill -9)
    again.kill()
    Server(home).start().stop()


def test_a_stopped_worker_exits_even_if_a_request_thread_is_still_busy():
    """A thread still running when the server has stopped (an admin API request running a long cmdlet)
    does not keep the process alive: it leaves after a short wait, saying which thread was busy."""
    code = ("import threading, time\n"
            "from mailgate.server import _leave_stuck_threads\n"
            "threading.Thread(target=time.sleep, args=(3600,), name='busy-request').start()\n"
            "_leave_stuck_threads(wait=0.5)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and time.monotonic() - started < 30
    assert "busy-request" in done.stderr


def test_result_size_counts_the_messages_of_every_worker_together(home, ports, monkeypatch):
    """-ResultSize N gives N messages in id order however many workers hold them; without it, 1000 and
    a warning that more exist (as in Exchange); -Identity finds one message among many. A listing is read a page
    at a time (here 64 messages), so no request holds a whole long queue, and every message comes once."""
    from mailgate.control import RuntimeClient
    from mailgate.manage import queues

    monkeypatch.setattr(queues, "MESSAGE_PAGE", 64)
    pages: list[int] = []
    plain_call = RuntimeClient.call

    def counted_call(self, op, **args):
        result = plain_call(self, op, **args)
        if op == "messages" and args.get("message_id") is None:
            pages.append(len({r["Identity"].rsplit("\\", 1)[1] for r in result}))
        return result

    monkeypatch.setattr(RuntimeClient, "call", counted_call)
    shell(home, f'Set-ReceiveConnector "Default Frontend EX01" -Bindings 127.0.0.1:{ports["frontend"]} '
                '-TarpitInterval 00:00:00 -MaxInboundConnectionPerSource unlimited\n'
                'Add-ADPermission "Default Frontend EX01" -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights '
                'ms-Exch-SMTP-Accept-Any-Recipient', runtime=None)
    proc = serve(home, 2)
    try:
        loaded = subprocess.run(["smtp-source", "-s", "8", "-m", "1010", "-l", "300", "-f", "a@b.example", "-t",
                                 "x@remote.example", f"127.0.0.1:{ports['frontend']}"], capture_output=True, timeout=120)
        assert loaded.returncode == 0, loaded.stderr
        assert "MessageCount : 1010" in shell(home, "Get-Queue EX01\\Unreachable | fl MessageCount").out

        def ids(result) -> list[int]:
            return [int(line.rsplit("\\", 1)[1]) for line in result.out.split()]

        pages.clear()
        first = shell(home, "Get-Message -ResultSize 5 | ForEach-Object { $_.Identity }")
        assert first.ok and "WARNING" not in first.out and len(ids(first)) == 5 and ids(first) == sorted(ids(first))
        assert pages == [6]   # no more read than the result size needs, and one to tell whether more exist
        pages.clear()
        everything = ids(shell(home, "Get-Message -ResultSize Unlimited | ForEach-Object { $_.Identity }"))
        assert len(everything) == 1010 and any(i > 10**12 for i in everything) and any(i < 10**12 for i in everything)
        assert everything == sorted(set(everything))   # in id order, each once
        assert len(pages) == 16 and max(pages) == 64, pages   # 15 full pages and the last (50)
        assert ids(first) == sorted(everything)[:5]
        pages.clear()
        default = shell(home, "Get-Message | ForEach-Object { $_.Identity }")
        assert sum(pages) == 1001, pages
        assert default.out.count("WARNING: Only the first 1000 items are shown") == 1
        assert len([line for line in default.out.split("\n") if line.startswith("EX01\\")]) == 1000
        wanted = max(everything)
        one = shell(home, f"Get-Message {wanted} | ForEach-Object {{ $_.Identity }}")
        assert one.ok and ids(one) == [wanted], one
        # An action with -Filter reaches every message that matches, not the first 1000 of a listing; what it
        # would do is said in one line that names ten of them, not all.
        whatif = shell(home, "Remove-Message -Filter \"FromAddress -eq 'a@b.example'\" -WhatIf")
        assert whatif.ok and whatif.out.count("\\Unreachable\\") == 10, whatif.out[:300]
        assert "and 1,000 more (1,010 in all)." in whatif.out
        suspended = shell(home, "Suspend-Message -Filter \"FromAddress -eq 'a@b.example'\" -Confirm:$false; "
                                "(Get-Message -Filter \"Status -eq 'Suspended'\" -ResultSize Unlimited).Count")
        assert suspended.ok and suspended.out.split() == ["1010"], (suspended.out[-300:], suspended.err)
    finally:
        stop(proc)


def test_sighup_reads_the_configuration_again_and_stops_nothing(home, ports):
    """SIGHUP, as daemons take it (and as a closed terminal sends it): with one worker or several, the server
    reads its configuration again and goes on taking mail; it used to die of the signal's default action."""
    shell(home, f'Set-ReceiveConnector "Default Frontend EX01" -Bindings 127.0.0.1:{ports["frontend"]}', runtime=None)
    for workers in (2, 1):
        proc = serve(home, workers)
        try:
            log = home.path / f"serve-{workers}.log"
            children = workers_of(proc.pid)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "SIGHUP: reading the configuration again." in log.read_text(), timeout=10)
            time.sleep(1)
            assert proc.poll() is None and workers_of(proc.pid) == children, log.read_text()
            with smtplib.SMTP("127.0.0.1", ports["frontend"], timeout=20) as c:
                assert c.noop()[0] == 250
        finally:
            stop(proc)


def test_a_data_directory_deep_in_the_file_system_still_has_its_control_sockets(tmp_path):
    """Socket addresses hold 107 bytes: with a data directory this deep, serve ended with 'AF_UNIX path too
    long' and the shell could not reach it."""
    home = make_home(tmp_path / ("deep-directory-" * 4) / ("of-an-organisation-" * 3) / "EX01")
    assert len(str(home.control_socket)) > 110
    bind_ports(home)
    proc = serve(home, 2)
    try:
        queues = shell(home, "Get-Queue | Measure-Object | % Count")   # the shell → supervisor → each worker
        assert queues.ok and int(queues.out.split()[0]) >= 2, queues.err
        probe = shell(home, "Test-SmtpConnectivity | ft StatusCode -HideTableHeaders")
        assert probe.ok and probe.out.split() == ["Success", "Success"], probe.err
        assert oct((home.run_dir / "control.sock").stat().st_mode & 0o777) == "0o600"
    finally:
        stop(proc)


def test_a_second_server_cannot_share_a_binding_through_so_reuseport(home, ports, tmp_path):
    """Workers share their endpoints with SO_REUSEPORT, which lets any process of the same user that sets it bind
    them too: a second mailgate (its own data directory, the same binding) started without a word and took half
    of the connections. It now gets the "already in use" error, as any other program would; the first keeps
    them all."""
    shared = free_port()
    other = make_home(tmp_path / "other", server="EX02", domain="other.example")
    bind_ports(other)
    for h in (home, other):
        assert shell(h, f"New-ReceiveConnector Shared -Bindings 127.0.0.1:{shared} -RemoteIPRanges 127.0.0.0/8 "
                        "-Usage Custom", runtime=None).ok
    first = serve(home, 2)
    try:
        second = serve(other, 2)
        try:
            log = (other.path / "serve-2.log").read_text()
            assert f"can't listen on 127.0.0.1:{shared}: the address is already in use" in log, log
            banners = set()
            for _ in range(40):
                with socket.create_connection(("127.0.0.1", shared), timeout=10) as c:
                    banners.add(c.recv(200).split()[1].decode())
            assert len(banners) == 1 and banners.pop().lower().startswith("ex01."), "the second server answered"
        finally:
            stop(second)
    finally:
        stop(first)


def test_a_binding_held_by_another_program_is_taken_as_soon_as_it_is_free(home, ports):
    """A port another program holds when the server starts (Postfix on 25, an old server's workers still going)
    is reported and tried again every poll: the connector listens once the port is free, with no change to the
    configuration and no restart (it stayed closed until one)."""
    port = free_port()
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("127.0.0.1", port))
    held.listen(1)
    assert shell(home, f"New-ReceiveConnector Late -Bindings 127.0.0.1:{port} -RemoteIPRanges 127.0.0.0/8 "
                       "-Usage Custom", runtime=None).ok
    proc = serve(home, 2)
    try:
        log = home.path / "serve-2.log"
        assert f"can't listen on 127.0.0.1:{port}: the address is already in use" in log.read_text()
        held.close()

        def greeted() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    return c.recv(100).startswith(b"220 ")
            except OSError:
                return False

        wait_for(greeted, timeout=15, message="the connector listening once its port is free")
        # Each worker takes the port at its own next poll and says so (the first one may have answered already).
        wait_for(lambda: f"Listening on 127.0.0.1:{port} for EX01\\Late" in log.read_text(), timeout=15,
                 message="the report that the connector listens")
    finally:
        held.close()
        stop(proc)


class _Client:
    """A raw SMTP client that stops wherever the test wants."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220 ")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def chunk(self, data: bytes, *, last: bool = False) -> bytes:
        self.sock.sendall(b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data)
        return self.reply()

    def into_data(self, recipient: bytes) -> None:
        assert self.command(b"EHLO client.test").startswith(b"250")
        assert self.command(b"MAIL FROM:<app@client.test>").startswith(b"250")
        assert self.command(b"RCPT TO:<" + recipient + b">").startswith(b"250")
        assert self.command(b"DATA").startswith(b"354")


def test_sigterm_lets_a_message_being_sent_finish_and_turns_the_rest_away(home, ports):
    """SPEC: serve drains gracefully on SIGTERM. Listening stops at once; a session between messages gets
    421 4.3.2 at once; one whose message body is arriving may finish it and gets its 250 (the message is kept
    and delivered), then 421 at its next command; a body still unfinished after the 10 s grace is cut off
    unanswered (the sender tries again: nothing it was told is taken is lost)."""
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com").ok
    srv = Server(home)
    srv.ports = ports
    srv.start()
    port = ports["frontend"]
    idle, in_envelope, finishing, stalled = (_Client(port) for _ in range(4))
    assert idle.command(b"EHLO client.test").startswith(b"250")
    assert in_envelope.command(b"EHLO client.test").startswith(b"250")
    assert in_envelope.command(b"MAIL FROM:<app@client.test>").startswith(b"250")
    finishing.into_data(b"admin@domain.com")
    finishing.sock.sendall(b"Subject: sent while the server stops\r\n\r\nfirst half\r\n")
    stalled.into_data(b"admin@domain.com")
    stalled.sock.sendall(b"Subject: never finished\r\n\r\nstarted\r\n")
    chunked = _Client(port)   # BDAT: between two chunks of its message when the server is told to stop
    assert chunked.command(b"EHLO client.test").startswith(b"250")
    assert chunked.command(b"MAIL FROM:<app@client.test>").startswith(b"250")
    assert chunked.command(b"RCPT TO:<admin@domain.com>").startswith(b"250")
    assert chunked.chunk(b"Subject: sent in chunks\r\n\r\n").startswith(b"250")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert idle.reply() == b"421 4.3.2 Service not available\r\n"
    assert in_envelope.reply() == b"421 4.3.2 Service not available\r\n"
    wait_for(lambda: _refused(port), timeout=5, message="the listener to close")
    time.sleep(1)
    end = finishing.command(b"second half\r\n.")
    assert end.startswith(b"250 2.6.0"), end
    assert finishing.command(b"MAIL FROM:<app@client.test>") == b"421 4.3.2 Service not available\r\n"
    assert chunked.chunk(b"the last chunk\r\n", last=True).startswith(b"250 2.6.0")
    assert chunked.command(b"NOOP") == b"421 4.3.2 Service not available\r\n"
    assert stalled.file.read() == b""   # closed at the end of the grace, the body never answered
    assert srv.proc.wait(30) == 0
    assert 9 < time.monotonic() - started < 25
    srv.stop()
    srv.start()
    got = wait_for(lambda: len(got := maildir_messages(home, "admin@domain.com")) == 2 and got, timeout=20,
                   message="both finished messages")
    assert [b"sent while the server stops" in m and b"second half" in m for m in got].count(True) == 1
    assert [b"sent in chunks" in m and b"the last chunk" in m for m in got].count(True) == 1
    srv.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False
