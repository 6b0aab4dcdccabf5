"""Reading Pickup and Replay files: the envelope each gives, and the files that are refused."""

from __future__ import annotations

import pytest

from mailgate.receive.pickup import BadMessage, pickup_envelope, replay_envelope


def pickup(data: bytes, **limits):
    return pickup_envelope(data, **{"max_header_size": 65536, "max_recipients": 100, **limits})


def test_pickup_takes_sender_before_from_and_every_to_cc_bcc_once():
    env = pickup(b"From: a@x.example\r\nSender: Robot <robot@x.example>\r\nTo: b@y.example, C <c@y.example>\r\n"
                 b"Cc: b@y.example\r\nBcc: secret@z.example\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n")
    assert env.sender == "robot@x.example"
    assert env.recipients == ["b@y.example", "c@y.example", "secret@z.example"]
    assert b"Bcc" not in env.body and env.body.endswith(b"Message-ID: <1@x>\r\n\r\nbody\r\n")


@pytest.mark.parametrize("data, limits, reason", [
    (b"To: b@y.example\r\n\r\nx", {}, "no From: or Sender:"),
    (b"From: a@x.example\r\n\r\nx", {}, "no recipient"),
    (b"From: not an address\r\nTo: b@y.example\r\n\r\nx", {}, "isn't an address"),
    (b"From: a@x.example\r\nTo: " + b", ".join(b"r%d@y.example" % i for i in range(5)) + b"\r\n\r\nx",
     {"max_recipients": 4}, "more than PickupDirectoryMaxRecipientsPerMessage (4)"),
    (b"From: a@x.example\r\nTo: b@y.example\r\nX-Big: " + b"y" * 40000 + b"\r\n\r\nx", {"max_header_size": 32768},
     "larger than PickupDirectoryMaxHeaderSize"),
    (b"From: a@x.example\r\nnot a header line\r\nTo: b@y.example\r\n\r\nx", {}, "isn't a header block"),
])
def test_pickup_files_that_are_refused(data, limits, reason):
    with pytest.raises(BadMessage, match=reason.replace("(", r"\(").replace(")", r"\)")):
        pickup(data, **limits)


def test_replay_reads_the_envelope_lines_and_exchanges_injected_block():
    env = replay_envelope(b"X-Sender: <>\nX-Receiver: <a@x.example> NOTIFY=NEVER\nX-Receiver: b@x.example\n"
                          b"X-Mailer: kept\nSubject: s\n\nbody\n")
    assert (env.sender, env.recipients) == ("", ["a@x.example", "b@x.example"])
    assert env.body == b"X-Mailer: kept\r\nSubject: s\r\n\r\nbody\r\n"
    exported = replay_envelope(b"X-CreatedBy: MSExchange15\r\nX-Sender: s@x.example BODY=7BIT\r\n"
                               b"X-Receiver: r@y.example SMTP:r@y.example ORcpt=rfc822;r@y.example\r\n"
                               b"X-EndOfInjectedXHeaders: 42\r\nReceived: from a\r\nSubject: t\r\n\r\nb\r\n")
    assert (exported.sender, exported.recipients) == ("s@x.example", ["r@y.example"])
    assert exported.body.startswith(b"Received: from a\r\n")
    with pytest.raises(BadMessage, match="starts with X-Sender"):
        replay_envelope(b"Subject: no envelope\r\nX-Sender: a@x.example\r\nX-Receiver: b@x.example\r\n\r\nx")


def test_files_claimed_before_a_crash_are_read_again_and_the_per_minute_limit_holds(tmp_path):
    import asyncio
    import os

    from mailgate.receive.pickup import DirectorySettings, PickupReader

    pickup = tmp_path / "Pickup"
    pickup.mkdir()
    message = b"From: a@x.example\r\nTo: b@y.example\r\n\r\nx\r\n"
    (pickup / "crashed.tmp").write_bytes(message)   # claimed when the server was killed
    for i in range(3):
        (pickup / f"m{i}.eml").write_bytes(message)
    (pickup / "fresh.eml").write_bytes(message)
    for path in pickup.iterdir():
        if path.name != "fresh.eml":   # just written: may still be being written, so it waits
            os.utime(path, (1, 1))
    submitted: list[str] = []

    async def submit(sender, recipients, body, directory):
        submitted.append(sender)

    settings = DirectorySettings(pickup=pickup, replay=None, per_minute=3, max_header_size=65536, max_recipients=10)
    reader = PickupReader(lambda: settings, submit, lambda reason, path: None)
    assert asyncio.run(reader.scan()) == 3   # the per-minute limit
    assert len(submitted) == 3
    left = sorted(p.name for p in pickup.iterdir())
    assert len(left) == 2 and "fresh.eml" in left and not any(name.endswith(".tmp") for name in left)


def test_a_queue_that_cant_take_mail_leaves_the_files_and_no_name_is_ever_overwritten(tmp_path):
    import asyncio
    import os

    from mailgate.errors import UserError
    from mailgate.receive.pickup import DirectorySettings, PickupReader

    pickup = tmp_path / "Pickup"
    pickup.mkdir()
    message = b"From: a@x.example\r\nTo: b@y.example\r\n\r\nx\r\n"
    for name in ("a.eml", "a.tmp", "b.eml"):   # a.tmp: claimed before a crash, and a.eml came after it
        (pickup / name).write_bytes(message + name.encode())
    for path in pickup.iterdir():
        os.utime(path, (1, 1))
    calls: list[bytes] = []

    async def full(sender, recipients, body, directory):
        calls.append(body)
        raise UserError("the queue's disk is nearly full (back pressure High)")

    settings = DirectorySettings(pickup=pickup, replay=None, per_minute=100, max_header_size=65536, max_recipients=10)
    reader = PickupReader(lambda: settings, full, lambda reason, path: None)
    asyncio.run(reader.scan())
    assert len(calls) == 1   # the first refusal ends the scan: the others wait without a try each
    contents = sorted(p.read_bytes()[-5:] for p in pickup.iterdir())
    assert len(contents) == 3 and all(p.suffix == ".eml" for p in pickup.iterdir())
    assert contents == sorted([b"a.eml", b"a.tmp", b"b.eml"])
