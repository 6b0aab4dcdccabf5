"""Output objects: what a cmdlet returns, shaped as Exchange shows it.

A ``Record`` is an ordered set of Exchange-named properties with typed values
(so ``Where-Object {$_.MessageCount -gt 10}`` compares numbers). The shell
formats records; the REST API serialises them with ``to_json``.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Iterator

from pydantic import BaseModel

from mailgate.config.model import ConfigObject, Credential, ReceiveConnector, SendConnector


# Records with the same properties (every event of Get-MessageTrackingLog, every message of Get-Message) share
# one lower-case index of them: 100,000 events then cost their values, not 100,000 copies of the index.
_SHARED_INDEXES: dict[tuple[str, ...], dict[str, str]] = {}
_SHARED_INDEXES_MAX = 1024


def _shared_index(keys: tuple[str, ...]) -> dict[str, str]:
    index = _SHARED_INDEXES.get(keys)
    if index is None:
        index = {k.lower(): k for k in keys}
        if len(_SHARED_INDEXES) < _SHARED_INDEXES_MAX:
            _SHARED_INDEXES[keys] = index
    return index


# The type of the objects [pscustomobject]@{...} and New-Object PSObject make (report rows, Import-Csv rows).
PS_CUSTOM_OBJECT = "System.Management.Automation.PSCustomObject"


def custom_object(properties: dict[Any, Any]) -> "Record":
    """A PSCustomObject from a hashtable: its keys, in order, are the properties."""
    return Record(PS_CUSTOM_OBJECT, {str(k): v for k, v in properties.items()})


class Record:
    """An output object with case-insensitive property access. ``text`` is what it prints as inside a list
    (its ToString in Exchange, e.g. a RecipientInfo's ``address;status;...``); by default its Identity."""

    __slots__ = ("type_name", "_props", "_index", "text")

    def __init__(self, type_name: str, props: dict[str, Any], text: str | None = None) -> None:
        self.type_name = type_name
        self._props = dict(props)
        self._index = _shared_index(tuple(self._props))
        self.text = text

    def get(self, name: str, default: Any = None) -> Any:
        key = self._index.get(name.lower())
        return self._props[key] if key is not None else default

    def has(self, name: str) -> bool:
        return name.lower() in self._index

    def name_of(self, name: str) -> str | None:
        return self._index.get(name.lower())

    def set(self, name: str, value: Any) -> None:
        key = self._index.get(name.lower())
        if key is None:
            self._index = {**self._index, name.lower(): name}   # a copy: other records may share the index
            key = name
        self._props[key] = value

    def keys(self) -> list[str]:
        return list(self._props)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self._props.items())

    def __getitem__(self, name: str) -> Any:
        key = self._index.get(name.lower())
        if key is None:
            raise KeyError(name)
        return self._props[key]

    def __repr__(self) -> str:
        return f"Record({self.type_name}, {self._props.get('Identity', '')!r})"

    def __str__(self) -> str:
        if self.text is not None:
            return self.text
        ident = self.get("Identity")
        return str(ident) if ident is not None else self.type_name


# Property order of ``fl`` for receive connectors, as Exchange prints it (reference §11).
_RECEIVE_ORDER = [
    "AuthMechanism", "Banner", "BinaryMimeEnabled", "Bindings", "ChunkingEnabled", "DefaultDomain",
    "DeliveryStatusNotificationEnabled", "EightBitMimeEnabled", "SmtpUtf8Enabled", "BareLinefeedRejectionEnabled",
    "DomainSecureEnabled", "EnhancedStatusCodesEnabled", "LongAddressesEnabled", "OrarEnabled",
    "SuppressXAnonymousTls", "AdvertiseClientSettings", "Fqdn", "Enabled", "ConnectionTimeout",
    "ConnectionInactivityTimeout", "MessageRateLimit", "MessageRateSource", "MaxInboundConnection",
    "MaxInboundConnectionPerSource", "MaxInboundConnectionPercentagePerSource", "MaxHeaderSize", "MaxHopCount",
    "MaxLocalHopCount", "MaxLogonFailures", "MaxMessageSize", "MaxProtocolErrors", "MaxRecipientsPerMessage",
    "PermissionGroups", "PipeliningEnabled", "ProtocolLoggingLevel", "RemoteIPRanges", "RequireEHLODomain",
    "RequireTLS", "EnableAuthGSSAPI", "TlsCertificateName", "TlsDomainCapabilities", "Server", "TransportRole",
    "RejectReservedTopLevelRecipientDomains", "RejectReservedSecondLevelRecipientDomains",
    "RejectSingleLabelRecipientDomains", "SizeEnabled", "TarpitInterval", "AuthTarpitInterval",
    "MaxAcknowledgementDelay", "Comment", "Name",
]
_SEND_ORDER = [
    "AddressSpaces", "AuthenticationCredential", "CloudServicesMailEnabled", "Comment", "ConnectedDomains",
    "ConnectionInactivityTimeOut", "ConnectorType", "DNSRoutingEnabled", "DomainSecureEnabled", "Enabled",
    "ErrorPolicies", "ForceHELO", "FrontendProxyEnabled", "Fqdn", "IgnoreSTARTTLS", "IsScopedConnector",
    "IsSmtpConnector", "MaxMessageSize", "Name", "Port", "ProtocolLoggingLevel", "RequireTLS",
    "SmartHostAuthMechanism", "SmartHosts", "SmartHostsString", "SmtpMaxMessagesPerConnection",
    "SourceTransportServers", "TlsAuthLevel", "TlsCertificateName", "TlsDomain", "Usage",
    "UseExternalDNSServersEnabled",
]
_HIDDEN = {"ADPermissions", "PasswordHash", "EncryptedPrivateKey", "CertificatePem", "ChainPem", "RequestPem",
           "EncryptedPassword", "ComponentStates"}
_TRAILER = ["Identity", "Guid", "WhenChanged", "WhenCreated", "IsValid", "ObjectState"]


def present(obj: ConfigObject) -> Record:
    """The record Exchange would print for a configuration object."""
    values: dict[str, Any] = {}
    for name, info in type(obj).model_fields.items():
        alias = info.alias or name
        if alias in _HIDDEN:
            continue
        values[alias] = getattr(obj, name)
    if isinstance(obj, SendConnector):
        values["SmartHostsString"] = ",".join(str(h) for h in obj.smart_hosts)
        values["IsSmtpConnector"] = all(a.type == "SMTP" for a in obj.address_spaces)
        values["ConnectedDomains"] = []
        if obj.authentication_credential is not None:
            values["AuthenticationCredential"] = obj.authentication_credential
    order = {ReceiveConnector: _RECEIVE_ORDER, SendConnector: _SEND_ORDER}.get(type(obj), [])
    props: dict[str, Any] = {}
    for key in order:
        if key in values:
            props[key] = values.pop(key)
    for key in list(values):
        if key not in _TRAILER:
            props[key] = values.pop(key)
    props["Identity"] = obj.identity
    props["Guid"] = obj.guid
    props["WhenChanged"] = obj.when_changed
    props["WhenCreated"] = obj.when_created
    props["IsValid"] = True
    props["ObjectState"] = "Unchanged"
    return Record(obj.kind, props)


def to_json(value: Any) -> Any:
    """A JSON-serialisable form of an output value (REST API)."""
    if isinstance(value, Record):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, enum.Flag):   # before int: our flags are IntFlags, shown by name as Exchange does
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum) and isinstance(value.value, str):
        return value.value
    if isinstance(value, Credential):
        return {"UserName": value.user_name}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return str(value)
