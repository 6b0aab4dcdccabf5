"""The management shell as a user meets it: interactive (history, completion),
``-c`` commands, ``-f`` scripts, or commands on standard input."""

from __future__ import annotations

import getpass
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory

from mailgate.errors import UserError
from mailgate.manage import load_cmdlets
from mailgate.manage.cmdlets import registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import value_choices
from mailgate.shell.evaluator import Evaluator
from mailgate.shell.format import OpenOutput, default_render
from mailgate.shell.parser import is_incomplete
from mailgate.shell.streams import Chunk


class LinePrompter:
    """Answers prompts (Get-Credential) from a terminal, or from lines of standard input."""

    def __init__(self, lines: Iterable[str] | None = None, err: TextIO | None = None) -> None:
        self._lines = iter(lines) if lines is not None else None
        self._err = err or sys.stderr

    def notice(self, text: str) -> None:
        self._err.write(text + "\n")
        self._err.flush()

    def ask(self, prompt: str, *, secret: bool = False) -> str:
        if self._lines is None and sys.stdin.isatty():
            if secret:
                return getpass.getpass(prompt, stream=self._err)
            self._err.write(prompt)
            self._err.flush()
            return sys.stdin.readline().rstrip("\r\n")
        self._err.write(prompt + "\n")
        self._err.flush()
        source = self._lines if self._lines is not None else sys.stdin
        line = next(iter(source), None) if self._lines is not None else sys.stdin.readline()
        if not line:
            raise UserError(f"No answer for the prompt '{prompt.strip()}': standard input has ended.")
        return line.rstrip("\r\n")


class Shell:
    def __init__(self, ctx: ManagementContext, *, out: TextIO | None = None, err: TextIO | None = None) -> None:
        load_cmdlets()
        self.ctx = ctx
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.evaluator = Evaluator(ctx, emit=self._emit, report=self._report)
        self._open = OpenOutput()   # a streamed table still being printed (its chunks come one by one)

    # -- output --------------------------------------------------------------------
    def _emit(self, objects: list[Any]) -> None:
        if not objects:
            return
        limit = self.evaluator.enumeration_limit()
        width = shutil.get_terminal_size().columns if self.out.isatty() else None
        streamed = isinstance(objects, Chunk)
        if self._open.layout is not None and not (streamed and not objects.first):
            self.out.write("\n")   # a streamed table cut short (an error, a warning): it ends here
            self._open = OpenOutput()
        for line in default_render(objects, limit=limit, width=width, carry=self._open if streamed else None):
            self.out.write(line + "\n")
        self.out.flush()

    def _report(self, exc: UserError, cmdlet: str | None, position: tuple[int, int, str, int] | None) -> None:
        self.out.flush()
        lines = [f"{cmdlet} : {exc.message}" if cmdlet else exc.message]
        if position:
            line, col, text, end = position
            underline = "~" * max(1, min(end, len(text.rstrip()) + 1) - col)
            lines += [f"At line:{line} char:{col}", f"+ {text}", "+ " + " " * (col - 1) + underline]
        target = f"{exc.target}:String" if exc.target else ":"
        where = f"[{cmdlet}], " if cmdlet else ""
        lines.append(f"    + CategoryInfo          : {exc.category}: ({target}) {where}{exc.exception_name}")
        error_id = exc.exception_name + (f",{cmdlet}" if cmdlet else "")
        if exc.parameter:
            error_id = f"{exc.exception_name},Parameter={exc.parameter}" + (f",{cmdlet}" if cmdlet else "")
        lines.append(f"    + FullyQualifiedErrorId : {error_id}")
        text = "\n".join(lines)
        if self.err.isatty():
            text = f"\x1b[91m{text}\x1b[0m"
        self.err.write(text + "\n\n")
        self.err.flush()

    # -- modes ------------------------------------------------------------------------
    def run_text(self, text: str) -> bool:
        return self.evaluator.run(text)

    def run_file(self, path: Path) -> bool:
        try:
            # Bytes that aren't UTF-8 are kept as surrogates, so the parser can say where they are.
            text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
        except OSError as exc:
            self._report(UserError(f"The script {path} can't be read: {exc.strerror}."), None, None)
            return False
        return self.run_text(text)

    def run_lines(self, lines: Iterable[str]) -> bool:
        """Run commands as they complete, reading line by line (so prompts read the following lines)."""
        ok = True
        buffer = ""
        iterator = iter(lines)
        self.ctx.prompter = LinePrompter(iterator, self.err)
        for line in iterator:
            buffer += line if line.endswith("\n") else line + "\n"
            if is_incomplete(buffer):
                continue
            if buffer.strip():
                ok = self.run_text(buffer) and ok
            buffer = ""
        if buffer.strip():
            ok = self.run_text(buffer) and ok
        return ok

    def interactive(self, history_file: Path) -> bool:
        completer = CmdletCompleter()
        session: PromptSession[str] = PromptSession(history=FileHistory(str(history_file)), completer=completer,
                                                    complete_while_typing=False)
        self.out.write("mailgate management shell. Get-Command lists cmdlets; Get-Help <cmdlet> explains one; "
                       "exit quits.\n")
        ok = True
        prompt = f"[PS] {self.ctx.server_name}> "
        while True:
            try:
                text = session.prompt(prompt)
                while is_incomplete(text):
                    completer.earlier_lines = text
                    text += "\n" + session.prompt(">> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            finally:
                completer.earlier_lines = ""
            if text.strip().lower() in ("exit", "quit"):
                break
            if text.strip():
                try:
                    ok = self.run_text(text) and ok
                except KeyboardInterrupt:   # Ctrl-C stops what runs (a loop, -Follow), not the shell
                    self.out.write("\n")
                    ok = False
        return ok


class CmdletCompleter(Completer):
    """Tab completion of cmdlet names and of the parameters of the cmdlet being typed, also on the
    continuation lines of a command (``>>`` after a backtick or an open pipe)."""

    def __init__(self) -> None:
        self.earlier_lines = ""     # the lines of the command typed so far, before the one being edited

    def get_completions(self, document: Any, complete_event: Any) -> Iterable[Completion]:
        line = document.text_before_cursor
        text = f"{self.earlier_lines}\n{line}" if self.earlier_lines else line
        word = document.get_word_before_cursor(WORD=True)
        segment = text.rsplit("|", 1)[-1].lstrip()
        words = segment.split()
        previous = words[-1] if line.endswith(" ") and words else words[-2] if len(words) >= 2 else ""
        if previous.startswith("-") and not word.startswith("-"):   # -Usage <Tab>: the values it takes
            try:
                param = registry.get(words[0]).param(previous[1:].rstrip(":"))
            except UserError:
                return
            for value in value_choices(param):
                if value.lower().startswith(word.lower()):
                    yield Completion(value, start_position=-len(word))
            return
        if word.startswith("-") and words:
            try:
                cmd = registry.get(words[0])
            except UserError:
                return
            for p in cmd.params:
                if p.name.lower().startswith(word[1:].lower()):
                    yield Completion("-" + p.name, start_position=-len(word))
            return
        if len(words) <= 1 and not line.endswith(" "):
            for c in registry.all():
                if c.name.lower().startswith(word.lower()):
                    yield Completion(c.name, start_position=-len(word))