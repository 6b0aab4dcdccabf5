"""The Pickup and Replay directories: files a program or an administrator drops in are submitted, as
Exchange's transport service does; a file that isn't a message becomes .bad; an exported message replays."""

from __future__ import annotations

import smtplib
import time

from helpers import maildir_messages, shell, synced, tracking_events, wait_for

from mailgate.receive.pickup import POLL_SECONDS


def _mailboxes(home) -> None:
    for name in ("Keeper", "Other"):
        r = shell(home, f"New-Mailbox -Name {name} -PrimarySmtpAddress {name.lower()}@domain.com")
        assert r.ok, r.err
    synced(home)


def test_a_pickup_file_is_sent_to_its_to_cc_and_bcc_and_a_file_that_isnt_a_message_is_kept_as_bad(home, server):
    _mailboxes(home)
    pickup = home.path / "Pickup"
    wait_for(pickup.exists, message="the Pickup directory")
    # A program's file: Unix line ends, Bcc, no Date or Message-ID.
    (pickup / "report.eml").write_bytes(b"From: Reports <keeper@domain.com>\nTo: other@domain.com\n"
                                        b"Bcc: keeper@domain.com\nSubject: nightly report\n\nall good\n")
    (pickup / "junk.eml").write_bytes(b"this is not a message\n")
    (pickup / "huge.eml").write_bytes(b"From: keeper@domain.com\r\nTo: other@domain.com\r\n\r\n"
                                      + b"x" * (10 * 1024 * 1024 + 1))   # the organisation's MaxSendSize is 10 MB
    for address in ("other@domain.com", "keeper@domain.com"):
        (copy,) = wait_for(lambda a=address: maildir_messages(home, a), timeout=30, message=address)
        assert b"Subject: nightly report\r\n" in copy and copy.endswith(b"\r\n\r\nall good\r\n")
        assert b"Bcc:" not in copy and b"\r\nDate: " in copy and b"\r\nMessage-ID: <" in copy
        assert b"\r\nReceived: by ex01.domain.com with Pickup; " in copy
    wait_for(lambda: (pickup / "junk.bad").exists() and (pickup / "huge.bad").exists(), timeout=30,
             message="the bad files kept as .bad")
    assert sorted(p.name for p in pickup.iterdir()) == ["huge.bad", "junk.bad"]
    assert tracking_events(home, "-EventId BADMAIL", until=["BADMAIL", "BADMAIL"]) == ["BADMAIL", "BADMAIL"]
    received = shell(home, "Get-MessageTrackingLog -EventId RECEIVE -MessageSubject 'nightly report' | "
                           "ForEach-Object { $_.ConnectorId }")
    assert received.out.split() == ["EX01\\Pickup"], received.err


def test_an_exported_message_replays_to_its_recipients_and_a_directory_set_to_null_is_not_read(home, server,
                                                                                              tmp_path):
    _mailboxes(home)
    with smtplib.SMTP("127.0.0.1", server.ports["frontend"], timeout=30) as client:
        # The first message makes the mailbox delivery queue (queues are made on demand), then it is held.
        assert client.sendmail("someone@example.org", ["keeper@domain.com"], b"Subject: first\r\n\r\nx\r\n") == {}
        wait_for(lambda: maildir_messages(home, "keeper@domain.com"), timeout=30, message="the first message")
        assert shell(home, 'Suspend-Queue "EX01\\Mailbox Database EX01"').ok
        assert client.sendmail("someone@example.org", ["keeper@domain.com", "other@domain.com"],
                               b"Subject: held for export\r\n\r\nthe body\r\n") == {}
    listed = wait_for(lambda: shell(home, 'Get-Message -Queue "EX01\\Mailbox Database EX01" | '
                                          'ForEach-Object { $_.Identity }').out.strip().splitlines(), timeout=30)
    (identity,) = listed
    # A Pickup file's message waiting in a queue names its source as Exchange's Get-Message does.
    (home.path / "Pickup" / "note.eml").write_bytes(b"From: other@domain.com\r\nTo: keeper@domain.com\r\n"
                                                    b"Subject: dropped\r\n\r\nx\r\n")
    sources = wait_for(lambda: shell(home, 'Get-Message -Queue "EX01\\Mailbox Database EX01" | Where-Object { '
                                           '$_.Subject -eq "dropped" } | ForEach-Object { $_.MessageSourceName }'
                                     ).out.split(), timeout=30, message="the Pickup file's message in the queue")
    assert sources == ["Pickup"]
    replay = home.path / "Replay"
    exported = shell(home, f'Suspend-Message "{identity}"\nExport-Message "{identity}" -Path "{tmp_path / "m.eml"}"\n'
                           f'Remove-Message "{identity}" -WithNDR $false')
    assert exported.ok, exported.err
    data = (tmp_path / "m.eml").read_bytes()
    assert data.startswith(b"X-Sender: <someone@example.org>\r\nX-Receiver: <keeper@domain.com>\r\n"
                           b"X-Receiver: <other@domain.com>\r\n")
    (replay / "m.eml").write_bytes(data)
    assert shell(home, 'Resume-Queue "EX01\\Mailbox Database EX01"').ok
    for address in ("keeper@domain.com", "other@domain.com"):
        (copy,) = wait_for(lambda a=address: [m for m in maildir_messages(home, a) if b"held for export" in m],
                           timeout=30, message=address)
        assert copy.startswith(b"Return-Path: <someone@example.org>\r\n") and b"X-Sender" not in copy
        assert b"Subject: held for export\r\n" in copy and copy.endswith(b"\r\n\r\nthe body\r\n")
    assert not list(replay.iterdir())

    assert shell(home, "Set-TransportService -PickupDirectoryPath $null").ok
    synced(home)
    assert "PickupDirectoryPath :" in shell(home, "Get-TransportService | fl PickupDirectoryPath").out
    (home.path / "Pickup" / "later.eml").write_bytes(b"From: keeper@domain.com\r\nTo: other@domain.com\r\n\r\nx\r\n")
    time.sleep(POLL_SECONDS + 2)   # more than one polling interval
    assert (home.path / "Pickup" / "later.eml").exists()
