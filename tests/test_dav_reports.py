"""The REPORT fast paths (bookdav.server.dav_reports) answer as Radicale itself would.

Each comparison runs the same REPORT twice over the same data: through the server, where the fast
path answers, and through a stock `radicale.Application` over bookdav's storage plugin in this
process, which is what the mount answers without the fast path.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import radicale
import radicale.config
import requests

from bookdav.server import dav_reports
from bookdav.server.dav import call_radicale
from bookdav.storage import calendars
from bookdav.storage.db import database_for
from tests.conftest import RunningServer

DAV = "{DAV:}"
CALDAV = "{urn:ietf:params:xml:ns:caldav}"
WEEK = ("20310602T000000Z", "20310609T000000Z")

# vobject keeps one tzinfo per TZID for the whole process, the last VTIMEZONE it read: other tests'
# Europe/Berlin definitions in the server would change these events' expansion under the
# comparison, so the events name a TZID of their own (the calendar-timezone an IANA one).
EVENT_TZID = "bookdav-tests/Berlin"


def berlin(tzid: str) -> str:
    return BERLIN.replace("TZID:Europe/Berlin", f"TZID:{tzid}")


BERLIN = (
    "BEGIN:VTIMEZONE\r\nTZID:Europe/Berlin\r\n"
    "BEGIN:DAYLIGHT\r\nTZOFFSETFROM:+0100\r\nTZOFFSETTO:+0200\r\nTZNAME:CEST\r\n"
    "DTSTART:19700329T020000\r\nRRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU\r\nEND:DAYLIGHT\r\n"
    "BEGIN:STANDARD\r\nTZOFFSETFROM:+0200\r\nTZOFFSETTO:+0100\r\nTZNAME:CET\r\n"
    "DTSTART:19701025T030000\r\nRRULE:FREQ=YEARLY;BYMONTH=10;BYDAY=-1SU\r\nEND:STANDARD\r\n"
    "END:VTIMEZONE\r\n"
)


def calendar(*components: str, timezones: str = "") -> str:
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bookdav tests//EN\r\n"
        + timezones
        + "".join(components)
        + "END:VCALENDAR\r\n"
    )


def vevent(uid: str, *lines: str) -> str:
    body = "".join(f"{line}\r\n" for line in lines)
    return f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20300101T000000Z\r\n{body}END:VEVENT\r\n"


# Every shape the fast paths treat differently, all touching the week 2031-06-02..09.
EVENTS: dict[str, str] = {
    "single": calendar(
        vevent("single", "DTSTART:20310603T090000Z", "DTEND:20310603T100000Z", "SUMMARY:One")
    ),
    "weekly-exdate-override": calendar(
        vevent(
            "weekly",
            "DTSTART:20310505T080000Z",
            "DTEND:20310505T090000Z",
            "RRULE:FREQ=WEEKLY;COUNT=10",
            "EXDATE:20310526T080000Z",
            "SUMMARY:Weekly",
        ),
        vevent(
            "weekly",
            "RECURRENCE-ID:20310602T080000Z",
            "DTSTART:20310602T120000Z",
            "DTEND:20310602T130000Z",
            "SUMMARY:Moved",
        ),
    ),
    "weekly-exdate-in-week": calendar(
        vevent(
            "weekly2",
            "DTSTART:20310506T070000Z",
            "DTEND:20310506T071500Z",
            "RRULE:FREQ=WEEKLY;COUNT=10",
            "EXDATE:20310603T070000Z",
            "SUMMARY:Skipped this week",
        )
    ),
    "berlin-daily-with-alarm": calendar(
        vevent(
            "berlin",
            f"DTSTART;TZID={EVENT_TZID}:20310530T170000",
            f"DTEND;TZID={EVENT_TZID}:20310530T173000",
            "RRULE:FREQ=DAILY;COUNT=15",
            "SUMMARY:Evening, in Berlin",
            "BEGIN:VALARM\r\nACTION:DISPLAY\r\nDESCRIPTION:Soon\r\nTRIGGER:-PT10M\r\nEND:VALARM",
            "CATEGORIES:work",
        ),
        timezones=berlin(EVENT_TZID),
    ),
    "berlin-single": calendar(
        vevent(
            "berlin-single",
            f"DTSTART;TZID={EVENT_TZID}:20310604T230000",
            f"DTEND;TZID={EVENT_TZID}:20310605T010000",
        ),
        timezones=berlin(EVENT_TZID),
    ),
    "all-day": calendar(
        vevent("allday", "DTSTART;VALUE=DATE:20310605", "DTEND;VALUE=DATE:20310606")
    ),
    "all-day-weekly": calendar(
        vevent("allday-weekly", "DTSTART;VALUE=DATE:20310520", "RRULE:FREQ=WEEKLY;COUNT=5")
    ),
    "transparent": calendar(
        vevent("transp", "DTSTART:20310604T090000Z", "DTEND:20310604T100000Z", "TRANSP:TRANSPARENT")
    ),
    "cancelled": calendar(
        vevent(
            "cancelled", "DTSTART:20310604T110000Z", "DTEND:20310604T120000Z", "STATUS:CANCELLED"
        )
    ),
    "tentative": calendar(
        vevent(
            "tentative", "DTSTART:20310604T130000Z", "DTEND:20310604T140000Z", "STATUS:TENTATIVE"
        )
    ),
    "at-range-end": calendar(
        vevent("at-end", "DTSTART:20310609T000000Z", "DTEND:20310609T010000Z")
    ),
    "weekly-at-range-end": calendar(
        vevent(
            "weekly-at-end",
            "DTSTART:20310526T000000Z",
            "DTEND:20310526T003000Z",
            "RRULE:FREQ=WEEKLY;COUNT=4",
        )
    ),
    "across-range-start": calendar(
        vevent("across", "DTSTART:20310601T200000Z", "DTEND:20310602T020000Z")
    ),
    "open-daily": calendar(
        vevent("open", "DTSTART:20300101T060000Z", "DTEND:20300101T061000Z", "RRULE:FREQ=DAILY")
    ),
    "floating": calendar(vevent("floating", "DTSTART:20310606T100000", "DTEND:20310606T110000")),
    "outside": calendar(vevent("outside", "DTSTART:20310701T100000Z", "DTEND:20310701T110000Z")),
    "overlapping-busy": calendar(
        vevent("overlap", "DTSTART:20310603T093000Z", "DTEND:20310603T103000Z")
    ),
}


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def free_busy_body(start: str, end: str) -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<C:free-busy-query xmlns:C="urn:ietf:params:xml:ns:caldav">'
        f'<C:time-range start="{start}" end="{end}"/></C:free-busy-query>'
    )


def expand_body(start: str, end: str, props: str = "<D:getetag/>") -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<C:calendar-query xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
        f'<D:prop>{props}<C:calendar-data><C:expand start="{start}" end="{end}"/>'
        "</C:calendar-data></D:prop>"
        '<C:filter><C:comp-filter name="VCALENDAR"><C:comp-filter name="VEVENT">'
        f'<C:time-range start="{start}" end="{end}"/>'
        "</C:comp-filter></C:comp-filter></C:filter></C:calendar-query>"
    )


class Calendar:
    """A calendar of one provider on the running server, filled over CalDAV."""

    def __init__(self, dav_server: RunningServer, username: str, name: str) -> None:
        self.server = dav_server
        self.username = username
        self.path = f"/dav/{username}/{name}/"
        self.auth = basic(username, dav_server.passwords[username])

    def request(
        self, method: str, path: str = "", body: str = "", **headers: str
    ) -> requests.Response:
        return requests.request(
            method,
            self.server.base_url + (path or self.path),
            data=body.encode(),
            headers={"Authorization": self.auth, **headers},
            timeout=30,
        )

    def put(self, name: str, text: str) -> None:
        response = self.request(
            "PUT", f"{self.path}{name}.ics", text, **{"Content-Type": "text/calendar"}
        )
        assert response.status_code in (201, 204), response.text


def make_calendar(server: RunningServer, username: str, name: str, props: str = "") -> Calendar:
    cal = Calendar(server, username, name)
    body = (
        '<?xml version="1.0" encoding="utf-8"?>'
        '<C:mkcalendar xmlns:D="DAV:" xmlns:C="urn:ietf:params:xml:ns:caldav">'
        f"<D:set><D:prop><D:displayname>{name}</D:displayname>{props}</D:prop></D:set>"
        "</C:mkcalendar>"
    )
    assert cal.request("MKCALENDAR", body=body).status_code == 201
    return cal


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def dav_server(request: pytest.FixtureRequest) -> RunningServer:
    """The session's server on SQLite, and on PostgreSQL where BOOKDAV_TEST_DATABASE_URL is set."""
    name = "server" if request.param == "sqlite" else "pg_server"
    running: RunningServer = request.getfixturevalue(name)
    return running


@pytest.fixture(scope="module")
def stock_radicale(dav_server: RunningServer) -> radicale.Application:
    """Radicale over the same database through bookdav's plugins: the mount minus the fast path."""
    url = dav_server.database_url
    configuration = radicale.config.load()
    configuration.update(
        {
            "auth": {"type": "bookdav.plugins.auth", "url": url},
            "rights": {"type": "bookdav.plugins.rights", "url": url},
            "storage": {"type": "bookdav.plugins.storage", "url": url},
            "web": {"type": "none"},
        },
        "tests",
        privileged=True,
    )
    return radicale.Application(configuration)


def radicale_answer(
    application: radicale.Application, cal: Calendar, body: str, path: str = ""
) -> tuple[int, str]:
    raw = body.encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "REPORT",
        "SCRIPT_NAME": "/dav",
        "PATH_INFO": (path or cal.path)[len("/dav") :],
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(raw)),
        "CONTENT_TYPE": "application/xml; charset=utf-8",
        "HTTP_AUTHORIZATION": cal.auth,
        "HTTP_DEPTH": "1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(raw),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    status, _, answer = call_radicale(application, environ)
    return status, answer.decode()


@pytest.fixture(scope="module")
def provider(dav_server: RunningServer) -> str:
    return dav_server.add_user("provider")


@pytest.fixture(scope="module", params=["utc", "berlin"])
def filled(request: pytest.FixtureRequest, dav_server: RunningServer, provider: str) -> Calendar:
    """One calendar in UTC and one whose calendar-timezone is Europe/Berlin, both with EVENTS."""
    props = (
        ""
        if request.param == "utc"
        else f"<C:calendar-timezone>{calendar(timezones=BERLIN)}</C:calendar-timezone>"
    )
    cal = make_calendar(dav_server, provider, f"reports-{request.param}", props)
    for name, text in EVENTS.items():
        cal.put(name, text)
    return cal


def without_dtstamp(text: str) -> str:
    return re.sub(r"\r\nDTSTAMP:[^\r]*", "", text)


def responses(multistatus: str) -> dict[str, dict[str, str]]:
    """href -> {property tag: text} of every found property of a multistatus."""
    found: dict[str, dict[str, str]] = {}
    for response in ET.fromstring(multistatus).iter(f"{DAV}response"):
        href = response.findtext(f"{DAV}href") or ""
        props: dict[str, str] = {}
        for propstat in response.iter(f"{DAV}propstat"):
            status = propstat.findtext(f"{DAV}status") or ""
            for prop in propstat.iter(f"{DAV}prop"):
                for child in prop:
                    props[child.tag] = f"{status}|{child.text or ''}"
        found[href] = props
    return found


# --- answers agree with Radicale's ---------------------------------------------------------------


@pytest.mark.parametrize(
    "window",
    [WEEK, ("20310601T000000Z", "20310630T000000Z"), ("20310603T093000Z", "20310603T094500Z")],
)
def test_free_busy_equals_radicales_answer(
    filled: Calendar, stock_radicale: radicale.Application, window: tuple[str, str]
) -> None:
    body = free_busy_body(*window)
    fast = filled.request("REPORT", body=body, Depth="1")
    status, expected = radicale_answer(stock_radicale, filled, body)
    assert fast.status_code == status == 200
    assert fast.headers["Content-Type"] == "text/calendar; charset=utf-8"
    assert without_dtstamp(fast.text) == without_dtstamp(expected)
    assert "FBTYPE=BUSY-TENTATIVE" in expected or window[0] != WEEK[0]


@pytest.mark.parametrize(
    "window",
    [WEEK, ("20310601T000000Z", "20310630T000000Z"), ("20310604T000000Z", "20310605T000000Z")],
)
@pytest.mark.parametrize(
    "props", ["<D:getetag/>", "", "<D:getcontenttype/><D:displayname/>", "<D:getetag/><D:getetag/>"]
)
def test_expanded_calendar_query_equals_radicales_answer(
    filled: Calendar, stock_radicale: radicale.Application, window: tuple[str, str], props: str
) -> None:
    body = expand_body(*window, props=props)
    fast = filled.request("REPORT", body=body, Depth="1")
    status, expected = radicale_answer(stock_radicale, filled, body)
    assert fast.status_code == status == 207
    assert responses(fast.text) == responses(expected)
    assert responses(expected)  # the window is not empty


@pytest.mark.parametrize("window", [WEEK, ("20310604T000000Z", "20310605T000000Z")])
def test_plain_calendar_query_equals_radicales_answer(
    filled: Calendar, stock_radicale: radicale.Application, window: tuple[str, str]
) -> None:
    body = expand_body(*window, props="<D:getetag/>").replace(
        f'<C:expand start="{window[0]}" end="{window[1]}"/>', ""
    )
    fast = filled.request("REPORT", body=body, Depth="1")
    status, expected = radicale_answer(stock_radicale, filled, body)
    assert fast.status_code == status == 207
    assert responses(fast.text) == responses(expected)
    assert f"{filled.path}open-daily.ics" in responses(expected)


def sync_body(token: str, props: str = "<D:getetag/>") -> str:
    return (
        '<?xml version="1.0" encoding="utf-8"?><D:sync-collection xmlns:D="DAV:">'
        f"<D:sync-token>{token}</D:sync-token><D:sync-level>1</D:sync-level>"
        f"<D:prop>{props}</D:prop></D:sync-collection>"
    )


@pytest.mark.parametrize("props", ["<D:getetag/>", "<D:getcontenttype/><D:getetag/>"])
def test_sync_collection_equals_radicales_answer_byte_for_byte(
    dav_server: RunningServer, provider: str, stock_radicale: radicale.Application, props: str
) -> None:
    cal = make_calendar(dav_server, provider, f"sync-{uuid.uuid4().hex[:6]}")
    for name in ("single", "all-day", "berlin-single"):
        cal.put(name, EVENTS[name])
    full = cal.request("REPORT", body=sync_body("", props), Depth="0")
    assert full.status_code == 207
    assert full.text == radicale_answer(stock_radicale, cal, sync_body("", props))[1]
    token = ET.fromstring(full.content).findtext(f"{DAV}sync-token") or ""

    cal.put("tentative", EVENTS["tentative"])
    assert cal.request("DELETE", f"{cal.path}all-day.ics").status_code in (200, 204)
    changed = cal.request("REPORT", body=sync_body(token, props), Depth="0")
    assert changed.text == radicale_answer(stock_radicale, cal, sync_body(token, props))[1]
    assert "404 Not Found" in changed.text and "tentative.ics" in changed.text
    assert "single.ics" not in changed.text


def test_invalid_sync_token_is_radicales_403(filled: Calendar) -> None:
    response = filled.request("REPORT", body=sync_body("http://bookdav.org/ns/sync/nonsense"))
    assert response.status_code == 403
    assert "valid-sync-token" in response.text


def test_expanded_instances_are_the_expected_ones(filled: Calendar) -> None:
    answer = responses(filled.request("REPORT", body=expand_body(*WEEK), Depth="1").text)
    data = {
        href.rsplit("/", 1)[1]: props[f"{CALDAV}calendar-data"] for href, props in answer.items()
    }
    assert "outside.ics" not in data
    # Override moved to 12:00, EXDATE'd instance of the other series gone.
    assert "RECURRENCE-ID:20310602T080000Z" in data["weekly-exdate-override.ics"]
    assert "DTSTART:20310602T120000Z" in data["weekly-exdate-override.ics"]
    assert "weekly-exdate-in-week.ics" not in data
    # Radicale includes an instance starting exactly at the end of the range; so do we.
    assert "DTSTART:20310609T000000Z" in data["weekly-at-range-end.ics"]
    berlin = data["berlin-daily-with-alarm.ics"]
    assert berlin.count("BEGIN:VEVENT") == 7 and "VTIMEZONE" not in berlin
    assert "DTSTART:20310602T150000Z" in berlin and "BEGIN:VALARM" in berlin


def test_plain_items_are_expanded_without_radicale(
    dav_server: RunningServer, filled: Calendar
) -> None:
    """The template path (no vobject) covers UTC and VTIMEZONE series, alarms included, and
    writes what Radicale's `_expand` writes, byte for byte."""
    from radicale.app import report as radicale_report

    query = dav_reports.recognise(expand_body(*WEEK).encode())
    assert isinstance(query, dav_reports.CalendarQuery)
    assert query.expand_start is not None and query.expand_end is not None
    path = filled.path.strip("/").split("/", 1)[1]
    with database_for(dav_server.database_url).read() as conn:
        collection = calendars.get_collection(conn, path)
        assert collection is not None
        indexed = dav_reports.instances_in_range(conn, collection, 0, 2**40)
        stored = {s.href: s for s, _ in calendars.items_in_range(conn, collection, 0, 2**40)}
    for name in ("single", "berlin-daily-with-alarm", "berlin-single", "weekly-at-range-end"):
        item = stored[f"{name}.ics"]
        fast = dav_reports._template_expansion(item, indexed[item.id], query, 2**40, 0)
        assert fast is not None, name
        element = ET.Element("x")
        expected, count = radicale_report._expand(
            element,
            dav_reports._radicale_item(collection, item),
            query.expand_start,
            query.expand_end,
            query.range_start,
            query.range_end,
        )
        assert fast == (expected.text, count), name


def test_fast_functions_themselves_answer_as_radicale(
    dav_server: RunningServer, filled: Calendar, stock_radicale: radicale.Application
) -> None:
    """The same comparisons on the fast functions called directly, so a silent fall-through in
    the HTTP handler could not make the tests above pass on Radicale's answer alone."""
    path = filled.path.strip("/").split("/", 1)[1]
    free_busy = dav_reports.recognise(free_busy_body(*WEEK).encode())
    expand = dav_reports.recognise(expand_body(*WEEK).encode())
    assert isinstance(free_busy, dav_reports.FreeBusyQuery)
    assert isinstance(expand, dav_reports.CalendarQuery)
    with database_for(dav_server.database_url).read() as conn:
        collection = calendars.get_collection(conn, path)
        assert collection is not None
        text = dav_reports.free_busy_text(conn, collection, free_busy, 10000)
        multistatus = dav_reports.calendar_query_multistatus(
            conn, collection, expand, "/dav", 10000
        )
    _, expected_text = radicale_answer(stock_radicale, filled, free_busy_body(*WEEK))
    _, expected_xml = radicale_answer(stock_radicale, filled, expand_body(*WEEK))
    assert without_dtstamp(text) == without_dtstamp(expected_text)
    assert responses(multistatus.decode()) == responses(expected_xml)


# --- who may ask, and what is asked --------------------------------------------------------------


@pytest.mark.parametrize("body", [free_busy_body(*WEEK), expand_body(*WEEK)])
def test_no_credentials_get_401_with_basic_challenge(
    dav_server: RunningServer, filled: Calendar, body: str
) -> None:
    response = requests.request("REPORT", dav_server.base_url + filled.path, data=body, timeout=30)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("body", [free_busy_body(*WEEK), expand_body(*WEEK)])
def test_wrong_password_gets_401(dav_server: RunningServer, filled: Calendar, body: str) -> None:
    response = requests.request(
        "REPORT",
        dav_server.base_url + filled.path,
        data=body,
        headers={"Authorization": basic(filled.username, "not-the-password")},
        timeout=30,
    )
    assert response.status_code == 401


@pytest.mark.parametrize("body", [free_busy_body(*WEEK), expand_body(*WEEK)])
def test_another_users_calendar_is_refused(
    dav_server: RunningServer, filled: Calendar, body: str
) -> None:
    intruder = dav_server.add_user("provider")
    response = requests.request(
        "REPORT",
        dav_server.base_url + filled.path,
        data=body,
        headers={"Authorization": basic(intruder, dav_server.passwords[intruder])},
        timeout=30,
    )
    assert response.status_code in (403, 404)
    assert "BEGIN:V" not in response.text


@pytest.mark.parametrize(
    "body",
    [
        "<C:free-busy-query xmlns:C='urn:ietf:params:xml:ns:caldav'><C:time-range",
        "not xml at all",
        free_busy_body("2031-06-02", "20310609T000000Z"),
        expand_body("20310602T000000Z", "junk"),
    ],
)
def test_bad_requests_get_400_not_500(filled: Calendar, body: str) -> None:
    response = filled.request("REPORT", body=body, Depth="1")
    assert response.status_code == 400


def test_expansion_over_radicales_limit_is_its_400(
    dav_server: RunningServer, provider: str, stock_radicale: radicale.Application
) -> None:
    """6,000 hourly instances, counted once for getetag and once for calendar-data, pass
    Radicale's max_expand_occurrence (10,000): both answer 400, the fast path without expanding."""
    cal = make_calendar(dav_server, provider, f"limit-{uuid.uuid4().hex[:6]}")
    cal.put(
        "hourly",
        calendar(
            vevent(
                "hourly",
                "DTSTART:20310101T000000Z",
                "DTEND:20310101T001000Z",
                "RRULE:FREQ=HOURLY;COUNT=6000",
            )
        ),
    )
    body = expand_body("20310101T000000Z", "20320101T000000Z", props="<D:getetag/>")
    assert cal.request("REPORT", body=body, Depth="1").status_code == 400
    assert radicale_answer(stock_radicale, cal, body)[0] == 400
    one_day = expand_body("20310301T000000Z", "20310302T000000Z", props="<D:getetag/>")
    assert cal.request("REPORT", body=one_day, Depth="1").status_code == 207


def test_missing_calendar_is_404(filled: Calendar) -> None:
    response = filled.request(
        "REPORT", f"/dav/{filled.username}/no-such-calendar/", free_busy_body(*WEEK), Depth="1"
    )
    assert response.status_code == 404


def test_gzip_is_honoured_like_radicale(filled: Calendar) -> None:
    response = filled.request("REPORT", body=free_busy_body(*WEEK), **{"Accept-Encoding": "gzip"})
    assert response.headers.get("Content-Encoding") == "gzip"
    assert "BEGIN:VFREEBUSY" in response.text


def test_free_busy_follows_a_change_at_once(dav_server: RunningServer, provider: str) -> None:
    cal = make_calendar(dav_server, provider, f"changes-{uuid.uuid4().hex[:6]}")
    body = free_busy_body(*WEEK)
    assert "FREEBUSY" not in cal.request("REPORT", body=body).text.replace("VFREEBUSY", "")
    cal.put("new", EVENTS["single"])
    assert (
        "FREEBUSY;FBTYPE=BUSY:20310603T090000Z/20310603T100000Z"
        in cal.request("REPORT", body=body).text
    )
    assert cal.request("DELETE", f"{cal.path}new.ics").status_code in (200, 204)
    assert "FBTYPE" not in cal.request("REPORT", body=body).text


def test_a_plain_query_and_a_sync_collection_answer_whole(filled: Calendar) -> None:
    """A calendar-query without expand (our fast path, see docs/architecture.md) and a
    sync-collection answer every event they should."""
    plain = expand_body(*WEEK).replace(
        '<C:expand start="20310602T000000Z" end="20310609T000000Z"/>', ""
    )
    answer = responses(filled.request("REPORT", body=plain, Depth="1").text)
    assert f"{filled.path}single.ics" in answer
    sync = (
        '<D:sync-collection xmlns:D="DAV:"><D:sync-token/><D:sync-level>1</D:sync-level>'
        "<D:prop><D:getetag/></D:prop></D:sync-collection>"
    )
    assert len(responses(filled.request("REPORT", body=sync).text)) == len(EVENTS)


def test_remembered_answers_follow_a_changed_event(
    dav_server: RunningServer, provider: str
) -> None:
    """Free-busy facts and expansions are remembered per ETag: asking twice, changing the event
    (moved, then made transparent), and asking again gives the new answer, never the old."""
    cal = make_calendar(dav_server, provider, f"memo-{uuid.uuid4().hex[:6]}")
    weekly = vevent(
        "memo@test",
        "DTSTART:20310602T090000Z",
        "DTEND:20310602T100000Z",
        "RRULE:FREQ=WEEKLY;COUNT=3",
    )
    cal.put("memo", calendar(weekly))
    free_busy, expand = free_busy_body(*WEEK), expand_body(*WEEK)
    for _ in range(2):
        assert "20310602T090000Z/20310602T100000Z" in cal.request("REPORT", body=free_busy).text
        assert "DTSTART:20310602T090000Z" in cal.request("REPORT", body=expand, Depth="1").text
    moved = weekly.replace("T090000Z", "T140000Z").replace("T100000Z", "T150000Z")
    cal.put("memo", calendar(moved))
    assert "20310602T140000Z/20310602T150000Z" in cal.request("REPORT", body=free_busy).text
    expanded = cal.request("REPORT", body=expand, Depth="1").text
    assert "DTSTART:20310602T140000Z" in expanded and "T090000Z" not in expanded
    cal.put("memo", calendar(moved.replace("END:VEVENT", "TRANSP:TRANSPARENT\r\nEND:VEVENT")))
    assert "FBTYPE" not in cal.request("REPORT", body=free_busy).text


def plain_body(start: str, end: str, props: str = "<D:getetag/><C:calendar-data/>") -> str:
    return expand_body(start, end, props="").replace(
        f'<C:calendar-data><C:expand start="{start}" end="{end}"/></C:calendar-data>', props
    )


@pytest.mark.parametrize("kind", ["plain", "expand", "free-busy"])
def test_a_put_or_delete_is_seen_by_the_next_report(
    dav_server: RunningServer, provider: str, kind: str
) -> None:
    """Each item's response is remembered under its ETag: a PUT of new text under the same href
    and a DELETE show in the very next REPORT, after the old answer was remembered."""
    cal = make_calendar(dav_server, provider, f"fresh-{uuid.uuid4().hex[:6]}")
    body = {
        "plain": plain_body(*WEEK),
        "expand": expand_body(*WEEK, props="<D:getetag/>"),
        "free-busy": free_busy_body(*WEEK),
    }[kind]
    before = vevent("fresh", "DTSTART:20310603T090000Z", "DTEND:20310603T100000Z", "SUMMARY:Before")
    cal.put("fresh", calendar(before))
    for _ in range(2):
        answer = cal.request("REPORT", body=body, Depth="1").text
        assert "20310603T090000Z" in answer
    after = before.replace("T090000Z", "T140000Z").replace("T100000Z", "T150000Z")
    cal.put("fresh", calendar(after.replace("SUMMARY:Before", "SUMMARY:After")))
    answer = cal.request("REPORT", body=body, Depth="1").text
    assert "20310603T140000Z" in answer and "20310603T090000Z" not in answer
    if kind != "free-busy":
        assert "SUMMARY:After" in answer and "SUMMARY:Before" not in answer
        etag = cal.request("PROPFIND", f"{cal.path}fresh.ics", Depth="0").text
        assert re.search(r"<getetag>([^<]*)</getetag>", etag)
        found = responses(answer)[f"{cal.path}fresh.ics"][f"{DAV}getetag"]
        assert found.endswith("|" + ET.fromstring(etag).findtext(f".//{DAV}getetag", ""))
    assert cal.request("DELETE", f"{cal.path}fresh.ics").status_code in (200, 204)
    answer = cal.request("REPORT", body=body, Depth="1").text
    assert "fresh.ics" not in answer and "20310603T" not in answer


@pytest.mark.parametrize("kind", ["plain", "expand"])
def test_a_remembered_answer_gives_way_to_a_write_from_another_process(
    dav_server: RunningServer, provider: str, kind: str
) -> None:
    """A calendar-query asked twice is answered whole from memory the second time; an event
    written straight into the database (as a second bookdav process or the booking engine
    writes, unseen by this server) is in the very next answer: the calendar's revision, read in
    the answering snapshot, is part of what the answer is remembered under."""
    name = f"elsewhere-{uuid.uuid4().hex[:6]}"
    cal = make_calendar(dav_server, provider, name)
    body = plain_body(*WEEK) if kind == "plain" else expand_body(*WEEK)
    cal.put("first", EVENTS["single"])
    for _ in range(2):
        assert list(responses(cal.request("REPORT", body=body, Depth="1").text)) == [
            f"{cal.path}first.ics"
        ]
    text = calendar(vevent("second", "DTSTART:20310604T090000Z", "DTEND:20310604T100000Z"))
    database = database_for(dav_server.database_url)
    with database.write([provider]) as conn:
        collection = calendars.get_collection(conn, f"{provider}/{name}")
        assert collection is not None
        calendars.put_item(conn, collection, "second.ics", text)
    answer = responses(cal.request("REPORT", body=body, Depth="1").text)
    assert sorted(answer) == [f"{cal.path}first.ics", f"{cal.path}second.ics"]


def test_same_event_in_two_calendars_answers_with_each_ones_href(
    dav_server: RunningServer, provider: str
) -> None:
    """Remembered responses hold the href: the same text under the same name in two calendars
    (one ETag) is answered with each calendar's own path."""
    first = make_calendar(dav_server, provider, f"twin-a-{uuid.uuid4().hex[:6]}")
    second = make_calendar(dav_server, provider, f"twin-b-{uuid.uuid4().hex[:6]}")
    for cal in (first, second):
        cal.put("twin", EVENTS["single"])
    for body in (plain_body(*WEEK), expand_body(*WEEK)):
        for cal in (first, second, first):
            answer = responses(cal.request("REPORT", body=body, Depth="1").text)
            assert list(answer) == [f"{cal.path}twin.ics"]


def test_remembered_fragments_answer_as_radicale_reading_only_uncertain_texts(
    dav_server: RunningServer,
    filled: Calendar,
    stock_radicale: radicale.Application,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked twice, plain and expanded calendar-queries and free-busy answer as Radicale both
    times; the second time, only the texts Radicale's own code must read are read (the open daily
    series past the indexed horizon; for expand, what the template path leaves to Radicale: DATE
    and floating times, overrides): everything else comes from remembered fragments."""
    path = filled.path.strip("/").split("/", 1)[1]
    read: list[list[int]] = []
    items_by_id = calendars.items_by_id

    def counting(conn: Any, ids: Any) -> dict[int, calendars.StoredItem]:
        read.append(list(ids))
        return items_by_id(conn, ids)

    bodies = {
        "plain": plain_body(*WEEK),
        "expand": expand_body(*WEEK, props="<D:getetag/><C:calendar-data/>"),
        "free-busy": free_busy_body(*WEEK),
    }
    radicales = {"open-daily.ics", "all-day.ics", "all-day-weekly.ics", "floating.ics"}
    still_read = {
        "plain": {"open-daily.ics"},
        "expand": radicales | {"weekly-exdate-override.ics"},
        "free-busy": radicales | {"tentative.ics", "cancelled.ics"},
    }
    database = database_for(dav_server.database_url)
    for kind, body in bodies.items():
        query = dav_reports.recognise(body.encode())
        _, expected = radicale_answer(stock_radicale, filled, body)
        for attempt in range(2):
            read.clear()
            monkeypatch.setattr(calendars, "items_by_id", counting)
            with database.read() as conn:
                collection = calendars.get_collection(conn, path)
                assert collection is not None
                if isinstance(query, dav_reports.FreeBusyQuery):
                    answer = dav_reports.free_busy_text(conn, collection, query, 10000)
                    assert without_dtstamp(answer) == without_dtstamp(expected), kind
                else:
                    assert isinstance(query, dav_reports.CalendarQuery)
                    multistatus = dav_reports.calendar_query_multistatus(
                        conn, collection, query, "/dav", 10000
                    )
                    assert responses(multistatus.decode()) == responses(expected), kind
                texts = calendars.items_by_id(conn, [i for ids in read for i in ids])
            monkeypatch.setattr(calendars, "items_by_id", items_by_id)
            if attempt == 1:
                assert {stored.href for stored in texts.values()} == still_read[kind]


def test_memo_stays_within_its_budget() -> None:
    memo = dav_reports._Memo(1000)
    for n in range(100):
        memo.put(n, b"x" * 90, 90)
        assert sum(len(value) for value in memo._values.values()) <= 1000
    assert memo.get(99) == b"x" * 90
    assert memo.get(0) is None


def test_free_busy_is_stamped_now_every_time(filled: Calendar) -> None:
    """The VFREEBUSY envelope is rendered once per range; its DTSTAMP is still the moment of
    each answer."""
    for _ in range(2):
        answer = filled.request("REPORT", body=free_busy_body(*WEEK), Depth="1").text
        found = re.search(r"\r\nDTSTAMP:(\d{8}T\d{6}Z)\r\n", answer)
        assert found, answer
        stamped = dt.datetime.strptime(found.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        assert abs((dt.datetime.now(dt.UTC) - stamped).total_seconds()) < 5
        time.sleep(1.1)


def test_free_busy_limit_counts_instances_per_item(
    dav_server: RunningServer, filled: Calendar
) -> None:
    """Radicale's max_freebusy_occurrence is per item: the daily Berlin series (7 instances in
    the week) reaches a limit of 7 and Radicale answers; at 8 no single item does, though the
    week holds more instances than that in all."""
    path = filled.path.strip("/").split("/", 1)[1]
    query = dav_reports.recognise(free_busy_body(*WEEK).encode())
    assert isinstance(query, dav_reports.FreeBusyQuery)
    with database_for(dav_server.database_url).read() as conn:
        collection = calendars.get_collection(conn, path)
        assert collection is not None
        with pytest.raises(dav_reports.FallThrough):
            dav_reports.free_busy_text(conn, collection, query, 7)
        limited = dav_reports.free_busy_text(conn, collection, query, 8)
        unlimited = dav_reports.free_busy_text(conn, collection, query, 0)
    assert without_dtstamp(limited) == without_dtstamp(unlimited)
