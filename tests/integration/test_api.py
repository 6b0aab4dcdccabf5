"""The REST API, Prometheus metrics and the web admin center of a running server.

The admin center is driven in Debian's Chromium (headless, through chromedriver and
Selenium) as an administrator would use it; everything it shows is checked against
what the shell sees of the same server.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from helpers import Server, bind_ports, shell, synced, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def admin_server(home):
    srv = Server(home, admin=True)
    srv.ports = bind_ports(home)
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com", runtime=None).ok
    srv.start()
    srv.url = f"http://127.0.0.1:{srv.admin_port}"
    yield srv
    srv.stop()


def call(srv: Server, cmdlet: str, token: str | None = None, **params) -> httpx.Response:
    token = srv.home.admin_token if token is None else token
    return httpx.post(f"{srv.url}/api/cmdlets/{cmdlet}", json=params, timeout=60,
                      headers={"Authorization": f"Bearer {token}"})


def send(srv: Server, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["frontend"], timeout=30) as client:
        client.sendmail("someone@example.org", [to], f"Subject: {subject}\r\n\r\nhello\r\n".encode())


def test_every_cmdlet_is_an_authenticated_documented_endpoint(admin_server):
    srv = admin_server
    assert call(srv, "Get-ReceiveConnector", token="wrong").status_code == 401
    assert httpx.post(f"{srv.url}/api/cmdlets/Get-Queue", json={}).status_code == 401
    in_url = httpx.post(f"{srv.url}/api/cmdlets/Get-Queue", params={"token": srv.home.admin_token}, json={})
    assert in_url.status_code == 401
    # JSON can spell a lone surrogate, which isn't text: refused as a bad value, not a server error.
    surrogate = httpx.post(f"{srv.url}/api/cmdlets/Set-ReceiveConnector", timeout=30,
                           content=b'{"Identity": "Default Frontend EX01", "RemoteIPRanges": {"Add": ["\\ud800"]}}',
                           headers={"Authorization": f"Bearer {srv.home.admin_token}",
                                    "Content-Type": "application/json"})
    assert surrogate.status_code == 400 and "lone surrogate (U+D800)" in surrogate.json()["error"], surrogate.text

    page = httpx.get(f"{srv.url}/", timeout=30)
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"

    schema = httpx.get(f"{srv.url}/openapi.json", timeout=30).json()
    for name in ("Get-ReceiveConnector", "New-SendConnector", "Get-Queue", "Test-Mailflow", "Get-MessageTrackingLog",
                 "New-ExchangeCertificate", "Test-MailflowBestPractice"):
        assert f"/api/cmdlets/{name}" in schema["paths"], name

    names = [c["Name"] for c in call(srv, "Get-ReceiveConnector").json()["output"]]
    assert sorted(names) == ["Client Frontend EX01", "Default Frontend EX01"]

    created = call(srv, "New-AcceptedDomain", Name="Fabrikam", DomainName="fabrikam.com", DomainType="InternalRelay")
    assert created.status_code == 200, created.text
    assert "fabrikam.com" in shell(srv.home, "Get-AcceptedDomain | ft DomainName,DomainType").out

    # Bad input: a clear error naming the parameter, and nothing changes.
    before = shell(srv.home, "Get-ReceiveConnector | fl Name,RemoteIPRanges").out
    bad = call(srv, "Set-ReceiveConnector", Identity="Default Frontend EX01", RemoteIPRanges=["10.0.0.0/33"])
    assert bad.status_code == 400
    assert bad.json()["parameter"] == "RemoteIPRanges"
    assert shell(srv.home, "Get-ReceiveConnector | fl Name,RemoteIPRanges").out == before
    unknown = call(srv, "Get-Mailbox", Nonsense="x")
    assert unknown.status_code == 422
    # Cmdlet names are case-insensitive, as in the shell; an unknown one gets the shell's error, in JSON.
    lower = httpx.post(f"{srv.url}/api/cmdlets/new-accepteddomain", follow_redirects=True, timeout=60,
                       json={"Name": "Lower", "DomainName": "lower.example"},
                       headers={"Authorization": f"Bearer {srv.home.admin_token}"})
    assert lower.status_code == 200 and lower.json()["output"][0]["DomainName"] == "lower.example", lower.text
    missing = call(srv, "Get-Mailboxes")
    assert missing.status_code == 404 and missing.json()["exception"] == "CommandNotFoundException"
    assert "The term 'Get-Mailboxes' is not recognized" in missing.json()["error"]
    assert call(srv, "get-mailboxes", token="wrong").status_code == 401
    assert call(srv, "Get-Credential").status_code == 404

    # Oversized input: a body over the limit is refused (413) unread, with the token or without, whether it
    # declares its length or streams in chunks; an identity of megabytes is simply not found, quickly.
    huge = b'{"Identity": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    for token in (srv.home.admin_token, "wrong"):
        refused = httpx.post(f"{srv.url}/api/cmdlets/Get-AcceptedDomain", content=huge, timeout=60,
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert refused.status_code == 413
        chunked = httpx.post(f"{srv.url}/api/cmdlets/Get-AcceptedDomain", timeout=60,
                             content=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                             headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        assert chunked.status_code == 413
    long_identity = call(srv, "Get-AcceptedDomain", Identity="a" * 3_000_000)
    assert long_identity.status_code == 400 and "couldn't be found" in long_identity.json()["error"]
    assert call(srv, "Get-AcceptedDomain", Identity="a*" * 2000).json()["error"].startswith("The wildcard pattern is too long")

    # Input a fuzzer (schemathesis) sent: several identities where one is taken is a binding error, not a
    # server error; -Follow, which streams to a shell, is refused instead of holding a request open forever.
    for cmdlet in ("Get-Queue", "Get-Message", "Export-Message", "Retry-Queue", "Get-ReceiveConnector"):
        several = call(srv, cmdlet, Identity=[None, None])
        assert several.status_code == 400 and several.json()["parameter"] == "Identity", (cmdlet, several.text)
        # An object is no identity either (it was looked up by its Python text: "The queue '{'a': 1}' ...").
        hashtable = call(srv, cmdlet, Identity={"a": 1})
        assert hashtable.status_code == 400 and "Hashtable" in hashtable.json()["error"], (cmdlet, hashtable.text)
        in_a_list = call(srv, cmdlet, Identity=[{"a": 1}])
        assert in_a_list.status_code == 400 and in_a_list.json()["parameter"] == "Identity", (cmdlet, in_a_list.text)
    missing = call(srv, "Export-Message", Identity=[None])
    assert missing.status_code == 400 and missing.json()["parameter"] == "Identity", missing.text
    follow = call(srv, "Get-MessageTrackingLog", Follow=True)
    assert follow.status_code == 400 and follow.json()["parameter"] == "Follow"

    # A file named in a parameter would be the server's, read or written with its rights: refused, and nothing
    # is written; the content travels as FileData instead.
    planted = srv.home.path / "planted.txt"
    for cmdlet, params in [("New-ExchangeCertificate", {"DomainName": "mail.domain.com", "GenerateRequest": True,
                                                        "RequestFile": str(planted)}),
                           ("Import-ExchangeCertificate", {"FileName": "/etc/ssl/private/ssl-cert-snakeoil.key"}),
                           ("Export-ExchangeCertificate", {"Thumbprint": "00", "FileName": str(planted)}),
                           ("Export-Message", {"Identity": "EX01\\Submission\\1", "Path": str(planted)})]:
        refused = call(srv, cmdlet, **params)
        assert refused.status_code == 400 and "names a file" in refused.json()["error"], (cmdlet, refused.text)
    assert not planted.exists()
    cert = shell(srv.home, "New-ExchangeCertificate -DomainName api.domain.com -PrivateKeyExportable $true | "
                           "ForEach-Object { $_.Thumbprint }").out.split()[-1]
    exported = call(srv, "Export-ExchangeCertificate", Thumbprint=cert)
    assert exported.status_code == 200 and "BEGIN CERTIFICATE" in exported.json()["output"][0], exported.text

    # -WhatIf through the API reports and changes nothing.
    whatif = call(srv, "Set-ReceiveConnector", Identity="Default Frontend EX01", Enabled=False, WhatIf=True).json()
    assert whatif["messages"] and whatif["messages"][0].startswith("What if:")
    assert "True" in shell(srv.home, 'Get-ReceiveConnector "Default Frontend EX01" | fl Enabled').out


# JSON an API client (or a script gone wrong) may send for any parameter.
HOSTILE_JSON = [{}, [[]], {"Add": {"x": 1}}, {"Remove": "absent"}, 1e308, 2 ** 70, "a\r\nb", "x" * 5000, "../../x",
                ["a", 1, None]]


def test_no_json_value_of_any_parameter_of_any_cmdlet_is_a_server_error(admin_server):
    """Each cmdlet of the API, each parameter alone, each hostile JSON value: a 400 with its reason or a result,
    never a 500 or "a bug in mailgate" (New-Mailbox {"Name": "../../x"} was a 500: no address for its alias)."""
    srv = admin_server
    cmdlets = httpx.get(f"{srv.url}/api/cmdlets", timeout=30,
                        headers={"Authorization": f"Bearer {srv.home.admin_token}"}).json()
    network = {"Send-MailMessage", "Resolve-DnsName", "Test-NetConnection"}   # shell commands, not the API's
    failures, tried = [], 0
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {srv.home.admin_token}"}) as client:
        for cmdlet in cmdlets:
            if cmdlet["name"] in network:
                continue
            for param in cmdlet["parameters"]:
                if param["name"] in ("Follow", "FollowSeconds", "Confirm"):
                    continue
                for value in HOSTILE_JSON:
                    body = {param["name"]: value, **({"Confirm": False} if param["name"] != "Confirm" else {})}
                    tried += 1
                    try:
                        r = client.post(f"{srv.url}/api/cmdlets/{cmdlet['name']}", json=body)
                    except httpx.TransportError as exc:   # the server's 500 may end the connection as well
                        failures.append(f"{cmdlet['name']} {str(body)[:100]}: connection dropped ({exc})")
                        continue
                    if r.status_code >= 500 or "bug in mailgate" in r.text:
                        failures.append(f"{cmdlet['name']} {str(body)[:100]}: {r.status_code} {r.text[:200]}")
    assert tried > 3000 and not failures, "\n".join(failures)
    assert "Traceback" not in srv.output()


def test_metrics_count_every_worker(admin_server):
    srv = admin_server
    for i in range(6):   # several connections, so that SO_REUSEPORT spreads them over the workers
        send(srv, "admin@domain.com", f"metrics {i}")

    def received() -> float:
        text = httpx.get(f"{srv.url}/metrics", timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("mailgate_messages_received_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total if total >= 6 else 0

    assert wait_for(received) == 6
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    assert 'mailgate_queue_messages{delivery_type="Undefined",queue="EX01\\\\Submission"}' in text
    assert "mailgate_smtp_sessions_open" in text
    assert "mailgate_back_pressure_level 0.0" in text          # the queue's disk has room: Normal
    delivered = [line for line in text.splitlines() if line.startswith("mailgate_messages_delivered_total{")]
    assert delivered and sum(float(line.rsplit(" ", 1)[1]) for line in delivered) >= 0
    # Each worker's series carry its index; the exposition is valid for a Prometheus parser.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["worker"] for s in families["mailgate_recipients_failed"].samples} == {"0", "1"}
    buckets = [s for s in families["mailgate_delivery_latency_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["worker"] == "0"]
    assert [float(s.labels["le"]) for s in buckets] == sorted(float(s.labels["le"]) for s in buckets)

    # SPEC C8's TLS share and rejects by reason: a session over STARTTLS, and a refused recipient.
    with smtplib.SMTP("127.0.0.1", srv.ports["frontend"], timeout=30) as client:
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("x")
        client.mail("someone@example.org")
        assert client.rcpt("nobody@domain.com")[0] == 550

    def counted(name: str, label: str, value: str) -> float:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=30).text)}
        return sum(s.value for s in families[name].samples if s.name == f"{name}_total" and s.labels[label] == value)

    wait_for(lambda: counted("mailgate_smtp_sessions", "tls", "yes") >= 1, message="the TLS session counted")
    assert counted("mailgate_smtp_sessions", "tls", "no") >= 6   # the six plain ones above
    assert counted("mailgate_smtp_rejects", "code", "5.1.10") >= 1


# ---- the web admin center in a real browser -------------------------------------------------------
def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not (browser and driver_path):
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium and chromium-driver are needed (make test installs them)")
        pytest.skip("chromium/chromedriver not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def test_admin_center_in_a_real_browser(admin_server, browser):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    srv = admin_server
    # The queues view redraws itself every few seconds: an element found before a redraw goes stale, so every
    # look at it is retried.
    wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))

    def ready(view: str):
        wait.until(lambda d: d.find_element(By.ID, "view").get_attribute("data-view") == view
                   and d.find_element(By.ID, "view").get_attribute("data-ready") == "true")
        return browser.find_element(By.ID, "view")

    def banner() -> str:
        element = browser.find_element(By.ID, "banner")
        return element.text if element.is_displayed() else ""

    browser.get(srv.url + "/#/receive")
    # A wrong token is refused with a message; the right one opens the page.
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: "not accepted" in banner())
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(srv.home.admin_token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button").click()
    view = ready("receive")
    assert "Default Frontend EX01" in view.text and "Client Frontend EX01" in view.text

    # Disable a connector from the page; the shell sees it.
    row = view.find_element(By.CSS_SELECTOR, 'tr[data-identity="EX01\\\\Client Frontend EX01"]')
    row.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: "False" in shell(srv.home, 'Get-ReceiveConnector "Client Frontend EX01" | fl Enabled').out)

    # Accepted domains: add one with the form; a bad one shows the management core's error.
    browser.get(srv.url + "/#/domains")
    view = ready("domains")
    view.find_element(By.NAME, "Name").send_keys("Fabrikam")
    view.find_element(By.NAME, "DomainName").send_keys("fabrikam.com")
    view.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: "fabrikam.com" in d.find_element(By.ID, "view").text)
    assert "fabrikam.com" in shell(srv.home, "Get-AcceptedDomain | ft DomainName").out
    view = ready("domains")
    view.find_element(By.NAME, "Name").send_keys("Broken")
    view.find_element(By.NAME, "DomainName").send_keys("not a domain")
    view.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: "DomainName" in banner() or "domain" in banner().lower())
    assert "Broken" not in shell(srv.home, "Get-AcceptedDomain | ft Name").out

    # Mailboxes.
    browser.get(srv.url + "/#/mailboxes")
    view = ready("mailboxes")
    view.find_element(By.NAME, "Name").send_keys("Bob")
    view.find_element(By.NAME, "PrimarySmtpAddress").send_keys("bob@domain.com")
    view.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: "bob@domain.com" in d.find_element(By.ID, "view").text)
    synced(srv.home)

    # Live queues with a chart: suspend mailbox delivery, send mail, watch the count rise on the page.
    send(srv, "bob@domain.com", "warm up")   # mailbox delivery's queue exists once mail has used it
    wait_for(lambda: shell(srv.home, 'Get-Queue "EX01\\Mailbox Database EX01"').ok)
    assert shell(srv.home, 'Suspend-Queue "EX01\\Mailbox Database EX01"').ok
    hostile_subject = '<img src=x onerror="document.title=\'pwned\'">'
    send(srv, "bob@domain.com", hostile_subject)
    send(srv, "bob@domain.com", "second")
    browser.get(srv.url + "/#/queues")
    ready("queues")
    wait.until(lambda d: any("Mailbox Database EX01" in r.text and "Suspended" in r.text and " 2 " in f" {r.text} "
                             for r in d.find_elements(By.CSS_SELECTOR, "#queue-list tr")))
    wait.until(lambda d: any(line.get_attribute("data-queue") == "EX01\\Mailbox Database EX01"
                             for line in d.find_elements(By.CSS_SELECTOR, "#queue-chart svg polyline")))

    def click_queue_button(label: str) -> None:
        def click(d) -> bool:
            row = d.find_element(By.CSS_SELECTOR, 'tr[data-identity="EX01\\\\Mailbox Database EX01"]')
            [b for b in row.find_elements(By.TAG_NAME, "button") if b.text == label][0].click()
            return True
        wait.until(click)

    click_queue_button("Messages")
    messages = wait.until(lambda d: (lambda text: text if "second" in text else None)(
        d.find_element(By.ID, "queue-messages").text))
    assert hostile_subject in messages   # shown as text, not markup
    click_queue_button("Resume")
    wait.until(lambda d: not shell(srv.home, 'Get-Message -Queue "EX01\\Mailbox Database EX01"').out.strip())

    # Message trace.
    browser.get(srv.url + "/#/trace")
    view = ready("trace")
    view.find_element(By.NAME, "Recipients").send_keys("bob@domain.com")
    view.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: "DELIVER" in d.find_element(By.ID, "trace-results").text)
    trace = browser.find_element(By.ID, "trace-results").text
    assert "RECEIVE" in trace and hostile_subject in trace
    # times in the reader's local format, not the API's ISO 8601 with microseconds
    import re

    assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", trace) and re.search(r"\d{1,2}:\d{2}:\d{2}", trace), trace
    assert browser.title != "pwned"

    # Test mail flow.
    browser.get(srv.url + "/#/test")
    view = ready("test")
    view.find_element(By.NAME, "TargetEmailAddress").send_keys("admin@domain.com")
    view.find_element(By.CSS_SELECTOR, "form button").click()
    wait.until(lambda d: "Success" in d.find_element(By.ID, "test-result").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#test-result td.result-Success")

    # Overview counts what the server received.
    browser.get(srv.url + "/#/overview")
    view = ready("overview")
    assert "Received" in view.text and "Listeners" in view.text


def test_a_large_tracking_search_is_streamed_and_complete(admin_server):
    """Get-MessageTrackingLog -ResultSize Unlimited over the API is sent while it is read, a page at a time (the
    whole answer used to be built in the mail worker first: 77,000 events took 318 MB there), and is the same
    answer: every event once, oldest first, the default size's warning kept."""
    import datetime as dt

    from mailgate.config.store import ConfigStore

    base = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    store = ConfigStore(admin_server.home.store_url)
    try:
        store.insert_tracking([{"timestamp": base + dt.timedelta(milliseconds=i // 3), "server": "EX01",
                                "event_id": "RECEIVE", "source": "SMTP", "internal_message_id": i,
                                "message_subject": f"bulk {i}", "recipients": [f"r{i}@b.example"]}
                               for i in range(1300)])
    finally:
        store.dispose()
    with httpx.stream("POST", f"{admin_server.url}/api/cmdlets/Get-MessageTrackingLog", timeout=60,
                      json={"ResultSize": "Unlimited", "MessageSubject": "bulk"},
                      headers={"Authorization": f"Bearer {admin_server.home.admin_token}"}) as r:
        assert r.status_code == 200 and "content-length" not in r.headers   # sent as it is read
        import json

        answer = json.loads(r.read())
    assert [e["InternalMessageId"] for e in answer["output"]] == list(range(1300))
    assert answer["warnings"] == [] and answer["errors"] == []
    default = call(admin_server, "Get-MessageTrackingLog", MessageSubject="bulk").json()
    assert [e["InternalMessageId"] for e in default["output"]] == list(range(1000))
    assert default["warnings"] and "first 1000" in default["warnings"][0]
    few = call(admin_server, "Get-MessageTrackingLog", MessageSubject="bulk", ResultSize=3)
    assert "content-length" in few.headers and [e["InternalMessageId"] for e in few.json()["output"]] == [0, 1, 2]


def test_a_receive_connector_cannot_take_the_admin_centers_address(home):
    """Whichever bound first would have had it: a connector on the admin port left the admin center unreachable
    after a restart (the API said "Address already in use")."""
    listen = home.admin_listen
    port = int(listen.rsplit(":", 1)[1])
    for binding in (listen, f"0.0.0.0:{port}"):
        r = shell(home, f"New-ReceiveConnector Grab -Usage Custom -Bindings {binding} -RemoteIPRanges 10.0.0.9",
                  runtime=None)
        assert not r.ok and "REST API and admin center" in r.err and "Grab" not in shell(
            home, "Get-ReceiveConnector | ft Name", runtime=None).out
    assert shell(home, f"New-ReceiveConnector Grab -Usage Custom -Bindings 127.0.0.2:{port} -RemoteIPRanges 10.0.0.9",
                 runtime=None).ok   # another address, the same port: no clash
    r = shell(home, f"Set-ReceiveConnector Grab -Bindings 0.0.0.0:{port}", runtime=None)
    assert not r.ok and "REST API and admin center" in r.err


def test_a_busy_admin_port_is_a_clear_error_and_mail_still_flows(home):
    import socket

    ports = bind_ports(home)
    assert shell(home, "New-Mailbox -Name Admin -PrimarySmtpAddress admin@domain.com", runtime=None).ok
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        srv = Server(home, admin=True)
        srv.admin_port = taken.getsockname()[1]
        srv.ports = ports
        srv.start()
        try:
            out = srv.output()
            assert f"The admin API can't listen on 127.0.0.1:{srv.admin_port}: Address already in use" in out
            assert "--admin-listen off" in out and "Traceback" not in out and "exited with" not in out
            send(srv, "admin@domain.com", "still flowing")
            assert "DELIVER" in wait_for(lambda: [e for e in shell(home, 'Get-MessageTrackingLog -MessageSubject '
                                                                         '"still flowing" | ft EventId').out.split()
                                                  if e == "DELIVER"])
        finally:
            srv.stop()
