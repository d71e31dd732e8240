"""A real `radicale.Application` on the bookdav storage plugin, driven through WSGI environs."""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

import pytest
import radicale
from radicale import config

from bookdav.plugins.storage import Storage
from bookdav.storage.db import Database
from tests.storage_fixtures import database, event, vcalendar, vevent  # noqa: F401 (fixture)

DAV = "{DAV:}"
CALENDAR = "/alice/cal/"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    text: str

    def xml(self) -> ET.Element:
        return ET.fromstring(self.text)


class Client:
    """Sends WSGI requests to one Radicale application as one user."""

    def __init__(self, app: radicale.Application, user: str = "alice") -> None:
        self.app = app
        self.auth = "Basic " + base64.b64encode(f"{user}:secret".encode()).decode()

    def request(self, method: str, path: str, body: str = "", **headers: str) -> Response:
        data = body.encode()
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "SCRIPT_NAME": "",
            "SERVER_NAME": "localhost",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(data),
            "wsgi.errors": sys.stderr,
            "CONTENT_LENGTH": str(len(data)),
            "HTTP_AUTHORIZATION": self.auth,
            **{f"HTTP_{k.upper()}": v for k, v in headers.items()},
        }
        if body:
            environ["CONTENT_TYPE"] = "text/calendar" if method == "PUT" else "application/xml"
        captured: dict[str, object] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
            captured["status"] = int(status.split()[0])
            captured["headers"] = dict(response_headers)

        answer = b"".join(self.app(environ, start_response))
        return Response(captured["status"], captured["headers"], answer.decode())  # type: ignore[arg-type]

    def put(self, href: str, text: str, **headers: str) -> Response:
        return self.request("PUT", CALENDAR + href, text, **headers)

    def query(self, start: str, end: str, component: str = "VEVENT") -> set[str]:
        body = f"""<?xml version="1.0"?>
<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">
  <D:prop><D:getetag/></D:prop>
  <C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="{component}">
    <C:time-range start="{start}" end="{end}"/>
  </C:comp-filter></C:comp-filter></C:filter>
</C:calendar-query>"""
        response = self.request("REPORT", CALENDAR, body, DEPTH="1")
        assert response.status == 207, response.text
        return found_hrefs(response)

    def sync(self, token: str = "") -> Response:
        token_xml = f"<D:sync-token>{token}</D:sync-token>" if token else "<D:sync-token/>"
        body = f"""<?xml version="1.0"?>
<D:sync-collection xmlns:D="DAV:">{token_xml}<D:sync-level>1</D:sync-level>
  <D:prop><D:getetag/></D:prop></D:sync-collection>"""
        return self.request("REPORT", CALENDAR, body)


def found_hrefs(response: Response) -> set[str]:
    """Hrefs of the multistatus responses that have a 200 propstat."""
    hrefs = set()
    for answer in response.xml().iter(f"{DAV}response"):
        statuses = [s.text or "" for s in answer.iter(f"{DAV}status")]
        if any(" 200 " in s for s in statuses):
            hrefs.add(unquote(answer.findtext(f"{DAV}href") or ""))
    return hrefs


def status_by_href(response: Response) -> dict[str, str]:
    result = {}
    for answer in response.xml().iter(f"{DAV}response"):
        status = answer.findtext(f"{DAV}status") or answer.findtext(f".//{DAV}status") or ""
        result[unquote(answer.findtext(f"{DAV}href") or "")] = status
    return result


def radicale_app(database_url: str) -> radicale.Application:
    configuration = config.load()
    configuration.update(
        {
            "storage": {"type": "bookdav.plugins.storage", "url": database_url},
            "auth": {"type": "none"},
            "rights": {"type": "owner_only"},
            "logging": {"level": "warning", "mask_passwords": "True"},
        },
        "bookdav tests",
        privileged=True,
    )
    return radicale.Application(configuration)


@pytest.fixture
def client(database: Database) -> Iterator[Client]:  # noqa: F811
    app = radicale_app(database.url)
    client = Client(app)
    response = client.request(
        "MKCALENDAR",
        CALENDAR,
        """<?xml version="1.0"?><C:mkcalendar xmlns:D="DAV:"
        xmlns:C="urn:ietf:params:xml:ns:caldav"><D:set><D:prop>
        <D:displayname>Cal</D:displayname></D:prop></D:set></C:mkcalendar>""",
    )
    assert response.status == 201, response.text
    yield client


def timed(uid: str, start: str, end: str, *extra: str) -> str:
    return event(uid, f"DTSTART:{start}", f"DTEND:{end}", *extra)


def test_put_get_delete_round_trip(client: Client) -> None:
    text = timed("one", "20240110T090000Z", "20240110T100000Z", "SUMMARY:Haircut")
    created = client.put("one.ics", text)
    assert created.status == 201
    got = client.request("GET", CALENDAR + "one.ics")
    assert got.status == 200 and "SUMMARY:Haircut" in got.text
    assert got.headers["ETag"] == created.headers["ETag"]
    updated = client.put(
        "one.ics", text.replace("Haircut", "Shave"), IF_MATCH=created.headers["ETag"]
    )
    assert updated.status in (201, 204)
    assert client.put("one.ics", text, IF_MATCH=created.headers["ETag"]).status == 412
    assert client.request("DELETE", CALENDAR + "one.ics").status == 200
    assert client.request("GET", CALENDAR + "one.ics").status == 404
    assert client.request("DELETE", CALENDAR + "one.ics").status == 404


def test_calendar_query_with_a_time_range_returns_overlapping_events(client: Client) -> None:
    client.put("in.ics", timed("in", "20240110T090000Z", "20240110T100000Z"))
    client.put("out.ics", timed("out", "20240120T090000Z", "20240120T100000Z"))
    assert client.query("20240110T000000Z", "20240111T000000Z") == {CALENDAR + "in.ics"}


def test_sync_collection_reports_changes_and_deletions(client: Client) -> None:
    client.put("a.ics", timed("a", "20240110T090000Z", "20240110T100000Z"))
    first = client.sync()
    assert first.status == 207
    token = first.xml().findtext(f"{DAV}sync-token")
    assert token and found_hrefs(first) == {CALENDAR + "a.ics"}
    client.put("b.ics", timed("b", "20240111T090000Z", "20240111T100000Z"))
    second = client.sync(token)
    token = second.xml().findtext(f"{DAV}sync-token")
    assert found_hrefs(second) == {CALENDAR + "b.ics"}
    client.request("DELETE", CALENDAR + "a.ics")
    third = client.sync(token or "")
    assert "404" in status_by_href(third)[CALENDAR + "a.ics"]
    unchanged = client.sync(third.xml().findtext(f"{DAV}sync-token") or "")
    assert status_by_href(unchanged) == {}


@pytest.mark.parametrize(
    "token", ["http://bookdav.org/ns/sync/nonsense", "http://radicale.org/ns/sync/abc"]
)
def test_an_invalid_sync_token_gets_the_valid_sync_token_precondition(
    client: Client, token: str
) -> None:
    response = client.sync(token)
    assert response.status == 403
    assert "valid-sync-token" in response.text


def test_a_uid_clash_is_a_409_no_uid_conflict(client: Client) -> None:
    client.put("a.ics", timed("same", "20240110T090000Z", "20240110T100000Z"))
    clash = client.put("b.ics", timed("same", "20240111T090000Z", "20240111T100000Z"))
    assert clash.status == 409
    assert "no-uid-conflict" in clash.text


def test_non_ascii_hrefs_round_trip(client: Client) -> None:
    href = "Zahnärzt-予約 ✓.ics"
    assert client.put(href, timed("u", "20240110T090000Z", "20240110T100000Z")).status == 201
    assert client.request("GET", CALENDAR + href).status == 200
    assert client.query("20240110T000000Z", "20240111T000000Z") == {CALENDAR + href}
    listing = client.request("PROPFIND", CALENDAR, DEPTH="1")
    assert CALENDAR + quote(href) in listing.text or CALENDAR + href in unquote(listing.text)


def test_recurring_events_with_exdate_and_override_in_and_beyond_the_horizon(
    client: Client,
) -> None:
    # Weekly on Mondays from 2024; the horizon is now + 2 years, so 2035 is beyond it.
    text = vcalendar(
        vevent(
            "weekly",
            "DTSTART:20240101T090000Z",
            "DTEND:20240101T100000Z",
            "RRULE:FREQ=WEEKLY",
            "EXDATE:20240108T090000Z",
            "EXDATE:20350108T090000Z",
        ),
        vevent(
            "weekly",
            "RECURRENCE-ID:20240115T090000Z",
            "DTSTART:20240117T090000Z",
            "DTEND:20240117T100000Z",
        ),
        vevent(
            "weekly",
            "RECURRENCE-ID:20350115T090000Z",
            "DTSTART:20350117T090000Z",
            "DTEND:20350117T100000Z",
        ),
    )
    assert client.put("weekly.ics", text).status == 201
    href = {CALENDAR + "weekly.ics"}
    assert client.query("20240101T000000Z", "20240102T000000Z") == href
    assert client.query("20240108T000000Z", "20240109T000000Z") == set()  # EXDATE
    assert client.query("20240115T000000Z", "20240116T000000Z") == set()  # moved away...
    assert client.query("20240117T000000Z", "20240118T000000Z") == href  # ...to here
    assert client.query("20350101T000000Z", "20350102T000000Z") == href
    assert client.query("20350108T000000Z", "20350109T000000Z") == set()
    assert client.query("20350115T000000Z", "20350116T000000Z") == set()
    assert client.query("20350117T000000Z", "20350118T000000Z") == href


def test_all_day_and_floating_events_are_found(client: Client) -> None:
    client.put("day.ics", event("day", "DTSTART;VALUE=DATE:20240110", "DTEND;VALUE=DATE:20240111"))
    client.put("float.ics", timed("float", "20240112T090000", "20240112T100000"))
    day = {CALENDAR + "day.ics"}
    assert client.query("20240110T120000Z", "20240110T130000Z") == day
    assert client.query("20240111T000000Z", "20240111T120000Z") == set()
    assert client.query("20240112T083000Z", "20240112T093000Z") == {CALENDAR + "float.ics"}


def test_free_busy_report_lists_busy_time(client: Client) -> None:
    client.put("b.ics", timed("b", "20240110T090000Z", "20240110T100000Z"))
    client.put("f.ics", timed("f", "20240110T110000Z", "20240110T120000Z", "TRANSP:TRANSPARENT"))
    body = """<?xml version="1.0"?><C:free-busy-query xmlns:C="urn:ietf:params:xml:ns:caldav">
    <C:time-range start="20240110T000000Z" end="20240111T000000Z"/></C:free-busy-query>"""
    response = client.request("REPORT", CALENDAR, body, DEPTH="1")
    assert response.status == 200
    assert "20240110T090000Z/20240110T100000Z" in response.text


def test_collection_ctag_changes_with_its_content(client: Client) -> None:
    def ctag() -> str:
        body = """<?xml version="1.0"?><D:propfind xmlns:D="DAV:"
        xmlns:CS="http://calendarserver.org/ns/"><D:prop><CS:getctag/></D:prop></D:propfind>"""
        response = client.request("PROPFIND", CALENDAR, body, DEPTH="0")
        return response.xml().findtext(".//{http://calendarserver.org/ns/}getctag") or ""

    before = ctag()
    client.put("a.ics", timed("a", "20240110T090000Z", "20240110T100000Z"))
    assert ctag() not in ("", before)


def test_nested_locks_reuse_the_outer_transaction(client: Client) -> None:
    storage = client.app._storage
    assert isinstance(storage, Storage)
    with storage.acquire_lock("r", "alice"), storage.acquire_lock("r", "alice", path=CALENDAR):
        assert next(iter(storage.discover(CALENDAR))).path == "alice/cal"
    with storage.acquire_lock("w", "alice", path=CALENDAR), storage.acquire_lock("r", "alice"):
        assert next(iter(storage.discover(CALENDAR))).path == "alice/cal"


def test_a_write_lock_excludes_another_writer_of_the_same_principal(client: Client) -> None:
    storage = client.app._storage
    order: list[str] = []

    def second_writer() -> None:
        with storage.acquire_lock("w", "alice", path=CALENDAR):
            order.append("second")

    with storage.acquire_lock("w", "alice", path=CALENDAR):
        thread = threading.Thread(target=second_writer)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
