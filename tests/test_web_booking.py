"""Booking-link pages in real headless Chromium: book across time zones, see it over CalDAV,
cancel and reschedule through the manage link, book with JavaScript off and with the keyboard only.
Every page is checked with axe-core and photographed at 360 and 1280 px."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import caldav
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from sqlalchemy import select

from bookdav.storage.appointments import appointment_by_token
from bookdav.storage.db import database_for
from bookdav.storage.schema import appointments
from tests.conftest import RunningServer
from tests.test_availability import next_monday
from tests.web_helpers import BookablePage, bookable, check_page, chromium, tab_to

NEW_YORK = "America/New_York"
BERLIN = "Europe/Berlin"
BOOKED = "You\u2019re booked"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from chromium()


@pytest.fixture
def new_york(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(
        timezone_id=NEW_YORK,
        locale="en-US",
        viewport={"width": 1280, "height": 800},
        bypass_csp=True,
    )
    yield context
    context.close()


def local(instant: int, zone: str) -> datetime:
    return datetime.fromtimestamp(instant, ZoneInfo(zone))


def slot_starts(page: Page) -> list[int]:
    values = page.locator("#times button.slot").evaluate_all("els => els.map(e => e.value)")
    return [int(value) for value in values]


def open_day(page: Page, page_url: str, instant: int, zone: str) -> None:
    day = local(instant, zone).date()
    page.goto(f"{page_url}?tz={zone}&month={day:%Y-%m}&day={day.isoformat()}")


def fill_details_and_book(page: Page, name: str, email: str, notes: str = "") -> None:
    page.get_by_label("Name").fill(name)
    page.get_by_label("Email").fill(email)
    if notes:
        page.get_by_label("Notes").fill(notes)
    page.get_by_role("button", name=re.compile("^Book ")).click()


def manage_token(page: Page) -> str:
    return page.locator("#manage-link").input_value().rsplit("/", 1)[1]


def test_new_york_visitor_books_a_berlin_provider_end_to_end(
    server: RunningServer, browser: Browser, new_york: BrowserContext
) -> None:
    booking_page = bookable(server)
    provider = booking_page.provider
    page = new_york.new_page()

    page.goto(f"{server.base_url}/book/{provider.username}")
    expect(page.get_by_role("heading", level=1)).to_contain_text("Book with")
    check_page(page, "1-services")
    page.get_by_role("link", name=re.compile("Consultation")).click()

    # The script detects the browser's zone and reloads the picker in it, on the first free day.
    expect(page.locator("#tz")).to_have_value(NEW_YORK)
    assert "tz=America%2FNew_York" in page.url or "tz=America/New_York" in page.url
    expect(page.locator("a.day.selected")).to_have_count(1)
    check_page(page, "2-picker")

    start = slot_starts(page)[0]
    shown = local(start, NEW_YORK)
    first_button = page.locator("#times button.slot").first
    expect(first_button).to_have_text(f"{shown:%H:%M}")
    first_button.click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Your details")
    check_page(page, "3-details")
    page.get_by_role("button", name=re.compile("^Book ")).click()  # empty: told what is missing
    expect(page.locator("#name-error")).to_have_text("Enter your name.")
    page.get_by_label("Email").fill("not-an-email")
    page.get_by_role("button", name=re.compile("^Book ")).click()
    expect(page.locator("#email-error")).to_contain_text("name@example.com")
    check_page(page, "4-details-errors")
    fill_details_and_book(page, "Nora York", "nora@example.org", "First visit")

    expect(page.get_by_role("heading", level=1)).to_have_text(BOOKED)
    berlin = local(start, BERLIN)
    summary = page.locator("dl.summary")
    expect(summary).to_contain_text(f"{shown.day} {shown:%B %Y}, {shown:%H:%M}")
    expect(summary).to_contain_text(f"{berlin.day} {berlin:%B %Y}, {berlin:%H:%M}")
    expect(summary).to_contain_text("America/New York")
    expect(summary).to_contain_text("Europe/Berlin")
    check_page(page, "5-confirmation")

    with page.expect_download() as download:
        page.get_by_role("link", name="Add to calendar (.ics)").click()
    ics = Path(download.value.path()).read_text(encoding="utf-8")
    assert "BEGIN:VEVENT" in ics and "Nora York" in ics

    # The event is in the provider's calendar, seen over CalDAV.
    token = manage_token(page)
    with database_for(server.database_url).read() as conn:
        appointment = appointment_by_token(conn, token)
    assert appointment is not None and appointment.start_utc == start
    principal = caldav.DAVClient(
        url=server.dav_url,
        username=provider.username,
        password=server.passwords[provider.username],
    ).principal()
    calendar = next(c for c in principal.calendars() if c.get_display_name() == "Appointments")
    event = calendar.event_by_uid(appointment.event_uid)
    vevent = event.icalendar_component
    assert int(vevent["dtstart"].dt.timestamp()) == start
    assert "nora@example.org" in str(vevent["attendee"]).lower()

    # A second visitor no longer sees that slot.
    other = browser.new_context(timezone_id=NEW_YORK, bypass_csp=True)
    second = other.new_page()
    open_day(second, booking_page.url, start, NEW_YORK)
    expect(second.locator("#times")).to_be_visible()
    assert start not in slot_starts(second)
    other.close()


def book_slot(page: Page, booking_page: BookablePage, name: str) -> tuple[int, str]:
    """Book the first free slot on Monday next week (outside the one-day cancellation notice);
    (start, manage token)."""
    monday = next_monday()
    page.goto(f"{booking_page.url}?tz={NEW_YORK}&month={monday:%Y-%m}&day={monday.isoformat()}")
    start = slot_starts(page)[0]
    page.locator("#times button.slot").first.click()
    fill_details_and_book(page, name, f"{name.split()[0].lower()}@example.org")
    expect(page.get_by_role("heading", level=1)).to_have_text(BOOKED)
    return start, manage_token(page)


def test_cancel_through_the_manage_link_frees_the_slot(
    server: RunningServer, new_york: BrowserContext
) -> None:
    booking_page = bookable(server)
    page = new_york.new_page()
    start, token = book_slot(page, booking_page, "Carl Cancel")
    open_day(page, booking_page.url, start, NEW_YORK)
    assert start not in slot_starts(page)

    page.goto(f"{server.base_url}/manage/{token}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your appointment")
    check_page(page, "6-manage")
    page.get_by_label("Reason for cancelling").fill("Plans changed")
    page.get_by_role("button", name="Cancel appointment").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Appointment cancelled")
    check_page(page, "7-cancelled")

    open_day(page, booking_page.url, start, NEW_YORK)
    assert start in slot_starts(page)


def test_reschedule_through_the_manage_link_moves_the_booking(
    server: RunningServer, new_york: BrowserContext
) -> None:
    booking_page = bookable(server)
    page = new_york.new_page()
    start, token = book_slot(page, booking_page, "Rita Move")
    page.goto(f"{server.base_url}/manage/{token}")
    page.get_by_role("link", name="Reschedule").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Reschedule")
    check_page(page, "8-reschedule")
    later = slot_starts(page)[-1]
    assert later != start
    page.locator(f"#times button.slot[value='{later}']").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Appointment moved")
    moved = local(later, NEW_YORK)
    expect(page.locator("dl.summary")).to_contain_text(f"{moved:%H:%M}")
    check_page(page, "8b-moved")

    open_day(page, booking_page.url, start, NEW_YORK)
    free = slot_starts(page)
    assert start in free and later not in free


def test_a_slot_taken_meanwhile_shows_the_next_free_ones(
    server: RunningServer, browser: Browser, new_york: BrowserContext
) -> None:
    booking_page = bookable(server)
    slow = new_york.new_page()
    monday = next_monday()
    slow.goto(f"{booking_page.url}?tz={NEW_YORK}&month={monday:%Y-%m}&day={monday.isoformat()}")
    start = slot_starts(slow)[0]
    slow.locator("#times button.slot").first.click()
    expect(slow.get_by_role("heading", level=1)).to_have_text("Your details")

    fast = new_york.new_page()
    assert book_slot(fast, booking_page, "Fay Fast")[0] == start

    fill_details_and_book(slow, "Sam Slow", "sam@example.org")
    expect(slow.get_by_role("alert")).to_contain_text("that time was just taken")
    offered = [
        int(v)
        for v in slow.locator(".notice button.slot").evaluate_all("els => els.map(e => e.value)")
    ]
    assert offered and start not in offered and offered[0] > start
    check_page(slow, "9-slot-taken")
    path = booking_page.url.split("://", 1)[1].split("/", 1)[1]
    day_link = slow.locator("a.day").first.get_attribute("href") or ""
    assert day_link.startswith(f"/{path}?"), day_link  # the calendar still leads to the picker
    slow.locator(".notice button.slot").first.click()
    fill_details_and_book(slow, "Sam Slow", "sam@example.org")
    expect(slow.get_by_role("heading", level=1)).to_have_text(BOOKED)


def test_booking_works_with_javascript_disabled(server: RunningServer, browser: Browser) -> None:
    booking_page = bookable(server)
    context = browser.new_context(java_script_enabled=False, timezone_id=NEW_YORK)
    page = context.new_page()
    page.goto(booking_page.url)
    # No script: shown in the provider's zone until the visitor picks theirs with the form.
    expect(page.locator("#tz")).to_have_value(BERLIN)
    page.locator("#tz").select_option(NEW_YORK)
    page.get_by_role("button", name="Change time zone").click()
    expect(page.locator("#tz")).to_have_value(NEW_YORK)
    next_month = page.get_by_role("link", name=re.compile("^Next month"))
    next_month.click()
    page.locator("a.day").first.click()
    start = slot_starts(page)[0]
    page.locator("#times button.slot").first.click()
    fill_details_and_book(page, "Nina NoScript", "nina@example.org")
    expect(page.get_by_role("heading", level=1)).to_have_text(BOOKED)
    shown = local(start, NEW_YORK)
    expect(page.locator("dl.summary")).to_contain_text(f"{shown:%H:%M}")
    expect(page.get_by_role("button", name="Copy")).to_be_hidden()  # needs the script
    shoot_name = "10-nojs-confirmation"
    check_page(page, shoot_name, axe=False)

    # The zone is remembered (a cookie) on the next visit, still without a script.
    page.goto(booking_page.url)
    expect(page.locator("#tz")).to_have_value(NEW_YORK)
    page.goto(f"{server.base_url}/manage/{manage_token_from(page, start, booking_page)}")
    page.get_by_role("button", name="Cancel appointment").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Appointment cancelled")
    context.close()


def manage_token_from(page: Page, start: int, booking_page: BookablePage) -> str:
    with database_for(booking_page.provider.server.database_url).read() as conn:
        row = conn.execute(
            select(appointments.c.manage_token).where(
                appointments.c.provider_id == booking_page.provider.user_id,
                appointments.c.start_utc == start,
            )
        ).first()
    assert row is not None
    return str(row.manage_token)


def test_keyboard_only_booking(server: RunningServer, new_york: BrowserContext) -> None:
    booking_page = bookable(server)
    page = new_york.new_page()
    page.goto(f"{server.base_url}/book/{booking_page.provider.username}")
    tab_to(page, "a.card-link")
    page.keyboard.press("Enter")
    page.wait_for_selector("#times button.slot")
    start = slot_starts(page)[0]
    tab_to(page, "#times button.slot")
    page.keyboard.press("Enter")
    page.wait_for_selector("#name")
    tab_to(page, "#name")
    page.keyboard.type("Kim Keys")
    page.keyboard.press("Tab")
    page.keyboard.type("kim@example.org")
    page.keyboard.press("Tab")
    page.keyboard.type("Booked without a mouse")
    tab_to(page, "button.primary")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text(BOOKED)
    expect(page.locator("dl.summary")).to_contain_text(f"{local(start, NEW_YORK):%H:%M}")


def test_unknown_pages_are_clear_html_errors(
    server: RunningServer, new_york: BrowserContext
) -> None:
    page = new_york.new_page()
    response = page.goto(f"{server.base_url}/book/nobody-here")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", level=1)).to_have_text("Not Found")
    check_page(page, "11-not-found")
    response = page.goto(f"{server.base_url}/manage/not-a-real-token")
    assert response is not None and response.status == 404
    expect(page.locator("main")).to_contain_text("manage link is not known")
