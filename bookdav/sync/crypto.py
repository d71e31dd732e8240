"""Credentials of external calendars, encrypted at rest with a key from `[sync] secret_key`.

The configured secret is any long text; a Fernet key (AES-128-CBC + HMAC-SHA256) is derived from
it with HKDF-SHA256, so the stored tokens are authenticated and a wrong key is detected, never
silently decrypted into garbage.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_HKDF_INFO = b"bookdav sync credentials v1"


class MissingSecretKey(Exception):
    """Credentials were given (or stored) but `[sync] secret_key` is empty."""


class UnreadableCredentials(Exception):
    """Stored credentials do not decrypt with the configured key (the key changed?)."""


def _fernet(secret_key: str) -> Fernet:
    if not secret_key:
        raise MissingSecretKey("set [sync] secret_key to store calendar credentials")
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret_key.encode()
    )
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt_credentials(secret_key: str, credentials: dict[str, Any]) -> str:
    """The credentials as a Fernet token (text), for the `credentials` column."""
    return _fernet(secret_key).encrypt(json.dumps(credentials, sort_keys=True).encode()).decode()


def decrypt_credentials(secret_key: str, token: str | None) -> dict[str, Any]:
    """The credentials stored as `token`; `{}` when none were stored."""
    if not token:
        return {}
    try:
        plain = _fernet(secret_key).decrypt(token.encode())
    except InvalidToken as exc:
        raise UnreadableCredentials(
            "stored credentials do not decrypt with [sync] secret_key (was it changed?)"
        ) from exc
    value = json.loads(plain)
    return value if isinstance(value, dict) else {}
