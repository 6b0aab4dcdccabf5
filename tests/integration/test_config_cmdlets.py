"""Configuration cmdlets: the seed's commands verbatim, Exchange's validation, nothing half-applied."""

from __future__ import annotations

import os
import subprocess

import pytest
import seed
from helpers import PYTHON, cli, shell

from mailgate.config.store import ConfigStore



def store_dump(home) -> str:
    store = ConfigStore(home.store_url)
    try:
        with store.reader() as tx:
            rows = tx.conn.exec_driver_sql("SELECT kind, name_key, data FROM config_object ORDER BY kind, name_key").all()
    finally:
        store.dispose()
    return "\n".join(f"{k}|{n}|{d}" for k, n, d in rows)


def test_seed_configuration_runs_verbatim_from_a_script(home, tmp_path):
    script = tmp_path / "seed.ps1"
    script.write_text(seed.configuration_script())
    result = cli(home, "shell", "-f", str(script), stdin="relayuser\nrelay-secret\n")
    assert result.returncode == 0, result.stderr
    assert "User:" in result.stderr and "Password for user relayuser:" in result.stderr
    shown = cli(home, "shell", "-c", "Get-ReceiveConnector | ft Name,Bindings,RemoteIPRanges")
    assert shown.returncode == 0
    assert shown.stdout == (
        "\n"
        "Name                  Bindings                RemoteIPRanges\n"
        "----                  --------                --------------\n"
        "Client Frontend EX01  {[::]:587, 0.0.0.0:587} {::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff, 0.0.0.0-255.255.255.255}\n"
        "Default Frontend EX01 {[::]:25, 0.0.0.0:25}   {::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff, 0.0.0.0-255.255.255.255}\n"
        "InternalRelay         {0.0.0.0:25}            {192.168.0.0/24}\n"
        "\n")
    shown = cli(home, "shell", "-c", "Get-SendConnector | fl Name,AddressSpaces,SmartHosts")
    assert shown.stdout == (
        "\n"
        "Name          : OutboundInternet\n"
        "AddressSpaces : {SMTP:*;1}\n"
        "SmartHosts    : {}\n"
        "\n"
        "Name          : SmartHost Connector\n"
        "AddressSpaces : {SMTP:*;1}\n"
        "SmartHosts    : {smtp.relay.com}\n"
        "\n")
    detail = shell(home, 'Get-ReceiveConnector InternalRelay | fl PermissionGroups,AuthMechanism,RequireTLS,TransportRole')
    assert "PermissionGroups : AnonymousUsers" in detail.out
    assert "AuthMechanism    : Tls" in detail.out and "RequireTLS       : True" in detail.out
    send = shell(home, 'Get-SendConnector "SmartHost Connector" | fl DNSRoutingEnabled,SmartHostAuthMechanism,'
                       'AuthenticationCredential,SourceTransportServers,Usage,RequireTLS')
    assert "DNSRoutingEnabled        : False" in send.out  # -SmartHosts without -DNSRoutingEnabled means $false
    assert "SmartHostAuthMechanism   : BasicAuth" in send.out
    assert "SourceTransportServers   : {EX01}" in send.out
    out = shell(home, 'Get-SendConnector OutboundInternet | fl RequireTLS,FrontendProxyEnabled,DNSRoutingEnabled')
    assert "RequireTLS           : True" in out.out and "FrontendProxyEnabled : True" in out.out
    # The password is stored encrypted: neither the database nor its dump contains it.
    assert "relay-secret" not in store_dump(home)
    assert b"relay-secret" not in (home.path / "mailgate.db").read_bytes()


def test_duplicate_usage_that_agrees_is_accepted_and_a_conflict_is_refused(home):
    ok = shell(home, 'New-SendConnector -Name A -AddressSpaces "*" -Usage Internet -Internet')
    assert ok.ok, ok.err
    bad = shell(home, 'New-SendConnector -Name B -AddressSpaces "*" -Usage Internet -Partner')
    assert not bad.ok and "Internet" in bad.err and "Partner" in bad.err


def test_enum_values_are_case_insensitive(home):
    r = shell(home, 'New-ReceiveConnector x -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.1 -Usage custom '
                    '-PermissionGroups anonymoususers\nSet-ReceiveConnector x -AuthMechanism "TLS"')
    assert r.ok, r.err
    shown = shell(home, "Get-ReceiveConnector x | fl AuthMechanism,PermissionGroups")
    assert "AuthMechanism    : Tls" in shown.out and "PermissionGroups : AnonymousUsers" in shown.out


INVALID = [
    ('New-ReceiveConnector R -Bindings 0.0.0.0:2600 -RemoteIPRanges 300.1.1.0/24 -Usage Custom', "RemoteIPRanges",
     "not a valid IP range"),
    ('Set-ReceiveConnector "Default Frontend EX01" -Frobnicate 1', "Frobnicate", "cannot be found"),
    ('Set-ReceiveConnector "Default Frontend EX01" -Re $true', "Re", "ambiguous"),
    ('Set-ReceiveConnector "No Such Connector" -RequireTLS $true', "No Such Connector", "couldn't be found"),
    ('New-ReceiveConnector Clash -Bindings 0.0.0.0:25 -RemoteIPRanges 0.0.0.0-255.255.255.255 -Usage Custom',
     "Default Frontend EX01", "conflict"),
    ('New-ReceiveConnector Partial -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.0/24 -Usage Custom\n'
     'New-ReceiveConnector Partial2 -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.128-10.0.1.5 -Usage Custom',
     "EX01\\Partial", "conflict"),
    ('Set-ReceiveConnector "Default Frontend EX01" -AuthMechanism None -RequireTLS $true', "RequireTLS", "Tls"),
    ('Set-ReceiveConnector "Client Frontend EX01" -AuthMechanism Tls,BasicAuthRequireTLS', "AuthMechanism",
     "BasicAuthRequireTLS requires both BasicAuth and Tls"),
    ('Set-ReceiveConnector "Client Frontend EX01" -MaxRecipientsPerMessage 0', "MaxRecipientsPerMessage", "between"),
    ('Set-ReceiveConnector "Client Frontend EX01" -MaxMessageSize 1KB', "MaxMessageSize", "between"),
    ('Set-ReceiveConnector "Client Frontend EX01" -Bindings 1.2.3.4:99999', "Bindings", "port"),
    ('New-SendConnector S -AddressSpaces "*contoso.com"', "AddressSpaces", "not a valid SMTP address space"),
    ('New-SendConnector S -AddressSpaces "*" -DNSRoutingEnabled $false', "SmartHosts", "required"),
    ('New-SendConnector S -AddressSpaces "*" -SmartHosts relay.example.com -SmartHostAuthMechanism BasicAuth',
     "AuthenticationCredential", "requires -AuthenticationCredential"),
    ('New-SendConnector S -AddressSpaces "*" -SourceTransportServers EX99', "SourceTransportServers", "EX99"),
    ('New-AcceptedDomain -Name x -DomainName "bad domain"', "DomainName", "not a valid domain"),
    ('Set-TransportService -TransientFailureRetryCount 16', "TransientFailureRetryCount", "between 0 and 15"),
    ('Set-ReceiveConnector "Client Frontend EX01" -RequireTLS maybe', "RequireTLS", "Boolean"),
    ('Set-TransportConfig -GenerateCopyOfDSNFor 5.4.4,5.1', "GenerateCopyOfDSNFor", "not an enhanced status code"),
    ('Set-TransportConfig -GenerateCopyOfDSNFor @{Ad="5.1.1"}', "GenerateCopyOfDSNFor", "Only Add and Remove"),
    # A list holds each value once, as Exchange's collections (Bindings used to drop the repeat, RemoteIPRanges
    # to keep it).
    ('Set-ReceiveConnector "Client Frontend EX01" -RemoteIPRanges 10.0.0.1,10.0.0.1', "RemoteIPRanges",
     'The value "10.0.0.1" is already present'),
    ('Set-ReceiveConnector "Client Frontend EX01" -Bindings 0.0.0.0:587,0.0.0.0:587', "Bindings", "already present"),
    ('Set-TransportService -SendProtocolLogPath logs/send', "SendProtocolLogPath", "not a full path"),
    ('Set-OrganizationConfig -MicrosoftExchangeRecipientReplyRecipient nobody', "nobody", "couldn't be found"),
    # What the server says on the wire: a greeting that stays one line, host names that are host names.
    ('Set-ReceiveConnector "Default Frontend EX01" -Banner "220 hi`r`nMAIL FROM:<x@y.example>"', "Banner",
     "one line of printable US-ASCII"),
    ('Set-ReceiveConnector "Default Frontend EX01" -Banner "220-unfinished"', "Banner", "followed by a space"),
    ('Set-ReceiveConnector "Default Frontend EX01" -Banner ("220 " + "x" * 600)', "Banner", "at most 510"),
    ('Set-ReceiveConnector "Default Frontend EX01" -Fqdn "bad host name!"', "Fqdn", "not a valid FQDN"),
    ('New-SendConnector S -AddressSpaces "*" -Fqdn "mail.contoso.com`r`nX-Injected: 1"', "Fqdn",
     "not a valid FQDN"),
    ('New-SendConnector S -AddressSpaces "*" -RequireTLS $true -TlsAuthLevel DomainValidation -TlsDomain "a b"',
     "TlsDomain", "not a valid FQDN"),
    ('Set-TransportConfig -ExternalPostmasterAddress "pm@contoso.com`r`nBcc: x@y.example"',
     "ExternalPostmasterAddress", "not a valid SMTP address"),
    # Numbers beyond what the setting's type holds, and beyond the setting's range.
    ("Set-TransportService -MaxOutboundConnections 99999999999999999999", "MaxOutboundConnections", "Int32"),
    ("Set-TransportService -MaxPerDomainOutboundConnections 0", "MaxPerDomainOutboundConnections", "between 1"),
    ("Set-TransportService -MaxConnectionRatePerMinute -1", "MaxConnectionRatePerMinute", "between 1"),
    ("Set-TransportService -MessageTrackingLogMaxAge 99999999999999999999", "MessageTrackingLogMaxAge",
     "too large for a time span"),
    ("Set-TransportService -SendProtocolLogMaxAge 30000", "SendProtocolLogMaxAge", "24855.03:14:07"),
    ("Set-TransportService -MessageTrackingLogMaxDirectorySize 99999999999999999999",
     "MessageTrackingLogMaxDirectorySize", "too large"),
    ("Set-TransportConfig -MaxReceiveSize 3GB", "MaxReceiveSize", "between 0 and 2 GB"),
    ("Set-TransportConfig -MaxRecipientEnvelopeLimit -1", "MaxRecipientEnvelopeLimit", "between 0"),
]


@pytest.mark.parametrize("command,named,reason", INVALID, ids=[c[0][:60] for c in INVALID])
def test_invalid_input_is_an_exchange_style_error_and_changes_nothing(home, command, named, reason):
    *setup, refused = command.split("\n")
    if setup:
        assert shell(home, "\n".join(setup)).ok
    before = store_dump(home)
    result = cli(home, "shell", "-c", refused)
    assert result.returncode != 0
    assert named in result.stderr and reason in result.stderr, result.stderr
    assert "CategoryInfo" in result.stderr and "FullyQualifiedErrorId" in result.stderr
    assert store_dump(home) == before


def test_whatif_changes_nothing(home):
    before = store_dump(home)
    r = shell(home, 'New-ReceiveConnector W -Bindings 0.0.0.0:2700 -RemoteIPRanges 10.1.1.1 -Usage Custom -WhatIf\n'
                    'Set-ReceiveConnector "Client Frontend EX01" -MaxRecipientsPerMessage 50 -WhatIf')
    assert r.ok and "What if: Creating Receive connector" in r.out and "What if: Setting Receive connector" in r.out
    assert store_dump(home) == before


def test_add_remove_hashtables_on_multivalued_properties(home):
    r = shell(home, 'New-ReceiveConnector Relay -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.1 -Usage Custom\n'
                    'Set-ReceiveConnector Relay -RemoteIPRanges @{Add="10.0.0.2","10.0.0.3"}\n'
                    'Set-ReceiveConnector Relay -RemoteIPRanges @{Remove="10.0.0.1"}\n'
                    'Get-ReceiveConnector Relay | fl RemoteIPRanges')
    assert r.ok, r.err
    assert "RemoteIPRanges : {10.0.0.2, 10.0.0.3}" in r.out
    bad = shell(home, 'Set-ReceiveConnector Relay -RemoteIPRanges @{Remove="10.9.9.9"}')
    assert not bad.ok and "not present" in bad.err


def test_a_multivalued_property_grown_in_a_variable_is_set_back_as_microsoft_documents_it(home):
    """The other way Exchange's documentation adds remote IP addresses to a receive connector."""
    r = shell(home, 'New-ReceiveConnector Relay -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.1 -Usage Custom\n'
                    '$RecvConn = Get-ReceiveConnector "Relay"\n'
                    '$RecvConn.RemoteIPRanges += "10.0.0.5", "10.0.0.6-10.0.0.9"\n'
                    'Set-ReceiveConnector "Relay" -RemoteIPRanges $RecvConn.RemoteIPRanges\n'
                    'Get-ReceiveConnector Relay | fl RemoteIPRanges')
    assert r.ok, r.err
    assert "RemoteIPRanges : {10.0.0.1, 10.0.0.5, 10.0.0.6-10.0.0.9}" in r.out
    wrong = shell(home, '$RecvConn = Get-ReceiveConnector "Relay"; $RecvConn.NoSuchThing = 5')
    assert not wrong.ok and "The property 'NoSuchThing' cannot be found on this object" in wrong.err


def test_bindings_and_remote_ip_ranges_have_exchanges_properties_in_the_shell(home):
    """An IPBinding has Address, AddressFamily and Port; an IPRange LowerBound, UpperBound, RangeFormat and
    CIDRLength — while each still prints, and travels back into Set-ReceiveConnector, as its text."""
    r = shell(home, 'New-ReceiveConnector Relay -Bindings 0.0.0.0:2600 -Usage Custom '
                    '-RemoteIPRanges 192.168.0.0/24,10.0.0.5,10.0.0.10-10.0.0.20,fe80::/64\n'
                    '$rc = Get-ReceiveConnector Relay\n'
                    '"port=" + $rc.Bindings[0].Port; "family=" + $rc.Bindings[0].AddressFamily\n'
                    '$rc.RemoteIPRanges | ft LowerBound,UpperBound,RangeFormat,CIDRLength\n'
                    '($rc.RemoteIPRanges | ? { $_.RangeFormat -eq "LoHi" }).UpperBound')
    assert r.ok, r.err
    assert "port=2600" in r.out and "family=InterNetwork" in r.out
    rows = [line.split() for line in r.out.splitlines()]
    assert ["192.168.0.0", "192.168.0.255", "CIDR", "24"] in rows
    assert ["10.0.0.5", "10.0.0.5", "SingleAddress"] in rows
    assert ["fe80::", "fe80::ffff:ffff:ffff:ffff", "CIDR", "64"] in rows
    assert ["10.0.0.20"] in rows


def test_text_that_isnt_utf8_is_refused_where_it_comes_in_and_changes_nothing(home, tmp_path):
    """Bytes that aren't UTF-8 — in -c, a script, or piped input — are named with their place; nothing runs
    from that text and nothing is stored (they used to reach the store as surrogates and fail there)."""
    before = store_dump(home)
    command = b'Set-ReceiveConnector "Default Frontend EX01" -Comment "a\xffb"'
    script = tmp_path / "latin1.ps1"
    script.write_bytes(b'"first"\n' + command + b'\n')
    base = [PYTHON, "-m", "mailgate.cli", "--home", str(home.path), "shell"]
    runs = {"-c": subprocess.run(base + ["-c", os.fsdecode(command)], capture_output=True, timeout=120),
            "-f": subprocess.run(base + ["-f", str(script)], capture_output=True, timeout=120),
            "stdin": subprocess.run(base, input=b'\xef\xbb\xbf"first"\n' + command + b'\n"still here"\n',
                                    capture_output=True, timeout=120, env={**os.environ, "LC_ALL": "C"})}
    for how, run in runs.items():
        err = run.stderr.decode()
        assert run.returncode == 1, (how, err)
        assert "At line:" in err and "a byte that isn't UTF-8 (0xFF)" in err, (how, err)
        assert "internal error" not in err and "Traceback" not in err, (how, err)
    assert runs["-f"].stdout == b""   # the script was refused as a whole, as a parse error is
    assert runs["stdin"].stdout.split() == [b"first", b"still", b"here"]
    assert store_dump(home) == before


def test_pipeline_get_then_set(home):
    r = shell(home, 'Get-ReceiveConnector | Where-Object { $_.Name -like "Client*" } | '
                    'Set-ReceiveConnector -MaxRecipientsPerMessage 42\n'
                    'Get-ReceiveConnector | ft Name,MaxRecipientsPerMessage')
    assert r.ok, r.err
    lines = {line.split()[0] + " " + line.split()[1]: line.split()[-1] for line in r.out.splitlines()[3:] if line.strip()}
    assert lines["Client Frontend"] == "42" and lines["Default Frontend"] == "200"


def test_ad_permission_grants_relay_and_shows_custom(home):
    r = shell(home, 'New-ReceiveConnector "Anonymous Relay" -Bindings 0.0.0.0:2600 -RemoteIPRanges 10.0.0.5 -Custom '
                    '-PermissionGroups AnonymousUsers\n'
                    'Get-ReceiveConnector "Anonymous Relay" | Add-ADPermission -User "NT AUTHORITY\\ANONYMOUS LOGON" '
                    '-ExtendedRights "Ms-Exch-SMTP-Accept-Any-Recipient"\n'
                    'Get-ADPermission "Anonymous Relay" | ft User,ExtendedRights\n'
                    'Get-ReceiveConnector "Anonymous Relay" | fl PermissionGroups')
    assert r.ok, r.err
    assert "NT AUTHORITY\\ANONYMOUS LOGON {ms-Exch-SMTP-Accept-Any-Recipient}" in r.out
    assert "NT AUTHORITY\\ANONYMOUS LOGON {ms-Exch-SMTP-Submit}" in r.out
    assert "PermissionGroups : AnonymousUsers, Custom" in r.out
    assert "relays for anonymous clients" in r.out
    bad = shell(home, 'Add-ADPermission "Anonymous Relay" -User "NT AUTHORITY\\ANONYMOUS LOGON" -ExtendedRights '
                      '"ms-Exch-Do-Anything"')
    assert not bad.ok and "not an extended right" in bad.err


def test_mailboxes_accepted_domains_and_transport_settings(home):
    r = shell(home, 'New-AcceptedDomain -Name Contoso -DomainName contoso.com\n'
                    'New-Mailbox -Name Kate -PrimarySmtpAddress kate@contoso.com '
                    '-Password (ConvertTo-SecureString "S3cret!" -AsPlainText -Force)\n'
                    'Set-Mailbox Kate -EmailAddresses @{Add="k@domain.com"}\n'
                    'Get-Mailbox Kate | fl EmailAddresses,PrimarySmtpAddress\n'
                    'Set-TransportService EX01 -MessageRetryInterval 00:00:10 -ExternalDNSServers 127.0.0.53#5353\n'
                    'Get-TransportService | fl MessageRetryInterval,ExternalDNSServers\n'
                    'Set-TransportConfig -TLSSendDomainSecureList @{Add="partner.example"}\n'
                    'Get-TransportConfig | fl TLSSendDomainSecureList')
    assert r.ok, r.err
    assert "EmailAddresses     : {SMTP:kate@contoso.com, smtp:k@domain.com}" in r.out
    assert "MessageRetryInterval : 00:00:10" in r.out and "{127.0.0.53#5353}" in r.out
    kept = shell(home, "Set-TransportService EX01 -MaxConnectionRatePerMinute 600")
    assert kept.ok and "MaxConnectionRatePerMinute is stored for compatibility" in kept.out + kept.err
    assert "TLSSendDomainSecureList : {partner.example}" in r.out
    bad = shell(home, 'New-Mailbox -Name Out -PrimarySmtpAddress out@elsewhere.example')
    assert not bad.ok and "isn't an Authoritative" in bad.err
    dup = shell(home, 'New-Mailbox -Name Kate2 -PrimarySmtpAddress k@domain.com')
    assert not dup.ok and "already used" in dup.err


def test_frontend_transport_service_cmdlets_show_and_change_the_servers_frontend_settings(home):
    """Exchange 2013+ keeps protocol-log and DNS settings of its Front End Transport service apart; mailgate's one
    service per server takes them from either cmdlet, and refuses what the Front End service doesn't have."""
    r = shell(home, "Set-FrontendTransportService EX01 -ReceiveProtocolLogMaxAge 7.00:00:00 -TransientFailureRetryCount 3\n"
                    "Get-TransportService EX01 | fl ReceiveProtocolLogMaxAge,TransientFailureRetryCount\n"
                    "Get-FrontendTransportService | fl *")
    assert r.ok, r.err
    assert "ReceiveProtocolLogMaxAge   : 7.00:00:00" in r.out and "TransientFailureRetryCount : 3" in r.out, r.out
    frontend = r.out.split("TransientFailureRetryCount : 3", 1)[1]
    assert "ReceiveProtocolLogMaxAge" in frontend and "MessageExpirationTimeout" not in frontend, frontend
    before = store_dump(home)
    refused = shell(home, "Set-FrontendTransportService EX01 -MessageExpirationTimeout 1.00:00:00")
    assert not refused.ok and "MessageExpirationTimeout" in refused.err
    assert store_dump(home) == before


# Values an administrator (or a script gone wrong) may give any parameter.
ODD_VALUES = ['""', "$null", '("x" * 5000)', "-1", "2147483648", '@{Add="x"}', '@{Remove="y"}', "$true", "1.5",
              '"`r`n"', '"*"', "0", '"Unlimited"', '"00:00:00"', '"1.2.3.4"', '"[::1]:25"', "@()", "@(1,2)",
              '"a@b.example"', '"EX01"', "(Get-Date)", '"99999999999999999999"', '"EX01\\Submission"', '"a,b"',
              '"\u00e9"', '"0.0.0.0:25"', '"x`0y"', '"../../x"']
# The values that reach furthest into a cmdlet once its other parameters are right (the examples below).
HOSTILE_VALUES = ['"a`r`nb"', '"x`0y"', '("x" * 5000)', "$null", '"../../x"', '@{Add="x"}']
_WAITS_OR_PROMPTS = {"Start-Sleep", "Get-Credential", "Read-Host"}
# Cmdlets that would look names up with the machine's resolver or connect to them (tests stay on loopback):
# test_network_cmdlets_refuse_names_that_cant_be_looked_up below, and Send-MailMessage in test_receive.py.
_NETWORK = {"Send-MailMessage", "Resolve-DnsName", "Test-NetConnection"}


def internal_errors(home, texts) -> tuple[int, list[str]]:
    """Run each command text in one shell session: how many ran, and those whose error was an internal one
    ("This is a bug", or an operation that failed in the server)."""
    import io

    from mailgate.cli import management_context
    from mailgate.shell.session import LinePrompter, Shell

    ctx = management_context(home)
    ctx.prompter = LinePrompter(["user", "secret"] * 10000)
    out, err = io.StringIO(), io.StringIO()
    shell = Shell(ctx, out=out, err=err)
    failures, tried = [], 0
    for text in texts:
        before = len(err.getvalue())
        shell.run_text(text)
        tried += 1
        reported = err.getvalue()[before:]
        if any(sign in reported for sign in ("This is a bug", "Traceback", "internal error")):
            failures.append(f"{text[:300]}: {reported.splitlines()[0][:200]}")
    return tried, failures


def _work_inside(tmp_path, monkeypatch) -> None:
    """Files the cmdlets write (Out-File "*", -RequestFile "../../x") land in ``tmp_path``, two levels down."""
    workdir = tmp_path / "a" / "b"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)


def _confirmed(cmd, text: str) -> str:
    return text + (" -Confirm:$false" if any(p.name == "Confirm" for p in cmd.params) else "")


def odd_value_texts(cmdlets) -> list[str]:
    """Each of ``cmdlets`` with one parameter set to each odd value."""
    return [_confirmed(cmd, f"{cmd.name} -{param.name} {value}")
            for cmd in cmdlets for param in cmd.params if param.name not in ("Follow", "FollowSeconds", "Confirm")
            for value in ([""] if param.switch else ODD_VALUES)]


def example_texts(cmdlets) -> list[str]:
    """Each cmdlet's own documented examples (those that are one command), with each of its parameters in turn
    given each hostile value: the other parameters are right, so the value reaches the cmdlet's own work."""
    import re

    texts = []
    for cmd in cmdlets:
        for example in cmd.examples:
            if not example.lower().startswith(cmd.name.lower() + " ") or any(c in example for c in "|;") \
                    or "-follow" in example.lower():
                continue
            for param in cmd.params:
                if param.switch or param.name in ("Follow", "FollowSeconds", "Confirm"):
                    continue
                given = re.compile(rf"-{re.escape(param.name)}(?::|\s+)(\"[^\"]*\"|'[^']*'|\([^)]*\)|@\{{[^}}]*\}}|\S+)",
                                   re.IGNORECASE)
                for value in HOSTILE_VALUES:
                    if given.search(example):
                        text = given.sub(lambda m: f"-{param.name} {value}", example, count=1)
                    else:
                        text = f"{example} -{param.name} {value}"
                    texts.append(_confirmed(cmd, text))
    return texts


def test_no_value_of_any_parameter_of_any_cmdlet_is_an_internal_error(home, tmp_path, monkeypatch):
    """Every cmdlet, every parameter, each odd value: a clear error or a result, never "This is a bug"."""
    from mailgate.manage.cmdlets import registry

    _work_inside(tmp_path, monkeypatch)
    cmdlets = sorted((c for c in registry.all() if c.name not in _WAITS_OR_PROMPTS | _NETWORK), key=lambda c: c.name)
    tried, failures = internal_errors(home, odd_value_texts(cmdlets))
    assert tried > 1000 and not failures, "\n".join(failures)


def test_no_hostile_value_in_a_cmdlets_own_example_is_an_internal_error(home, tmp_path, monkeypatch):
    """Each cmdlet's examples with one parameter at a time given a line break, a NUL, 5,000 characters, $null, a
    path out of the directory or @{Add=...}: the value gets past the other parameters' checks (a value alone,
    above, mostly meets "missing mandatory parameter" first), and is still a clear error or a result. Found:
    a CR or LF in Send-MailMessage's headers, a NUL in a certificate's file name, an address added twice with
    Set-Mailbox -EmailAddresses @{Add=...}."""
    from mailgate.manage.cmdlets import registry

    _work_inside(tmp_path, monkeypatch)
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com").ok   # what examples name
    cmdlets = sorted((c for c in registry.all() if c.name not in _WAITS_OR_PROMPTS | _NETWORK), key=lambda c: c.name)
    tried, failures = internal_errors(home, example_texts(cmdlets))
    assert tried > 1000 and not failures, "\n".join(failures)


def test_network_cmdlets_refuse_names_that_cant_be_looked_up(home):
    """Resolve-DnsName and Test-NetConnection with a name no resolver could be asked for (a NUL, a line break, a
    label over 63 characters, an empty label): a clear error before any lookup."""
    for name in ('"x`0y"', '"a`r`nb"', '("x" * 70)', '"a..b"', '""'):
        for command in (f"Resolve-DnsName {name}", f"Test-NetConnection {name} -Port 25"):
            r = shell(home, command)
            refused = not r.ok and ("isn't a DNS name" in r.err or "isn't a computer name" in r.err
                                    or "Cannot bind argument" in r.err)
            unresolved = "Name resolution of" in r.err + r.out and "TcpTestSucceeded : False" in r.out
            assert refused or unresolved, (command, r.out, r.err)
            assert "bug" not in r.err, (command, r.err)


def test_no_value_given_to_the_queue_cmdlets_is_an_internal_error_in_the_running_server(home, server, tmp_path,
                                                                                        monkeypatch):
    """The same with the server running, for the cmdlets that it answers (queues and messages)."""
    from mailgate.manage.cmdlets import registry

    _work_inside(tmp_path, monkeypatch)
    cmdlets = [registry.get(name) for name in ("Get-Queue", "Get-QueueDigest", "Suspend-Queue", "Resume-Queue",
                                               "Retry-Queue", "Get-Message", "Suspend-Message", "Resume-Message",
                                               "Remove-Message", "Export-Message", "Redirect-Message")]
    tried, failures = internal_errors(home, odd_value_texts(cmdlets))
    assert tried > 200 and not failures, "\n".join(failures)
    assert "Traceback" not in server.output()


def test_a_damaged_sqlite_store_is_named_as_such_and_a_server_runs_on_the_configuration_it_read_last(home, ports):
    """mailgate.db overwritten (a disk fault): the shell says the store is damaged (no traceback), and the server
    starts from the configuration it kept and takes mail."""
    import smtplib

    from helpers import Server, wait_for

    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com").ok
    server = Server(home).start()   # reads the configuration and keeps a copy of it
    wait_for(lambda: home.config_cache.exists(), message="the kept configuration")
    server.stop()
    database = home.store_url.removeprefix("sqlite:///")
    with open(database, "r+b") as fh:
        fh.write(b"\x13" * 8192)
    for leftover in (database + "-wal", database + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    shown = cli(home, "shell", "-c", "Get-ReceiveConnector")
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    assert "the store's SQLite file is damaged; restore it from a backup" in shown.stderr, shown.stderr
    server = Server(home).start()
    try:
        assert "starting with the configuration read last" in server.output()
        with smtplib.SMTP("127.0.0.1", ports["frontend"], timeout=30) as c:
            assert c.sendmail("a@remote.example", ["admin@domain.com"], b"Subject: still here\r\n\r\nx\r\n") == {}
    finally:
        server.stop()
    assert "Traceback" not in server.output()
