"""`mailgate shell` as an administrator meets it: a terminal (a pseudo-terminal here), the seed's smart-host
command typed line by line with its backtick continuations, `(Get-Credential)` asking at the terminal with
the password not echoed, tab completion of cmdlets and of parameters on a continuation line, history."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import seed
from helpers import PYTHON, ROOT, make_home

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]|\r")
# prompt_toolkit turns bracketed paste on each time it starts reading a line: one per prompt shown
PROMPT_SHOWN = b"\x1b[?2004h"


class Terminal:
    """A program on a pseudo-terminal of 160 × 50, read and typed into like a person at a keyboard."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                                     close_fds=True)
        os.close(slave)
        self.raw = b""          # everything the program wrote
        self._seen = 0          # how much of ``raw`` the waits below have consumed

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:     # the program exited and closed the terminal
                pass

    def _wait(self, find, what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (end := find()) < 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never appeared; the terminal shows:\n{plain(self.raw[self._seen:])}")
            self._read(0.1)
        before, self._seen = self.raw[self._seen:end], end
        return plain(before)

    def expect(self, wanted: str, timeout: float = 20) -> str:
        """Wait until ``wanted`` is on the screen after what was already read; the text before it."""
        return self._wait(lambda: self._end_of(wanted.encode()), repr(wanted), timeout)

    def prompt(self, timeout: float = 20) -> str:
        """Wait for the shell's next line prompt; what the terminal showed before it (a command's output)."""
        return self._wait(lambda: self._end_of(PROMPT_SHOWN), "a new prompt", timeout)

    def _end_of(self, wanted: bytes) -> int:
        at = self.raw.find(wanted, self._seen)
        return at + len(wanted) if at >= 0 else -1

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def complete(self, keys: str, completed: str) -> None:
        """Type ``keys`` ending in Tab and wait until the completion is shown (later keys would cancel it)."""
        self.type(keys)
        self.expect(completed)

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=20)
        finally:
            os.close(self.master)


def shell_terminal(home) -> Terminal:
    """`mailgate shell` of ``home`` on a terminal (prompt_toolkit asks the terminal nothing it can't answer)."""
    env = {**os.environ, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    return Terminal([PYTHON, "-m", "mailgate.cli", "--home", str(home.path), "shell"], env)


def plain(raw: bytes) -> str:
    return ANSI.sub(b"", raw).decode("utf-8", "replace")


def test_seed_smart_host_command_typed_at_the_terminal(tmp_path):
    home = make_home(tmp_path / "EX01", server="EX01", domain="domain.com")
    term = shell_terminal(home)
    try:
        term.prompt()
        command = seed.command_containing("SmartHost Connector")
        lines = command.splitlines()
        assert len(lines) > 1 and all(line.rstrip().endswith("`") for line in lines[:-1]), command
        for line in lines:          # each continuation line is typed at its own ">>" prompt
            term.type(line + "\r")
            term.prompt() if line is not lines[-1] else None
        term.expect("User: ")
        term.type("relayuser\r")
        term.expect("Password for user relayuser:")
        term.type("S3cret!\r")
        created = term.prompt()
        assert "SmartHost Connector" in created and "{SMTP:*;1}" in created, created

        # a cmdlet name completed with Tab, then a parameter completed on a continuation line
        term.complete("Set-SendConn\t", "Set-SendConnector")
        term.type(' "SmartHost Connector" `\r')
        term.prompt()
        term.complete("-RequireT\t", "-RequireTLS")
        term.type(" $true\r")
        changed = term.prompt()
        assert "Set-SendConnector" not in changed.split("-RequireTLS $true", 1)[-1], changed   # no error
        term.type("Get-SendConnector 'SmartHost Connector' | fl Name,SmartHosts,SmartHostAuthMechanism,RequireTLS\r")
        listed = term.prompt()
        assert re.search(r"SmartHosts\s+: \{smtp\.relay\.com\}", listed), listed
        assert re.search(r"SmartHostAuthMechanism\s+: BasicAuth", listed), listed
        assert re.search(r"RequireTLS\s+: True", listed), listed

        # the up arrow brings the last command back
        term.type("\x1b[A")
        term.expect("RequireTLS")
        term.type("\r")
        assert re.search(r"RequireTLS\s+: True", term.prompt()), "the recalled command didn't run"
        term.type("exit\r")
        assert term.close() == 0, plain(term.raw)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "S3cret!" not in plain(term.raw), "the password was echoed to the terminal"
    history = (home.path / ".shell_history").read_text()
    assert "Set-SendConnector" in history and "-RequireTLS $true" in history, history
    stored = subprocess.run([PYTHON, "-m", "mailgate.cli", "--home", str(home.path), "shell", "-c",
                             "(Get-SendConnector 'SmartHost Connector').AuthenticationCredential.UserName"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert stored.stdout.strip() == "relayuser", stored
    assert "S3cret!" not in history


def test_ctrl_c_stops_a_running_loop_and_the_shell_goes_on(tmp_path):
    """An endless loop typed at the prompt is stopped with Ctrl-C (the terminal's SIGINT): the shell comes back
    to its prompt, the variables the loop set are kept (it used to end the shell with a traceback)."""
    import signal

    home = make_home(tmp_path / "EX01", server="EX01", domain="domain.com")
    term = shell_terminal(home)
    try:
        term.prompt()
        term.type("$n = 0; while ($true) { $n++; Start-Sleep -Seconds 0.05 }\r")
        term.expect("Start-Sleep -Seconds 0.05 }")
        time.sleep(1.0)
        os.kill(term.proc.pid, signal.SIGINT)
        term.prompt()
        term.type('"loops: $n"\r')
        counted = term.prompt()
        assert int(re.search(r"loops: (\d+)", counted).group(1)) > 0, counted
        term.type("exit\r")
        term.close()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert "Traceback" not in plain(term.raw), plain(term.raw)


def test_remove_cmdlets_ask_first_at_the_terminal_as_exchanges_shell_does(tmp_path):
    """Remove-* is High impact: at the terminal it asks (N keeps the object), -Confirm:$false doesn't ask, and a
    script (-c) never waits for an answer."""
    from helpers import cli

    home = make_home(tmp_path / "EX01", server="EX01", domain="domain.com")
    assert cli(home, "shell", "-c", "New-AcceptedDomain One -DomainName one.example; "
                                    "New-AcceptedDomain Two -DomainName two.example").returncode == 0
    term = shell_terminal(home)
    try:
        term.prompt()
        term.type("Remove-AcceptedDomain One\r")
        term.expect('Removing accepted domain "One".')
        term.expect('(default is "Y"): ')
        term.type("n\r")
        term.prompt()
        term.type("Remove-AcceptedDomain Two -Confirm:$false\r")
        shown = term.prompt()
        assert "Are you sure" not in shown, shown
        term.type("(Get-AcceptedDomain | % Name) -join ','\r")
        assert "domain.com,One" in term.prompt().replace("\n", "")
        term.type("Remove-AcceptedDomain One\r")
        term.expect('(default is "Y"): ')
        term.type("y\r")
        term.prompt()
        term.type("exit\r")
        term.close()
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    assert cli(home, "shell", "-c", "(Get-AcceptedDomain | % Name) -join ','").stdout.strip() == "domain.com"
