"""Send-MailMessage: the SMTP client administrators use to try a connector from the shell ("does the new relay
connector take mail from here?"), with Windows PowerShell's parameters and .NET's SmtpClient behaviour: plain SMTP
unless -UseSsl (STARTTLS, the server's certificate verified), AUTH only with -Credential, and errors that quote
the server's reply. A shell utility: it runs on the administrator's machine and is not a REST endpoint.
"""

from __future__ import annotations

import email.utils
import mimetypes
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from mailgate.errors import InvalidValueError, UserError
from mailgate.manage.cmdlets import Param, cmdlet
from mailgate.manage.context import ManagementContext
from mailgate.manage.credentials import to_credential
from mailgate.manage.params import as_list, to_int, to_str, to_str_list
from mailgate.manage.psvalues import truthy
from mailgate.shell.evaluator import unwrap
from mailgate.shell.textfiles import ENCODINGS, to_file_encoding
from mailgate.smtp.address import AddressError, parse_mailbox

SMTP_TIMEOUT = 100   # seconds, .NET's SmtpClient.Timeout
# -DeliveryNotificationOption → the NOTIFY keyword of RFC 3461 (several join with commas).
_NOTIFY = {"none": "", "onsuccess": "SUCCESS", "onfailure": "FAILURE", "delay": "DELAY", "never": "NEVER"}
# -Priority → the headers .NET writes for it (none for Normal).
_PRIORITY = {"normal": {}, "high": {"X-Priority": "1", "Priority": "urgent", "Importance": "high"},
             "low": {"X-Priority": "5", "Priority": "non-urgent", "Importance": "low"}}


def _notify(value: Any) -> str:
    names = [part.strip() for v in as_list(value) for part in to_str(v).split(",")]
    unknown = [n for n in names if n.lower() not in _NOTIFY]
    if unknown:
        raise ValueError(f'Cannot convert value "{unknown[0]}" to type "System.Net.Mail.DeliveryNotificationOptions". '
                         f"Valid values: None, OnSuccess, OnFailure, Delay, Never")
    keywords = [_NOTIFY[n.lower()] for n in names if _NOTIFY[n.lower()]]
    if "NEVER" in keywords and len(keywords) > 1:
        raise ValueError("Never can't be combined with OnSuccess, OnFailure or Delay")
    return ",".join(keywords)


def _priority(value: Any) -> str:
    text = to_str(value).strip().lower()
    if text not in _PRIORITY:
        raise ValueError(f'Cannot convert value "{value}" to type "System.Net.Mail.MailPriority". Valid values: '
                         "Normal, Low, High")
    return text


def _server_reply(exc: smtplib.SMTPResponseException | tuple[int, bytes]) -> str:
    code, text = (exc.smtp_code, exc.smtp_error) if isinstance(exc, smtplib.SMTPResponseException) else exc
    message = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return f"{code} {message}".strip()


def _tls_context(ctx: ManagementContext) -> ssl.SSLContext:
    """The server's certificate is verified (system CAs, its name), unless the script did what Exchange
    administrators do for a self-signed certificate:
    ``[System.Net.ServicePointManager]::ServerCertificateValidationCallback = { $true }``."""
    context = ssl.create_default_context()
    callback = getattr(ctx.shell, "service_point", {}).get("servercertificatevalidationcallback")
    if callback is not None and truthy(unwrap(callback.invoke() if hasattr(callback, "invoke") else [callback])):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _breaks_a_line(text: str) -> bool:
    """CR, LF or NUL: in a header or a command it would end the line, or the string, early."""
    return "\r" in text or "\n" in text or "\x00" in text


def _addresses(text: str, parameter: str) -> list[str]:
    """What .NET's MailAddressCollection takes: "user@domain", "Display Name <user@domain>", or several of them
    separated by commas; nothing with CR, LF or NUL (a header or an SMTP command of its own). The addresses alone
    are returned, for the envelope."""
    parsed = email.utils.getaddresses([text])
    try:
        if _breaks_a_line(text) or not parsed or not all(address for _, address in parsed):
            raise AddressError("not an address")
        for _, address in parsed:
            parse_mailbox(address, utf8=not address.isascii())
    except ValueError:   # AddressError, or a domain parse_mailbox refused
        raise InvalidValueError(f'The specified string is not in the form required for an e-mail address: "{text}".',
                                parameter=parameter) from None
    return [address for _, address in parsed]


def _envelope(args: dict[str, Any]) -> tuple[str, list[str]]:
    """The envelope's sender and recipients. A parameter that would break a header or the SMTP dialogue is an error
    before anything is sent, as .NET refuses it when it builds the message."""
    senders = _addresses(args["From"], "From")
    if len(senders) != 1:
        raise InvalidValueError(f'The specified string is not in the form required for an e-mail address: '
                                f'"{args["From"]}".', parameter="From")
    recipients = [a for name in ("To", "Cc", "Bcc") for text in (args.get(name) or []) for a in _addresses(text, name)]
    for reply_to in args.get("ReplyTo") or []:
        _addresses(reply_to, "ReplyTo")
    if _breaks_a_line(args["Subject"]):
        raise InvalidValueError("The specified string is not in the form required for a subject: it holds a line "
                                "break.", parameter="Subject")
    for path in args.get("Attachments") or []:   # its name goes into a header
        if _breaks_a_line(path):
            raise InvalidValueError("Illegal characters in path: an attachment's name can't hold a line break or NUL.",
                                    parameter="Attachments")
    return senders[0], recipients


def _message(args: dict[str, Any], charset: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = args["From"]
    msg["To"] = ", ".join(args["To"])
    if args.get("Cc"):
        msg["Cc"] = ", ".join(args["Cc"])
    if args.get("ReplyTo"):
        msg["Reply-To"] = ", ".join(args["ReplyTo"])
    msg["Subject"] = args["Subject"]
    msg["Date"] = email.utils.formatdate(localtime=True)
    for name, value in _PRIORITY[args.get("Priority") or "normal"].items():
        msg[name] = value
    body = args.get("Body") or ""
    if charset == "us-ascii":   # -Encoding ASCII: what it can't hold becomes "?", as in .NET
        body = body.encode("ascii", errors="replace").decode("ascii")
    msg.set_content(body, subtype="html" if args.get("BodyAsHtml") else "plain", charset=charset)
    for path in args.get("Attachments") or []:
        data = Path(path).read_bytes()   # a missing file is reported before anything is sent
        kind, _ = mimetypes.guess_type(path)
        maintype, subtype = (kind or "application/octet-stream").split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=Path(path).name)
    return msg


@cmdlet("Send-MailMessage", [
    Param("To", position=0, mandatory=True, convert=to_str_list, type_name="String[]"),
    Param("Subject", position=1, mandatory=True, convert=to_str, aliases=("sub",)),
    Param("Body", position=2, convert=to_str),
    Param("SmtpServer", position=3, convert=to_str, aliases=("ComputerName",),
          help="The server to send through; $PSEmailServer when not given."),
    Param("From", mandatory=True, convert=to_str),
    Param("Cc", convert=to_str_list, type_name="String[]"), Param("Bcc", convert=to_str_list, type_name="String[]"),
    Param("ReplyTo", convert=to_str_list, type_name="String[]"),
    Param("Attachments", convert=to_str_list, type_name="String[]", aliases=("PsPath",)),
    Param("BodyAsHtml", switch=True, aliases=("BAH",)),
    Param("Encoding", convert=to_file_encoding, type_name="Encoding", aliases=("BE",)),
    Param("DeliveryNotificationOption", convert=_notify, type_name="DeliveryNotificationOptions", aliases=("DNO",)),
    Param("Priority", convert=_priority, type_name="MailPriority"),
    Param("Credential", convert=to_credential, type_name="PSCredential"),
    Param("UseSsl", switch=True, help="STARTTLS before anything else is sent; the certificate must verify."),
    Param("Port", convert=to_int, type_name="Int32", help="25 unless given."),
], synopsis="Send an email message through an SMTP server (try a receive connector).", builtin=True,
    examples=['Send-MailMessage -From printer@domain.com -To admin@domain.com -Subject "Relay test" '
              "-SmtpServer ex01.domain.com",
              'Send-MailMessage -From me@domain.com -To you@fabrikam.com -Subject Hi -SmtpServer ex01 -Port 587 '
              "-UseSsl -Credential (Get-Credential)"])
def send_mail_message(ctx: ManagementContext, args: dict[str, Any]) -> list[Any]:
    """Send one message; recipients the server refuses are reported (the others still get it), any other refusal
    or failure ends the command with the server's reply."""
    server = args.get("SmtpServer") or (ctx.shell.get_variable("PSEmailServer") if ctx.shell else None)
    if not server:
        raise InvalidValueError("The SMTP host was not specified. Use -SmtpServer or set $PSEmailServer.",
                                parameter="SmtpServer")
    try:
        str(server).encode("idna")   # what the connection will ask DNS for
    except UnicodeError:
        raise InvalidValueError(f'The SMTP host "{str(server)[:200]}" is not a host name.', parameter="SmtpServer") from None
    port = 25 if args.get("Port") is None else args["Port"]
    if not 0 < port < 65536:
        raise InvalidValueError(f"Cannot validate argument on parameter 'Port'. {port} isn't a TCP port (1-65535).",
                                parameter="Port")
    encoding = args.get("Encoding") or "utf8nobom"
    charset = "us-ascii" if encoding == "ascii" else "utf-8" if ENCODINGS[encoding][0] == "utf-8" else \
        ENCODINGS[encoding][0]
    sender, recipients = _envelope(args)
    msg = _message(args, charset)
    notify = args.get("DeliveryNotificationOption")
    try:
        with smtplib.SMTP(str(server), port, timeout=SMTP_TIMEOUT) as client:
            client.ehlo()
            if args.get("UseSsl"):
                if not client.has_extn("starttls"):
                    raise UserError("Server does not support secure connections.")
                client.starttls(context=_tls_context(ctx))
                client.ehlo()
            if args.get("Credential") is not None:
                credential = args["Credential"]
                client.login(credential.user_name, credential.password.reveal())
            rcpt_options = [f"NOTIFY={notify}"] if notify and client.has_extn("dsn") else []
            refused = client.send_message(msg, from_addr=sender, to_addrs=recipients, rcpt_options=rcpt_options)
    except ssl.SSLCertVerificationError as exc:
        raise UserError(f"The remote certificate is invalid according to the validation procedure: "
                        f"{exc.verify_message}.") from None
    except smtplib.SMTPRecipientsRefused as exc:
        first = next(iter(exc.recipients.values()))
        raise UserError(f"Mailbox unavailable. The server response was: {_server_reply(first)}") from None
    except smtplib.SMTPSenderRefused as exc:
        raise UserError(f"Mailbox unavailable. The server response was: {_server_reply(exc)}") from None
    except smtplib.SMTPNotSupportedError:
        raise UserError("The SMTP server requires a secure connection or the client was not authenticated: it "
                        "doesn't offer AUTH on this connection (use -UseSsl, or another port).") from None
    except smtplib.SMTPAuthenticationError as exc:
        raise UserError("The SMTP server requires a secure connection or the client was not authenticated. The "
                        f"server response was: {_server_reply(exc)}") from None
    except smtplib.SMTPResponseException as exc:
        raise UserError(f"The server response was: {_server_reply(exc)}") from None
    except (smtplib.SMTPException, OSError) as exc:   # refused, unreachable, timed out, hung up
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise UserError(f"Unable to connect to the remote server {server}:{port} ({reason}).") from None
    for address, reply in refused.items():   # some recipients refused: the others have the message
        ctx.errors.append(f"Mailbox unavailable. The server response was: {_server_reply(reply)} ({address})")
    return []

