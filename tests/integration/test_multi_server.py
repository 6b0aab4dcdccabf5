"""A multi-server organisation (SPEC C9): two servers share configuration and tracking in PostgreSQL, each keeps
its own queue, and mail for a send connector whose SourceTransportServers lists only EX02 leaves EX01 by relaying
to EX02 with Exchange Server authentication (X-EXPS), as Exchange's intra-organisation connector does."""

from __future__ import annotations

import email
import json
import re
import smtplib
import time
import ssl
import urllib.error
import urllib.request

import pytest
from cryptography.fernet import Fernet
from helpers import Server, bind_ports, cli, free_port, maildir_messages, make_home, protocol_log, shell, synced, wait_for
from peers import SmtpPeer, TcpProxy

from mailgate.config.secrets import SecretBox
from mailgate.smtp import exps

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def organisation(tmp_path, postgres_url):
    ex01 = make_home(tmp_path / "ex01", server="EX01", domain="domain.com", store=postgres_url)
    (tmp_path / "ex02").mkdir()
    (tmp_path / "ex02" / "secret.key").write_bytes((tmp_path / "ex01" / "secret.key").read_bytes())
    ex02 = make_home(tmp_path / "ex02", server="EX02", store=postgres_url)
    ports = {"EX01": bind_ports(ex01)["frontend"], "EX02": bind_ports(ex02)["frontend"]}
    r = shell(ex01, "New-AcceptedDomain Sink -DomainName sink.test -DomainType ExternalRelay\n"
                    "Set-TransportService EX01 -TransientFailureRetryInterval 00:00:01 -MessageRetryInterval 00:00:01 "
                    "-IntraOrgConnectorProtocolLoggingLevel Verbose\n"
                    "Set-TransportService EX02 -TransientFailureRetryInterval 00:10:00 "
                    "-OutboundConnectionFailureRetryInterval 00:10:00\n"
                    "Set-ReceiveConnector 'Default Frontend EX02' -AuthTarpitInterval 00:00:00", runtime=None)
    assert r.ok, r.err
    servers = [Server(ex01).start(), Server(ex02, admin=True).start()]   # EX02 publishes its admin API
    yield ex01, ex02, ports
    for server in servers:
        server.stop()


def submit(port: int, recipient: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("app@outside.test", [recipient], f"Subject: {subject}\r\n\r\nbody\r\n".encode())


def connector_to_sink(ex01, ex02, port: int, sources: str) -> None:
    """Send connector ToSink for sink.test (a smart host on ``port``) with these source servers, loaded by both."""
    r = shell(ex01, f"New-SendConnector ToSink -AddressSpaces sink.test -SmartHosts 127.0.0.1 -Port {port} "
                    f"-SourceTransportServers {sources}")
    assert r.ok, r.err
    synced(ex01)
    synced(ex02)


def tls_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("probe.test")
    client.starttls(context=ssl._create_unverified_context())
    client.ehlo("probe.test")
    return client


def test_mail_for_another_servers_connector_is_relayed_to_it(organisation):
    ex01, ex02, ports = organisation
    sink = SmtpPeer("127.0.0.1", free_port())
    try:
        # A change made on EX01 reaches both running servers within seconds.
        connector_to_sink(ex01, ex02, sink.port, "EX02")
        submit(ports["EX01"], "user@sink.test", "across the organisation")
        wait_for(lambda: sink.received, timeout=60, message="the message at the sink")
        got = sink.received[0]
        msg = email.message_from_bytes(got.data)
        assert got.rcpt_tos == ["user@sink.test"] and msg["Subject"] == "across the organisation"
        received = [" ".join(h.split()) for h in msg.get_all("Received")]
        assert "by ex02.domain.com" in received[0] and "by ex01.domain.com" in received[1], received
        assert "with ESMTPS" in received[0], "EX01 → EX02 went over TLS"
        # The organisation headers crossed EX01 → EX02 (so EX02 kept EX01's network message id and judgement)
        # but not the Custom connector to the sink: the outbound header firewall.
        assert not [k for k in msg.keys() if k.lower().startswith("x-ms-exchange-")], msg.keys()
        assert msg.get_all("X-Source") == ["SMTP:EX01\\Default Frontend EX01"]   # where it entered the organisation

        def events(server: str) -> list[str]:
            out = shell(ex01, f"Get-MessageTrackingLog -Server {server} -MessageSubject 'across the organisation' "
                              f"| ForEach-Object {{ $_.EventId + ' ' + $_.NetworkMessageId }}").out.split("\n")
            return [line.strip() for line in out if line.strip()]

        wait_for(lambda: any(e.startswith("SEND") for e in events("EX02")), message="EX02's SEND event")
        wait_for(lambda: any(e.startswith("SEND") for e in events("EX01")), message="EX01's SEND event")
        # One network message id from the first server to the last, so tracking follows the message across them.
        ids = {e.split()[1] for e in events("EX01") + events("EX02")}
        assert len(ids) == 1, events("EX01") + events("EX02")
        assert any(e.startswith("RECEIVE") for e in events("EX02"))
        # EX01's side of the hop is logged under Exchange's implicit connector's name, with the proof hidden.
        protocol_log(ex01, "Send", until=["Intra-Organization SMTP Send Connector", "X-EXPS HMAC-SHA256"])
    finally:
        sink.stop()


def test_exchange_server_authentication_needs_the_organisations_key(organisation, tmp_path):
    ex01, ex02, ports = organisation
    synced(ex02)
    with tls_session(ports["EX02"]) as client:
        assert "HMAC-SHA256" in client.esmtp_features.get("x-exps", ""), client.esmtp_features
        # Anonymous: no relay to a domain the organisation doesn't accept.
        client.mail("app@outside.test")
        code, _ = client.rcpt("user@elsewhere.test")
        assert code == 550
        client.rset()
        # A proof made with another key is refused, and relaying stays refused.
        code, challenge = client.docmd("X-EXPS", exps.MECHANISM)
        assert code == 334
        other_key = SecretBox(Fernet.generate_key()).derive(exps.KEY_PURPOSE)
        line, _ = exps.client_response(other_key, challenge.decode(), "EX01")
        code, text = client.docmd(line.decode())
        assert (code, text.decode()) == (535, "5.7.3 Cannot achieve Exchange Server authentication")
        client.mail("app@outside.test")
        assert client.rcpt("user@elsewhere.test")[0] == 550
        client.rset()
        # With the organisation's key, as EX01: the session holds the Exchange Servers' rights, relay included,
        # and the server proves it holds the key too.
        key = SecretBox.for_home(tmp_path / "ex01").derive(exps.KEY_PURPOSE)
        code, challenge = client.docmd("X-EXPS", exps.MECHANISM)
        line, raw_challenge = exps.client_response(key, challenge.decode(), "EX01")
        code, text = client.docmd(line.decode())
        assert code == 235 and exps.verify_server(key, raw_challenge, "EX01", text.decode())
        client.mail("app@outside.test")
        assert client.rcpt("user@elsewhere.test")[0] == 250
    # Guessing is bounded as AUTH is: MaxLogonFailures (3) wrong proofs end the session.
    with tls_session(ports["EX02"]) as client:
        for attempt in range(3):
            _, challenge = client.docmd("X-EXPS", exps.MECHANISM)
            line, _ = exps.client_response(other_key, challenge.decode(), "EX01")
            code, text = client.docmd(line.decode())
        assert code == 535
        assert client.getreply()[0] == 421
    # Without TLS the mechanism isn't offered (the connector has a certificate).
    with smtplib.SMTP("127.0.0.1", ports["EX02"], timeout=30) as plain:
        plain.ehlo("probe.test")
        assert "x-exps" not in plain.esmtp_features
        assert plain.docmd("X-EXPS", exps.MECHANISM)[0] == 500


def test_another_servers_queues_are_managed_from_this_shell(organisation):
    ex01, ex02, ports = organisation
    servers = shell(ex02, "Get-ExchangeServer | Sort-Object Name | ft Name,ServerRole -HideTableHeaders")
    assert servers.ok and servers.out.split() == ["EX01", "Mailbox", "EX02", "Mailbox"]
    sink_port = free_port()
    connector_to_sink(ex01, ex02, sink_port, "EX02")
    submit(ports["EX01"], "user@sink.test", "waiting on EX02")   # nothing listens at the sink yet

    def ex02_queue() -> list[str]:
        out = shell(ex01, "Get-Queue -Server EX02 | Where-Object { $_.MessageCount -gt 0 } | "
                          "ForEach-Object { $_.Identity + ' ' + $_.Status + ' ' + $_.NextHopDomain }").out
        return [line for line in out.splitlines() if line.strip()]

    # Queued on EX02, and in Retry once its first attempt has failed (Ready until then: ask until it has).
    queued = wait_for(lambda: [line for line in ex02_queue() if "Retry" in line], timeout=60,
                      message="the message queued on EX02, in Retry")
    assert queued[0].startswith("EX02\\") and "127.0.0.1" in queued[0], queued
    identity = queued[0].split()[0]
    # EX01's own queues don't have it; Get-Message and Get-QueueDigest reach EX02 too.
    assert "waiting on EX02" not in shell(ex01, "Get-Message | fl Subject").out
    listing = shell(ex01, f"Get-Message -Queue {identity} | ForEach-Object {{ $_.Subject + '|' + $_.Identity }}").out
    assert "waiting on EX02|EX02\\" in listing, listing
    digest = shell(ex01, "Get-QueueDigest -Server EX01,EX02 -GroupBy ServerName -IncludeLowMessageCount "
                         "| ForEach-Object { $_.GroupByValue + '=' + $_.MessageCount }").out.split()
    assert "EX02=1" in digest, digest
    # The one-liner for every server's queues: the server objects bind to -Server, each asked in turn.
    everywhere = shell(ex01, "Get-TransportService | Get-Queue -ErrorAction SilentlyContinue | "
                             "Where-Object { $_.MessageCount -gt 0 } | ForEach-Object { $_.Identity }")
    assert [line for line in everywhere.out.splitlines() if line.strip()] == [identity], everywhere.err
    # An action on EX02's queue, from EX01: the sink comes up and Retry-Queue sends the message now.
    sink = SmtpPeer("127.0.0.1", sink_port)
    try:
        r = shell(ex01, f"Retry-Queue {identity}")
        assert r.ok, r.err
        wait_for(lambda: sink.received, timeout=30, message="the retried message at the sink")
    finally:
        sink.stop()
    # A server the organisation doesn't have, and one that publishes no admin API, are clear errors.
    r = shell(ex02, "Get-Queue -Server EX03")
    assert not r.ok and "isn't a transport server of this organisation" in r.err
    r = shell(ex02, "Get-Queue -Server EX01")
    assert not r.ok and "EX01 publishes no admin API" in r.err
    # EX02's runtime endpoint answers only a server that holds the organisation's key.
    url = shell(ex01, "(Get-TransportService EX02).AdminApiUrl").out.strip()
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url + "api/runtime", data=json.dumps({"op": "queues", "args": {}}).encode(),
                                     headers={"Authorization": "Bearer " + "0" * 64}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_redirect_message_drains_a_servers_delivery_queues_to_another_server(organisation):
    """Maintenance of EX01: its queued mail (here for a smart host EX01 can't reach, the queue suspended) goes to
    EX02 with Redirect-Message and EX02 delivers it; a suspended message stays on EX01, as Exchange leaves it."""
    ex01, ex02, ports = organisation
    sink_port = free_port()
    connector_to_sink(ex01, ex02, sink_port, "EX01,EX02")
    for n in range(3):
        submit(ports["EX01"], f"user{n}@sink.test", f"drained {n}")
    submit(ports["EX01"], "kept@sink.test", "kept")

    def queued_on_ex01() -> int:
        out = shell(ex01, "(Get-Queue | Where-Object DeliveryType -eq SmartHostConnectorDelivery | "
                          "Measure-Object -Property MessageCount -Sum).Sum").out.strip()
        return int(out) if out.isdigit() else 0

    wait_for(lambda: queued_on_ex01() == 4, timeout=60, message="four messages queued on EX01")
    r = shell(ex01, "Suspend-Queue -Filter \"DeliveryType -eq 'SmartHostConnectorDelivery'\"; "
                    "Get-Message -Filter \"Subject -eq 'kept'\" | Suspend-Message -Confirm:$false")
    assert r.ok, r.err
    r = shell(ex01, "Redirect-Message -Server EX01 -Target EX01")
    assert not r.ok and "can't be the server being drained" in r.err
    r = shell(ex01, "Redirect-Message -Server EX02 -Target EX01")   # another server, through its admin API
    assert r.ok, r.err
    sink = SmtpPeer("127.0.0.1", sink_port)
    try:
        r = shell(ex01, "Redirect-Message -Server EX01 -Target ex02.domain.com")
        assert r.ok, r.err
        wait_for(lambda: len(sink.received) == 3, timeout=60, message="the three drained messages at the sink")
        for got in sink.received:
            msg = email.message_from_bytes(got.data)
            received = [" ".join(h.split()) for h in msg.get_all("Received")]
            assert "by ex02.domain.com" in received[0] and "by ex01.domain.com" in received[1], received
        assert sorted(email.message_from_bytes(g.data)["Subject"] for g in sink.received) == \
            ["drained 0", "drained 1", "drained 2"]
        left = shell(ex01, "Get-Message | ForEach-Object { $_.Subject + '|' + $_.Status }").out.split()
        assert left == ["kept|Suspended"], left
        # EX01 handed them over as within the organisation, tracked as sent (SEND) to EX02.
        def sent_by_ex01() -> list[str]:
            out = shell(ex01, "Get-MessageTrackingLog -EventId SEND -Server EX01 | "
                              "ForEach-Object { $_.MessageSubject + '|' + $_.ConnectorId }").out.split("\n")
            return sorted(line for line in out if line.startswith("drained"))

        wait_for(lambda: len(sent_by_ex01()) == 3, timeout=30, message="EX01's SEND events")
        assert sent_by_ex01() == [f"drained {n}|Intra-Organization SMTP Send Connector" for n in range(3)]
        time.sleep(1.5)
        assert len(sink.received) == 3   # nothing sent twice
    finally:
        sink.stop()


@pytest.fixture
def behind_a_proxy(tmp_path, postgres_url):
    """EX01 whose PostgreSQL is reached through a TCP proxy the test can cut, with a mailbox admin@domain.com."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    proxy = TcpProxy((url.host, url.port or 5432))
    home = make_home(tmp_path / "ex01", store=url.set(host="127.0.0.1", port=proxy.port)
                     .render_as_string(hide_password=False))
    port = bind_ports(home)["frontend"]
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com", runtime=None).ok
    yield home, port, proxy
    proxy.close()


def test_mail_flows_while_postgresql_is_away_and_the_server_says_so_once(behind_a_proxy):
    """The store goes away (PostgreSQL stopped, the network cut): mail is still accepted, queued and delivered
    with the configuration last read; the server says once that it can't read the configuration (not once a
    second), and when the store is back, says so and writes the tracking events it held."""
    home, port, proxy = behind_a_proxy
    server = Server(home).start()
    try:
        submit(port, "admin@domain.com", "before")
        proxy.cut()
        for n in range(3):
            submit(port, "admin@domain.com", f"while away {n}")
        wait_for(lambda: len(maildir_messages(home, "admin@domain.com")) == 4, message="four messages delivered")
        time.sleep(4)                                       # four config polls of every worker
        out = server.output()
        workers = int(re.search(r"running with (\d+) worker", out).group(1))
        said = out.count("reading the configuration failed")
        assert 1 <= said <= workers, out[-3000:]            # once per worker process
        assert "Traceback" not in server.output()
        proxy.restore()
        wait_for(lambda: "reading the configuration works again" in server.output(), message="the store back")
        wanted = {"before"} | {f"while away {n}" for n in range(3)}

        def delivered_subjects() -> set[str]:
            return set(shell(home, "Get-MessageTrackingLog -EventId DELIVER | ForEach-Object { $_.MessageSubject }")
                       .out.splitlines())

        wait_for(lambda: delivered_subjects() >= wanted, timeout=30, message="the held tracking events written")
    finally:
        server.stop()


def test_a_server_starts_with_the_configuration_it_read_last_while_postgresql_is_away(behind_a_proxy):
    """A server (re)started during an outage serves with the configuration it kept from its last read; one that
    never read it says why it can't start, ever less often; the shell still manages the queues."""
    home, port, proxy = behind_a_proxy
    proxy.cut()
    with pytest.raises(RuntimeError, match="did not start") as never_read:
        # Two failed starts and a longer wait before the third: under a loaded CI a worker's start (imports, the
        # refused connection) took long enough that six seconds didn't cover two of them.
        Server(home).start(timeout=60, give_up_on="restarting it in 2 s")
    assert "has not read its configuration before: start it when the store answers" in str(never_read.value)
    assert "restarting it in 2 s" in str(never_read.value)                 # backing off, not once a second

    proxy.restore()
    server = Server(home, admin=True).start()
    try:
        assert home.config_cache.exists() and home.config_cache.stat().st_mode & 0o077 == 0
        server.stop()
        proxy.cut()
        offset = len(server.output())
        server.start()
        assert "starting with the configuration read last" in server.output()[offset:]
        submit(port, "admin@domain.com", "served from the kept configuration")
        wait_for(lambda: maildir_messages(home, "admin@domain.com"), message="the message delivered")
        queues = cli(home, "shell", "-c", "Get-Queue | ft Identity,MessageCount")
        assert queues.returncode == 0 and "EX01\\Submission" in queues.stdout, queues
        assert "the store of this organisation can't be reached" in queues.stderr
        config = cli(home, "shell", "-c", "Get-ReceiveConnector")
        assert config.returncode == 1 and "needs the organisation's store, which can't be reached" in config.stderr
        assert "This is a bug" not in config.stderr
        request = urllib.request.Request(f"http://127.0.0.1:{server.admin_port}/api/cmdlets/Get-ReceiveConnector",
                                         method="POST", headers={"Authorization": f"Bearer {home.admin_token}"})
        with pytest.raises(urllib.error.HTTPError) as api:
            urllib.request.urlopen(request, timeout=30)
        assert api.value.code == 503 and "store can't be reached" in json.loads(api.value.read())["error"]
        proxy.restore()
        wait_for(lambda: "reading the configuration works again" in server.output()[offset:], message="the store")
        assert cli(home, "shell", "-c", "Get-ReceiveConnector").returncode == 0
    finally:
        server.stop()
