"""The provider dashboard in headless Chromium: sign in, the week's appointments with outcome and
cancel, the weekly hours editor, the services editor, links and CalDAV set-up notes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta

import pytest
import requests
from playwright.sync_api import Browser, Page, expect
from sqlalchemy import select

from bookdav.storage.db import database_for
from bookdav.storage.schema import appointments
from tests.conftest import RunningServer
from tests.web_helpers import BookablePage, bookable, check_page, chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from chromium()


def book_this_week(booking_page: BookablePage, count: int) -> list[str]:
    """Book the first `count` free slots of the coming week over the API; their client names."""
    provider = booking_page.provider
    base = provider.server.base_url
    today = date.today()
    slots = requests.get(
        f"{base}/api/v1/providers/{provider.user_id}/availability",
        params={
            "serviceId": provider.service_id,
            "startDate": today.isoformat(),
            "endDate": (today + timedelta(days=6)).isoformat(),
        },
    ).json()["slots"]
    names = []
    for index, slot in enumerate(slots[:count]):
        name = f"Client Number{index}"
        answer = requests.post(
            f"{base}/api/v1/appointments",
            json={
                "serviceId": provider.service_id,
                "providerId": provider.user_id,
                "startTime": slot["startTime"],
                "client": {"name": name, "email": f"c{index}@example.org", "timezone": "UTC"},
            },
        )
        assert answer.status_code == 201, answer.text
        names.append(name)
    return names


def sign_in(page: Page, booking_page: BookablePage) -> None:
    provider = booking_page.provider
    page.get_by_label("Username").fill(provider.username)
    page.get_by_label("Password").fill(provider.server.passwords[provider.username])
    page.get_by_role("button", name="Sign in").click()


def test_provider_manages_appointments_hours_and_services(
    server: RunningServer, browser: Browser
) -> None:
    booking_page = bookable(server)
    provider = booking_page.provider
    names = book_this_week(booking_page, 2)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    page = context.new_page()

    page.goto(f"{server.base_url}/app/")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to your dashboard")
    page.get_by_label("Username").fill(provider.username)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong username or password.")
    expect(page.get_by_label("Username")).to_have_value(provider.username)
    check_page(page, "20-login-error")
    sign_in(page, booking_page)

    expect(page.get_by_role("heading", level=1)).to_have_text("Today and the coming week")
    for name in names:
        expect(page.locator(".appointments")).to_contain_text(name)
    check_page(page, "21-dashboard")

    first = page.locator("li.appointment", has_text=names[0])
    first.get_by_role("button", name=re.compile("Mark completed")).click()
    expect(page.get_by_role("status")).to_have_text("Outcome saved.")
    expect(page.locator("li.appointment", has_text=names[0])).to_contain_text("Completed")

    second = page.locator("li.appointment", has_text=names[1])
    second.locator("summary").click()
    second.get_by_label("Reason (sent to the client)").fill("Provider is ill")
    second.get_by_role("button", name="Cancel this appointment").click()
    expect(page.locator("li.appointment", has_text=names[1])).to_contain_text("Provider is ill")
    with database_for(server.database_url).read() as conn:
        statuses = dict(
            conn.execute(
                select(appointments.c.client_name, appointments.c.status).where(
                    appointments.c.provider_id == provider.user_id
                )
            ).all()
        )
    assert statuses == {names[0]: "completed", names[1]: "cancelled"}

    page.get_by_role("link", name="Hours").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Weekly hours")
    page.locator("input[name=SU_open]").check()
    page.get_by_label("Sunday opens", exact=True).fill("18:00")
    page.get_by_label("Sunday closes", exact=True).fill("09:00")
    page.get_by_role("button", name="Save hours").click()
    expect(page.get_by_role("alert")).to_contain_text("Sunday: closing time must be after")
    check_page(page, "22-hours-error")
    page.get_by_label("Sunday opens", exact=True).fill("10:00")
    page.get_by_label("Sunday closes", exact=True).fill("14:00")
    page.get_by_label("Monday closes", exact=True).fill("12:00")  # a lunch break
    page.get_by_label("Monday opens again (optional)").fill("13:00")
    page.get_by_label("Monday closes again (optional)").fill("17:00")
    page.get_by_role("button", name="Save hours").click()
    expect(page.get_by_role("status")).to_have_text("Hours saved.")
    check_page(page, "23-hours")
    hours = requests.get(
        f"{server.base_url}/api/v1/providers/{provider.user_id}/availability"
    ).json()["timeSlots"]
    assert {"dayOfWeek": "SU", "startTime": "10:00", "endTime": "14:00"} in hours
    assert {"dayOfWeek": "MO", "startTime": "09:00", "endTime": "12:00"} in hours
    assert {"dayOfWeek": "MO", "startTime": "13:00", "endTime": "17:00"} in hours
    assert sum(1 for slot in hours if slot["startTime"] == "09:00") == 5
    expect(page.get_by_label("Monday opens again (optional)")).to_have_value("13:00")

    page.get_by_role("link", name="Services").click()
    new = page.locator("fieldset", has_text="Add a service")
    new.get_by_label("Name").fill("")
    new.get_by_label("Duration (minutes)").fill("2")
    new.get_by_role("button", name="Add service").click()
    expect(page.locator("#new-name-error")).to_contain_text("Give the service a name")
    expect(page.locator("#new-duration-error")).to_contain_text("from 5 to")
    page.locator("fieldset", has_text="Add a service").get_by_label("Name").fill("Long walk")
    page.locator("fieldset", has_text="Add a service").get_by_label("Duration (minutes)").fill("45")
    page.locator("fieldset", has_text="Add a service").get_by_role(
        "button", name="Add service"
    ).click()
    expect(page.get_by_role("status")).to_have_text("Service created.")
    check_page(page, "24-services")
    page.locator("a[href*='/long-walk-']").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Book Long walk")

    page.goto(f"{server.base_url}/app/links")
    expect(page.locator("#dav-link")).to_have_value(f"{server.base_url}/dav/{provider.username}/")
    expect(page.locator("#booking-link")).to_have_value(
        f"{server.base_url}/book/{provider.username}"
    )
    for app in ("Apple Calendar", "Thunderbird", "DAVx"):
        expect(page.get_by_role("heading", name=re.compile(app))).to_be_visible()
    check_page(page, "25-links")

    page.get_by_role("button", name=re.compile("Sign out")).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to your dashboard")
    page.goto(f"{server.base_url}/app/hours")
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign in to your dashboard")
    context.close()
