"""Who is asking: HTTP Basic (the CalDAV users) or `Authorization: Bearer <token>` on the API."""

from __future__ import annotations

import base64
import binascii

from aiohttp import web

from bookdav.booking.errors import Forbidden, Unauthorized
from bookdav.server.keys import CREDENTIALS, DATABASE
from bookdav.storage.tokens import user_for_token
from bookdav.storage.users import User

_USER = "bookdav.user"


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic ...` value; None if it is not one."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, separator, password = decoded.partition(":")
    return (username, password) if separator and username else None


async def current_user(request: web.Request) -> User | None:
    """The signed-in user, None for an anonymous request; 401 for credentials that don't match."""
    if _USER in request:
        return request[_USER]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    database = request.app[DATABASE]
    user: User | None = None
    if not header:
        pass
    elif scheme.lower() == "basic":
        credentials = basic_credentials(header)
        if credentials is None:
            raise Unauthorized("malformed Basic credentials")
        user = await database.run_read(request.app[CREDENTIALS].verify, *credentials)
        if user is None:
            raise Unauthorized("wrong username or password")
    elif scheme.lower() == "bearer":
        user = await database.run_read(user_for_token, value.strip())
        if user is None:
            raise Unauthorized("unknown or revoked token")
    else:
        raise Unauthorized(f"unsupported authorization scheme {scheme!r}")
    request[_USER] = user
    return user


async def require_user(request: web.Request, *roles: str) -> User:
    """The signed-in user, who must have one of `roles` (any role if none are named)."""
    user = await current_user(request)
    if user is None:
        raise Unauthorized("sign in with Basic credentials or a bearer token")
    if roles and user.role not in roles:
        raise Forbidden(f"this needs the role {' or '.join(roles)}")
    return user


def may_act_for(user: User, user_id: str) -> bool:
    """Users manage themselves; admins manage everyone."""
    return user.role == "admin" or user.id == user_id
