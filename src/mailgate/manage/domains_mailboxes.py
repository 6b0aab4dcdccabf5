"""Accepted domains and mailboxes: who this organisation receives mail for."""

from __future__ import annotations

import re
from typing import Any

from mailgate.config.model import AcceptedDomain, Mailbox
from mailgate.config.secrets import hash_password
from mailgate.config.store import ConfigTransaction
from mailgate.config.values import DomainType, is_domain, normalise_domain, parse_smtp_address
from mailgate.errors import ConflictError, InvalidValueError, ParameterError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.credentials import SecureString
from mailgate.manage.objects import apply_changes, field_params, find_one, validate
from mailgate.manage.params import (MultiValuedChange, first_results, multi_valued, scalar, to_bool, to_result_size,
                                    to_str)
from mailgate.manage.present import present
from mailgate.manage.psvalues import wildcard_match
from mailgate.smtp.address import address_key, domain_key

# ---------------------------------------------------------------------------
# Accepted domains


def parse_domain_name(value: Any) -> str:
    text = normalise_domain(to_str(value))
    bare = text[2:] if text.startswith("*.") else text
    if "*" in bare or not is_domain(bare) or len(text) > 256:
        raise ValueError(f'"{value}" is not a valid domain name; use contoso.com or *.contoso.com')
    return text


def _domain_match(obj: AcceptedDomain, key: str) -> bool:
    return obj.name.lower() == key or obj.domain_name.lower() == key or wildcard_match(key, obj.name)


def resolve_domain(tx: ConfigTransaction, identity: Any) -> AcceptedDomain:
    return find_one(tx, AcceptedDomain, identity, kind_text="accepted domains", match=_domain_match)


def _check_domain_unique(tx: ConfigTransaction, domain: AcceptedDomain) -> None:
    for other in tx.list(AcceptedDomain):
        if other.guid == domain.guid:
            continue
        if other.name.lower() == domain.name.lower():
            raise ConflictError(f'An accepted domain named "{domain.name}" already exists.', parameter="Name",
                                exception_name="ADObjectAlreadyExistsException")
        if domain_key(other.domain_name) == domain_key(domain.domain_name):
            raise ConflictError(f'The domain {domain.domain_name} is already the accepted domain "{other.name}".',
                                parameter="DomainName", exception_name="ADObjectAlreadyExistsException")


_DOMAIN_PARAMS = field_params(AcceptedDomain, only={"domain_type", "address_book_enabled", "match_sub_domains",
                                                    "lmtp_target"})


@cmdlet("Get-AcceptedDomain", [Param("Identity", position=0, from_pipeline=True)],
        synopsis="List accepted domains.", default_view="AcceptedDomain")
def get_accepted_domain(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List the domains this organisation accepts mail for."""
    with ctx.store.reader() as tx:
        items = tx.list(AcceptedDomain) if args.get("Identity") is None else [resolve_domain(tx, args["Identity"])]
    return [present(d) for d in items]


@cmdlet("New-AcceptedDomain",
        [Param("Name", convert=to_str, mandatory=True, position=0),
         Param("DomainName", convert=parse_domain_name, mandatory=True, type_name="SmtpDomainWithSubdomains"),
         *_DOMAIN_PARAMS],
        synopsis="Accept mail for a domain.", mutates=True, default_view="AcceptedDomain",
        examples=['New-AcceptedDomain -Name "Contoso" -DomainName contoso.com -DomainType Authoritative'])
def new_accepted_domain(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Accept mail for a domain: Authoritative (mailboxes here), InternalRelay or ExternalRelay (routed on)."""
    with ctx.store.transaction() as tx:
        existing = tx.list(AcceptedDomain)
        domain_type = args.get("DomainType") or DomainType.Authoritative
        data = dict(name=args["Name"], domain_name=args["DomainName"], domain_type=domain_type,
                    default=not existing, address_book_enabled=domain_type is DomainType.Authoritative)
        domain = validate(AcceptedDomain, data)
        domain = apply_changes(domain, {k: v for k, v in args.items() if k in ("AddressBookEnabled", "MatchSubDomains", "LmtpTarget")})
        _check_domain_unique(tx, domain)
        if not ctx.should_process(f'Creating accepted domain "{domain.name}" ({domain.domain_name}, {domain.domain_type}).'):
            return []
        tx.put(domain)
    return [present(domain)]


@cmdlet("Set-AcceptedDomain",
        [Param("Identity", mandatory=True, position=0, from_pipeline=True), Param("Name", convert=to_str),
         Param("MakeDefault", convert=to_bool, type_name="Boolean"), *_DOMAIN_PARAMS],
        synopsis="Change an accepted domain.", mutates=True)
def set_accepted_domain(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change an accepted domain's type or name, or make it the default domain."""
    with ctx.store.transaction() as tx:
        domain = resolve_domain(tx, args["Identity"])
        changes = {k: v for k, v in args.items() if k in ("Name", "DomainType", "AddressBookEnabled", "MatchSubDomains", "LmtpTarget")}
        updated = apply_changes(domain, changes)
        if args.get("MakeDefault") is False and domain.default:
            raise UserError("The default accepted domain stays the default until another one is made default with "
                            "-MakeDefault $true.", parameter="MakeDefault")
        _check_domain_unique(tx, updated)
        if not ctx.should_process(f'Setting accepted domain "{domain.name}".'):
            return []
        if args.get("MakeDefault"):
            for other in tx.list(AcceptedDomain):
                if other.default and other.guid != updated.guid:
                    tx.put(apply_changes(other, {"Default": False}))
            updated = apply_changes(updated, {"Default": True})
        tx.put(updated)
    return []


@cmdlet("Remove-AcceptedDomain", [Param("Identity", mandatory=True, position=0, from_pipeline=True)],
        synopsis="Stop accepting mail for a domain.", mutates=True)
def remove_accepted_domain(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Remove an accepted domain (not the default one, and not while mailboxes use it)."""
    with ctx.store.transaction() as tx:
        domain = resolve_domain(tx, args["Identity"])
        if domain.default:
            raise UserError(f'"{domain.name}" is the default accepted domain and can\'t be removed. Make another '
                            "domain the default first (Set-AcceptedDomain <name> -MakeDefault $true).")
        users = [m.name for m in tx.list(Mailbox) if any(domain.matches(a.split("@")[1]) for a in m.addresses())]
        if users:
            raise UserError(f'The accepted domain "{domain.name}" is used by mailbox addresses ({", ".join(users[:5])}); '
                            "change those addresses first.")
        if not ctx.should_process(f'Removing accepted domain "{domain.name}".'):
            return []
        tx.delete(domain)
    return []


# ---------------------------------------------------------------------------
# Mailboxes


def _mailbox_match(obj: Mailbox, key: str) -> bool:
    return key in (obj.name.lower(), obj.alias.lower()) or key in obj.addresses() or wildcard_match(key, obj.name)


def resolve_mailbox(tx: ConfigTransaction, identity: Any) -> Mailbox:
    return find_one(tx, Mailbox, identity, kind_text="mailboxes", match=_mailbox_match)


def _to_password(value: Any) -> str:
    value = scalar(value)
    if isinstance(value, SecureString):
        return value.reveal()
    if isinstance(value, str):
        return value
    raise ValueError("Cannot convert the value to type System.Security.SecureString; use "
                     '(ConvertTo-SecureString "..." -AsPlainText -Force)')


def _address_entry(value: Any) -> str:
    text = to_str(value).strip()
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() == "smtp":
        return f"{prefix}:{parse_smtp_address(rest)}"
    return "smtp:" + parse_smtp_address(text)


_address_entries = multi_valued(_address_entry)


def _check_mailbox(tx: ConfigTransaction, mailbox: Mailbox) -> None:
    domains = tx.list(AcceptedDomain)
    for address in mailbox.addresses():
        domain = address.rsplit("@", 1)[1]
        if not any(d.matches(domain) and d.domain_type is not DomainType.ExternalRelay for d in domains):
            raise InvalidValueError(f"The address {address} is in the domain {domain}, which isn't an Authoritative "
                                    "or InternalRelay accepted domain. Add it with New-AcceptedDomain first.",
                                    parameter="EmailAddresses")
    for other in tx.list(Mailbox):
        if other.guid == mailbox.guid:
            continue
        if other.name.lower() == mailbox.name.lower():
            raise ConflictError(f'A mailbox named "{mailbox.name}" already exists.', parameter="Name",
                                exception_name="ADObjectAlreadyExistsException")
        if other.alias.lower() == mailbox.alias.lower():
            raise ConflictError(f'The alias "{mailbox.alias}" is already used by mailbox "{other.name}".',
                                parameter="Alias", exception_name="ADObjectAlreadyExistsException")
        theirs = {address_key(a) for a in other.addresses()}
        clash = [a for a in mailbox.addresses() if address_key(a) in theirs]
        if clash:
            raise ConflictError(f'The address {clash[0]} is already used by mailbox "{other.name}".',
                                parameter="EmailAddresses", exception_name="ProxyAddressExistsException")


def _alias_from(name: str) -> str:
    """The alias Exchange makes of a name: spaces become dots, what an address can't hold goes, dots don't repeat."""
    alias = re.sub(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]", "", name.replace(" ", "."))
    return re.sub(r"\.{2,}", ".", alias).strip(".") or "mailbox"


def _sync_primary(mailbox: Mailbox, primary: str) -> list[str]:
    entries = [e for e in mailbox.email_addresses if e.split(":", 1)[1].lower() != primary.lower()]
    entries = ["smtp:" + e.split(":", 1)[1] if e.startswith("SMTP:") else e for e in entries]
    return [f"SMTP:{primary}", *entries]


_MAILBOX_COMMON = [
    Param("Alias", convert=to_str), Param("DisplayName", convert=to_str),
    Param("PrimarySmtpAddress", convert=parse_smtp_address, aliases=("UserPrincipalName", "WindowsEmailAddress"),
          type_name="SmtpAddress"),
    Param("Password", convert=_to_password, type_name="SecureString",
          help='The password for SMTP AUTH: (ConvertTo-SecureString "..." -AsPlainText -Force).'),
    Param("EmailAddresses", convert=_address_entries, multi=True, type_name="ProxyAddressCollection",
          help='All addresses; "SMTP:" marks the primary, "smtp:" the others. @{Add=...} adds aliases.'),
    Param("ForwardingSmtpAddress", convert=lambda v: None if scalar(v) is None else parse_smtp_address(scalar(v)),
          type_name="ProxyAddress"),
    Param("DeliverToMailboxAndForward", convert=to_bool, type_name="Boolean"),
    Param("HiddenFromAddressListsEnabled", convert=to_bool, type_name="Boolean"),
]


@cmdlet("Get-Mailbox",
        [Param("Identity", position=0, from_pipeline=True), Param("Arbitration", switch=True,
                                                                  help="List the system mailboxes instead."),
         Param("ResultSize", convert=to_result_size)],
        synopsis="List mailboxes.", default_view="Mailbox")
def get_mailbox(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """List mailboxes (-Arbitration lists the system mailbox Test-Mailflow sends from)."""
    with ctx.store.reader() as tx:
        if args.get("Identity") is not None:
            items = [resolve_mailbox(tx, args["Identity"])]
        else:
            system = bool(args.get("Arbitration"))
            items = [m for m in tx.list(Mailbox) if (m.recipient_type_details != "UserMailbox") == system]
    return [present(m) for m in first_results(ctx, items, args)]


@cmdlet("New-Mailbox", [Param("Name", convert=to_str, mandatory=True, position=0), *_MAILBOX_COMMON],
        synopsis="Create a mailbox.", mutates=True, default_view="Mailbox",
        examples=['New-Mailbox -Name "Admin" -PrimarySmtpAddress admin@domain.com '
                  '-Password (ConvertTo-SecureString "P@ssw0rd!" -AsPlainText -Force)'])
def new_mailbox(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Create a mailbox; mail for its addresses is delivered to its Maildir in the data directory."""
    with ctx.store.transaction() as tx:
        alias = args.get("Alias") or _alias_from(args["Name"])
        primary = args.get("PrimarySmtpAddress")
        if primary is None:
            default = next((d for d in tx.list(AcceptedDomain) if d.default), None)
            if default is None:
                raise ParameterError("No accepted domain exists: give -PrimarySmtpAddress or create one with "
                                     "New-AcceptedDomain.", parameter="PrimarySmtpAddress")
            try:
                primary = parse_smtp_address(f"{alias}@{default.domain_name.removeprefix('*.')}")
            except ValueError as exc:
                raise InvalidValueError(f"The alias makes no address in {default.domain_name}: {exc}. Give -Alias or "
                                        "-PrimarySmtpAddress.", parameter="Alias") from None
        mailbox = validate(Mailbox, dict(name=args["Name"], alias=alias, display_name=args.get("DisplayName") or args["Name"],
                                         primary_smtp_address=primary, email_addresses=[f"SMTP:{primary}"]))
        changes = {k: v for k, v in args.items() if k in ("EmailAddresses", "ForwardingSmtpAddress",
                                                          "DeliverToMailboxAndForward", "HiddenFromAddressListsEnabled")}
        mailbox = _apply_mailbox_changes(mailbox, changes, args.get("Password"))
        _check_mailbox(tx, mailbox)
        if not ctx.should_process(f'Creating mailbox "{mailbox.name}" <{mailbox.primary_smtp_address}>.'):
            return []
        tx.put(mailbox)
    if mailbox.password_hash is None:
        ctx.warn(f'Mailbox "{mailbox.name}" has no password, so it can\'t authenticate with SMTP AUTH. '
                 "Set one with Set-Mailbox -Password.")
    return [present(mailbox)]


def _apply_mailbox_changes(mailbox: Mailbox, changes: dict[str, Any], password: str | None) -> Mailbox:
    entries = changes.pop("EmailAddresses", None)
    if entries is not None:
        if isinstance(entries, MultiValuedChange):
            entries = entries.apply_to(list(mailbox.email_addresses), "EmailAddresses")
        primaries = [e for e in entries if e.startswith("SMTP:")]
        if len(primaries) > 1:
            raise InvalidValueError("Only one address can be the primary (SMTP:) address.", parameter="EmailAddresses")
        if primaries:
            changes["PrimarySmtpAddress"] = primaries[0][5:]
        else:
            entries = [f"SMTP:{mailbox.primary_smtp_address}", *[e for e in entries
                                                                 if e[5:].lower() != mailbox.primary_smtp_address.lower()]]
        changes["EmailAddresses"] = entries
    updated = apply_changes(mailbox, changes)
    if "PrimarySmtpAddress" in changes:
        updated = apply_changes(updated, {"EmailAddresses": _sync_primary(updated, updated.primary_smtp_address)})
    if password is not None:
        if len(password) < 1:
            raise InvalidValueError("The password can't be empty.", parameter="Password")
        updated = apply_changes(updated, {"PasswordHash": hash_password(password)})
    return updated


@cmdlet("Set-Mailbox", [Param("Identity", mandatory=True, position=0, from_pipeline=True),
                        Param("Name", convert=to_str), *_MAILBOX_COMMON,
                        Param("Arbitration", switch=True,
                              help="Exchange needs it to change a system (arbitration) mailbox; accepted here, "
                                   "not required.")],
        synopsis="Change a mailbox.", mutates=True,
        examples=['Set-Mailbox admin -EmailAddresses @{Add="postmaster@domain.com"}'])
def set_mailbox(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Change a mailbox's addresses, password or forwarding."""
    with ctx.store.transaction() as tx:
        mailbox = resolve_mailbox(tx, args["Identity"])
        changes = {k: v for k, v in args.items() if k in ("Name", "Alias", "DisplayName", "PrimarySmtpAddress",
                                                          "EmailAddresses", "ForwardingSmtpAddress",
                                                          "DeliverToMailboxAndForward", "HiddenFromAddressListsEnabled")}
        updated = _apply_mailbox_changes(mailbox, changes, args.get("Password"))
        _check_mailbox(tx, updated)
        if not ctx.should_process(f'Setting mailbox "{mailbox.name}".'):
            return []
        tx.put(updated)
    return []


@cmdlet("Remove-Mailbox", [Param("Identity", mandatory=True, position=0, from_pipeline=True)],
        synopsis="Delete a mailbox.", mutates=True)
def remove_mailbox(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Delete a mailbox; its Maildir stays on disk."""
    with ctx.store.transaction() as tx:
        mailbox = resolve_mailbox(tx, args["Identity"])
        if mailbox.recipient_type_details != "UserMailbox":
            raise UserError(f'"{mailbox.name}" is the system mailbox used by Test-Mailflow and can\'t be removed.')
        if not ctx.should_process(f'Removing mailbox "{mailbox.name}".'):
            return []
        tx.delete(mailbox)
    return []


def system_mailbox(domain: str, server: str) -> Mailbox:
    """The arbitration mailbox that Test-Mailflow sends its probes from."""
    local = f"SystemMailbox{{{server}}}"
    return validate(Mailbox, dict(name=f"SystemMailbox{{{server}}}", alias=f"SystemMailbox_{server}",
                                  display_name=f"Microsoft System Attendant ({server})",
                                  primary_smtp_address=f"{local}@{domain}",
                                  email_addresses=[f"SMTP:{local}@{domain}"],
                                  recipient_type_details="ArbitrationMailbox", hidden_from_address_lists_enabled=True))
