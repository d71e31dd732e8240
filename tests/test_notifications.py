"""Notifications: the outbox delivered as iMIP email, over a real SMTP server and into the Maildir.

A real `bookdav serve` books, moves and cancels; an aiosmtpd server on loopback receives what the
outbox worker sends, and the messages are read back as a mail client would.
"""

from __future__ import annotations

import email
import json
import mailbox
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
import requests
from aiosmtpd.controller import Controller
from sqlalchemy import select

from bookdav.notify import imip, outbox
from bookdav.storage.appointments import enqueue
from bookdav.storage.db import database_for
from bookdav.storage.schema import outbox as outbox_table
from tests.conftest import RunningServer, start_server
from tests.storage_fixtures import BACKENDS, fresh_database
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import Provider, make_provider, next_monday, stamp
from tests.test_web_forms import open_details, post_details, utc_instant
from tests.web_helpers import BookablePage

FROM_ADDRESS = "bookings@clinic.example"
CLIENT_ZONE = "America/New_York"


class Collector:
    """An aiosmtpd handler that keeps every envelope it is given."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def smtp_settings(port: int) -> str:
    return (
        f"smtp_host = 127.0.0.1\nsmtp_port = {port}\nsmtp_tls = none\nfrom_address = {FROM_ADDRESS}"
    )


def start_smtp(port: int) -> tuple[Controller, Collector]:
    collector = Collector()
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    return controller, collector


@pytest.fixture(scope="module")
def smtp() -> Iterator[tuple[int, Collector]]:
    port = free_port()
    controller, collector = start_smtp(port)
    yield port, collector
    controller.stop()


@pytest.fixture(scope="module")
def mail_server(
    tmp_path_factory: pytest.TempPathFactory, smtp: tuple[int, Collector]
) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("mail-server"), mail=smtp_settings(smtp[0]))
    yield running
    running.stop()


def wait_for(find: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def parsed(envelope: Any) -> EmailMessage:
    message = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def messages_to(collector: Collector, address: str) -> list[tuple[Any, EmailMessage]]:
    return [(e, parsed(e)) for e in list(collector.envelopes) if address in e.rcpt_tos]


def client(email_address: str, name: str = "Ann Example") -> dict[str, str]:
    return {"name": name, "email": email_address, "timezone": CLIENT_ZONE}


def fresh_address() -> str:
    return f"client-{secrets.token_hex(4)}@example.org"


def imip_parts(message: EmailMessage) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    """The text, HTML and calendar parts, asserting the RFC 6047 shape on the way."""
    assert message.get_content_type() == "multipart/mixed"
    assert message["MIME-Version"] == "1.0"
    alternative, attachment = list(message.iter_parts())
    assert alternative.get_content_type() == "multipart/alternative"
    text, html, calendar = list(alternative.iter_parts())
    assert [text.get_content_type(), html.get_content_type(), calendar.get_content_type()] == [
        "text/plain",
        "text/html",
        "text/calendar",
    ]
    assert calendar.get_content_charset() == "utf-8"
    assert attachment.get_filename() == "invite.ics"
    assert attachment.get_content_type() in ("application/ics", "text/calendar")
    # Text parts come back with the transport's line ends; the calendar itself is the same.
    attached = attachment.get_content().decode().splitlines()
    assert attached == calendar.get_content().splitlines()
    return text, html, calendar  # type: ignore[return-value]


def the_vevent(calendar_text: str) -> tuple[icalendar.Calendar, Any]:
    calendar = icalendar.Calendar.from_ical(calendar_text)
    events = list(calendar.walk("VEVENT"))
    assert len(events) == 1
    return calendar, events[0]


def test_book_move_cancel_send_three_imip_messages_with_one_uid_and_rising_sequence(
    mail_server: RunningServer, smtp: tuple[int, Collector]
) -> None:
    collector = smtp[1]
    provider = make_provider(mail_server)
    address = fresh_address()
    monday = next_monday(3)
    created = requests.post(
        f"{mail_server.base_url}/api/v1/appointments",
        json=booking_body(provider, _api_instant(monday, 10), client=client(address)),
    )
    assert created.status_code == 201, created.text
    url = f"{mail_server.base_url}/api/v1/appointments/{created.json()['appointmentId']}"
    code = created.json()["confirmationCode"]
    wait_for(lambda: len(messages_to(collector, address)) == 1, "the invitation")
    moved = requests.put(
        url, params={"code": code}, json={"startTime": _api_instant(monday, 11, 30)}
    )
    assert moved.status_code == 200, moved.text
    wait_for(lambda: len(messages_to(collector, address)) == 2, "the update")
    cancelled = requests.delete(url, auth=provider.auth, json={"cancellationReason": "ill"})
    assert cancelled.status_code == 200, cancelled.text
    received = wait_for(
        lambda: (found := messages_to(collector, address)) and len(found) == 3 and found,
        "the cancellation",
    )
    stored = requests.get(
        f"{mail_server.dav_url}{provider.username}/appointments/"
        f"{created.json()['appointmentId']}.ics",
        auth=provider.auth,
    )
    stored_uid = str(the_vevent(stored.text)[1]["uid"])

    starts = [created.json()["startTime"], moved.json()["startTime"], moved.json()["startTime"]]
    seen = []
    for (envelope, message), start, method in zip(
        received, starts, ["REQUEST", "REQUEST", "CANCEL"], strict=True
    ):
        assert envelope.mail_from == FROM_ADDRESS
        assert envelope.rcpt_tos == [address]
        text, html, calendar_part = imip_parts(message)
        assert calendar_part.get_param("method") == method
        calendar, vevent = the_vevent(calendar_part.get_content())
        assert str(calendar["method"]) == method
        assert str(vevent["uid"]) == stored_uid
        assert vevent["organizer"] == f"mailto:{provider.username}@example.org"
        attendee = vevent["attendee"]
        assert attendee == f"mailto:{address}"
        assert attendee.params["RSVP"] == "TRUE" and attendee.params["PARTSTAT"] == "NEEDS-ACTION"
        assert "dtstamp" in vevent
        begins = vevent.decoded("dtstart")
        assert begins.utcoffset().total_seconds() == 0  # UTC times
        assert begins == datetime.fromisoformat(start)
        if method == "CANCEL":
            assert str(vevent["status"]) == "CANCELLED"
        # The client reads the time in their own zone (the API answers in it too), and the
        # provider's beside it.
        local = datetime.fromisoformat(start).astimezone(ZoneInfo(CLIENT_ZONE))
        berlin = local.astimezone(ZoneInfo("Europe/Berlin"))
        for body in (text.get_content(), message["Subject"]):
            assert f"{local:%H:%M}" in body and CLIENT_ZONE in body
        assert f"{berlin:%H:%M}" in text.get_content()
        assert f"{local:%H:%M}" in html.get_content()
        seen.append((int(vevent["sequence"]), message["Message-ID"]))
    assert [sequence for sequence, _ in seen] == [0, 1, 2]
    assert len({message_id for _, message_id in seen}) == 3
    assert all(mid.endswith("@clinic.example>") for _, mid in seen)

    notices = messages_to(collector, f"{provider.username}@example.org")
    wait_for(
        lambda: len(messages_to(collector, f"{provider.username}@example.org")) == 3,
        "three provider notices",
    )
    notices = messages_to(collector, f"{provider.username}@example.org")
    assert [m["Subject"].split(":")[0] for _, m in notices] == ["New booking", "Moved", "Cancelled"]


def test_a_client_name_cannot_inject_headers_or_recipients_and_notes_are_escaped(
    mail_server: RunningServer, smtp: tuple[int, Collector]
) -> None:
    collector = smtp[1]
    provider = make_provider(mail_server)
    address = fresh_address()
    response = requests.post(
        f"{mail_server.base_url}/api/v1/appointments",
        json=booking_body(
            provider,
            _api_instant(next_monday(3), 14),
            client=client(address, name="Eve\r\nBcc: evil@x.example\r\nX-Evil: 1"),
            notes='<script>alert("x")</script> & <b>bold</b>',
        ),
    )
    assert response.status_code == 201, response.text
    [(envelope, message)] = wait_for(lambda: messages_to(collector, address), "the invitation")
    assert envelope.rcpt_tos == [address]
    assert message["Bcc"] is None and message["X-Evil"] is None
    assert "evil@x.example" not in message["To"].addresses[0].addr_spec
    assert [a.addr_spec for a in message["To"].addresses] == [address]
    header_block = envelope.content.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in header_block and b"\nX-Evil:" not in header_block
    assert all("evil@x.example" not in e.rcpt_tos for e in collector.envelopes)
    _, html, calendar_part = imip_parts(message)
    assert "<script>" not in html.get_content()
    # Escaped, whichever entity the template engine picks for the quote (jinja2: &#34;).
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;" in html.get_content()
    _, vevent = the_vevent(calendar_part.get_content())  # still valid iCalendar
    assert "\n" not in vevent["attendee"].params["CN"]


def test_mail_queued_while_the_smtp_server_is_down_arrives_when_it_comes_up(
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here yet
    running = start_server(tmp_path / "server", mail=smtp_settings(port))
    controller = None
    try:
        provider = make_provider(running)
        address = fresh_address()
        booked = requests.post(
            f"{running.base_url}/api/v1/appointments",
            json=booking_body(provider, _api_instant(next_monday(3), 9), client=client(address)),
        )
        assert booked.status_code == 201, booked.text
        database = database_for(running.database_url)

        def rows() -> list[Any]:
            with database.read() as conn:
                return list(
                    conn.execute(
                        select(outbox_table).where(
                            outbox_table.c.appointment_id == booked.json()["appointmentId"],
                            # Reminders for the same appointment wait for their own time.
                            outbox_table.c.kind.in_((imip.CLIENT_IMIP, imip.PROVIDER_NOTICE)),
                        )
                    )
                )

        deferred = wait_for(
            lambda: all(r.attempts >= 1 and r.status == "pending" for r in rows()) and rows(),
            "a failed first attempt",
        )
        assert all(r.last_error for r in deferred)
        controller, collector = start_smtp(port)
        [(_, message)] = wait_for(lambda: messages_to(collector, address), "the retried invitation")
        imip_parts(message)
        wait_for(lambda: all(r.status == "sent" for r in rows()), "both rows sent")
        assert all(r.attempts >= 2 for r in rows())
        assert '"outbox row deferred"' in running.log_text() and '"mail sent"' in running.log_text()
    finally:
        running.stop()
        if controller is not None:
            controller.stop()


def test_without_an_smtp_host_mail_lands_in_the_maildir(
    server: RunningServer, provider: Provider
) -> None:
    address = fresh_address()
    booked = requests.post(
        f"{server.base_url}/api/v1/appointments",
        json=booking_body(provider, _api_instant(next_monday(5), 15), client=client(address)),
    )
    assert booked.status_code == 201, booked.text
    maildir = server.config_path.parent / "var" / "maildir"

    def delivered() -> list[EmailMessage]:
        if not (maildir / "new").is_dir():
            return []
        box = mailbox.Maildir(maildir, factory=None, create=False)
        found = []
        for key in box.iterkeys():
            message = email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
            if address in str(message["To"]):
                found.append(message)
        return found

    [message] = wait_for(delivered, "a file in the Maildir")
    _, _, calendar_part = imip_parts(message)  # type: ignore[arg-type]
    assert str(the_vevent(calendar_part.get_content())[0]["method"]) == "REQUEST"


@pytest.fixture
def provider(server: RunningServer) -> Provider:
    return make_provider(server)


def test_an_address_must_be_exactly_one_mailbox() -> None:
    assert imip.header_text("Eve\r\nBcc: x@y\t z") == "Eve Bcc: x@y z"
    assert imip.mailbox("Ann", "ann@example.org").addr_spec == "ann@example.org"
    for bad in ("a@b.example,evil@x.example", "a@b.example\r\nBcc: x@y", "nobody", "@x"):
        with pytest.raises(imip.Undeliverable):
            imip.mailbox("Eve", bad)


def test_retries_back_off_exponentially_with_jitter_and_a_cap() -> None:
    delays = [outbox.retry_delay_seconds(n) for n in range(1, outbox.MAX_ATTEMPTS + 1)]
    for attempt, delay in enumerate(delays, start=1):
        nominal = min(
            outbox.RETRY_BASE_SECONDS * outbox.RETRY_FACTOR ** (attempt - 1),
            outbox.RETRY_MAX_SECONDS,
        )
        assert nominal / 2 <= delay <= nominal + 1
    assert delays[-1] <= outbox.RETRY_MAX_SECONDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_never_hold_the_same_row_and_an_expired_lease_is_retried(
    backend: str, tmp_path: Path
) -> None:
    database = fresh_database(backend, tmp_path)
    with database.write() as conn:
        enqueue(conn, None, [("client.imip", {"event": "appointment.created"})] * 4)
    now = int(time.time())
    if backend == "postgresql":
        # The second worker runs while the first still holds its rows: SKIP LOCKED passes them.
        with database.write() as first:
            mine = outbox.claim_due(first, now, limit=2)
            with database.write() as second:
                theirs = outbox.claim_due(second, now, limit=10)
    else:  # one writer at a time: the second sees the first's leases
        with database.write() as conn:
            mine = outbox.claim_due(conn, now, limit=2)
        with database.write() as conn:
            theirs = outbox.claim_due(conn, now, limit=10)
    assert len(mine) == 2 and len(theirs) == 2
    assert not {row.id for row in mine} & {row.id for row in theirs}
    with database.write() as conn:
        assert outbox.claim_due(conn, now) == []
        # A crashed worker's lease runs out: the rows are due again, as a new attempt, and the
        # late worker can no longer record an outcome over the new one.
        again = outbox.claim_due(conn, now + outbox.LEASE_SECONDS + 1)
        assert len(again) == 4 and all(row.attempts == 2 for row in again)
        assert not outbox.finish(conn, mine[0], outbox.SENT)
        assert outbox.finish(conn, again[0], outbox.SENT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_claim_takes_expired_leases_then_the_oldest_rows_without_sorting_every_due_one(
    backend: str, tmp_path: Path
) -> None:
    """After a rush thousands of rows are due; a claim must read about the twenty it takes (an
    index range scan in order), not sort them all under the write lock."""
    from bookdav.storage.appointments import insert_outbox_rows, outbox_row

    database = fresh_database(backend, tmp_path)
    now = int(time.time())
    rows = [
        outbox_row("client.imip", None, {"n": n}, now=now - 100, due=now - 3_000 + n // 2)
        for n in range(3_000)
    ]
    with database.write() as conn:
        insert_outbox_rows(conn, rows)
        # A dead worker's lease, due again, though younger than every pending row.
        conn.execute(
            outbox_table.update()
            .where(outbox_table.c.payload == json.dumps({"n": 2_999}))
            .values(status=outbox.SENDING, next_attempt_at=now - 1)
        )
        conn.exec_driver_sql("ANALYZE")
    with database.read() as conn:
        statement = outbox.due_rows(outbox.PENDING, now, outbox.BATCH_SIZE)
        compiled = statement.compile(conn, compile_kwargs={"literal_binds": True})
        explain = "EXPLAIN QUERY PLAN " if backend == "sqlite" else "EXPLAIN "
        plan = " ".join(
            " ".join(str(part) for part in row)
            for row in conn.exec_driver_sql(explain + str(compiled))
        )
    assert "TEMP B-TREE" not in plan and "Seq Scan" not in plan, plan
    assert not re.search(r"(?<!Incremental )Sort\s+\(cost", plan), plan  # a full sort
    with database.write() as conn:
        claimed = outbox.claim_due(conn, now)
    assert [row.payload["n"] for row in claimed] == [2_999, *range(outbox.BATCH_SIZE - 1)]


def private_postgres_url() -> str:
    from sqlalchemy import create_engine, text

    from bookdav.storage.db import normalize_url
    from tests.conftest import require_postgres

    url = require_postgres()
    schema = f"kill9_{secrets.token_hex(4)}"
    engine = create_engine(normalize_url(url))
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}"


def drop_private_schema(url: str) -> None:
    from sqlalchemy import create_engine, text

    from bookdav.storage.db import normalize_url

    database_for(url).close()  # this process's pooled connections into the schema
    schema = url.rsplit("%3D", 1)[1]
    engine = create_engine(normalize_url(url.split("?")[0]))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_with_mail_queued_then_a_restart_delivers_every_message_with_its_message_id(
    backend: str, tmp_path: Path
) -> None:
    port = free_port()  # the SMTP server is down while the server books and dies
    # A database of its own: another server of the session on the shared PostgreSQL database
    # would otherwise take part in delivering these rows (as it should, in production).
    database_url = private_postgres_url() if backend == "postgresql" else None
    folder = tmp_path / "server"
    running = start_server(folder, database_url=database_url, mail=smtp_settings(port))
    controller = None
    try:
        provider = make_provider(running)
        addresses = [fresh_address() for _ in range(3)]
        ids = []
        for hour, address in zip((9, 10, 11), addresses, strict=True):
            booked = requests.post(
                f"{running.base_url}/api/v1/appointments",
                json=booking_body(
                    provider, _api_instant(next_monday(4), hour), client=client(address)
                ),
            )
            assert booked.status_code == 201, booked.text
            ids.append(booked.json()["appointmentId"])
        moved = requests.put(
            f"{running.base_url}/api/v1/appointments/{ids[0]}",
            auth=provider.auth,
            json={"startTime": _api_instant(next_monday(4), 14)},
        )
        assert moved.status_code == 200, moved.text
        database = database_for(running.database_url)
        mail_kinds = (imip.CLIENT_IMIP, imip.PROVIDER_NOTICE)

        def rows() -> list[Any]:
            with database.read() as conn:
                return list(
                    conn.execute(
                        select(outbox_table)
                        .where(
                            outbox_table.c.appointment_id.in_(ids),
                            outbox_table.c.kind.in_(mail_kinds),
                        )
                        .order_by(outbox_table.c.id)
                    )
                )

        wait_for(
            lambda: all(r.attempts >= 1 and r.status == "pending" for r in rows()) and rows(),
            "every row tried once and waiting to retry",
        )
        assert len(rows()) == 8
        running.process.kill()  # SIGKILL: no shutdown, no cleanup
        running.process.wait()
        assert all(r.status in ("pending", "sending") for r in rows())
        controller, collector = start_smtp(port)
        restarted = start_server(folder, database_url=database_url, mail=smtp_settings(port))
        try:
            final = wait_for(
                lambda: (
                    (found := rows())
                    and all(r.status in ("sent", "superseded") for r in found)
                    and found
                ),
                "every row delivered or superseded after the restart",
                timeout=60,
            )
        finally:
            restarted.stop()
        # The first invitation of the moved appointment (sequence 0) was superseded by the move.
        superseded = [r for r in final if r.status == "superseded"]
        assert {json.loads(r.payload)["sequence"] for r in superseded} == {0}
        assert {r.appointment_id for r in superseded} == {ids[0]}
        sent = [r for r in final if r.status == "sent"]
        expected_ids = {
            imip.message_id(r.id, json.loads(r.payload)["sequence"], FROM_ADDRESS) for r in sent
        }
        recipients = [*addresses, f"{provider.username}@example.org"]
        arrived = [m for address in recipients for _, m in messages_to(collector, address)]
        # None lost: every sent row arrived, under its stable Message-ID; a duplicate (allowed:
        # at least once) could only repeat one of those ids, never add a new message.
        assert {m["Message-ID"] for m in arrived} == expected_ids
        assert len(arrived) >= len(sent) == 6
    finally:
        running.stop()
        if controller is not None:
            controller.stop()
        if backend == "postgresql":
            drop_private_schema(database_url or "")


POLL_NEVER_SECONDS = 600  # longer than the test: only a wake-up can send the mail


@pytest.fixture(scope="module")
def slow_poll_server(
    tmp_path_factory: pytest.TempPathFactory, smtp: tuple[int, Collector]
) -> Iterator[RunningServer]:
    mail = smtp_settings(smtp[0]) + f"\npoll_seconds = {POLL_NEVER_SECONDS}"
    running = start_server(tmp_path_factory.mktemp("slow-poll"), mail=mail)
    yield running
    running.stop()


def test_a_write_through_the_api_or_the_booking_page_wakes_the_outbox_at_once(
    slow_poll_server: RunningServer,
    smtp: tuple[int, Collector],
) -> None:
    """The worker polls only every 600 s here (and has just made its start-up pass), so mail
    arriving within seconds was sent because the write woke it."""
    provider = make_provider(slow_poll_server)
    by_api = fresh_address()
    booked = requests.post(
        f"{slow_poll_server.base_url}/api/v1/appointments",
        json=booking_body(provider, _api_instant(next_monday(2), 10), client=client(by_api)),
    )
    assert booked.status_code == 201, booked.text
    wait_for(lambda: messages_to(smtp[1], by_api), "the invitation", timeout=10)

    service_url = f"{slow_poll_server.base_url}/api/v1/services/{provider.service_id}"
    page = BookablePage(provider, requests.get(service_url).json()["slug"])
    start = utc_instant(stamp(next_monday(2), 11))
    session, form = open_details(page, start, 7)
    assert post_details(page, (session, form)).status_code == 303
    wait_for(
        lambda: messages_to(smtp[1], form["email"]), "the page booking's invitation", timeout=10
    )
