"""Delivery status notifications (RFC 3464 multipart/report): NDRs for failed
recipients, delay notices, and success ("delivered"/"relayed") reports when
the sender asked for them with NOTIFY=SUCCESS."""

from __future__ import annotations

import email.utils
import uuid
from dataclasses import dataclass

from mailgate.receive.headers import HeaderBlock


@dataclass(slots=True)
class DsnRecipient:
    address: str
    orcpt: str | None
    status: str              # enhanced status code, e.g. "5.1.1"
    diagnostic: str | None   # the reply, e.g. "550 5.1.1 User unknown"
    remote_mta: str | None = None


_TEXT = {
    "failed": ("Undeliverable", "Delivery has failed to these recipients or groups:"),
    "delayed": ("Delivery delayed", "Delivery is delayed to these recipients or groups:"),
    "delivered": ("Delivered", "Your message has been delivered to the following recipients:"),
    "relayed": ("Relayed", "Delivery to these recipients or groups is complete, but no delivery notification was "
                           "sent by the destination server:"),
}


def status_of(reply: str, default: str) -> str:
    parts = reply.split()
    if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
        return parts[1]
    return default


def build(*, action: str, reporting_mta: str, postmaster: str, to: str, original_head: bytes, original: bytes | None,
          subject: str | None, recipients: list[DsnRecipient], arrival: float, envid: str | None) -> bytes:
    """The DSN message (headers and body, CRLF line endings). ``original`` (the whole message) is attached
    when given; otherwise only its headers are (RET=HDRS, or too large to return)."""
    boundary = f"mailgate-dsn-{uuid.uuid4().hex}"
    prefix, intro = _TEXT[action]
    head_end = original_head.find(b"\r\n\r\n")
    original_headers = original_head[: head_end + 2] if head_end >= 0 else original_head
    block = HeaderBlock.parse(original_headers)
    subj = subject if subject is not None else (block.get("Subject") or "")
    lines = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: <{to}>",
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Subject: {prefix}: {subj}",
        f"Message-ID: <{uuid.uuid4()}@{reporting_mta}>",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Auto-Submitted: auto-replied",
    ]
    if action == "failed":
        lines.append("X-MS-Exchange-Message-Is-Ndr:")
    original_id = block.get("Message-ID")
    if original_id:
        lines.append(f"In-Reply-To: {original_id}")
        lines.append(f"References: {original_id}")
    text = [intro, ""]
    for r in recipients:
        text.append(f"{r.address}")
    text += ["", "Diagnostic information for administrators:", "", f"Generating server: {reporting_mta}", ""]
    for r in recipients:
        text.append(r.address)
        if r.remote_mta:
            text.append(f"Remote Server at {r.remote_mta} returned '{r.diagnostic}'")
        elif r.diagnostic:
            text.append(f"{reporting_mta} returned '{r.diagnostic}'")
        text.append("")
    text += ["Original message headers:", "", original_headers.decode("utf-8", "replace").rstrip("\r\n")]
    status = [f"Reporting-MTA: dns;{reporting_mta}"]
    if envid:
        status.append(f"Original-Envelope-Id: {envid}")
    status.append(f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}")
    for r in recipients:
        status.append("")
        if r.orcpt:
            status.append(f"Original-Recipient: {r.orcpt}")
        status.append(f"Final-Recipient: rfc822;{r.address}")
        status.append(f"Action: {action}")
        status.append(f"Status: {r.status}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns;{r.remote_mta}")
        if r.diagnostic:
            status.append(f"Diagnostic-Code: smtp;{r.diagnostic}")
    parts = [
        "\r\n".join(lines), "", "This is a MIME-formatted delivery status notification.", "",
        f"--{boundary}", 'Content-Type: text/plain; charset="utf-8"', "Content-Transfer-Encoding: 8bit", "",
        "\r\n".join(text), "",
        f"--{boundary}", "Content-Type: message/delivery-status", "",
        "\r\n".join(status), "",
        f"--{boundary}",
    ]
    head = "\r\n".join(parts).encode("utf-8")
    if original is not None:
        body = b"Content-Type: message/rfc822\r\n\r\n" + original.rstrip(b"\r\n") + b"\r\n"
    else:
        body = b"Content-Type: text/rfc822-headers\r\n\r\n" + original_headers.rstrip(b"\r\n") + b"\r\n"
    return head + b"\r\n" + body + f"\r\n--{boundary}--\r\n".encode()


def wants(notify: str | None, event: str) -> bool:
    """Whether NOTIFY (None = not given) asks for a DSN on ``event`` (FAILURE, DELAY, SUCCESS)."""
    if notify is None:
        return event in ("FAILURE", "DELAY")
    items = notify.upper().split(",")
    return "NEVER" not in items and event in items
