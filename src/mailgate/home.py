"""The data directory: where each part of a server keeps its files.

    mailgate.toml        server name, store URL, admin endpoint, back pressure settings
    mailgate.db          configuration + tracking index (SQLite back end)
    secret.key           key that encrypts stored secrets
    config-cache.json    the configuration as last read, to start from while the store can't be reached
    queue/               the durable queue (queue.db + body segments; space.reserve, see queue/pressure.py)
    mailboxes/           Maildir per mailbox
    logs/MessageTracking, logs/ProtocolLog/SmtpReceive, logs/ProtocolLog/SmtpSend
    run/                 control socket and pid file of a running server
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailgate.errors import UserError

ENV_HOME = "MAILGATE_HOME"
CONFIG_FILE = "mailgate.toml"

# A SQLite store URL whose path doesn't start with "/" names a file in the data directory (not in the current
# directory, which for a server means nothing): init writes the default store so, and the directory can be
# moved or restored elsewhere as a whole.
_RELATIVE_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?:///)(?!/|:memory:)(.+)$")


def resolve_store_url(url: str, data_dir: Path) -> str:
    """``url`` with a relative SQLite path made absolute against ``data_dir``; any other URL as it is."""
    match = _RELATIVE_SQLITE.match(url)
    return f"{match.group(1)}{data_dir / match.group(2)}" if match else url


def _stored_store_url(url: str, data_dir: Path) -> str:
    """How mailgate.toml keeps ``url``: a SQLite file inside the data directory by its relative path."""
    if url.startswith("sqlite") and ":///" in url:
        prefix, _, location = url.partition(":///")
        path, sep, query = location.partition("?")
        try:
            inside = Path(path).relative_to(data_dir)
        except ValueError:
            return url
        return f"{prefix}:///{inside}{sep}{query}"
    return url


DEFAULT_ADMIN_LISTEN = "127.0.0.1:8440"


def admin_address(listen: str) -> tuple[str, int]:
    """``[admin] listen`` (or ``--admin-listen``) as host and port: HOST:PORT or [IPv6]:PORT, 127.0.0.1 when
    the host is left out. ValueError when the port isn't a number."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# Each log's directory under <data directory>/logs/ when Set-TransportService gives it no path.
DEFAULT_LOG_DIRS = {"MessageTrackingLogPath": ("MessageTracking",),
                    "ReceiveProtocolLogPath": ("ProtocolLog", "SmtpReceive"),
                    "SendProtocolLogPath": ("ProtocolLog", "SmtpSend")}
# Directories of the transport service under the data directory, and their TransportServer fields.
DEFAULT_SERVICE_DIRS = {"PickupDirectoryPath": "Pickup", "ReplayDirectoryPath": "Replay"}
SERVICE_DIR_FIELDS = {"PickupDirectoryPath": "pickup_directory_path", "ReplayDirectoryPath": "replay_directory_path"}
# The TransportServer field that holds each of those settings.
LOG_PATH_FIELDS = {"MessageTrackingLogPath": "message_tracking_log_path",
                   "ReceiveProtocolLogPath": "receive_protocol_log_path",
                   "SendProtocolLogPath": "send_protocol_log_path"}


@dataclass(frozen=True)
class BackPressureSettings:
    """``[back_pressure]`` in mailgate.toml (queue/pressure.py applies them)."""
    enabled: bool = True
    queue_disk_high_percent: int = 0

    @classmethod
    def parse(cls, section: Any, source: Path) -> "BackPressureSettings":
        if not isinstance(section, dict):
            raise UserError(f"{source}: [back_pressure] must be a table.")
        unknown = set(section) - {"enabled", "queue_disk_high_percent"}
        if unknown:
            raise UserError(f"{source}: [back_pressure] has no setting {', '.join(sorted(unknown))} "
                            "(known: enabled, queue_disk_high_percent).")
        enabled = section.get("enabled", True)
        high = section.get("queue_disk_high_percent", 0)
        if not isinstance(enabled, bool):
            raise UserError(f"{source}: [back_pressure] enabled must be true or false.")
        if isinstance(high, bool) or not isinstance(high, int) or not (high == 0 or 5 <= high <= 100):
            raise UserError(f"{source}: [back_pressure] queue_disk_high_percent must be 0 (Exchange's rule) "
                            "or a whole number from 5 to 100.")
        return cls(enabled=enabled, queue_disk_high_percent=high)


@dataclass
class Home:
    path: Path
    server: str
    store_url: str
    admin_listen: str
    admin_token: str
    workers: int | str = "auto"
    back_pressure: BackPressureSettings = field(default_factory=BackPressureSettings)

    # -- locations --------------------------------------------------------------
    @property
    def queue_dir(self) -> Path:
        return self.path / "queue"

    @property
    def mailbox_dir(self) -> Path:
        return self.path / "mailboxes"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    def log_path(self, configured: str | None, setting: str) -> Path | None:
        """Where a log of this server is written: its configured path (``setting`` of Set-TransportService),
        else its place under the data directory's logs/; None when the path is $null, which turns that log off
        as in Exchange."""
        if configured is None:
            return None
        return Path(configured) if configured else self.log_dir.joinpath(*DEFAULT_LOG_DIRS[setting])

    def service_dir(self, configured: str | None, setting: str) -> Path | None:
        """Where the Pickup or Replay directory is: its configured path, else under the data directory; None
        when the path is $null (that directory is off)."""
        if configured is None:
            return None
        return Path(configured) if configured else self.path / DEFAULT_SERVICE_DIRS[setting]

    @property
    def config_cache(self) -> Path:
        """The configuration as last read from the store: a server starts from it when the store can't be
        reached (config/store.py save_snapshot)."""
        return self.path / "config-cache.json"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "serve.pid"

    def worker_queue_dir(self, index: int) -> Path:
        """Worker 0 keeps the queue in queue/, worker n in queue/w<n> (each its own durable store)."""
        return self.queue_dir if index == 0 else self.queue_dir / f"w{index}"

    def worker_socket(self, index: int) -> Path:
        return self.run_dir / f"control-w{index}.sock"

    # -- loading ----------------------------------------------------------------
    @classmethod
    def resolve_path(cls, home: str | None) -> Path:
        value = home or os.environ.get(ENV_HOME)
        if not value:
            raise UserError("No data directory: pass --home DIR or set MAILGATE_HOME.")
        return Path(value).expanduser().resolve()

    @classmethod
    def load(cls, path: Path) -> "Home":
        config = path / CONFIG_FILE
        if not config.exists():
            raise UserError(f"{path} is not a mailgate data directory (no {CONFIG_FILE}). "
                            f"Create it with: mailgate --home {path} init")
        try:
            with config.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{config} is not valid TOML: {exc}. Correct it by hand (mailgate init wrote it).") \
                from None
        try:
            return cls(path=path, server=data["server"]["name"],
                       store_url=resolve_store_url(data["store"]["url"], path),
                       admin_listen=data.get("admin", {}).get("listen", DEFAULT_ADMIN_LISTEN),
                       admin_token=data.get("admin", {}).get("token", ""),
                       workers=data["server"].get("workers", "auto"),
                       back_pressure=BackPressureSettings.parse(data.get("back_pressure", {}), config))
        except KeyError as exc:
            raise UserError(f"{config} lacks the setting {exc}.") from None

    @classmethod
    def create(cls, path: Path, server: str, store_url: str, admin_listen: str = DEFAULT_ADMIN_LISTEN) -> "Home":
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)   # it will hold queued mail and mailboxes: other users may not even look in
        store_url = resolve_store_url(store_url, path)
        home = cls(path=path, server=server, store_url=store_url, admin_listen=admin_listen,
                   admin_token=secrets.token_urlsafe(24))
        for d in (home.queue_dir, home.mailbox_dir, home.log_dir, home.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        text = (
            "# mailgate data directory settings (the organisation's configuration is in the store)\n"
            f"[server]\nname = {_toml_str(server)}\n"
            "# worker processes sharing the listeners; \"auto\" chooses for this machine\n"
            "workers = \"auto\"\n\n"
            "[store]\n# a SQLite path without a leading / is a file in this directory\n"
            f"url = {_toml_str(_stored_store_url(store_url, path))}\n\n"
            "[admin]\n# REST API and web admin center; the token authenticates API clients\n"
            f"listen = {_toml_str(admin_listen)}\ntoken = {_toml_str(home.admin_token)}\n\n"
            "[back_pressure]\n# refuse new mail (452 4.3.1) while the queue's disk is nearly full, as Exchange does\n"
            "enabled = true\n"
            "# percent of the queue disk in use at which all mail is refused; 0 = Exchange's rule (all but\n"
            "# 500 MB, at most 99); authoritative senders only from 2 points below, everyone from 4 below\n"
            "queue_disk_high_percent = 0\n"
        )
        config = path / CONFIG_FILE
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return home


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
