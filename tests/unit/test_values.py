"""Exchange value types: parsing what administrators type, printing as Exchange prints."""

import pytest

from mailgate.config.values import (
    AddressSpace,
    AuthMechanism,
    ByteSize,
    IPBinding,
    IPRange,
    PermissionGroups,
    SmartHost,
    TimeSpan,
    UnlimitedInt,
    parse_smtp_address,
)


@pytest.mark.parametrize("text,bytes_,shown", [
    ("36MB", 37748736, "36 MB (37,748,736 bytes)"),
    ("36 MB", 37748736, "36 MB (37,748,736 bytes)"),
    ("256KB", 262144, "256 KB (262,144 bytes)"),
    ("10485760", 10485760, "10 MB (10,485,760 bytes)"),
    ("1.5MB", 1572864, "1.5 MB (1,572,864 bytes)"),
    ("35 MB (36,700,160 bytes)", 36700160, "35 MB (36,700,160 bytes)"),
    ("512", 512, "512 B (512 bytes)"),
])
def test_byte_size_round_trips(text, bytes_, shown):
    size = ByteSize.parse(text)
    assert size.bytes == bytes_
    assert str(size) == shown
    assert ByteSize.parse(str(size)) == size


def test_byte_size_unlimited_and_errors():
    assert str(ByteSize.parse("unlimited")) == "Unlimited"
    assert ByteSize.parse("Unlimited").allows(10**12)
    with pytest.raises(ValueError, match="not a valid size"):
        ByteSize.parse("36 parsecs")


@pytest.mark.parametrize("text,seconds,shown", [
    ("00:05:00", 300, "00:05:00"), ("2.00:00:00", 172800, "2.00:00:00"), ("1:00:00", 3600, "01:00:00"),
    ("00:00:01.7949277", 1.7949277, "00:00:01.7949277"), ("30.00:00:00", 2592000, "30.00:00:00"),
])
def test_timespan(text, seconds, shown):
    span = TimeSpan.parse(text)
    assert span.seconds == pytest.approx(seconds)
    assert str(span) == shown


def test_timespan_rejects_out_of_range_fields():
    with pytest.raises(ValueError):
        TimeSpan.parse("00:61:00")
    with pytest.raises(ValueError):
        TimeSpan.parse("soon")


@pytest.mark.parametrize("text,shown,size", [
    ("192.168.0.0/24", "192.168.0.0/24", 256),
    ("192.168.1.1/24", "192.168.1.0/24", 256),
    ("10.0.0.1-10.0.0.9", "10.0.0.1-10.0.0.9", 9),
    ("127.0.0.1", "127.0.0.1", 1),
    ("2001:db8::/64", "2001:db8::/64", 2**64),
    ("fe80::1%11", "fe80::1", 1),
])
def test_ip_ranges(text, shown, size):
    r = IPRange.parse(text)
    assert str(r) == shown and r.size == size


@pytest.mark.parametrize("bad", ["300.1.1.1", "192.168.0.0/33", "10.0.0.9-10.0.0.1", "1.2.3.4-::1", "", "abc"])
def test_bad_ip_ranges(bad):
    with pytest.raises(ValueError):
        IPRange.parse(bad)


def test_range_relations():
    outer, inner, other = IPRange.parse("0.0.0.0-255.255.255.255"), IPRange.parse("192.168.0.0/24"), \
        IPRange.parse("192.168.0.128-192.168.1.10")
    assert outer.contains_range(inner) and not inner.contains_range(outer)
    assert inner.overlaps(other) and not inner.contains_range(other) and not other.contains_range(inner)


def test_bindings():
    assert str(IPBinding.parse("[::]:25")) == "[::]:25"
    assert str(IPBinding.parse("0.0.0.0:25")) == "0.0.0.0:25"
    a, b, c = IPBinding.parse("0.0.0.0:25"), IPBinding.parse("10.0.0.1:25"), IPBinding.parse("[::]:25")
    assert a.collides_with(b) and not a.collides_with(c)
    for bad in ("0.0.0.0", "1.2.3.4:0", "1.2.3.4:70000", "::1:25", "host:25"):
        with pytest.raises(ValueError):
            IPBinding.parse(bad)


def test_address_spaces():
    assert str(AddressSpace.parse("*")) == "SMTP:*;1"
    assert str(AddressSpace.parse("contoso.com;2")) == "SMTP:contoso.com;2"
    assert str(AddressSpace.parse("SMTP:*.contoso.com;5")) == "SMTP:*.contoso.com;5"
    exact, wild, star = (AddressSpace.parse(x) for x in ("marketing.contoso.com", "*.contoso.com", "*"))
    domain = "marketing.contoso.com"
    assert exact.match_length(domain) > wild.match_length(domain) > star.match_length(domain) >= 0
    assert exact.match_length("contoso.com") == -1 and wild.match_length("contoso.com") > 0
    for bad in ("*contoso.com", "contoso.com;0", "contoso.com;101", "bad domain"):
        with pytest.raises(ValueError):
            AddressSpace.parse(bad)


def test_smart_hosts_and_addresses():
    assert str(SmartHost.parse("10.1.1.1")) == "[10.1.1.1]"
    assert str(SmartHost.parse("[10.1.1.1]")) == "[10.1.1.1]"
    assert str(SmartHost.parse("SMTP.Relay.com")) == "smtp.relay.com"
    with pytest.raises(ValueError):
        SmartHost.parse("not a host")
    assert parse_smtp_address("Admin@Domain.COM") == "Admin@domain.com"
    with pytest.raises(ValueError):
        parse_smtp_address("no-at-sign")


def test_flags_print_in_exchange_order():
    am = AuthMechanism.parse("BasicAuth, Tls,Integrated")
    assert str(am) == "Tls, Integrated, BasicAuth"
    assert str(AuthMechanism.parse("None")) == "None"
    assert str(PermissionGroups.parse(["ExchangeServers", "AnonymousUsers"])) == "AnonymousUsers, ExchangeServers"
    with pytest.raises(ValueError, match="not a valid value"):
        AuthMechanism.parse("Kerberos")
    assert str(UnlimitedInt.parse("unlimited")) == "Unlimited" and UnlimitedInt.parse("20").exceeded_by(21)


def test_error_policies_are_flags_several_at_once_and_none_is_default():
    from mailgate.config.model import SendConnector
    from mailgate.config.values import ErrorPolicies

    both = ErrorPolicies.parse("DowngradeDnsFailures, UpgradeCustomFailures")
    assert ErrorPolicies.DowngradeDnsFailures in both and str(both) == "DowngradeDnsFailures, UpgradeCustomFailures"
    assert ErrorPolicies.parse(["DowngradeDnsFailures", "DowngradeCustomFailures"]) == 3
    assert str(ErrorPolicies.parse("Default")) == "Default" and ErrorPolicies.parse("default") == 0
    with pytest.raises(ValueError, match="valid values are: Default, DowngradeDnsFailures"):
        ErrorPolicies.parse("Bogus")
    # A connector stored before this was a flag (one name as text) loads, and saves as a list of names.
    old = SendConnector.model_validate({"name": "X", "error_policies": "DowngradeDnsFailures"})
    assert old.error_policies == ErrorPolicies.DowngradeDnsFailures
    assert SendConnector.model_validate({"name": "Y", "error_policies": "Default"}).error_policies == 0
    assert old.model_dump(mode="json")["error_policies"] == ["DowngradeDnsFailures"]


@pytest.mark.parametrize("stored,sent", [
    ("220 relay ready", b"220 relay ready\r\n"),
    ("220", b"220\r\n"),
    ("220relay", b"220 relay\r\n"),
    # Kept by a version that didn't check banners: still one finished line on the wire.
    ("220-unfinished", b"220 unfinished\r\n"),
    ("220 hi\r\nMAIL FROM:<x@y.example>", b"220 hiMAIL FROM:<x@y.example>\r\n"),
    ("220 " + "x" * 600, b"220 " + b"x" * 506 + b"\r\n"),
])
def test_a_stored_banner_is_sent_as_one_reply_line(stored, sent):
    from mailgate.config.model import ReceiveConnector, TransportServer
    from mailgate.receive.policy import ConnectorPolicy

    connector = ReceiveConnector.model_validate({"name": "R", "server": "EX01", "user": "u",
                                                 "bindings": ["0.0.0.0:25"], "banner": stored})
    policy = ConnectorPolicy(connector, TransportServer(name="EX01", fqdn="ex01.domain.com", user="u"))
    assert policy.banner() == sent


def test_a_value_beyond_its_types_limits_is_refused_when_given_and_still_loads_when_stored():
    """An administrator can't give MaxOutboundConnections 99999999999999999999; a store written before that
    limit existed still loads (a server that can't read its configuration can't run)."""
    from mailgate.config.model import TransportServer
    from mailgate.manage.params import FieldConverter

    stored = {"name": "EX01", "fqdn": "ex01.domain.com", "user": "u", "MaxOutboundConnections": "99999999999999999999",
              "MessageTrackingLogMaxAge": "99999999999999994690.23:06:50", "MessageTrackingLogMaxFileSize": str(2**70)}
    server = TransportServer.model_validate(stored)
    assert server.max_outbound_connections.value == 99999999999999999999
    for field, value, reason in [("max_outbound_connections", "99999999999999999999", "Int32"),
                                 ("message_tracking_log_max_age", "99999999999999994690.23:06:50", "too large"),
                                 ("message_tracking_log_max_file_size", str(2**70), "too large"),
                                 ("message_tracking_log_max_age", 1e400, "too large")]:
        with pytest.raises(ValueError, match=reason):
            FieldConverter(TransportServer, field)(value)
    assert FieldConverter(TransportServer, "max_outbound_connections")("2147483647").value == 2147483647
    with pytest.raises(ValueError):
        TimeSpan.parse(float("inf"), given=False)   # never a time span, stored or given


def test_an_internationalised_domain_is_routed_as_one_domain_in_either_form():
    """A send connector's address space matches an IDN in A-labels or U-labels, and both forms of a recipient's
    domain go to one queue (named in A-labels, as DNS has it)."""
    from mailgate.config.model import SendConnector
    from mailgate.routing.table import RoutingTable

    wild, exact = AddressSpace.parse("*.bücher.example"), AddressSpace.parse("xn--bcher-kva.example")
    assert wild.match_length("mx.xn--bcher-kva.example") > 0 and wild.match_length("mx.bücher.example") > 0
    assert exact.match_length("bücher.example") > wild.match_length("bücher.example") > 0
    assert exact.match_length("BÜCHER.example") > 0 and exact.match_length("bucher.example") == -1
    table = RoutingTable({"SendConnector": [SendConnector(name="Books", address_spaces=["bücher.example"]),
                                            SendConnector(name="Out", address_spaces=["*"])]}, "EX01")
    routes = {table.route(a).queue for a in ("kate@bücher.example", "lee@XN--BCHER-KVA.example")}
    assert routes == {"dns:books:xn--bcher-kva.example"}
