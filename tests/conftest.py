"""Fixtures: a real `bookdav serve` process on a free loopback port, and accounts in its database."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bookdav.booking.accounts import add_user
from bookdav.storage.db import database_for

POSTGRES_URL_VARIABLE = "BOOKDAV_TEST_DATABASE_URL"


def postgres_url() -> str | None:
    return os.environ.get(POSTGRES_URL_VARIABLE) or None


def require_postgres() -> str:
    url = postgres_url()
    if not url:
        pytest.skip(f"PostgreSQL variant: set {POSTGRES_URL_VARIABLE} to run it")
    return url


def write_config(
    folder: Path,
    *,
    database_url: str | None = None,
    extra: str = "",
    guest_bookings_per_minute: int = 0,
    mail: str = "",
    server: str = "",
) -> Path:
    """`mail`, if given, is the body of the `[mail]` section (default: a Maildir under var/);
    `server`, more lines of the `[server]` section."""
    folder.mkdir(parents=True, exist_ok=True)
    url = database_url or "sqlite:///var/bookdav.sqlite3"
    config = folder / "config.ini"
    config.write_text(
        f"[server]\nhost = 127.0.0.1\nport = 0\n{server}\n"
        f"[storage]\nurl = {url}\n"
        f"[mail]\n{mail or 'maildir = var/maildir'}\n"
        f"[booking]\nguest_bookings_per_minute = {guest_bookings_per_minute}\n"
        f"[logging]\nlevel = info\nformat = json\n{extra}",
        encoding="utf-8",
    )
    return config


def bookdav_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bookdav", *args]


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKDAV_")}
    env.update(overrides)
    return env


@dataclass
class RunningServer:
    base_url: str
    config_path: Path
    database_url: str
    process: subprocess.Popen[str]
    log_path: Path
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def dav_url(self) -> str:
        return f"{self.base_url}/dav/"

    def add_user(self, role: str = "provider", *, timezone: str = "Europe/Berlin") -> str:
        """Create a fresh account straight in the server's database; returns its username."""
        username = f"{role[:4]}{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        add_user(
            database_for(self.database_url),
            username=username,
            email=f"{username}@example.org",
            role=role,
            password=password,
            name=username.title(),
            timezone=timezone,
        )
        self.passwords[username] = password
        return username

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    folder: Path,
    *,
    database_url: str | None = None,
    guest_bookings_per_minute: int = 0,
    mail: str = "",
    extra: str = "",
    server: str = "",
) -> RunningServer:
    """Start `bookdav serve` on port 0 and wait until /healthz answers. Guest bookings are not
    rate-limited unless asked: the tests book from one address, fast."""
    config = write_config(
        folder,
        database_url=database_url,
        guest_bookings_per_minute=guest_bookings_per_minute,
        mail=mail,
        extra=extra,
        server=server,
    )
    log_path = folder / "server.log"
    log_file = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        bookdav_command("serve", "--config", str(config)),
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env=clean_env(),
    )
    assert process.stdout is not None
    base_url = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if "listening on " in line:
            base_url = line.rsplit("listening on ", 1)[1].strip()
            break
    if not base_url:
        process.kill()
        raise RuntimeError("bookdav serve did not start:\n" + log_path.read_text())
    _wait_healthy(base_url)
    resolved_url = database_url or "sqlite:///" + str((folder / "var/bookdav.sqlite3").resolve())
    return RunningServer(base_url, config, resolved_url, process, log_path)


def _wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{base_url}/healthz never answered 200")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the session on SQLite; tests make their own accounts."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The same on PostgreSQL, where BOOKDAV_TEST_DATABASE_URL is set."""
    running = start_server(tmp_path_factory.mktemp("pg-server"), database_url=require_postgres())
    yield running
    running.stop()
