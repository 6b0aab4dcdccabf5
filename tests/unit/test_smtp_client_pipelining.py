"""The outbound client against a peer that pipelines but has no CHUNKING (older Postfix, sendmail, smtp-sink):
a message's body and dot share a write with the next message's MAIL, RCPT and DATA (RFC 2920), and every
message still gets its own outcome — also when the peer refuses part of a transaction or hangs up mid-batch."""

from __future__ import annotations

import asyncio

import pytest
from peers import PipeliningPeer

from mailgate.routing.dns import Host
from mailgate.send.smtp import ConnectionLost, OutboundMessage, Outcome, OutRecipient, SessionSettings, SmtpConnection


def message(n: int, *recipients: str) -> OutboundMessage:
    body = f"Subject: message {n}\r\n\r\nbody of message {n}\r\n.leading dot\r\n".encode()
    return OutboundMessage(id=n, sender=f"s{n}@sender.test", size=len(body), body=body, lines_normalised=True,
                           recipients=[OutRecipient(i, a) for i, a in enumerate(recipients or (f"r{n}@peer.test",))])


async def send_all(peer: PipeliningPeer, msgs: list[OutboundMessage]) -> tuple[SmtpConnection, dict[int, list[Outcome]], Exception | None]:
    port = await peer.start()
    conn = await SmtpConnection.open([Host("peer.test", ("127.0.0.1",), port)], SessionSettings(helo_name="mg.test"))
    results: dict[int, list[Outcome]] = {}
    error: Exception | None = None
    try:
        await conn.send_many(msgs, results.__setitem__)
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        error = exc
    await conn.close(quit=error is None)
    await peer.stop()
    return conn, results, error


def test_each_body_shares_a_write_with_the_next_envelope():
    peer = PipeliningPeer()
    conn, results, error = asyncio.run(send_all(peer, [message(1), message(2), message(3)]))
    assert error is None
    assert [o.kind for i in range(3) for o in results[i]] == ["delivered"] * 3
    assert [m[0] for m in peer.messages] == ["s1@sender.test", "s2@sender.test", "s3@sender.test"]
    assert peer.messages[0][2].endswith(b"body of message 1\r\n..leading dot\r\n")   # dot-stuffed on the wire
    # The end of message 1 and the start of message 2 came in one read: body, dot, MAIL, RCPT, DATA.
    joined = [r for r in peer.reads if b"body of message 1" in r]
    assert len(joined) == 1 and joined[0].endswith(
        b"..leading dot\r\n.\r\nMAIL FROM:<s2@sender.test>\r\nRCPT TO:<r2@peer.test>\r\nDATA\r\n")
    # Three messages in four writes (six without the chaining): the first envelope, then each body with
    # the envelope after it.
    transactions = [r for r in peer.reads if r.startswith((b"MAIL", b"Subject"))]
    assert [r.startswith(b"MAIL") for r in transactions] == [True, False, False, False]
    assert [r.endswith(b"DATA\r\n") for r in transactions] == [True, True, True, False]
    assert conn.messages_sent == 3


def test_a_refused_transaction_in_the_chain_leaves_the_others_alone():
    peer = PipeliningPeer(rcpt_reply=lambda a: "550 5.1.1 <%s>: unknown" % a if a.startswith("nobody") else "250 Ok")
    msgs = [message(1), message(2, "nobody@peer.test"), message(3, "nobody@peer.test", "r3@peer.test"), message(4)]
    conn, results, error = asyncio.run(send_all(peer, msgs))
    assert error is None
    assert [o.kind for o in results[0]] == ["delivered"]
    assert [(o.kind, o.reply[:3]) for o in results[1]] == [("permanent", "550")]
    assert sorted((o.idx, o.kind) for o in results[2]) == [(0, "permanent"), (1, "delivered")]
    assert [o.kind for o in results[3]] == ["delivered"]
    assert [m[1] for m in peer.messages] == [["r1@peer.test"], ["r3@peer.test"], ["r4@peer.test"]]
    assert all(b"message 2" not in m[2] for m in peer.messages)


def test_a_peer_that_hangs_up_mid_chain_leaves_the_unanswered_messages_unreported():
    peer = PipeliningPeer(hang_up_after_dots=2)   # takes message 1, drops the line when message 2 ends
    conn, results, error = asyncio.run(send_all(peer, [message(1), message(2), message(3)]))
    assert isinstance(error, ConnectionLost)
    assert list(results) == [0] and results[0][0].kind == "delivered"
    # Message 3's envelope went out with message 2's dot: both are the ones whose outcome is unknown.
    assert conn.current == 2
    assert [m[0] for m in peer.messages] == ["s1@sender.test"]


@pytest.mark.parametrize("hang_up", [1, 3])
def test_a_hang_up_at_the_first_or_last_dot(hang_up):
    peer = PipeliningPeer(hang_up_after_dots=hang_up)
    conn, results, error = asyncio.run(send_all(peer, [message(1), message(2), message(3)]))
    assert isinstance(error, ConnectionLost)
    assert sorted(results) == list(range(hang_up - 1))
    assert len(peer.messages) == hang_up - 1


@pytest.mark.parametrize("limit_reply", ["452 4.5.3 Error: too many recipients", "552 Too many recipients"])
def test_recipients_a_full_peer_refused_go_at_once_in_a_further_transaction(limit_reply):
    """RFC 5321 4.5.3.1.10: a peer out of room for recipients answers 452 to the rest (or 552, as RFC 821 had
    it); the client sends them in further transactions on the same connection (not after
    MessageRetryInterval), and reports the message once."""
    peer = PipeliningPeer(max_recipients=2, limit_reply=limit_reply)
    five = message(1, *(f"r{n}@peer.test" for n in range(5)))
    reports: list[int] = []
    results: dict[int, list[Outcome]] = {}

    def on_result(i: int, outcomes: list[Outcome]) -> None:
        reports.append(i)
        results[i] = outcomes

    async def run() -> None:
        port = await peer.start()
        conn = await SmtpConnection.open([Host("peer.test", ("127.0.0.1",), port)], SessionSettings(helo_name="mg.test"))
        await conn.send_many([five, message(2)], on_result)
        await conn.close()
        await peer.stop()

    asyncio.run(run())
    assert sorted(reports) == [0, 1]   # each message reported once
    assert sorted((o.idx, o.kind) for o in results[0]) == [(n, "delivered") for n in range(5)]
    assert all(o.reply.startswith("250") for o in results[0])
    got = sorted((m[0], tuple(m[1])) for m in peer.messages)
    assert got == [("s1@sender.test", ("r0@peer.test", "r1@peer.test")), ("s1@sender.test", ("r2@peer.test", "r3@peer.test")),
                   ("s1@sender.test", ("r4@peer.test",)), ("s2@sender.test", ("r2@peer.test",))]
    assert len(peer.connections) == 1


def test_a_452_to_every_recipient_is_reported_for_the_retry_without_another_transaction():
    peer = PipeliningPeer(max_recipients=0)
    conn, results, error = asyncio.run(send_all(peer, [message(1, "a@peer.test", "b@peer.test")]))
    assert error is None
    assert [(o.kind, o.reply[:9]) for o in results[0]] == [("transient", "452 4.5.3")] * 2
    assert sum(r.count(b"MAIL FROM") for r in peer.reads) == 1 and not peer.messages


def test_a_hang_up_during_the_further_transaction_reports_what_was_delivered():
    """The first two recipients were delivered: they must not be sent again after the retry, so the message is
    reported with them delivered and the other two waiting (452), though the connection failed."""
    peer = PipeliningPeer(max_recipients=2, hang_up_after_dots=2)
    conn, results, error = asyncio.run(send_all(peer, [message(1, *(f"r{n}@peer.test" for n in range(4)))]))
    assert isinstance(error, ConnectionLost)
    assert sorted((o.idx, o.kind, o.reply[:3]) for o in results[0]) == [
        (0, "delivered", "250"), (1, "delivered", "250"), (2, "transient", "452"), (3, "transient", "452")]
    assert [m[1] for m in peer.messages] == [["r0@peer.test", "r1@peer.test"]]


def test_a_552_for_a_full_mailbox_is_final_and_gets_no_further_transaction():
    peer = PipeliningPeer(rcpt_reply=lambda a: "552 5.2.2 Mailbox full" if a.startswith("full") else "250 Ok")
    conn, results, error = asyncio.run(send_all(peer, [message(1, "a@peer.test", "full@peer.test")]))
    assert error is None
    assert sorted((o.idx, o.kind) for o in results[0]) == [(0, "delivered"), (1, "permanent")]
    assert [m[1] for m in peer.messages] == [["a@peer.test"]]


def test_a_unicode_domain_goes_in_a_labels_to_a_peer_without_smtputf8():
    """The peer doesn't offer SMTPUTF8: an address whose only non-ASCII part is its domain is written with the
    domain in A-labels (as Postfix does, and as DNS routing looked it up); one with a non-ASCII local part
    can't be written at all and fails, 553 5.6.7, without a transaction."""
    peer = PipeliningPeer()
    idn = message(1, "kate@bücher.example", "lee@straße.example")
    utf8_local = message(2, "jörg@bücher.example")
    conn, results, error = asyncio.run(send_all(peer, [idn, utf8_local]))
    assert error is None
    assert [o.kind for o in results[0]] == ["delivered", "delivered"]
    assert [m[1] for m in peer.messages] == [["kate@xn--bcher-kva.example", "lee@xn--strae-oqa.example"]]
    assert [(o.kind, o.reply[:9]) for o in results[1]] == [("permanent", "553 5.6.7")]
    assert sum(r.count(b"MAIL FROM") for r in peer.reads) == 1
