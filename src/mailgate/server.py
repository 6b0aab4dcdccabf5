"""The composition root: builds the parts of a transport server, keeps them in
step with the organisation's configuration, and stops them gracefully.

    receive connectors ─▶ queue (durable) ─▶ queue manager ─▶ send connectors / mailboxes
                                   │                │
                                tracking ◀──────────┘
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
import uuid
from typing import Any

from mailgate.config.model import Certificate, Mailbox, ReceiveConnector, TransportConfig, TransportServer
from mailgate.config.secrets import SecretBox, verify_password
from mailgate.config.store import ConfigStore, is_unreachable, load_snapshot, save_snapshot, unreachable_reason
from mailgate.control import ControlServer
from mailgate.errors import UserError
from mailgate.home import Home
from mailgate.manage.organisation import smtp_certificate
from mailgate.queue.admin import QueueAdmin
from mailgate.queue.manager import QueueManager, RuntimeSettings
from mailgate.queue.pressure import SAMPLE_SECONDS, DiskPressure
from mailgate.queue.store import NewMessage, QueueStore, merge_queue
from mailgate.receive.headers import HeaderBlock, fold, message_id_of, rfc5322_date
from mailgate.receive.listeners import ReceiveServer
from mailgate.receive.pickup import DirectorySettings, PickupReader
from mailgate.receive.policy import ConnectorPolicy, ReceiveConfig
from mailgate.routing.table import SUBMISSION, RoutingTable, intra_org_endpoints
from mailgate.send.deliver import Delivery
from mailgate.smtp import exps
from mailgate.tls import certs
from mailgate.tracking.tracker import MessageTracker, ProtocolLog

log = logging.getLogger("mailgate")

CONFIG_POLL_SECONDS = 1.0


class TransportService:
    """One running transport server."""

    def __init__(self, home: Home, *, admin_listen: str | None = None, announce: Any = print,
                 worker: int = 0, workers: int = 1) -> None:
        self.home = home
        self.admin_listen = admin_listen if admin_listen is not None else home.admin_listen
        self.announce = announce   # with several workers the supervisor chooses which lines reach the terminal
        self.worker, self.workers = worker, workers
        self.store = ConfigStore(home.store_url, migrate=False)   # migrated at the first read (_read_store)
        self.secrets = SecretBox.for_home(home.path)
        self.revision = -1
        self.snapshot: dict[str, list[Any]] = {}
        self._stop = asyncio.Event()
        self._reload_problem: str | None = None      # what the last failed reload said, until one succeeds
        self._store_migrated = False
        self._admin_url_published = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._ssl_cache: dict[tuple[str, bool], Any] = {}
        self.started = time.time()

    # -- configuration ----------------------------------------------------------------
    def _server_object(self, snapshot: dict[str, list[Any]]) -> TransportServer:
        for s in snapshot.get("TransportServer", []):
            if s.name.lower() == self.home.server.lower():
                return s
        raise UserError(f"The organisation has no transport server named {self.home.server}; "
                        f"this data directory belongs to a server that was removed.")

    def _ssl_context(self, connector: ReceiveConnector, server: TransportServer, certificates: list[Certificate],
                     org: TransportConfig) -> Any:
        try:
            cert = smtp_certificate(certificates, server.name, connector.fqdn or server.fqdn,
                                    connector.tls_certificate_name)
        except ValueError:
            cert = None
        if cert is None:
            return None
        secure = connector.domain_secure_enabled and bool(org.tls_receive_domain_secure_list)
        key = (cert.thumbprint, secure)
        ctx = self._ssl_cache.get(key)
        if ctx is None:
            trusted = "".join(c.certificate_pem + c.chain_pem for c in certificates if not c.has_private_key) or None
            ctx = certs.server_context(cert, self.secrets, client_ca_pem=trusted, request_client_cert=secure)
            self._ssl_cache[key] = ctx
        return ctx

    def build_receive_config(self, revision: int, snapshot: dict[str, list[Any]]) -> tuple[ReceiveConfig, RuntimeSettings]:
        server = self._server_object(snapshot)
        org = next(iter(snapshot.get("TransportConfig", [])), None) or TransportConfig()
        routing = RoutingTable(snapshot, server.name)
        mine = [c for c in snapshot.get("ReceiveConnector", []) if c.server.lower() == server.name.lower()]
        certificates = snapshot.get("ExchangeCertificate", [])
        policies = {}
        for c in mine:
            ctx = self._ssl_context(c, server, certificates, org)
            policies[c.guid] = ConnectorPolicy(c, server, ctx,
                                               frozenset(d.lower() for d in org.tls_receive_domain_secure_list))
        config = ReceiveConfig(revision, server, mine, policies, routing,
                               org_servers={s.name.lower(): s.name for s in snapshot.get("TransportServer", [])},
                               org_fqdns=frozenset(s.fqdn.lower() for s in snapshot.get("TransportServer", [])),
                               refusing=server.refusing_mail())
        reply = routing.exchange_recipient_reply
        return config, RuntimeSettings(server, org, routing,
                                       ndr_copies_to=reply.primary_smtp_address if reply else None)

    def _read_store(self, changed_since: int | None = None) -> tuple[int, dict[str, list[Any]]] | None:
        """The store's snapshot (None when its revision is still ``changed_since``). Worker 0 keeps a copy in
        the data directory for a start while the store can't be reached."""
        if not self._store_migrated:
            self.store.migrate()
            self._store_migrated = True
        if changed_since is not None and self.store.revision() == changed_since:
            return None
        revision, snapshot = self.store.snapshot()
        if self.worker == 0:
            save_snapshot(self.home.config_cache, revision, snapshot)
        return revision, snapshot

    def _first_configuration(self) -> tuple[int, dict[str, list[Any]]]:
        """The store's snapshot; when the store can't be reached, the copy kept at the last start or change."""
        try:
            read = self._read_store()
            assert read is not None
            return read
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            kept = load_snapshot(self.home.config_cache)
            if kept is None:
                raise UserError(f"The store can't be reached ({unreachable_reason(exc)}) and this server has not "
                                "read its configuration before: start it when the store answers.") from None
            self._reload_failed(exc)
            self.announce(f"The store can't be reached: starting with the configuration read last "
                          f"(revision {kept[0]}); it is read again as soon as the store answers.")
            return kept

    async def reload(self, force: bool = False, read: tuple[int, dict[str, list[Any]]] | None = None) -> bool:
        """Apply the store's configuration if it changed (or ``force``), or ``read`` when given."""
        if read is None:
            read = await asyncio.to_thread(self._read_store, None if force else self.revision)
            if read is None:
                return False
        revision, snapshot = read
        config, settings = self.build_receive_config(revision, snapshot)
        self.snapshot = snapshot
        self.revision = revision
        self.server_object = config.server
        self.manager.server_fqdns = {s.name.lower(): s.fqdn for s in snapshot.get("TransportServer", [])}
        self.manager.server_endpoints = intra_org_endpoints(snapshot)
        self.manager.apply(settings)
        s = config.server
        self.tracker.configure(s, self.home.log_path(s.message_tracking_log_path, "MessageTrackingLogPath"))
        self.receive_log.configure(self.home.log_path(s.receive_protocol_log_path, "ReceiveProtocolLogPath"),
                                   max_age=s.receive_protocol_log_max_age.seconds,
                                   max_directory_size=s.receive_protocol_log_max_directory_size.bytes,
                                   max_file_size=s.receive_protocol_log_max_file_size.bytes)
        self.send_log.configure(self.home.log_path(s.send_protocol_log_path, "SendProtocolLogPath"),
                                max_age=s.send_protocol_log_max_age.seconds,
                                max_directory_size=s.send_protocol_log_max_directory_size.bytes,
                                max_file_size=s.send_protocol_log_max_file_size.bytes)
        await self.receive.apply(config)
        return True

    async def _watch_config(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), CONFIG_POLL_SECONDS)
            except asyncio.TimeoutError:
                pass
            if self._stop.is_set():
                return
            try:
                if not await self.reload() and self.receive.bind_errors:
                    # A binding that couldn't be opened (its port held by another program, or one going away) is
                    # tried again at every poll: it is taken as soon as it is free, without a change or a restart.
                    await self.receive.apply(self.receive.config)
                await self._publish_admin_url_once()
            except Exception as exc:  # noqa: BLE001 - keep serving with the last good configuration
                self._reload_failed(exc)
            else:
                if self._reload_problem is not None:
                    log.warning("reading the configuration works again")
                    self._reload_problem = None

    async def reload_now(self) -> None:
        """SIGHUP, as most daemons take it: read the configuration again now (it is also read within a second
        of every change)."""
        if self.workers == 1:
            self.announce("SIGHUP: reading the configuration again.")
        try:
            await self.reload(force=True)
        except Exception as exc:  # noqa: BLE001 - keep serving with the last good configuration
            self._reload_failed(exc)

    def _reload_failed(self, exc: Exception) -> None:
        """Say once per problem (not once a second) that the configuration can't be read: the store is
        unreachable (PostgreSQL down) or holds something this version refuses. Mail goes on meanwhile."""
        if isinstance(exc, UserError):
            problem = exc.message
        elif is_unreachable(exc):
            problem = unreachable_reason(exc)
        else:
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if problem == self._reload_problem:
            return
        self._reload_problem = problem
        if isinstance(exc, UserError):
            log.error("%s (serving with the last configuration read)", exc.message)
        elif is_unreachable(exc):
            log.error("reading the configuration failed (%s); serving with the last configuration read until the "
                      "store answers again", problem)
        else:
            log.exception("reading the configuration failed; serving with the last configuration read")

    async def _watch_disk(self) -> None:
        """Back pressure: the queue disk's level, sampled while the server runs (queue/pressure.py)."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), SAMPLE_SECONDS)
            except asyncio.TimeoutError:
                self.pressure.sample()

    async def _maintenance(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), 3600)
            except asyncio.TimeoutError:
                pass
            for job in (self.tracker.prune, self.receive_log.files.prune, self.send_log.files.prune):
                try:
                    await asyncio.to_thread(job)
                except Exception as exc:  # noqa: BLE001
                    if is_unreachable(exc):   # tracking retention deletes from the store: it waits for it
                        log.warning("log retention postponed: the store can't be used (%s)", unreachable_reason(exc))
                    else:
                        log.exception("log retention failed")

    # -- authentication ---------------------------------------------------------------------
    async def authenticate(self, user: str, password: str) -> Mailbox | None:
        key = user.strip().lower()
        if "\\" in key:
            key = key.split("\\", 1)[1]
        candidates = [m for m in self.snapshot.get("Mailbox", [])
                      if key in (m.name.lower(), m.alias.lower()) or key in m.addresses()]
        if len(candidates) != 1 or not candidates[0].password_hash:
            await asyncio.to_thread(verify_password, password, _DUMMY_HASH)  # same cost for unknown users
            return None
        box = candidates[0]
        ok = await asyncio.to_thread(verify_password, password, box.password_hash)
        return box if ok else None

    # -- runtime operations (control socket and REST API) ---------------------------------------
    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        admin = self.admin
        if op == "queues":
            return await admin.queues(empty_poison=bool(args.get("empty_poison")))
        if op == "queue_keys":
            return [q.key for q in admin.resolve_queues(args["identities"])]
        if op == "queue_action":
            return admin.queue_action(args["action"], args.get("identities", []), bool(args.get("resubmit")),
                                      keys=args.get("keys"))
        if op == "messages":
            limit = args.get("limit")
            return await admin.messages(args.get("queue"), bool(args.get("include_recipients")),
                                        None if limit is None else int(limit), args.get("message_id"),
                                        args.get("after"))
        if op == "redirect":
            return self.manager.redirect([name.lower() for name in args["servers"]])
        if op == "message_action":
            return await admin.message_action(args["action"], args["identities"], bool(args.get("with_ndr", True)))
        if op == "export":
            identity, body = admin.export(args["identity"])
            return {"identity": identity, "body": body}
        if op == "submit":
            # A probe sent right after a change (New-Mailbox, then Test-Mailflow) is routed by that change, not by
            # the configuration the next poll would have read.
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 - submit with the last good configuration
                self._reload_failed(exc)
            return await self.submit_local(args["sender"], args["recipients"], args["body"],
                                           source=args.get("source", "STOREDRIVER"))
        if op == "status":
            return self.status()
        if op == "metrics":
            return [self.metrics.samples(self.worker)]
        if op == "reload":
            return await self.reload(force=True)
        raise UserError(f"Unknown runtime operation '{op}'.")

    def status(self) -> dict[str, Any]:
        return {"server": self.home.server, "fqdn": self.server_object.fqdn, "revision": self.revision,
                "listeners": self.receive.status(), "sessions": len(self.receive.sessions),
                "uptime": time.time() - self.started, "received": self.manager.received_total,
                "delivered": self.manager.delivered_total, "failed": self.manager.failed_total,
                "commits": self.queue_store.commits, "admin": self.admin_url,
                "back_pressure": {"level": self.pressure.level, "used_percent": self.pressure.used_percent,
                                  "path": str(self.pressure.path)}}

    async def submit_local(self, sender: str, recipients: list[str], body: bytes, *, source: str,
                           connector_id: str = "Submission", message_source: str | None = None) -> dict[str, Any]:
        """Submit a message generated on this server (Test-Mailflow's probe, a Pickup or Replay file) as
        mailbox submission does. ``source`` is its tracking source, ``message_source`` the component
        Get-Message names (MessageSourceName), the same unless given."""
        size = len(body)
        now = time.time()
        routed = self.manager.categorise([(r, None, None) for r in recipients], size)
        ref = self.queue_store.append_body([body])
        head = body.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        block = HeaderBlock.parse(head)
        new = NewMessage(network_id=str(uuid.uuid4()), message_id=message_id_of(block), sender=sender,
                         subject=block.get("Subject"), size=size, received_at=now,
                         expires_at=now + self.server_object.message_expiration_timeout.seconds, recipients=routed,
                         body=ref, source=message_source or source, directionality="Originating",
                         in_submission=any(r.queue == SUBMISSION for r in routed))
        fields = {"client_hostname": self.server_object.fqdn, "server_hostname": self.server_object.fqdn,
                  "connector_id": f"{self.home.server}\\{connector_id}"}
        await asyncio.wrap_future(self.manager.submit(new, fields, source=source))
        return {"internal_id": new.id, "message_id": new.message_id, "network_id": new.network_id}

    def _pickup_settings(self) -> DirectorySettings:
        server = self.server_object
        taking_mail = server.refusing_mail() is None   # in maintenance (Set-ServerComponentState) files wait
        return DirectorySettings(
            pickup=self.home.service_dir(server.pickup_directory_path, "PickupDirectoryPath") if taking_mail else None,
            replay=self.home.service_dir(server.replay_directory_path, "ReplayDirectoryPath") if taking_mail else None,
            per_minute=server.pickup_directory_max_messages_per_minute,
            max_header_size=server.pickup_directory_max_header_size.bytes or 64 * 1024,
            max_recipients=server.pickup_directory_max_recipients_per_message,
            max_size=self.manager.settings.org.max_send_size.bytes if self.manager.settings else None)

    async def _submit_file(self, sender: str, recipients: list[str], body: bytes, directory: str) -> None:
        """A Pickup or Replay file's message: received (RECEIVE, source SMTP, as Exchange tracks them)."""
        if self.pressure.level != "Normal":   # back pressure holds files in the directories, as Exchange does
            raise UserError(f"the queue's disk is nearly full (back pressure {self.pressure.level})")
        if directory == "Pickup":   # a trace line of its own, as an MTA gives mail injected on its host
            body = fold("Received", f"by {self.server_object.fqdn} with Pickup; {rfc5322_date()}") + body
        await self.submit_local(sender, recipients, body, source="SMTP", connector_id=directory,
                                message_source=directory)

    def _bad_file(self, reason: str, path: str) -> None:
        log.warning("%s; kept as %s", reason, path)
        self.tracker.event("BADMAIL", "PICKUP", source_context=reason)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        home = self.home
        if self.worker == 0:
            adopted = await asyncio.to_thread(self._adopt_orphan_queues)
            if adopted:
                self.announce(f"Moved {adopted} message(s) from the queues of workers that no longer run.")
        self.queue_store = QueueStore(home.worker_queue_dir(self.worker), id_base=self.worker * WORKER_ID_BASE)
        await asyncio.to_thread(self.queue_store.open)
        self.queue_store.attach_loop(loop)
        self.tracker = MessageTracker(self.store, home.server, home.log_path("", "MessageTrackingLogPath"))
        workers = {"worker": self.worker, "workers": self.workers}
        self.receive_log = ProtocolLog(home.log_path("", "ReceiveProtocolLogPath"), "receive", **workers)
        self.send_log = ProtocolLog(home.log_path("", "SendProtocolLogPath"), "send", **workers)
        from mailgate.tls.runtime import TlsMaterial

        self.tls = TlsMaterial(self)
        self.delivery = Delivery(secrets=self.secrets, protocol_log=self.send_log, mailbox_root=home.mailbox_dir,
                                 tls=self.tls)
        self.manager = QueueManager(store=self.queue_store, tracker=self.tracker, server_name=home.server,
                                    mailbox_root=home.mailbox_dir, deliver_smtp=self.delivery.deliver_smtp,
                                    deliver_mailbox=self.delivery.deliver_mailbox)
        self.manager.loop = loop
        from mailgate.api.metrics import Metrics

        self.metrics = Metrics()
        self.manager.on_event = self.metrics.on_event
        self.admin = QueueAdmin(self.manager, home.server)
        first = await asyncio.to_thread(self._first_configuration)
        config, settings = self.build_receive_config(*first)
        self.receive = ReceiveServer(store=self.queue_store, pipeline=self.manager, tracker=self.tracker,
                                     protocol_log=self.receive_log, authenticate=self.authenticate, config=config,
                                     reuse_port=self.workers > 1)
        if self.workers > 1:
            from mailgate.receive.limits import SharedCounter

            self.receive.counter = SharedCounter(home.run_dir / "connections.map", self.workers, self.worker)
        self.pressure = DiskPressure(home.worker_queue_dir(self.worker), enabled=home.back_pressure.enabled,
                                     high_percent=home.back_pressure.queue_disk_high_percent)
        self.pressure.sample()
        self.queue_store.on_disk_full = self.pressure.disk_full
        self.receive.pressure = self.pressure
        self.receive.server_auth_key = self.secrets.derive(exps.KEY_PURPOSE)
        self.receive.on_change = self.announce
        self.receive.on_event = self.metrics.on_event
        socket_path = home.control_socket if self.workers == 1 else home.worker_socket(self.worker)
        self.control = ControlServer(socket_path, self.handle, log)
        await self.control.start()
        self.admin_url = None
        if self.worker == 0 and self.admin_listen and self.admin_listen.lower() != "off":
            from mailgate.api.app import start_api

            try:
                self.api = await start_api(self, self.admin_listen)
                self.admin_url = f"http://{self.admin_listen}/"
            except UserError as exc:   # mail keeps flowing; the shell still manages the server
                self.announce(f"{exc.message} Mail flow is not affected.")
        await self.reload(read=first)
        if self._reload_problem is None:
            await self._publish_admin_url_once()
        self._tasks = [asyncio.ensure_future(self.manager.run()), asyncio.ensure_future(self._watch_config()),
                       asyncio.ensure_future(self._maintenance()), asyncio.ensure_future(self._watch_disk())]
        if self.worker == 0:
            self._tasks.append(asyncio.ensure_future(PickupReader(
                self._pickup_settings, self._submit_file, self._bad_file).run(self._stop)))
        if self.workers == 1:
            home.pid_file.write_text(f"{os.getpid()}\n")

    async def _publish_admin_url_once(self) -> None:
        if self.admin_url and not self._admin_url_published:
            await asyncio.to_thread(self._publish_admin_url, self.admin_listen)
            self._admin_url_published = True

    def _publish_admin_url(self, listen: str) -> None:
        """Record where the other servers of the organisation reach this one's queues (a wildcard listener
        through this server's FQDN); written only when it changed, as every write reloads every server."""
        host, _, port = listen.rpartition(":")
        with self.store.transaction() as tx:
            me = next((s for s in tx.list(TransportServer) if s.name.lower() == self.home.server.lower()), None)
            if me is None:
                return
            if host.strip("[]") in ("0.0.0.0", "::", ""):
                host = me.fqdn
            url = f"http://{host}:{port}/"
            if me.admin_api_url != url:
                me.admin_api_url = url
                tx.put(me)

    def _adopt_orphan_queues(self) -> int:
        """Queues of workers beyond the current count (the server now runs fewer) join worker 0's queue."""
        moved = 0
        for path in sorted(self.home.queue_dir.glob("w*")):
            if path.is_dir() and path.name[1:].isdigit() and int(path.name[1:]) >= self.workers:
                moved += merge_queue(path, self.home.worker_queue_dir(0))
        return moved

    async def stop(self, grace: float = 10.0) -> None:
        self._stop.set()
        await self.receive.stop_listening()
        await self.receive.drain(grace)
        await self.manager.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if getattr(self, "api", None) is not None:
            await self.api.stop()
        await self.control.stop()
        await asyncio.to_thread(self.queue_store.close)
        self.tracker.close()
        self.receive_log.close()
        self.send_log.close()
        self.store.dispose()
        if self.workers == 1:
            try:
                self.home.pid_file.unlink()
            except FileNotFoundError:
                pass

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._tasks.append(asyncio.ensure_future(self.reload_now())))
        listening = self.receive.status()
        if not any(item["listening"] for item in listening):
            self.announce("No receive connector could listen; fix the errors above (the server keeps retrying "
                          "every second and picks up configuration changes).")
        if self.admin_url:
            self.announce(f"Admin center and REST API: {self.admin_url} (token in {self.home.path / 'mailgate.toml'})")
        # Everything loaded so far lives as long as the process: keep it out of the garbage collector's
        # full collections, which would otherwise walk it again and again and stall sessions.
        gc.collect()
        gc.freeze()
        self.announce(f"mailgate {self.home.server} is running; stop it with Ctrl-C or SIGTERM.")
        await self._stop.wait()
        self.announce("Stopping: finishing sessions and deliveries in progress...")
        await self.stop()
        self.announce("Stopped.")


_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
WORKER_ID_BASE = 1_000_000_000_000   # worker n numbers its messages from n × this
LOW_OPEN_FILES = 8192                 # below this, a warning at start (raise_open_files_limit)


def worker_count(home: Home, requested: int | None) -> int:
    """Worker processes: --workers, else mailgate.toml's [server] workers, else "auto" (see bench/README.md)."""
    value: Any = requested if requested is not None else home.workers
    if value in (None, "auto"):
        # One process per core, up to 8: on 2 cores the benchmark shows 2 workers ~1.4x one (bench/README.md).
        return max(1, min(os.cpu_count() or 1, 8))
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise UserError(f'workers must be a number or "auto", not {value!r}') from None
    if not 1 <= count <= 64:
        raise UserError("workers must be between 1 and 64")
    return count


_serve_lock: int | None = None   # the open lock file, held while this process serves


def hold_serve_lock(home: Home) -> None:
    """One server per data directory: two would write the same queue files (and SO_REUSEPORT would let the
    second bind the same ports without a word). The lock is the kernel's, so it goes with the process, even
    killed with -9; the worker processes a supervisor starts don't take it."""
    global _serve_lock
    try:
        home.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(home.run_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise UserError(f"Can't use the data directory {home.path}: {exc.strerror} ({exc.filename}). Run mailgate "
                        "as the user that owns it.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = f" (pid {int(home.pid_file.read_text().split()[0])})"
        except (OSError, ValueError, IndexError):
            pid = ""
        raise UserError(f"mailgate {home.server} is already running from {home.path}{pid}. Stop it first "
                        "(SIGTERM), or give this server its own data directory.") from None
    _serve_lock = fd


def raise_open_files_limit() -> int:
    """Each SMTP session holds a socket: the soft limit on open files (often 1,024, from systemd or a login
    shell) would cap a process far below MaxInboundConnection (5,000 by default). Raise it to the hard
    limit, as nginx's worker_rlimit_nofile does; worker processes inherit it. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def run_event_loop(main: Any) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        asyncio.run(main)
    else:
        uvloop.run(main)


def run_server(home: Home, admin_listen: str | None = None, workers: int | None = None,
               worker_index: int | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MAILGATE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def announce(message: str) -> None:
        print(message, file=sys.stdout, flush=True)

    try:
        count = worker_count(home, workers)
        if worker_index is None:
            hold_serve_lock(home)
            mode = home.path.stat().st_mode & 0o777
            if mode & 0o077:
                announce(f"Warning: other users of this machine can look into the data directory {home.path} "
                         f"(mode {mode:o}), where queued mail, mailboxes and logs are kept; make it private: "
                         f"chmod 700 {home.path}")
            limit = raise_open_files_limit()
            if limit < LOW_OPEN_FILES:
                announce(f"Warning: this process may open only {limit} files, so each worker holds at most about "
                         f"{max(limit - 64, 0)} SMTP sessions; raise the limit (ulimit -n, LimitNOFILE=) to "
                         f"{LOW_OPEN_FILES} or more for Exchange's MaxInboundConnection of 5000.")
        if worker_index is None and count > 1:
            from mailgate.supervisor import Supervisor

            run_event_loop(Supervisor(home, count, admin_listen, announce).run())
            return 0
        service = TransportService(home, admin_listen=admin_listen, announce=announce,
                                   worker=worker_index or 0, workers=count)
        run_event_loop(service.run_until_signalled())
    except UserError as exc:
        print(f"mailgate: {exc.message}", file=sys.stderr)
        return 2
    _leave_stuck_threads()
    return 0


def _leave_stuck_threads(wait: float = 5.0) -> None:
    """The server has stopped and its stores are closed. A thread still running (an admin API request that
    runs a long cmdlet) would keep the process from exiting — Python waits for such threads — so after a
    short wait the process leaves without it."""
    deadline = time.monotonic() + wait
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
             and t.is_alive()]
    if stuck:
        log.warning("exiting with %d thread(s) still busy: %s", len(stuck), ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
