"""Queue and message administration on the running server: what Get-Queue,
Get-Message and the queue actions see and do. Identities are Exchange's:
``EX01\\contoso.com`` or ``EX01\\12`` for queues, ``EX01\\contoso.com\\17``
(any part but the number optional) for messages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import time
from typing import Any

from mailgate.config.values import ByteSize
from mailgate.errors import NotFoundError, UserError
from mailgate.manage.present import Record
from mailgate.manage.psvalues import to_text
from mailgate.queue.manager import DeliveryQueue, QueueManager
from mailgate.routing.table import POISON, SUBMISSION, UNREACHABLE
from mailgate.send.smtp import Outcome

ACTION_BATCH = 500   # messages a message action handles before it gives the event loop back

ZEROS = "00000000-0000-0000-0000-000000000000"
MAX_MESSAGE_ID = 2**63 - 1   # the largest SQLite INTEGER: no message number is larger


def _dt(ts: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc) if ts else None


class QueueAdmin:
    def __init__(self, manager: QueueManager, server: str) -> None:
        self.manager = manager
        self.server = server

    # -- queues --------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        db = self.manager.store.reader()
        counts = {q: n for q, n in db.execute(
            "SELECT r.queue, count(DISTINCT r.message) FROM recipient r JOIN message m ON m.id=r.message"
            " WHERE r.status IN ('Ready','Retry') AND m.poison=0 GROUP BY r.queue")}
        counts[POISON] = db.execute("SELECT count(*) FROM message WHERE poison=1").fetchone()[0]
        return counts

    def _name(self, q: DeliveryQueue) -> str:
        return {SUBMISSION: "Submission", UNREACHABLE: "Unreachable", POISON: "Poison"}.get(q.key, q.next_hop)

    def _connector_guid(self, q: DeliveryQueue) -> str:
        """NextHopConnector as Exchange shows it: the send connector's GUID (the queue knows its connector by
        name; a connector removed since is shown by that name), zeros for the queues of no connector."""
        if not q.connector:
            return ZEROS
        routing = self.manager.settings.routing if self.manager.settings else None
        connector = routing.connector(q.connector) if routing else None
        return str(connector.guid) if connector is not None else q.connector

    def identity(self, q: DeliveryQueue) -> str:
        return f"{self.server}\\{self._name(q)}"

    def queue_record(self, q: DeliveryQueue, count: int) -> Record:
        last_error = None
        if q.last_error:
            lrt = _dt(q.last_error_time)
            when = to_text(lrt.astimezone()) if lrt else ""
            last_error = f"[{{LRT={when}}};{{LED={q.last_error}}};{{FQDN={q.last_error_host}}};{{IP={q.last_error_ip}}}]"
        status = q.status
        if q.key == POISON:
            status = "Suspended" if count else "Ready"
        velocity = round(q.outgoing.rate() - q.incoming.rate(), 2)
        next_hop_domain = {SUBMISSION: "Submission", UNREACHABLE: "Unreachable Domain", POISON: "Poison Message"}.get(
            q.key, q.next_hop)
        return Record("Queue", {
            "DeliveryType": q.delivery_type, "NextHopDomain": next_hop_domain, "TlsDomain": q.tls_domain,
            "NextHopConnector": self._connector_guid(q), "Status": status, "MessageCount": count,
            "LastError": last_error, "RetryCount": q.retry_count, "LastRetryTime": _dt(q.last_retry),
            "NextRetryTime": _dt(q.next_retry), "FirstRetryTime": _dt(q.first_retry), "DeferredMessageCount": 0,
            "LockedMessageCount": 0, "MessageCountsPerPriority": [0, count, 0, 0],
            "DeferredMessageCountsPerPriority": [0, 0, 0, 0], "RiskLevel": "Normal", "OutboundIPPool": 0,
            "NextHopCategory": q.category, "IncomingRate": q.incoming.rate(), "OutgoingRate": q.outgoing.rate(),
            "Velocity": velocity, "OverrideSource": "", "QueueIdentity": f"{self.server}\\{q.number}",
            "PriorityDescriptions": ["High", "Normal", "Low", "None"], "Identity": self.identity(q),
            "IsValid": True, "ObjectState": "New",
        })

    async def queues(self, empty_poison: bool = False) -> list[Record]:
        """Every queue; Poison only when it holds mail (as in Exchange) or ``empty_poison`` (it was named).
        Counting reads every queued recipient: it runs in a thread (its own read connection, SQLite lets go of
        the interpreter while it reads), so that the event loop goes on serving SMTP meanwhile."""
        counts = await asyncio.to_thread(self._counts)
        out = []
        keys = [key for key in self.manager.queues if key != POISON]
        for key in counts:
            if key not in keys and key != POISON:
                keys.append(key)
        if counts.get(POISON) or empty_poison:
            keys.append(POISON)
        for key in keys:
            q = self.manager.queue(key)
            out.append(self.queue_record(q, counts.get(key, 0)))
        out.sort(key=lambda r: r["QueueIdentity"])
        return out

    def resolve_queues(self, identities: list[str]) -> list[DeliveryQueue]:
        found = []
        for ident in identities:
            text = ident.strip()
            server, _, name = text.rpartition("\\")
            if server and server.lower() not in (self.server.lower(), "*"):
                raise NotFoundError(f"The queue '{ident}' is on server {server}; this server is {self.server}.")
            matches = [q for q in list(self.manager.queues.values()) + [self.manager.queue(POISON)]
                       if name.lower() in (self._name(q).lower(), str(q.number)) or name == "*"]
            if not matches:
                raise NotFoundError(f"The queue '{ident}' couldn't be found on server {self.server}.", target=ident)
            found += [q for q in matches if q not in found]
        return found

    def queue_action(self, action: str, identities: list[str], resubmit: bool = False,
                     keys: list[str] | None = None) -> int:
        """Suspend, resume or retry queues named by identity, or by queue key (from the supervisor, so that
        a queue suspended in one worker is suspended in all, even where it holds nothing yet)."""
        queues = [self.manager.queue(key) for key in keys] if keys is not None else self.resolve_queues(identities)
        store = self.manager.store
        for q in queues:
            if action == "suspend":
                if q.key == POISON:
                    raise UserError("The Poison queue can't be suspended.")
                q.suspended = True
                store.execute("UPDATE queue_state SET suspended=1 WHERE queue=?", (q.key,)).result(timeout=30)
            elif action == "resume":
                q.suspended = False
                store.execute("UPDATE queue_state SET suspended=0 WHERE queue=?", (q.key,)).result(timeout=30)
            elif action == "retry":
                if q.key == UNREACHABLE and not resubmit:
                    raise UserError("The Unreachable queue can only be retried with -Resubmit $true.", parameter="Resubmit")
                if resubmit:
                    store.execute("UPDATE message SET in_submission=1 WHERE id IN (SELECT message FROM recipient WHERE"
                                  " queue=? AND status IN ('Ready','Retry'))", (q.key,)).result(timeout=30)
                    store.execute("UPDATE recipient SET queue='Submission', next_attempt=0 WHERE queue=? AND status IN"
                                  " ('Ready','Retry')", (q.key,)).result(timeout=30)
                    for message_id in q.ready:
                        self.manager.forget(message_id)
                    q.ready.clear()
                    q.held.clear()
                else:
                    store.execute("UPDATE recipient SET next_attempt=? WHERE queue=? AND status IN ('Ready','Retry')",
                                  (time.time(), q.key)).result(timeout=30)
                q.next_retry = None
        self.manager.refill_soon()
        return len(queues)

    # -- messages ------------------------------------------------------------------------------
    async def messages(self, queue: str | None = None, include_recipients: bool = False, limit: int | None = None,
                       message_id: int | None = None, after: int | None = None) -> list[Record]:
        """The messages of ``queue`` (or every queue), a record per message and queue, in the order of their ids:
        those of the first ``limit`` messages (None: all) whose id is above ``after`` (a page of a long listing;
        a message's records are never split between pages); only the message ``message_id`` when it is given.
        The rows are read in a thread, as in ``queues``: finding one queue's first messages sorts all of them."""
        if message_id is not None and not 0 < message_id <= MAX_MESSAGE_ID:
            return []   # no message has that number (and SQLite can't even compare with it)
        keys = None if queue is None else [q.key for q in self.resolve_queues([queue])]
        rows = await asyncio.to_thread(self._message_rows, keys, limit, message_id, after)
        return [self._message_record(m, self.manager.queue(key), rcpts, include_recipients) for m, key, rcpts in rows]

    def _message_rows(self, keys: list[str] | None, limit: int | None, message_id: int | None,
                      after: int | None) -> list[tuple[Any, str, list[Any]]]:
        """``messages``' reading: (message row, queue key, its recipients there), in order."""
        conditions, params = "", []
        if message_id is not None:
            conditions, params = " AND m.id=?", [int(message_id)]
        if after is not None:
            conditions, params = conditions + " AND m.id>?", params + [min(int(after), MAX_MESSAGE_ID)]
        sql_limit = -1 if limit is None else limit   # SQLite's -1: no limit
        db = self.manager.store.reader()
        groups: dict[tuple[int, str], list[Any]] = {}   # (message, queue key) → its recipients; POISON: the message
        poison: dict[int, Any] = {}
        if keys is None or POISON in keys:
            for m in db.execute(f"SELECT * FROM message m WHERE poison=1{conditions} ORDER BY id LIMIT ?",
                                (*params, sql_limit)):
                poison[m["id"]] = m
                groups[(m["id"], POISON)] = db.execute("SELECT * FROM recipient WHERE message=?", (m["id"],)).fetchall()
        wanted = [k for k in (keys or []) if k != POISON]
        if keys is None or wanted:
            sql = ("SELECT r.* FROM recipient r JOIN message m ON m.id=r.message WHERE m.poison=0 AND"
                   f" r.status IN ('Ready','Retry'){conditions}")
            query_params = list(params)
            if keys is not None:
                sql += f" AND r.queue IN ({','.join('?' * len(wanted))})"
                query_params += wanted
            seen: set[int] = set()
            for r in db.execute(sql + " ORDER BY r.message, r.queue, r.idx", query_params):
                if r["message"] not in seen:
                    if limit is not None and len(seen) >= limit:
                        break
                    seen.add(r["message"])
                groups.setdefault((r["message"], r["queue"]), []).append(r)
        chosen = sorted({message for message, _ in groups})
        if limit is not None:
            chosen = chosen[:limit]
        out: list[tuple[Any, str, list[Any]]] = []
        for (message, key), rcpts in sorted(groups.items()):
            if message > chosen[-1]:
                break
            m = poison.get(message) or db.execute("SELECT * FROM message WHERE id=?", (message,)).fetchone()
            if m is not None:
                out.append((m, key, rcpts))
        return out

    def _message_record(self, m: Any, q: DeliveryQueue, rcpts: list[Any], include: bool) -> Record:
        statuses = {r["status"] for r in rcpts}
        if q.key == POISON:
            status = "Suspended"
        elif rcpts and all(r["suspended"] for r in rcpts):
            status = "Suspended"
        elif m["id"] in q.held and q.active:
            status = "Active"
        elif "Retry" in statuses:
            status = "Retry"
        else:
            status = "Ready"
        errors = [r["last_error"] for r in rcpts if r["last_error"]]
        recipients = [self._recipient_record(q, r) for r in rcpts] if include else []
        return Record("Message", {
            "Identity": f"{self.server}\\{self._name(q)}\\{m['id']}", "Subject": m["subject"],
            "InternetMessageId": m["message_id"], "FromAddress": m["sender"] or "<>", "Status": status,
            "Size": ByteSize(m["size"]), "MessageSourceName": m["source"] or "SMTP", "SourceIP": m["source_ip"],
            "SCL": -1, "DateReceived": _dt(m["received_at"]), "ExpirationTime": _dt(m["expires_at"]),
            "LastError": errors[-1] if errors else None, "RetryCount": max([r["retry_count"] for r in rcpts] or [0]),
            "Recipients": recipients, "ComponentLatency": [], "MessageLatency": round(time.time() - m["received_at"], 2),
            "DeferReason": "None", "Directionality": m["directionality"], "OriginalFromAddress": m["sender"] or "<>",
            "Priority": m["priority"], "Queue": f"{self.server}\\{self._name(q)}", "IsValid": True,
            "ObjectState": "New", "RecipientCount": len(rcpts),
        })

    @staticmethod
    def _recipient_record(q: DeliveryQueue, r: Any) -> Record:
        """One recipient of a queued message, as Get-Message -IncludeRecipientInfo lists it (RecipientInfo)."""
        mailbox = q.delivery_type == "SmtpDeliveryToMailbox"
        return Record("RecipientInfo", {
            "Address": r["address"], "Type": "Mailbox" if mailbox else "External",
            "FinalDestination": "<No Matching Connector>" if q.key == UNREACHABLE else q.next_hop,
            "Status": r["status"], "LastError": r["last_error"], "RetryCount": r["retry_count"], "OutboundIPPool": 0,
        }, text=f"{r['address']};{r['status']};{r['retry_count']};{r['last_error'] or ''}")

    def resolve_messages(self, identities: list[str]) -> list[tuple[DeliveryQueue, int]]:
        out = []
        for ident in identities:
            parts = ident.strip().split("\\")
            number = parts[-1].strip()
            if not (number.isascii() and number.isdigit()):
                raise NotFoundError(f"'{ident}' is not a message identity; use Server\\Queue\\Number, e.g. "
                                    f"{self.server}\\Submission\\12.", target=ident)
            message_id = int(number)
            queue_part = parts[-2] if len(parts) >= 2 else "*"
            if len(parts) == 3 and parts[0].lower() not in (self.server.lower(), "*"):
                raise NotFoundError(f"The message '{ident}' is on server {parts[0]}; this server is {self.server}.")
            holding = self._queues_holding(message_id)
            matches = [q for q in holding if queue_part == "*" or self._name(q).lower() == queue_part.lower()]
            if not matches:
                raise NotFoundError(f"The message '{ident}' couldn't be found in the queues of {self.server}.",
                                    target=ident)
            out += [(q, message_id) for q in matches]
        return out

    def _queues_holding(self, message_id: int) -> list[DeliveryQueue]:
        """The queues that hold recipients of the message waiting (Poison: the message itself). By queue, not by
        its name: two send connectors to one smart host have two queues of the same name."""
        if not 0 < message_id <= MAX_MESSAGE_ID:
            return []
        db = self.manager.store.reader()
        poison = db.execute("SELECT poison FROM message WHERE id=?", (message_id,)).fetchone()
        if poison is None:
            return []
        if poison[0]:
            return [self.manager.queue(POISON)]
        keys = [r[0] for r in db.execute("SELECT DISTINCT queue FROM recipient WHERE message=? AND status IN "
                                         "('Ready','Retry') ORDER BY queue", (message_id,))]
        return [self.manager.queue(key) for key in keys]

    async def message_action(self, action: str, identities: list[str], with_ndr: bool = True) -> int:
        """Suspend, resume or remove the messages named. Of several (-Filter's matches), those this worker holds:
        the others are in another worker, or were delivered since they were listed. None held is NotFound.

        It runs on the event loop that serves SMTP, so it gives the loop back every ACTION_BATCH messages and
        waits for the store's commits without blocking it: acting on 50,000 messages one commit at a time held
        new connections off for 29 seconds."""
        targets: list[tuple[DeliveryQueue, int]] = []
        missing: NotFoundError | None = None
        for number, identity in enumerate(identities, 1):
            try:
                targets += self.resolve_messages([identity])
            except NotFoundError as exc:
                missing = missing or exc
            if number % ACTION_BATCH == 0:
                await asyncio.sleep(0)
        if not targets and missing is not None:
            raise missing
        manager = self.manager
        pending: list[concurrent.futures.Future[Any]] = []
        for number, (q, message_id) in enumerate(targets, 1):
            manager.forget(message_id)
            if action == "suspend" and q.key == POISON:
                raise UserError("Messages in the Poison queue are already suspended.")
            pending += self._act(action, q, message_id, with_ndr)
            if number % ACTION_BATCH == 0:
                await self._committed(pending)
                pending = []
        await self._committed(pending)
        manager.refill_soon()
        return len(targets)

    async def _committed(self, writes: list[concurrent.futures.Future[Any]]) -> None:
        self.manager.store.commit_now()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in writes))

    def _act(self, action: str, q: DeliveryQueue, message_id: int,
             with_ndr: bool) -> list[concurrent.futures.Future[Any]]:
        """One message's suspend, resume or removal: the store's writes it started (committed together with the
        others of its batch)."""
        manager, store = self.manager, self.manager.store
        # "+queue": looked up by the message (the primary key). Without statistics SQLite's planner took the
        # recipient_due index on queue for these UPDATEs and walked the whole queue for every message (1 ms each
        # in a queue of 25,000).
        if action == "suspend":
            if message_id in q.ready:
                q.ready.remove(message_id)
                q.held.discard(message_id)
            return [store.execute("UPDATE recipient SET suspended=1 WHERE message=? AND +queue=?", (message_id, q.key))]
        if action == "resume":
            if q.key == POISON:
                manager.tracker.event("POISONMESSAGE", "ADMIN", internal_message_id=message_id,
                                      source_context="released from the Poison queue by Resume-Message")
                return [store.execute("UPDATE message SET poison=0, error_count=0 WHERE id=?", (message_id,))]
            return [store.execute("UPDATE recipient SET suspended=0, next_attempt=? WHERE message=? AND +queue=?",
                                  (time.time(), message_id, q.key))]
        # remove
        loaded = store.reader().execute("SELECT * FROM message WHERE id=?", (message_id,)).fetchone()
        if loaded is None:
            return []
        rcpts = store.reader().execute(
            "SELECT * FROM recipient WHERE message=? AND status IN ('Ready','Retry')" +
            ("" if q.key == POISON else " AND queue=?"),
            (message_id,) if q.key == POISON else (message_id, q.key)).fetchall()
        if message_id in q.ready:
            q.ready.remove(message_id)
        q.held.discard(message_id)
        if with_ndr:
            reply = "550 4.3.2 QUEUE.Admin; message deleted by administrative action"
            return [manager.record(q, loaded, rcpts, [Outcome(r["idx"], "permanent", reply) for r in rcpts])]
        manager.tracker.event("DROP", "ADMIN", internal_message_id=message_id,
                              recipients=[r["address"] for r in rcpts], sender=loaded["sender"] or "<>",
                              message_id=loaded["message_id"], network_message_id=loaded["network_id"],
                              message_subject=loaded["subject"], source_context="Remove-Message -WithNDR $false")
        return [store.record(message_id, [(r["idx"], "Failed", "removed by administrative action", time.time(), 0)
                                          for r in rcpts])]

    def export(self, identity: str) -> tuple[str, bytes]:
        targets = self.resolve_messages([identity])
        q, message_id = targets[0]
        row = self.manager.store.reader().execute("SELECT * FROM message WHERE id=?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"The message '{identity}' no longer exists.", target=identity)
        suspended = q.key == POISON or self.manager.store.reader().execute(
            "SELECT min(suspended) FROM recipient WHERE message=? AND queue=?", (message_id, q.key)).fetchone()[0]
        if not suspended:
            raise UserError(f"The message '{identity}' must be suspended before it can be exported "
                            f"(Suspend-Message -Identity \"{identity}\").")
        # The envelope goes first, as X-Sender:/X-Receiver: lines: the file can be dropped into a Replay
        # directory (receive/pickup.py), here or on another server, and is delivered to the same recipients.
        pending = self.manager.store.reader().execute(
            "SELECT address FROM recipient WHERE message=? AND status IN ('Ready','Retry')"
            + ("" if q.key == POISON else " AND queue=?") + " ORDER BY idx",
            (message_id,) if q.key == POISON else (message_id, q.key)).fetchall()
        envelope = f"X-Sender: <{row['sender']}>\r\n" + "".join(f"X-Receiver: <{r['address']}>\r\n" for r in pending)
        return (f"{self.server}\\{self._name(q)}\\{message_id}",
                envelope.encode() + self.manager.store.read_body(row))
