"""Get/New/Set/Remove-ReceiveConnector, with Exchange's usage templates and binding rules."""

from __future__ import annotations

from typing import Any

from mailgate.config.model import ReceiveConnector, TransportServer
from mailgate.config.store import ConfigTransaction
from mailgate.config.values import (
    ALL_IPV4,
    ALL_IPV6,
    AuthMechanism,
    IPBinding,
    IPRange,
    PermissionGroups,
    ReceiveUsage,
    TransportRole,
    parse_ip,
)
from mailgate.errors import ConflictError, ParameterError
from mailgate.home import admin_address
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.objects import apply_changes, field_params, find, find_one, validate
from mailgate.manage.params import enum_converter, to_str
from mailgate.manage.present import present
from mailgate.manage.psvalues import wildcard_match

KIND = "Receive connectors"

# Usage → (PermissionGroups, AuthMechanism, default bindings or None when -Bindings is required,
#          default RemoteIPRanges or None when required). Reference §1.3.
USAGE_TEMPLATES: dict[ReceiveUsage, tuple[PermissionGroups, AuthMechanism, list[str] | None, list[IPRange] | None]] = {
    ReceiveUsage.Client: (PermissionGroups.ExchangeUsers,
                          AuthMechanism.Tls | AuthMechanism.BasicAuth | AuthMechanism.BasicAuthRequireTLS | AuthMechanism.Integrated,
                          ["[::]:587", "0.0.0.0:587"], None),
    ReceiveUsage.Custom: (PermissionGroups(0), AuthMechanism.Tls, None, None),
    ReceiveUsage.Internal: (PermissionGroups.ExchangeLegacyServers | PermissionGroups.ExchangeServers,
                            AuthMechanism.Tls | AuthMechanism.ExchangeServer, ["0.0.0.0:25"], None),
    ReceiveUsage.Internet: (PermissionGroups.AnonymousUsers, AuthMechanism.Tls, None, [ALL_IPV6, ALL_IPV4]),
    ReceiveUsage.Partner: (PermissionGroups.Partners, AuthMechanism.Tls, None, None),
}

# Parameters New- and Set- share: every field of the model but those handled separately.
_FIELD_PARAMS = field_params(ReceiveConnector, exclude={"name", "server", "ad_permissions"})
_BY_NAME = {p.name.lower(): p for p in _FIELD_PARAMS}


def _usage_param() -> list[Param]:
    return [Param("Usage", convert=enum_converter(ReceiveUsage), type_name="UsageType", sets=("Usage",))] + [
        Param(u.value, switch=True, type_name="SwitchParameter", sets=(u.value,)) for u in ReceiveUsage
    ]


def chosen_usage(args: dict[str, Any], usage_enum: Any = ReceiveUsage) -> Any:
    """The usage named by -Usage and/or a usage switch; a duplicate that agrees is accepted."""
    named = [usage_enum.parse(u.value) for u in usage_enum if args.get(u.value)]
    if args.get("Usage") is not None:
        named.append(args["Usage"])
    distinct = list(dict.fromkeys(named))
    if len(distinct) > 1:
        raise ParameterError("Parameter set cannot be resolved using the specified named parameters: the usage is "
                             f"given as both {distinct[0]} and {distinct[1]}; specify one usage.", parameter="Usage")
    return distinct[0] if distinct else None


def check_binding_conflicts(tx: ConfigTransaction, connector: ReceiveConnector) -> None:
    """Exchange's rules for connectors of one server that share bindings (reference §1.8)."""
    for other in tx.list(ReceiveConnector, connector.server):
        if other.guid == connector.guid:
            continue
        for mine in connector.bindings:
            for theirs in other.bindings:
                if not mine.collides_with(theirs):
                    continue
                if other.transport_role != connector.transport_role:
                    raise ConflictError(
                        f'The values that you specified for the Bindings and RemoteIPRanges parameters conflict with '
                        f'the settings on Receive connector "{other.identity}". Receive connectors assigned to '
                        f"different Transport roles on a single server must listen on unique local IP address & "
                        f"port bindings.", parameter="Bindings", exception_name="ReceiveConnectorRoleConflictException")
                identical = mine == theirs
                for r1 in connector.remote_ip_ranges:
                    for r2 in other.remote_ip_ranges:
                        if not r1.overlaps(r2):
                            continue
                        equal = r1 == r2
                        partial = not (r1.contains_range(r2) or r2.contains_range(r1))
                        if (identical and (equal or partial)) or (not identical and partial):
                            raise ConflictError(
                                f'The values that you specified for the Bindings and RemoteIPRanges parameters '
                                f'conflict with the settings on Receive connector "{other.identity}". A Receive '
                                f"connector must have a unique combination of a local IP address & port bindings and "
                                f"remote IP address ranges (binding {mine} with remote range {r1} against {theirs} "
                                f"with {r2}). Change at least one of these values.", parameter="RemoteIPRanges")


def check_admin_listener(ctx: ManagementContext, connector: ReceiveConnector) -> None:
    """A connector of this server may not take the address of its REST API and admin center ([admin] listen in
    mailgate.toml): whichever bound first would have it, and after a restart the administrator could lose the
    admin center to a connector (or the connector to it)."""
    listen = getattr(ctx.home, "admin_listen", "off") or "off"
    if listen == "off" or connector.server.lower() != ctx.server_name.lower():
        return
    try:
        host, port = admin_address(listen)
        admin = IPBinding(parse_ip(host), port)
    except ValueError:   # not IP:port (a host name; or bad, and the API refuses to start with it and says so)
        return
    for binding in connector.bindings:
        if binding.collides_with(admin):
            raise ConflictError(f"The binding {binding} of Receive connector \"{connector.identity}\" takes the address "
                                f"of this server's REST API and admin center ({listen}, [admin] listen in "
                                "mailgate.toml). Choose another port, or move the admin center first.",
                                parameter="Bindings")


def _check_unique_name(tx: ConfigTransaction, connector: ReceiveConnector) -> None:
    for other in tx.list(ReceiveConnector, connector.server):
        if other.guid != connector.guid and other.name.lower() == connector.name.lower():
            raise ConflictError(f'A Receive connector named "{connector.name}" already exists on server '
                                f'"{connector.server}".', parameter="Name", exception_name="ADObjectAlreadyExistsException")


def _match(obj: ReceiveConnector, key: str) -> bool:
    return obj.name.lower() == key or wildcard_match(key, obj.name) or wildcard_match(key, obj.identity)


def resolve(ctx: ManagementContext, tx: ConfigTransaction, identity: Any) -> ReceiveConnector:
    found = find(tx, ReceiveConnector, identity, match=_match)
    if len(found) > 1:
        local = [c for c in found if c.server.lower() == ctx.server_name.lower()]
        if len(local) == 1:
            return local[0]
    return find_one(tx, ReceiveConnector, identity, kind_text=KIND, match=_match)


def _server(ctx: ManagementContext, tx: ConfigTransaction, name: str | None) -> TransportServer:
    if not name:
        return ctx.local_server(tx)
    for server in tx.list(TransportServer):
        if name.lower() in (server.name.lower(), server.fqdn.lower()):
            return server
    return ctx.transport_server(name, tx)


@cmdlet("Get-ReceiveConnector",
        [Param("Identity", position=0, from_pipeline=True, help="Server\\Name, Name or Guid; wildcards allowed."),
         Param("Server", convert=to_str, help="List the connectors of this server.")],
        synopsis="List receive connectors.", default_view="ReceiveConnector",
        examples=["Get-ReceiveConnector | ft Name,Bindings,RemoteIPRanges",
                  'Get-ReceiveConnector "Default Frontend EX01" | fl'])
def get_receive_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List the receive connectors of the organisation, or those matching Identity."""
    with ctx.store.reader() as tx:
        if args.get("Identity") is not None:
            ident = args["Identity"]
            if isinstance(ident, str) and any(ch in ident for ch in "*?"):
                items = [c for c in tx.list(ReceiveConnector) if _match(c, ident.lower())]
            else:
                items = [resolve(ctx, tx, ident)]
        else:
            items = tx.list(ReceiveConnector, args.get("Server"))
            if args.get("Server") and not items:
                _server(ctx, tx, args["Server"])  # a clear error for an unknown server
    return [present(c) for c in items]


@cmdlet("New-ReceiveConnector",
        [Param("Name", convert=to_str, mandatory=True, position=0, help="Unique name on the server, at most 64 characters."),
         Param("Server", convert=to_str, help="The server that hosts the connector (default: this server)."),
         *_usage_param(), *_FIELD_PARAMS],
        synopsis="Create a receive connector.", mutates=True, default_view="ReceiveConnector",
        examples=['New-ReceiveConnector -Name "InternalRelay" -Server EX01 -Bindings 0.0.0.0:25 '
                  "-RemoteIPRanges 192.168.0.0/24 -Usage Custom -PermissionGroups AnonymousUsers"])
def new_receive_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Create a receive connector from a usage template (Client, Custom, Internal, Internet, Partner)."""
    usage = chosen_usage(args)
    if usage is None:
        raise ParameterError("Parameter set cannot be resolved: specify the usage with -Usage or one of the switches "
                             "-Client, -Custom, -Internal, -Internet, -Partner.", parameter="Usage")
    groups, auth, default_bindings, fixed_ranges = USAGE_TEMPLATES[usage]
    has_bindings = args.get("Bindings") is not None
    has_ranges = args.get("RemoteIPRanges") is not None
    if default_bindings is not None and has_bindings and usage in (ReceiveUsage.Client, ReceiveUsage.Internal):
        raise ParameterError(f"The Bindings parameter can't be used with the {usage} usage type; it binds to "
                             f"{', '.join(default_bindings)}. Change the bindings afterwards with Set-ReceiveConnector.",
                             parameter="Bindings")
    if default_bindings is None and not has_bindings:
        raise ParameterError(f"The Bindings parameter is required for the {usage} usage type.", parameter="Bindings")
    if fixed_ranges is not None and has_ranges:
        raise ParameterError(f"The RemoteIPRanges parameter can't be used with the {usage} usage type; it accepts "
                             "connections from all addresses.", parameter="RemoteIPRanges")
    if fixed_ranges is None and not has_ranges:
        raise ParameterError(f"The RemoteIPRanges parameter is required for the {usage} usage type.",
                             parameter="RemoteIPRanges")
    with ctx.store.transaction() as tx:
        server = _server(ctx, tx, args.get("Server"))
        data: dict[str, Any] = {
            "name": args["Name"], "server": server.name, "fqdn": server.fqdn,
            "permission_groups": groups, "auth_mechanism": auth,
            "bindings": default_bindings or [], "remote_ip_ranges": fixed_ranges or [],
            "transport_role": TransportRole.FrontendTransport,
        }
        base = ReceiveConnector.model_construct(**data)
        changes = {k: v for k, v in args.items() if k.lower() in _BY_NAME and v is not None}
        if "Bindings" in changes and isinstance(changes["Bindings"], list):
            changes["Bindings"] = _dedupe(changes["Bindings"])
        connector = apply_changes(base, changes)
        _check_unique_name(tx, connector)
        check_binding_conflicts(tx, connector)
        check_admin_listener(ctx, connector)
        if AuthMechanism.BasicAuth in connector.auth_mechanism and AuthMechanism.BasicAuthRequireTLS not in connector.auth_mechanism:
            ctx.warn(f'Receive connector "{connector.identity}" offers BasicAuth without requiring TLS: passwords '
                     "can cross the network in clear text. Add BasicAuthRequireTLS to AuthMechanism.")
        if not ctx.should_process(f'Creating Receive connector "{connector.identity}" with bindings '
                                  f'{{{", ".join(map(str, connector.bindings))}}}.'):
            return []
        tx.put(connector)
    if not connector.permission_groups:
        ctx.warn(f'Receive connector "{connector.identity}" has no permission groups, so it accepts no mail. '
                 "Add some with Set-ReceiveConnector -PermissionGroups.")
    return [present(connector)]


def _dedupe(items: list[IPBinding]) -> list[IPBinding]:
    return list(dict.fromkeys(items))


@cmdlet("Set-ReceiveConnector",
        [Param("Identity", mandatory=True, position=0, from_pipeline=True, help="Server\\Name, Name or Guid."),
         Param("Name", convert=to_str, help="A new name for the connector."), *_FIELD_PARAMS],
        synopsis="Change a receive connector.", mutates=True,
        examples=['Set-ReceiveConnector "InternalRelay" -AuthMechanism "TLS"',
                  'Set-ReceiveConnector "InternalRelay" -RequireTLS $true',
                  'Set-ReceiveConnector "InternalRelay" -RemoteIPRanges @{Add="192.168.1.10"}'])
def set_receive_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change settings of a receive connector; the running server applies them to new sessions."""
    with ctx.store.transaction() as tx:
        current = resolve(ctx, tx, args["Identity"])
        changes = {k: v for k, v in args.items() if k.lower() in _BY_NAME or (k == "Name" and v)}
        connector = apply_changes(current, changes)
        _check_unique_name(tx, connector)
        check_binding_conflicts(tx, connector)
        check_admin_listener(ctx, connector)
        if not ctx.should_process(f'Setting Receive connector "{current.identity}".'):
            return []
        tx.put(connector)
    return []


@cmdlet("Remove-ReceiveConnector",
        [Param("Identity", mandatory=True, position=0, from_pipeline=True, help="Server\\Name, Name or Guid.")],
        synopsis="Delete a receive connector.", mutates=True)
def remove_receive_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Delete a receive connector; its listeners close within seconds."""
    with ctx.store.transaction() as tx:
        connector = resolve(ctx, tx, args["Identity"])
        if not ctx.should_process(f'Removing Receive connector "{connector.identity}".'):
            return []
        tx.delete(connector)
    return []


def default_connectors(server: TransportServer) -> list[ReceiveConnector]:
    """The connectors `init` creates, as Exchange setup does (reference §1.9)."""
    frontend = validate(ReceiveConnector, dict(
        name=f"Default Frontend {server.name}", server=server.name, fqdn=server.fqdn,
        bindings=["[::]:25", "0.0.0.0:25"], remote_ip_ranges=[ALL_IPV6, ALL_IPV4],
        permission_groups=PermissionGroups.AnonymousUsers | PermissionGroups.ExchangeServers | PermissionGroups.ExchangeLegacyServers,
        auth_mechanism=AuthMechanism.Tls | AuthMechanism.Integrated | AuthMechanism.BasicAuth
        | AuthMechanism.BasicAuthRequireTLS | AuthMechanism.ExchangeServer,
        protocol_logging_level="Verbose", max_hop_count=60,
    ))
    client = validate(ReceiveConnector, dict(
        name=f"Client Frontend {server.name}", server=server.name, fqdn=server.fqdn,
        bindings=["[::]:587", "0.0.0.0:587"], remote_ip_ranges=[ALL_IPV6, ALL_IPV4],
        permission_groups=PermissionGroups.ExchangeUsers,
        auth_mechanism=AuthMechanism.Tls | AuthMechanism.Integrated | AuthMechanism.BasicAuth | AuthMechanism.BasicAuthRequireTLS,
    ))
    return [frontend, client]
