"""The management context: what every cmdlet handler works with."""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol

from mailgate.config.model import TransportConfig, TransportServer
from mailgate.config.secrets import SecretBox
from mailgate.config.store import ConfigStore, ConfigTransaction
from mailgate.errors import NotFoundError, RuntimeUnavailableError, UserError
from mailgate.home import Home


class Prompter(Protocol):
    """Asks the user for input (Get-Credential); the REST API has none."""

    def ask(self, prompt: str, *, secret: bool = False) -> str: ...

    def notice(self, text: str) -> None: ...


class WhatIf(Exception):
    """Raised inside a transaction to roll back a -WhatIf run."""


class ManagementContext:
    def __init__(self, home: Home, store: ConfigStore, *, runtime: Any = None, prompter: Prompter | None = None,
                 secrets: SecretBox | None = None) -> None:
        self.home = home
        self.store = store
        self.server_name = home.server
        self._runtime = runtime
        self.prompter = prompter
        self._secrets = secrets
        self.warnings: list[str] = []
        self.messages: list[str] = []
        self.errors: list[str] = []     # non-terminating errors: output stands, the command still failed
        self.whatif = False
        self.confirm: bool | None = None       # the running cmdlet's -Confirm: True asks, False (-Confirm:$false) never
        self.confirm_impact = "Medium"         # the running cmdlet's ConfirmImpact (Cmdlet.confirm_impact)
        self.confirm_interactively = False     # at the interactive shell High-impact changes are confirmed, as in EMS
        self.confirm_all: bool | None = None   # "Yes to All" or "No to All", for the rest of the pipeline
        self.shell: Any = None  # the shell evaluator, for its built-in commands (Format-Table...)

    # -- services -------------------------------------------------------------
    @property
    def secrets(self) -> SecretBox:
        if self._secrets is None:
            self._secrets = SecretBox.for_home(self.home.path)
        return self._secrets

    @property
    def runtime(self) -> Any:
        if self._runtime is None:
            raise RuntimeUnavailableError(
                f"The Microsoft Exchange Transport service on server {self.server_name} isn't running: this command "
                f"needs the running server. Start it with: mailgate --home {self.home.path} serve")
        return self._runtime

    def runtime_for(self, server: str | None) -> Any:
        """The running transport of ``server``: this one's, or another organisation server's through the admin
        API it published (authenticated with a token derived from the organisation's key)."""
        if not server or server.lower() == self.server_name.lower():
            return self.runtime
        from mailgate.control import RemoteRuntime

        with self.store.transaction() as tx:
            other = next((s for s in tx.list(TransportServer) if s.name.lower() == server.lower()), None)
        if other is None:
            raise NotFoundError(f"The server '{server}' isn't a transport server of this organisation.",
                                parameter="Server")
        if not other.admin_api_url:
            raise RuntimeUnavailableError(
                f"Server {other.name} publishes no admin API, so its queues can't be reached from here: start its "
                f"transport service with an admin listener another server can reach (mailgate serve --admin-listen "
                f"0.0.0.0:8440), or run the command in {other.name}'s shell.")
        return RemoteRuntime(other.name, other.admin_api_url, self.secrets)

    def has_runtime(self) -> bool:
        return self._runtime is not None

    def set_runtime(self, runtime: Any) -> None:
        self._runtime = runtime

    # -- output side channels -------------------------------------------------
    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def say(self, message: str) -> None:
        self.messages.append(message)

    def fail(self, message: str) -> None:
        """Report an error after the output (e.g. Test-Mailflow's Failure) so scripts see a failed command."""
        self.errors.append(message)

    def should_process(self, action: str) -> bool:
        """False (and a 'What if' line) under -WhatIf; the caller then changes nothing. At the interactive shell a
        High-impact change (Remove-*) is confirmed first, as Exchange's shell does, unless -Confirm:$false; -Confirm
        asks for any change, wherever there is someone to ask."""
        if self.whatif:
            self.say(f"What if: {action}")
            return False
        asks = self.confirm is True or (self.confirm is None and self.confirm_impact == "High"
                                        and self.confirm_interactively)
        if not asks or self.prompter is None:
            return True
        if self.confirm_all is not None:
            return self.confirm_all
        self.prompter.notice(f"\nConfirm\nAre you sure you want to perform this action?\n{action}")
        while True:
            answer = self.prompter.ask('[Y] Yes  [A] Yes to All  [N] No  [L] No to All  [?] Help (default is "Y"): ')
            choice = answer.strip().lower()[:1]
            if choice in ("", "y", "a"):
                self.confirm_all = True if choice == "a" else None
                return True
            if choice in ("n", "l"):
                self.confirm_all = False if choice == "l" else None
                return False
            self.prompter.notice("Y - Continue with only the next step of the operation.\nA - Continue with all the "
                                 "steps of the operation.\nN - Skip this operation and proceed with the next "
                                 "operation.\nL - Skip this operation and all subsequent operations.")

    # -- frequently read objects ---------------------------------------------
    def local_server(self, tx: ConfigTransaction | None = None) -> TransportServer:
        return self.transport_server(self.server_name, tx)

    def transport_server(self, name: str, tx: ConfigTransaction | None = None) -> TransportServer:
        def read(t: ConfigTransaction) -> TransportServer:
            server = t.get(TransportServer, name)
            if server is None:
                raise NotFoundError(f"The operation couldn't be performed because object '{name}' couldn't be found "
                                    "in the organisation's transport servers.", target=name)
            return server

        if tx is not None:
            return read(tx)
        with self.store.reader() as t:
            return read(t)

    def transport_config(self, tx: ConfigTransaction | None = None) -> TransportConfig:
        def read(t: ConfigTransaction) -> TransportConfig:
            return t.get(TransportConfig, "transport settings") or TransportConfig()

        if tx is not None:
            return read(tx)
        with self.store.reader() as t:
            return read(t)


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def require(condition: bool, message: str, parameter: str | None = None) -> None:
    if not condition:
        raise UserError(message, parameter=parameter)
