"""`/api/v1/users`: accounts (create, read, update) and their API tokens."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from typing import Any

from aiohttp import web

from bookdav.booking.accounts import (
    InvalidAccount,
    create_account,
    validate_account,
)
from bookdav.booking.errors import Conflict, Forbidden, InvalidInput, NotFound
from bookdav.logs import log_event
from bookdav.server.api import validation as v
from bookdav.server.auth import current_user, may_act_for, require_user
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage import tokens
from bookdav.storage.users import (
    ROLES,
    User,
    UsernameTaken,
    hash_password,
    merge_preferences,
    update_user,
    user_by_id,
    user_preferences,
)

routes = web.RouteTableDef()
log = logging.getLogger("bookdav.api.users")

MIN_PASSWORD_LENGTH = 8


def user_json(user: User) -> dict[str, Any]:
    return {
        "userId": user.id,
        "username": user.username,
        "name": user.name,
        "email": user.email,
        "role": user.role,
        "timezone": user.timezone,
        "status": user.status,
        "createdAt": user.created_at,
    }


def _password(body: dict[str, Any]) -> str:
    return v.text(body, "password", max_length=1024, min_length=MIN_PASSWORD_LENGTH)


def _username_from_email(email: str) -> str:
    local = re.sub(r"[^a-z0-9._-]", "", email.partition("@")[0].lower()).lstrip("._-")
    return (local or "user")[:48] + "-" + secrets.token_hex(3)


async def _target_user(request: web.Request) -> tuple[User, User]:
    """(the signed-in user, the user named in the path), if the first may act for the second."""
    actor = await require_user(request)
    user_id = request.match_info["userId"]
    if not may_act_for(actor, user_id):
        raise Forbidden("you may only manage your own account")
    target = await request.app[DATABASE].run_read(user_by_id, user_id)
    if target is None:
        raise NotFound(f"no user {user_id}")
    return actor, target


@routes.post("/api/v1/users")
async def create_user(request: web.Request) -> web.Response:
    actor = await current_user(request)
    body = await v.json_object(request)
    role = v.text(body, "role", required=False, default="client")
    if role not in ROLES:
        raise InvalidInput("role", f"must be one of {', '.join(ROLES)}")
    if actor is None or actor.role != "admin":
        if role != "client":
            raise Forbidden("only an admin may create provider or admin accounts")
        if not request.app[SETTINGS].get("booking", "allow_client_signup"):
            raise Forbidden("client sign-up is switched off on this server")
    name = v.text(body, "name", min_length=1)
    email = v.text(body, "email", max_length=320)
    password = _password(body)
    timezone = v.time_zone(body.get("timezone", "UTC"))
    username = v.text(body, "username", required=False, max_length=64) or _username_from_email(
        email
    )
    try:
        validate_account(username, email, role, timezone)
    except InvalidAccount as exc:
        raise InvalidInput(exc.field, str(exc).partition(": ")[2]) from exc
    password_hash = await asyncio.to_thread(hash_password, password)
    try:
        user = await request.app[DATABASE].run_write(
            lambda conn: create_account(
                conn,
                username=username,
                email=email,
                role=role,
                password_hash=password_hash,
                name=name,
                timezone=timezone,
            ),
            principals=[username],
        )
    except UsernameTaken as exc:
        raise Conflict(f"the username {username!r} is taken") from exc
    return web.json_response(
        user_json(user), status=201, headers={"Location": f"/api/v1/users/{user.id}"}
    )


@routes.get("/api/v1/users/me")
async def get_me(request: web.Request) -> web.Response:
    return web.json_response(user_json(await require_user(request)))


@routes.get("/api/v1/users/{userId}")
async def get_user(request: web.Request) -> web.Response:
    _, target = await _target_user(request)
    return web.json_response(user_json(target))


@routes.put("/api/v1/users/{userId}")
async def put_user(request: web.Request) -> web.Response:
    actor, target = await _target_user(request)
    body = await v.json_object(request)
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = v.text(body, "name", min_length=1)
    if "email" in body:
        changes["email"] = v.text(body, "email", max_length=320)
    if "timezone" in body:
        changes["timezone"] = v.time_zone(body["timezone"])
    for admin_only in ("role", "status"):
        if admin_only in body and actor.role != "admin":
            raise Forbidden(f"only an admin may change {admin_only}")
    if "role" in body:
        changes["role"] = v.text(body, "role")
    if "status" in body:
        changes["status"] = v.text(body, "status")
        if changes["status"] not in ("active", "disabled"):
            raise InvalidInput("status", "must be active or disabled")
    try:
        validate_account(
            target.username,
            changes.get("email", target.email),
            changes.get("role", target.role),
            changes.get("timezone", target.timezone),
        )
    except InvalidAccount as exc:
        raise InvalidInput(exc.field, str(exc).partition(": ")[2]) from exc
    if (
        "role" in changes
        and changes["role"] != target.role
        and "provider"
        in (
            changes["role"],
            target.role,
        )
    ):
        raise InvalidInput("role", "a provider cannot become another role, or the reverse")
    if "password" in body:
        changes["password_hash"] = await asyncio.to_thread(hash_password, _password(body))
    updated = await request.app[DATABASE].run_write(
        update_user, target.id, **changes, principals=[target.username]
    )
    assert updated is not None
    return web.json_response(user_json(updated))


def _token_json(info: tokens.TokenInfo) -> dict[str, Any]:
    return {
        "tokenId": info.id,
        "name": info.name,
        "createdAt": info.created_at,
        "revoked": info.revoked_at is not None,
    }


@routes.post("/api/v1/users/{userId}/tokens")
async def create_token(request: web.Request) -> web.Response:
    _, target = await _target_user(request)
    body = await v.json_object(request) if request.can_read_body else {}
    name = v.text(body, "name", required=False, max_length=200)
    info, secret = await request.app[DATABASE].run_write(
        tokens.create_token, target.id, name, principals=[target.username]
    )
    return web.json_response({**_token_json(info), "token": secret}, status=201)


@routes.get("/api/v1/users/{userId}/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    _, target = await _target_user(request)
    found = await request.app[DATABASE].run_read(tokens.list_tokens, target.id)
    return web.json_response({"items": [_token_json(info) for info in found]})


@routes.delete("/api/v1/users/{userId}/tokens/{tokenId}")
async def revoke_token(request: web.Request) -> web.Response:
    _, target = await _target_user(request)
    revoked = await request.app[DATABASE].run_write(
        tokens.revoke_token, target.id, request.match_info["tokenId"], principals=[target.username]
    )
    if not revoked:
        raise NotFound("no such live token")
    return web.Response(status=204)


# Preferences a user may set, with the type each must have.
PREFERENCE_TYPES: dict[str, type] = {"notifyByEmail": bool}


def _preferences_json(stored: dict[str, Any], settings_default: bool) -> dict[str, Any]:
    chosen = stored.get("notifyByEmail")
    return {
        "notifyByEmail": chosen if isinstance(chosen, bool) else None,
        # What applies now: the user's choice, else the server's `[mail] notify_providers`.
        "effective": {"notifyByEmail": chosen if isinstance(chosen, bool) else settings_default},
    }


@routes.get("/api/v1/users/{userId}/preferences")
async def get_preferences(request: web.Request) -> web.Response:
    _, target = await _target_user(request)
    stored = await request.app[DATABASE].run_read(user_preferences, target.id)
    default = request.app[SETTINGS].get("mail", "notify_providers")
    return web.json_response(_preferences_json(stored, default))


@routes.put("/api/v1/users/{userId}/preferences")
async def put_preferences(request: web.Request) -> web.Response:
    """Set some preferences (the others stay); `null` forgets a choice (the default applies)."""
    _, target = await _target_user(request)
    body = await v.json_object(request)
    if not body:
        raise InvalidInput("notifyByEmail", "name at least one preference")
    for name, value in body.items():
        wanted = PREFERENCE_TYPES.get(name)
        if wanted is None:
            raise InvalidInput(name, "is not a known preference")
        if value is not None and not isinstance(value, wanted):
            raise InvalidInput(name, f"must be {wanted.__name__} or null")
    stored = await request.app[DATABASE].run_write(
        merge_preferences, target.id, dict(body), principals=[target.username]
    )
    log_event(
        log, "preferences changed", user_id=target.id, changed=sorted(body), by=request.remote
    )
    default = request.app[SETTINGS].get("mail", "notify_providers")
    return web.json_response(_preferences_json(stored, default))
