"""Bookings under fire: many clients, several processes, CalDAV writes racing, and kill -9."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from bookdav.storage.db import database_for
from bookdav.storage.schema import appointments, item_changes, items, outbox
from tests.conftest import RunningServer, start_server
from tests.test_appointments import _api_instant, booking_body, count_bookings
from tests.test_availability import Provider, make_provider, next_monday, stamp, vevent
from tests.test_multiprocess import fresh_postgres_database


@pytest.fixture
def postgres_pair(tmp_path: Path) -> Iterator[tuple[RunningServer, RunningServer]]:
    with fresh_postgres_database() as url:
        first = start_server(tmp_path / "first", database_url=url)
        second = start_server(tmp_path / "second", database_url=url)
        try:
            yield first, second
        finally:
            second.stop()
            first.stop()


def test_two_processes_on_postgresql_give_one_slot_to_one_client(
    postgres_pair: tuple[RunningServer, RunningServer],
) -> None:
    first, second = postgres_pair
    provider = make_provider(first)
    start = _api_instant(next_monday(7), 10)
    gate = threading.Barrier(40)

    def attempt(n: int) -> int:
        server = first if n % 2 else second
        if n < 40:
            gate.wait()
        return requests.post(
            f"{server.base_url}/api/v1/appointments", json=booking_body(provider, start), timeout=60
        ).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(attempt, range(200)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == 199
    assert count_bookings(provider) == (1, 1)


def race_event_against_booking(
    server: RunningServer, provider: Provider, day: date, hour: int
) -> tuple[str, requests.Response]:
    """PUT an event and POST a booking for the same hour at the same moment."""
    href = f"race-{uuid.uuid4().hex}.ics"
    body = vevent(f"DTSTART:{stamp(day, hour)}", f"DTEND:{stamp(day, hour + 1)}")
    gate = threading.Barrier(2)

    def put_event() -> int:
        gate.wait()
        return requests.put(
            f"{server.dav_url}{provider.username}/appointments/{href}",
            data=body.encode(),
            auth=provider.auth,
            headers={"Content-Type": "text/calendar"},
        ).status_code

    def book() -> requests.Response:
        gate.wait()
        return requests.post(
            f"{server.base_url}/api/v1/appointments",
            json=booking_body(provider, _api_instant(day, hour)),
        )

    with ThreadPoolExecutor(2) as pool:
        put_future, book_future = pool.submit(put_event), pool.submit(book)
        assert put_future.result() == 201
        return href, book_future.result()


def test_a_caldav_put_racing_a_booking_is_never_accepted_before_it_unseen(
    server: RunningServer,
) -> None:
    """Whenever both a booking and an overlapping event exist, the event was written after the
    booking committed (so the booking's check could not have seen it), never before."""
    provider = make_provider(server)
    monday = next_monday(14)
    for round_number in range(16):
        day = monday + timedelta(days=round_number % 5, weeks=round_number // 5)
        href, booked = race_event_against_booking(server, provider, day, 9 + round_number % 8)
        assert booked.status_code in (201, 409), booked.text
        if booked.status_code == 201:
            booking_href = f"{booked.json()['appointmentId']}.ics"
            with database_for(server.database_url).read() as conn:
                revisions = dict(
                    conn.execute(
                        select(item_changes.c.href, item_changes.c.revision).where(
                            item_changes.c.href.in_([href, booking_href])
                        )
                    ).all()
                )
            assert revisions[booking_href] < revisions[href], "event was in before the booking"


def test_kill_9_during_a_booking_storm_loses_no_confirmed_booking(tmp_path: Path) -> None:
    running = start_server(tmp_path / "storm")
    provider = make_provider(running)
    monday = next_monday(7)
    starts = [
        _api_instant(monday + timedelta(days=d), h, m)
        for d in range(5)
        for h in range(9, 17)
        for m in (0, 30)
    ]
    confirmed: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        for start in starts[offset::8]:
            if stop.is_set():
                return
            try:
                response = requests.post(
                    f"{running.base_url}/api/v1/appointments",
                    json=booking_body(provider, start),
                    timeout=10,
                )
            except requests.RequestException:
                return
            if response.status_code == 201:
                confirmed.append(response.json()["appointmentId"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(running.process.pid, signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join()
    running.process.wait()
    assert confirmed, "no booking completed before the kill"

    restarted = start_server(tmp_path / "storm")
    try:
        with database_for(restarted.database_url).read() as conn:
            rows = dict(
                conn.execute(
                    select(appointments.c.id, appointments.c.event_href).where(
                        appointments.c.provider_id == provider.user_id
                    )
                ).all()
            )
            events = set(
                conn.execute(
                    select(items.c.href).where(items.c.href.in_(list(rows.values())))
                ).scalars()
            )
            outboxed = dict(
                conn.execute(
                    select(outbox.c.appointment_id, func.count())
                    .where(
                        outbox.c.appointment_id.in_(list(rows)),
                        outbox.c.kind.in_(("client.imip", "provider.notice")),
                    )
                    .group_by(outbox.c.appointment_id)
                ).all()
            )
        assert set(confirmed) <= set(rows)
        assert all(href in events for href in rows.values()), "a row without its VEVENT"
        assert all(outboxed.get(appointment_id) == 2 for appointment_id in rows)
        assert count_bookings(provider)[0] == count_bookings(provider)[1]
        response = requests.get(
            f"{restarted.base_url}/api/v1/appointments/{confirmed[0]}", auth=provider.auth
        )
        assert response.status_code == 200
    finally:
        restarted.stop()
