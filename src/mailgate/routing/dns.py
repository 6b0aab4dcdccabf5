"""Finding the hosts of a next hop with dnspython's async resolver: MX by
preference (equal preferences shuffled), the domain's own A/AAAA when it has
no MX, null MX (RFC 7505), IP literals, and smart hosts by name or address."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mailgate.config.values import SmartHost


@dataclass(frozen=True, slots=True)
class Host:
    name: str                     # MX host or smart host name ("" for IP literals)
    addresses: tuple[str, ...]    # IPs to try, in order
    port: int | None = None       # this host's own port (another server of the organisation), else the connector's


# The most addresses one delivery attempt to a recipient domain tries, over all its MX hosts (Postfix's
# smtp_mx_address_limit is 5). The domain's owner writes its DNS: without a bound, a domain with thousands of
# MX records or addresses (a DNS answer holds ~4,000) would hold its queue's attempt for hours of lookups and
# connection timeouts. Smart hosts, which the administrator lists, are not bounded.
MX_ADDRESS_LIMIT = 10
MX_NAME_LIMIT = 20   # and the most MX host names it looks up (names that don't resolve cost lookups too)


class DnsFailure(Exception):
    """No hosts: ``permanent`` decides between an NDR and a retry."""

    def __init__(self, reply: str, *, permanent: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.permanent = permanent


def make_resolver(servers: list[str], timeout: float = 5.0) -> dns.asyncresolver.Resolver:
    """A resolver for the given servers ("ip" or "ip#port"); the system's when the list is empty."""
    if not servers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        nameservers = []
        for entry in servers:
            ip, _, port = entry.partition("#")
            nameservers.append(dns.nameserver.Do53Nameserver(ip, int(port) if port else 53))
        resolver.nameservers = nameservers
    resolver.lifetime = timeout
    resolver.timeout = timeout
    resolver.cache = dns.resolver.LRUCache(10000)
    return resolver


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[str, ...]:
    out: list[str] = []
    transient = False
    for rtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rtype)
            out += [r.address for r in answer]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            transient = True
    if not out and transient:
        raise DnsFailure(f"451 4.4.3 SMTPSEND.DNS.ServerFailure; DNS query for {name} failed", permanent=False)
    return tuple(out)


async def mx_hosts(resolver: dns.asyncresolver.Resolver, domain: str) -> list[Host]:
    """The hosts to try for a recipient domain, best first."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        ipaddress.ip_address(literal)
        return [Host("", (literal,))]
    try:
        answer = await resolver.resolve(domain, "MX")
        records = sorted(answer, key=lambda r: r.preference)
    except dns.resolver.NXDOMAIN:
        raise DnsFailure(f"554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain {domain}", permanent=True) from None
    except dns.resolver.NoAnswer:
        records = []
    except (dns.exception.Timeout, dns.resolver.NoNameservers):
        raise DnsFailure(f"451 4.4.3 SMTPSEND.DNS.ServerFailure; MX lookup for {domain} failed", permanent=False) from None
    if len(records) == 1 and records[0].exchange == dns.name.root:
        raise DnsFailure(f"556 5.1.10 Recipient domain {domain} has a null MX and accepts no mail", permanent=True)
    if not records:
        addresses = await _addresses(resolver, domain)
        if not addresses:
            raise DnsFailure(f"554 5.4.4 SMTPSEND.DNS.NonExistentDomain; {domain} has no MX, A or AAAA record",
                             permanent=True)
        return [Host(domain, addresses[:MX_ADDRESS_LIMIT])]
    # Equal preferences are shuffled so load spreads (RFC 5321 §5.1).
    groups: dict[int, list[str]] = {}
    for r in records:
        if r.exchange != dns.name.root:
            groups.setdefault(r.preference, []).append(r.exchange.to_text(omit_final_dot=True))
    hosts: list[Host] = []
    room = MX_ADDRESS_LIMIT
    ordered = [name for pref in sorted(groups) for name in random.sample(groups[pref], len(groups[pref]))]
    for name in ordered[:MX_NAME_LIMIT]:
        if room <= 0:
            break
        try:
            addresses = await _addresses(resolver, name)
        except DnsFailure:
            continue
        if addresses:
            hosts.append(Host(name, addresses[:room]))
            room -= len(hosts[-1].addresses)
    if not hosts:
        raise DnsFailure(f"451 4.4.0 DNS lookup of the MX hosts of {domain} gave no address", permanent=False)
    return hosts


async def smart_hosts(resolver: dns.asyncresolver.Resolver, hosts: list[SmartHost]) -> list[Host]:
    out: list[Host] = []
    for h in hosts:
        if h.is_ip:
            out.append(Host("", (h.host,)))
            continue
        try:
            addresses = await _addresses(resolver, h.host)
        except DnsFailure:
            continue
        if addresses:
            out.append(Host(h.host, addresses))
    if not out:
        names = ", ".join(str(h) for h in hosts)
        raise DnsFailure(f"451 4.4.0 DNS lookup of the smart hosts ({names}) gave no address", permanent=False)
    return out
