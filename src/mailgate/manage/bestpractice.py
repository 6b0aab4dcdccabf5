"""The document's best practices as checks (Test-MailflowBestPractice, `mailgate doctor`)
and a connector simulator (Test-ReceiveConnectorSelection).

Each rule is a function over the organisation's configuration (and the running
server's state when it is up) that yields findings; every finding carries the
cmdlet that mends it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mailgate.config.model import (
    AcceptedDomain,
    Certificate,
    Mailbox,
    ReceiveConnector,
    SendConnector,
    TransportConfig,
    TransportServer,
)
from mailgate.config.values import (
    AuthMechanism,
    ExchangeServices,
    IPRange,
    PermissionGroups,
    SmartHostAuthMechanism,
    TimeSpan,
)
from mailgate.errors import UserError
from mailgate.home import SERVICE_DIR_FIELDS
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.organisation import smtp_certificate
from mailgate.manage.params import to_str
from mailgate.manage.present import Record
from mailgate.receive import rights as R
from mailgate.receive.selection import select_connector

WIDE_IPV4 = 256            # more addresses than a /24 is "wide" for a relay
WIDE_IPV6 = 2 ** 64        # more than a /64


@dataclass
class Finding:
    severity: str      # Error | Warning | Info
    object: str
    rule: str
    detail: str
    fix: str

    def record(self) -> Record:
        return Record("BestPracticeFinding", {"Severity": self.severity, "Object": self.object, "Rule": self.rule,
                                              "Detail": self.detail, "Fix": self.fix})


@dataclass
class Facts:
    server: TransportServer
    org: TransportConfig
    receive: list[ReceiveConnector]
    send: list[SendConnector]
    certificates: list[Certificate]
    runtime_status: dict[str, Any] | None
    queues: list[Record] | None
    retry_threshold: float
    domains: list[AcceptedDomain]
    mailboxes: list[Mailbox]
    # This server's Pickup and Replay directories (setting name → path; None when turned off).
    service_dirs: dict[str, Path | None] = field(default_factory=dict)


def _q(text: str) -> str:
    return '"' + text.replace('"', '`"') + '"'


def _anonymous_relay(c: ReceiveConnector) -> bool:
    return R.Right.AcceptAnyRecipient in R.effective_rights(c, [R.ANONYMOUS]) or \
        (AuthMechanism.ExternalAuthoritative in c.auth_mechanism and PermissionGroups.ExchangeServers in c.permission_groups)


def _span(c: ReceiveConnector) -> tuple[int, int]:
    v4 = sum(r.size for r in c.remote_ip_ranges if r.version == 4)
    v6 = sum(r.size for r in c.remote_ip_ranges if r.version == 6)
    return v4, v6


def _internet_facing(c: ReceiveConnector) -> bool:
    v4, v6 = _span(c)
    return PermissionGroups.AnonymousUsers in c.permission_groups and (v4 >= 2 ** 31 or v6 >= 2 ** 127)


def _relay_fix(c: ReceiveConnector) -> str:
    if AuthMechanism.ExternalAuthoritative in c.auth_mechanism:
        return f"Set-ReceiveConnector {_q(c.identity)} -AuthMechanism Tls -PermissionGroups AnonymousUsers"
    return (f'Remove-ADPermission {_q(c.identity)} -User "NT AUTHORITY\\ANONYMOUS LOGON" '
            "-ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient")


def rule_anonymous_relay(f: Facts) -> Iterator[Finding]:
    for c in f.receive:
        if not c.enabled or not _anonymous_relay(c):
            continue
        ranges = ", ".join(map(str, c.remote_ip_ranges))
        how = "ExternalAuthoritative" if AuthMechanism.ExternalAuthoritative in c.auth_mechanism else \
            "Add-ADPermission ms-Exch-SMTP-Accept-Any-Recipient for ANONYMOUS LOGON"
        if _internet_facing(c):
            yield Finding("Error", c.identity, "InternetFacingRelay",
                          f"The connector accepts anonymous mail from the whole internet and relays it ({how}): an "
                          "open relay.", _relay_fix(c))
            continue
        v4, v6 = _span(c)
        if v4 > WIDE_IPV4 or v6 > WIDE_IPV6:
            yield Finding("Warning", c.identity, "WideRelayRange",
                          f"Anonymous relay ({how}) is granted to {v4 + v6:,} addresses ({ranges}); scope "
                          f"RemoteIPRanges to the devices that need it (at most a /24).", _relay_fix(c))
            continue
        yield Finding("Info", c.identity, "AnonymousRelay",
                      f"Anonymous relay ({how}) is granted to {ranges}. Keep this list to the devices that need it.",
                      _relay_fix(c))


def rule_basic_auth_without_tls(f: Facts) -> Iterator[Finding]:
    for c in f.receive:
        am = c.auth_mechanism
        if c.enabled and AuthMechanism.BasicAuth in am and AuthMechanism.BasicAuthRequireTLS not in am:
            wanted = am | AuthMechanism.BasicAuthRequireTLS | AuthMechanism.Tls
            yield Finding("Error" if _internet_facing(c) else "Warning", c.identity, "BasicAuthWithoutTls",
                          "BasicAuth is offered before STARTTLS, so passwords can cross the network in clear text.",
                          f"Set-ReceiveConnector {_q(c.identity)} -AuthMechanism {str(wanted).replace(' ', '')}")


def rule_send_credentials_in_clear(f: Facts) -> Iterator[Finding]:
    for c in f.send:
        if c.enabled and c.smart_host_auth_mechanism is SmartHostAuthMechanism.BasicAuth and not c.require_tls:
            yield Finding("Warning", c.name, "CredentialsWithoutTls",
                          "The smart-host password is sent with BasicAuth even when the smart host offers no TLS.",
                          f"Set-SendConnector {_q(c.name)} -SmartHostAuthMechanism BasicAuthRequireTLS")


def rule_partner_security(f: Facts) -> Iterator[Finding]:
    for c in f.receive:
        if c.enabled and PermissionGroups.Partners in c.permission_groups and not (c.require_tls or c.domain_secure_enabled):
            yield Finding("Warning", c.identity, "PartnerWithoutTls",
                          "A partner connector that accepts mail without TLS or domain security.",
                          f"Set-ReceiveConnector {_q(c.identity)} -RequireTLS $true")
    for c in f.send:
        if c.enabled and c.usage == "Partner" and not (c.require_tls or c.domain_secure_enabled):
            yield Finding("Warning", c.name, "PartnerWithoutTls",
                          "A partner send connector that may send in clear text.",
                          f"Set-SendConnector {_q(c.name)} -RequireTLS $true")


def rule_protocol_logging(f: Facts) -> Iterator[Finding]:
    for c in f.receive:
        if c.enabled and _internet_facing(c) and c.protocol_logging_level.value == "None":
            yield Finding("Warning", c.identity, "ProtocolLoggingOff",
                          "Protocol logging is off on a connector that faces the internet: sessions can't be audited.",
                          f"Set-ReceiveConnector {_q(c.identity)} -ProtocolLoggingLevel Verbose")


def rule_certificates(f: Facts) -> Iterator[Finding]:
    now = dt.datetime.now(dt.timezone.utc)
    seen: set[str] = set()
    mine = [c for c in f.certificates if c.server.lower() == f.server.name.lower() and c.has_private_key]
    for cert in mine:
        if ExchangeServices.SMTP not in cert.services or cert.not_after is None:
            continue
        if cert.not_after - now >= dt.timedelta(days=30):
            continue
        days = (cert.not_after - now).days
        pinned = [c for c in f.receive if c.tls_certificate_name and _pins(c.tls_certificate_name, cert)]
        name = f.server.fqdn
        steps = [f"Set-ReceiveConnector {_q(c.identity)} -TlsCertificateName $null" for c in pinned]
        steps.append(f'New-ExchangeCertificate -SubjectName "CN={name}" -DomainName {name} -Services SMTP')
        steps.append(f"Remove-ExchangeCertificate {cert.thumbprint}")
        yield Finding("Error" if days < 0 else "Warning", f"Certificate {cert.thumbprint}", "CertificateExpiring",
                      f"The SMTP certificate {cert.subject} expires on {cert.not_after:%Y-%m-%d} ({days} days).",
                      "; ".join(steps))
    for c in f.receive:
        if not c.enabled or AuthMechanism.Tls not in c.auth_mechanism:
            continue
        try:
            cert = smtp_certificate(f.certificates, c.server, c.fqdn, c.tls_certificate_name)
        except ValueError:
            cert = None
        if cert is None:
            yield Finding("Error", c.identity, "NoCertificate",
                          "The connector offers TLS but no valid SMTP certificate with a private key exists for it.",
                          f'New-ExchangeCertificate -SubjectName "CN={c.fqdn}" -DomainName {c.fqdn} -Services SMTP')
            continue
        if cert.is_self_signed and _internet_facing(c) and (cert.thumbprint, "ss") not in seen:
            seen.add(cert.thumbprint)
            yield Finding("Info", f"Certificate {cert.thumbprint}", "SelfSignedCertificate",
                          f"Internet senders that validate certificates won't trust the self-signed {cert.subject} "
                          f"on {c.identity}. Request a certificate from a CA and import the answer.",
                          f'New-ExchangeCertificate -GenerateRequest -SubjectName "CN={c.fqdn}" -DomainName {c.fqdn} '
                          f"-RequestFile .\\{c.fqdn}.req")


def _pins(name: str, cert: Certificate) -> bool:
    try:
        return smtp_certificate([cert], cert.server, None, name) is not None
    except ValueError:
        return False


def rule_overlapping_address_spaces(f: Facts) -> Iterator[Finding]:
    usable = [c for c in f.send if c.enabled and (not c.source_transport_servers or any(
        s.lower() == f.server.name.lower() for s in c.source_transport_servers))]
    by_space: dict[tuple[str, int], list[SendConnector]] = {}
    for c in usable:
        for space in c.address_spaces:
            by_space.setdefault((space.domain, space.cost), []).append(c)
    for (domain, cost), connectors in by_space.items():
        if len(connectors) < 2:
            continue
        ordered = sorted(connectors, key=lambda c: c.name.lower())
        winner, losers = ordered[0], ordered[1:]
        for loser in losers:
            spaces = ",".join(f'"{a.type}:{a.domain};{a.cost + 1 if a.domain == domain and a.cost == cost else a.cost}"'
                              for a in loser.address_spaces)
            yield Finding("Warning", loser.name, "AmbiguousRoute",
                          f"Address space {domain} (cost {cost}) is also on {winner.name}; {winner.name} is chosen "
                          "only because its name sorts first. Give the connectors different costs.",
                          f"Set-SendConnector {_q(loser.name)} -AddressSpaces {spaces}")


def rule_bindings(f: Facts) -> Iterator[Finding]:
    if not f.runtime_status:
        return
    for item in f.runtime_status.get("listeners", []):
        if item["listening"]:
            continue
        endpoint = item["endpoint"]
        connectors = [c for c in f.receive if any(_same_endpoint(str(b), endpoint) for b in c.bindings)]
        for c in connectors or [None]:
            name = c.identity if c else endpoint
            host, _, port = endpoint.rpartition(":")
            new_port = _free_port(host.strip("[]"), int(port))
            yield Finding("Error", name, "BindingUnavailable", item["error"],
                          f"Set-ReceiveConnector {_q(name)} -Bindings {host}:{new_port}" if c else "")


def _same_endpoint(binding: str, endpoint: str) -> bool:
    return binding == endpoint or binding.rpartition(":")[2] == endpoint.rpartition(":")[2] and (
        binding.startswith(("0.0.0.0", "[::]")) or endpoint.startswith(("0.0.0.0", "[::]")))


def _free_port(host: str, start: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in list(range(start + 1, start + 50)) + [0]:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
                return s.getsockname()[1]
        except OSError:
            continue
    return start + 1


def rule_queues(f: Facts) -> Iterator[Finding]:
    now = dt.datetime.now(dt.timezone.utc)
    for q in f.queues or []:
        first = q.get("FirstRetryTime")
        if q["Status"] == "Retry" and first is not None and (now - first).total_seconds() >= f.retry_threshold:
            hours = (now - first).total_seconds() / 3600
            yield Finding("Warning", q["Identity"], "QueueInRetry",
                          f"The queue has been in Retry for {hours:.1f} h with {q['MessageCount']} message(s); "
                          f"last error: {q['LastError']}", f"Retry-Queue {_q(q['Identity'])}")


def rule_back_pressure(f: Facts) -> Iterator[Finding]:
    bp = (f.runtime_status or {}).get("back_pressure")
    if bp and bp["level"] != "Normal":
        refused = "all new mail" if bp["level"] == "High" else "mail from outside the authoritative domains"
        yield Finding("Error" if bp["level"] == "High" else "Warning", f.server.name, "BackPressure",
                      f"The queue disk {bp['path']} is {bp['used_percent']}% used: back pressure is {bp['level']} "
                      f"and {refused} is refused with 452 4.3.1", "Free space on the queue's disk "
                      "(or set [back_pressure] in mailgate.toml)")


def rule_postmaster(f: Facts) -> Iterator[Finding]:
    """RFC 5321 §4.5.1: a domain that receives mail accepts postmaster@domain. Exchange creates no such
    recipient, so mail to it (and to the bare <postmaster>) is refused until one has the address."""
    addresses = {a.split(":", 1)[-1].lower() for m in f.mailboxes for a in [m.primary_smtp_address, *m.email_addresses]}
    system = next((m for m in f.mailboxes if m.recipient_type_details == "ArbitrationMailbox"), None)
    for d in f.domains:
        if d.domain_type.value != "Authoritative" or d.domain_name.startswith("*"):
            continue
        address = f"postmaster@{d.domain_name.lower()}"
        if address not in addresses:
            owner = _q(system.name) if system else "<mailbox>"
            arbitration = " -Arbitration" if system else ""   # as Exchange wants it for a system mailbox
            yield Finding("Warning", d.name, "NoPostmaster",
                          f"No recipient has the address {address}, which RFC 5321 requires: mail to it is refused "
                          "with 550 5.1.10.", f'Set-Mailbox {owner}{arbitration} -EmailAddresses @{{Add="{address}"}}')


def rule_pickup_directories(f: Facts) -> Iterator[Finding]:
    """Whatever is written into the Pickup or Replay directory is sent, with any sender: only the server's
    account may write there."""
    for setting, path in f.service_dirs.items():
        if path is None or not path.is_dir():
            continue
        mode = path.stat().st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            who = "any local user" if mode & stat.S_IWOTH else "the directory's group"
            yield Finding("Error", f.server.name, "WritablePickupDirectory",
                          f"{setting} {path} is writable by {who}, who can then send mail as any sender.",
                          f"chmod go-w {path}")


RULES: list[Callable[[Facts], Iterator[Finding]]] = [
    rule_anonymous_relay, rule_basic_auth_without_tls, rule_send_credentials_in_clear, rule_partner_security,
    rule_protocol_logging, rule_certificates, rule_overlapping_address_spaces, rule_bindings, rule_queues,
    rule_back_pressure, rule_postmaster, rule_pickup_directories,
]


def facts(ctx: ManagementContext, retry_threshold: float = 3600.0) -> Facts:
    with ctx.store.reader() as tx:
        server = ctx.local_server(tx)
        receive = tx.list(ReceiveConnector, server.name)
        send = tx.list(SendConnector)
        certificates = tx.list(Certificate)
        org = ctx.transport_config(tx)
        domains = tx.list(AcceptedDomain)
        mailboxes = tx.list(Mailbox)
    status, queues = None, None
    if ctx.has_runtime():
        try:
            status = ctx.runtime.call("status")
            queues = ctx.runtime.call("queues")
        except UserError:
            status, queues = None, None
    service_dirs = {setting: ctx.home.service_dir(getattr(server, name), setting)
                    for setting, name in SERVICE_DIR_FIELDS.items()}
    return Facts(server, org, receive, send, certificates, status, queues, retry_threshold, domains, mailboxes,
                 service_dirs)


def findings(f: Facts) -> list[Finding]:
    out = [finding for rule in RULES for finding in rule(f)]
    order = {"Error": 0, "Warning": 1, "Info": 2}
    return sorted(out, key=lambda x: (order[x.severity], x.object, x.rule))


@cmdlet("Test-MailflowBestPractice",
        [Param("RetryThreshold", convert=TimeSpan.parse, type_name="EnhancedTimeSpan",
               help="How long a queue may stay in Retry before it is reported (default 01:00:00).")],
        synopsis="Check the configuration against mail-flow best practices.", default_view="BestPracticeFinding",
        examples=["Test-MailflowBestPractice", "Test-MailflowBestPractice | Where-Object Severity -eq Error | fl",
                  "mailgate doctor"])
def test_mailflow_best_practice(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """One row per finding with the cmdlet that fixes it; the command fails when an Error is found."""
    threshold = args["RetryThreshold"].seconds if args.get("RetryThreshold") else 3600.0
    found = findings(facts(ctx, threshold))
    errors = [f for f in found if f.severity == "Error"]
    if errors:
        ctx.fail(f"{len(errors)} best-practice error(s): " + "; ".join(f"{e.object}: {e.rule}" for e in errors))
    return [f.record() for f in found]


def _ip(value: Any) -> Any:
    try:
        return ipaddress.ip_address(to_str(value).strip("[]"))
    except ValueError:
        raise ValueError(f'"{value}" is not an IP address') from None


def _endpoint(value: Any) -> tuple[Any, int]:
    text = to_str(value)
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not host:
        raise ValueError(f'"{text}" is not an endpoint; use IP:port, e.g. 127.0.0.1:25 or [::1]:25')
    return _ip(host), int(port)


@cmdlet("Test-ReceiveConnectorSelection",
        [Param("RemoteIPAddress", convert=_ip, mandatory=True, type_name="IPAddress"),
         Param("LocalEndPoint", convert=_endpoint, mandatory=True, type_name="IPEndPoint"),
         Param("Server", convert=to_str)],
        synopsis="Show which receive connector a client would get, and what it may do.",
        examples=["Test-ReceiveConnectorSelection -RemoteIPAddress 192.168.0.20 -LocalEndPoint 10.0.0.5:25"])
def test_receive_connector_selection(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Simulate a connection without sending mail: connector, rights, auth, TLS requirement, relay."""
    with ctx.store.reader() as tx:
        server = args.get("Server") or ctx.server_name
        connectors = tx.list(ReceiveConnector, server)
    local_ip, port = args["LocalEndPoint"]
    remote = args["RemoteIPAddress"]
    chosen = select_connector(connectors, local_ip, port, remote)
    if chosen is None:
        return [Record("ConnectorSelection", {"RemoteIPAddress": str(remote), "LocalEndPoint": f"{local_ip}:{port}",
                                              "ReceiveConnector": None, "Accepted": False,
                                              "Detail": "No receive connector matches: the connection is refused "
                                                        "with 554 5.7.1."})]
    anonymous = R.effective_rights(chosen, R.session_principals(authenticated_as=None,
                                                                externally_secured=AuthMechanism.ExternalAuthoritative
                                                                in chosen.auth_mechanism))
    authenticated = R.effective_rights(chosen, R.session_principals(authenticated_as="user"))
    matched = [str(r) for r in chosen.remote_ip_ranges if r.contains(remote)]
    am = chosen.auth_mechanism
    return [Record("ConnectorSelection", {
        "RemoteIPAddress": str(remote), "LocalEndPoint": f"{local_ip}:{port}", "ReceiveConnector": chosen.identity,
        "Accepted": True, "MatchedRemoteIPRange": min(matched, key=lambda r: IPRange.parse(r).size),
        "PermissionGroups": chosen.permission_groups, "AuthMechanism": am, "RequireTLS": chosen.require_tls,
        "TlsOffered": AuthMechanism.Tls in am,
        "BasicAuthOffered": "AfterStartTls" if AuthMechanism.BasicAuthRequireTLS in am else
        ("Yes" if AuthMechanism.BasicAuth in am else "No"),
        "AnonymousRights": R.right_names(anonymous), "AuthenticatedRights": R.right_names(authenticated),
        "AnonymousCanSubmit": R.Right.Submit in anonymous,
        "AnonymousCanRelay": R.Right.Submit in anonymous and R.Right.AcceptAnyRecipient in anonymous,
        "AuthenticatedCanRelay": AuthMechanism.BasicAuth in am and R.Right.Submit in authenticated
        and R.Right.AcceptAnyRecipient in authenticated,
    })]
