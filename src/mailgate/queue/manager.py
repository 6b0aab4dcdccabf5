"""The queue manager: the only part that moves mail between queues.

It categorises new messages into delivery queues (one per next hop, as
Exchange does), runs delivery workers per queue within connection limits,
records each recipient's outcome, retries on Exchange's schedule, sends DSNs,
expires old mail and isolates poison messages.

Memory does not grow with the number of deferred messages: each queue keeps
only a bounded window of ready message ids in memory; everything else stays
in the store, indexed by queue and due time, and is pulled in when due.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from mailgate.config.model import TransportConfig, TransportServer
from mailgate.queue.store import (
    DELIVERED,
    FAILED,
    READY,
    RETRY,
    NewMessage,
    NewRecipient,
    QueueStore,
    StoredBody,
)
from mailgate.routing.table import (INTRA_ORG_CONNECTOR, NO_CONNECTOR, POISON, SUBMISSION, UNREACHABLE, Failure,
                                    Route, RoutingTable, mailbox_database)
from mailgate.send import dsn as DSN
from mailgate.tracking.tracker import MessageTracker

log = logging.getLogger("mailgate.queue")

WINDOW = 500                  # ready message ids kept in memory per queue
FRESH_LIMIT = 20_000          # just-received messages whose rows are kept for their first delivery
FRESH_BODIES = 2_000          # ... and of those, how many keep their (inline, ≤ 16 KB) body too
MAILBOX_WORKERS = 4
MAILBOX_BATCH = 32
REDIRECT = "redirect"         # the key of a queue Redirect-Message made: redirect:<server>[,<server>...]
# The delivery queues Redirect-Message drains: those to a next hop another server can reach as well. Mail for this
# server's own mailboxes stays, as do Submission, Unreachable and Poison (Exchange drains the delivery queues).
REDIRECTED_DELIVERY_TYPES = {"DnsConnectorDelivery", "SmartHostConnectorDelivery",
                             "SmtpRelayToConnectorSourceServers", "SmtpRelayToServers"}


def _path(sender: str) -> str:
    """The reverse path as tracking shows it: ``<>`` for the null sender of DSNs."""
    return sender or "<>"


class RateCounter:
    """Messages per second over the last minute (Get-Queue IncomingRate/OutgoingRate)."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        # Made at the first message: a queue per next hop has two counters, and a server may hold thousands of
        # next hops that never deliver (an empty deque is ≈ 0.6 KB).
        self._buckets: collections.deque[tuple[int, int]] | None = None

    def add(self, n: int = 1) -> None:
        second = int(time.monotonic())
        if self._buckets is None:
            self._buckets = collections.deque()
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1] = (second, self._buckets[-1][1] + n)
        else:
            self._buckets.append((second, n))
        self._trim(second)

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] < now - 60:
            self._buckets.popleft()

    def rate(self) -> float:
        if self._buckets is None:
            return 0.0
        self._trim(int(time.monotonic()))
        return round(sum(n for _, n in self._buckets) / 60.0, 2)


@dataclass
class DeliveryQueue:
    key: str
    number: int
    delivery_type: str
    next_hop: str
    connector: str | None
    category: str
    suspended: bool = False
    last_error: str | None = None
    last_error_host: str = ""
    last_error_ip: str = ""
    last_error_time: float | None = None
    retry_count: int = 0
    first_retry: float | None = None
    last_retry: float | None = None
    next_retry: float | None = None
    active: int = 0
    ready: collections.deque[int] = field(default_factory=collections.deque)
    held: set[int] = field(default_factory=set)       # ids in ``ready`` or being delivered
    incoming: RateCounter = field(default_factory=RateCounter)
    outgoing: RateCounter = field(default_factory=RateCounter)
    last_used: float = field(default_factory=time.monotonic)
    tls_domain: str | None = None
    idle: int = 0                                        # workers holding an open connection, waiting for mail
    backlog: bool = False                                # the last refill or offer left mail in the store only
    refill_due: float = 0.0                              # time.time() of the next look in the store (IDLE_REFILL_SECONDS)
    _waiters: list[asyncio.Future[bool]] = field(default_factory=list, repr=False)

    @property
    def tracked_connector(self) -> str:
        """The ConnectorId of its SEND, FAIL and DEFER events: its send connector, Exchange's implicit
        intra-organisation connector for Redirect-Message's queue, else its next hop."""
        if self.connector:
            return self.connector
        return INTRA_ORG_CONNECTOR if self.delivery_type == "SmtpRelayToServers" else self.next_hop

    @property
    def status(self) -> str:
        if self.suspended:
            return "Suspended"
        if self.active > self.idle:
            return "Active"
        if self.next_retry is not None and self.next_retry > time.time():
            return "Retry"
        return "Ready"

    def in_retry(self, now: float) -> bool:
        return self.next_retry is not None and self.next_retry > now

    def offer(self, message_id: int) -> bool:
        if message_id in self.held:
            return False
        if len(self.ready) >= WINDOW:
            self.backlog = True
            return False
        self.ready.append(message_id)
        self.held.add(message_id)
        if self._waiters:
            self.wake_waiters()
        return True

    def wake_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(True)
        self._waiters.clear()

    async def wait_for_mail(self, seconds: float) -> bool:
        """Wait (holding a delivery connection open) until mail is offered to this queue; False on timeout.
        A future and a timer rather than ``asyncio.wait_for``, which makes a task per wait: at one message
        at a time this runs for every message."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(seconds, lambda: waiter.done() or waiter.set_result(False))
        self._waiters.append(waiter)
        self.idle += 1
        try:
            return await waiter
        finally:
            self.idle -= 1
            timer.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)


# A delivery queue's due recipients of one status, in due order: recipient_due gives that order, so a refill reads
# only as far as it needs (``QueueManager._refill``).
REFILL_WALK = ("SELECT r.message, r.next_attempt FROM recipient r JOIN message m ON m.id = r.message"
               " WHERE r.queue=? AND r.status=? AND r.suspended=0 AND r.next_attempt<=? AND m.poison=0"
               " AND m.in_submission=0 ORDER BY r.next_attempt")
SUBMISSION_WAITING = "SELECT 1 FROM message WHERE in_submission=1 AND poison=0 LIMIT 1"
# How often a queue with nothing in memory looks in the store anyway (``_refill``, and Submission's
# SUBMISSION_WAITING), for mail that memory wasn't told of: retries come due, mail a delivery gave back untried.
# Whatever changes the store behind memory's back says so (``refill_soon``) and is looked for on the next tick. It
# ran at every tick, that is for every message at one message at a time: three queries on the event loop and
# 18 % of its busy time.
IDLE_REFILL_SECONDS = 0.5
# The periodic scans for expired mail and for mail that has waited DelayNotificationTimeout. Each must find its
# rows through an index (message_expiry, message_undelayed): they run on the event loop every SCAN_SECONDS, and a
# long queue is where they matter (tests/unit/test_queue_scans.py).
SCAN_SECONDS = 5
EXPIRY_SCAN = "SELECT * FROM message WHERE expires_at<=? AND poison=0 LIMIT 200"
DELAY_SCAN = ("SELECT * FROM message WHERE received_at<=? AND delay_notified=0 AND poison=0 AND sender != ''"
              " AND is_dsn=0 LIMIT 200")


@dataclass
class RuntimeSettings:
    server: TransportServer
    org: TransportConfig
    routing: RoutingTable
    submission_suspended: bool = False
    # Where copies of NDRs with a code in GenerateCopyOfDSNFor go: the address of the Microsoft Exchange
    # recipient's reply recipient (Set-OrganizationConfig); None discards them, as Exchange does.
    ndr_copies_to: str | None = None


class QueueManager:
    def __init__(self, *, store: QueueStore, tracker: MessageTracker, server_name: str, mailbox_root: Any,
                 deliver_smtp: Callable[..., Any], deliver_mailbox: Callable[..., Any]) -> None:
        self.store = store
        self.tracker = tracker
        self.server_name = server_name
        # The organisation's other servers, for relaying to a send connector's source servers (server.reload).
        self.server_fqdns: dict[str, str] = {}
        self.server_endpoints: dict[str, list[tuple[str | None, int]]] = {}
        self.mailbox_root = mailbox_root
        self._deliver_smtp = deliver_smtp        # async (manager, queue, settings) → None
        self._deliver_mailbox = deliver_mailbox  # sync (settings, rows) → outcomes, run in a thread
        self.queues: dict[str, DeliveryQueue] = {}
        self.settings: RuntimeSettings | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fresh: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        # New messages (and DSNs) whose rows may be committed but that aren't acknowledged and accepted yet: the
        # scans of the queue leave them alone, so nothing is delivered before it is durable, and ``_accepted`` is
        # the one place that hands a new message to its queues.
        self._accepting: set[int] = set()
        self._stopping = False
        self._last_scan = 0.0
        self._submission_due = 0.0   # time.time() of the next SUBMISSION_WAITING (IDLE_REFILL_SECONDS)
        self.outbound_connections = 0
        self.delivered_total = 0
        self.failed_total = 0
        self.received_total = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=MAILBOX_WORKERS, thread_name_prefix="mailbox")
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None   # metrics hook

    # -- configuration ----------------------------------------------------------------
    def apply(self, settings: RuntimeSettings) -> None:
        previous = self.settings
        self.settings = settings
        if previous is None:
            self._load_queues()
        else:
            self._resubmit_stale_routes()
            self._retry_changed_connectors(previous)
        self.refill_soon()

    def _retry_changed_connectors(self, previous: RuntimeSettings) -> None:
        """A send connector that changed (its smart hosts, port, TLS or credentials corrected, say): its queues
        waiting to retry try again now with the new settings, as Retry-Queue would, instead of at the end of a
        retry interval that the old settings earned."""
        assert self.settings is not None
        changed = [q for q in self.queues.values() if q.connector
                   and (new := self.settings.routing.connector(q.connector)) is not None
                   and new != previous.routing.connector(q.connector)]
        if not changed:
            return
        keys = [q.key for q in changed]
        for q in changed:
            q.next_retry = None
        self.store.execute(f"UPDATE recipient SET next_attempt=? WHERE queue IN ({','.join('?' * len(keys))}) "
                           "AND status IN ('Ready','Retry')", (time.time(), *keys),
                           after=lambda: self._soon(self.wake))

    def _load_queues(self) -> None:
        numbers = self.store.queue_numbers()
        rows = self.store.reader().execute(
            "SELECT DISTINCT queue FROM recipient WHERE status IN (?, ?)", (READY, RETRY)).fetchall()
        for key in [r[0] for r in rows] + [SUBMISSION, UNREACHABLE]:
            q = self.queue(key)
            if key in numbers:
                q.suspended = numbers[key][1]

    def queue(self, key: str) -> DeliveryQueue:
        q = self.queues.get(key)
        if q is None:
            q = self._describe(key)
            self.queues[key] = q
        return q

    def _describe(self, key: str) -> DeliveryQueue:
        numbers = self.store.queue_numbers()
        number = numbers.get(key, (0, False))[0]
        if not number:
            number = max([n for n, _ in numbers.values()] + [0]) + 1
            self.store.execute("INSERT OR IGNORE INTO queue_state (queue, number, suspended) VALUES (?, ?, 0)",
                               (key, number)).result(timeout=30)
        routing = self.settings.routing if self.settings else None
        if key == SUBMISSION:
            return DeliveryQueue(key, number, "Undefined", "Submission", None, "Internal")
        if key == UNREACHABLE:
            return DeliveryQueue(key, number, "Unreachable", "Unreachable Domain", None, "Internal")
        if key == "mailbox":
            return DeliveryQueue(key, number, "SmtpDeliveryToMailbox", mailbox_database(self.server_name), None, "Internal")
        kind, _, rest = key.partition(":")
        if kind == "lmtp":
            return DeliveryQueue(key, number, "SmtpDeliveryToMailbox", rest, None, "Internal")
        if kind == "dns":
            connector, _, domain = rest.partition(":")
            return DeliveryQueue(key, number, "DnsConnectorDelivery", domain, connector, "External")
        if kind == "smarthost":
            c = routing.connector(rest) if routing else None
            hop = ",".join(str(h) for h in c.smart_hosts) if c else rest
            return DeliveryQueue(key, number, "SmartHostConnectorDelivery", hop, rest, "External")
        if kind == "relay":
            return DeliveryQueue(key, number, "SmtpRelayToConnectorSourceServers", rest, rest, "Internal")
        if kind == REDIRECT:   # Redirect-Message: to other servers of the organisation, named in the key
            hop = ",".join(self.server_fqdns.get(name, name) for name in rest.split(","))
            return DeliveryQueue(key, number, "SmtpRelayToServers", hop, None, "Internal")
        return DeliveryQueue(key, number, "Undefined", key, None, "Internal")

    def _resubmit_stale_routes(self) -> None:
        """After a configuration change: Unreachable mail, and mail for connectors that are gone, is re-routed."""
        assert self.settings is not None
        routing = self.settings.routing
        stale = [UNREACHABLE] if not self.queue(UNREACHABLE).suspended else []
        for key, q in self.queues.items():
            if q.connector and routing.connector(q.connector) is None:
                stale.append(key)
        if stale:
            marks = ",".join("?" * len(stale))
            self.store.execute(
                f"UPDATE message SET in_submission=1 WHERE id IN (SELECT message FROM recipient WHERE queue IN ({marks})"
                f" AND status IN ('Ready','Retry'))", stale)
            self.store.execute(f"UPDATE recipient SET queue='Submission' WHERE queue IN ({marks}) AND status IN "
                               f"('Ready','Retry')", stale,
                               after=lambda: self._soon(self.wake))
            for key in stale:
                q = self.queues.get(key)
                if q is not None and not q.active:
                    q.ready.clear()
                    q.held.clear()

    # -- intake -------------------------------------------------------------------------
    def categorise(self, recipients: list[tuple[str, str | None, str | None]], size: int,
                   config: Any = None, *, originating: bool = False, system: bool = False) -> list[NewRecipient]:
        """Queue keys for new recipients; failures and a suspended Submission queue stay in Submission.
        ``originating`` and ``system`` as for ``RoutingTable.route`` (the organisation's size limits)."""
        assert self.settings is not None
        routing = config.routing if config is not None else self.settings.routing
        suspended = self.queue(SUBMISSION).suspended
        out = []

        def add(address: str, orcpt: str | None, notify: str | None, **tracking: Any) -> None:
            route = None if suspended else routing.route(address, size, originating=originating, system=system,
                                                         recipients=len(recipients))
            key = route.queue if isinstance(route, Route) else SUBMISSION
            out.append(NewRecipient(address=address, queue=key, orcpt=orcpt, notify=notify,
                                    last_error=NO_CONNECTOR if key == UNREACHABLE else None, **tracking))

        for address, orcpt, notify in recipients:
            resolution = routing.resolve(address)
            box = resolution.mailbox
            if box is not None and box.forwarding_smtp_address:
                # ForwardingSmtpAddress: the message goes to the forwarding address (and the mailbox, if kept).
                orcpt = orcpt or f"rfc822;{address}"
                add(box.forwarding_smtp_address, orcpt, notify, related=address, event="REDIRECT")
                if not box.deliver_to_mailbox_and_forward:
                    continue
            if box is not None and address.lower() != box.primary_smtp_address.lower():
                add(address, orcpt, notify, related=box.primary_smtp_address, event="RESOLVE")
            else:
                add(address, orcpt, notify)
        return out

    def submit(self, new: NewMessage, receive_fields: dict[str, Any] | None = None, *, source: str = "SMTP",
               on_durable: Callable[[concurrent.futures.Future[Any]], None] | None = None
               ) -> concurrent.futures.Future[Any]:
        """Make a new message durable; once it is, call ``on_durable`` (on the event loop, first: the client's
        250 goes out before anything else is done), then track it and hand it to its queues."""
        new.in_submission = new.in_submission or any(r.queue == SUBMISSION for r in new.recipients)
        fut = self.store.submit(new)
        self._accepting.add(new.id)
        loop = self.loop

        def on_loop(f: concurrent.futures.Future[Any]) -> None:
            if on_durable is not None:
                on_durable(f)
            if f.exception() is None:
                self._accepted(new, receive_fields or {}, source)
            else:
                self._accepting.discard(new.id)

        if loop is not None:
            fut.add_done_callback(lambda f: self._soon(on_loop, f))
        return fut

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop soon, from a store future's callback. Where the loop commits, the future
        resolves on the loop itself (queue/store.py), and call_soon_threadsafe's wake-up of the loop (a write
        to its self-pipe, and a turn of the loop to read it) would be work for nothing."""
        loop = self.loop
        if loop is None:
            return
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:   # another thread (the commit thread)
            here = False
        if here:
            loop.call_soon(fn, *args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _accepted(self, new: NewMessage, fields: dict[str, Any], source: str) -> None:
        self._accepting.discard(new.id)
        self.received_total += 1
        recipients = [r.address for r in new.recipients]
        common = dict(internal_message_id=new.id, message_id=new.message_id, network_message_id=new.network_id,
                      sender=_path(new.sender), return_path=_path(new.sender), message_subject=new.subject, total_bytes=new.size,
                      directionality=new.directionality)
        self.tracker.event("RECEIVE", source, recipients=recipients, recipient_count=len(recipients), **common, **fields)
        if source == "STOREDRIVER":
            self.tracker.event("SUBMIT", "STOREDRIVER", recipients=recipients, recipient_count=len(recipients),
                               source_context=f"MDB:{mailbox_database(self.server_name)}, ClientType:TestMailflow",
                               **common)
        if self.on_event:
            self.on_event("received", {"connector": new.connector or source, "size": new.size})
        for r in new.recipients:
            if r.event == "RESOLVE":
                self.tracker.event("RESOLVE", "ROUTING", recipients=[r.related], related_recipient_address=r.address,
                                   recipient_count=1, **common)
            elif r.event == "REDIRECT":
                self.tracker.event("REDIRECT", "ROUTING", recipients=[r.address], related_recipient_address=r.related,
                                   recipient_count=1, **common)
        keys = list(dict.fromkeys(r.queue for r in new.recipients))
        if len(keys) > 1:
            for key in keys[1:]:
                related = [r.address for r in new.recipients if r.queue == key]
                self.tracker.event("TRANSFER", "ROUTING", recipients=related, recipient_count=len(related),
                                   reference=str(new.id), **common)
        if new.in_submission:
            self._submission_due = 0.0
        else:
            self._remember(new)
        for key in keys:
            q = self.queue(key)
            q.incoming.add()
            if key != SUBMISSION:
                q.offer(new.id)
        self.wake()

    # -- the scheduler ---------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def refill_soon(self) -> None:
        """The store changed behind memory's back (an administrator, a configuration change): every queue,
        Submission's too, looks in it at the next tick instead of IDLE_REFILL_SECONDS later."""
        self._submission_due = 0.0
        for q in self.queues.values():
            q.refill_due = 0.0
        self.wake()

    async def run(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        while not self._stopping:
            # A tick at least every second: a timer that wakes it, not asyncio.wait_for, which makes a task per
            # wait (at one message at a time the manager ticks for every message: 4 % of the loop's busy time).
            timer = loop.call_later(1.0, self._wake.set)
            await self._wake.wait()
            timer.cancel()
            # The callbacks already due run first, so one tick answers all their wake-ups (wait() doesn't yield
            # when it is set already: without this, ticks ran back to back at 20 sessions, 7 % more CPU).
            await asyncio.sleep(0)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the scheduler must keep running
                log.exception("queue scheduler tick failed")

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        for q in self.queues.values():
            q.wake_waiters()   # idle delivery connections close now
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self.executor.shutdown(wait=True)

    def _tick(self) -> None:
        assert self.settings is not None
        now = time.time()
        sub = self.queue(SUBMISSION)
        if not sub.suspended and not sub.active and now >= self._submission_due:
            if self.store.reader().execute(SUBMISSION_WAITING).fetchone():
                self._submission_due = 0.0   # once this batch is categorised, the next one
                self._spawn(sub, self._categorise_submission(sub))
            else:
                self._submission_due = now + IDLE_REFILL_SECONDS
        if now - self._last_scan >= SCAN_SECONDS:
            self._last_scan = now
            self._spawn(None, self._expire_and_delay())
        server = self.settings.server
        max_total = server.max_outbound_connections.value or 1_000_000
        max_per_hop = server.max_per_domain_outbound_connections.value or 1_000_000
        for key, q in list(self.queues.items()):
            if key in (SUBMISSION, UNREACHABLE) or q.suspended:
                continue
            if q.in_retry(now):
                continue
            if not q.ready and (q.backlog or now >= q.refill_due):
                self._refill(q, now)
            if not q.ready:
                if not q.active and time.monotonic() - q.last_used > server.queue_max_idle_time.seconds \
                        and q.next_retry is None:
                    del self.queues[key]
                continue
            q.last_used = time.monotonic()
            if q.delivery_type == "SmtpDeliveryToMailbox" and not key.startswith("lmtp:"):
                wanted = min(MAILBOX_WORKERS, 1 + len(q.ready) // MAILBOX_BATCH)
                while q.active < wanted:
                    self._spawn(q, self._mailbox_worker(q))
            else:
                wanted = min(max_per_hop, 1 + len(q.ready) // 20)
                while q.active < wanted and self.outbound_connections < max_total:
                    self._spawn(q, self._smtp_worker(q))

    def _spawn(self, q: DeliveryQueue | None, coro: Any) -> None:
        if q is not None:
            q.active += 1
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if q is not None:
                q.active -= 1
            if not t.cancelled() and t.exception() is not None:
                log.error("delivery worker for %s failed", q.key if q else "scan", exc_info=t.exception())
            self.wake()

        task.add_done_callback(finished)

    def _refill(self, q: DeliveryQueue, now: float) -> None:
        """Offer the queue's first WINDOW messages that are due. One walk of recipient_due in due order per status,
        merged, stopping at WINDOW: with ``status IN ('Ready','Retry')`` SQLite sorted every due recipient of the
        queue first, on the event loop, at every refill (0.1 s at a backlog of 50,000)."""
        db = self.store.reader()
        walks = [db.execute(REFILL_WALK, (q.key, status, now)) for status in (READY, RETRY)]
        found: dict[int, None] = {}
        try:
            for message_id, _ in heapq.merge(*walks, key=lambda row: row[1]):
                found[message_id] = None
                if len(found) >= WINDOW:
                    break
        finally:
            for walk in walks:
                walk.close()
        q.backlog = len(found) >= WINDOW
        q.refill_due = now + IDLE_REFILL_SECONDS
        for message_id in found:
            if message_id not in self._accepting:
                q.offer(message_id)

    def take(self, q: DeliveryQueue, n: int = 1) -> list[int]:
        out = []
        while q.ready and len(out) < n:
            out.append(q.ready.popleft())
        return out

    def release(self, q: DeliveryQueue, ids: list[int], recorded: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        """Give back ids taken from the window; recorded ones are given back when their outcome commits. Those
        given back untried are still due in the store: the queue looks there at its next tick."""
        for i in ids:
            if i not in recorded:
                q.held.discard(i)
                q.refill_due = 0.0

    # -- loading work ----------------------------------------------------------------------------
    def _remember(self, new: NewMessage) -> None:
        """Keep a just-committed message's rows in memory: its first delivery then needs no query."""
        if len(self._fresh) >= FRESH_LIMIT:
            for key in list(itertools.islice(self._fresh, FRESH_LIMIT // 10)):
                del self._fresh[key]
        row = {"id": new.id, "network_id": new.network_id, "message_id": new.message_id, "sender": new.sender,
               "subject": new.subject, "size": new.size, "received_at": new.received_at, "expires_at": new.expires_at,
               "source": new.source, "source_ip": new.source_ip, "client_hostname": new.client_hostname,
               "connector": new.connector, "auth_as": new.auth_as, "directionality": new.directionality,
               "envid": new.envid, "ret": new.ret, "body_type": new.body_type, "smtputf8": int(new.smtputf8),
               "segment": new.body.segment, "offset": new.body.offset, "length": new.body.length,
               # Bodies in memory only for the first few thousand: beyond, a delivery reads the row's body.
               "body": new.body.data if len(self._fresh) < FRESH_BODIES else None,
               "spool_path": new.body.spool_path, "in_submission": int(new.in_submission), "poison": 0,
               "error_count": 0, "delay_notified": 0, "is_dsn": int(new.is_dsn), "priority": "Normal",
               "lines_normalised": int(new.lines_normalised)}
        rcpts = [{"message": new.id, "idx": i, "address": r.address, "orcpt": r.orcpt, "notify": r.notify,
                  "queue": r.queue, "status": r.status, "suspended": 0, "next_attempt": new.received_at,
                  "retry_count": 0, "last_error": r.last_error} for i, r in enumerate(new.recipients)]
        self._fresh[new.id] = (row, rcpts)

    def forget(self, message_id: int) -> None:
        """Drop a message from the in-memory shortcut (an administrator changed it)."""
        self._fresh.pop(message_id, None)

    def redirect(self, servers: list[str]) -> int:
        """Redirect-Message: the active mail of the delivery queues (Ready or Retry, not suspended) moves to one
        queue for ``servers`` (names, lower case), relayed to them as to a connector's source servers. Mail being
        delivered or committed right now stays where it is, so nothing is sent twice. Returns how many
        recipients moved."""
        key = f"{REDIRECT}:{','.join(servers)}"
        drained = [q for q in self.queues.values() if q.delivery_type in REDIRECTED_DELIVERY_TYPES and q.key != key]
        moved = 0
        for q in drained:
            busy = (q.held - set(q.ready)) | self._accepting   # being delivered, or not yet acknowledged
            q.ready.clear()
            q.held = q.held & busy
            q.backlog = False
            marks = ",".join("?" * len(busy))
            moved += self.store.execute(
                "UPDATE recipient SET queue=?, next_attempt=0 WHERE queue=? AND status IN ('Ready','Retry') AND "
                "suspended=0" + (f" AND message NOT IN ({marks})" if busy else ""),
                (key, q.key, *busy)).result(timeout=60) or 0
            q.next_retry = None
        self._fresh.clear()   # the rows kept in memory name the queues they were in
        if moved:
            self.queue(key)
        self.refill_soon()
        return moved

    def load(self, message_id: int, queue: str) -> tuple[Any, list[Any]] | None:
        """The message row and its pending, unsuspended recipients in ``queue``."""
        fresh = self._fresh.get(message_id)
        if fresh is not None:
            row, rcpts = fresh
            mine = [r for r in rcpts if r["queue"] == queue and r["status"] in (READY, RETRY)]
            left = [r for r in rcpts if r not in mine]
            if left:
                self._fresh[message_id] = (row, left)
            else:
                del self._fresh[message_id]
            if mine:
                return row, mine
        db = self.store.reader()
        msg = db.execute("SELECT * FROM message WHERE id=? AND poison=0", (message_id,)).fetchone()
        if msg is None:
            return None
        rcpts = db.execute("SELECT * FROM recipient WHERE message=? AND queue=? AND status IN ('Ready','Retry')"
                           " AND suspended=0 ORDER BY idx", (message_id, queue)).fetchall()
        return msg, rcpts

    # -- workers ----------------------------------------------------------------------------------
    async def _mailbox_worker(self, q: DeliveryQueue) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            ids = self.take(q, MAILBOX_BATCH)
            if not ids:
                return
            recorded: set[int] = set()
            try:
                work = [w for w in (self.load(i, q.key) for i in ids) if w is not None and w[1]]
                bodies = [self.store.body(msg) for msg, _ in work]
                results = await loop.run_in_executor(self.executor, self._deliver_mailbox, self.settings, work, bodies)
                for (msg, rcpts), body, outcomes in zip(work, bodies, results):
                    self.record(q, msg, rcpts, outcomes, body=body)
                    recorded.add(msg["id"])
            except Exception as exc:  # noqa: BLE001 - a message that breaks delivery goes towards Poison
                log.exception("mailbox delivery failed")
                for i in ids:
                    if i not in recorded:
                        self.processing_error(i, exc)
            finally:
                self.release(q, ids, recorded)

    async def _smtp_worker(self, q: DeliveryQueue) -> None:
        self.outbound_connections += 1
        try:
            await self._deliver_smtp(self, q)
        finally:
            self.outbound_connections -= 1

    async def _categorise_submission(self, q: DeliveryQueue) -> None:
        """Route messages waiting in Submission (suspended intake, failures, re-routing after config changes)."""
        assert self.settings is not None
        rows = self.store.reader().execute(
            "SELECT id FROM message WHERE in_submission=1 AND poison=0 LIMIT 200").fetchall()
        for (message_id,) in rows:
            if message_id in self._accepting:
                continue
            try:
                self._categorise_one(message_id)
            except Exception as exc:  # noqa: BLE001
                log.exception("categorising message %s failed", message_id)
                self.processing_error(message_id, exc)
            await asyncio.sleep(0)

    def _categorise_one(self, message_id: int) -> None:
        loaded = self.load(message_id, SUBMISSION)
        if loaded is None:
            return
        msg, rcpts = loaded
        updates, extra, failures, targets = [], [], [], set()
        assert self.settings is not None
        routing = self.settings.routing
        originating = msg["directionality"] == "Originating"
        # MaxRecipientEnvelopeLimit counts all of the message's recipients; it applies to originating mail only.
        total = self.store.reader().execute("SELECT count(*) FROM recipient WHERE message=?",
                                            (message_id,)).fetchone()[0] if originating else 1
        for r in rcpts:
            route = routing.route(r["address"], msg["size"], originating=originating, system=bool(msg["is_dsn"]),
                                  recipients=total)
            if isinstance(route, Failure):
                failures.append((r, route.reply))
                continue
            # Unreachable says why, as Exchange's Get-Message does; a route found again clears that reason.
            last_error = NO_CONNECTOR if route.queue == UNREACHABLE else (
                None if r["last_error"] == NO_CONNECTOR else r["last_error"])
            extra.append(("UPDATE recipient SET queue=?, last_error=? WHERE message=? AND idx=?",
                          (route.queue, last_error, message_id, r["idx"])))
            targets.add(route.queue)
        extra.append(("UPDATE message SET in_submission=0 WHERE id=?", (message_id,)))
        outcomes = {r["idx"]: ("permanent", reply) for r, reply in failures}
        dsns, fail_updates = self._failure_effects(msg, [r for r, _ in failures], outcomes, source="ROUTING")
        updates += fail_updates
        fut = self._store_record(message_id, updates, dsns, extra)
        # Until this commits the message is still in Submission: a rescan must not categorise it again (its
        # failures would give a second NDR).
        self._accepting.add(message_id)

        def committed(f: concurrent.futures.Future[Any]) -> None:
            self._accepting.discard(message_id)
            self._after_record(f, dsns, targets, message_id)

        fut.add_done_callback(lambda f: self._soon(committed, f))

    def _store_record(self, message_id: int, updates: list[tuple[Any, ...]], dsns: list[NewMessage],
                      extra: list[tuple[str, tuple[Any, ...]]] | None = None) -> concurrent.futures.Future[Any]:
        """``QueueStore.record``; the DSNs it creates wait in ``_accepting`` until ``_after_record``."""
        fut = self.store.record(message_id, updates, dsns, extra)
        self._accepting.update(d.id for d in dsns)
        return fut

    def _after_record(self, fut: concurrent.futures.Future[Any], dsns: list[NewMessage], targets: set[str],
                      message_id: int, holder: DeliveryQueue | None = None) -> None:
        if holder is not None:
            holder.held.discard(message_id)
        for d in dsns:
            self._accepting.discard(d.id)
        if fut.exception() is not None:
            log.error("recording outcomes of message %s failed: %s", message_id, fut.exception())
            return
        for d in dsns:
            self._accepted(d, {"server_hostname": self.settings.server.fqdn if self.settings else ""}, "DSN")
        for key in targets:
            self.queue(key).offer(message_id)
        self.wake()

    # -- outcomes ---------------------------------------------------------------------------------
    def record(self, q: DeliveryQueue, msg: Any, rcpts: list[Any], outcomes: list[Any], *,
               body: StoredBody | None = None, remote: str | None = None, remote_ip: str | None = None,
               failure_source: str | None = None) -> concurrent.futures.Future[Any]:
        """Apply one delivery attempt's outcomes (``Outcome`` objects) for ``msg``."""
        assert self.settings is not None
        now = time.time()
        by_idx = {r["idx"]: r for r in rcpts}
        updates: list[tuple[Any, ...]] = []
        failed_rows, delivered_rows, relayed_rows, deferred = [], [], [], []
        results: dict[int, tuple[str, str]] = {}
        for o in outcomes:
            r = by_idx.get(o.idx)
            if r is None:
                continue
            kind = o.kind
            if kind == "transient" and now >= msg["expires_at"]:
                kind, o_reply = "permanent", f"550 4.4.7 QUEUE.Expired; message expired, last error: {o.reply}"
            else:
                o_reply = o.reply
            results[o.idx] = (kind, o_reply)
            if kind == "delivered":
                updates.append((o.idx, DELIVERED, o_reply, now, 0))
                delivered_rows.append(r)
                if getattr(o, "relayed", False):
                    relayed_rows.append(r)
            elif kind == "permanent":
                failed_rows.append(r)
            else:
                retry_at = now + self.settings.server.message_retry_interval.seconds
                updates.append((o.idx, RETRY, o_reply, retry_at, 1))
                deferred.append(r)
        common = dict(internal_message_id=msg["id"], message_id=msg["message_id"], network_message_id=msg["network_id"],
                      sender=_path(msg["sender"]), return_path=_path(msg["sender"]), message_subject=msg["subject"],
                      total_bytes=msg["size"], server_hostname=remote or self.settings.server.fqdn,
                      server_ip=remote_ip, directionality=msg["directionality"],
                      message_latency=round(now - msg["received_at"], 3))
        mailbox = q.delivery_type == "SmtpDeliveryToMailbox" and not q.key.startswith("lmtp:")
        if delivered_rows:
            event, source = ("DELIVER", "STOREDRIVER") if mailbox else ("SEND", "SMTP")
            self.tracker.event(event, source, recipients=[r["address"] for r in delivered_rows],
                               recipient_status=[results[r["idx"]][1] for r in delivered_rows],
                               recipient_count=len(delivered_rows), connector_id=q.tracked_connector,
                               source_context=f"{q.delivery_type};{q.next_hop}", **common)
            q.outgoing.add()
            self.delivered_total += len(delivered_rows)
            if self.on_event:
                self.on_event("delivered", {"queue": q, "count": len(delivered_rows),
                                            "latency": now - msg["received_at"]})
        if deferred:
            self.tracker.event("DEFER", "SMTP" if not mailbox else "STOREDRIVER",
                               recipients=[r["address"] for r in deferred],
                               recipient_status=[results[r["idx"]][1] for r in deferred], recipient_count=len(deferred),
                               connector_id=q.tracked_connector, **common)
        dsns: list[NewMessage] = []
        if failed_rows:
            fail_dsns, fail_updates = self._failure_effects(msg, failed_rows, results,
                                                            source=failure_source or ("STOREDRIVER" if mailbox else "SMTP"),
                                                            body=body, remote=remote, connector=q.connector)
            dsns += fail_dsns
            updates += fail_updates
        success = [r for r in delivered_rows if DSN.wants(r["notify"], "SUCCESS")]
        if success and msg["sender"]:
            action = "relayed" if any(r in relayed_rows for r in success) else "delivered"
            dsns.append(self._make_dsn(msg, body, action, [
                DSN.DsnRecipient(r["address"], r["orcpt"], "2.0.0", results[r["idx"]][1], remote) for r in success]))
            self._track_dsn(msg, [r["address"] for r in success], dsns[-1], f"{action} notification")
        fut = self._store_record(msg["id"], updates, dsns)
        # The message stays held by this queue until its new state is committed, so a refill can't pick it again.
        q.held.add(msg["id"])
        fut.add_done_callback(lambda f: self._soon(self._after_record, f, dsns, set(), msg["id"], q))
        return fut

    def _failure_effects(self, msg: Any, failed: list[Any], results: dict[int, tuple[str, str]], *, source: str,
                         body: StoredBody | None = None, remote: str | None = None,
                         connector: str | None = None) -> tuple[list[NewMessage], list[tuple[Any, ...]]]:
        """Updates for failed recipients, FAIL events, and the NDR (one per attempt, never to <>)."""
        now = time.time()
        updates = [(r["idx"], FAILED, results[r["idx"]][1], now, 0) for r in failed]
        if not failed:
            return [], updates
        self.failed_total += len(failed)
        expired = any("QUEUE.Expired" in results[r["idx"]][1] for r in failed)
        self.tracker.event("FAIL", "QUEUE" if expired else source, recipients=[r["address"] for r in failed],
                           recipient_status=[results[r["idx"]][1] for r in failed], recipient_count=len(failed),
                           internal_message_id=msg["id"], message_id=msg["message_id"],
                           network_message_id=msg["network_id"], sender=_path(msg["sender"]), return_path=_path(msg["sender"]),
                           message_subject=msg["subject"], total_bytes=msg["size"], connector_id=connector,
                           server_hostname=remote or (self.settings.server.fqdn if self.settings else None))
        if self.on_event:
            self.on_event("failed", {"count": len(failed)})
        notify = [r for r in failed if DSN.wants(r["notify"], "FAILURE")]
        if not notify or not msg["sender"]:
            return [], updates
        recipients = [DSN.DsnRecipient(r["address"], r["orcpt"], DSN.status_of(results[r["idx"]][1], "5.0.0"),
                                       results[r["idx"]][1], remote) for r in notify]
        ndr = self._make_dsn(msg, body, "failed", recipients, copy_to=self._ndr_copy_to(recipients))
        self._track_dsn(msg, [r["address"] for r in notify], ndr)
        return [ndr], updates

    def _track_dsn(self, msg: Any, recipients: list[str], dsn: NewMessage, context: str | None = None) -> None:
        """The DSN event of the message a notification reports on (an NDR, a delay, a delivered or relayed
        notice): its recipients, and the notification's Message-ID as Reference, as Exchange logs it."""
        self.tracker.event("DSN", "DSN", recipients=recipients, recipient_count=len(recipients),
                           internal_message_id=msg["id"], message_id=msg["message_id"],
                           network_message_id=msg["network_id"], sender=_path(msg["sender"]),
                           reference=dsn.message_id, message_subject=msg["subject"], return_path=msg["sender"],
                           source_context=context)

    def _ndr_copy_to(self, recipients: list[DSN.DsnRecipient]) -> str | None:
        """The Microsoft Exchange recipient's reply recipient when an NDR has a code in GenerateCopyOfDSNFor."""
        assert self.settings is not None
        monitored = set(self.settings.org.generate_copy_of_dsn_for)
        if self.settings.ndr_copies_to and any(r.status in monitored for r in recipients):
            return self.settings.ndr_copies_to
        return None

    def _make_dsn(self, msg: Any, body: StoredBody | None, action: str, recipients: list[DSN.DsnRecipient],
                  copy_to: str | None = None) -> NewMessage:
        """A DSN to the sender of ``msg``; ``copy_to`` gets the same report as one more envelope recipient."""
        assert self.settings is not None
        original = body if body is not None else self.store.body(msg)
        routing = self.settings.routing
        org = self.settings.org
        postmaster = org.external_postmaster_address or f"postmaster@{routing.default_domain or self.settings.server.fqdn}"
        # An internal DSN goes to a sender of the organisation's own (authoritative) domains.
        internal = bool(msg["sender"]) and routing.is_authoritative(msg["sender"].rpartition("@")[2])
        limit = (org.internal_dsn_max_message_attach_size if internal else org.external_dsn_max_message_attach_size).bytes
        attach_full = action == "failed" and (msg["ret"] or "FULL").upper() == "FULL" and \
            (limit is None or original.size <= limit)
        content = DSN.build(action=action, reporting_mta=self.settings.server.fqdn, postmaster=postmaster,
                            to=msg["sender"], original_head=original.head(),
                            original=original.read() if attach_full else None, subject=msg["subject"],
                            recipients=recipients, arrival=msg["received_at"], envid=msg["envid"])
        ref = self.store.append_body([content])
        now = time.time()
        prefix = {"failed": "Undeliverable", "delayed": "Delivery delayed", "delivered": "Delivered",
                  "relayed": "Relayed"}[action]
        addressees = [msg["sender"]] + ([copy_to] if copy_to and copy_to.lower() != msg["sender"].lower() else [])
        target = self.categorise([(a, None, "NEVER") for a in addressees], len(content), system=True)
        message_id = content.split(b"Message-ID: ", 1)[1].split(b"\r\n", 1)[0].decode()
        return NewMessage(network_id=str(uuid.uuid4()), message_id=message_id, sender="",
                          subject=f"{prefix}: {msg['subject'] or ''}", size=len(content), received_at=now,
                          expires_at=now + self.settings.server.message_expiration_timeout.seconds,
                          recipients=target, body=ref, source="DSN",
                          directionality="Originating", is_dsn=True,
                          in_submission=any(r.queue == SUBMISSION for r in target))

    def connection_failed(self, q: DeliveryQueue, error: str, host: str = "", ip: str = "") -> None:
        """No host of the next hop could be reached: the queue goes to Retry on Exchange's schedule."""
        assert self.settings is not None
        server = self.settings.server
        now = time.time()
        q.retry_count += 1
        q.first_retry = q.first_retry or now
        q.last_retry = now
        q.last_error, q.last_error_time, q.last_error_host, q.last_error_ip = error, now, host, ip
        interval = server.transient_failure_retry_interval.seconds if q.retry_count <= \
            server.transient_failure_retry_count else server.outbound_connection_failure_retry_interval.seconds
        q.next_retry = now + interval
        held = list(q.ready)
        q.ready.clear()
        for i in held:
            q.held.discard(i)
        self.store.execute("UPDATE recipient SET status='Retry', last_error=?, next_attempt=?, retry_count=retry_count+1"
                           " WHERE queue=? AND status IN ('Ready','Retry') AND next_attempt<=?",
                           (error, q.next_retry, q.key, now))
        self.tracker.event("DEFER", "SMTP", connector_id=q.tracked_connector,
                           source_context=f"{q.delivery_type};{q.next_hop}", recipient_status=[error],
                           server_hostname=host or None, server_ip=ip or None)

    def connection_succeeded(self, q: DeliveryQueue) -> None:
        q.retry_count = 0
        q.first_retry = q.last_retry = q.next_retry = None
        q.last_error = None

    def processing_error(self, message_id: int, exc: BaseException) -> None:
        """A message whose processing raised: count it; at PoisonThreshold it goes to the Poison queue."""
        threshold = self.settings.server.poison_threshold if self.settings else 2
        enabled = self.settings.server.poison_message_detection_enabled if self.settings else True
        db = self.store.reader()
        row = db.execute("SELECT error_count, message_id, network_id, sender, subject FROM message WHERE id=?",
                         (message_id,)).fetchone()
        if row is None:
            return
        count = row["error_count"] + 1
        poison = enabled and count >= threshold
        self.store.execute("UPDATE message SET error_count=?, poison=? WHERE id=?", (count, int(poison), message_id))
        if poison:
            self.queue(POISON)
            self.tracker.event("POISONMESSAGE", "POISONMESSAGE", internal_message_id=message_id,
                               message_id=row["message_id"], network_message_id=row["network_id"], sender=row["sender"] or "<>",
                               message_subject=row["subject"],
                               source_context=f"processing failed {count} times: {type(exc).__name__}: {exc}")

    # -- expiry and delay notifications --------------------------------------------------------------
    async def _expire_and_delay(self) -> None:
        assert self.settings is not None
        server, org = self.settings.server, self.settings.org
        now = time.time()
        db = self.store.reader()
        expired = db.execute(EXPIRY_SCAN, (now,)).fetchall()
        for msg in expired:
            rcpts = db.execute("SELECT * FROM recipient WHERE message=? AND status IN ('Ready','Retry')",
                               (msg["id"],)).fetchall()
            if not rcpts:
                continue
            in_flight = any(msg["id"] in q.held for q in self.queues.values())
            if in_flight:
                continue
            results = {r["idx"]: ("permanent", "550 4.4.7 QUEUE.Expired; message expired"
                                               + (f", last error: {r['last_error']}" if r["last_error"] else ""))
                       for r in rcpts}
            dsns, updates = self._failure_effects(msg, rcpts, results, source="QUEUE")
            fut = self._store_record(msg["id"], updates, dsns)
            fut.add_done_callback(lambda f, d=dsns, m=msg["id"]: self._soon(self._after_record, f, d, set(), m))
            await asyncio.sleep(0)
        if not (org.external_delay_dsn_enabled or org.internal_delay_dsn_enabled):
            return
        cutoff = now - server.delay_notification_timeout.seconds
        delayed = db.execute(DELAY_SCAN, (cutoff,)).fetchall()
        for msg in delayed:
            rcpts = db.execute("SELECT * FROM recipient WHERE message=? AND status IN ('Ready','Retry')",
                               (msg["id"],)).fetchall()
            wanted = [r for r in rcpts if DSN.wants(r["notify"], "DELAY")]
            extra = [("UPDATE message SET delay_notified=1 WHERE id=?", (msg["id"],))]
            dsns = []
            if wanted:
                dsns.append(self._make_dsn(msg, None, "delayed", [
                    DSN.DsnRecipient(r["address"], r["orcpt"], "4.4.7",
                                     r["last_error"] or "400 4.4.7 Message delayed") for r in wanted]))
                self._track_dsn(msg, [r["address"] for r in wanted], dsns[0], "delay notification")
            fut = self._store_record(msg["id"], [], dsns, extra)
            fut.add_done_callback(lambda f, d=dsns, m=msg["id"]: self._soon(self._after_record, f, d, set(), m))
            await asyncio.sleep(0)
