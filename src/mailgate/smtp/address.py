"""Envelope addresses and ESMTP parameters (RFC 5321, 6531, 3461, 3030, 1870)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import dns.exception
import dns.name

MAX_PATH = 256
MAX_LOCAL = 64
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
_DOT_STRING_UTF8 = re.compile(rf"^(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|[^\x00-\x7f])*"$')
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_LABEL_UTF8 = re.compile(r"^(?!-)(?:[A-Za-z0-9-]|[^\x00-\x7f]){1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNQUOTED_SPECIAL = re.compile(r"[ <>]")


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Address:
    """An envelope address; ``Address.null()`` is the null reverse-path ``<>``."""

    local: str
    domain: str  # lower-cased; "" for the null path or an unqualified address

    @classmethod
    def null(cls) -> "Address":
        return cls("", "")

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()

    def __str__(self) -> str:
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def bracketed(self) -> str:
        return f"<{self}>"

    def lower(self) -> str:
        return str(self).lower()


def a_labels(domain: str) -> str | None:
    """An internationalised domain name in A-labels, lower-cased — ``xn--bcher-kva.example`` for
    ``bücher.example`` or ``XN--BCHER-KVA.example`` (IDNA 2008, as DNS routing looks names up); None for a
    plain ASCII name or one that isn't a valid IDN."""
    if domain.isascii() and "xn--" not in domain.lower():
        return None
    try:
        return dns.name.from_text(domain).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def domain_key(domain: str) -> str:
    """The one spelling of a domain that comparisons use: lower-cased, an internationalised name in A-labels."""
    return a_labels(domain) or domain.lower()


def address_key(address: str) -> str:
    """The one spelling of an address that lookups use: lower-cased, its domain as ``domain_key`` has it."""
    local, at, domain = address.rpartition("@")
    return f"{local.lower()}@{domain_key(domain)}" if at else address.lower()


def parse_domain(text: str, *, utf8: bool = False) -> str:
    if not text or len(text) > MAX_DOMAIN:
        raise AddressError("invalid domain")
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        if literal.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(literal[5:])
        else:
            ipaddress.IPv4Address(literal)
        return text.lower()
    labels = text.rstrip(".").split(".")
    pattern = _LABEL_UTF8 if utf8 else _LABEL
    if not all(pattern.match(label) for label in labels):
        raise AddressError("invalid domain")
    return text.rstrip(".").lower()


def parse_mailbox(text: str, *, utf8: bool = False, allow_unqualified: bool = False) -> Address:
    if "@" not in text:
        if allow_unqualified and _DOT_STRING.match(text):
            return Address(text, "")
        raise AddressError("missing domain")
    local, domain = text.rsplit("@", 1)
    if not local or len(local.encode()) > MAX_LOCAL and not utf8:
        raise AddressError("invalid local part")
    if local.startswith('"'):
        if not _QUOTED.match(local):
            raise AddressError("invalid quoted local part")
    elif not (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).match(local):
        raise AddressError("invalid local part")
    if not utf8 and not local.isascii():
        raise AddressError("non-ASCII local part")
    try:
        domain = parse_domain(domain, utf8=utf8)
    except ValueError:
        raise AddressError("invalid domain") from None
    return Address(local, domain)


def split_path(args: str) -> tuple[str, str]:
    """``"<a@b> SIZE=10"`` → ("<a@b>", "SIZE=10"); tolerates a space after the colon and no brackets."""
    args = args.lstrip()
    if args.startswith("<"):
        end = _closing_bracket(args)
        if end < 0:
            raise AddressError("unterminated path")
        return args[: end + 1], args[end + 1:].strip()
    path, _, rest = args.partition(" ")
    return path, rest.strip()


def _closing_bracket(text: str) -> int:
    """Index of the ">" that closes the path opening ``text``, skipping quoted local parts; -1 if none."""
    if '"' not in text:
        return text.find(">", 1)
    in_quote = False
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and in_quote:
            i += 2
            continue
        if ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i
        i += 1
    return -1


def parse_path(path: str, *, utf8: bool = False, allow_null: bool, allow_unqualified: bool = False) -> Address:
    if len(path) > MAX_PATH + 2:
        raise AddressError("path too long")
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if inner == "":
        if allow_null:
            return Address.null()
        raise AddressError("null path not allowed")
    if inner.startswith("@"):  # a source route "@a,@b:user@c": accepted and ignored (RFC 5321 §4.1.2)
        if ":" not in inner:
            raise AddressError("invalid source route")
        inner = inner.split(":", 1)[1]
    if _CONTROL.search(inner):
        raise AddressError("control characters")
    if not inner.startswith('"') and _UNQUOTED_SPECIAL.search(inner):
        raise AddressError("invalid characters")
    return parse_mailbox(inner, utf8=utf8, allow_unqualified=allow_unqualified)


# ---------------------------------------------------------------------------
# ESMTP parameters


_XTEXT = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: printable ASCII but "=", and "+" only as "+HH" (two upper-case hex digits)."""
    if any(ord(c) < 33 or ord(c) > 126 or c == "=" for c in text) or text.count("+") != len(_XTEXT.findall(text)):
        raise AddressError("invalid xtext")
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in text)


@dataclass(slots=True)
class MailParams:
    size: int | None = None
    body: str | None = None          # 7BIT, 8BITMIME, BINARYMIME
    smtputf8: bool = False
    ret: str | None = None           # FULL, HDRS
    envid: str | None = None
    auth: str | None = None


@dataclass(slots=True)
class RcptParams:
    notify: tuple[str, ...] | None = None   # ("NEVER",) or subset of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None                # "rfc822;addr"
    extra: dict[str, str] = field(default_factory=dict)


class ParamError(ValueError):
    """An ESMTP parameter that is unknown, not enabled, or malformed."""


def _xtext_param(key: str, value: str) -> str:
    """An xtext parameter decoded; as Postfix does, what it decodes to must be printable ASCII: ENVID and ORCPT
    are copied into DSNs and AUTH into logs, where "+0D+0A" would start a line of the sender's choosing."""
    try:
        decoded = xtext_decode(value)
    except AddressError:
        raise ParamError(f"{key} is not valid xtext") from None
    if any(not 32 <= ord(c) <= 126 for c in decoded):
        raise ParamError(f"{key} decodes to characters that aren't printable ASCII")
    return decoded


_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")   # RFC 3461: addr-type is an atom


def _split_params(text: str) -> list[tuple[str, str | None]]:
    out = []
    for part in text.split():
        key, sep, value = part.partition("=")
        if not key or (sep and not value):
            raise ParamError(f"malformed parameter {part}")
        out.append((key.upper(), value if sep else None))
    return out


def parse_mail_params(text: str, *, eightbit: bool, binary: bool, smtputf8: bool, dsn: bool) -> MailParams:
    params = MailParams()
    seen = set()
    for key, value in _split_params(text):
        if key in seen:
            raise ParamError(f"duplicate parameter {key}")
        seen.add(key)
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParamError("SIZE needs a number")
            params.size = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body == "7BIT" or (body == "8BITMIME" and eightbit) or (body == "BINARYMIME" and binary):
                params.body = body
            else:
                raise ParamError(f"BODY={value} is not supported")
        elif key == "SMTPUTF8" and smtputf8:
            if value is not None:
                raise ParamError("SMTPUTF8 takes no value")
            params.smtputf8 = True
        elif key == "RET" and dsn:
            if (value or "").upper() not in ("FULL", "HDRS"):
                raise ParamError("RET must be FULL or HDRS")
            params.ret = value.upper()  # type: ignore[union-attr]
        elif key == "ENVID" and dsn:
            if value is None or len(value) > 100:
                raise ParamError("ENVID needs an xtext value of at most 100 characters")
            params.envid = _xtext_param(key, value)
        elif key == "AUTH":
            params.auth = _xtext_param(key, value or "<>")
        else:
            raise ParamError(f"unrecognized parameter {key}")
    return params


def parse_rcpt_params(text: str, *, dsn: bool) -> RcptParams:
    params = RcptParams()
    seen = set()
    for key, value in _split_params(text):
        if key in seen:
            raise ParamError(f"duplicate parameter {key}")
        seen.add(key)
        if key == "NOTIFY" and dsn:
            items = tuple(v.upper() for v in (value or "").split(","))
            if not items or any(i not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for i in items) or \
                    ("NEVER" in items and len(items) > 1):
                raise ParamError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
            params.notify = items
        elif key == "ORCPT" and dsn:
            if value is None or ";" not in value or len(value) > 500:
                raise ParamError("ORCPT needs addr-type;xtext")
            addr_type, _, addr = value.partition(";")
            if not _ADDR_TYPE.fullmatch(addr_type):
                raise ParamError("ORCPT's addr-type must be an atom")
            params.orcpt = f"{addr_type};{_xtext_param(key, addr)}"
        else:
            raise ParamError(f"unrecognized parameter {key}")
    return params
