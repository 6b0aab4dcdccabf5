"""Resolve-DnsName and Test-NetConnection: the two Windows networking cmdlets administrators reach for when mail
doesn't flow ("what are fabrikam.com's MX hosts?", "is port 25 of the smart host open from here?"). Shell utilities
with Windows PowerShell's parameters and output; they run where the shell runs and are not REST endpoints.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailgate.errors import InvalidValueError, UserError
from mailgate.manage.cmdlets import Param, cmdlet, registry
from mailgate.manage.context import ManagementContext
from mailgate.manage.params import to_int, to_str, to_str_list
from mailgate.manage.present import Record
from mailgate.routing.dns import make_resolver

DNS_TIMEOUT = 5.0       # seconds per query, as Windows' resolver waits before giving up on a server
TCP_TIMEOUT = 10.0      # seconds for Test-NetConnection's TCP connect
_TYPES = ("A", "AAAA", "A_AAAA", "MX", "TXT", "CNAME", "NS", "PTR", "SOA", "SRV", "CAA", "ANY")
_COMMON_TCP_PORTS = {"http": 80, "rdp": 3389, "smb": 445, "winrm": 5985}


def _record_type(value: Any) -> str:
    text = to_str(value).strip().upper()
    if text not in _TYPES:
        raise ValueError(f'Cannot convert value "{value}" to type "Microsoft.DnsClient.Commands.RecordType". Valid '
                         f"values include: {', '.join(_TYPES)}")
    return text


def _shown(name: str) -> str:
    """A name as an error message quotes it: the first 60 characters, control characters as "?"."""
    return "".join(c if c.isprintable() else "?" for c in name[:60])


def _resolver(servers: list[str]) -> Any:
    """The system's resolver, or the -Server addresses ("ip", or "ip#port" as InternalDNSServers takes them): the
    resolver delivery uses (routing/dns.py), so what this shows is what delivery would see with those servers."""
    try:
        for entry in servers:
            address, _, port = entry.partition("#")
            ipaddress.ip_address(address.strip())
            if port and not 0 < int(port) < 65536:
                raise ValueError(port)
        return make_resolver([s.strip() for s in servers], timeout=DNS_TIMEOUT)
    except ValueError:
        raise InvalidValueError(f"'{', '.join(servers)}' isn't a list of DNS server addresses (an IP address, or "
                                "address#port).", parameter="Server") from None


def _dns_record(rrset: Any, rdata: Any, section: str) -> Record:
    """One answer as Resolve-DnsName shows it: Name, Type, TTL, Section and the type's own fields."""
    kind = dns.rdatatype.to_text(rrset.rdtype)
    props: dict[str, Any] = {"Name": rrset.name.to_text(omit_final_dot=True), "Type": kind, "TTL": rrset.ttl,
                             "Section": section}
    if kind in ("A", "AAAA"):
        props["IPAddress"] = rdata.address
    elif kind == "MX":
        props["NameExchange"] = rdata.exchange.to_text(omit_final_dot=True)
        props["Preference"] = rdata.preference
    elif kind == "TXT":
        props["Strings"] = [s.decode(errors="replace") for s in rdata.strings]
    elif kind in ("CNAME", "NS", "PTR"):
        props["NameHost"] = rdata.target.to_text(omit_final_dot=True)
    elif kind == "SOA":
        props.update({"PrimaryServer": rdata.mname.to_text(omit_final_dot=True),
                      "NameAdministrator": rdata.rname.to_text(omit_final_dot=True), "SerialNumber": rdata.serial,
                      "TimeToZoneRefresh": rdata.refresh, "TimeToZoneFailureRetry": rdata.retry,
                      "TimeToExpiration": rdata.expire, "DefaultTTL": rdata.minimum})
    elif kind == "SRV":
        props.update({"NameTarget": rdata.target.to_text(omit_final_dot=True), "Priority": rdata.priority,
                      "Weight": rdata.weight, "Port": rdata.port})
    else:
        props["Data"] = rdata.to_text()
    return Record(f"DnsRecord_{kind}", props)


def _query(resolver: Any, name: str, kind: str) -> list[Record]:
    try:
        answer = asyncio.run(resolver.resolve(name, kind, raise_on_no_answer=False, search=False))
    except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong, dns.name.BadEscape):
        raise InvalidValueError(f"'{_shown(name)}' isn't a DNS name (a label is empty or longer than 63 characters).",
                                parameter="Name") from None
    except dns.resolver.NXDOMAIN:
        raise UserError(f"{name} : DNS name does not exist") from None
    except (dns.resolver.LifetimeTimeout, dns.exception.Timeout):
        raise UserError(f"{name} : This operation returned because the timeout period expired") from None
    except dns.resolver.NoNameservers as exc:
        raise UserError(f"{name} : DNS server failure ({exc})") from None
    response = answer.response
    records = [_dns_record(rrset, rdata, "Answer") for rrset in response.answer for rdata in rrset]
    if not records:   # no record of that type: Windows shows the zone's SOA from the authority section
        records = [_dns_record(rrset, rdata, "Authority") for rrset in response.authority for rdata in rrset
                   if rrset.rdtype == dns.rdatatype.SOA]
    return records


@cmdlet("Resolve-DnsName", [
    Param("Name", position=0, mandatory=True, convert=to_str),
    Param("Type", position=1, convert=_record_type, type_name="RecordType", help="A_AAAA (default), MX, TXT, ..."),
    Param("Server", convert=to_str_list, type_name="String[]",
          help="DNS servers to ask (address or address#port); the system's resolver when not given."),
    Param("DnsOnly", switch=True), Param("NoHostsFile", switch=True), Param("QuickTimeout", switch=True),
], synopsis="Ask DNS for a name's records (MX, A, TXT...), as Windows' Resolve-DnsName.", builtin=True,
    examples=["Resolve-DnsName fabrikam.com -Type MX", "Resolve-DnsName mail.fabrikam.com",
              "Resolve-DnsName fabrikam.com -Type TXT -Server 8.8.8.8"])
def resolve_dns_name(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The name's records of the type; an address (10.0.0.5) is looked up as its PTR record."""
    name, kind = args["Name"].strip(), args.get("Type") or "A_AAAA"
    if not name or len(name) > 255 or not name.isprintable():
        raise InvalidValueError(f"'{_shown(name)}' isn't a DNS name.", parameter="Name")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
        name = dns.reversename.from_address(name).to_text(omit_final_dot=True)
        kind = "PTR" if kind == "A_AAAA" else kind
    except OSError:
        pass
    resolver = _resolver(args.get("Server") or [])
    if kind == "A_AAAA":
        found = _query(resolver, name, "AAAA") + _query(resolver, name, "A")
        answers = [r for r in found if r["Section"] == "Answer"]
        return answers or found[:1]
    return _query(resolver, name, kind)


@cmdlet("Test-NetConnection", [
    Param("ComputerName", position=0, mandatory=True, convert=to_str, aliases=("RemoteAddress", "cn")),
    Param("Port", convert=to_int, type_name="Int32", aliases=("RemotePort",)),
    Param("CommonTCPPort", convert=to_str, help="HTTP, RDP, SMB or WINRM."),
    Param("InformationLevel", convert=to_str, help="Detailed (default) or Quiet (True or False only)."),
], synopsis="Try a TCP connection to a host's port (is port 25 of the smart host open from here?).", builtin=True,
    examples=["Test-NetConnection smtp.relay.com -Port 25", "tnc ex01 -Port 587 -InformationLevel Quiet"])
def test_net_connection(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Connect to the port and report what happened; a port that refuses or doesn't answer is a warning and
    TcpTestSucceeded False, as in Windows. (No ping: give -Port or -CommonTCPPort.)"""
    host = args["ComputerName"].strip()
    if not host or not host.isprintable():
        raise InvalidValueError(f"'{_shown(host)}' isn't a computer name or address.", parameter="ComputerName")
    port = args.get("Port")
    if port is None and args.get("CommonTCPPort"):
        port = _COMMON_TCP_PORTS.get(args["CommonTCPPort"].lower())
        if port is None:
            raise InvalidValueError("CommonTCPPort must be one of HTTP, RDP, SMB, WINRM.", parameter="CommonTCPPort")
    if port is None:
        raise InvalidValueError("mailgate's Test-NetConnection tries TCP ports only; give -Port (e.g. -Port 25).",
                                parameter="Port")
    if not 0 < port < 65536:
        raise InvalidValueError(f"{port} isn't a TCP port (1-65535).", parameter="Port")
    quiet = (args.get("InformationLevel") or "Detailed").lower() == "quiet"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):   # UnicodeError: a label too long to look up (IDNA)
        ctx.warnings.append(f"Name resolution of {host} failed")
        return [False] if quiet else [Record("TestNetConnectionResult", {
            "ComputerName": host, "RemoteAddress": None, "RemotePort": port, "SourceAddress": None,
            "TcpTestSucceeded": False, "ConnectMilliseconds": None})]
    source, succeeded, started, reason = None, False, time.monotonic(), ""
    for family, _, _, _, address in infos:   # each of the name's addresses in turn (localhost: ::1, then 127.0.0.1)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(TCP_TIMEOUT)
                sock.connect(address)
                source, succeeded = sock.getsockname()[0], True
                break
        except OSError as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
    if not succeeded:
        ctx.warnings.append(f"TCP connect to ({address[0]} : {port}) failed: {reason}")
    if quiet:
        return [succeeded]
    return [Record("TestNetConnectionResult", {
        "ComputerName": host, "RemoteAddress": address[0], "RemotePort": port, "SourceAddress": source,
        "TcpTestSucceeded": succeeded,
        "ConnectMilliseconds": round((time.monotonic() - started) * 1000) if succeeded else None})]


registry.alias("tnc", "Test-NetConnection")
