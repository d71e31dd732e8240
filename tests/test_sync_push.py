"""Destination calendars: bookings, reschedules and cancellations written to a real, stock
Radicale through the outbox, surviving an outage of the remote."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from bookdav.storage.db import database_for
from bookdav.storage.schema import outbox
from tests.conftest import RunningServer, start_server
from tests.sync_servers import DavServer, start_radicale
from tests.test_appointments import booking_body
from tests.test_availability import Provider, make_provider, next_monday
from tests.test_sync import SYNC_SECTION, add_busy_caldav, add_calendar, berlin, sync


@pytest.fixture(scope="module")
def sync_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("push-server"), extra=SYNC_SECTION)
    yield running
    running.stop()


@pytest.fixture
def radicale(tmp_path: Path) -> Iterator[DavServer]:
    server = start_radicale(tmp_path / "destination")
    yield server
    server.stop()


@pytest.fixture
def provider(sync_server: RunningServer) -> Provider:
    return make_provider(sync_server)


def add_destination(provider: Provider, remote: DavServer) -> dict[str, Any]:
    assert remote.auth is not None
    return add_calendar(
        provider,
        type="caldav",
        url=remote.calendar_url,
        role="destination",
        username=remote.auth[0],
        password=remote.auth[1],
    )


def wait_for(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def remote_text(remote: DavServer, appointment_id: str) -> str:
    response = remote.get(f"{appointment_id}-bookdav.ics")
    return response.text if response.status_code == 200 else ""


def test_a_booking_appears_on_the_destination_a_reschedule_moves_it_a_cancellation_cancels_it(
    provider: Provider, radicale: DavServer
) -> None:
    add_destination(provider, radicale)
    monday = next_monday(4)
    booked = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, berlin(monday, 10)),
    )
    assert booked.status_code == 201, booked.text
    appointment_id = booked.json()["appointmentId"]
    wait_for(lambda: "STATUS:CONFIRMED" in remote_text(radicale, appointment_id))
    text = remote_text(radicale, appointment_id)
    assert f"UID:{appointment_id}@bookdav" in text
    assert "ATTENDEE" not in text and "ORGANIZER" not in text  # no second invitation remotely

    url = f"{provider.server.base_url}/api/v1/appointments/{appointment_id}"
    moved = requests.put(url, auth=provider.auth, json={"startTime": berlin(monday, 14)})
    assert moved.status_code == 200, moved.text
    new_start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(_epoch(berlin(monday, 14))))
    wait_for(lambda: f"DTSTART:{new_start}" in remote_text(radicale, appointment_id))
    assert "SEQUENCE:1" in remote_text(radicale, appointment_id)

    cancelled = requests.delete(url, auth=provider.auth, json={"cancellationReason": "ill"})
    assert cancelled.status_code == 200, cancelled.text
    wait_for(lambda: "STATUS:CANCELLED" in remote_text(radicale, appointment_id))

    # One resource per appointment (idempotent by UID), and mirroring the same calendar as a
    # busy source does not count bookdav's own appointments twice.
    listing = requests.request("PROPFIND", radicale.calendar_url, auth=radicale.auth,
                               headers={"Depth": "1"})  # fmt: skip
    assert listing.text.count("-bookdav.ics") == 1
    source = add_busy_caldav(provider, radicale)
    assert sync(provider, source)["cycle"]["written"] == 0


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp())


def test_a_destination_outage_delays_the_write_and_loses_nothing(
    provider: Provider, radicale: DavServer
) -> None:
    add_destination(provider, radicale)
    radicale.stop()
    monday = next_monday(6)
    booked = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, berlin(monday, 11)),
    )
    assert booked.status_code == 201, booked.text  # the remote being down never blocks booking
    appointment_id = booked.json()["appointmentId"]
    database = database_for(provider.server.database_url)

    def push_row() -> Any:
        with database.read() as conn:
            return conn.execute(
                select(outbox.c.status, outbox.c.attempts, outbox.c.last_error).where(
                    outbox.c.appointment_id == appointment_id, outbox.c.kind == "sync.push"
                )
            ).one()

    wait_for(lambda: push_row().attempts >= 1 and push_row().status == "pending")
    assert "ClientConnectorError" in push_row().last_error  # visible, and retried later
    radicale.restart()
    wait_for(lambda: "STATUS:CONFIRMED" in remote_text(radicale, appointment_id), seconds=60)
    wait_for(lambda: push_row().status == "sent")
    assert "outbox row deferred" in provider.server.log_text()


def test_a_destination_answering_401_keeps_the_write_pending_with_the_reason(
    provider: Provider, radicale: DavServer
) -> None:
    assert radicale.auth is not None
    add_calendar(
        provider, type="caldav", url=radicale.calendar_url, role="destination",
        username=radicale.auth[0], password="not-the-password",
    )  # fmt: skip
    booked = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, berlin(next_monday(8), 9)),
    )
    assert booked.status_code == 201, booked.text
    appointment_id = booked.json()["appointmentId"]
    database = database_for(provider.server.database_url)

    def push_row() -> Any:
        with database.read() as conn:
            return conn.execute(
                select(outbox.c.status, outbox.c.attempts, outbox.c.last_error).where(
                    outbox.c.appointment_id == appointment_id, outbox.c.kind == "sync.push"
                )
            ).one()

    wait_for(lambda: push_row().attempts >= 1 and push_row().last_error is not None)
    row = push_row()
    assert row.status == "pending" and "answered 401" in row.last_error
    assert remote_text(radicale, appointment_id) == ""


def test_a_new_destination_receives_the_appointments_already_booked(
    provider: Provider, radicale: DavServer
) -> None:
    booked = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(provider, berlin(next_monday(10), 15)),
    )
    assert booked.status_code == 201, booked.text
    appointment_id = booked.json()["appointmentId"]
    add_destination(provider, radicale)
    wait_for(lambda: "STATUS:CONFIRMED" in remote_text(radicale, appointment_id))
