"""/api/v1/users and tokens: sign-up, roles, self-or-admin access, bearer tokens, bad input."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import requests

from tests.conftest import RunningServer


def assert_problem(response: requests.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    if field is not None:
        assert body["invalid-params"][0]["name"] == field, body


def signup(server: RunningServer, **overrides: Any) -> requests.Response:
    name = uuid.uuid4().hex[:8]
    body = {
        "name": f"Client {name}",
        "email": f"{name}@example.org",
        "password": "correct horse battery",
        "role": "client",
        "timezone": "America/New_York",
        **overrides,
    }
    return requests.post(f"{server.base_url}/api/v1/users", json=body)


def auth_of(server: RunningServer, username: str) -> tuple[str, str]:
    return username, server.passwords[username]


def test_anyone_may_sign_up_as_a_client_and_read_themselves(server: RunningServer) -> None:
    created = signup(server, username=f"c{uuid.uuid4().hex[:8]}")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "active" and body["role"] == "client"
    assert "password" not in created.text and "argon2" not in created.text
    auth = (body["username"], "correct horse battery")
    me = requests.get(f"{server.base_url}/api/v1/users/me", auth=auth)
    assert me.status_code == 200
    assert me.json()["userId"] == body["userId"]
    assert me.json()["timezone"] == "America/New_York"


def test_only_an_admin_creates_providers(server: RunningServer) -> None:
    assert_problem(signup(server, role="provider"), 403)
    admin = server.add_user("admin")
    created = requests.post(
        f"{server.base_url}/api/v1/users",
        auth=auth_of(server, admin),
        json={
            "name": "Dr Who",
            "email": "who@example.org",
            "password": "long enough pw",
            "role": "provider",
            "timezone": "Europe/Berlin",
            "username": f"p{uuid.uuid4().hex[:6]}",
        },
    )
    assert created.status_code == 201, created.text
    username = created.json()["username"]
    calendars = requests.request(
        "PROPFIND",
        f"{server.dav_url}{username}/",
        auth=(username, "long enough pw"),
        headers={"Depth": "1"},
    )
    assert calendars.status_code == 207
    assert f"/dav/{username}/appointments/" in calendars.text
    assert f"/dav/{username}/availability/" in calendars.text


def test_users_read_and_change_only_themselves_unless_admin(server: RunningServer) -> None:
    alice, bob, admin = (
        server.add_user("client"),
        server.add_user("client"),
        server.add_user("admin"),
    )
    alice_id = requests.get(
        f"{server.base_url}/api/v1/users/me", auth=auth_of(server, alice)
    ).json()["userId"]
    url = f"{server.base_url}/api/v1/users/{alice_id}"
    assert_problem(requests.get(url, auth=auth_of(server, bob)), 403)
    assert_problem(requests.put(url, json={"name": "Hacked"}, auth=auth_of(server, bob)), 403)
    assert_problem(requests.get(url), 401)
    renamed = requests.put(url, json={"name": "Alice A."}, auth=auth_of(server, alice))
    assert renamed.status_code == 200 and renamed.json()["name"] == "Alice A."
    assert_problem(requests.put(url, json={"role": "admin"}, auth=auth_of(server, alice)), 403)
    by_admin = requests.get(url, auth=auth_of(server, admin))
    assert by_admin.status_code == 200 and by_admin.json()["name"] == "Alice A."


def test_bearer_tokens_work_until_revoked(server: RunningServer) -> None:
    user = server.add_user("provider")
    me = requests.get(f"{server.base_url}/api/v1/users/me", auth=auth_of(server, user)).json()
    created = requests.post(
        f"{server.base_url}/api/v1/users/{me['userId']}/tokens",
        json={"name": "ci"},
        auth=auth_of(server, user),
    )
    assert created.status_code == 201
    token = created.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{server.base_url}/api/v1/users/me", headers=bearer).status_code == 200
    listed = requests.get(f"{server.base_url}/api/v1/users/{me['userId']}/tokens", headers=bearer)
    assert token not in listed.text
    revoked = requests.delete(
        f"{server.base_url}/api/v1/users/{me['userId']}/tokens/{created.json()['tokenId']}",
        auth=auth_of(server, user),
    )
    assert revoked.status_code == 204
    assert_problem(requests.get(f"{server.base_url}/api/v1/users/me", headers=bearer), 401)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"email": "not-an-email"}, "email"),
        ({"password": "short"}, "password"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"name": 42}, "name"),
        ({"role": "superuser"}, "role"),
        ({"username": "Has Spaces"}, "username"),
    ],
)
def test_bad_sign_ups_name_the_field_and_create_nothing(
    server: RunningServer, overrides: dict[str, Any], field: str
) -> None:
    assert_problem(signup(server, **overrides), 400, field)


def test_malformed_and_mistyped_bodies_are_problems(server: RunningServer) -> None:
    url = f"{server.base_url}/api/v1/users"
    assert_problem(
        requests.post(url, data="{nope", headers={"Content-Type": "application/json"}), 400, "body"
    )
    assert_problem(requests.post(url, json=["a", "list"]), 400, "body")
    assert_problem(
        requests.post(
            url, data="name=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ),
        415,
    )
    assert_problem(
        requests.post(
            url, data=b"x" * (11 * 1024 * 1024), headers={"Content-Type": "application/json"}
        ),
        413,
    )


def test_a_taken_username_is_a_conflict(server: RunningServer) -> None:
    name = f"c{uuid.uuid4().hex[:8]}"
    assert signup(server, username=name).status_code == 201
    assert_problem(signup(server, username=name), 409)


def test_unknown_user_is_404_for_an_admin(server: RunningServer) -> None:
    admin = server.add_user("admin")
    response = requests.get(
        f"{server.base_url}/api/v1/users/{uuid.uuid4()}", auth=auth_of(server, admin)
    )
    assert_problem(response, 404)
