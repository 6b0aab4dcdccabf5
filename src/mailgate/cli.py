"""The ``mailgate`` command: init, serve, shell, doctor."""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from mailgate import __version__
from mailgate.errors import UserError
from mailgate.home import Home


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="the data directory (default: $MAILGATE_HOME)")
    parser = argparse.ArgumentParser(prog="mailgate", parents=[common],
                                     description="A mail transport server driven by Exchange's cmdlets.")
    parser.add_argument("--version", action="version", version=f"mailgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", parents=[common], help="create a data directory with the default configuration")
    init.add_argument("--server", help="this server's name (default: the host name), e.g. EX01")
    init.add_argument("--domain", help="the first accepted domain (default: contoso.com)")
    init.add_argument("--store", help="store URL: postgresql://user@host/db for a multi-server organisation "
                                      "(default: SQLite in the data directory)")

    serve = sub.add_parser("serve", parents=[common], help="run the transport server until SIGTERM/SIGINT "
                                                                "(SIGHUP re-reads the configuration)")
    serve.add_argument("--admin-listen", help="address:port of the REST API and web admin center "
                                              "(default: from mailgate.toml); 'off' disables it")
    serve.add_argument("--workers", type=int, help="worker processes sharing the listeners (default: from "
                                                   "mailgate.toml [server] workers, else auto)")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)

    shell = sub.add_parser("shell", parents=[common], help="the management shell (Exchange cmdlets)")
    group = shell.add_mutually_exclusive_group()
    group.add_argument("-c", dest="commands", metavar="COMMANDS", help="run these commands and exit")
    group.add_argument("-f", dest="file", metavar="FILE.ps1", help="run this script and exit")

    sub.add_parser("doctor", parents=[common], help="check the configuration against mail-flow best practices")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        home_path = Home.resolve_path(getattr(args, "home", None))
        if args.command in ("init", "serve"):
            os.umask(0o077)   # queued mail, mailboxes, logs and keys: for the server's own account only
        if args.command == "init":
            return cmd_init(home_path, args)
        home = Home.load(home_path)
        if args.command == "serve":
            from mailgate.server import run_server

            return run_server(home, admin_listen=args.admin_listen, workers=args.workers,
                              worker_index=args.worker_index)
        if args.command == "shell":
            return cmd_shell(home, args)
        if args.command == "doctor":
            return cmd_shell(home, argparse.Namespace(commands="Test-MailflowBestPractice", file=None))
    except UserError as exc:
        print(f"mailgate: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from mailgate.config.store import is_unreachable, unreachable_reason

        if not is_unreachable(exc):
            raise
        print(f"mailgate: the store of this organisation can't be reached ({unreachable_reason(exc)}).",
              file=sys.stderr)
        return 2
    return 0


def cmd_init(path: Path, args: argparse.Namespace) -> int:
    from mailgate.manage.organisation import initialise

    home, created = initialise(path, server=args.server, domain=args.domain, store_url=args.store)
    print(f"Initialised {home.path} for server {home.server}:")
    for line in created:
        print(f"  {line}")
    print(f"Start it with: mailgate --home {home.path} serve")
    return 0


def management_context(home: Home, *, with_runtime_client: bool = True):  # type: ignore[no-untyped-def]
    from mailgate.config.store import ConfigStore, is_unreachable, unreachable_reason
    from mailgate.control import RuntimeClient
    from mailgate.manage.context import ManagementContext

    store = ConfigStore(home.store_url, migrate=False)
    try:
        store.migrate()
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        # The queues of a running server are still managed through it; configuration cmdlets say what's wrong.
        print(f"WARNING: the store of this organisation can't be reached ({unreachable_reason(exc)}): cmdlets "
              "that read or change the configuration fail until it answers.", file=sys.stderr)
    runtime = RuntimeClient(home) if with_runtime_client else None
    return ManagementContext(home, store, runtime=runtime)


def cmd_shell(home: Home, args: argparse.Namespace) -> int:
    from mailgate.shell.session import LinePrompter, Shell

    ctx = management_context(home)
    shell = Shell(ctx)
    try:
        if args.commands is not None:
            ctx.prompter = LinePrompter(None)
            ok = shell.run_text(args.commands)
        elif args.file is not None:
            ctx.prompter = LinePrompter(None)
            ok = shell.run_file(Path(args.file))
        elif sys.stdin.isatty():
            ctx.prompter = LinePrompter(None)
            ctx.confirm_interactively = True   # Remove-* asks first, as in Exchange's shell
            ok = shell.interactive(home.path / ".shell_history")
        else:
            # Whatever the locale, read UTF-8 and keep bytes that aren't as surrogates: the parser names them.
            ok = shell.run_lines(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="surrogateescape"))
    finally:
        ctx.store.dispose()
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
