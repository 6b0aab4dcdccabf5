"""Evaluating parsed shell text: statements, pipelines, expressions, strings.

Values are plain Python values: str, int, float, bool, None, list (arrays),
``CIDict`` (hashtables), ``ScriptBlock``, ``Record`` (cmdlet output) and a
few objects such as PSCredential. Cmdlets come from the management registry;
errors a user caused are reported in Exchange's style and the script goes
on, as PowerShell does with non-terminating errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator

from lark import Token, Tree

from mailgate.config.store import is_unreachable, unreachable_reason
from mailgate.config.values import ByteSize, TimeSpan
from mailgate.errors import ParseError, UserError
from mailgate.manage.cmdlets import Cmdlet, action_preference, registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.credentials import PSCredential, SecureString
from mailgate.manage.present import Record, custom_object
from mailgate.manage.psvalues import (
    CIDict,
    ShellError,
    compare,
    dotnet_strftime,
    format_operator,
    parse_number,
    text_operator,
    to_text,
    truthy,
)
from mailgate.shell import binder, textfiles
from mailgate.shell import format as fmt
from mailgate.shell.format import Formatted, get_property
from mailgate.shell.parser import NESTED_TOO_DEEPLY, parse
from mailgate.shell.streams import Stream, marked, write_printed

log = logging.getLogger("mailgate.shell")

_MISSING = object()
MAX_RANGE = 1_000_000   # values one range operator may make (PowerShell allows more; a shell typo shouldn't eat memory)


class TypeRef:
    def __init__(self, name: str) -> None:
        self.name = name.strip("[]")

    def __str__(self) -> str:
        return self.name


class Terminating(Exception):
    """An error that ends its statement, and with ``stops_script`` the whole script, unless a try block
    catches it: a command or binding error (statement), an error of a cmdlet run with -ErrorAction Stop or
    under $ErrorActionPreference = "Stop", or a throw (script)."""

    def __init__(self, error: UserError, node: Any, cmdlet: str | None, *, stops_script: bool) -> None:
        super().__init__(error.message)
        self.error, self.node, self.cmdlet, self.stops_script = error, node, cmdlet, stops_script


class LoopControl(Exception):
    """``break`` or ``continue``: caught by the innermost loop (foreach, for, while, do); outside any loop it ends
    the script, as in PowerShell."""

    def __init__(self, keyword: str) -> None:
        super().__init__(keyword)
        self.is_break = keyword == "break"


MAX_ERRORS_KEPT = 256   # $Error keeps the newest errors, as PowerShell's $MaximumErrorCount


class ErrorRecord(Record):
    """``$_`` in a catch block: ``$_.Exception.Message``, ``"$_"`` is the message, as in PowerShell."""

    def __init__(self, error: UserError, cmdlet: str | None) -> None:
        name = error.exception_name
        self.error = error
        super().__init__("ErrorRecord", {
            "Exception": Record(name, {"Message": error.message}),
            "CategoryInfo": f"{error.category}: ({error.target}:) [{cmdlet or ''}], {name}",
            "FullyQualifiedErrorId": f"{name},{cmdlet}" if cmdlet else name,
            "TargetObject": error.target or None})

    def __str__(self) -> str:
        return str(self.get("Exception").get("Message"))


class ScriptBlock:
    def __init__(self, statements: list[Tree], evaluator: "Evaluator", text: str) -> None:
        self.statements = statements
        self.evaluator = evaluator
        self.text = text

    def invoke(self, dollar_: Any = _MISSING) -> list[Any]:
        return self.evaluator.invoke_block(self.statements, dollar_)

    def __str__(self) -> str:
        """The code between the braces, as PowerShell converts a script block to a string: so that
        ``-Filter {MessageCount -gt 0}`` is the filter "MessageCount -gt 0"."""
        text = self.text.strip()
        return text[1:-1] if text.startswith("{") and text.endswith("}") else text


def unwrap(values: list[Any]) -> Any:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return list(values)


class Evaluator:
    def __init__(self, ctx: ManagementContext, *, emit: Callable[[list[Any]], None],
                 report: Callable[[UserError, str | None, Any], None]) -> None:
        self.ctx = ctx
        self.emit = emit
        self.report = report
        self.variables: dict[str, Any] = {"formatenumerationlimit": 4, "erroractionpreference": "Continue",
                                          "confirmpreference": "High", "ofs": " "}
        self.failed = False
        self.verbose_requested = False   # the running command's -Verbose (Write-Verbose reads it)
        self._source = ""
        self._deferred_errors: list[tuple[str, str]] = []
        # [System.Net.ServicePointManager]'s settings scripts assign (lower-case names): Send-MailMessage reads
        # ServerCertificateValidationCallback, as .NET's SmtpClient does.
        self.service_point: dict[str, Any] = {}
        self._error_sink: list[tuple[UserError, str | None]] | None = None     # 2> or 2>&1 of the running command
        self._warning_sink: list[str] | None = None                            # 3> of the running command

    # -- entry points ------------------------------------------------------------
    def run(self, text: str) -> bool:
        """Run a script; False when any statement failed."""
        ok = True
        try:
            tree = parse(text)
        except ParseError as exc:
            self.failed = True
            self.report(exc, None, None)
            return False
        previous, self._source = self._source, text
        self._script_stopped = False
        try:
            for stmt in tree.children:
                if not self.run_statement(stmt):
                    ok = False
                if self._script_stopped:   # -ErrorAction Stop or throw, not caught: the rest doesn't run
                    break
        finally:
            self._source = previous
        return ok

    def run_statement(self, stmt: Tree) -> bool:
        self._statement_failed = False
        self._deferred_errors = []
        try:
            self.execute(stmt, self.emit, nested_errors=True)
        except LoopControl:   # break or continue outside a loop: the script ends there, without an error
            self._script_stopped = True
        except Terminating as stop:
            self._fail(stop.error, stop.node, stop.cmdlet)
            self._script_stopped = stop.stops_script
        except UserError as exc:
            self._fail(exc, stmt)
        except RecursionError:   # brackets or script blocks nested thousands deep
            self._fail(UserError(NESTED_TOO_DEEPLY), stmt)
        except Exception as exc:  # noqa: BLE001 - a bug in evaluating the language: reported, the session goes on
            log.debug("statement raised", exc_info=True)
            self._fail(UserError(f"The statement failed with an internal error ({type(exc).__name__}: {exc}). "
                                 "This is a bug in mailgate."), stmt)
        for cmdlet_name, message in self._deferred_errors:
            self._fail(UserError(message), stmt, cmdlet_name)
        self._deferred_errors = []
        self.variables["?"] = not self._statement_failed
        return not self._statement_failed

    def _fail(self, exc: UserError, node: Any, cmdlet: str | None = None) -> None:
        self.failed = True
        self._statement_failed = True
        self._remember_error(exc, cmdlet)
        self.report(exc, cmdlet, self._position(node))

    def _remember_error(self, exc: UserError, cmdlet: str | None) -> None:
        """$Error: the session's errors, newest first (also those -ErrorAction SilentlyContinue keeps quiet)."""
        errors = self.variables.setdefault("error", [])
        if isinstance(errors, list):
            errors.insert(0, ErrorRecord(exc, cmdlet))
            del errors[MAX_ERRORS_KEPT:]

    def _position(self, node: Any) -> tuple[int, int, str, int] | None:
        meta = getattr(node, "meta", None)
        if meta is None or getattr(meta, "empty", True):
            return None
        lines = self._source.splitlines()
        line = lines[meta.line - 1] if 0 < meta.line <= len(lines) else ""
        end = meta.end_column if meta.end_line == meta.line else len(line) + 1
        return meta.line, meta.column, line, end

    # -- variables ------------------------------------------------------------------
    def get_variable(self, name: str) -> Any:
        key = name.lower()
        if key in ("true",):
            return True
        if key == "false":
            return False
        if key == "null":
            return None
        if key == "env:computername":   # scripts name the local Exchange server so: Get-Queue -Server $env:COMPUTERNAME
            return os.environ.get("COMPUTERNAME") or self.ctx.server_name
        if key.startswith("env:"):
            return os.environ.get(name[4:])
        return self.variables.get(key)

    def enumeration_limit(self) -> int:
        """$FormatEnumerationLimit: how many items of a list a table or list shows (4 unless set)."""
        try:
            return int(self.variables.get("formatenumerationlimit", 4))
        except (TypeError, ValueError):
            return 4

    def set_variable(self, name: str, value: Any) -> None:
        key = name.lower()
        if key in ("true", "false", "null"):
            raise ShellError(f"Cannot overwrite variable {name} because it is read-only or constant.")
        if key.startswith("env:"):
            os.environ[name[4:]] = to_text(value)
            return
        self.variables[key] = value

    @staticmethod
    def _var_name(token: str) -> str:
        name = token[1:]
        if name.startswith("{") and name.endswith("}"):
            name = name[1:-1]
        return name

    def execute(self, stmt: Tree, output: Callable[[list[Any]], None], *, nested_errors: bool = False) -> None:
        """Run one statement, giving what it outputs to ``output``. With ``nested_errors``, a failing statement
        in a foreach or if body is reported and the loop goes on (PowerShell's non-terminating errors: one bad
        address in a list doesn't stop the rest); inside a script block of a cmdlet an error ends the block."""
        kind = stmt.data
        if kind == "assignment":
            self.assign(stmt)
        elif kind == "increment":
            self.increment(stmt)
        elif kind == "foreach_statement":
            _, variable, _, source, body = stmt.children
            name = self._var_name(str(variable))
            for item in self.eval_pipeline(source):
                self.set_variable(name, item)
                if not self._loop_body(body, output, nested_errors):
                    break
        elif kind in ("for_statement", "while_statement", "do_statement"):
            self._loop(stmt, output, nested_errors)
        elif kind in ("break_statement", "continue_statement"):
            raise LoopControl(kind.split("_")[0])
        elif kind == "if_statement":
            parts = [c for c in stmt.children if isinstance(c, Tree)]   # condition, block, condition, block, [block]
            while parts:
                if len(parts) == 1:   # else
                    self._execute_block(parts[0], output, nested_errors)
                    break
                condition, body, parts = parts[0], parts[1], parts[2:]
                if truthy(unwrap(self.eval_pipeline(condition))):
                    self._execute_block(body, output, nested_errors)
                    break
        elif kind == "try_statement":
            self._try(stmt, output, nested_errors)
        elif kind == "throw_statement":
            reason = unwrap(self.eval_pipeline(stmt.children[1])) if len(stmt.children) > 1 else None
            raise Terminating(reason.error if isinstance(reason, ErrorRecord) else
                              UserError(to_text(reason) or "ScriptHalted"), stmt, None, stops_script=True)
        else:
            result = self.eval_pipeline(stmt, stream=True)
            if isinstance(result, Stream):   # printed (or collected) a chunk at a time, as it is read
                for chunk in marked(result):
                    output(chunk)
            else:
                output(result)

    def _loop_body(self, body: Tree, output: Callable[[list[Any]], None], nested_errors: bool) -> bool:
        """One turn of a loop's body; False when ``break`` ends the loop."""
        try:
            self._execute_block(body, output, nested_errors)
        except LoopControl as control:
            return not control.is_break
        return True

    def _loop(self, stmt: Tree, output: Callable[[list[Any]], None], nested_errors: bool) -> None:
        """for (init; condition; step) {…}, while (condition) {…}, do {…} while/until (condition). A missing
        condition of for is $true, as in PowerShell (for (;;) runs until break)."""
        parts = {c.data: c for c in stmt.children if isinstance(c, Tree)}
        body = parts["block"]

        def holds() -> bool:
            condition = parts.get("for_condition") or parts.get("pipeline")
            if condition is None:
                return True
            if condition.data == "for_condition":
                condition = condition.children[0]
            value = truthy(unwrap(self.eval_pipeline(condition)))
            if stmt.data == "do_statement" and str(stmt.children[2]).strip().lower() == "until":
                return not value
            return value

        def run_part(name: str) -> None:
            part = parts.get(name)
            if part is not None:
                self.execute(part.children[0], output)

        run_part("for_init")
        if stmt.data == "do_statement":
            if not self._loop_body(body, output, nested_errors):
                return
        while holds():
            if not self._loop_body(body, output, nested_errors):
                return
            run_part("for_step")

    def increment(self, stmt: Tree) -> None:
        """``$i++``, ``$i--``, ``++$i``, ``--$i`` (as statements: their value isn't output)."""
        op, target = (stmt.children[1], stmt.children[0]) if isinstance(stmt.children[1], Token) \
            else (stmt.children[0], stmt.children[1])
        value = arithmetic(str(op)[0], self.eval(target), 1)
        self._store(target, value)

    def _execute_block(self, block: Tree, output: Callable[[list[Any]], None], nested_errors: bool) -> None:
        for stmt in block.children:
            if not nested_errors:
                self.execute(stmt, output)
                continue
            try:
                self.execute(stmt, output, nested_errors=True)
            except Terminating as stop:
                if stop.stops_script:
                    raise
                self._fail(stop.error, stop.node, stop.cmdlet)
            except UserError as exc:
                self._fail(exc, stmt)

    def _try(self, stmt: Tree, output: Callable[[list[Any]], None], nested_errors: bool) -> None:
        """try/catch/finally: a terminating error in the try block runs the first catch block (any type named
        catches: mailgate's errors have no .NET types to tell apart), with $_ the error; finally always runs.
        As in PowerShell, an error a cmdlet reports and goes on from isn't caught: add -ErrorAction Stop."""
        blocks = [c for c in stmt.children if isinstance(c, Tree)]
        keywords = [str(c).strip().lower() for c in stmt.children if isinstance(c, Token) and c.type != "TYPE_LITERAL"]
        body, handlers = blocks[0], list(zip(keywords[1:], blocks[1:]))
        catch = next((b for k, b in handlers if k == "catch"), None)
        final = next((b for k, b in handlers if k == "finally"), None)
        try:
            try:
                self._execute_block(body, output, nested_errors=False)
            except (Terminating, UserError) as exc:
                if catch is None:
                    raise
                error, cmdlet = (exc.error, exc.cmdlet) if isinstance(exc, Terminating) else (exc, None)
                saved = self.variables.get("_", _MISSING)
                self.variables["_"] = ErrorRecord(error, cmdlet)
                try:
                    self._execute_block(catch, output, nested_errors)
                finally:
                    if saved is _MISSING:
                        self.variables.pop("_", None)
                    else:
                        self.variables["_"] = saved
        finally:
            if final is not None:
                self._execute_block(final, output, nested_errors)

    def assign(self, stmt: Tree) -> None:
        """``target op pipeline``: the target is a variable, a property (``$rc.RemoteIPRanges``) or an item
        (``$list[0]``, ``$table["key"]``); ``+=`` and the like combine with the target's value first."""
        target, op, pipeline = stmt.children
        head = pipeline.children[0] if pipeline.data == "pipeline" else pipeline
        if pipeline.data == "pipeline" and len(pipeline.children) == 1 and head.data != "command":
            value = self.eval(head)   # an expression's value as it is: $a = @() is an empty array, not $null
        else:
            value = unwrap(self.eval_pipeline(pipeline))   # a command's output: nothing, one object, or an array
        if str(op) != "=":
            value = arithmetic(str(op)[0], self.eval(target), value)
        self._store(target, value)

    def _store(self, target: Tree, value: Any) -> None:
        """Give ``value`` to an assignment's target: a variable, a property or an item."""
        if target.data == "variable":
            self.set_variable(self._var_name(str(target.children[0])), value)
        elif target.data == "member":
            set_member(self.eval(target.children[0]), self._member_name(target.children[1]), value)
        elif target.data == "index":
            set_item(self.eval(target.children[0]), self.eval(target.children[1]), value)
        elif target.data == "static_member" and _is_service_point(self.eval(target.children[0])):
            name = str(target.children[1])
            if name.lower() not in SERVICE_POINT_SETTINGS:
                raise ShellError(f"[System.Net.ServicePointManager]::{name} can't be set in this shell (it takes "
                                 f"{', '.join(SERVICE_POINT_SETTINGS.values())}).")
            self.service_point[name.lower()] = value
        else:
            raise ShellError("The assignment expression is not valid. The input to an assignment operator must be "
                             "an object that is able to accept assignments, such as a variable or a property.")

    def invoke_block(self, statements: list[Tree], dollar_: Any = _MISSING) -> list[Any]:
        saved = self.variables.get("_", _MISSING)
        if dollar_ is not _MISSING:
            self.variables["_"] = dollar_
        out: list[Any] = []
        try:
            for stmt in statements:
                self.execute(stmt, out.extend)
        finally:
            if saved is _MISSING:
                self.variables.pop("_", None)
            else:
                self.variables["_"] = saved
        return out

    # -- pipelines ----------------------------------------------------------------------
    def eval_pipeline(self, node: Tree, *, stream: bool = False) -> Any:
        """The pipeline's output: a list, or with ``stream`` a ``Stream`` when it flows (streams.py)."""
        if node.data != "pipeline":
            return self._as_items(self.eval(node))
        elements = node.children
        head = elements[0]
        redirects = [e for e in elements[1:] if e.data == "redirection"]   # only after an expression head
        items: list[Any] | Stream
        if isinstance(head, Tree) and head.data == "command":
            items = self.invoke_command(head, None)
        else:
            items = self._redirected(lambda: self._as_items(self.eval(head)), redirects, head)
        for cmd in elements[1 + len(redirects):]:
            items = self.invoke_command(cmd, items)
        return items.materialise() if isinstance(items, Stream) and not stream else items

    @staticmethod
    def _as_items(value: Any) -> list[Any]:
        if value is None:
            return []
        if isinstance(value, list):
            return value
        return [value]

    def command_elements(self, node: Tree) -> list[binder.NamedArg | binder.PositionalArg]:
        out: list[binder.NamedArg | binder.PositionalArg] = []
        for child in node.children[1:]:
            if child.data == "redirection":
                continue
            if child.data == "switch_or_param":
                out.append(binder.NamedArg(str(child.children[0])[1:]))
            elif child.data == "param_with_value":
                name = str(child.children[0])[1:-1]
                out.append(binder.NamedArg(name, self.eval_argument(child.children[1])))
            else:  # argument: one value or a comma list
                values = [self.eval_argument(v) for v in child.children]
                out.append(binder.PositionalArg(values[0] if len(values) == 1 else values))
        return out

    def eval_argument(self, node: Any) -> Any:
        if isinstance(node, Tree) and node.data == "bareword":
            return str(node.children[0])
        return self.eval(node)

    def invoke_command(self, node: Tree, input_items: list[Any] | Stream | None) -> list[Any] | Stream:
        """One command of a pipeline; its output may be a ``Stream`` (the caller materialises what it keeps)."""
        redirects = [c for c in node.children[1:] if c.data == "redirection"]
        if not redirects:
            return self._invoke_command(node, input_items)
        return self._redirected(lambda: self._invoke_command(node, input_items), redirects, node)

    def _redirected(self, run: Callable[[], list[Any] | Stream], redirects: list[Tree],
                    node: Any) -> list[Any] | Stream:
        """Run a command (or an expression) with PowerShell's redirections: ``>``/``>>`` send its output to a
        file (as Out-File; ``$null`` discards it), ``2>`` its errors, ``3>`` its warnings, ``*>`` all three,
        ``2>&1`` its errors into its output. An error that stops the script (-ErrorAction Stop) isn't redirected.
        Output that flows (streams.py) is written as it comes when only the output is redirected."""
        targets: dict[str, tuple[Any, bool]] = {}   # stream → (path or None for $null, append)
        merge_errors = False
        for r in redirects:
            token = str(r.children[0])
            if token.endswith("&1"):
                merge_errors = merge_errors or token[0] in "2*"
                continue
            stream = token[0] if token[0] in "123456*" else "1"
            target = self.eval_argument(r.children[1])
            path = None if target is None else to_text(target)
            for s in ("1", "2", "3") if stream == "*" else (stream,):
                targets[s] = (path, token.endswith(">>"))
        catch_errors = merge_errors or "2" in targets
        ran: list[Any] | None = None
        if not catch_errors and "3" not in targets:   # only the output is redirected: it may flow to its file
            output = run()
            if isinstance(output, Stream):
                return self._stream_to(output, targets.get("1"))
            ran = output
        errors: list[tuple[UserError, str | None]] = []
        saved = (self._error_sink, self._warning_sink)
        if catch_errors:
            self._error_sink = errors
        if "3" in targets:
            self._warning_sink = []
        try:
            try:
                out = ran if ran is not None else self._materialised(run())
            except Terminating as stop:   # a binding error or an unknown command is in the error stream too
                if not catch_errors or stop.stops_script:
                    raise
                self._remember_error(stop.error, stop.cmdlet)
                errors.append((stop.error, stop.cmdlet))
                out = []
            warnings = self._warning_sink
        finally:
            self._error_sink, self._warning_sink = saved
        error_lines = [f"{cmdlet} : {error}" if cmdlet else str(error) for error, cmdlet in errors]
        if merge_errors:
            out = out + error_lines
        streams = {"1": lambda: fmt.default_render(out, limit=self.enumeration_limit()),
                   "2": lambda: [] if merge_errors else error_lines,
                   "3": lambda: [f"WARNING: {w}" for w in warnings or []]}
        files: dict[str, tuple[list[str], bool]] = {}   # path → its lines (output, errors, warnings), append
        for stream in ("1", "2", "3"):
            if stream in targets and targets[stream][0] is not None:
                path, append = targets[stream]
                files.setdefault(path, ([], append))[0].extend(streams[stream]())
        for path, (lines, append) in files.items():
            if lines or not append:   # > makes the file even for nothing, as PowerShell does
                try:
                    textfiles.write_text(path, "".join(line + "\n" for line in lines), None, append=append)
                except OSError as exc:
                    raise file_error(exc) from exc
        return [] if "1" in targets else out

    def _stream_to(self, output: Stream, target: tuple[str | None, bool] | None) -> list[Any] | Stream:
        """Flowing output redirected with ``>``/``>>``: written as it comes (``$null``: read and dropped)."""
        if target is None:   # only 4> 5> 6>, streams this shell has nothing in
            return output
        path, append = target
        try:
            if path is None:
                for _ in output:
                    pass
            elif not write_printed(output, path, limit=self.enumeration_limit(), append=append) and not append:
                textfiles.write_text(path, "", None)   # > makes the file even for nothing, as PowerShell does
        except OSError as exc:
            raise file_error(exc) from exc
        return []

    @staticmethod
    def _materialised(items: list[Any] | Stream) -> list[Any]:
        return items.materialise() if isinstance(items, Stream) else items

    def _invoke_command(self, node: Tree, input_items: list[Any] | Stream | None) -> list[Any] | Stream:
        self.ctx.confirm_all = None   # "Yes to All" holds for this command's objects, not the next command's
        return self._run_command(node, input_items)

    def _run_command(self, node: Tree, input_items: list[Any] | Stream | None) -> list[Any] | Stream:
        """Run one command of a pipeline. An unknown command or parameters that don't bind end the statement
        (PowerShell's terminating errors: a try block catches them); an error of the cmdlet itself is shown
        and the pipeline goes on with the next object, unless -ErrorAction (or $ErrorActionPreference) says
        otherwise."""
        name = str(node.children[0])
        try:
            cmd = registry.get(name)
        except UserError as exc:
            raise Terminating(exc, node, None, stops_script=False) from None
        try:
            bound = binder.bind(cmd, self.command_elements(node))
            error_action = self._preference(bound.pop("ErrorAction", None), "erroractionpreference")
            warning_action = self._preference(bound.pop("WarningAction", None), "warningpreference")
            self.verbose_requested = bool(bound.pop("Verbose", None))
        except UserError as exc:
            raise Terminating(exc, node, cmd.name, stops_script=False) from None
        pipe = binder.pipeline_param(cmd)
        if isinstance(input_items, Stream):
            if cmd.stream is not None and pipe is not None and pipe.name not in bound:
                flowing = self._flowing(node, cmd, bound, pipe.name, input_items, error_action, warning_action)
                if flowing is not None:
                    return flowing
            input_items = input_items.materialise()
        calls: list[dict[str, Any]] = []
        if input_items is None:
            calls = [bound]
        elif pipe is not None and cmd.builtin:
            calls = [{**bound, pipe.name: input_items}] if pipe.name not in bound else [bound]
        else:
            for item in input_items:   # a cmdlet runs once per piped object, bound to the parameter it fits
                param = binder.pipeline_param(cmd, item)
                if param is None or param.name in bound:
                    raise Terminating(ShellError(
                        f"The input object cannot be bound to any parameters for the command '{cmd.name}': it takes "
                        "no pipeline input, or the parameter that would take it was already given."),
                        node, cmd.name, stops_script=False)
                calls.append({**bound, param.name: item})
        out: list[Any] = []
        for raw in calls:
            try:
                args = binder.convert(cmd, raw)
            except UserError as exc:   # a value that doesn't convert to its parameter's type: a binding error
                raise Terminating(exc, node, cmd.name, stops_script=False) from None
            try:
                result = self.call(cmd, args, error_action=error_action, warning_action=warning_action,
                                   stream=input_items is None)
            except UserError as exc:
                self._cmdlet_error(exc, node, cmd.name, error_action)
                continue
            if isinstance(result, Stream):   # the first command of the pipeline reads as it is used
                return self._guarded(result, node, cmd, error_action)
            out.extend(result)
        return out

    def _flowing(self, node: Tree, cmd: Cmdlet, bound: dict[str, Any], input_name: str, items: Stream,
                 error_action: str, warning_action: str) -> Stream | None:
        """A builtin taking a stream as it comes (``Cmdlet.stream``); None when these arguments need all of its
        input at once (Select-Object -Last, Sort-Object...). Its errors are reported as when it takes a list."""
        try:
            args = binder.convert(cmd, {**bound, input_name: []})
        except UserError as exc:
            raise Terminating(exc, node, cmd.name, stops_script=False) from None

        def per_chunk(chunk_args: dict[str, Any]) -> list[Any]:
            return self.call(cmd, chunk_args, error_action=error_action, warning_action=warning_action)

        assert cmd.stream is not None
        flowing = cmd.stream(self.ctx, args, items, per_chunk)
        return None if flowing is None else self._guarded(flowing, node, cmd, error_action)

    def _guarded(self, chunks: Iterable[list[Any]], node: Tree, cmd: Cmdlet, error_action: str) -> Stream:
        """A command's flowing output; an error it meets on the way is its error, reported as when it takes a
        list (the stream ends there; what came before has gone on down the pipeline)."""
        def guarded() -> Iterator[list[Any]]:
            try:
                yield from chunks
            except (Terminating, LoopControl, RecursionError):
                raise
            except UserError as exc:
                self._cmdlet_error(exc, node, cmd.name, error_action)
            except Exception as exc:  # noqa: BLE001 - a file it could not write, a bug: as from call()
                self._cmdlet_error(_cmdlet_failure(cmd, exc), node, cmd.name, error_action)

        return Stream(guarded())

    def _preference(self, given: Any, variable: str) -> str:
        """-ErrorAction/-WarningAction as given, else the preference variable (Continue if it isn't one)."""
        if given is not None:
            return action_preference(given)
        try:
            return action_preference(self.variables.get(variable, "Continue"))
        except UserError:
            return "Continue"

    def _cmdlet_error(self, error: UserError, node: Any, cmdlet: str, action: str) -> None:
        if action in ("SilentlyContinue", "Ignore"):
            if action == "SilentlyContinue":
                self._remember_error(error, cmdlet)
            return
        if action == "Stop":
            raise Terminating(error, node, cmdlet, stops_script=True)
        if self._error_sink is not None:   # 2> or 2>&1: into the file or the output, and into $Error
            self._remember_error(error, cmdlet)
            self._error_sink.append((error, cmdlet))
            return
        self._fail(error, node, cmdlet)

    def call(self, cmd: Cmdlet, args: dict[str, Any], *, error_action: str = "Continue",
             warning_action: str = "Continue", stream: bool = False) -> list[Any] | Stream:
        """Run a cmdlet. One that reads as it is used (Get-MessageTrackingLog) is read here, unless ``stream``:
        then its output is a ``Stream``, and its errors and warnings come when it has been read."""
        ctx = self.ctx
        ctx.whatif = bool(args.get("WhatIf"))
        ctx.confirm, ctx.confirm_impact = args.get("Confirm"), cmd.confirm_impact
        ctx.shell = self
        with self._running(cmd, warning_action):
            result = cmd.handler(ctx, args)
            if isinstance(result, Iterator):
                if stream:
                    return Stream.of(self._read_as_used(cmd, result, error_action, warning_action))
                result = list(result)
        self._cmdlet_errors(cmd, error_action)
        return [] if result is None else list(result) if isinstance(result, (list, tuple)) else [result]

    def _read_as_used(self, cmd: Cmdlet, items: Iterator[Any], error_action: str,
                      warning_action: str) -> Iterator[Any]:
        """A cmdlet's output read as the pipeline uses it; once read, its warnings and errors are shown."""
        with self._running(cmd, warning_action):
            yield from items
        self._cmdlet_errors(cmd, error_action)

    @contextlib.contextmanager
    def _running(self, cmd: Cmdlet, warning_action: str) -> Iterator[None]:
        """A cmdlet at work: what it raises becomes the error the administrator sees (``_cmdlet_failure``); when
        it stops, its -WhatIf/-Confirm end and its warnings and messages are shown."""
        ctx = self.ctx
        try:
            yield
        except (UserError, RecursionError, Terminating, LoopControl):
            raise
        except Exception as exc:  # noqa: BLE001 - reported as a UserError
            raise _cmdlet_failure(cmd, exc) from exc
        finally:
            ctx.whatif, ctx.confirm = False, None
            if warning_action in ("SilentlyContinue", "Ignore"):
                ctx.warnings.clear()
            self._flush_side_channels()

    def _cmdlet_errors(self, cmd: Cmdlet, error_action: str) -> None:
        """Errors the cmdlet reported and went on from: raised (-ErrorAction Stop), redirected, or shown once
        the statement's output is out."""
        ctx = self.ctx
        if ctx.errors:
            errors, ctx.errors = ctx.errors, []
            if error_action == "Stop":
                raise UserError(errors[0])
            if self._error_sink is not None and error_action not in ("SilentlyContinue", "Ignore"):
                for message in errors:
                    self._cmdlet_error(UserError(message), None, cmd.name, error_action)
            elif error_action not in ("SilentlyContinue", "Ignore"):   # shown once the statement's output is out
                self._deferred_errors += [(cmd.name, message) for message in errors]

    def _flush_side_channels(self) -> None:
        if self._warning_sink is not None:   # 3> or *>: the warnings go where they were sent
            self._warning_sink += self.ctx.warnings
            self.ctx.warnings.clear()
        if self.ctx.messages or self.ctx.warnings:
            lines = list(self.ctx.messages) + [f"WARNING: {w}" for w in self.ctx.warnings]
            self.ctx.messages.clear()
            self.ctx.warnings.clear()
            self.emit([Formatted(lines)])

    # -- expressions -----------------------------------------------------------------------
    def eval(self, node: Any) -> Any:
        if isinstance(node, Token):
            return str(node)
        method = getattr(self, "_e_" + node.data, None)
        if method is None:
            raise ShellError(f"Unsupported syntax: {node.data}")
        return method(node)

    def _e_pipeline(self, node: Tree) -> Any:
        return unwrap(self.eval_pipeline(node))

    def _e_command(self, node: Tree) -> Any:
        return unwrap(self.invoke_command(node, None))

    def _e_number(self, node: Tree) -> Any:
        return parse_number(str(node.children[0]))

    def _e_bareword(self, node: Tree) -> Any:
        return str(node.children[0])

    def _e_sq_string(self, node: Tree) -> Any:
        text = str(node.children[0])[1:-1]
        return text.replace("''", "'").replace("\u2018\u2018", "\u2018").replace("\u2019\u2019", "\u2019")

    def _e_dq_string(self, node: Tree) -> Any:
        return self.expand_string(str(node.children[0])[1:-1])

    def _e_variable(self, node: Tree) -> Any:
        return self.get_variable(self._var_name(str(node.children[0])))

    def _e_type_literal(self, node: Tree) -> Any:
        return TypeRef(str(node.children[0]))

    def _e_paren(self, node: Tree) -> Any:
        return unwrap(self.eval_pipeline(node.children[0]))

    def _e_subexpression(self, node: Tree) -> Any:
        return unwrap(self.invoke_block(node.children))

    def _e_array_subexpression(self, node: Tree) -> Any:
        return list(self.invoke_block(node.children))

    def _e_array(self, node: Tree) -> Any:
        return [self.eval(c) for c in node.children]

    def _e_hashtable(self, node: Tree) -> Any:
        table = CIDict()
        for entry in node.children:
            key_node, value_node = entry.children[0], entry.children[1]
            key = self.eval(key_node)
            values = self.eval_pipeline(value_node) if value_node.data == "pipeline" else self._as_items(self.eval(value_node))
            table[key] = unwrap(values) if len(values) <= 1 else values
        return table

    def _e_scriptblock(self, node: Tree) -> Any:
        text = ""
        meta = getattr(node, "meta", None)
        if meta is not None and not getattr(meta, "empty", True):
            text = self._source[meta.start_pos:meta.end_pos]
        return ScriptBlock(list(node.children), self, text)

    def _e_unary(self, node: Tree) -> Any:
        op, operand = str(node.children[0]).lower(), self.eval(node.children[1])
        if op in ("-not", "!"):
            return not truthy(operand)
        if op == "-":
            if isinstance(operand, str):
                try:
                    operand = parse_number(operand.strip())
                except ValueError:
                    raise ShellError(f'Cannot convert value "{operand}" to a number to negate it.') from None
            if not isinstance(operand, (int, float)):
                raise ShellError(f'Cannot negate "{to_text(operand)}".')
            return -operand
        raise ShellError(f"Unknown operator {op}")

    def _e_cast(self, node: Tree) -> Any:
        return cast(TypeRef(str(node.children[0])).name, self.eval(node.children[1]))

    def _e_binary(self, node: Tree) -> Any:
        left_node, op_token, right_node = node.children
        op = str(op_token).lower()
        if op == "-and":
            return truthy(self.eval(left_node)) and truthy(self.eval(right_node))
        if op == "-or":
            return truthy(self.eval(left_node)) or truthy(self.eval(right_node))
        left, right = self.eval(left_node), self.eval(right_node)
        if op == "-xor":
            return truthy(left) != truthy(right)
        if op in ("+", "-", "*", "/", "%"):
            return arithmetic(op, left, right)
        if op in ("-join", "-split", "-isplit", "-csplit", "-replace", "-ireplace", "-creplace", "-f"):
            try:
                return format_operator(left, right) if op == "-f" else text_operator(op, left, right)
            except ValueError as exc:
                raise ShellError(str(exc)) from None
        return compare(op, left, right, self.variables)

    def _e_range(self, node: Tree) -> Any:
        ends = []
        for value in (self.eval(node.children[0]), self.eval(node.children[2])):
            try:
                ends.append(int(round(float(parse_number(value) if isinstance(value, str) else value))))
            except (TypeError, ValueError, OverflowError):   # OverflowError: 1e400 is infinity
                raise ShellError(f'Cannot convert "{to_text(value)}" to an integer for the range operator.') from None
        first, last = ends
        if abs(last - first) >= MAX_RANGE:
            raise ShellError(f"The range {first}..{last} is too large: at most {MAX_RANGE:,} values.")
        step = 1 if last >= first else -1
        return list(range(first, last + step, step))

    @staticmethod
    def _member_name(token: Any) -> str:
        """``.Name``, ``.'date-time'`` or ``."date-time"`` → the member's name."""
        name = str(token)[1:]
        return name[1:-1] if name[:1] in ("'", '"') else name

    def _e_member(self, node: Tree) -> Any:
        target = self.eval(node.children[0])
        return member(target, self._member_name(node.children[1]))

    def _e_method_call(self, node: Tree) -> Any:
        target = self.eval(node.children[0])
        name = self._member_name(node.children[1])
        args = [self.eval(a) for a in node.children[2].children] if len(node.children) > 2 else []
        return call_method(target, name, args)

    def _e_static_member(self, node: Tree) -> Any:
        target = self.eval(node.children[0])
        if _is_service_point(target) and str(node.children[1]).lower() in SERVICE_POINT_SETTINGS:
            return self.service_point.get(str(node.children[1]).lower())
        return static(target, str(node.children[1]), None)

    def _e_static_call(self, node: Tree) -> Any:
        target = self.eval(node.children[0])
        args = [self.eval(a) for a in node.children[2].children] if len(node.children) > 2 else []
        return static(target, str(node.children[1]), args)

    def _e_index(self, node: Tree) -> Any:
        target, index = self.eval(node.children[0]), self.eval(node.children[1])
        if isinstance(target, (list, str)):
            try:
                return target[int(index)]
            except (IndexError, ValueError, TypeError):
                return None
        if isinstance(target, dict):
            return target.get(index)
        if target is not None and isinstance(index, int) and not isinstance(index, bool):
            # one object is indexed as an array of one, as in PowerShell: (Get-ExchangeCertificate)[0] is the
            # certificate whether there is one or several
            return target if index in (0, -1) else None
        return get_property(target, to_text(index))

    # -- double-quoted strings -------------------------------------------------------------
    _ESCAPES = {"0": "\0", "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "e": "\x1b"}

    def expand_string(self, text: str) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            ch = text[i]
            if ch == "`" and i + 1 < n:
                out.append(self._ESCAPES.get(text[i + 1], text[i + 1]))
                i += 2
                continue
            if ch in "\"\u201c\u201d" and i + 1 < n and text[i + 1] == ch:
                out.append(ch)
                i += 2
                continue
            if ch == "$" and i + 1 < n:
                nxt = text[i + 1]
                if nxt == "(":
                    end = _matching_paren(text, i + 1)
                    inner = text[i + 2:end]
                    previous = self._source
                    try:
                        tree = parse(inner)
                        self._source = inner
                        out.append(to_text(unwrap(self.invoke_block(tree.children))))
                    finally:
                        self._source = previous
                    i = end + 1
                    continue
                if nxt == "{":
                    end = text.find("}", i)
                    if end > 0:
                        out.append(to_text(self.get_variable(text[i + 2:end])))
                        i = end + 1
                        continue
                m = re.match(r"[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_][A-Za-z0-9_]*)?", text[i + 1:])
                if m:
                    out.append(to_text(self.get_variable(m.group(0))))
                    i += 1 + len(m.group(0))
                    continue
            out.append(ch)
            i += 1
        return "".join(out)


def _matching_paren(text: str, start: int) -> int:
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ParseError("Missing closing ')' in subexpression of a string.")


# ---------------------------------------------------------------------------
# Operators


def arithmetic(op: str, left: Any, right: Any) -> Any:
    if left is None and op == "+":
        return right   # $null + x is x: how $list += ... starts a list that isn't there yet
    if op == "+":
        if isinstance(left, list):
            return left + (right if isinstance(right, list) else [right])
        if isinstance(left, str):
            return left + to_text(right)
        if isinstance(left, dt.datetime) and isinstance(right, TimeSpan):
            return left + right.timedelta
        if isinstance(left, dict) and isinstance(right, dict):
            merged = CIDict(left)
            merged.update(right)
            return merged
    if op == "*" and isinstance(left, (str, list)):
        return repeated(left, right)
    if isinstance(left, dt.datetime) and op == "-":
        if isinstance(right, dt.datetime):
            return TimeSpan((left - right).total_seconds())
        if isinstance(right, TimeSpan):
            return left - right.timedelta
    try:
        a = left if isinstance(left, (int, float)) else parse_number(to_text(left).strip())
        b = right if isinstance(right, (int, float)) else parse_number(to_text(right).strip())
    except (ValueError, TypeError):
        raise ShellError(f'Operator "{op}" can\'t be applied to "{to_text(left)}" and "{to_text(right)}".') from None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ShellError("Attempted to divide by zero.")
    if op == "/":
        result = a / b
        return int(result) if result.is_integer() else result
    return a % b


REPEAT_MAX = 10_000_000  # items in a repeated string or array: more is a mistake, not a value


def repeated(left: str | list, right: Any) -> str | list:
    """PowerShell's "ab" * 3 and @(1, 2) * 3: the string or array that many times."""
    try:
        number = right if isinstance(right, (int, float)) else parse_number(to_text(right).strip())
        count = round(number)  # [int] in .NET rounds half to even, as round() does
    except (ValueError, TypeError, OverflowError):
        raise ShellError(f'Operator "*" can\'t be applied to "{to_text(left)}" and "{to_text(right)}": '
                         "a string or array is repeated a whole number of times.") from None
    if count < 0:
        raise ShellError(f"A string or array can't be repeated {count} times.")
    if len(left) * count > REPEAT_MAX:
        raise ShellError(f"Repeating {len(left)} items {count} times would make more than {REPEAT_MAX:,} items.")
    return left * count


def _cmdlet_failure(cmd: Cmdlet, exc: Exception) -> UserError:
    """An exception out of a cmdlet as the error the administrator sees: a file it could not use, a store it
    could not reach, or a bug (reported like any error: it doesn't end the administrator's session)."""
    if isinstance(exc, OSError):   # a file the administrator named (Out-File, Export-Csv, Export-Message …)
        return file_error(exc)
    if isinstance(exc, ValueError) and str(exc) == "embedded null byte":   # a file name with NUL in it: what os says
        return UserError("Illegal characters in path: a file name can't hold a NUL character.")
    if is_unreachable(exc):
        return UserError(f"{cmd.name} needs the organisation's store, which can't be reached "
                         f"({unreachable_reason(exc)}).")
    log.debug("%s raised", cmd.name, exc_info=exc)
    return UserError(f"{cmd.name} failed with an internal error ({type(exc).__name__}: {exc}). This is a bug "
                     "in mailgate.")


def file_error(exc: OSError) -> UserError:
    """A file the administrator named that can't be read or written, said with its name (shortened if long)."""
    name = str(exc.filename)
    path = "" if exc.filename is None else f" '{name[:200]}…'" if len(name) > 200 else f" '{name}'"
    return UserError(f"{exc.strerror or exc}{':' if path else ''}{path}.")


def cast(type_name: str, value: Any) -> Any:
    name = type_name.lower().split(".")[-1]
    try:
        if name in ("int", "int32", "long", "int64"):
            return int(value) if isinstance(value, (int, float)) else int(parse_number(to_text(value).strip()))
        if name in ("double", "float", "decimal"):
            return float(value)
        if name == "string":
            return to_text(value)
        if name == "bool" or name == "boolean":
            return truthy(value)
        if name == "datetime":
            from mailgate.manage.params import to_datetime

            return to_datetime(value)
        if name == "timespan":
            return TimeSpan.parse(value)
        if name in ("array", "object[]"):
            return value if isinstance(value, list) else [value]
        if name in ("pscustomobject", "psobject") and isinstance(value, dict):   # a report row from a hashtable
            return custom_object(value)
        if name == "ordered" and isinstance(value, dict):   # hashtables keep their order here already
            return value
        if name == "pscredential":
            return PSCredential(*value) if isinstance(value, list) and len(value) == 2 else value
    except (ValueError, TypeError, OverflowError) as exc:
        raise ShellError(f'Cannot convert value "{to_text(value)}" to type "{type_name}": {exc}') from None
    raise ShellError(f"Unable to find type [{type_name}].")


# ---------------------------------------------------------------------------
# Members and methods


def member(target: Any, name: str) -> Any:
    value = _member(target, name)
    if value is None and name.lower() == "count" and target is not None:
        return 1   # PowerShell: a single object has a Count of 1 (unless it has a Count of its own)
    return value


def _member(target: Any, name: str) -> Any:
    key = name.lower()
    if isinstance(target, list):
        if key in ("count", "length"):
            return len(target)
        values = [member(item, name) for item in target]
        flat: list[Any] = []
        for v in values:
            if isinstance(v, list):
                flat.extend(v)
            elif v is not None:
                flat.append(v)
        return flat
    if target is None:
        return 0 if key in ("count", "length") else None   # $null.Count is 0 in PowerShell
    if isinstance(target, str):
        if key == "length":
            return len(target)
        return None
    if isinstance(target, dt.datetime):
        local = target.astimezone() if target.tzinfo else target
        attrs = {"year": local.year, "month": local.month, "day": local.day, "hour": local.hour,
                 "minute": local.minute, "second": local.second, "date": local.replace(hour=0, minute=0, second=0, microsecond=0),
                 "dayofweek": local.strftime("%A"), "ticks": int(local.timestamp() * 1e7)}
        return attrs.get(key)
    if isinstance(target, TimeSpan):
        s = target.seconds
        attrs = {"totalseconds": s, "totalminutes": s / 60, "totalhours": s / 3600, "totaldays": s / 86400,
                 "totalmilliseconds": s * 1000, "days": int(s // 86400), "hours": int(s % 86400 // 3600),
                 "minutes": int(s % 3600 // 60), "seconds": int(s % 60)}
        return attrs.get(key)
    if isinstance(target, ByteSize):
        if key in ("value", "isunlimited"):
            return target if key == "value" else target.bytes is None
        return None
    if isinstance(target, PSCredential):
        return {"username": target.user_name, "password": target.password}.get(key)
    if isinstance(target, dict):
        if key == "count":
            return len(target)
        if key == "keys":
            return list(target.keys())
        if key == "values":
            return list(target.values())
        return target.get(name) if isinstance(target, CIDict) else get_property(target, name)
    if isinstance(target, Record):
        return target.get(name)
    value = get_property(target, name)
    if value is not None:
        return value
    return getattr(target, name, None) if not name.startswith("_") else None


def set_member(target: Any, name: str, value: Any) -> None:
    """``$object.Name = value``: on a cmdlet's output object or a hashtable, as PowerShell allows."""
    if isinstance(target, Record):
        if not target.has(name):
            raise ShellError(f"The property '{name}' cannot be found on this object. Verify that the property "
                             "exists and can be set.")
        target.set(name, value)
    elif isinstance(target, dict):
        target[name] = value
    else:
        raise ShellError(f"The property '{name}' cannot be found on this object. Verify that the property exists "
                         "and can be set.")


def set_item(target: Any, index: Any, value: Any) -> None:
    """``$list[i] = value`` (``i`` may count from the end, as in PowerShell) and ``$table[key] = value``."""
    if isinstance(target, dict):
        target[index] = value
        return
    if isinstance(target, list):
        try:
            target[int(index)] = value
            return
        except (IndexError, ValueError, TypeError, OverflowError):
            raise ShellError("Index was outside the bounds of the array.") from None
    raise ShellError(f"Unable to index into an object of type {getattr(target, 'type_name', type(target).__name__)}.")


def call_method(target: Any, name: str, args: list[Any]) -> Any:
    key = name.lower()
    if key == "tostring":
        if isinstance(target, dt.datetime) and args:
            return dotnet_strftime(target, to_text(args[0]))
        return to_text(target)
    if key == "gettype":
        return type(target).__name__
    if isinstance(target, str):
        return _string_method(target, key, args)
    if isinstance(target, dt.datetime):
        units = {"addseconds": 1, "addminutes": 60, "addhours": 3600, "adddays": 86400, "addmilliseconds": 0.001}
        if key in units and len(args) == 1:
            try:
                return target + dt.timedelta(seconds=float(args[0]) * units[key])
            except (ValueError, TypeError, OverflowError):
                raise ShellError(f'Exception calling "{name}" with "1" argument(s): "The added or subtracted value '
                                 f'results in an un-representable DateTime." ({to_text(args[0])})') from None
        if key == "touniversaltime":
            return target.astimezone(dt.timezone.utc)
        if key == "tolocaltime":
            return target.astimezone()
    if isinstance(target, list):
        if key == "contains" and len(args) == 1:
            return args[0] in target
    if isinstance(target, ByteSize):
        units = {"tobytes": 1, "tokb": 1 << 10, "tomb": 1 << 20, "togb": 1 << 30, "totb": 1 << 40}
        if key in units:
            if target.bytes is None:
                raise ShellError("The size is Unlimited.")
            return target.bytes // units[key]
    if isinstance(target, PSCredential) and key == "getnetworkcredential":
        return CIDict({"UserName": target.user_name, "Password": target.password.reveal()})
    if isinstance(target, ScriptBlock) and key == "invoke":
        return unwrap(target.invoke(args[0] if args else _MISSING))
    raise ShellError(f"Method invocation failed because [{type(target).__name__}] does not contain a method named "
                     f"'{name}'.")


def _string_method(s: str, key: str, args: list[Any]) -> Any:
    a = [to_text(x) for x in args]
    table: dict[str, Callable[[], Any]] = {
        "toupper": lambda: s.upper(), "tolower": lambda: s.lower(), "trim": lambda: s.strip(*a[:1]),
        "trimstart": lambda: s.lstrip(*a[:1]), "trimend": lambda: s.rstrip(*a[:1]),
        "split": lambda: [p for p in re.split("[" + re.escape("".join(a) or " ") + "]", s)],
        "replace": lambda: s.replace(a[0], a[1]), "contains": lambda: a[0] in s,
        "startswith": lambda: s.startswith(a[0]), "endswith": lambda: s.endswith(a[0]),
        "substring": lambda: s[int(args[0]):] if len(args) == 1 else s[int(args[0]):int(args[0]) + int(args[1])],
        "indexof": lambda: s.find(a[0]), "padleft": lambda: s.rjust(_width(args[0])),
        "padright": lambda: s.ljust(_width(args[0])),
    }
    if key not in table:
        raise ShellError(f"Method invocation failed because [System.String] does not contain a method named '{key}'.")
    try:
        return table[key]()
    except (IndexError, ValueError, TypeError, OverflowError) as exc:
        raise ShellError(f"Method invocation failed: {exc}") from None


def _width(value: Any) -> int:
    width = int(value)
    if width > REPEAT_MAX:
        raise ValueError(f"a string of {width:,} characters is more than {REPEAT_MAX:,}")
    return width


# What scripts set on [System.Net.ServicePointManager] (lower-case name → its name): a certificate callback of
# { $true } makes Send-MailMessage -UseSsl take any certificate; SecurityProtocol is taken and changes nothing
# (TLS 1.2 and later are always used).
SERVICE_POINT_SETTINGS = {"servercertificatevalidationcallback": "ServerCertificateValidationCallback",
                          "securityprotocol": "SecurityProtocol"}


def _is_service_point(target: Any) -> bool:
    return isinstance(target, TypeRef) and target.name.lower() in ("system.net.servicepointmanager",
                                                                     "net.servicepointmanager", "servicepointmanager")


def static(target: Any, name: str, args: list[Any] | None) -> Any:
    if not isinstance(target, TypeRef):
        raise ShellError(f"'::' needs a type, e.g. [datetime]::Now, not '{to_text(target)}'.")
    type_name = target.name.lower().split(".")[-1]
    key = name.lower()
    if type_name == "datetime":
        if key == "now":
            return dt.datetime.now().astimezone()
        if key == "utcnow":
            return dt.datetime.now(dt.timezone.utc)
        if key == "today":
            return dt.datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
        if key == "parse" and args:
            return cast("datetime", args[0])
    if type_name == "timespan" and args:
        units = {"fromseconds": 1, "fromminutes": 60, "fromhours": 3600, "fromdays": 86400}
        if key in units:
            return TimeSpan(float(args[0]) * units[key])
    if type_name == "pscredential" and key == "new" and args and len(args) == 2:
        if not isinstance(args[1], SecureString):
            raise ShellError("The password of a PSCredential must be a SecureString (ConvertTo-SecureString).")
        return PSCredential(to_text(args[0]), args[1])
    if type_name == "math" and args:
        fns = {"round": lambda: round(float(args[0]), int(args[1]) if len(args) > 1 else 0),
               "floor": lambda: math.floor(float(args[0])), "ceiling": lambda: math.ceil(float(args[0])),
               "max": lambda: max(args[0], args[1]), "min": lambda: min(args[0], args[1]),
               "abs": lambda: abs(args[0])}
        if key in fns:
            return fns[key]()
    if type_name == "securityprotocoltype" and key in ("tls12", "tls13", "tls11", "tls", "systemdefault"):
        return {"tls12": "Tls12", "tls13": "Tls13", "tls11": "Tls11", "tls": "Tls", "systemdefault": "SystemDefault"}[key]
    if type_name == "string":
        if key == "join" and args and len(args) == 2:
            return to_text(args[0]).join(to_text(x) for x in (args[1] if isinstance(args[1], list) else [args[1]]))
        if key == "isnullorempty" and args:
            return args[0] is None or args[0] == ""
    raise ShellError(f"[{target.name}]::{name} is not available in this shell.")


