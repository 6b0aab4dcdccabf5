"""Get/Set-TransportService (per server), Get/Set-TransportConfig (organisation),
and Add/Get/Remove-ADPermission on receive connectors."""

from __future__ import annotations

import re
from typing import Any, Callable

from mailgate.config.model import (EXCHANGE_RECIPIENT_LOCAL_PART, AcceptedDomain, ADPermissionEntry, Mailbox,
                                   OrganizationConfig, ProtocolLoggingLevel, ReceiveConnector, SendConnector,
                                   TransportConfig, TransportServer)
from mailgate.config.values import PermissionGroups, is_domain, normalise_domain, parse_log_path
from mailgate.errors import InvalidValueError, UserError
from mailgate.home import DEFAULT_LOG_DIRS, LOG_PATH_FIELDS, SERVICE_DIR_FIELDS
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.objects import apply_changes, field_params, find_one
from mailgate.manage.params import as_list, multi_valued, smtp_address, to_str, to_str_list
from mailgate.manage.present import Record, present
from mailgate.manage.receive_connectors import resolve as resolve_receive_connector
from mailgate.receive import rights as R

# ---------------------------------------------------------------------------
# Transport service


def _dns_server(value: Any) -> str:
    import ipaddress

    text = to_str(value).strip()
    try:
        ipaddress.ip_address(text.split("#")[0])
    except ValueError:
        raise ValueError(f'"{text}" is not an IP address of a DNS server (an optional port follows "#", '
                         "for example 127.0.0.53#5353)") from None
    if "#" in text and not text.split("#", 1)[1].isdigit():
        raise ValueError(f'"{text}": the port after "#" must be a number')
    return text


_SERVICE_PARAMS = field_params(TransportServer, exclude={"name", "fqdn", "server_role", "admin_display_version",
                                                         "external_dns_servers", "internal_dns_servers",
                                                         "admin_api_url", "component_states",
                                                         *LOG_PATH_FIELDS.values(),
                                                         *SERVICE_DIR_FIELDS.values()})
_LOG_PATH_PARAMS = [Param(name, convert=parse_log_path, type_name="LocalLongFullPath",
                          help='A full path; "" for the data directory\'s logs/; $null turns the log off.')
                    for name in LOG_PATH_FIELDS]
_SERVICE_DIR_PARAMS = [Param(name, convert=parse_log_path, type_name="LocalLongFullPath",
                             help='A full path; "" for the data directory\'s own; $null turns it off.')
                       for name in SERVICE_DIR_FIELDS]
_DNS_PARAMS = [Param(n, convert=multi_valued(_dns_server), multi=True, type_name="MultiValuedProperty",
                     help="DNS servers as IP or IP#port.") for n in ("ExternalDNSServers", "InternalDNSServers")]


# Settings of Exchange's transport service that mailgate keeps but does not act on (say so when they are set).
NOT_ENFORCED_WHY = {
    "MaxConnectionRatePerMinute": "limit connections per receive connector (MaxInboundConnection, "
                                  "MaxInboundConnectionPerSource) instead.",
    "ExternalDNSAdapterEnabled": "lookups use ExternalDNSServers (for send connectors with "
                                 "UseExternalDNSServersEnabled) or InternalDNSServers when set, else the system's "
                                 "resolver.",
}
NOT_ENFORCED = frozenset(NOT_ENFORCED_WHY)


def resolve_server(ctx: ManagementContext, tx: Any, identity: Any) -> TransportServer:
    if identity is None:
        return ctx.local_server(tx)
    return find_one(tx, TransportServer, identity, kind_text="transport servers",
                    match=lambda o, k: k in (o.name.lower(), o.fqdn.lower()))


@cmdlet("Get-TransportService", [Param("Identity", position=0, from_pipeline=True)],
        synopsis="Show transport server settings.", default_view="TransportServer")
def get_transport_service(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the transport settings of each server (retry, expiry, DNS, logs)."""
    with ctx.store.reader() as tx:
        items = tx.list(TransportServer) if args.get("Identity") is None else [resolve_server(ctx, tx, args["Identity"])]
    records = [present(s) for s in items]
    for server, record in zip(items, records):
        if server.name.lower() == ctx.home.server.lower():   # another server's data directory isn't known here
            for setting in DEFAULT_LOG_DIRS:
                path = ctx.home.log_path(record[setting], setting)
                record.set(setting, None if path is None else str(path))
            for setting in SERVICE_DIR_FIELDS:
                path = ctx.home.service_dir(record[setting], setting)
                record.set(setting, None if path is None else str(path))
    return records


@cmdlet("Get-ExchangeServer", [Param("Identity", position=0, from_pipeline=True)],
        synopsis="List the servers of the organisation.", default_view="ExchangeServer")
def get_exchange_server(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The servers of the organisation as Exchange lists them (each is a mailgate transport server)."""
    with ctx.store.reader() as tx:
        items = tx.list(TransportServer) if args.get("Identity") is None else [resolve_server(ctx, tx, args["Identity"])]
    return [Record("ExchangeServer", {
        "Name": s.name, "Site": "Default-First-Site-Name", "ServerRole": s.server_role, "Edition": "Standard",
        "AdminDisplayVersion": s.admin_display_version, "Fqdn": s.fqdn, "Domain": s.fqdn.partition(".")[2],
        "IsMemberOfCluster": "No", "Identity": s.name}) for s in items]


# Server component states (maintenance mode). mailgate's server has these three of Exchange's components.
SERVER_COMPONENTS = ("ServerWideOffline", "HubTransport", "FrontendTransport")
_DRAINABLE = ("HubTransport", "FrontendTransport")
_REQUESTERS = ("HealthAPI", "Maintenance", "Sidelined", "Functional", "Deployment")
_STATES = ("Active", "Inactive", "Draining")


def _one_of(choices: tuple[str, ...], what: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = to_str(value).strip()
        match = next((c for c in choices if c.lower() == text.lower()), None)
        if match is None:
            raise ValueError(f'"{text}" is not a {what} of this server; use one of: {", ".join(choices)}')
        return match
    return convert


@cmdlet("Get-ServerComponentState", [Param("Identity", position=0, from_pipeline=True),
                                     Param("Component", convert=_one_of(SERVER_COMPONENTS, "component"))],
        synopsis="Show whether a server takes mail (maintenance mode).", default_view="ServerComponentState",
        examples=["Get-ServerComponentState EX01", "Get-ServerComponentState EX01 -Component HubTransport"])
def get_server_component_state(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """The state of each component of the server (default: this one): Active unless a requester set it
    Inactive or Draining (the strongest of the requesters' states counts)."""
    with ctx.store.reader() as tx:
        server = resolve_server(ctx, tx, args.get("Identity"))
    components = [args["Component"]] if args.get("Component") else list(SERVER_COMPONENTS)
    return [Record("ServerComponentState", {"Server": server.fqdn, "Component": c, "State": server.component_state(c),
                                            "Identity": f"{server.name}\\{c}"}) for c in components]


@cmdlet("Set-ServerComponentState", [Param("Identity", position=0, mandatory=True, from_pipeline=True),
                                     Param("Component", mandatory=True,
                                           convert=_one_of(SERVER_COMPONENTS, "component")),
                                     Param("State", mandatory=True, convert=_one_of(_STATES, "state"),
                                           type_name="ServiceState"),
                                     Param("Requester", mandatory=True, convert=_one_of(_REQUESTERS, "requester"),
                                           type_name="ServerComponentRequest")],
        synopsis="Put a server in or out of maintenance: it stops or starts taking mail.", mutates=True,
        examples=["Set-ServerComponentState EX01 -Component HubTransport -State Draining -Requester Maintenance",
                  "Set-ServerComponentState EX01 -Component HubTransport -State Active -Requester Maintenance"])
def set_server_component_state(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """HubTransport or FrontendTransport Draining (or Inactive), or ServerWideOffline Inactive: the server's
    receive connectors answer new connections 421 4.3.2 within a second or two and its Pickup and Replay files
    wait; sessions under way finish, and queued mail is still delivered (Redirect-Message hands it to another server). Each requester's state is
    kept; the component is Active again when no requester holds it Inactive or Draining."""
    component, state, requester = args["Component"], args["State"], args["Requester"]
    if state == "Draining" and component not in _DRAINABLE:
        raise InvalidValueError(f"Only {' and '.join(_DRAINABLE)} can be Draining; {component} is Active or "
                                "Inactive.", parameter="State")
    with ctx.store.transaction() as tx:
        server = resolve_server(ctx, tx, args["Identity"])
        if not ctx.should_process(f"Setting {component} of {server.name} to {state} for {requester}."):
            return []
        states = {k: dict(v) for k, v in server.component_states.items()}
        states.setdefault(component, {})[requester] = state
        server.component_states = states
        tx.put(server)
    return []


@cmdlet("Set-TransportService", [Param("Identity", position=0, from_pipeline=True), *_SERVICE_PARAMS, *_LOG_PATH_PARAMS,
                                 *_SERVICE_DIR_PARAMS, *_DNS_PARAMS],
        synopsis="Change transport server settings.", mutates=True,
        examples=["Set-TransportService EX01 -TransientFailureRetryInterval 00:00:10 -MessageRetryInterval 00:00:10",
                  "Set-TransportService EX01 -ExternalDNSServers 127.0.0.53"])
def set_transport_service(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change the transport settings of a server (default: this server)."""
    with ctx.store.transaction() as tx:
        server = resolve_server(ctx, tx, args.get("Identity"))
        changes = {k: v for k, v in args.items() if k not in ("Identity", "WhatIf", "Confirm", "DomainController")}
        updated = apply_changes(server, changes)
        if updated.delay_notification_timeout.seconds <= (updated.transient_failure_retry_count
                                                          * updated.transient_failure_retry_interval.seconds):
            ctx.warn("DelayNotificationTimeout is not greater than TransientFailureRetryCount × "
                     "TransientFailureRetryInterval: delay notifications may go out before the quick retries end.")
        for warning in _logs_turned_off(tx, server, updated):
            ctx.warn(warning)
        for name in NOT_ENFORCED & set(changes):
            ctx.warn(f"{name} is stored for compatibility with Exchange, but mailgate doesn't apply it: "
                     f"{NOT_ENFORCED_WHY[name]}")
        if not ctx.should_process(f'Setting transport service "{server.name}".'):
            return []
        tx.put(updated)
    return []


def _logs_turned_off(tx: Any, before: TransportServer, after: TransportServer) -> list[str]:
    """Exchange's word on a log path set to $null: it turns that log off, and connectors that still ask for
    protocol logging write event log errors instead. Here: a warning that names what goes unlogged."""
    warnings = []
    if before.message_tracking_log_path is not None and after.message_tracking_log_path is None \
            and after.message_tracking_log_enabled:
        warnings.append(f"MessageTrackingLogPath is $null: message tracking on {after.name} is off although "
                        "MessageTrackingLogEnabled is $true. The preferred way to turn it off is "
                        "-MessageTrackingLogEnabled $false.")
    server = after.name.lower()
    verbose_receive = [c.name for c in tx.list(ReceiveConnector)
                       if c.server.lower() == server and c.protocol_logging_level is ProtocolLoggingLevel.Verbose]
    verbose_send = [c.name for c in tx.list(SendConnector)
                    if c.protocol_logging_level is ProtocolLoggingLevel.Verbose
                    and (not c.source_transport_servers or server in (s.lower() for s in c.source_transport_servers))]
    if after.intra_org_connector_protocol_logging_level is ProtocolLoggingLevel.Verbose:
        verbose_send.append("the intra-organization send connector")
    for setting, connectors, fix in (
            ("ReceiveProtocolLogPath", verbose_receive, "Set-ReceiveConnector -ProtocolLoggingLevel None"),
            ("SendProtocolLogPath", verbose_send, "Set-SendConnector -ProtocolLoggingLevel None")):
        field = LOG_PATH_FIELDS[setting]
        if getattr(before, field) is not None and getattr(after, field) is None and connectors:
            warnings.append(f"{setting} is $null: nothing is logged for {', '.join(connectors)} although "
                            f"ProtocolLoggingLevel is Verbose. The preferred way to turn protocol logging off is "
                            f"{fix}.")
    return warnings


def _deprecated(old: str, new: str, handler: Callable[[ManagementContext, dict[str, Any]], list[Any]]) -> Any:
    """Exchange 2010's name of a cmdlet, which Exchange 2013 and later still run with a warning."""
    def run(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
        ctx.warn(f"The {old} cmdlet will be removed in a future version of Exchange. Use the {new} cmdlet instead.")
        return handler(ctx, args)
    return run


cmdlet("Get-TransportServer", [Param("Identity", position=0, from_pipeline=True)],
       synopsis="Exchange 2010's name of Get-TransportService (deprecated).", default_view="TransportServer")(
    _deprecated("Get-TransportServer", "Get-TransportService", get_transport_service))
cmdlet("Set-TransportServer", [Param("Identity", position=0, from_pipeline=True), *_SERVICE_PARAMS, *_LOG_PATH_PARAMS,
                               *_DNS_PARAMS],
       synopsis="Exchange 2010's name of Set-TransportService (deprecated).", mutates=True)(
    _deprecated("Set-TransportServer", "Set-TransportService", set_transport_service))


# Exchange 2013+ runs a Front End Transport service beside the Transport service, with its own cmdlets for its
# own settings. mailgate has one service per server: these cmdlets show and change that service's settings
# which Exchange's Front End Transport service also has.
FRONTEND_SETTINGS = ("ReceiveProtocolLogPath", "ReceiveProtocolLogMaxAge", "ReceiveProtocolLogMaxDirectorySize",
                     "ReceiveProtocolLogMaxFileSize", "SendProtocolLogPath", "SendProtocolLogMaxAge",
                     "SendProtocolLogMaxDirectorySize", "SendProtocolLogMaxFileSize",
                     "IntraOrgConnectorProtocolLoggingLevel", "ExternalDNSServers", "InternalDNSServers",
                     "ExternalDNSAdapterEnabled", "MaxConnectionRatePerMinute", "TransientFailureRetryCount",
                     "TransientFailureRetryInterval")
_FRONTEND_PARAMS = [p for p in (*_SERVICE_PARAMS, *_LOG_PATH_PARAMS, *_DNS_PARAMS) if p.name in FRONTEND_SETTINGS]


@cmdlet("Get-FrontendTransportService", [Param("Identity", position=0, from_pipeline=True)],
        synopsis="Show the Front End Transport settings of each server.", default_view="FrontendTransportServer")
def get_frontend_transport_service(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the settings Exchange's Front End Transport service has (protocol logs, DNS, retries)."""
    shown = ("Name", *FRONTEND_SETTINGS, "Identity", "Guid", "WhenChanged", "WhenCreated", "IsValid")
    return [Record("FrontendTransportServer", {k: r.get(k) for k in shown if r.has(k)})
            for r in get_transport_service(ctx, args)]


@cmdlet("Set-FrontendTransportService", [Param("Identity", position=0, from_pipeline=True), *_FRONTEND_PARAMS],
        synopsis="Change the Front End Transport settings of a server.", mutates=True,
        examples=["Set-FrontendTransportService EX01 -ReceiveProtocolLogMaxAge 7.00:00:00"])
def set_frontend_transport_service(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change the settings Exchange's Front End Transport service has; mailgate's one transport service uses
    them for every connector of the server."""
    return set_transport_service(ctx, args)


# ---------------------------------------------------------------------------
# Transport config (organisation)


def _secure_domain(value: Any) -> str:
    text = normalise_domain(to_str(value))
    if "*" in text or not is_domain(text):
        raise ValueError(f'"{value}" is not a valid domain for domain security (no wildcards)')
    return text


def _dsn_code(value: Any) -> str:
    text = to_str(value).strip()
    if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", text):
        raise ValueError(f'"{text}" is not an enhanced status code (class.subject.detail, for example 5.4.4)')
    return text


def _postmaster_address(value: Any) -> str | None:
    """The NDRs' From: address; $null means postmaster@ the default accepted domain."""
    return None if value is None else smtp_address(value)


_CHECKED_LISTS = {"TLSSendDomainSecureList": multi_valued(_secure_domain),
                  "TLSReceiveDomainSecureList": multi_valued(_secure_domain),
                  "GenerateCopyOfDSNFor": multi_valued(_dsn_code)}
_CHECKED_VALUES = {"ExternalPostmasterAddress": Param("ExternalPostmasterAddress", convert=_postmaster_address,
                                                      type_name="SmtpAddress")}
_CONFIG_PARAMS = [_CHECKED_VALUES.get(p.name, p) for p in field_params(TransportConfig, exclude={"name"})
                  if p.name not in _CHECKED_LISTS]
_CONFIG_PARAMS += [Param(n, convert=convert, multi=True, type_name="MultiValuedProperty")
                   for n, convert in _CHECKED_LISTS.items()]


@cmdlet("Get-TransportConfig", [], synopsis="Show organisation-wide transport settings.", default_view="TransportConfig")
def get_transport_config(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the organisation-wide transport settings."""
    return [present(ctx.transport_config())]


@cmdlet("Set-TransportConfig", _CONFIG_PARAMS, synopsis="Change organisation-wide transport settings.", mutates=True,
        examples=["Set-TransportConfig -TLSSendDomainSecureList contoso.com -TLSReceiveDomainSecureList contoso.com"])
def set_transport_config(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change organisation-wide settings: domain security lists, DSN options, limits."""
    with ctx.store.transaction() as tx:
        current = ctx.transport_config(tx)
        changes = {k: v for k, v in args.items() if k not in ("WhatIf", "Confirm", "DomainController")}
        updated = apply_changes(current, changes)
        if not ctx.should_process("Setting the organisation's transport configuration."):
            return []
        tx.put(updated)
    return []


# ---------------------------------------------------------------------------
# Organisation config: the Microsoft Exchange recipient, which receives the copies of NDRs (GenerateCopyOfDSNFor)

def _organization_config(tx: Any) -> OrganizationConfig:
    return tx.get(OrganizationConfig, "organization config") or OrganizationConfig()


@cmdlet("Get-OrganizationConfig", [], synopsis="Show the organisation's settings (the Microsoft Exchange recipient).",
        default_view="OrganizationConfig")
def get_organization_config(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Show the organisation's settings that transport uses: where the Microsoft Exchange recipient's mail goes."""
    with ctx.store.reader() as tx:
        config = _organization_config(tx)
        domain = next((d.domain_name for d in tx.list(AcceptedDomain) if d.default), None)
    record = present(config)
    address = f"{EXCHANGE_RECIPIENT_LOCAL_PART}@{domain}" if domain else None
    record.set("MicrosoftExchangeRecipientEmailAddresses", [f"SMTP:{address}"] if address else [])
    record.set("MicrosoftExchangeRecipientPrimarySmtpAddress", address)
    return [record]


def _reply_recipient(value: Any) -> str | None:
    return None if value is None else to_str(value)


@cmdlet("Set-OrganizationConfig",
        [Param("MicrosoftExchangeRecipientReplyRecipient", convert=_reply_recipient, type_name="RecipientIdParameter",
               help="The mailbox that receives copies of NDRs (GenerateCopyOfDSNFor); $null discards them.")],
        synopsis="Change the organisation's settings.", mutates=True,
        examples=['Set-OrganizationConfig -MicrosoftExchangeRecipientReplyRecipient "NDR Monitor"'])
def set_organization_config(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Choose the mailbox that receives what is sent to the Microsoft Exchange recipient (copies of NDRs)."""
    from mailgate.manage.domains_mailboxes import resolve_mailbox

    with ctx.store.transaction() as tx:
        current = _organization_config(tx)
        changes = {}
        if "MicrosoftExchangeRecipientReplyRecipient" in args:
            identity = args["MicrosoftExchangeRecipientReplyRecipient"]
            changes["MicrosoftExchangeRecipientReplyRecipient"] = \
                None if identity is None else resolve_mailbox(tx, identity).name
        updated = apply_changes(current, changes)
        if not ctx.should_process("Setting the organisation's configuration."):
            return []
        tx.put(updated)
    return []


# ---------------------------------------------------------------------------
# AD permissions on receive connectors


def _rights(value: Any) -> list[str]:
    out = []
    for item in as_list(value):
        for part in to_str(item).split(","):
            if part.strip():
                out.append(R.canonical_right(part))
    if not out:
        raise ValueError("at least one extended right is required")
    return out


def _principal(ctx: ManagementContext, tx: Any, name: str) -> str:
    canonical = R.canonical_principal(name)
    if canonical in R.WELL_KNOWN_PRINCIPALS:
        return canonical
    key = name.lower().split("\\")[-1]
    for mailbox in tx.list(Mailbox):
        if key in (mailbox.name.lower(), mailbox.alias.lower()) or key in mailbox.addresses():
            return mailbox.primary_smtp_address
    raise InvalidValueError(f"The user '{name}' isn't a known principal: use a mailbox (name, alias or address) or "
                            "one of " + ", ".join(f'"{p}"' for p in R.WELL_KNOWN_PRINCIPALS) + ".", parameter="User")


_PERMISSION_PARAMS = [
    Param("Identity", mandatory=True, position=0, from_pipeline=True, help="The receive connector."),
    Param("User", convert=to_str, mandatory=True, help='A principal, e.g. "NT AUTHORITY\\ANONYMOUS LOGON", or a mailbox.'),
    Param("ExtendedRights", convert=_rights, mandatory=True, multi=True, type_name="ExtendedRightIdParameter[]"),
    Param("AccessRights", convert=to_str_list, help="Accepted for compatibility (ExtendedRight)."),
    Param("Deny", switch=True),
]


@cmdlet("Add-ADPermission", _PERMISSION_PARAMS, synopsis="Grant rights on a receive connector.", mutates=True,
        examples=['Get-ReceiveConnector "InternalRelay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                  '-ExtendedRights "ms-Exch-SMTP-Accept-Any-Recipient"'])
def add_ad_permission(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Grant (or with -Deny, deny) extended rights to a principal on a receive connector."""
    with ctx.store.transaction() as tx:
        connector = resolve_receive_connector(ctx, tx, args["Identity"])
        user = _principal(ctx, tx, args["User"])
        deny = bool(args.get("Deny"))
        entries = list(connector.ad_permissions)
        for entry in entries:
            if entry.user.lower() == user.lower() and entry.deny == deny:
                entry.extended_rights = list(dict.fromkeys(entry.extended_rights + args["ExtendedRights"]))
                break
        else:
            entries.append(ADPermissionEntry(user=user, extended_rights=args["ExtendedRights"], deny=deny))
        updated = apply_changes(connector, {"ADPermissions": entries,
                                            "PermissionGroups": connector.permission_groups | PermissionGroups.Custom})
        if not ctx.should_process(f'Adding Active Directory permission "{", ".join(args["ExtendedRights"])}" for '
                                  f'"{user}" on "{connector.identity}".'):
            return []
        tx.put(updated)
        granted = list(args["ExtendedRights"])
    if not deny and "ms-Exch-SMTP-Accept-Any-Recipient" in granted and user == R.ANONYMOUS:
        ranges = ", ".join(map(str, connector.remote_ip_ranges))
        ctx.warn(f'Receive connector "{connector.identity}" now relays for anonymous clients from {ranges}. Keep '
                 "RemoteIPRanges as small as possible.")
    return [_permission_record(connector.identity, user, r, deny, False) for r in granted]


@cmdlet("Remove-ADPermission", _PERMISSION_PARAMS, synopsis="Remove rights granted on a receive connector.", mutates=True)
def remove_ad_permission(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Remove extended rights added with Add-ADPermission."""
    with ctx.store.transaction() as tx:
        connector = resolve_receive_connector(ctx, tx, args["Identity"])
        user = _principal(ctx, tx, args["User"])
        deny = bool(args.get("Deny"))
        entries, removed = [], False
        for entry in connector.ad_permissions:
            if entry.user.lower() == user.lower() and entry.deny == deny:
                left = [r for r in entry.extended_rights if r not in args["ExtendedRights"]]
                removed = removed or len(left) != len(entry.extended_rights)
                if left:
                    entries.append(ADPermissionEntry(user=entry.user, extended_rights=left, deny=deny))
            else:
                entries.append(entry)
        if not removed:
            raise UserError(f'No such permission: "{user}" has no explicit {", ".join(args["ExtendedRights"])} entry on '
                            f'"{connector.identity}". Rights that come from PermissionGroups are removed with '
                            "Set-ReceiveConnector -PermissionGroups.", parameter="ExtendedRights")
        groups = connector.permission_groups
        if not entries:
            groups &= ~PermissionGroups.Custom
        updated = apply_changes(connector, {"ADPermissions": entries, "PermissionGroups": groups})
        if not ctx.should_process(f'Removing Active Directory permission for "{user}" on "{connector.identity}".'):
            return []
        tx.put(updated)
    return []


def _permission_record(identity: str, user: str, right: str, deny: bool, inherited: bool) -> Record:
    return Record("ADPermission", {"Identity": identity, "User": user, "Deny": deny, "Inherited": inherited,
                                   "Rights": "ExtendedRight", "ExtendedRights": [right], "AccessRights": ["ExtendedRight"],
                                   "IsInherited": inherited})


@cmdlet("Get-ADPermission", [Param("Identity", mandatory=True, position=0, from_pipeline=True),
                             Param("User", convert=to_str)],
        synopsis="List the rights on a receive connector.", default_view="ADPermission",
        examples=['Get-ADPermission "InternalRelay" | ft User,ExtendedRights'])
def get_ad_permission(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List every right on a receive connector, one row per principal and right."""
    with ctx.store.reader() as tx:
        connector = resolve_receive_connector(ctx, tx, args["Identity"])
    wanted = args.get("User")
    out = []
    for principal, rights, deny in R.grants(connector):
        if wanted and principal.lower() != R.canonical_principal(wanted).lower():
            continue
        for name in R.right_names(rights):
            out.append(_permission_record(connector.identity, principal, name, deny, False))
    return out
