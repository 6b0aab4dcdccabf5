"""The server state machine without sockets: sequencing, parsing, DATA framing,
SMTP smuggling, STARTTLS injection, BDAT, and random input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.smtp import replies as R
from mailgate.smtp import server as S


def drive(machine: S.ServerProtocol, data: bytes) -> tuple[list, bytes, bytes]:
    """Feed bytes and answer every event the way a permissive server would; returns events, replies, body."""
    machine.feed(data)
    events, out, body = [], b"", b""
    while True:
        ev = machine.next_event()
        if ev is S.NEED_DATA:
            return events, out, body
        events.append(ev)
        if isinstance(ev, S.Hello):
            out += machine.reply(R.Reply(250, None, ("test", "PIPELINING", "CHUNKING")))
        elif isinstance(ev, S.MailFrom):
            out += machine.reply(R.SENDER_OK)
        elif isinstance(ev, S.RcptTo):
            out += machine.reply(R.RECIPIENT_OK)
        elif isinstance(ev, S.Data):
            out += machine.reply(R.START_MAIL_INPUT)
        elif isinstance(ev, S.BodyChunk):
            body += ev.data
        elif isinstance(ev, S.BodyEnd):
            out += machine.reply(R.Reply(250, "2.6.0", "queued"))
        elif isinstance(ev, S.Simple):
            out += machine.reply({"QUIT": R.CLOSING, "STARTTLS": R.TLS_READY}.get(ev.verb, R.OK))
        elif isinstance(ev, S.BadCommand):
            out += machine.reply(ev.reply)
        elif isinstance(ev, (S.Auth, S.AuthResponse)):
            out += machine.reply(R.AUTH_FAILED)


def in_data() -> S.ServerProtocol:
    m = S.ServerProtocol(S.Extensions(starttls=True))
    drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
    assert m.state is S.State.DATA
    return m


def test_whole_envelope_pipelined_in_one_packet():
    m = S.ServerProtocol()
    events, out, body = drive(m, b"EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=20\r\nRCPT TO:<x@y.example>\r\n"
                                 b"RCPT TO:<z@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;z+40y.example\r\n"
                                 b"DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Hello", "MailFrom", "RcptTo", "RcptTo", "Data", "BodyChunk", "BodyEnd", "Simple"]
    assert events[1].params.size == 20
    assert events[3].params.notify == ("SUCCESS", "FAILURE") and events[3].params.orcpt == "rfc822;z@y.example"
    assert body == b"Subject: t\r\n\r\nhi\r\n"
    assert out.count(b"\r\n") == 9 and out.endswith(b"221 2.0.0 Service closing transmission channel\r\n")
    assert m.state is S.State.CLOSED


@pytest.mark.parametrize("payload", [
    b"line\n.\nMAIL FROM:<evil@x>\r\n",          # bare LF dot bare LF
    b"line\n.\r\nMAIL FROM:<evil@x>\r\n",        # LF . CRLF
    b"line\r\n.\nMAIL FROM:<evil@x>\r\n",        # CRLF . LF
    b"line\r.\rMAIL FROM:<evil@x>\r\n",          # CR . CR
    b"line\r.\r\nMAIL FROM:<evil@x>\r\n",        # CR . CRLF
    b"line\r\n\x00.\r\nMAIL FROM:<evil@x>\r\n",  # NUL before the dot
    b"line\r\n.\x00\r\nMAIL FROM:<evil@x>\r\n",  # NUL after the dot
    b"line\r\n .\r\nMAIL FROM:<evil@x>\r\n",     # space before the dot
])
def test_smuggling_variants_never_end_data(payload):
    m = in_data()
    events, _, body = drive(m, payload)
    assert not any(isinstance(e, (S.BodyEnd, S.MailFrom)) for e in events)
    assert m.state is S.State.DATA
    assert b"MAIL FROM:<evil@x>" in body
    # The message only ends at <CRLF>.<CRLF>, and what was smuggled stays message content.
    events, _, _ = drive(m, b"\r\n.\r\n")
    assert any(isinstance(e, S.BodyEnd) for e in events)


def test_bare_line_endings_are_normalised_so_a_relay_cannot_be_smuggled_through():
    m = in_data()
    _, _, body = drive(m, b"a\nb\rc\r\n.\r\n")
    assert body == b"a\r\nb\r\nc\r\n"


def test_bare_linefeeds_reported_when_the_connector_rejects_them():
    m = S.ServerProtocol(S.Extensions(reject_bare_linefeeds=True))
    drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
    events, _, _ = drive(m, b"a\nb\r\n.\r\n")
    assert [e for e in events if isinstance(e, S.BodyEnd)][0].bare_linefeeds


def test_terminator_split_across_reads_and_dot_unstuffing():
    m = in_data()
    pieces = [b"..lead\r\n", b"x\r", b"\n.", b".dots\r\n", b"end\r\n.", b"\r", b"\n"]
    body, ended = b"", False
    for p in pieces:
        events, _, chunk = drive(m, p)
        body += chunk
        ended = ended or any(isinstance(e, S.BodyEnd) for e in events)
    assert ended
    assert body == b".lead\r\nx\r\n.dots\r\nend\r\n"


def test_empty_message():
    m = in_data()
    events, _, body = drive(m, b".\r\n")
    assert body == b"" and any(isinstance(e, S.BodyEnd) for e in events)


def test_starttls_discards_pipelined_plaintext():
    m = S.ServerProtocol(S.Extensions(starttls=True))
    drive(m, b"EHLO c\r\n")
    events, out, _ = drive(m, b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\nRCPT TO:<v@y.example>\r\n")
    assert [type(e).__name__ for e in events] == ["Simple"]
    assert out.startswith(b"220")
    assert m.state is S.State.TLS_PENDING and m.buffered == 0
    m.feed(b"more plaintext\r\n")
    assert m.next_event() is S.NEED_DATA
    m.tls_started()
    events, out, _ = drive(m, b"MAIL FROM:<a@b.example>\r\n")
    assert out.startswith(b"503 5.5.2 Send hello first")  # EHLO again after TLS (RFC 3207)
    events, out, _ = drive(m, b"EHLO c\r\nSTARTTLS\r\n")
    assert b"503 5.5.2 Only one STARTTLS" in out


def test_sequence_errors():
    m = S.ServerProtocol()
    _, out, _ = drive(m, b"MAIL FROM:<a@b.example>\r\n")
    assert out.startswith(b"503 5.5.2 Send hello first")
    _, out, _ = drive(m, b"EHLO c\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
    assert b"503 5.5.2 Need mail command" in out
    _, out, _ = drive(m, b"MAIL FROM:<a@b.example>\r\nDATA\r\n")
    assert b"503 5.5.2 Need rcpt command" in out
    _, out, _ = drive(m, b"MAIL FROM:<c@d.example>\r\n")
    assert b"503 5.5.2 Sender already specified" in out


@pytest.mark.parametrize("line,code", [
    (b"MAIL FROM:<bad address@x.example>", b"501 5.1.7"),
    (b"MAIL FROM:<a@b..example>", b"501 5.1.7"),
    (b"MAIL FROM:a@b.example <junk", b"501"),
    (b"MAIL FROM:<a@b.example> FOO=bar", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> SIZE=abc", b"501 5.5.4"),
    (b"MAIL TO:<a@b.example>", b"501 5.5.4 Invalid arguments"),
    (b"FROB", b"500 5.3.3 Unrecognized command"),
    (b"EHLO", b"501 5.0.0 EHLO requires domain address"),
    (b"MAIL FROM:<\xc3\xa9@b.example>", b"553 5.6.7"),
    (b"MAIL FROM:<a@b.example> ENVID=a+ZZb", b"501 5.5.4 Unrecognized parameter"),    # "+" is only "+HH"
    (b"MAIL FROM:<a@b.example> ENVID=a+2b", b"501 5.5.4 Unrecognized parameter"),     # upper-case hex only
    (b"MAIL FROM:<a@b.example> ENVID=a=b", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> ENVID=a+2Bb", b"250 2.1.0"),
    # Decoded xtext goes into DSNs and logs: a line break, a control or a non-ASCII byte in it is refused.
    (b"MAIL FROM:<a@b.example> ENVID=a+0D+0AX-Injected:+20yes", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> ENVID=a+00b", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> ENVID=a+E9b", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> AUTH=a+0A@b.example", b"501 5.5.4 Unrecognized parameter"),
    (b"MAIL FROM:<a@b.example> ENVID=a+20b", b"250 2.1.0"),
    # Bytes that aren't UTF-8: the command's own reply for a bad argument, else "unrecognized".
    (b"EHLO \xff\xfe", b"501 5.5.4 Invalid domain name"),
    (b"MAIL FROM:<\xff@b.example>", b"501 5.1.7 Invalid address"),
    (b"RCPT TO:<a\xe9@b.example>", b"501 5.1.3 Invalid address"),
    (b"FROB \xff", b"500 5.3.3 Unrecognized command"),
])
def test_malformed_commands(line, code):
    m = S.ServerProtocol()
    if not line.startswith(b"EHLO"):
        drive(m, b"EHLO c\r\n")
    _, out, _ = drive(m, line + b"\r\n")
    assert out.startswith(code), out


def test_xtext_parameters_are_decoded():
    m = S.ServerProtocol()
    events, out, _ = drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example> ENVID=Q+2B1+3D2\r\n"
                              b"RCPT TO:<x@y.example> ORCPT=rfc822;x+2Bt@y.example\r\n"
                              b"RCPT TO:<z@y.example> ORCPT=rfc822;z+@y.example\r\n"
                              b"RCPT TO:<z@y.example> ORCPT=rfc822;z+0D+0AAction:+20delivered@y.example\r\n"
                              b"RCPT TO:<z@y.example> ORCPT=rfc\xc3\xa9;z@y.example\r\n")
    assert events[1].params.envid == "Q+1=2" and events[2].params.orcpt == "rfc822;x+t@y.example"
    assert out.endswith(b"501 5.5.4 Unrecognized parameter\r\n" * 3), out


def test_smtputf8_addresses():
    m = S.ServerProtocol()
    events, out, _ = drive(m, "EHLO c\r\nMAIL FROM:<jösé@exämple.test> SMTPUTF8\r\nRCPT TO:<用户@例子.test>\r\n".encode())
    mail, rcpt = events[1], events[2]
    assert mail.params.smtputf8 and mail.address.local == "jösé" and rcpt.address.domain == "例子.test"
    assert b"250 2.1.5" in out


def test_line_too_long_is_refused_and_the_session_recovers():
    m = S.ServerProtocol(max_line=512)
    _, out, _ = drive(m, b"EHLO c\r\nNOOP " + b"x" * 5000)
    assert b"500 5.5.2 Command too long" in out
    _, out, _ = drive(m, b"y" * 100 + b"\r\nNOOP\r\n")
    assert out == b"250 2.0.0 OK\r\n"


def test_bdat_chunks_and_last():
    m = S.ServerProtocol()
    drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<x@y.example>\r\n")
    events, out, body = drive(m, b"BDAT 5\r\nhel\x00oBDAT 3 LAST\r\n\r\n.")
    assert body == b"hel\x00o\r\n."
    assert [type(e).__name__ for e in events] == ["Bdat", "BodyChunk", "BodyEnd", "Bdat", "BodyChunk", "BodyEnd"]
    assert m.state is S.State.READY


def test_bdat_out_of_sequence_is_consumed_and_refused():
    m = S.ServerProtocol()
    drive(m, b"EHLO c\r\n")
    _, out, body = drive(m, b"BDAT 4\r\nNOOPNOOP\r\n")
    assert out.startswith(b"503 5.5.2 Need mail command") and out.endswith(b"250 2.0.0 OK\r\n")
    assert body == b"NOOP"


def test_data_rejected_for_binarymime():
    m = S.ServerProtocol()
    _, out, _ = drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<x@y.example>\r\nDATA\r\n")
    assert b"503 5.5.1 BODY=BINARYMIME requires BDAT" in out


def test_disabled_extensions_refuse_their_parameters():
    m = S.ServerProtocol(S.Extensions(dsn=False, smtputf8=False, chunking=False))
    _, out, _ = drive(m, b"EHLO c\r\nMAIL FROM:<a@b.example> RET=FULL\r\nMAIL FROM:<a@b.example> SMTPUTF8\r\nBDAT 1\r\n")
    assert out.count(b"501 5.5.4 Unrecognized parameter") == 2 and b"500 5.3.3" in out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_random_bytes_never_raise(chunks):
    m = S.ServerProtocol(S.Extensions(starttls=True, auth=("LOGIN", "PLAIN")))
    for chunk in chunks:
        drive(m, chunk)
        if m.state is S.State.TLS_PENDING:
            m.tls_started()
    assert m.buffered <= 4096 + 300 * 12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"EHLO x\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n",
                                 b"RSET\r\n", b".\r\n", b"BDAT 3\r\n", b"abc", b"\r\n", b"\n.\n", b"AUTH LOGIN\r\n",
                                 b"STARTTLS\r\n", b"QUIT\r\n", b"NOOP\r\n"]), max_size=30))
def test_random_command_sequences_keep_one_reply_per_command(pieces):
    m = S.ServerProtocol(S.Extensions(starttls=True))
    for p in pieces:
        drive(m, p)
        if m.state is S.State.TLS_PENDING:
            m.tls_started()
        assert not m.awaiting_reply


def _received_body(chunks: list[bytes]) -> bytes:
    """What the server stores for a DATA body sent in ``chunks`` (the terminator included in them)."""
    m = S.ServerProtocol()
    m.feed(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    for _ in range(4):
        m.reply(R.OK if not isinstance(m.next_event(), S.Data) else R.START_MAIL_INPUT)
    body = b""
    for chunk in chunks:
        m.feed(chunk)
        while True:
            ev = m.next_event()
            if ev is S.NEED_DATA or isinstance(ev, S.BodyEnd):
                break
            body += ev.data
    return body


@given(st.lists(st.sampled_from([b"text", b".", b"..", b"\r\n", b"\n", b"\r", b" "]), max_size=40),
       st.integers(min_value=1, max_value=17))
def test_content_received_with_data_is_sent_on_unchanged_by_the_short_path(pieces, cut):
    """Bodies received with DATA end every line in CRLF, so delivery dot-stuffs them without looking for bare
    CR and LF (``DotStuffer(normalised=True)``); on such content both paths give the same bytes."""
    from mailgate.smtp.client import DotStuffer

    stuffed = DotStuffer()
    wire = b"".join(stuffed.feed(p) for p in pieces) + stuffed.finish()
    stored = _received_body([wire[i:i + cut] for i in range(0, len(wire), cut)])
    assert b"\n" not in stored.replace(b"\r\n", b"") and b"\r" not in stored.replace(b"\r\n", b"")
    chunks = [stored[i:i + cut] for i in range(0, len(stored), cut)]
    outputs = []
    for normalised in (False, True):
        s = DotStuffer(normalised=normalised)
        outputs.append(b"".join(s.feed(c) for c in chunks) + s.finish())
    assert outputs[0] == outputs[1]
    assert _received_body([outputs[1]]) == stored    # and the next hop stores what we stored


def test_organisation_headers_are_removed_with_their_folded_lines_and_nothing_else():
    from mailgate.receive.headers import without_organisation_headers
    head = (b"Received: from a\r\n\tby b; Sat, 5 Dec 2026\r\n"
            b"X-MS-Exchange-Organization-AuthAs: Anonymous\r\n"
            b"x-ms-exchange-organization-network-message-id:\r\n\tabc\r\n"
            b"X-MS-Exchange-Forest-RulesExecuted: r1\r\n"
            b"X-MS-Exchange-Organizational: not an organisation header\r\n"
            b"Subject: X-MS-Exchange-Organization-AuthAs: in a value\r\n\r\n")
    assert without_organisation_headers(head) == (
        b"Received: from a\r\n\tby b; Sat, 5 Dec 2026\r\n"
        b"X-MS-Exchange-Organizational: not an organisation header\r\n"
        b"Subject: X-MS-Exchange-Organization-AuthAs: in a value\r\n\r\n")


@given(st.integers(200, 599), st.sampled_from([None, "2.0.0", "5.7.1"]), st.text(max_size=40), st.booleans())
def test_a_one_line_reply_encodes_as_the_general_form_does(code, enhanced, text, use_enhanced):
    """Replies of one line take a shorter way to bytes (one per command); it must give the bytes the general form
    gives for the same line."""
    one = R.Reply(code, enhanced, text).encode(use_enhanced)
    assert one == R.Reply(code, enhanced, (text,)).encode(use_enhanced)
    assert one.endswith(b"\r\n") and one.startswith(f"{code} ".encode())


def closing_bracket_by_hand(text: str) -> int:
    """The ">" that closes a path, walking the characters: quoted strings (with backslash escapes) skipped."""
    in_quote, i = False, 1
    while i < len(text):
        if text[i] == "\\" and in_quote:
            i += 2
            continue
        if text[i] == '"':
            in_quote = not in_quote
        elif text[i] == ">" and not in_quote:
            return i
        i += 1
    return -1


@given(st.text(alphabet='<>"\\@a. \x01\x1f\x7f', max_size=30))
def test_paths_are_split_and_checked_as_character_by_character(text):
    """split_path finds the path's end with a search where nothing is quoted, and parse_path refuses control
    characters, and unquoted spaces and angle brackets, with searches: the same answers as a walk over the
    characters."""
    from mailgate.smtp.address import AddressError, _closing_bracket, parse_path

    path = "<" + text
    assert _closing_bracket(path) == closing_bracket_by_hand(path)
    try:
        parse_path(text, allow_null=True, allow_unqualified=True)
    except (AddressError, ValueError):
        return
    inner = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    inner = inner.split(":", 1)[1] if inner.startswith("@") else inner
    assert not any(ord(c) < 32 or ord(c) == 127 for c in inner)
    assert inner.startswith('"') or not any(c in " <>" for c in inner)
