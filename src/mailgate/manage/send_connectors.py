"""Get/New/Set/Remove-SendConnector."""

from __future__ import annotations

from typing import Any

from mailgate.config.model import SendConnector, TransportServer
from mailgate.config.store import ConfigTransaction
from mailgate.config.values import ByteSize, SendUsage, SmartHostAuthMechanism
from mailgate.errors import ConflictError, ParameterError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.credentials import store_credential, to_credential
from mailgate.manage.objects import apply_changes, field_params, find_one
from mailgate.manage.params import enum_converter, to_str
from mailgate.manage.present import present
from mailgate.manage.psvalues import wildcard_match
from mailgate.manage.receive_connectors import chosen_usage

KIND = "Send connectors"

_FIELD_PARAMS = field_params(SendConnector, exclude={"name", "usage", "authentication_credential"})
_BY_NAME = {p.name.lower(): p for p in _FIELD_PARAMS}
_CREDENTIAL = Param("AuthenticationCredential", convert=to_credential, type_name="PSCredential",
                    help="User name and password for the smart host: (Get-Credential).")


def _usage_params() -> list[Param]:
    return [Param("Usage", convert=enum_converter(SendUsage), type_name="UsageType")] + [
        Param(u.value, switch=True, type_name="SwitchParameter") for u in SendUsage
    ]


def _match(obj: SendConnector, key: str) -> bool:
    return obj.name.lower() == key or wildcard_match(key, obj.name)


def resolve(tx: ConfigTransaction, identity: Any) -> SendConnector:
    return find_one(tx, SendConnector, identity, kind_text=KIND, match=_match)


def _check_unique(tx: ConfigTransaction, connector: SendConnector) -> None:
    for other in tx.list(SendConnector):
        if other.guid != connector.guid and other.name.lower() == connector.name.lower():
            raise ConflictError(f'A Send connector named "{connector.name}" already exists.', parameter="Name",
                                exception_name="ADObjectAlreadyExistsException")


def _check_servers(tx: ConfigTransaction, connector: SendConnector) -> None:
    known = {s.name.lower(): s.name for s in tx.list(TransportServer)}
    known.update({s.fqdn.lower(): s.name for s in tx.list(TransportServer)})
    names = []
    for name in connector.source_transport_servers:
        if name.lower() not in known:
            raise ParameterError(f"SourceTransportServers: the server '{name}' isn't a transport server of this "
                                 f"organisation (known: {', '.join(sorted(set(known.values())))}).",
                                 parameter="SourceTransportServers")
        names.append(known[name.lower()])
    connector.source_transport_servers = list(dict.fromkeys(names))


def _changes(ctx: ManagementContext, args: dict[str, Any], current: SendConnector | None) -> dict[str, Any]:
    changes = {k: v for k, v in args.items() if k.lower() in _BY_NAME}
    if args.get("AuthenticationCredential") is not None:
        changes["AuthenticationCredential"] = store_credential(ctx, args["AuthenticationCredential"])
    # Exchange: SmartHosts without -DNSRoutingEnabled means $false; DNSRoutingEnabled $true clears smart hosts.
    if changes.get("SmartHosts") and "DNSRoutingEnabled" not in changes:
        changes["DNSRoutingEnabled"] = False
    if changes.get("DNSRoutingEnabled") is True and current is not None and "SmartHosts" not in changes:
        changes["SmartHosts"] = []
        changes.setdefault("SmartHostAuthMechanism", SmartHostAuthMechanism.None_)
    return changes


def _warn_about(ctx: ManagementContext, connector: SendConnector) -> None:
    if connector.smart_host_auth_mechanism is SmartHostAuthMechanism.BasicAuth and not connector.require_tls:
        ctx.warn(f'Send connector "{connector.name}" sends the smart-host password with BasicAuth even when the '
                 "smart host offers no TLS. Use -SmartHostAuthMechanism BasicAuthRequireTLS or -RequireTLS $true "
                 "to never send it in clear text.")


@cmdlet("Get-SendConnector",
        [Param("Identity", position=0, from_pipeline=True, help="Name or Guid; wildcards allowed.")],
        synopsis="List send connectors.", default_view="SendConnector",
        examples=["Get-SendConnector | fl Name,AddressSpaces,SmartHosts"])
def get_send_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List the organisation's send connectors."""
    with ctx.store.reader() as tx:
        ident = args.get("Identity")
        if ident is None:
            items = tx.list(SendConnector)
        elif isinstance(ident, str) and any(ch in ident for ch in "*?"):
            items = [c for c in tx.list(SendConnector) if _match(c, ident.lower())]
        else:
            items = [resolve(tx, ident)]
    return [present(c) for c in items]


@cmdlet("New-SendConnector",
        [Param("Name", convert=to_str, mandatory=True, position=0),
         *_usage_params(), *_FIELD_PARAMS, _CREDENTIAL],
        synopsis="Create a send connector.", mutates=True, default_view="SendConnector",
        examples=['New-SendConnector -Name "OutboundInternet" -AddressSpaces "*" -Usage Internet -Internet '
                  '-DNSRoutingEnabled $true -SmartHostAuthMechanism None -SourceTransportServers "EX01"',
                  'New-SendConnector -Name "SmartHost Connector" -Usage Internet -AddressSpaces "*" '
                  '-SmartHosts "smtp.relay.com" -SmartHostAuthMechanism "BasicAuth" '
                  '-AuthenticationCredential (Get-Credential) -SourceTransportServers "EX01"'])
def new_send_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Create a send connector that routes mail for its address spaces by DNS or through smart hosts."""
    usage = chosen_usage(args, SendUsage) or SendUsage.Custom
    if args.get("AddressSpaces") is None:
        raise ParameterError("Cannot process command because of one or more missing mandatory parameters: "
                             "AddressSpaces.", parameter="AddressSpaces")
    with ctx.store.transaction() as tx:
        base = SendConnector(name=args["Name"])
        defaults: dict[str, Any] = {"Usage": usage.value, "SourceTransportServers": [ctx.local_server(tx).name]}
        if usage is SendUsage.Internal:
            defaults["MaxMessageSize"] = ByteSize(None)
        if usage is SendUsage.Partner:
            defaults["DomainSecureEnabled"] = True
        changes = {**defaults, **_changes(ctx, args, None)}
        connector = apply_changes(base, changes)
        _check_servers(tx, connector)
        _check_unique(tx, connector)
        if not ctx.should_process(f'Creating Send connector "{connector.name}" for address spaces '
                                  f'{{{", ".join(map(str, connector.address_spaces))}}}.'):
            return []
        tx.put(connector)
    _warn_about(ctx, connector)
    return [present(connector)]


@cmdlet("Set-SendConnector",
        [Param("Identity", mandatory=True, position=0, from_pipeline=True),
         Param("Name", convert=to_str), *_FIELD_PARAMS, _CREDENTIAL],
        synopsis="Change a send connector.", mutates=True,
        examples=['Set-SendConnector "OutboundInternet" -RequireTLS $true',
                  'Set-SendConnector "SmartHost Connector" -SmartHosts @{Add="smtp2.relay.com"}'])
def set_send_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change settings of a send connector; queues use them from the next connection."""
    with ctx.store.transaction() as tx:
        current = resolve(tx, args["Identity"])
        changes = _changes(ctx, args, current)
        if args.get("Name"):
            changes["Name"] = args["Name"]
        connector = apply_changes(current, changes)
        _check_servers(tx, connector)
        _check_unique(tx, connector)
        if not ctx.should_process(f'Setting Send connector "{current.name}".'):
            return []
        tx.put(connector)
    _warn_about(ctx, connector)
    return []


@cmdlet("Remove-SendConnector", [Param("Identity", mandatory=True, position=0, from_pipeline=True)],
        synopsis="Delete a send connector.", mutates=True)
def remove_send_connector(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Delete a send connector; mail it would have carried goes to the next best connector or Unreachable."""
    with ctx.store.transaction() as tx:
        connector = resolve(tx, args["Identity"])
        if not ctx.should_process(f'Removing Send connector "{connector.name}".'):
            return []
        tx.delete(connector)
    return []
