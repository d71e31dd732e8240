"""Several `bookdav serve` processes on one database: what one writes, the other serves at once.

The scale-out path is more processes on one PostgreSQL database; two processes on one SQLite file
(WAL, busy_timeout) must work too. Each PostgreSQL run gets a database of its own, dropped after.
"""

from __future__ import annotations

import contextlib
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy.engine import make_url

from bookdav.storage.db import database_for
from tests.conftest import RunningServer, require_postgres, start_server

DAV = "{DAV:}"
SYNC_TOKEN_PROPFIND = (
    b'<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:prop><D:sync-token/></D:prop></D:propfind>'
)
CONCURRENT_PUTS_PER_SERVER = 15


@dataclass
class Pair:
    """Two servers on one database, and a provider account reachable through both."""

    first: RunningServer
    second: RunningServer
    username: str

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.first.passwords[self.username]

    def calendar_url(self, server: RunningServer) -> str:
        return f"{server.dav_url}{self.username}/appointments/"

    def put(self, server: RunningServer, href: str, text: str) -> requests.Response:
        return requests.put(
            self.calendar_url(server) + href,
            data=text.encode(),
            auth=self.auth,
            headers={"Content-Type": "text/calendar"},
            timeout=60,
        )

    def get(self, server: RunningServer, href: str) -> requests.Response:
        return requests.get(self.calendar_url(server) + href, auth=self.auth, timeout=60)

    def sync_token(self, server: RunningServer) -> str:
        response = requests.request(
            "PROPFIND",
            self.calendar_url(server),
            data=SYNC_TOKEN_PROPFIND,
            auth=self.auth,
            headers={"Depth": "0", "Content-Type": "application/xml"},
            timeout=60,
        )
        assert response.status_code == 207, response.text
        token = ET.fromstring(response.content).findtext(f".//{DAV}sync-token")
        assert token, response.text
        return token

    def changed_since(self, server: RunningServer, token: str) -> list[str]:
        """The hrefs an RFC 6578 sync-collection REPORT lists as changed since `token`."""
        body = (
            '<?xml version="1.0"?><D:sync-collection xmlns:D="DAV:">'
            f"<D:sync-token>{token}</D:sync-token><D:sync-level>1</D:sync-level>"
            "<D:prop><D:getetag/></D:prop></D:sync-collection>"
        )
        response = requests.request(
            "REPORT",
            self.calendar_url(server),
            data=body.encode(),
            auth=self.auth,
            headers={"Content-Type": "application/xml"},
            timeout=60,
        )
        assert response.status_code == 207, response.text
        hrefs = ET.fromstring(response.content).iter(f"{DAV}href")
        return sorted((href.text or "").rsplit("/", 1)[-1] for href in hrefs)


def event_text(uid: str, summary: str = "Meeting") -> str:
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bookdav tests//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20300101T000000Z\r\n"
        "DTSTART:20300601T090000Z\r\nDTEND:20300601T100000Z\r\n"
        f"SUMMARY:{summary}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test; dropped (connections and all) after."""
    admin = make_url(require_postgres()).set(drivername="postgresql")
    admin_conninfo = admin.render_as_string(hide_password=False)
    name = f"bookdav_mp_{secrets.token_hex(6)}"
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        # This process reached the database too (to create the account): let go of it first.
        database_for(url).close()
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def two_servers(folder: Path, database_url: str | None) -> Iterator[Pair]:
    # One after the other: the first one's start-up migration creates the schema the second finds.
    first = start_server(folder / "first", database_url=database_url)
    second: RunningServer | None = None
    try:
        second = start_server(folder / "second", database_url=first.database_url)
        username = first.add_user("provider")
        second.passwords.update(first.passwords)
        yield Pair(first, second, username)
    finally:
        if second is not None:
            second.stop()
        first.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    if request.param == "sqlite":
        with two_servers(tmp_path, None) as servers:
            yield servers
        return
    with fresh_postgres_database() as url, two_servers(tmp_path, url) as servers:
        yield servers


def test_a_put_through_one_process_is_served_by_the_other(pair: Pair) -> None:
    token_before = pair.sync_token(pair.second)

    put = pair.put(pair.first, "one.ics", event_text("one@multiprocess", "From the first"))
    assert put.status_code == 201, put.text

    got = pair.get(pair.second, "one.ics")
    assert got.status_code == 200, got.text
    assert "SUMMARY:From the first" in got.text
    assert got.headers["ETag"] == put.headers["ETag"]
    token_after = pair.sync_token(pair.second)
    assert token_after != token_before
    assert pair.changed_since(pair.second, token_before) == ["one.ics"]

    # And back: an update through the second process moves the token the first one reports.
    update = pair.put(pair.second, "one.ics", event_text("one@multiprocess", "From the second"))
    assert update.status_code == 204, update.text
    assert "SUMMARY:From the second" in pair.get(pair.first, "one.ics").text
    assert pair.sync_token(pair.first) not in (token_before, token_after)
    assert pair.changed_since(pair.first, token_after) == ["one.ics"]


def test_concurrent_writes_through_both_processes_all_land(pair: Pair) -> None:
    token_before = pair.sync_token(pair.first)
    jobs = [
        (server, f"{label}-{n}.ics")
        for label, server in (("a", pair.first), ("b", pair.second))
        for n in range(CONCURRENT_PUTS_PER_SERVER)
    ]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda job: pair.put(job[0], job[1], event_text(job[1] + "@mp")).status_code, jobs
            )
        )

    assert statuses == [201] * len(jobs)
    expected = sorted(href for _, href in jobs)
    assert pair.changed_since(pair.first, token_before) == expected
    assert pair.changed_since(pair.second, token_before) == expected
