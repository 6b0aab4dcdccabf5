"""Which receive connector serves a connection (reference §1.8): the connectors
whose bindings match the local endpoint, then the one whose RemoteIPRanges
contain the client most specifically; an exact-address binding beats a
wildcard one when the ranges tie."""

from __future__ import annotations

import ipaddress
from typing import Iterable

from mailgate.config.model import ReceiveConnector
from mailgate.config.values import IPAddress


def select_connector(connectors: Iterable[ReceiveConnector], local_ip: IPAddress, local_port: int,
                     remote_ip: IPAddress) -> ReceiveConnector | None:
    local_ip = _unmap(local_ip)
    remote_ip = _unmap(remote_ip)
    best: tuple[int, int, str] | None = None
    chosen: ReceiveConnector | None = None
    for connector in connectors:
        if not connector.enabled:
            continue
        bindings = [b for b in connector.bindings if b.matches_local(local_ip, local_port)]
        if not bindings:
            continue
        ranges = [r for r in connector.remote_ip_ranges if r.contains(remote_ip)]
        if not ranges:
            continue
        narrowest = min(r.size for r in ranges)
        exact = 0 if any(not b.is_wildcard for b in bindings) else 1
        key = (narrowest, exact, connector.name.lower())
        if best is None or key < best:
            best, chosen = key, connector
    return chosen


def _unmap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
