"""Finding a recipient domain's hosts: a hostile domain's DNS can't make one delivery attempt endless."""

from __future__ import annotations

import asyncio

import pytest
from peers import DnsServer

from mailgate.routing import dns as D


@pytest.fixture
def zone():
    server = DnsServer()
    yield server
    server.close()


def lookups(server: DnsServer, rtype: str) -> int:
    return sum(1 for _, t in server.queries if t == rtype)


def test_thousands_of_mx_hosts_and_addresses_are_tried_only_up_to_the_limits(zone):
    resolver = D.make_resolver([zone.address], timeout=2)
    zone.add("many.example", "MX", *[f"10 mx{i}.many.example." for i in range(40)])
    for i in range(40):
        zone.add(f"mx{i}.many.example", "A", *[f"127.0.{i}.{j}" for j in range(1, 4)])
    hosts = asyncio.run(D.mx_hosts(resolver, "many.example"))
    assert sum(len(h.addresses) for h in hosts) == D.MX_ADDRESS_LIMIT
    assert len(hosts) == 4 and lookups(zone, "A") == 4   # 3 + 3 + 3 + 1 addresses: no name looked up after

    zone.add("dangling.example", "MX", *[f"10 gone{i}.dangling.example." for i in range(60)])
    with pytest.raises(D.DnsFailure):
        asyncio.run(D.mx_hosts(resolver, "dangling.example"))
    assert lookups(zone, "A") - 4 == D.MX_NAME_LIMIT

    zone.add("flat.example", "A", *[f"127.1.0.{i}" for i in range(1, 60)])
    (host,) = asyncio.run(D.mx_hosts(resolver, "flat.example"))
    assert len(host.addresses) == D.MX_ADDRESS_LIMIT
