"""One store test suite, run against SQLite and against PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from helpers import cli, shell

from mailgate.config.migrate import current_revision
from mailgate.config.model import AcceptedDomain, ReceiveConnector, SendConnector
from mailgate.config.store import ConfigStore
from mailgate.home import Home


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = ConfigStore(url)
    yield s
    s.dispose()


def test_schema_is_migrated_and_migration_is_idempotent(store):
    assert current_revision(store.engine) == "0001"
    store.migrate()
    assert current_revision(store.engine) == "0001"


def test_put_get_list_delete_and_revision(store):
    r0 = store.revision()
    rc = ReceiveConnector(name="Relay", server="EX01", bindings=["0.0.0.0:25"], remote_ip_ranges=["10.0.0.0/24"])
    with store.transaction() as tx:
        tx.put(rc)
    assert store.revision() == r0 + 1
    with store.reader() as tx:
        got = tx.get(ReceiveConnector, "ex01\\relay")
        assert got is not None and got.guid == rc.guid and str(got.remote_ip_ranges[0]) == "10.0.0.0/24"
        assert [c.name for c in tx.list(ReceiveConnector, "ex01")] == ["Relay"]
        assert tx.list(ReceiveConnector, "EX02") == []
    with store.transaction() as tx:
        tx.put(got.model_copy(update={"name": "Relay2"}))
    with store.reader() as tx:
        assert tx.get(ReceiveConnector, "ex01\\relay") is None
        assert tx.get_by_guid(ReceiveConnector, rc.guid).name == "Relay2"
    with store.transaction() as tx:
        tx.delete(rc)
    assert store.list(ReceiveConnector) == []


def test_a_failed_transaction_leaves_nothing(store):
    before = store.revision()
    with pytest.raises(RuntimeError):
        with store.transaction() as tx:
            tx.put(SendConnector(name="A", address_spaces=["*"]))
            raise RuntimeError("validation failed half way")
    assert store.list(SendConnector) == []
    assert store.revision() == before


def test_names_are_unique_per_kind(store):
    with store.transaction() as tx:
        tx.put(AcceptedDomain(name="Contoso", domain_name="contoso.com"))
    with pytest.raises(sa.exc.IntegrityError):
        with store.transaction() as tx:
            tx.put(AcceptedDomain(name="contoso", domain_name="contoso.net"))
    assert len(store.list(AcceptedDomain)) == 1


def test_snapshot_groups_by_kind(store):
    with store.transaction() as tx:
        tx.put(SendConnector(name="Out", address_spaces=["*"]))
        tx.put(AcceptedDomain(name="d", domain_name="d.example"))
    revision, snap = store.snapshot()
    assert revision == store.revision()
    assert [c.name for c in snap["SendConnector"]] == ["Out"] and [d.name for d in snap["AcceptedDomain"]] == ["d"]


def test_tracking_insert_and_every_filter(store):
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for i in range(6):
        rows.append({"timestamp": now + dt.timedelta(seconds=i), "server": "EX01" if i < 5 else "EX02",
                     "event_id": ["RECEIVE", "DELIVER", "FAIL"][i % 3], "source": "SMTP", "internal_message_id": i,
                     "message_id": f"<m{i}@x>", "network_message_id": f"net-{i}", "sender": f"s{i % 2}@a.example",
                     "recipients": [f"r{i}@b.example", "common@b.example"], "recipient_status": ["250 OK"],
                     "message_subject": f"Subject {i} Quarterly", "reference": "ref" if i == 2 else None})
    store.insert_tracking(rows)
    q = store.query_tracking
    assert len(q()) == 6
    assert [r["internal_message_id"] for r in q(server="ex01")] == [0, 1, 2, 3, 4]
    assert [r["internal_message_id"] for r in q(recipients=["R3@b.example", "r4@b.example"])] == [3, 4]
    assert len(q(recipients=["common@b.example"])) == 6
    assert [r["internal_message_id"] for r in q(sender="S1@a.example")] == [1, 3, 5]
    assert [r["internal_message_id"] for r in q(event_id="fail")] == [2, 5]
    assert [r["internal_message_id"] for r in q(message_id="<m4@x>")] == [4]
    assert [r["internal_message_id"] for r in q(internal_message_id=3)] == [3]
    assert [r["internal_message_id"] for r in q(network_message_id="net-1")] == [1]
    assert len(q(subject="quarterly")) == 6 and [r["internal_message_id"] for r in q(subject="Subject 2")] == [2]
    assert [r["internal_message_id"] for r in q(start=now + dt.timedelta(seconds=2), end=now + dt.timedelta(seconds=4))] == [2, 3]
    assert [r["internal_message_id"] for r in q(reference="ref")] == [2]
    assert len(q(limit=2)) == 2
    got = q(internal_message_id=0)[0]
    assert got["recipients"] == ["r0@b.example", "common@b.example"] and got["timestamp"].tzinfo is not None
    # Retention deletes in short transactions (batch events each), recipients' index rows with their events.
    transactions = []
    connect = store._connect

    def counted(*args, **kwargs):
        if kwargs.get("write"):
            transactions.append(1)
        return connect(*args, **kwargs)

    store._connect = counted
    removed = store.purge_tracking(now + dt.timedelta(seconds=3), "EX01", batch=2)
    store._connect = connect
    assert removed == 3 and len(q()) == 3 and len(transactions) == 2
    assert [r["internal_message_id"] for r in q(recipients=["common@b.example"])] == [3, 4, 5]


def test_tracking_is_read_a_page_at_a_time_and_each_event_once_in_order(store):
    """Get-MessageTrackingLog reads the log a page at a time, each page continuing after the last (timestamp, id)
    read: events that share a timestamp across a page's end are neither lost nor read twice, and -ResultSize
    stops the reading."""
    base = dt.datetime(2026, 12, 5, 12, 0, tzinfo=dt.timezone.utc)
    # 23 events in 5 distinct times, inserted out of time order, so that id order and time order differ
    rows = [{"timestamp": base + dt.timedelta(seconds=(i * 7) % 5), "server": "EX01", "event_id": "RECEIVE",
             "source": "SMTP", "internal_message_id": i, "recipients": ["r@b.example"]} for i in range(23)]
    store.insert_tracking(rows)
    everything = store.query_tracking(limit=None)
    assert len(everything) == 23
    order = [(r["timestamp"], r["id"]) for r in everything]
    assert order == sorted(order)
    for page in (1, 4, 5, 22, 23, 100):
        paged = [r["id"] for r in store.iter_tracking(limit=None, page=page)]
        assert paged == [r["id"] for r in everything], page
        assert [r["id"] for r in store.iter_tracking(limit=9, page=page)] == paged[:9], page
    assert [r["id"] for r in store.iter_tracking(limit=None, page=4, recipients=["R@b.example"],
                                                 start=base + dt.timedelta(seconds=2))] == \
        [r["id"] for r in everything if r["timestamp"] >= base + dt.timedelta(seconds=2)]


def test_an_organisation_on_postgresql_is_managed_from_the_shell(tmp_path, postgres_url):
    result = cli(tmp_path / "h", "init", "--server", "EX01", "--domain", "domain.com", "--store", postgres_url)
    assert result.returncode == 0, result.stderr
    home = Home.load(tmp_path / "h")
    r = shell(home, 'New-ReceiveConnector InternalRelay -Bindings 0.0.0.0:25 -RemoteIPRanges 192.168.0.0/24 '
                    '-Usage Custom -PermissionGroups AnonymousUsers\nGet-ReceiveConnector | ft Name')
    assert r.ok, r.err
    assert "InternalRelay" in r.out and "Default Frontend EX01" in r.out
    # A second server joins the same organisation: not without the organisation's secret key (and then nothing
    # is created), then with it, and it sees the same configuration.
    refused = cli(tmp_path / "h2", "init", "--server", "EX02", "--store", postgres_url)
    assert refused.returncode != 0 and "copy secret.key from EX01" in refused.stderr, refused
    assert not (tmp_path / "h2").exists()
    assert "EX02" not in cli(tmp_path / "h", "shell", "-c", "Get-TransportService | ft Name").stdout
    (tmp_path / "h2").mkdir()
    (tmp_path / "h2" / "secret.key").write_bytes((tmp_path / "h" / "secret.key").read_bytes())
    joined = cli(tmp_path / "h2", "init", "--server", "EX02", "--store", postgres_url)
    assert joined.returncode == 0, joined.stderr
    assert "Joined the organisation of EX01" in joined.stdout + joined.stderr
    listing = cli(tmp_path / "h2", "shell", "-c", "Get-ReceiveConnector | ft Identity")
    assert "EX01\\InternalRelay" in listing.stdout and "EX02\\Default Frontend EX02" in listing.stdout
