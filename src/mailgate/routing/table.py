"""The categoriser's rules, compiled from one configuration snapshot:
recipient resolution against accepted domains and mailboxes, and the choice of
send connector (reference §2.3, §3).

A recipient resolves to one of:
- a mailbox (authoritative or internal-relay domain with a matching address),
- an unknown address in an authoritative domain (refused at RCPT, NDR later),
- a relay domain (InternalRelay without mailbox, ExternalRelay) or an external
  domain: routed through the best send connector, or Unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailgate.config.model import EXCHANGE_RECIPIENT_LOCAL_PART, AcceptedDomain, Mailbox, SendConnector, TransportConfig
from mailgate.config.values import AuthMechanism, DomainType, PermissionGroups
from mailgate.smtp.address import address_key, domain_key

# Queue keys. Delivery queues are created per next hop, as Exchange does.
SUBMISSION = "Submission"
UNREACHABLE = "Unreachable"
POISON = "Poison"
# Exchange's implicit send connector between the servers of an organisation (its protocol log and tracking name).
INTRA_ORG_CONNECTOR = "Intra-Organization SMTP Send Connector"

NO_CONNECTOR = "A matching connector cannot be found to route the external recipient"
RECIPIENT_NOT_FOUND = "550 5.1.1 RESOLVER.ADR.ExRecipNotFound; not found"
RECIPIENT_SIZE_LIMIT = "550 5.2.3 RESOLVER.RST.RecipSizeLimit; message too large for this recipient"
SENDER_SIZE_LIMIT = "550 5.2.3 RESOLVER.RST.SendSizeLimit.Org; message too large for this organization"
TOO_MANY_RECIPIENTS = "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients"


@dataclass(frozen=True, slots=True)
class Route:
    queue: str                 # key of the delivery queue
    delivery_type: str         # Exchange's DeliveryType
    next_hop: str              # NextHopDomain as Get-Queue shows it
    connector: str | None      # send connector name (None for mailbox delivery)
    category: str              # Internal / External


@dataclass(frozen=True, slots=True)
class Resolution:
    kind: str                  # mailbox | unknown | relay | external
    address: str               # the address as given (lower-cased domain)
    mailbox: Mailbox | None = None
    domain: AcceptedDomain | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A recipient that can never be delivered: NDR with this status."""

    status: str                # "5.1.1"
    reply: str                 # "550 5.1.1 ..."


def mailbox_database(server: str) -> str:
    return f"Mailbox Database {server}"


class RoutingTable:
    def __init__(self, snapshot: dict[str, list[Any]], server: str) -> None:
        self.server = server
        self.domains: list[AcceptedDomain] = list(snapshot.get("AcceptedDomain", []))
        self.domains.sort(key=lambda d: -len(d.domain_name))  # most specific first
        self._domain_keys = [(domain_key(d.domain_name), d) for d in self.domains]
        self.mailboxes: dict[str, Mailbox] = {}
        for box in snapshot.get("Mailbox", []):
            for address in box.addresses():
                self.mailboxes[address_key(address)] = box
        self.connectors: list[SendConnector] = [c for c in snapshot.get("SendConnector", []) if c.enabled]
        org = next(iter(snapshot.get("TransportConfig", [])), None) or TransportConfig()
        self.org_max_receive, self.org_max_send = org.max_receive_size, org.max_send_size
        self.org_max_recipients = org.max_recipient_envelope_limit.value   # None: unlimited
        default = next((d for d in self.domains if d.default), None)
        self.default_domain = default.domain_name.removeprefix("*.") if default else ""
        # The Microsoft Exchange recipient: its mail (and copies of NDRs) go to the reply recipient, if any.
        organization = next(iter(snapshot.get("OrganizationConfig", [])), None)
        reply_name = (organization.microsoft_exchange_recipient_reply_recipient or "").lower() if organization else ""
        self.exchange_recipient_reply: Mailbox | None = next(
            (m for m in snapshot.get("Mailbox", []) if reply_name and m.name.lower() == reply_name), None)
        if self.exchange_recipient_reply is not None and self.default_domain:
            self.mailboxes[address_key(f"{EXCHANGE_RECIPIENT_LOCAL_PART}@{self.default_domain}")] = \
                self.exchange_recipient_reply
        self._route_cache: dict[str, Route | Failure] = {}
        self._domain_cache: dict[str, AcceptedDomain | None] = {}
        limits = [c.max_message_size.bytes for c in self.connectors if c.max_message_size.bytes is not None]
        self._smallest_limit = min(limits) if limits else 1 << 62

    # -- resolution ------------------------------------------------------------
    def accepted_domain(self, domain: str) -> AcceptedDomain | None:
        domain = domain.lower()
        try:
            return self._domain_cache[domain]
        except KeyError:
            pass
        key = domain_key(domain)
        found = next((d for own, d in self._domain_keys if not own.startswith("*.") and d.matches_key(key, own)), None) \
            or next((d for own, d in self._domain_keys if d.matches_key(key, own)), None)
        if len(self._domain_cache) >= 10_000:   # clients choose the domains: the cache must not grow without end
            self._domain_cache.clear()
        self._domain_cache[domain] = found
        return found

    def resolve(self, address: str) -> Resolution:
        local, _, domain = address.rpartition("@")
        address = f"{local}@{domain.lower()}"
        accepted = self.accepted_domain(domain)
        # An internationalised domain arrives in A-labels from a sender without SMTPUTF8 and in U-labels from
        # one with it, whichever form the mailbox's address was given in: the key is the same.
        box = self.mailboxes.get(address_key(address))
        if accepted is None:
            return Resolution("external", address)
        if box is not None and accepted.domain_type is not DomainType.ExternalRelay:
            return Resolution("mailbox", address, box, accepted)
        if accepted.domain_type is DomainType.Authoritative:
            return Resolution("unknown", address, None, accepted)
        return Resolution("relay", address, None, accepted)

    def is_authoritative(self, domain: str) -> bool:
        accepted = self.accepted_domain(domain)
        return accepted is not None and accepted.domain_type is DomainType.Authoritative

    # -- routing --------------------------------------------------------------------
    def route(self, address: str, size: int = 0, *, originating: bool = False, system: bool = False,
              recipients: int = 1) -> Route | Failure:
        """Where a recipient's copy goes. The organisation's MaxReceiveSize applies to every mailbox, its
        MaxSendSize and MaxRecipientEnvelopeLimit to ``originating`` mail (an authenticated sender of the
        organisation) of ``recipients`` recipients; none to a ``system`` message (a DSN this organisation made,
        whose size follows the message it reports on)."""
        if originating and not system:
            if not self.org_max_send.allows(size):
                return Failure("5.2.3", SENDER_SIZE_LIMIT)
            if self.org_max_recipients is not None and recipients > self.org_max_recipients:
                return Failure("5.5.3", TOO_MANY_RECIPIENTS)
        res = self.resolve(address)
        if res.kind == "mailbox":
            if not system and not self.org_max_receive.allows(size):
                return Failure("5.2.3", RECIPIENT_SIZE_LIMIT)
            domain = res.domain
            if domain is not None and domain.lmtp_target:
                return Route(f"lmtp:{domain.lmtp_target}", "SmtpDeliveryToMailbox", domain.lmtp_target, None, "Internal")
            db = mailbox_database(self.server)
            return Route("mailbox", "SmtpDeliveryToMailbox", db, None, "Internal")
        if res.kind == "unknown":
            return Failure("5.1.1", RECIPIENT_NOT_FOUND)
        return self.route_domain(domain_key(address.rpartition("@")[2]), size)   # one queue per IDN, in A-labels

    def candidates(self, domain: str) -> list[tuple[int, int, str, SendConnector]]:
        """Connectors matching ``domain``: (-specificity, cost, name, connector), best first."""
        out = []
        for c in self.connectors:
            best: tuple[int, int] | None = None
            for space in c.address_spaces:
                length = space.match_length(domain)
                if length < 0:
                    continue
                if best is None or (length, -space.cost) > (best[0], -best[1]):
                    best = (length, space.cost)
            if best is not None:
                out.append((-best[0], best[1], c.name.lower(), c))
        out.sort(key=lambda t: t[:3])
        return out

    def route_domain(self, domain: str, size: int = 0) -> Route | Failure:
        """The route for an external domain. Connector size limits make size part of the answer, so the cache
        (one per configuration revision) is keyed by domain for messages no connector's limit can refuse."""
        cacheable = size <= self._smallest_limit
        if cacheable:
            hit = self._route_cache.get(domain)
            if hit is not None:
                return hit
        route = self._route_domain(domain, size)
        if cacheable:
            if len(self._route_cache) > 100_000:
                self._route_cache.clear()
            self._route_cache[domain] = route
        return route

    def _route_domain(self, domain: str, size: int) -> Route | Failure:
        matches = self.candidates(domain)
        if not matches:
            return Route(UNREACHABLE, "Unreachable", "Unreachable Domain", None, "Internal")
        fitting = [m for m in matches if m[3].max_message_size.allows(size)]
        if not fitting:
            return Failure("5.3.4", "552 5.3.4 Message size exceeds fixed maximum size for route")
        best_rank = fitting[0][:2]
        tied = [m for m in fitting if m[:2] == best_rank]
        local = [m for m in tied if self._is_source(m[3])]   # fewer hops: a connector this server sends for
        chosen = (local or tied)[0][3]                      # then the lowest name (candidates are sorted)
        if not self._is_source(chosen):
            # Another server of the organisation sends for this connector (multi-server organisation).
            return Route(f"relay:{chosen.name.lower()}", "SmtpRelayToConnectorSourceServers", chosen.name, chosen.name,
                         "Internal")
        if chosen.dns_routing_enabled:
            return Route(f"dns:{chosen.name.lower()}:{domain}", "DnsConnectorDelivery", domain, chosen.name, "External")
        hosts = ",".join(str(h) for h in chosen.smart_hosts)
        return Route(f"smarthost:{chosen.name.lower()}", "SmartHostConnectorDelivery", hosts, chosen.name, "External")

    def _is_source(self, connector: SendConnector) -> bool:
        servers = connector.source_transport_servers
        return not servers or any(s.lower() == self.server.lower() for s in servers)

    def connector(self, name: str | None) -> SendConnector | None:
        if name is None:
            return None
        return next((c for c in self.connectors if c.name.lower() == name.lower()), None)


def intra_org_endpoints(snapshot: dict[str, list[Any]]) -> dict[str, list[tuple[str | None, int]]]:
    """Where each server of the organisation takes mail from the others: the bindings of its enabled receive
    connectors that accept Exchange Server authentication (the ExchangeServers group with the ExchangeServer
    mechanism), as (IP, port) — IP None for a wildcard binding, reached through the server's FQDN."""
    out: dict[str, list[tuple[str | None, int]]] = {}
    for c in snapshot.get("ReceiveConnector", []):
        if not c.enabled or AuthMechanism.ExchangeServer not in c.auth_mechanism \
                or PermissionGroups.ExchangeServers not in c.permission_groups:
            continue
        for b in c.bindings:
            endpoint = (None if b.is_wildcard else str(b.address), b.port)
            endpoints = out.setdefault(c.server.lower(), [])
            if endpoint not in endpoints:
                endpoints.append(endpoint)
    return out
