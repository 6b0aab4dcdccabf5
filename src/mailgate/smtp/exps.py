"""Exchange Server authentication between the servers of one organisation (``X-EXPS``).

Exchange authenticates its own servers to each other with Kerberos under the
``X-EXPS`` EHLO keyword (AuthMechanism ``ExchangeServer``, permission group
``ExchangeServers``). mailgate has no domain controller; what its servers share
is the organisation's secret key (``secret.key``, the same on every server), so
the mechanism here, ``HMAC-SHA256``, is a challenge–response over a key derived
from it, mutual in one round trip:

    S: 250-X-EXPS HMAC-SHA256
    C: X-EXPS HMAC-SHA256
    S: 334 base64(challenge)                     random bytes, fresh per attempt
    C: base64("EX01 " + hex(HMAC(key, "client" challenge "EX01")))
    S: 235 2.7.0 Authentication successful <hex(HMAC(key, "server" challenge "EX01"))>

The key never crosses the wire; a recorded exchange can't be replayed (the
challenge is new every time) and the client checks the server's proof before
it sends mail, so a host without the key can neither relay as an organisation
server nor pose as one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

MECHANISM = "HMAC-SHA256"
KEY_PURPOSE = "mailgate X-EXPS server authentication"
CHALLENGE_BYTES = 32


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_BYTES)


def _mac(key: bytes, role: bytes, challenge: bytes, server: str) -> str:
    return hmac.new(key, role + b"\0" + challenge + b"\0" + server.lower().encode(), hashlib.sha256).hexdigest()


def client_response(key: bytes, challenge_b64: str, server: str) -> tuple[bytes, bytes]:
    """The line answering the server's 334 (without CRLF), and the challenge it answered."""
    challenge = base64.b64decode(challenge_b64.strip(), validate=True)
    token = f"{server} {_mac(key, b'client', challenge, server)}".encode()
    return base64.b64encode(token), challenge


def verify_client(key: bytes, challenge: bytes, line: str, servers: dict[str, str]) -> str | None:
    """The name of the organisation server that answered (``servers`` maps lower-case names to names), or None."""
    try:
        name, _, mac = base64.b64decode(line.strip(), validate=True).decode("ascii").partition(" ")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    known = servers.get(name.lower())
    if known is None or not hmac.compare_digest(mac, _mac(key, b"client", challenge, known)):
        return None
    return known


def server_proof(key: bytes, challenge: bytes, server: str) -> str:
    return _mac(key, b"server", challenge, server)


def verify_server(key: bytes, challenge: bytes, server: str, reply_text: str) -> bool:
    proof = reply_text.rsplit(" ", 1)[-1].strip()
    return hmac.compare_digest(proof, server_proof(key, challenge, server))
