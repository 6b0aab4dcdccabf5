"""Receive-connector permissions: which principals a session is, and which
extended rights they hold on the connector.

Permission groups grant fixed rights to fixed principals (reference §1.4);
``Add-ADPermission`` adds explicit grants (or denials) to any principal,
including a single mailbox. ``AuthMechanism ExternalAuthoritative`` makes
every session of the connector an "Externally Secured Server".
"""

from __future__ import annotations

import enum

from mailgate.config.model import ReceiveConnector
from mailgate.config.values import AuthMechanism, PermissionGroups


class Right(enum.Flag):
    Submit = enum.auto()
    AcceptAnyRecipient = enum.auto()
    AcceptAnySender = enum.auto()
    AcceptAuthoritativeDomainSender = enum.auto()
    AcceptAuthenticationFlag = enum.auto()
    AcceptExch50 = enum.auto()
    BypassAntiSpam = enum.auto()
    BypassMessageSizeLimit = enum.auto()
    AcceptRoutingHeaders = enum.auto()
    AcceptOrganizationHeaders = enum.auto()
    AcceptForestHeaders = enum.auto()


# AD extended-right names ↔ rights. Names print in this canonical spelling.
EXTENDED_RIGHTS: dict[str, Right] = {
    "ms-Exch-SMTP-Submit": Right.Submit,
    "ms-Exch-SMTP-Accept-Any-Recipient": Right.AcceptAnyRecipient,
    "ms-Exch-SMTP-Accept-Any-Sender": Right.AcceptAnySender,
    "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender": Right.AcceptAuthoritativeDomainSender,
    "ms-Exch-SMTP-Accept-Authentication-Flag": Right.AcceptAuthenticationFlag,
    "ms-Exch-SMTP-Accept-Exch50": Right.AcceptExch50,
    "ms-Exch-Bypass-Anti-Spam": Right.BypassAntiSpam,
    "ms-Exch-Bypass-Message-Size-Limit": Right.BypassMessageSizeLimit,
    "ms-Exch-Accept-Headers-Routing": Right.AcceptRoutingHeaders,
    "ms-Exch-Accept-Headers-Organization": Right.AcceptOrganizationHeaders,
    "ms-Exch-Accept-Headers-Forest": Right.AcceptForestHeaders,
}
_RIGHT_NAMES = {v: k for k, v in EXTENDED_RIGHTS.items()}

# How the protocol log prints effective rights (reference §1.4).
LOG_TOKENS = {
    Right.Submit: "SMTPSubmit", Right.AcceptAnyRecipient: "SMTPAcceptAnyRecipient",
    Right.AcceptAnySender: "SMTPAcceptAnySender",
    Right.AcceptAuthoritativeDomainSender: "SMTPAcceptAuthoritativeDomainSender",
    Right.AcceptAuthenticationFlag: "SMTPAcceptAuthenticationFlag", Right.AcceptExch50: "SMTPAcceptEXCH50",
    Right.BypassAntiSpam: "BypassAntiSpam", Right.BypassMessageSizeLimit: "BypassMessageSizeLimit",
    Right.AcceptRoutingHeaders: "AcceptRoutingHeaders", Right.AcceptOrganizationHeaders: "AcceptOrganizationHeaders",
    Right.AcceptForestHeaders: "AcceptForestHeaders",
}

ANONYMOUS = "NT AUTHORITY\\ANONYMOUS LOGON"
AUTHENTICATED_USERS = "NT AUTHORITY\\Authenticated Users"
EXCHANGE_SERVERS = "MS Exchange\\Exchange Servers"
EDGE_SERVERS = "MS Exchange\\Edge Transport Servers"
HUB_SERVERS = "MS Exchange\\Hub Transport Servers"
LEGACY_INTEROP = "MS Exchange\\ExchangeLegacyInterop"
PARTNER_SERVERS = "MS Exchange\\Partner Servers"
EXTERNALLY_SECURED = "MS Exchange\\Externally Secured Servers"
WELL_KNOWN_PRINCIPALS = [ANONYMOUS, AUTHENTICATED_USERS, EXCHANGE_SERVERS, EDGE_SERVERS, HUB_SERVERS, LEGACY_INTEROP,
                         PARTNER_SERVERS, EXTERNALLY_SECURED]

R = Right
_ANON_RIGHTS = R.AcceptRoutingHeaders | R.AcceptAnySender | R.AcceptAuthoritativeDomainSender | R.Submit
_USER_RIGHTS = R.AcceptRoutingHeaders | R.BypassAntiSpam | R.AcceptAnyRecipient | R.Submit
_SERVER_RIGHTS = (R.AcceptForestHeaders | R.AcceptOrganizationHeaders | R.AcceptRoutingHeaders | R.BypassAntiSpam
                  | R.BypassMessageSizeLimit | R.AcceptAnyRecipient | R.AcceptAnySender | R.AcceptAuthenticationFlag
                  | R.AcceptAuthoritativeDomainSender | R.AcceptExch50 | R.Submit)
_SECURED_RIGHTS = _SERVER_RIGHTS & ~(R.AcceptForestHeaders | R.AcceptOrganizationHeaders)
_LEGACY_RIGHTS = (R.AcceptRoutingHeaders | R.BypassAntiSpam | R.BypassMessageSizeLimit | R.AcceptAnyRecipient
                  | R.AcceptAnySender | R.AcceptAuthenticationFlag | R.AcceptAuthoritativeDomainSender
                  | R.AcceptExch50 | R.Submit)
_PARTNER_RIGHTS = R.AcceptRoutingHeaders | R.Submit

# Permission group → [(principal, rights)]
GROUP_GRANTS: dict[PermissionGroups, list[tuple[str, Right]]] = {
    PermissionGroups.AnonymousUsers: [(ANONYMOUS, _ANON_RIGHTS)],
    PermissionGroups.ExchangeUsers: [(AUTHENTICATED_USERS, _USER_RIGHTS)],
    PermissionGroups.ExchangeServers: [(EXCHANGE_SERVERS, _SERVER_RIGHTS), (EDGE_SERVERS, _SERVER_RIGHTS),
                                       (HUB_SERVERS, _SERVER_RIGHTS)],
    PermissionGroups.ExchangeLegacyServers: [(LEGACY_INTEROP, _LEGACY_RIGHTS)],
    PermissionGroups.Partners: [(PARTNER_SERVERS, _PARTNER_RIGHTS)],
}


def canonical_right(name: str) -> str:
    for known in EXTENDED_RIGHTS:
        if known.lower() == name.strip().lower():
            return known
    raise ValueError(f'"{name}" is not an extended right a Receive connector understands; valid rights are: '
                     + ", ".join(EXTENDED_RIGHTS))


def canonical_principal(name: str) -> str:
    for known in WELL_KNOWN_PRINCIPALS:
        if known.lower() == name.strip().lower():
            return known
    return name.strip()


def grants(connector: ReceiveConnector) -> list[tuple[str, Right, bool]]:
    """Every (principal, rights, deny) entry on the connector, group grants first."""
    out: list[tuple[str, Right, bool]] = []
    for group, entries in GROUP_GRANTS.items():
        if group in connector.permission_groups:
            out += [(p, r, False) for p, r in entries]
    if AuthMechanism.ExternalAuthoritative in connector.auth_mechanism and \
            PermissionGroups.ExchangeServers in connector.permission_groups:
        out.append((EXTERNALLY_SECURED, _SECURED_RIGHTS, False))
    for ace in connector.ad_permissions:
        rights = Right(0)
        for name in ace.extended_rights:
            rights |= EXTENDED_RIGHTS.get(canonical_right(name), Right(0))
        out.append((canonical_principal(ace.user), rights, ace.deny))
    return out


def session_principals(*, authenticated_as: str | None, mailbox_names: tuple[str, ...] = (),
                       partner: bool = False, externally_secured: bool = False,
                       exchange_server: bool = False) -> list[str]:
    """The principals a session acts as (matched case-insensitively against grants)."""
    if exchange_server:   # a server of this organisation, authenticated with X-EXPS
        return [EXCHANGE_SERVERS, HUB_SERVERS, AUTHENTICATED_USERS, ANONYMOUS]
    if externally_secured:
        return [EXTERNALLY_SECURED, ANONYMOUS]
    if partner:
        return [PARTNER_SERVERS, ANONYMOUS]
    if authenticated_as is None:
        return [ANONYMOUS]
    return [AUTHENTICATED_USERS, authenticated_as, *mailbox_names]


def effective_rights(connector: ReceiveConnector, principals: list[str]) -> Right:
    wanted = {p.lower() for p in principals}
    allowed, denied = Right(0), Right(0)
    for principal, rights, deny in grants(connector):
        if principal.lower() in wanted:
            if deny:
                denied |= rights
            else:
                allowed |= rights
    return allowed & ~denied


def right_names(rights: Right) -> list[str]:
    return [_RIGHT_NAMES[r] for r in Right if r in rights and r in _RIGHT_NAMES]


def log_tokens(rights: Right) -> str:
    return " ".join(LOG_TOKENS[r] for r in Right if r in rights)
