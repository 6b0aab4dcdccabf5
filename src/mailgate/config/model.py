"""The organisation's configuration as validated values.

Python names inside (``remote_ip_ranges``); Exchange names outside
(``RemoteIPRanges``). The mapping between them is the pydantic alias of each
field: ``to_pascal`` of the Python name unless the field gives its own alias,
which it does wherever Exchange capitalises an acronym (``RequireTLS``).
Cross-field rules that Exchange enforces live in ``check()`` of each model.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_pascal

from mailgate.config.values import (
    ALL_IPV4,
    ALL_IPV6,
    AddressSpaceField,
    AuthMechanism,
    AuthMechanismField,
    ByteSize,
    ByteSizeField,
    DomainType,
    ErrorPolicies,
    ErrorPoliciesField,
    ExchangeServices,
    ExchangeServicesField,
    IPBinding,
    IPBindingField,
    IPRangeField,
    MessageRateSource,
    PermissionGroups,
    PermissionGroupsField,
    ProtocolLoggingLevel,
    SizeMode,
    SmartHostAuthMechanism,
    SmartHostField,
    TimeSpan,
    TimeSpanField,
    TlsAuthLevel,
    TransportRole,
    UnlimitedInt,
    UnlimitedIntField,
    is_domain,
    parse_lmtp_target,
)
from mailgate.smtp.address import domain_key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _guid() -> str:
    return str(uuid.uuid4())


class ConfigObject(BaseModel):
    """Base of every stored object."""

    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True, validate_assignment=True,
                              use_enum_values=False, arbitrary_types_allowed=True)

    kind: ClassVar[str] = ""
    guid: str = Field(default_factory=_guid)
    when_created: dt.datetime = Field(default_factory=_now)
    when_changed: dt.datetime = Field(default_factory=_now)

    # --- store keys -------------------------------------------------------
    def store_key(self) -> str:
        """Unique key among objects of this kind (case-insensitive name)."""
        raise NotImplementedError

    def store_server(self) -> str | None:
        return None

    @property
    def identity(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``ValueError(parameter, message)`` style errors via ``rule_error``."""


class RuleViolation(Exception):
    """A cross-field rule broken by a configuration object."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.message = message


class ADPermissionEntry(BaseModel):
    """An access-control entry added with Add-ADPermission."""

    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True)

    user: str
    extended_rights: list[str] = Field(default_factory=list)
    deny: bool = False


class ReceiveConnector(ConfigObject):
    kind: ClassVar[str] = "ReceiveConnector"

    name: str
    server: str
    transport_role: TransportRole = TransportRole.FrontendTransport
    bindings: list[IPBindingField] = Field(default_factory=list)
    remote_ip_ranges: list[IPRangeField] = Field(default_factory=lambda: [ALL_IPV6, ALL_IPV4],
                                                  alias="RemoteIPRanges")
    permission_groups: PermissionGroupsField = PermissionGroups(0)
    auth_mechanism: AuthMechanismField = AuthMechanism.Tls
    enabled: bool = True
    fqdn: str = ""
    banner: str | None = None
    comment: str | None = None
    default_domain: str | None = None
    max_message_size: ByteSizeField = ByteSize(36 * 1024 * 1024)
    max_header_size: ByteSizeField = ByteSize(256 * 1024)
    max_recipients_per_message: int = 200
    max_inbound_connection: UnlimitedIntField = UnlimitedInt(5000)
    max_inbound_connection_per_source: UnlimitedIntField = UnlimitedInt(20)
    max_inbound_connection_percentage_per_source: int = 2
    connection_timeout: TimeSpanField = TimeSpan(600)
    connection_inactivity_timeout: TimeSpanField = TimeSpan(300)
    max_protocol_errors: UnlimitedIntField = UnlimitedInt(5)
    max_logon_failures: int = 3
    tarpit_interval: TimeSpanField = TimeSpan(5)
    auth_tarpit_interval: TimeSpanField = TimeSpan(5)
    max_hop_count: int = 30
    max_local_hop_count: int = 8
    message_rate_limit: UnlimitedIntField = UnlimitedInt(None)
    message_rate_source: MessageRateSource = MessageRateSource.IPAddress
    protocol_logging_level: ProtocolLoggingLevel = ProtocolLoggingLevel.None_
    require_tls: bool = Field(False, alias="RequireTLS")
    require_ehlo_domain: bool = Field(False, alias="RequireEHLODomain")
    domain_secure_enabled: bool = False
    enable_auth_gssapi: bool = Field(False, alias="EnableAuthGSSAPI")
    long_addresses_enabled: bool = False
    orar_enabled: bool = False
    suppress_x_anonymous_tls: bool = False
    advertise_client_settings: bool = False
    reject_reserved_top_level_recipient_domains: bool = False
    reject_reserved_second_level_recipient_domains: bool = False
    reject_single_label_recipient_domains: bool = False
    bare_linefeed_rejection_enabled: bool = False
    enhanced_status_codes_enabled: bool = True
    pipelining_enabled: bool = True
    chunking_enabled: bool = True
    eight_bit_mime_enabled: bool = True
    binary_mime_enabled: bool = True
    delivery_status_notification_enabled: bool = True
    smtp_utf8_enabled: bool = True
    size_enabled: SizeMode = SizeMode.Enabled
    tls_certificate_name: str | None = None
    tls_domain_capabilities: list[str] = Field(default_factory=list)
    max_acknowledgement_delay: TimeSpanField = TimeSpan(30)
    ad_permissions: list[ADPermissionEntry] = Field(default_factory=list, alias="ADPermissions")

    def store_key(self) -> str:
        return f"{self.server}\\{self.name}".lower()

    def store_server(self) -> str | None:
        return self.server

    @property
    def identity(self) -> str:
        return f"{self.server}\\{self.name}"

    def check(self) -> None:
        check_name(self.name)
        am = self.auth_mechanism
        if AuthMechanism.BasicAuthRequireTLS in am and not (AuthMechanism.BasicAuth in am and AuthMechanism.Tls in am):
            raise RuleViolation("AuthMechanism", "BasicAuthRequireTLS requires both BasicAuth and Tls in AuthMechanism.")
        if AuthMechanism.ExternalAuthoritative in am:
            if am & ~(AuthMechanism.ExternalAuthoritative | AuthMechanism.Tls):
                raise RuleViolation("AuthMechanism", "ExternalAuthoritative can only be combined with Tls.")
            if PermissionGroups.ExchangeServers not in self.permission_groups:
                raise RuleViolation("AuthMechanism", "ExternalAuthoritative requires the ExchangeServers permission "
                                    "group. Add it with -PermissionGroups ExchangeServers.")
        if self.require_tls and AuthMechanism.Tls not in am:
            raise RuleViolation("RequireTLS", "RequireTLS can be $true only when AuthMechanism contains Tls.")
        if self.domain_secure_enabled:
            if AuthMechanism.Tls not in am:
                raise RuleViolation("DomainSecureEnabled", "DomainSecureEnabled requires Tls in AuthMechanism.")
            if AuthMechanism.ExternalAuthoritative in am:
                raise RuleViolation("DomainSecureEnabled", "DomainSecureEnabled can't be used with ExternalAuthoritative.")
        if not self.bindings:
            raise RuleViolation("Bindings", "A Receive connector needs at least one binding.")
        if not self.remote_ip_ranges:
            raise RuleViolation("RemoteIPRanges", "A Receive connector needs at least one remote IP range.")
        if self.banner is not None:
            check_banner(self.banner)
        check_fqdn("Fqdn", self.fqdn)
        if self.connection_timeout.seconds <= self.connection_inactivity_timeout.seconds:
            raise RuleViolation("ConnectionTimeout", "ConnectionTimeout must be greater than ConnectionInactivityTimeout.")
        ranges = [
            ("MaxRecipientsPerMessage", self.max_recipients_per_message, 1, 512000),
            ("MaxLogonFailures", self.max_logon_failures, 0, 10),
            ("MaxHopCount", self.max_hop_count, 1, 500),
            ("MaxLocalHopCount", self.max_local_hop_count, 0, 50),
            ("MaxInboundConnectionPercentagePerSource", self.max_inbound_connection_percentage_per_source, 1, 100),
        ]
        for name, value, low, high in ranges:
            if not low <= value <= high:
                raise RuleViolation(name, f"The value {value} is out of range; it must be between {low} and {high}.")
        for name, uvalue, low, high in [
            ("MaxInboundConnection", self.max_inbound_connection, 1, 2147483647),
            ("MaxInboundConnectionPerSource", self.max_inbound_connection_per_source, 1, 10000),
            ("MaxProtocolErrors", self.max_protocol_errors, 0, 2147483647),
            ("MessageRateLimit", self.message_rate_limit, 1, 2147483647),
        ]:
            if uvalue.value is not None and not low <= uvalue.value <= high:
                raise RuleViolation(name, f"The value {uvalue} is out of range; it must be between {low} and {high} or Unlimited.")
        size = self.max_message_size
        if size.bytes is None or not 65536 <= size.bytes <= 2147483647:
            raise RuleViolation("MaxMessageSize", "MaxMessageSize must be between 64 KB (65,536 bytes) and 2 GB (2,147,483,647 bytes).")
        if self.max_header_size.bytes is None or not 1 <= self.max_header_size.bytes <= 2147483647:
            raise RuleViolation("MaxHeaderSize", "MaxHeaderSize must be between 1 byte and 2 GB.")
        for name, span, low, high in [
            ("ConnectionTimeout", self.connection_timeout, 1, 86400),
            ("ConnectionInactivityTimeout", self.connection_inactivity_timeout, 1, 86400),
            ("TarpitInterval", self.tarpit_interval, 0, 600),
            ("AuthTarpitInterval", self.auth_tarpit_interval, 0, 600),
        ]:
            if not low <= span.seconds <= high:
                raise RuleViolation(name, f"{name} must be between {TimeSpan(low)} and {TimeSpan(high)}.")
        if self.binary_mime_enabled and not self.chunking_enabled:
            raise RuleViolation("BinaryMimeEnabled", "BINARYMIME requires CHUNKING; set -ChunkingEnabled $true or -BinaryMimeEnabled $false.")

    def rights_of_groups(self) -> None:  # pragma: no cover - documented in receive/rights.py
        pass


class Credential(BaseModel):
    """A stored PSCredential: the user name in clear, the password encrypted at rest."""

    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True)

    user_name: str
    encrypted_password: str

    # seen in the shell as a PSCredential whose password stays write-only
    property_names: ClassVar[tuple[str, ...]] = ("UserName", "Password")

    def get(self, name: str, default: Any = None) -> Any:
        return {"username": self.user_name, "password": "System.Security.SecureString"}.get(name.lower(), default)

    def __str__(self) -> str:
        return "System.Management.Automation.PSCredential"


class SendConnector(ConfigObject):
    kind: ClassVar[str] = "SendConnector"

    name: str
    usage: str = "Custom"
    address_spaces: list[AddressSpaceField] = Field(default_factory=list)
    dns_routing_enabled: bool = Field(True, alias="DNSRoutingEnabled")
    smart_hosts: list[SmartHostField] = Field(default_factory=list)
    smart_host_auth_mechanism: SmartHostAuthMechanism = SmartHostAuthMechanism.None_
    authentication_credential: Credential | None = None
    port: int = 25
    fqdn: str | None = None
    force_helo: bool = Field(False, alias="ForceHELO")
    require_tls: bool = Field(False, alias="RequireTLS")
    ignore_starttls: bool = Field(False, alias="IgnoreSTARTTLS")
    tls_auth_level: TlsAuthLevel | None = None
    tls_domain: str | None = None
    tls_certificate_name: str | None = None
    domain_secure_enabled: bool = False
    max_message_size: ByteSizeField = ByteSize(35 * 1024 * 1024)
    connection_inactivity_time_out: TimeSpanField = Field(TimeSpan(600), alias="ConnectionInactivityTimeOut")
    smtp_max_messages_per_connection: int = 20
    source_transport_servers: list[str] = Field(default_factory=list)
    frontend_proxy_enabled: bool = False
    is_scoped_connector: bool = False
    protocol_logging_level: ProtocolLoggingLevel = ProtocolLoggingLevel.None_
    use_external_dns_servers_enabled: bool = Field(False, alias="UseExternalDNSServersEnabled")
    error_policies: ErrorPoliciesField = ErrorPolicies(0)
    cloud_services_mail_enabled: bool = False
    connector_type: str = "Default"
    enabled: bool = True
    comment: str | None = None

    def store_key(self) -> str:
        return self.name.lower()

    @property
    def identity(self) -> str:
        return self.name

    def check(self) -> None:
        check_name(self.name)
        if not self.address_spaces:
            raise RuleViolation("AddressSpaces", "A Send connector needs at least one address space.")
        if any(a.domain == "--" for a in self.address_spaces) and len(self.address_spaces) > 1:
            raise RuleViolation("AddressSpaces", 'The address space "--" must be the only address space of the connector.')
        non_smtp = [a for a in self.address_spaces if a.type != "SMTP"]
        if self.dns_routing_enabled:
            if self.smart_hosts:
                raise RuleViolation("SmartHosts", "SmartHosts can't be used when DNSRoutingEnabled is $true. "
                                    "Set -DNSRoutingEnabled $false to route through smart hosts.")
            if non_smtp:
                raise RuleViolation("AddressSpaces", f"The address space {non_smtp[0]} needs -DNSRoutingEnabled $false and SmartHosts.")
            if self.smart_host_auth_mechanism is not SmartHostAuthMechanism.None_:
                raise RuleViolation("SmartHostAuthMechanism", "SmartHostAuthMechanism applies to smart hosts only; "
                                    "with DNSRoutingEnabled $true it must be None.")
        else:
            if not self.smart_hosts:
                raise RuleViolation("SmartHosts", "SmartHosts is required when DNSRoutingEnabled is $false.")
        if self.smart_host_auth_mechanism in (SmartHostAuthMechanism.BasicAuth, SmartHostAuthMechanism.BasicAuthRequireTLS):
            if self.authentication_credential is None:
                raise RuleViolation("AuthenticationCredential", f"SmartHostAuthMechanism {self.smart_host_auth_mechanism} "
                                    "requires -AuthenticationCredential (for example (Get-Credential)).")
        if self.require_tls and self.ignore_starttls:
            raise RuleViolation("IgnoreSTARTTLS", "IgnoreSTARTTLS must be $false when RequireTLS is $true.")
        if self.tls_auth_level is not None and not self.require_tls:
            raise RuleViolation("TlsAuthLevel", "TlsAuthLevel can be set only when RequireTLS is $true.")
        check_fqdn("Fqdn", self.fqdn)
        # TlsDomain may be a wildcard (*.contoso.com); empty means "the recipient domain" (Exchange's rule).
        check_fqdn("TlsDomain", self.tls_domain.removeprefix("*.") if self.tls_domain else None)
        if self.tls_domain and self.tls_auth_level is not TlsAuthLevel.DomainValidation:
            raise RuleViolation("TlsDomain", "TlsDomain can be set only when TlsAuthLevel is DomainValidation.")
        if self.domain_secure_enabled:
            if not self.dns_routing_enabled:
                raise RuleViolation("DomainSecureEnabled", "DomainSecureEnabled requires DNSRoutingEnabled $true.")
            if self.ignore_starttls:
                raise RuleViolation("DomainSecureEnabled", "DomainSecureEnabled requires IgnoreSTARTTLS $false.")
            if any("*" in a.domain for a in self.address_spaces):
                raise RuleViolation("DomainSecureEnabled", "DomainSecureEnabled can't be used with wildcard address spaces.")
        if not 0 <= self.port <= 65535:
            raise RuleViolation("Port", "Port must be between 0 and 65535.")
        if not 1 <= self.smtp_max_messages_per_connection <= 2147483647:
            raise RuleViolation("SmtpMaxMessagesPerConnection", "SmtpMaxMessagesPerConnection must be at least 1.")
        if self.max_message_size.bytes is not None and not 0 <= self.max_message_size.bytes <= 2147483647:
            raise RuleViolation("MaxMessageSize", "MaxMessageSize must be between 0 and 2 GB or Unlimited.")


class AcceptedDomain(ConfigObject):
    kind: ClassVar[str] = "AcceptedDomain"

    name: str
    domain_name: str
    domain_type: DomainType = DomainType.Authoritative
    default: bool = False
    address_book_enabled: bool = True
    match_sub_domains: bool = False
    lmtp_target: str | None = Field(None, alias="LmtpTarget")

    def store_key(self) -> str:
        return self.name.lower()

    @property
    def identity(self) -> str:
        return self.name

    def check(self) -> None:
        check_name(self.name)
        if self.lmtp_target:
            try:
                parse_lmtp_target(self.lmtp_target)
            except ValueError as exc:
                raise RuleViolation("LmtpTarget", str(exc)) from None

    def matches(self, domain: str) -> bool:
        # An internationalised name matches in A-labels or U-labels alike: both sides as ``domain_key`` has them.
        return self.matches_key(domain_key(domain), domain_key(self.domain_name))

    def matches_key(self, key: str, own: str) -> bool:
        """``matches`` for a domain and this domain's name already keyed (the routing table keeps ``own``)."""
        if own.startswith("*."):
            suffix = own[2:]
            return key == suffix or key.endswith("." + suffix)
        if key == own:
            return True
        return self.match_sub_domains and key.endswith("." + own)


class Mailbox(ConfigObject):
    kind: ClassVar[str] = "Mailbox"

    name: str
    alias: str
    display_name: str = ""
    primary_smtp_address: str
    email_addresses: list[str] = Field(default_factory=list)  # "SMTP:primary", "smtp:alias"
    password_hash: str | None = None
    forwarding_smtp_address: str | None = None
    deliver_to_mailbox_and_forward: bool = False
    recipient_type_details: str = "UserMailbox"
    hidden_from_address_lists_enabled: bool = False

    def store_key(self) -> str:
        return self.name.lower()

    @property
    def identity(self) -> str:
        return self.name

    def addresses(self) -> list[str]:
        """Every SMTP address of the mailbox, lower-cased, primary first."""
        out = [self.primary_smtp_address.lower()]
        for entry in self.email_addresses:
            kind, _, address = entry.partition(":")
            if kind.lower() == "smtp" and address.lower() not in out:
                out.append(address.lower())
        return out

    def check(self) -> None:
        check_name(self.name)


LOG_MAX_AGE_SECONDS = 24855 * 86400 + 3 * 3600 + 14 * 60 + 7   # 24855.03:14:07, Exchange's largest log age


class TransportServer(ConfigObject):
    """A transport server of the organisation and its Set-TransportService settings."""

    kind: ClassVar[str] = "TransportServer"

    name: str
    fqdn: str
    server_role: str = "Mailbox"
    admin_display_version: str = "mailgate 0.1"
    transient_failure_retry_count: int = 6
    transient_failure_retry_interval: TimeSpanField = TimeSpan(300)
    outbound_connection_failure_retry_interval: TimeSpanField = TimeSpan(600)
    message_retry_interval: TimeSpanField = TimeSpan(300)
    message_expiration_timeout: TimeSpanField = TimeSpan(2 * 86400)
    delay_notification_timeout: TimeSpanField = TimeSpan(4 * 3600)
    queue_max_idle_time: TimeSpanField = TimeSpan(180)
    max_outbound_connections: UnlimitedIntField = UnlimitedInt(1000)
    max_per_domain_outbound_connections: UnlimitedIntField = UnlimitedInt(40)
    max_connection_rate_per_minute: int = 1200
    poison_message_detection_enabled: bool = True
    poison_threshold: int = 2
    external_dns_servers: list[str] = Field(default_factory=list, alias="ExternalDNSServers")
    internal_dns_servers: list[str] = Field(default_factory=list, alias="InternalDNSServers")
    external_dns_adapter_enabled: bool = Field(True, alias="ExternalDNSAdapterEnabled")
    message_tracking_log_enabled: bool = True
    message_tracking_log_path: str | None = ""   # "": under the data directory; None ($null): that log is off
    message_tracking_log_max_age: TimeSpanField = TimeSpan(30 * 86400)
    message_tracking_log_max_directory_size: ByteSizeField = ByteSize(1000 * 1024 * 1024)
    message_tracking_log_max_file_size: ByteSizeField = ByteSize(10 * 1024 * 1024)
    message_tracking_log_subject_logging_enabled: bool = True
    receive_protocol_log_path: str | None = ""   # "": under the data directory; None ($null): that log is off
    receive_protocol_log_max_age: TimeSpanField = TimeSpan(30 * 86400)
    receive_protocol_log_max_directory_size: ByteSizeField = ByteSize(250 * 1024 * 1024)
    receive_protocol_log_max_file_size: ByteSizeField = ByteSize(10 * 1024 * 1024)
    send_protocol_log_path: str | None = ""   # "": under the data directory; None ($null): that log is off
    send_protocol_log_max_age: TimeSpanField = TimeSpan(30 * 86400)
    send_protocol_log_max_directory_size: ByteSizeField = ByteSize(250 * 1024 * 1024)
    send_protocol_log_max_file_size: ByteSizeField = ByteSize(10 * 1024 * 1024)
    intra_org_connector_protocol_logging_level: ProtocolLoggingLevel = ProtocolLoggingLevel.None_
    # Directories whose .eml files are submitted (receive/pickup.py): "" under the data directory, None off.
    pickup_directory_path: str | None = ""
    replay_directory_path: str | None = ""
    pickup_directory_max_messages_per_minute: int = 100
    pickup_directory_max_header_size: ByteSizeField = ByteSize(64 * 1024)
    pickup_directory_max_recipients_per_message: int = 100
    # Where the other servers reach this one's queues (Get-Queue -Server): published by `serve` at start.
    admin_api_url: str = ""
    # Set-ServerComponentState: component → requester → state (Active, Inactive, Draining); absent is Active.
    component_states: dict[str, dict[str, str]] = Field(default_factory=dict)

    def component_state(self, component: str) -> str:
        """A component's state as Exchange works it out: Inactive if any requester set it Inactive, else
        Draining if any set it Draining, else Active."""
        states = set(self.component_states.get(component, {}).values())
        return "Inactive" if "Inactive" in states else "Draining" if "Draining" in states else "Active"

    def refusing_mail(self) -> str | None:
        """Why this server takes no new SMTP sessions (maintenance): the server offline, or its transport
        components draining or inactive; None when it takes mail."""
        if self.component_state("ServerWideOffline") == "Inactive":
            return "ServerWideOffline is Inactive"
        for component in ("HubTransport", "FrontendTransport"):
            state = self.component_state(component)
            if state != "Active":
                return f"{component} is {state}"
        return None

    def store_key(self) -> str:
        return self.name.lower()

    @property
    def identity(self) -> str:
        return self.name

    def check(self) -> None:
        if not 0 <= self.transient_failure_retry_count <= 15:
            raise RuleViolation("TransientFailureRetryCount", "TransientFailureRetryCount must be between 0 and 15.")
        if not 1 <= self.poison_threshold <= 10:
            raise RuleViolation("PoisonThreshold", "PoisonThreshold must be between 1 and 10.")
        for name, span, low, high in [
            ("TransientFailureRetryInterval", self.transient_failure_retry_interval, 1, 12 * 3600),
            ("OutboundConnectionFailureRetryInterval", self.outbound_connection_failure_retry_interval, 1, 20 * 86400),
            ("MessageRetryInterval", self.message_retry_interval, 1, 15 * 86400),
            ("MessageExpirationTimeout", self.message_expiration_timeout, 5, 90 * 86400),
            ("DelayNotificationTimeout", self.delay_notification_timeout, 1, 30 * 86400),
            ("QueueMaxIdleTime", self.queue_max_idle_time, 5, 3600),
            # Log ages: 00:00:00 keeps logs whatever their age.
            ("MessageTrackingLogMaxAge", self.message_tracking_log_max_age, 0, LOG_MAX_AGE_SECONDS),
            ("ReceiveProtocolLogMaxAge", self.receive_protocol_log_max_age, 0, LOG_MAX_AGE_SECONDS),
            ("SendProtocolLogMaxAge", self.send_protocol_log_max_age, 0, LOG_MAX_AGE_SECONDS),
        ]:
            if not low <= span.seconds <= high:
                raise RuleViolation(name, f"{name} must be between {TimeSpan(low)} and {TimeSpan(high)}.")
        for name, uvalue in [("MaxOutboundConnections", self.max_outbound_connections),
                             ("MaxPerDomainOutboundConnections", self.max_per_domain_outbound_connections)]:
            if uvalue.value is not None and uvalue.value < 1:
                raise RuleViolation(name, f"{name} must be between 1 and 2147483647, or Unlimited.")
        for name, number, low, high in [
                ("PickupDirectoryMaxMessagesPerMinute", self.pickup_directory_max_messages_per_minute, 1, 20000),
                ("PickupDirectoryMaxRecipientsPerMessage", self.pickup_directory_max_recipients_per_message, 1, 10000),
                ("PickupDirectoryMaxHeaderSize", self.pickup_directory_max_header_size.bytes or 0, 32768, 2147483647)]:
            if not low <= number <= high:
                raise RuleViolation(name, f"{name} must be between {low} and {high}.")
        if not 1 <= self.max_connection_rate_per_minute <= 2147483647:
            raise RuleViolation("MaxConnectionRatePerMinute", "MaxConnectionRatePerMinute must be between 1 and 2147483647.")


class TransportConfig(ConfigObject):
    """Organisation-wide transport settings (Set-TransportConfig); a single object."""

    kind: ClassVar[str] = "TransportConfig"

    name: str = "Transport Settings"
    # Exchange's organisation limits, 10 MB each: messages to mailboxes, and from senders of the organisation
    # (authenticated submissions), above them get an NDR when they are categorised (routing/table.py).
    max_receive_size: ByteSizeField = ByteSize(10 * 1024 * 1024)
    max_send_size: ByteSizeField = ByteSize(10 * 1024 * 1024)
    max_recipient_envelope_limit: UnlimitedIntField = UnlimitedInt(500)
    tls_send_domain_secure_list: list[str] = Field(default_factory=list, alias="TLSSendDomainSecureList")
    tls_receive_domain_secure_list: list[str] = Field(default_factory=list, alias="TLSReceiveDomainSecureList")
    external_delay_dsn_enabled: bool = True
    internal_delay_dsn_enabled: bool = True
    external_postmaster_address: str | None = None
    generate_copy_of_dsn_for: list[str] = Field(default_factory=lambda: ["5.4.8", "5.4.6", "5.4.4", "5.2.4", "5.2.0", "5.1.4"],
                                                alias="GenerateCopyOfDSNFor")
    external_dsn_max_message_attach_size: ByteSizeField = Field(ByteSize(10 * 1024 * 1024),
                                                               alias="ExternalDsnMaxMessageAttachSize")
    internal_dsn_max_message_attach_size: ByteSizeField = Field(ByteSize(10 * 1024 * 1024),
                                                               alias="InternalDsnMaxMessageAttachSize")

    def store_key(self) -> str:
        return "transport settings"

    def check(self) -> None:
        for name, size, unlimited in [("MaxReceiveSize", self.max_receive_size, True),
                                      ("MaxSendSize", self.max_send_size, True),
                                      ("ExternalDsnMaxMessageAttachSize", self.external_dsn_max_message_attach_size, False),
                                      ("InternalDsnMaxMessageAttachSize", self.internal_dsn_max_message_attach_size, False)]:
            if (size.bytes is None and not unlimited) or (size.bytes is not None and size.bytes > 2147483647):
                raise RuleViolation(name, f"{name} must be between 0 and 2 GB (2,147,483,647 bytes)"
                                    + (", or Unlimited." if unlimited else "."))
        limit = self.max_recipient_envelope_limit.value
        if limit is not None and limit < 0:
            raise RuleViolation("MaxRecipientEnvelopeLimit", "MaxRecipientEnvelopeLimit must be between 0 and "
                                "2147483647, or Unlimited.")

    @property
    def identity(self) -> str:
        return self.name


# The local part of the Microsoft Exchange recipient's address at the default domain (the same in every
# Exchange organisation); mail to it goes to OrganizationConfig's reply recipient.
EXCHANGE_RECIPIENT_LOCAL_PART = "MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e"


class OrganizationConfig(ConfigObject):
    """The organisation's settings of Set-OrganizationConfig that transport uses; a single object."""

    kind: ClassVar[str] = "OrganizationConfig"

    name: str = "First Organization"
    # The mailbox (its Name) that receives what is sent to the Microsoft Exchange recipient: the copies of NDRs
    # whose codes are in GenerateCopyOfDSNFor. None: they are discarded, as in Exchange.
    microsoft_exchange_recipient_reply_recipient: str | None = None

    def store_key(self) -> str:
        return "organization config"

    @property
    def identity(self) -> str:
        return self.name


class Certificate(ConfigObject):
    kind: ClassVar[str] = "ExchangeCertificate"

    thumbprint: str
    friendly_name: str = "Microsoft Exchange"
    subject: str = ""
    issuer: str = ""
    certificate_domains: list[str] = Field(default_factory=list)
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    serial_number: str = ""
    services: ExchangeServicesField = ExchangeServices(0)
    has_private_key: bool = True
    private_key_exportable: bool = False
    is_self_signed: bool = True
    status: str = "Valid"
    server: str = ""
    certificate_pem: str = ""
    chain_pem: str = ""
    encrypted_private_key: str | None = None
    request_pem: str | None = None

    def store_key(self) -> str:
        return f"{self.server}\\{self.thumbprint}".lower()

    def store_server(self) -> str | None:
        return self.server

    @property
    def identity(self) -> str:
        return f"{self.server}\\{self.thumbprint}"


def check_fqdn(parameter: str, value: str | None) -> None:
    """A host name this server says on the wire (EHLO, banner, Received:) or expects in a certificate."""
    if value and not is_domain(value):
        raise RuleViolation(parameter, f'"{value}" is not a valid FQDN: use letters, digits, "-" and dots, '
                            'for example mail.contoso.com.')


BANNER_MAX = 510  # an SMTP reply line is at most 512 octets with its CRLF (RFC 5321 4.5.3.1.5)


def check_banner(banner: str) -> None:
    """The 220 greeting is sent as it is: one line of printable US-ASCII, so it can't end the reply early,
    start a multi-line reply it never finishes, or put other protocol lines on the wire."""
    if not banner.startswith("220"):
        raise RuleViolation("Banner", 'The banner must start with "220", for example "220 mail.contoso.com".')
    if banner[3:4] not in ("", " "):
        raise RuleViolation("Banner", 'The banner must be "220" followed by a space and text, '
                            'for example "220 mail.contoso.com".')
    if not all(" " <= ch <= "~" for ch in banner):
        raise RuleViolation("Banner", "The banner must be one line of printable US-ASCII characters "
                            "(no line breaks or control characters).")
    if len(banner) > BANNER_MAX:
        raise RuleViolation("Banner", f"The banner is {len(banner)} characters long; an SMTP reply line "
                            f"allows at most {BANNER_MAX}.")


def check_name(name: str) -> None:
    if not name or not name.strip():
        raise RuleViolation("Name", "The name can't be empty.")
    if len(name) > 64:
        raise RuleViolation("Name", f'The name "{name}" is longer than 64 characters.')
    if "\\" in name:
        raise RuleViolation("Name", f'The name "{name}" can\'t contain "\\".')


ALL_KINDS: dict[str, type[ConfigObject]] = {
    cls.kind: cls
    for cls in (ReceiveConnector, SendConnector, AcceptedDomain, Mailbox, TransportServer, TransportConfig,
                OrganizationConfig, Certificate)
}


def binding_list(bindings: list[IPBinding]) -> str:
    return "{" + ", ".join(str(b) for b in bindings) + "}"
