"""The configuration a server keeps in its data directory to start from while the store can't be reached."""

from __future__ import annotations

from mailgate.config.model import Mailbox, ReceiveConnector
from mailgate.config.store import load_snapshot, save_snapshot


def test_a_kept_snapshot_reads_back_as_the_same_objects_and_only_its_owner_can_read_it(tmp_path):
    path = tmp_path / "config-cache.json"
    connector = ReceiveConnector(name="Relay", server="EX01", bindings=["0.0.0.0:2525"],
                                 remote_ip_ranges=["10.0.0.0/24"])
    mailbox = Mailbox(name="Admin", alias="admin", primary_smtp_address="admin@domain.com",
                      password_hash="scrypt$x")
    save_snapshot(path, 42, {"ReceiveConnector": [connector], "Mailbox": [mailbox]})
    assert path.stat().st_mode & 0o777 == 0o600
    revision, snapshot = load_snapshot(path)
    assert revision == 42
    assert snapshot["ReceiveConnector"] == [connector] and snapshot["Mailbox"] == [mailbox]
    assert snapshot["SendConnector"] == []                        # every kind is there, as in a store snapshot
    assert not list(tmp_path.glob("*.tmp"))


def test_no_kept_snapshot_or_a_damaged_one_is_none(tmp_path, caplog):
    path = tmp_path / "config-cache.json"
    assert load_snapshot(path) is None
    for damaged in ("", "{", '{"revision": 1}', '{"revision": 1, "objects": [["Mailbox", "{}"]]}'):
        path.write_text(damaged)
        assert load_snapshot(path) is None, damaged
    assert "can't be read" in caplog.text
