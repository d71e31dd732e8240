"""Inbound iMIP replies: what a client's mail app sends back when they press Accept or Decline,
delivered over real LMTP to a running server (and through `bookdav mail ingest`), applied to the
stored appointment only when it comes from the appointment's client."""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any

import icalendar
import pytest
import requests
from sqlalchemy import select

from bookdav.storage.db import database_for
from bookdav.storage.schema import appointments
from tests.conftest import RunningServer, bookdav_command, clean_env, start_server
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import Provider, make_provider, next_monday
from tests.test_notifications import (
    FROM_ADDRESS,
    Collector,
    client,
    free_port,
    fresh_address,
    imip_parts,
    messages_to,
    smtp,  # noqa: F401  (module fixture)
    smtp_settings,
    the_vevent,
    wait_for,
)


@pytest.fixture(scope="module")
def lmtp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def reply_server(
    tmp_path_factory: pytest.TempPathFactory,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
) -> Iterator[RunningServer]:
    mail = smtp_settings(smtp[0]) + f"\ninbound_listen = 127.0.0.1:{lmtp_port}"
    running = start_server(tmp_path_factory.mktemp("replies"), mail=mail)
    yield running
    running.stop()


def invitation(
    server: RunningServer, provider: Provider, collector: Collector, address: str, hour: int
) -> tuple[dict[str, Any], Any]:
    """Book, and return the booking and the VEVENT of the invitation the client received."""
    booked = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json=booking_body(provider, _api_instant(next_monday(3), hour), client=client(address)),
    )
    assert booked.status_code == 201, booked.text
    [(_, message)] = wait_for(lambda: messages_to(collector, address), "the invitation")
    _, vevent = the_vevent(imip_parts(message)[2].get_content())
    return booked.json(), vevent


def reply(
    vevent: Any,
    partstat: str,
    *,
    sender: str | None = None,
    attendee: str | None = None,
    recurrence_id: datetime | None = None,
) -> bytes:
    """What a mail app sends for Accept/Decline (RFC 6047): METHOD:REPLY, the UID and SEQUENCE
    of the invitation, one ATTENDEE with the answer; no ORGANIZER, as outlook.com may do."""
    address = attendee or str(vevent["attendee"]).removeprefix("mailto:")
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//Example Mail//EN")
    calendar.add("version", "2.0")
    calendar.add("method", "REPLY")
    event = icalendar.Event()
    event.add("uid", str(vevent["uid"]))
    event.add("sequence", int(vevent["sequence"]))
    event.add("dtstamp", datetime.now(UTC))
    event.add("dtstart", vevent.decoded("dtstart"))
    if recurrence_id is not None:
        event.add("recurrence-id", recurrence_id)
    answer = icalendar.vCalAddress(f"mailto:{address}")
    answer.params["PARTSTAT"] = partstat
    event.add("attendee", answer)
    calendar.add_component(event)
    message = EmailMessage()
    message["From"] = sender or address
    message["To"] = FROM_ADDRESS
    message["Subject"] = f"{partstat.title()}: appointment"
    message.set_content(f"{partstat} by the client")
    message.add_alternative(
        calendar.to_ical().decode(), subtype="calendar", params={"method": "REPLY"}
    )
    return message.as_bytes()


def send_lmtp(port: int, data: bytes, sender: str) -> None:
    with smtplib.LMTP("127.0.0.1", port) as lmtp:
        lmtp.sendmail(sender, [FROM_ADDRESS], data)


def stored_attendee(server: RunningServer, provider: Provider, appointment_id: str) -> Any:
    stored = requests.get(
        f"{server.dav_url}{provider.username}/appointments/{appointment_id}.ics",
        auth=provider.auth,
    )
    assert stored.status_code == 200
    return the_vevent(stored.text)[1]


def appointment_row(server: RunningServer, appointment_id: str) -> Any:
    with database_for(server.database_url).read() as conn:
        return conn.execute(select(appointments).where(appointments.c.id == appointment_id)).one()


def test_an_accepted_reply_over_lmtp_updates_the_event_in_the_providers_calendar(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
) -> None:
    provider = make_provider(reply_server)
    address = fresh_address().replace("client", "Client")  # case must not matter
    booked, vevent = invitation(reply_server, provider, smtp[1], address, 10)
    assert booked["clientResponse"] == "NEEDS-ACTION"
    send_lmtp(lmtp_port, reply(vevent, "ACCEPTED", sender=address.lower()), address)
    shown = requests.get(
        f"{reply_server.base_url}/api/v1/appointments/{booked['appointmentId']}",
        auth=provider.auth,
    )
    assert shown.status_code == 200 and shown.json()["clientResponse"] == "ACCEPTED"
    attendee = stored_attendee(reply_server, provider, booked["appointmentId"])["attendee"]
    assert attendee.params["PARTSTAT"] == "ACCEPTED"
    row = appointment_row(reply_server, booked["appointmentId"])
    assert row.client_partstat == "ACCEPTED" and row.status == "confirmed"
    assert row.sequence == 0  # an answer is not a change of the event
    [(_, notice)] = wait_for(
        lambda: [
            (e, m)
            for e, m in messages_to(smtp[1], f"{provider.username}@example.org")
            if m["Subject"].startswith("Answered")
        ],
        "the provider told of the answer",
    )
    assert "ACCEPTED" in notice.get_body(preferencelist=("plain",)).get_content()
    assert '"imip reply applied"' in reply_server.log_text()


def test_a_declined_reply_cancels_the_appointment_and_frees_the_slot(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
) -> None:
    provider = make_provider(reply_server)
    address = fresh_address()
    booked, vevent = invitation(reply_server, provider, smtp[1], address, 11)
    send_lmtp(lmtp_port, reply(vevent, "DECLINED"), address)
    row = appointment_row(reply_server, booked["appointmentId"])
    assert row.status == "cancelled" and row.client_partstat == "DECLINED"
    assert str(stored_attendee(reply_server, provider, booked["appointmentId"])["status"]) == (
        "CANCELLED"
    )
    cancelled = wait_for(
        lambda: [m for _, m in messages_to(smtp[1], address) if m["Subject"].startswith("Cancel")],
        "the CANCEL to the client",
    )
    assert cancelled
    wait_for(
        lambda: [
            m
            for _, m in messages_to(smtp[1], f"{provider.username}@example.org")
            if m["Subject"].startswith("Cancelled")
        ],
        "the provider told",
    )
    again = requests.post(
        f"{reply_server.base_url}/api/v1/appointments",
        json=booking_body(provider, booked["startTime"], client=client(fresh_address())),
    )
    assert again.status_code == 201, again.text  # the slot is free


def test_a_decline_inside_the_cancellation_notice_is_recorded_but_does_not_cancel(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
) -> None:
    provider = make_provider(reply_server)
    requests.put(
        f"{reply_server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"rules": {"cancellationNoticeMinutes": 525_600}},
    ).raise_for_status()
    address = fresh_address()
    booked, vevent = invitation(reply_server, provider, smtp[1], address, 12)
    send_lmtp(lmtp_port, reply(vevent, "DECLINED"), address)
    row = appointment_row(reply_server, booked["appointmentId"])
    assert row.status == "confirmed" and row.client_partstat == "DECLINED"
    attendee = stored_attendee(reply_server, provider, booked["appointmentId"])["attendee"]
    assert attendee.params["PARTSTAT"] == "DECLINED"


@pytest.mark.parametrize(
    "forgery, reason",
    [
        ({"sender": "mallory@evil.example"}, "the sender is not the attendee"),
        ({"attendee": "mallory@evil.example"}, "ATTENDEE of the REPLY is not the client"),
        ({"uid": "no-such-uid@bookdav"}, "no appointment has UID"),
        ({"sequence": -1}, "answers SEQUENCE"),
    ],
)
def test_a_forged_or_stale_reply_is_refused_logged_and_never_applied(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
    forgery: dict[str, Any],
    reason: str,
) -> None:
    provider = make_provider(reply_server)
    address = fresh_address()
    booked, vevent = invitation(reply_server, provider, smtp[1], address, 13)
    if "uid" in forgery:
        vevent["uid"] = forgery.pop("uid")
    if "sequence" in forgery:  # the client answers an invitation that was since replaced
        moved = requests.put(
            f"{reply_server.base_url}/api/v1/appointments/{booked['appointmentId']}",
            auth=provider.auth,
            json={"startTime": _api_instant(next_monday(3), 15)},
        )
        assert moved.status_code == 200, moved.text
        forgery.pop("sequence")
    data = reply(vevent, "DECLINED", **forgery)
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send_lmtp(lmtp_port, data, forgery.get("sender", address))
    assert refused.value.smtp_code == 550
    error = refused.value.smtp_error
    assert reason in (error.decode() if isinstance(error, bytes) else error)
    row = appointment_row(reply_server, booked["appointmentId"])
    assert row.status == "confirmed" and row.client_partstat == "NEEDS-ACTION"
    assert '"imip reply refused"' in reply_server.log_text()


def test_bookdav_mail_ingest_applies_a_reply_or_exits_with_the_reason(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = make_provider(reply_server)
    address = fresh_address()
    booked, vevent = invitation(reply_server, provider, smtp[1], address, 14)
    command = bookdav_command("mail", "ingest", "--config", str(reply_server.config_path))
    ran = subprocess.run(
        command,
        input=reply(vevent, "TENTATIVE"),
        capture_output=True,
        env=clean_env(),
        cwd=reply_server.config_path.parent,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert b"reply applied: partstat TENTATIVE" in ran.stdout
    assert appointment_row(reply_server, booked["appointmentId"]).client_partstat == "TENTATIVE"
    forged = subprocess.run(
        command,
        input=reply(vevent, "DECLINED", sender="mallory@evil.example"),
        capture_output=True,
        env=clean_env(),
        cwd=reply_server.config_path.parent,
        timeout=60,
    )
    assert forged.returncode == 1
    lines = forged.stderr.decode().strip().splitlines()
    assert lines[-1] == ("bookdav: reply refused: the sender is not the attendee who answers"), (
        forged.stderr
    )
    not_a_reply = subprocess.run(
        command,
        input=b"From: someone@example.org\r\nSubject: hi\r\n\r\nhello\r\n",
        capture_output=True,
        env=clean_env(),
        cwd=reply_server.config_path.parent,
        timeout=60,
    )
    assert not_a_reply.returncode == 1
    assert b"no text/calendar part with METHOD:REPLY" in not_a_reply.stderr
    assert appointment_row(reply_server, booked["appointmentId"]).status == "confirmed"


def test_declining_one_occurrence_of_a_series_cancels_only_that_occurrence(
    reply_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
    lmtp_port: int,
) -> None:
    provider = make_provider(reply_server)
    address = fresh_address()
    booked = requests.post(
        f"{reply_server.base_url}/api/v1/appointments",
        json=booking_body(
            provider,
            _api_instant(next_monday(3), 16),
            client=client(address),
            recurrence={"frequency": "WEEKLY", "count": 3},
        ),
    )
    assert booked.status_code == 201, booked.text
    [(_, message)] = wait_for(lambda: messages_to(smtp[1], address), "the invitation")
    _, vevent = the_vevent(imip_parts(message)[2].get_content())
    second = vevent.decoded("dtstart") + timedelta(days=7)
    data = reply(vevent, "DECLINED", recurrence_id=second)
    send_lmtp(lmtp_port, data, address)
    row = appointment_row(reply_server, booked.json()["appointmentId"])
    assert row.status == "confirmed" and row.sequence == 1
    assert json.loads(row.exceptions)["exdates"] == [int(second.timestamp())]
    stored = stored_attendee(reply_server, provider, booked.json()["appointmentId"])
    exdates = stored["exdate"] if isinstance(stored["exdate"], list) else [stored["exdate"]]
    assert [d.dt for e in exdates for d in e.dts] == [second]  # visible over CalDAV


def test_the_lmtp_listener_runs_only_where_configured(
    server: RunningServer, reply_server: RunningServer, lmtp_port: int
) -> None:
    assert f'"listen": "127.0.0.1:{lmtp_port}"' in reply_server.log_text()
    assert '"lmtp listener started"' not in server.log_text()  # off by default
