"""The `bookdav` command and the server around CalDAV: start-up, health, logs, the mount's guards."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import select

from bookdav import __version__
from bookdav.storage.db import database_for
from bookdav.storage.schema import users
from tests.conftest import (
    RunningServer,
    bookdav_command,
    clean_env,
    require_postgres,
    start_server,
    write_config,
)


def run_bookdav(
    *args: str, stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bookdav_command(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
        cwd=cwd,
    )


def test_version() -> None:
    result = run_bookdav("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"bookdav {__version__}"


def test_healthz_answers_ok(server: RunningServer) -> None:
    response = requests.get(f"{server.base_url}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_unknown_path_is_a_problem_document(server: RunningServer) -> None:
    response = requests.get(f"{server.base_url}/no-such-page")
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["status"] == 404


@pytest.mark.parametrize(
    ("path", "way_on"),
    [
        ("/", "/app/"),
        ("/app/no-such-page", "/app/"),
        ("/book/someone/some-service/details/extra", "/book/someone"),
        ("/manage/a-token/no-such-action", "/app/login"),
    ],
)
def test_an_unknown_page_is_an_html_page_with_a_way_on(
    server: RunningServer, path: str, way_on: str
) -> None:
    response = requests.get(f"{server.base_url}{path}")
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("text/html")
    assert "<h1>Page not found</h1>" in response.text
    assert f'href="{way_on}"' in response.text


def test_a_page_asked_with_the_wrong_method_is_an_html_page(server: RunningServer) -> None:
    response = requests.delete(f"{server.base_url}/book/someone")
    assert response.status_code == 405
    assert response.headers["Content-Type"].startswith("text/html")
    assert "GET" in response.headers["Allow"]


def test_unknown_api_and_dav_paths_keep_their_own_errors(server: RunningServer) -> None:
    api = requests.get(f"{server.base_url}/api/v1/no-such-resource")
    assert api.status_code == 404
    assert api.headers["Content-Type"].startswith("application/problem+json")
    dav = requests.request(
        "PROPFIND", f"{server.base_url}/dav/no-such-user/", headers={"Depth": "0"}
    )
    assert "Page not found" not in dav.text
    assert not dav.headers.get("Content-Type", "").startswith("text/html")


def test_one_log_line_per_request_without_secrets(server: RunningServer) -> None:
    username = server.add_user("provider")
    password = server.passwords[username]
    marker = f"/dav/{username}/?probe={uuid.uuid4().hex}"
    requests.request(
        "PROPFIND", server.base_url + marker, auth=(username, password), headers={"Depth": "0"}
    )
    lines = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    matching = [
        line
        for line in lines
        if line.get("event") == "request" and line.get("path") == f"/dav/{username}/"
    ]
    assert matching, "no request line logged"
    line = matching[-1]
    assert line["method"] == "PROPFIND"
    assert line["status"] == 207
    assert line["user"] == username
    assert isinstance(line["duration_ms"], float | int)
    assert password not in server.log_text()
    assert "Authorization" not in server.log_text()


def test_oversized_body_is_refused_with_413(server: RunningServer) -> None:
    username = server.add_user("provider")
    too_big = b"x" * (10 * 1024 * 1024 + 1)
    response = requests.put(
        f"{server.dav_url}{username}/appointments/big.ics",
        data=too_big,
        auth=(username, server.passwords[username]),
        headers={"Content-Type": "text/calendar"},
    )
    assert response.status_code == 413


def test_proxy_headers_cannot_move_the_dav_prefix(server: RunningServer) -> None:
    username = server.add_user("provider")
    auth = (username, server.passwords[username])
    for header in (
        {"X-Script-Name": "/elsewhere"},
        {"X-Forwarded-Host": "evil.example"},
        {"X-Forwarded-Proto": "https"},
    ):
        response = requests.request(
            "PROPFIND",
            f"{server.dav_url}{username}/",
            auth=auth,
            headers={"Depth": "0", **header},
        )
        assert response.status_code == 207, header
        assert f"<href>/dav/{username}/</href>" in response.text.replace("D:", "")
        assert "elsewhere" not in response.text and "evil.example" not in response.text


def test_first_start_creates_an_admin_and_prints_its_password_once(tmp_path: Path) -> None:
    running = start_server(tmp_path / "fresh")
    try:
        lines = [
            json.loads(line) for line in running.log_text().splitlines() if line.startswith("{")
        ]
        created = [line for line in lines if line.get("username") == "admin" and "password" in line]
        assert len(created) == 1
        password = created[0]["password"]
        with database_for(running.database_url).read() as conn:
            stored = conn.execute(
                select(users.c.password_hash).where(users.c.username == "admin")
            ).scalar_one()
        assert password not in stored and stored.startswith("$argon2")
        response = requests.request(
            "PROPFIND", f"{running.dav_url}admin/", auth=("admin", password), headers={"Depth": "0"}
        )
        assert response.status_code == 207
    finally:
        running.stop()
    again = start_server(tmp_path / "fresh")
    try:
        assert "password" not in again.log_text()
    finally:
        again.stop()


def test_user_add_reads_the_password_from_stdin_or_generates_one(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    given = run_bookdav(
        "user",
        "add",
        "carol",
        "--email",
        "carol@example.org",
        "--role",
        "provider",
        "--password-stdin",
        "--config",
        str(config),
        stdin="s3cret-pass\n",
    )
    assert given.returncode == 0, given.stderr
    assert "s3cret-pass" not in given.stdout
    generated = run_bookdav(
        "--config",
        str(config),
        "user",
        "add",
        "dave",
        "--email",
        "dave@example.org",
        "--role",
        "client",
    )
    assert generated.returncode == 0, generated.stderr
    assert "password: " in generated.stdout
    taken = run_bookdav(
        "user",
        "add",
        "carol",
        "--email",
        "c@example.org",
        "--role",
        "client",
        "--config",
        str(config),
    )
    assert taken.returncode != 0
    assert taken.stderr.strip() == "bookdav: username carol is taken"
    bad = run_bookdav(
        "user",
        "add",
        "Bad Name",
        "--email",
        "x@example.org",
        "--role",
        "client",
        "--config",
        str(config),
    )
    assert bad.returncode != 0
    assert bad.stderr.startswith("bookdav: username:")


def test_config_is_found_through_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path / "cfg")
    result = run_bookdav("db", "upgrade", env=clean_env(BOOKDAV_CONFIG=str(config)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cfg/var/bookdav.sqlite3").exists()


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Non-zero exit, no traceback, and the reason as the last line (log lines may come first)."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("bookdav: "), result.stderr
    for needle in needles:
        assert needle in last_line


def test_malformed_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.ini"
    config.write_text("[server]\nport = not-a-port\n")
    assert_clean_failure(run_bookdav("serve", "--config", str(config)), "[server] port")
    assert_clean_failure(
        run_bookdav("serve", env=clean_env(BOOKDAV_SERVER_PORTT="1")), "BOOKDAV_SERVER_PORTT"
    )


def test_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path)
        result = run_bookdav("serve", "--config", str(config), "--port", str(port))
    assert_clean_failure(result, f"127.0.0.1:{port}")


def test_unreachable_database_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = write_config(tmp_path, database_url=f"postgresql://nobody@127.0.0.1:{port}/none")
    assert_clean_failure(run_bookdav("serve", "--config", str(config)), "cannot reach the database")


def test_healthz_turns_503_when_the_database_goes_away(tmp_path: Path) -> None:
    admin_url = require_postgres()
    name = f"bookdav_health_{uuid.uuid4().hex[:8]}"
    conninfo = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    running = start_server(tmp_path, database_url=conninfo.rsplit("/", 1)[0] + f"/{name}")
    try:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        response = requests.get(f"{running.base_url}/healthz", timeout=30)
        assert response.status_code == 503
    finally:
        running.stop()
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("path", ["/dav/", "/dav"])
def test_dav_root_asks_for_credentials(server: RunningServer, path: str) -> None:
    response = requests.request("PROPFIND", server.base_url + path, headers={"Depth": "0"})
    assert response.status_code == 401


def test_token_create_prints_a_working_bearer_token(server: RunningServer) -> None:
    username = server.add_user("provider")
    result = run_bookdav(
        "token", "create", username, "--name", "ci", "--config", str(server.config_path)
    )
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip().splitlines()[-1]
    me = requests.get(
        f"{server.base_url}/api/v1/users/me", headers={"Authorization": f"Bearer {secret}"}
    )
    assert me.status_code == 200 and me.json()["username"] == username
    unknown = run_bookdav("token", "create", "nobody-here", "--config", str(server.config_path))
    assert_clean_failure(unknown, "no user nobody-here")
