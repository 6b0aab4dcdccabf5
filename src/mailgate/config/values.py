"""Exchange's value types: how each is parsed from what an administrator types
and how it is printed back.

Every type here parses with ``parse(text)`` (raising ``ValueError`` with a
message for the user) and prints with ``str()`` exactly as Exchange prints it.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, ValidationInfo

from mailgate.smtp.address import domain_key

# ---------------------------------------------------------------------------
# Sizes


_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
BYTE_SIZE_MAX = 2**64 - 1   # ByteQuantifiedSize counts bytes in a UInt64
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*(?:\(([\d,]+) bytes\))?\s*$", re.I)


@dataclass(frozen=True, order=True)
class ByteSize:
    """Exchange's ByteQuantifiedSize: a byte count, or Unlimited (``bytes is None``)."""

    bytes: int | None

    @classmethod
    def parse(cls, value: Any, *, given: bool = True) -> "ByteSize":
        if isinstance(value, ByteSize):
            return value
        if value is None:
            raise ValueError("a size is required (for example 36MB, 10485760 or Unlimited)")
        if isinstance(value, bool):
            raise ValueError(f'"{value}" is not a size')
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f'"{value}" is negative')
            return cls._at_most_max(value, value, given)
        text = str(value).strip()
        if text.lower() == "unlimited":
            return cls(None)
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f'"{text}" is not a valid size; use a number with B, KB, MB, GB or TB (for example 36MB), or Unlimited')
        if m.group(3):
            return cls._at_most_max(int(m.group(3).replace(",", "")), text, given)
        number = float(m.group(1))
        unit = (m.group(2) or "B").upper()
        return cls._at_most_max(int(round(number * _UNITS[unit])), text, given)

    @classmethod
    def _at_most_max(cls, count: int, text: Any, given: bool) -> "ByteSize":
        if given and count > BYTE_SIZE_MAX:
            raise ValueError(f'"{text}" is too large: a size is at most {BYTE_SIZE_MAX:,} bytes, or Unlimited')
        return cls(count)

    @property
    def unlimited(self) -> bool:
        return self.bytes is None

    def __str__(self) -> str:
        if self.bytes is None:
            return "Unlimited"
        n = self.bytes
        unit = "B"
        for name in ("TB", "GB", "MB", "KB"):
            if n >= _UNITS[name]:
                unit = name
                break
        amount = n / _UNITS[unit]
        shown = f"{amount:.2f}".rstrip("0").rstrip(".") if unit != "B" else str(n)
        return f"{shown} {unit} ({n:,} bytes)"

    def allows(self, size: int) -> bool:
        return self.bytes is None or size <= self.bytes


def size_in_range(size: ByteSize, low: int, high: int, *, allow_unlimited: bool) -> ByteSize:
    if size.bytes is None:
        if not allow_unlimited:
            raise ValueError("Unlimited is not allowed here")
        return size
    if not low <= size.bytes <= high:
        raise ValueError(f"the value must be between {ByteSize(low)} and {ByteSize(high)}")
    return size


# ---------------------------------------------------------------------------
# Time spans


_TS_RE = re.compile(r"^\s*(-)?(?:(\d+)\.)?(\d{1,2}):(\d{1,2})(?::(\d{1,2})(?:\.(\d{1,7}))?)?\s*$")
_DAYS_RE = re.compile(r"^\s*(\d+)\s*$")


TIMESPAN_MAX_SECONDS = 922337203685.4775807   # .NET TimeSpan.MaxValue: 10675199.02:48:05.4775807


@dataclass(frozen=True, order=True)
class TimeSpan:
    """Exchange's EnhancedTimeSpan, printed as ``[d.]hh:mm:ss[.fffffff]``."""

    seconds: float

    @classmethod
    def parse(cls, value: Any, *, given: bool = True) -> "TimeSpan":
        if isinstance(value, TimeSpan):
            return value
        if isinstance(value, dt.timedelta):
            return cls(value.total_seconds())
        if isinstance(value, bool) or value is None:
            raise ValueError(f'"{value}" is not a time span; use [d.]hh:mm:ss, for example 00:05:00')
        if isinstance(value, (int, float)):
            # PowerShell converts a bare number to a TimeSpan of that many days.
            return cls._within_range(float(value) * 86400, value, given)
        text = str(value)
        m = _TS_RE.match(text)
        if m:
            sign, days, hours, minutes, secs, frac = m.groups()
            if int(minutes) > 59 or (secs and int(secs) > 59) or int(hours) > 23:
                raise ValueError(f'"{text}" is not a valid time span: hours must be 0-23, minutes and seconds 0-59')
            total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(secs or 0)
            if frac:
                total += int(frac.ljust(7, "0")) / 1e7
            return cls._within_range(-total if sign else float(total), text, given)
        m = _DAYS_RE.match(text)
        if m:
            return cls._within_range(int(m.group(1)) * 86400.0, text, given)
        raise ValueError(f'"{text}" is not a valid time span; use [d.]hh:mm:ss, for example 00:05:00 or 2.00:00:00')

    @classmethod
    def _within_range(cls, seconds: float, text: Any, given: bool) -> "TimeSpan":
        """.NET's TimeSpan holds ±10675199.02:48:05.4775807; beyond that (or inf, NaN) is no time span."""
        if not math.isfinite(seconds) or (given and abs(seconds) > TIMESPAN_MAX_SECONDS):
            raise ValueError(f'"{text}" is too large for a time span; the largest is 10675199.02:48:05.4775807')
        return cls(seconds)

    def __str__(self) -> str:
        total = abs(self.seconds)
        ticks = int(round(total * 1e7))
        whole, frac = divmod(ticks, 10_000_000)
        days, rem = divmod(whole, 86400)
        hours, rem = divmod(rem, 3600)
        minutes, secs = divmod(rem, 60)
        text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
        if days:
            text = f"{days}.{text}"
        if frac:
            text += f".{frac:07d}"
        return ("-" if self.seconds < 0 else "") + text

    @property
    def timedelta(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.seconds)


def timespan_in_range(value: TimeSpan, low: str, high: str) -> TimeSpan:
    lo, hi = TimeSpan.parse(low), TimeSpan.parse(high)
    if not lo.seconds <= value.seconds <= hi.seconds:
        raise ValueError(f"the value must be between {lo} and {hi}")
    return value


# ---------------------------------------------------------------------------
# Integers that may be Unlimited


@dataclass(frozen=True, order=True)
class UnlimitedInt:
    value: int | None  # None = Unlimited

    @classmethod
    def parse(cls, value: Any, *, given: bool = True) -> "UnlimitedInt":
        if isinstance(value, UnlimitedInt):
            return value
        if isinstance(value, bool) or value is None:
            raise ValueError(f'"{value}" is not a number or Unlimited')
        if isinstance(value, int):
            return cls._int32(value, value, given)
        text = str(value).strip()
        if text.lower() == "unlimited":
            return cls(None)
        try:
            number = int(text.replace(",", ""))
        except ValueError:
            raise ValueError(f'"{text}" is not a number or Unlimited') from None
        return cls._int32(number, text, given)

    @classmethod
    def _int32(cls, number: int, text: Any, given: bool) -> "UnlimitedInt":
        """Exchange's Unlimited<int>: a 32-bit number."""
        if given and not -2**31 <= number < 2**31:
            raise ValueError(f'"{text}" is out of range: Value was either too large or too small for an Int32')
        return cls(number)

    def __str__(self) -> str:
        return "Unlimited" if self.value is None else str(self.value)

    def exceeded_by(self, count: int) -> bool:
        return self.value is not None and count > self.value


def int_in_range(value: int | UnlimitedInt, low: int, high: int) -> Any:
    n = value.value if isinstance(value, UnlimitedInt) else value
    if n is not None and not low <= n <= high:
        raise ValueError(f"the value must be between {low} and {high}")
    return value


# ---------------------------------------------------------------------------
# IP ranges and bindings


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # scope ids are accepted and ignored
    return ipaddress.ip_address(text)


@dataclass(frozen=True)
class IPRange:
    """One entry of RemoteIPRanges: a single address, ``a-b`` or CIDR."""

    first: int
    last: int
    version: int
    text: str

    @classmethod
    def parse(cls, value: Any) -> "IPRange":
        if isinstance(value, IPRange):
            return value
        text = str(value).strip()
        if not text:
            raise ValueError("an empty IP range is not valid")
        try:
            if "/" in text:
                net = ipaddress.ip_network(text.split("%", 1)[0], strict=False)
                return cls(int(net.network_address), int(net.broadcast_address), net.version,
                           f"{net.network_address}/{net.prefixlen}")
            if "-" in text:
                a_text, b_text = text.split("-", 1)
                a, b = parse_ip(a_text), parse_ip(b_text)
                if a.version != b.version:
                    raise ValueError("both ends of a range must be of the same address family")
                if int(a) > int(b):
                    raise ValueError(f"the start address {a} is greater than the end address {b}")
                return cls(int(a), int(b), a.version, f"{a}-{b}")
            ip = parse_ip(text)
            return cls(int(ip), int(ip), ip.version, str(ip))
        except ValueError as exc:
            raise ValueError(f'"{text}" is not a valid IP range ({exc}); use an address (192.168.1.10), '
                             f"a range (192.168.1.1-192.168.1.254) or CIDR (192.168.1.0/24)") from None

    def __str__(self) -> str:
        return self.text

    def ps_property(self, name: str) -> Any:
        """Exchange's IPRange properties, for the shell (``$rc.RemoteIPRanges[0].LowerBound``)."""
        key = name.lower()
        if key in ("lowerbound", "upperbound"):
            value = self.first if key == "lowerbound" else self.last
            return str(ipaddress.IPv4Address(value) if self.version == 4 else ipaddress.IPv6Address(value))
        if key == "rangeformat":
            return "CIDR" if "/" in self.text else "LoHi" if "-" in self.text else "SingleAddress"
        if key == "cidrlength":
            return int(self.text.rsplit("/", 1)[1]) if "/" in self.text else None
        return None

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.version == self.version and self.first <= int(ip) <= self.last

    def contains_range(self, other: "IPRange") -> bool:
        return other.version == self.version and self.first <= other.first and other.last <= self.last

    def overlaps(self, other: "IPRange") -> bool:
        return other.version == self.version and self.first <= other.last and other.first <= self.last

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IPRange) and (self.first, self.last, self.version) == (other.first, other.last, other.version)

    def __hash__(self) -> int:
        return hash((self.first, self.last, self.version))


ALL_IPV4 = IPRange.parse("0.0.0.0-255.255.255.255")
ALL_IPV6 = IPRange.parse("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


@dataclass(frozen=True)
class IPBinding:
    """One entry of Bindings: a local ``IP:port``."""

    address: IPAddress
    port: int

    @classmethod
    def parse(cls, value: Any) -> "IPBinding":
        if isinstance(value, IPBinding):
            return value
        text = str(value).strip()
        m = re.match(r"^\[([0-9a-fA-F:.%A-Za-z]+)\]:(\d+)$", text) or re.match(r"^([0-9.]+):(\d+)$", text)
        if not m:
            raise ValueError(f'"{text}" is not a valid binding; use IPv4:port (0.0.0.0:25) or [IPv6]:port ([::]:25)')
        try:
            address = parse_ip(m.group(1))
        except ValueError:
            raise ValueError(f'"{text}" is not a valid binding: "{m.group(1)}" is not an IP address') from None
        port = int(m.group(2))
        if not 1 <= port <= 65535:
            raise ValueError(f'"{text}" is not a valid binding: the port must be between 1 and 65535')
        return cls(address, port)

    def ps_property(self, name: str) -> Any:
        """Exchange's IPBinding properties (an IPEndPoint's), for the shell (``$rc.Bindings[0].Port``)."""
        return {"address": str(self.address), "port": self.port,
                "addressfamily": "InterNetwork" if self.version == 4 else "InterNetworkV6"}.get(name.lower())

    @property
    def is_wildcard(self) -> bool:
        return self.address.is_unspecified

    @property
    def version(self) -> int:
        return self.address.version

    def collides_with(self, other: "IPBinding") -> bool:
        """Exchange's rule: identical, or same family and port with a wildcard on either side."""
        if self.port != other.port or self.version != other.version:
            return False
        return self.address == other.address or self.is_wildcard or other.is_wildcard

    def matches_local(self, ip: IPAddress, port: int) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return port == self.port and ip.version == self.version and (self.is_wildcard or ip == self.address)

    def __str__(self) -> str:
        if self.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


# ---------------------------------------------------------------------------
# Domains, address spaces, smart hosts


_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_DOMAIN_RE = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")


def is_domain(text: str) -> bool:
    if len(text) > 255:
        return False
    try:
        ascii_text = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        return False
    return bool(_DOMAIN_RE.match(ascii_text))


LMTP_PORT = 24   # RFC 2033 suggests no port; 24 is the one set aside for private mail systems, as Postfix uses


def parse_lmtp_target(text: str) -> tuple[str, int]:
    """An accepted domain's LmtpTarget: ``host``, ``host:port``, ``[IPv6]`` or ``[IPv6]:port`` (port 24 when
    none is given), where host is a host name or an IP address."""
    value = text.strip()
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", value) or re.match(r"^([^:\[\]]+)(?::(\d+))?$", value)
    if not m:
        raise ValueError(f'"{text}" is not an LMTP target: use host, host:port or [IPv6]:port, e.g. mailstore.contoso.com:24')
    host, port = m.group(1), int(m.group(2)) if m.group(2) else LMTP_PORT
    try:
        parse_ip(host)
    except ValueError:
        if value.startswith("[") or not is_domain(host):
            raise ValueError(f'"{text}" is not an LMTP target: "{host}" is neither a host name nor an IP address') from None
    if not 1 <= port <= 65535:
        raise ValueError(f'"{text}" is not an LMTP target: the port must be between 1 and 65535')
    return host, port


def normalise_domain(text: str) -> str:
    return text.strip().rstrip(".").lower()


@dataclass(frozen=True)
class AddressSpace:
    """``[Type:]AddressSpace[;Cost]`` of a send connector."""

    type: str
    domain: str
    cost: int = 1

    @classmethod
    def parse(cls, value: Any) -> "AddressSpace":
        if isinstance(value, AddressSpace):
            return value
        text = str(value).strip()
        cost = 1
        if ";" in text:
            text, cost_text = text.rsplit(";", 1)
            try:
                cost = int(cost_text)
            except ValueError:
                raise ValueError(f'"{value}": the cost "{cost_text}" is not a number between 1 and 100') from None
            if not 1 <= cost <= 100:
                raise ValueError(f'"{value}": the cost must be between 1 and 100')
        type_ = "SMTP"
        if ":" in text:
            type_, text = text.split(":", 1)
            type_ = type_.strip()
            if not type_:
                raise ValueError(f'"{value}": the address space type is empty')
        text = text.strip()
        if type_.upper() == "SMTP":
            type_ = "SMTP"
            domain = normalise_domain(text)
            if domain in ("*", "--"):
                pass
            elif domain.startswith("*."):
                if not is_domain(domain[2:]):
                    raise ValueError(f'"{value}" is not a valid SMTP address space')
            elif "*" in domain or not is_domain(domain):
                raise ValueError(f'"{value}" is not a valid SMTP address space; use *, contoso.com or *.contoso.com')
            text = domain
        elif not text:
            raise ValueError(f'"{value}": the address space is empty')
        return cls(type_, text, cost)

    def __str__(self) -> str:
        return f"{self.type}:{self.domain};{self.cost}"

    def match_length(self, domain: str) -> int:
        """How specifically this space matches ``domain``; -1 when it does not match.

        Longer is more specific: an exact domain beats ``*.domain`` which beats ``*``.
        """
        if self.type != "SMTP":
            return -1
        if self.domain == "*":
            return 0
        # An internationalised name matches in A-labels or U-labels alike; lengths count the A-label form.
        domain, own = domain_key(normalise_domain(domain)), domain_key(self.domain)
        if own.startswith("*."):
            suffix = own[2:]
            if domain == suffix or domain.endswith("." + suffix):
                return 2 * len(suffix)  # exact match of the same text still wins below
            return -1
        if domain == own:
            return 2 * len(own) + 1
        return -1


@dataclass(frozen=True)
class SmartHost:
    """A smart host: an FQDN or an IP address (printed bracketed, as Exchange does)."""

    host: str
    is_ip: bool

    @classmethod
    def parse(cls, value: Any) -> "SmartHost":
        if isinstance(value, SmartHost):
            return value
        text = str(value).strip()
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            ip = ipaddress.ip_address(inner)
            return cls(str(ip), True)
        except ValueError:
            pass
        if text != inner or not is_domain(inner) or "." not in inner and inner.lower() != "localhost":
            raise ValueError(f'"{text}" is not a valid smart host; use a fully qualified domain name or an IP address')
        return cls(normalise_domain(inner), False)

    def __str__(self) -> str:
        return f"[{self.host}]" if self.is_ip else self.host


_LOCAL_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SMTP_ADDRESS_RE = re.compile(rf"^{_LOCAL_ATOM}(?:\.{_LOCAL_ATOM})*@[^@\s]+$")


def parse_smtp_address(value: Any) -> str:
    """An SMTP address as a mailbox or accepted-domain property (lower-cased domain)."""
    text = str(value).strip()
    if text.lower().startswith("smtp:"):
        text = text[5:]
    if not _SMTP_ADDRESS_RE.match(text) and not (not text.isascii() and "@" in text and " " not in text):
        raise ValueError(f'"{value}" is not a valid SMTP address')
    local, domain = text.rsplit("@", 1)
    if not is_domain(domain) or "." not in domain:
        raise ValueError(f'"{value}" is not a valid SMTP address: "{domain}" is not a domain name')
    return f"{local}@{normalise_domain(domain)}"


# ---------------------------------------------------------------------------
# Enumerations (flags print comma-separated in declaration order, like Exchange)


class ExchangeFlag(enum.IntFlag):
    """An Exchange [Flags] value: names joined with commas, as a list or in one text; no flag is ``EMPTY``."""

    @classmethod
    def _empty_name(cls) -> str:
        return "None"

    @classmethod
    def parse(cls, value: Any) -> "ExchangeFlag":
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        items: list[Any] = []
        for item in value if isinstance(value, (list, tuple)) else [value]:
            items += [item] if isinstance(item, cls) else str(item).split(",")
        result = cls(0)
        names = {m.name.lower(): m for m in cls}  # type: ignore[union-attr]
        empty = cls._empty_name()
        for item in items:
            if isinstance(item, cls):
                result |= item
                continue
            key = str(item).strip().lower()
            if not key or key in ("none", empty.lower()):
                continue
            if key not in names:
                valid = ", ".join(m.name for m in cls)  # type: ignore[misc]
                raise ValueError(f'"{str(item).strip()}" is not a valid value; valid values are: {empty}, {valid}')
            result |= names[key]
        return result

    def names(self) -> list[str]:
        return [m.name for m in type(self) if m.value and m in self]  # type: ignore[misc]

    def __str__(self) -> str:
        return ", ".join(self.names()) or self._empty_name()


class ExchangeEnum(str, enum.Enum):
    @classmethod
    def parse(cls, value: Any) -> "ExchangeEnum":
        if isinstance(value, cls):
            return value
        key = str(value).strip().lower()
        for m in cls:
            if m.value.lower() == key:
                return m
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f'"{value}" is not a valid value; valid values are: {valid}')

    def __str__(self) -> str:
        return self.value


class AuthMechanism(ExchangeFlag):
    Tls = 1
    Integrated = 2
    BasicAuth = 4
    BasicAuthRequireTLS = 8
    ExchangeServer = 16
    ExternalAuthoritative = 32


class PermissionGroups(ExchangeFlag):
    AnonymousUsers = 1
    ExchangeUsers = 2
    ExchangeServers = 4
    ExchangeLegacyServers = 8
    Partners = 16
    Custom = 32


class ReceiveUsage(ExchangeEnum):
    Client = "Client"
    Custom = "Custom"
    Internal = "Internal"
    Internet = "Internet"
    Partner = "Partner"


class SendUsage(ExchangeEnum):
    Custom = "Custom"
    Internal = "Internal"
    Internet = "Internet"
    Partner = "Partner"


class TransportRole(ExchangeEnum):
    FrontendTransport = "FrontendTransport"
    HubTransport = "HubTransport"


class ProtocolLoggingLevel(ExchangeEnum):
    None_ = "None"
    Verbose = "Verbose"


class SmartHostAuthMechanism(ExchangeEnum):
    None_ = "None"
    BasicAuth = "BasicAuth"
    BasicAuthRequireTLS = "BasicAuthRequireTLS"
    ExchangeServer = "ExchangeServer"
    ExternalAuthoritative = "ExternalAuthoritative"


class TlsAuthLevel(ExchangeEnum):
    EncryptionOnly = "EncryptionOnly"
    CertificateValidation = "CertificateValidation"
    DomainValidation = "DomainValidation"


class SizeMode(ExchangeEnum):
    Enabled = "Enabled"
    Disabled = "Disabled"
    EnabledWithoutValue = "EnabledWithoutValue"


class DomainType(ExchangeEnum):
    Authoritative = "Authoritative"
    InternalRelay = "InternalRelay"
    ExternalRelay = "ExternalRelay"


class ErrorPolicies(ExchangeFlag):
    """A send connector's error policies (several, comma-separated); none is Default."""
    DowngradeDnsFailures = 1
    DowngradeCustomFailures = 2
    UpgradeCustomFailures = 4

    @classmethod
    def _empty_name(cls) -> str:
        return "Default"


class MessageRateSource(ExchangeEnum):
    None_ = "None"
    User = "User"
    IPAddress = "IPAddress"
    All = "All"


# ---------------------------------------------------------------------------
# pydantic glue: each value type is stored as its printed text.


def _field(cls: Any) -> Any:
    return Annotated[cls, BeforeValidator(cls.parse), PlainSerializer(str, return_type=str)]


# Validation context of a value an administrator gives now: its type's limits apply. A value read from the
# store is validated without it, so one kept before a limit existed still loads (and can be changed).
GIVEN = {"given": True}


def _limited_field(cls: Any) -> Any:
    def parse(value: Any, info: ValidationInfo) -> Any:
        return cls.parse(value, given=bool(info.context and info.context.get("given")))
    return Annotated[cls, BeforeValidator(parse), PlainSerializer(str, return_type=str)]


ByteSizeField = _limited_field(ByteSize)
TimeSpanField = _limited_field(TimeSpan)
UnlimitedIntField = _limited_field(UnlimitedInt)
IPRangeField = _field(IPRange)
IPBindingField = _field(IPBinding)
AddressSpaceField = _field(AddressSpace)
SmartHostField = _field(SmartHost)


def parse_log_path(value: Any) -> str | None:
    """A log directory given to Set-TransportService: a full path (Exchange's LocalLongFullPath), "" for the
    data directory's logs/, or None ($null: that log is off). Checked where it is given, not where it is
    stored, so a value an older version kept still loads."""
    if value is None:
        return None
    text = str(value)
    if text and (not text.startswith("/") or "\0" in text):
        raise ValueError(f'"{text}" is not a full path: give one that starts with "/", "" for the data '
                         "directory's logs/, or $null to turn the log off")
    return text


def flag_field(cls: Any) -> Any:
    return Annotated[cls, BeforeValidator(cls.parse), PlainSerializer(lambda v: v.names(), return_type=list)]


class ExchangeServices(ExchangeFlag):
    IMAP = 1
    POP = 2
    UM = 4
    IIS = 8
    SMTP = 16
    Federation = 32
    UMCallRouter = 64


AuthMechanismField = flag_field(AuthMechanism)
PermissionGroupsField = flag_field(PermissionGroups)
ExchangeServicesField = flag_field(ExchangeServices)
ErrorPoliciesField = flag_field(ErrorPolicies)
