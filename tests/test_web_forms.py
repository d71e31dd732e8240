"""The HTML forms over plain HTTP: CSRF refusals, cookie flags (Secure behind TLS), dashboard
login failure, rate limits on public POSTs, the cancellation policy, and `serve --demo`."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from bookdav.booking.accounts import add_user
from bookdav.storage.appointments import appointment_by_token
from bookdav.storage.db import database_for
from bookdav.storage.schema import web_sessions
from tests.conftest import RunningServer
from tests.test_appointments import booking_body
from tests.test_availability import make_provider, next_monday, stamp
from tests.web_helpers import BookablePage, Launched, bookable, launch

TOKEN = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


def form_token(html: str) -> str:
    found = TOKEN.search(html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def set_cookies(response: requests.Response) -> dict[str, SimpleCookie]:
    """Each Set-Cookie header parsed, by cookie name."""
    found: dict[str, SimpleCookie] = {}
    for header in response.raw.headers.getlist("Set-Cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        for name in cookie:
            found[name] = cookie
    return found


def test_booking_post_without_or_with_a_forged_csrf_token_is_refused(
    server: RunningServer,
) -> None:
    page = bookable(server)
    session = requests.Session()
    details = session.get(f"{page.url}/details", params={"start": "1", "tz": "UTC"})
    token = form_token(details.text)
    form = {"start": "1", "tz": "UTC", "name": "Eve", "email": "eve@example.org"}

    missing = session.post(f"{page.url}/details", data=form, allow_redirects=False)
    assert missing.status_code == 403
    assert "text/html" in missing.headers["Content-Type"]
    assert "This form has expired" in missing.text

    # A token that belongs to another visitor's cookie does not pass either.
    stranger = requests.get(f"{page.url}/details", params={"start": "1", "tz": "UTC"})
    forged = session.post(
        f"{page.url}/details",
        data={**form, "csrf_token": form_token(stranger.text)},
        allow_redirects=False,
    )
    assert forged.status_code == 403
    no_cookie = requests.post(
        f"{page.url}/details", data={**form, "csrf_token": token}, allow_redirects=False
    )
    assert no_cookie.status_code == 403
    assert token  # the real pair would be accepted: see the browser tests


def test_public_csrf_cookie_is_httponly_and_lax_but_not_secure_over_http(
    server: RunningServer,
) -> None:
    page = bookable(server)
    response = requests.get(page.url)
    cookie = set_cookies(response)["bookdav_csrf"]["bookdav_csrf"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["secure"]


def login(
    session: requests.Session, base_url: str, username: str, password: str
) -> requests.Response:
    token = form_token(session.get(f"{base_url}/app/login").text)
    return session.post(
        f"{base_url}/app/login",
        data={"csrf_token": token, "username": username, "password": password},
        allow_redirects=False,
    )


def test_dashboard_login_failure_and_session_cookie(server: RunningServer) -> None:
    username = server.add_user("provider")
    session = requests.Session()
    wrong = login(session, server.base_url, username, "not the password")
    assert wrong.status_code == 401
    assert "Wrong username or password." in wrong.text
    assert "bookdav_session" not in set_cookies(wrong)

    client = server.add_user("client")
    refused = login(session, server.base_url, client, server.passwords[client])
    assert refused.status_code == 401 and "for providers" in refused.text

    right = login(session, server.base_url, username, server.passwords[username])
    assert right.status_code == 303 and right.headers["Location"] == "/app/"
    cookie = set_cookies(right)["bookdav_session"]["bookdav_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax" and cookie["path"] == "/"
    assert int(cookie["max-age"]) == 12 * 3600
    with database_for(server.database_url).read() as conn:
        stored = conn.execute(select(web_sessions.c.token_hash)).scalars().all()
    assert cookie.value not in stored  # only its hash is kept
    assert session.get(f"{server.base_url}/app/").status_code == 200


def test_dashboard_forms_need_the_session_token(server: RunningServer) -> None:
    username = server.add_user("provider")
    session = requests.Session()
    login(session, server.base_url, username, server.passwords[username])
    page = session.get(f"{server.base_url}/app/hours")
    token = form_token(page.text)
    form = {"MO_open": "on", "MO_start": "08:00", "MO_end": "12:00"}
    refused = session.post(f"{server.base_url}/app/hours", data=form, allow_redirects=False)
    assert refused.status_code == 403
    public = form_token(session.get(f"{server.base_url}/app/login").text)
    assert public != token
    wrong_kind = session.post(
        f"{server.base_url}/app/hours", data={**form, "csrf_token": public}, allow_redirects=False
    )
    assert wrong_kind.status_code == 403
    accepted = session.post(
        f"{server.base_url}/app/hours", data={**form, "csrf_token": token}, allow_redirects=False
    )
    assert accepted.status_code == 303
    # Without a session the dashboard sends the visitor to sign in.
    anonymous = requests.get(f"{server.base_url}/app/hours", allow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["Location"] == "/app/login"


def test_cancelling_inside_the_notice_is_refused_and_names_the_policy(
    server: RunningServer,
) -> None:
    provider = make_provider(server)
    auth = (provider.username, server.passwords[provider.username])
    changed = requests.put(
        f"{server.base_url}/api/v1/services/{provider.service_id}",
        auth=auth,
        json={"rules": {"cancellationNoticeMinutes": 525_600}},
    )
    assert changed.status_code == 200, changed.text
    day = next_monday() + timedelta(days=1)
    raw = stamp(day, 11)
    booked = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json={
            "serviceId": provider.service_id,
            "providerId": provider.user_id,
            "startTime": f"{raw[0:4]}-{raw[4:6]}-{raw[6:8]}T{raw[9:11]}:{raw[11:13]}:00+00:00",
            "client": {"name": "Pat", "email": "pat@example.org", "timezone": "Asia/Tokyo"},
        },
    )
    assert booked.status_code == 201, booked.text
    manage_url = booked.json()["manageUrl"]
    session = requests.Session()
    page = session.get(manage_url)
    assert "up to 365 days before the start" in page.text
    assert "Cancel appointment" not in page.text  # no button that can only fail
    # A form kept from earlier (same visitor, valid token) is still refused, naming the policy.
    token = form_token(session.get(f"{server.base_url}/app/login").text)
    refused = session.post(
        f"{manage_url}/cancel", data={"csrf_token": token}, allow_redirects=False
    )
    assert refused.status_code == 422
    assert "too late to change this appointment online" in refused.text
    assert "365 days" in refused.text
    token = manage_url.rsplit("/", 1)[1]
    with database_for(server.database_url).read() as conn:
        appointment = appointment_by_token(conn, token)
    assert appointment is not None and appointment.status == "confirmed"
    reschedule = session.get(f"{manage_url}/reschedule")
    assert reschedule.status_code == 422 and "365 days" in reschedule.text


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Launched, Path]]:
    """A server that believes it is behind TLS (https base_url), with 3 public POSTs a minute."""
    folder = tmp_path_factory.mktemp("tls")
    running = launch(
        folder, server_extra="base_url = https://book.example.test\n", guest_bookings_per_minute=3
    )
    yield running, folder
    running.stop()


def test_cookies_are_secure_behind_tls_and_public_posts_are_rate_limited(
    tls_server: tuple[Launched, Path],
) -> None:
    running, folder = tls_server
    database = database_for("sqlite:///" + str((folder / "var/bookdav.sqlite3").resolve()))
    add_user(
        database,
        username="tlsprovider",
        email="tls@example.org",
        role="provider",
        password="correct horse",
        timezone="Europe/Berlin",
    )
    page = requests.get(f"{running.base_url}/app/login")
    csrf = set_cookies(page)["bookdav_csrf"]["bookdav_csrf"]
    assert csrf["secure"] and csrf["httponly"] and csrf["samesite"] == "Lax"
    # requests keeps Secure cookies away from http://, so send the pair by hand.
    headers = {"Cookie": f"bookdav_csrf={csrf.value}"}
    form = {"csrf_token": form_token(page.text), "username": "tlsprovider"}

    def attempt(password: str) -> requests.Response:
        return requests.post(
            f"{running.base_url}/app/login",
            data={**form, "password": password},
            headers=headers,
            allow_redirects=False,
        )

    signed_in = attempt("correct horse")
    assert signed_in.status_code == 303
    session = set_cookies(signed_in)["bookdav_session"]["bookdav_session"]
    assert session["secure"] and session["httponly"] and session["samesite"] == "Lax"
    assert [attempt("guess").status_code for _ in range(2)] == [401, 401]
    limited = attempt("guess")
    assert limited.status_code == 429
    assert "text/html" in limited.headers["Content-Type"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert "too many requests" in limited.text


def test_serve_demo_prints_a_booking_link_that_books(tmp_path: Path) -> None:
    running = launch(tmp_path, "--demo")
    try:
        book_line = next(line for line in running.banner if line.strip().startswith("Book:"))
        link = book_line.split("Book:", 1)[1].strip()
        assert link == f"{running.base_url}/book/demo"
        assert any("password" in line for line in running.banner)
        services = requests.get(link)
        assert services.status_code == 200
        assert "Intro call" in services.text and "Consultation" in services.text
        picker = requests.get(f"{link}/intro-call", params={"tz": "America/New_York"})
        assert 'class="slot"' in picker.text
        start = re.search(r'name="start" value="(\d+)"', picker.text)
        assert start
        session = requests.Session()
        details = session.get(f"{link}/intro-call/details", params={"start": start.group(1)})
        booked = session.post(
            f"{link}/intro-call/details",
            data={
                "csrf_token": form_token(details.text),
                "start": start.group(1),
                "tz": "America/New_York",
                "name": "New Comer",
                "email": "new@example.org",
            },
            allow_redirects=False,
        )
        assert booked.status_code == 303 and booked.headers["Location"].startswith("/manage/")
    finally:
        running.stop()
    # A second start finds the demo provider and does not make another.
    again = launch(tmp_path, "--demo")
    try:
        assert any(line.strip().startswith("Book:") for line in again.banner)
        assert not any("password" in line for line in again.banner)
    finally:
        again.stop()


def test_a_time_that_was_never_free_shows_the_picker_again_with_the_form_refused(
    server: RunningServer,
) -> None:
    page = bookable(server)
    session = requests.Session()
    monday = next_monday()
    off_grid = stamp(monday, 9, 7)  # 09:07 Berlin: inside hours, but not on the slot grid
    start = int(datetime.strptime(off_grid, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())
    details = session.get(f"{page.url}/details", params={"start": start, "tz": "Europe/Berlin"})
    answer = session.post(
        f"{page.url}/details",
        data={
            "csrf_token": form_token(details.text),
            "start": str(start),
            "tz": "Europe/Berlin",
            "name": "Gus Grid",
            "email": "gus@example.org",
        },
        allow_redirects=False,
    )
    assert answer.status_code == 422
    assert "That time cannot be booked" in answer.text
    assert 'class="slot"' in answer.text  # the next free times, as buttons


def open_details(
    page: BookablePage, start: int, number: int
) -> tuple[requests.Session, dict[str, str]]:
    """A visitor with the details form for `start` open: their session and what they will post."""
    session = requests.Session()
    details = session.get(f"{page.url}/details", params={"start": start, "tz": "Europe/Berlin"})
    form = {
        "csrf_token": form_token(details.text),
        "start": str(start),
        "tz": "Europe/Berlin",
        "name": f"Visitor {number}",
        "email": f"visitor{number}@example.org",
    }
    return session, form


def post_details(
    page: BookablePage, visitor: tuple[requests.Session, dict[str, str]]
) -> requests.Response:
    session, form = visitor
    return session.post(f"{page.url}/details", data=form, allow_redirects=False, timeout=60)


def utc_instant(stamped: str) -> int:
    return int(datetime.strptime(stamped, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())


def test_many_visitors_posting_one_slot_get_one_booking_and_the_taken_page(
    server: RunningServer,
) -> None:
    page = bookable(server)
    start = utc_instant(stamp(next_monday(2), 11))
    visitors = [open_details(page, start, number) for number in range(12)]
    barrier = threading.Barrier(len(visitors))

    def post(visitor: tuple[requests.Session, dict[str, str]]) -> requests.Response:
        barrier.wait(10)
        return post_details(page, visitor)

    with ThreadPoolExecutor(len(visitors)) as pool:
        answers = list(pool.map(post, visitors))
    assert sorted(a.status_code for a in answers) == [303] + [409] * (len(visitors) - 1)
    for answer in answers:
        if answer.status_code == 409:
            assert answer.headers["Content-Type"].startswith("text/html")
            assert "that time was just taken" in answer.text


def test_a_contended_booking_page_post_for_a_taken_slot_is_refused_without_the_lock(
    server: RunningServer,
) -> None:
    """The booking page takes the API's stampede shortcut (`server.bookings.write_booking`):
    while another booking of the provider is under way, a post for a taken slot is refused from
    a reader thread, without waiting for the provider's lock (held here by the test)."""
    page = bookable(server)
    taken, free = utc_instant(stamp(next_monday(2), 13)), utc_instant(stamp(next_monday(2), 14))
    first = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json=booking_body(page.provider, datetime.fromtimestamp(taken, UTC).isoformat()),
    )
    assert first.status_code == 201, first.text
    waiting, late = open_details(page, free, 1), open_details(page, taken, 2)
    with ThreadPoolExecutor(1) as pool:
        with database_for(server.database_url).write([page.provider.username]):
            under_way = pool.submit(post_details, page, waiting)
            time.sleep(1.5)  # the first post is in flight, queued behind the lock we hold
            refused = post_details(page, late)
            assert refused.status_code == 409  # answered while the lock is still held
            assert "that time was just taken" in refused.text
            assert not under_way.done()
        assert under_way.result().status_code == 303
