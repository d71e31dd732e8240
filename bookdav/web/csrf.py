"""CSRF tokens for the HTML forms.

Public forms (booking, manage links, login) use a signed double-submit token: a random value in
an HttpOnly cookie, and in the form HMAC(server secret, that value). A cross-site page can neither
read the cookie nor compute the HMAC, and a cookie planted from a sibling domain has no valid
signature. Dashboard forms use HMAC(the session's csrf_secret, "dashboard").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from aiohttp import web

from bookdav.booking.errors import Forbidden

CSRF_COOKIE = "bookdav_csrf"
FIELD = "csrf_token"


class CsrfRejected(Forbidden):
    title = "This form has expired"


def load_secret(folder: Path) -> bytes:
    """The server's signing key in `folder/web-secret`, created once (processes on one host share
    it; copy the file to every host of a multi-host installation)."""
    path = folder / "web-secret"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(descriptor, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(32))
    text = path.read_text(encoding="ascii").strip()
    if len(text) < 32:  # a concurrent first start may read it half-written: read once more
        text = path.read_text(encoding="ascii").strip()
    return text.encode("ascii")


def sign(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def public_token(request: web.Request, key: bytes) -> tuple[str, str | None]:
    """(form token, new cookie value or None if the request's cookie is reused)."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if len(cookie) < 20 or len(cookie) > 100:
        cookie = secrets.token_urlsafe(24)
        return sign(key, cookie), cookie
    return sign(key, cookie), None


def check_public(request: web.Request, key: bytes, submitted: str) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not submitted or not hmac.compare_digest(sign(key, cookie), submitted):
        raise CsrfRejected(
            "The form could not be checked (cookies off, or the page was open too long). "
            "Go back, reload the page and send it again."
        )


def check_session(csrf_secret: str, submitted: str) -> None:
    expected = sign(csrf_secret.encode(), "dashboard")
    if not submitted or not hmac.compare_digest(expected, submitted):
        raise CsrfRejected("The form could not be checked. Reload the page and send it again.")


def session_token(csrf_secret: str) -> str:
    return sign(csrf_secret.encode(), "dashboard")
