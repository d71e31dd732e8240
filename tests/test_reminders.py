"""Reminders: planned in the booking transaction (and, for series, by the worker's planner), sent
once per occurrence and offset, never for a cancelled appointment, re-planned on a move.

The clock is not waited out: a test moves a planned reminder's `next_attempt_at` to now (what the
passing of time would do) and a real server with a real SMTP server does the rest.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, update

from bookdav.notify import plan
from bookdav.storage.appointments import get_appointment
from bookdav.storage.db import database_for
from bookdav.storage.schema import outbox
from tests.conftest import RunningServer, start_server
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import Provider, make_provider, next_monday
from tests.test_notifications import (
    Collector,
    client,
    fresh_address,
    messages_to,
    smtp,  # noqa: F401  (module fixture)
    smtp_settings,
    wait_for,
)


@pytest.fixture(scope="module")
def reminder_server(
    tmp_path_factory: pytest.TempPathFactory,
    smtp: tuple[int, Collector],  # noqa: F811
) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("reminders"), mail=smtp_settings(smtp[0]))
    yield running
    running.stop()


def provider_with_reminders(server: RunningServer, minutes: list[int]) -> Provider:
    provider = make_provider(server)
    response = requests.put(
        f"{server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"notifications": {"reminderMinutes": minutes}},
    )
    assert response.status_code == 200, response.text
    assert response.json()["notifications"]["reminderMinutes"] == sorted(minutes, reverse=True)
    return provider


def reminder_rows(server: RunningServer, appointment_id: str) -> list[Any]:
    with database_for(server.database_url).read() as conn:
        return list(
            conn.execute(
                select(outbox)
                .where(outbox.c.appointment_id == appointment_id, outbox.c.kind == plan.REMINDER)
                .order_by(outbox.c.id)
            )
        )


def superseded_reminder(server: RunningServer, appointment_id: str) -> Any:
    """Wait for the appointment's one reminder row to be superseded; return it."""
    [row] = wait_for(
        lambda: [r for r in reminder_rows(server, appointment_id) if r.status == "superseded"],
        "the reminder superseded",
    )
    return row


def make_due(server: RunningServer, appointment_id: str) -> None:
    """What waiting until the reminder's time would do."""
    with database_for(server.database_url).write() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.appointment_id == appointment_id, outbox.c.kind == plan.REMINDER)
            .values(next_attempt_at=int(time.time()))
        )


def reminders_to(collector: Collector, address: str) -> list[Any]:
    return [m for _, m in messages_to(collector, address) if m["Subject"].startswith("Reminder:")]


def book(server: RunningServer, provider: Provider, address: str, **extra: Any) -> dict[str, Any]:
    response = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json=booking_body(
            provider, _api_instant(next_monday(2), 10), client=client(address), **extra
        ),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_each_offset_is_planned_once_and_the_reminder_arrives_with_the_manage_link(
    reminder_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = provider_with_reminders(reminder_server, [60, 1440])
    address = fresh_address()
    booked = book(reminder_server, provider, address)
    rows = reminder_rows(reminder_server, booked["appointmentId"])
    starts = {int(r.next_attempt_at) for r in rows}
    assert len(rows) == 2 and len(starts) == 2
    assert sorted(r.dedupe_key.split(":")[2] for r in rows) == ["1440", "60"]
    # Planning again (another process, a restart) adds nothing: the dedupe key is unique.
    database = database_for(reminder_server.database_url)
    with database.write() as conn:
        appointment = get_appointment(conn, booked["appointmentId"])
        assert appointment is not None
        assert plan.plan_reminders(conn, appointment) == 0
    make_due(reminder_server, booked["appointmentId"])
    found = wait_for(lambda: len(reminders_to(smtp[1], address)) == 2, "two reminders")
    assert found
    wait_for(
        lambda: all(
            r.status == "sent" for r in reminder_rows(reminder_server, booked["appointmentId"])
        ),
        "both rows sent",
    )
    messages = reminders_to(smtp[1], address)
    assert len({m["Message-ID"] for m in messages}) == 2
    text = messages[0].get_body(preferencelist=("plain",)).get_content()
    assert booked["manageUrl"] in text and "Cancellation policy" in text
    time.sleep(1.5)  # a few more worker passes: nothing is sent again
    assert len(reminders_to(smtp[1], address)) == 2


def test_a_cancelled_appointment_gets_no_reminder(
    reminder_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = provider_with_reminders(reminder_server, [60])
    address = fresh_address()
    booked = book(reminder_server, provider, address)
    url = f"{reminder_server.base_url}/api/v1/appointments/{booked['appointmentId']}"
    assert requests.delete(url, auth=provider.auth).status_code == 200
    make_due(reminder_server, booked["appointmentId"])
    row = superseded_reminder(reminder_server, booked["appointmentId"])
    assert "cancelled" in row.last_error
    wait_for(lambda: len(messages_to(smtp[1], address)) == 2, "invitation and cancellation")
    assert reminders_to(smtp[1], address) == []


def test_a_moved_appointment_is_reminded_of_its_new_time_only(
    reminder_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = provider_with_reminders(reminder_server, [60])
    address = fresh_address()
    booked = book(reminder_server, provider, address)
    url = f"{reminder_server.base_url}/api/v1/appointments/{booked['appointmentId']}"
    new_start = _api_instant(next_monday(2), 15)
    moved = requests.put(url, auth=provider.auth, json={"startTime": new_start})
    assert moved.status_code == 200, moved.text
    rows = reminder_rows(reminder_server, booked["appointmentId"])
    assert [r.dedupe_key.split(":")[3] for r in rows] == ["0", "1"]  # one per sequence
    make_due(reminder_server, booked["appointmentId"])
    wait_for(
        lambda: (
            {r.status for r in reminder_rows(reminder_server, booked["appointmentId"])}
            == {"sent", "superseded"}
        ),
        "old superseded, new sent",
    )
    [reminder] = wait_for(lambda: reminders_to(smtp[1], address), "the reminder")
    assert "15:" not in booked["startTime"]
    text = reminder.get_body(preferencelist=("plain",)).get_content()
    # 15:00 Berlin shown in the client's zone (New York): 09:00.
    assert "09:00" in text and "04:00" not in text


def test_the_planner_adds_a_series_reminders_as_they_enter_the_window_once(
    reminder_server: RunningServer,
) -> None:
    provider = provider_with_reminders(reminder_server, [60])
    booked = book(
        reminder_server, provider, fresh_address(), recurrence={"frequency": "WEEKLY", "count": 3}
    )
    database = database_for(reminder_server.database_url)
    with database.read() as conn:
        appointment = get_appointment(conn, booked["appointmentId"])
        assert appointment is not None
        # The occurrence index knows the series' starts (DST-proof, unlike adding weeks).
        starts = plan.occurrence_starts(conn, appointment, 0, 2**40)
    assert len(starts) == 3
    keys = {r.dedupe_key for r in reminder_rows(reminder_server, appointment.id)}
    for moment in [start - 3600 - 10 for start in starts]:
        with database.write() as conn:
            plan.plan_series_reminders(conn, now=moment)
            assert plan.plan_series_reminders(conn, now=moment) == 0  # idempotent
        keys |= {r.dedupe_key for r in reminder_rows(reminder_server, appointment.id)}
    assert sorted(int(k.split(":")[1]) for k in keys) == starts
    assert len(reminder_rows(reminder_server, appointment.id)) == 3


def test_a_series_reminder_is_planned_by_the_restarted_server_and_sent_once_across_restarts(
    tmp_path: Path,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    folder = tmp_path / "server"
    running = start_server(folder, mail=smtp_settings(smtp[0]))
    try:
        provider = provider_with_reminders(running, [])  # none planned at booking
        address = fresh_address()
        booked = book(running, provider, address, recurrence={"frequency": "WEEKLY", "count": 2})
        assert reminder_rows(running, booked["appointmentId"]) == []
        first = int(datetime.fromisoformat(booked["startTime"]).timestamp())
        # An offset that makes the first occurrence's reminder due in about half an hour: inside
        # the planner's window, so the next planner pass (on start) plans it.
        offset = (first - int(time.time())) // 60 - 30
        provider_with_reminders_set(running, provider, [offset])
    finally:
        running.stop()
    for _ in range(2):  # two restarts: the planner runs on each start
        running = start_server(folder, mail=smtp_settings(smtp[0]))
        try:
            rows_now = functools.partial(reminder_rows, running, booked["appointmentId"])
            rows = wait_for(rows_now, "the planned reminder")
            assert len(rows) == 1 and rows[0].dedupe_key.endswith(f":{offset}:0")
            if rows[0].status == "pending":
                make_due(running, booked["appointmentId"])
            wait_for(lambda: reminders_to(smtp[1], address), "the reminder")
            wait_for(functools.partial(first_row_sent, rows_now), "the row sent")
        finally:
            running.stop()
    assert len(reminders_to(smtp[1], address)) == 1
    assert len(reminder_rows(running, booked["appointmentId"])) == 1


def provider_with_reminders_set(
    server: RunningServer, provider: Provider, minutes: list[int]
) -> None:
    response = requests.put(
        f"{server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"notifications": {"reminderMinutes": minutes}},
    )
    assert response.status_code == 200, response.text


def first_row_sent(rows: Callable[[], list[Any]]) -> bool:
    return bool(rows()[0].status == "sent")


def test_changing_a_services_offsets_replans_the_reminders_not_yet_sent(
    reminder_server: RunningServer,
) -> None:
    provider = provider_with_reminders(reminder_server, [1440, 60])
    cancelled = book(reminder_server, provider, fresh_address())
    url = f"{reminder_server.base_url}/api/v1/appointments/{cancelled['appointmentId']}"
    assert requests.delete(url, auth=provider.auth).status_code == 200
    booked = book(reminder_server, provider, fresh_address())  # the slot is free again

    def pending_offsets(appointment_id: str) -> list[int]:
        rows = reminder_rows(reminder_server, appointment_id)
        return sorted(int(r.dedupe_key.split(":")[2]) for r in rows if r.status == "pending")

    def set_offsets(minutes: list[int]) -> None:
        answer = requests.put(
            f"{reminder_server.base_url}/api/v1/services/{provider.service_id}",
            auth=provider.auth,
            json={"notifications": {"reminderMinutes": minutes}},
        )
        assert answer.status_code == 200, answer.text

    assert pending_offsets(booked["appointmentId"]) == [60, 1440]
    set_offsets([60, 30])
    assert pending_offsets(booked["appointmentId"]) == [30, 60]
    [dropped] = [
        r for r in reminder_rows(reminder_server, booked["appointmentId"]) if r.status != "pending"
    ]
    assert dropped.status == "superseded" and "offsets changed" in dropped.last_error
    # A cancellation gets no new reminder (its old rows are superseded when they come due).
    assert 30 not in pending_offsets(cancelled["appointmentId"])
    set_offsets([1440])  # an offset dropped before can be chosen again
    assert pending_offsets(booked["appointmentId"]) == [1440]


def test_a_reminder_whose_offset_the_service_dropped_is_not_sent(
    reminder_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    """A booking racing the offset change may plan an old offset: delivery checks it again."""
    provider = provider_with_reminders(reminder_server, [60])
    address = fresh_address()
    booked = book(reminder_server, provider, address)
    with database_for(reminder_server.database_url).write() as conn:
        conn.execute(
            update(outbox)
            .where(outbox.c.appointment_id == booked["appointmentId"])
            .where(outbox.c.kind == plan.REMINDER)
            .values(
                payload=func.replace(outbox.c.payload, '"offsetMinutes": 60', '"offsetMinutes": 45')
            )
        )
    make_due(reminder_server, booked["appointmentId"])
    row = superseded_reminder(reminder_server, booked["appointmentId"])
    assert "offsets changed" in row.last_error
    assert reminders_to(smtp[1], address) == []
