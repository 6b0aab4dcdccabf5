"""Secrets at rest: smart-host passwords and certificate private keys are
encrypted with a key kept outside the store (``secret.key`` in the data
directory, mode 0600, or ``MAILGATE_SECRET_KEY``), so a copy of the database
alone reveals none of them. Servers of one organisation share the key.

Mailbox passwords are not encrypted but hashed (scrypt), as they only need verifying.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from mailgate.errors import UserError

ENV_KEY = "MAILGATE_SECRET_KEY"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)
        self._key = key

    def derive(self, purpose: str) -> bytes:
        """A key for one purpose, derived from the organisation's key (servers that share it share this too)."""
        return hmac.new(self._key, purpose.encode(), hashlib.sha256).digest()

    @classmethod
    def for_home(cls, home: Path, *, create: bool = False) -> "SecretBox":
        if os.environ.get(ENV_KEY):
            return cls(os.environ[ENV_KEY].encode())
        path = home / "secret.key"
        if not path.exists():
            if not create:
                raise UserError(f"The secret key {path} is missing. Copy it from another server of the organisation "
                                f"or set {ENV_KEY}.")
            key = Fernet.generate_key()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key + b"\n")
        return cls(path.read_bytes().strip())

    def encrypt(self, plaintext: str | bytes) -> str:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        return self._fernet.encrypt(data).decode("ascii")

    def decrypt(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.encode("ascii"))
        except InvalidToken:
            raise UserError("A stored secret can't be decrypted with this server's secret key; "
                            "the key differs from the one the secret was stored with.") from None


# scrypt parameters: 16 MiB of memory per hash, ~50 ms on the project machine.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "scrypt${}${}${}${}${}".format(_SCRYPT_N, _SCRYPT_R, _SCRYPT_P,
                                         base64.b64encode(salt).decode(), base64.b64encode(digest).decode())


def verify_password(password: str, encoded: str | None) -> bool:
    if not encoded:
        return False
    try:
        scheme, n, r, p, salt_b64, digest_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)
