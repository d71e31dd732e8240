"""What providers and operators choose about notifications: templates (built-in, a templates
folder, per service), and whether a provider is emailed about their appointments."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from bookdav.notify import imip
from bookdav.storage.db import database_for
from bookdav.storage.schema import outbox
from tests.conftest import RunningServer, start_server
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import Provider, make_provider, next_monday
from tests.test_notifications import (
    Collector,
    client,
    fresh_address,
    imip_parts,
    messages_to,
    smtp,  # noqa: F401  (module fixture)
    smtp_settings,
    wait_for,
)

FOLDER_TEMPLATE = "FROM THE FOLDER {{ verb }} {{ service }} {{ when_provider }}\n"


@pytest.fixture(scope="module")
def settings_server(
    tmp_path_factory: pytest.TempPathFactory,
    smtp: tuple[int, Collector],  # noqa: F811
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("notification-settings")
    templates = folder / "templates"
    templates.mkdir()
    (templates / "provider.txt").write_text(FOLDER_TEMPLATE, encoding="utf-8")
    mail = smtp_settings(smtp[0]) + f"\ntemplates_dir = {templates}"
    running = start_server(folder / "server", mail=mail)
    yield running
    running.stop()


def set_templates(provider: Provider, templates: dict[str, str]) -> requests.Response:
    return requests.put(
        f"{provider.server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"notifications": {"templates": templates}},
    )


def book(provider: Provider, address: str, hour: int = 10, **extra: Any) -> dict[str, Any]:
    response = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(
            provider, _api_instant(next_monday(3), hour), client=client(address), **extra
        ),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_service_template_shapes_the_text_and_html_stays_escaped(
    settings_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = make_provider(settings_server)
    requests.put(
        f"{settings_server.base_url}/api/v1/services/{provider.service_id}",
        auth=provider.auth,
        json={"rules": {"cancellationNoticeMinutes": 1440}},
    ).raise_for_status()
    answer = set_templates(
        provider,
        {
            "client.txt": "Dear {{ client_name }}, see you for {{ service }}.\n"
            "Link: {{ manage_url }}\n{{ policy }}\n",
            "client.html": "<p>Custom {{ notes }}</p>",
        },
    )
    assert answer.status_code == 200, answer.text
    assert "client.txt" in answer.json()["notifications"]["templates"]
    address = fresh_address()
    booked = book(provider, address, notes="<b>hi</b>")
    [(_, message)] = wait_for(lambda: messages_to(smtp[1], address), "the invitation")
    text, html, _ = imip_parts(message)
    body = text.get_content()
    assert body.startswith("Dear Ann Example, see you for Consultation.")
    assert f"Link: {booked['manageUrl']}" in body
    assert "cancel or move at least 24 hours ahead" in body
    assert html.get_content().strip() == "<p>Custom &lt;b&gt;hi&lt;/b&gt;</p>"


def test_a_template_that_does_not_compile_is_a_400_naming_it(
    settings_server: RunningServer,
) -> None:
    provider = make_provider(settings_server)
    for templates, field in (
        ({"client.txt": "{% if %}"}, "notifications.templates.client.txt"),
        ({"nope.txt": "x"}, "notifications.templates.nope.txt"),
        ({"client.txt": 5}, "notifications.templates.client.txt"),
    ):
        answer = set_templates(provider, templates)  # type: ignore[arg-type]
        assert answer.status_code == 400, answer.text
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert answer.json()["invalid-params"][0]["name"] == field
    service = requests.get(
        f"{settings_server.base_url}/api/v1/services/{provider.service_id}"
    ).json()
    assert service["notifications"]["templates"] == {}  # nothing half-written


def test_a_sandboxed_template_cannot_reach_python_and_falls_back_to_the_default(
    settings_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = make_provider(settings_server)
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    assert set_templates(provider, {"client.txt": evil}).status_code == 200  # it compiles
    address = fresh_address()
    book(provider, address)
    [(_, message)] = wait_for(lambda: messages_to(smtp[1], address), "the invitation")
    text = imip_parts(message)[0].get_content()
    assert "subclasses" not in text and "<class" not in text
    assert text.startswith("Your appointment is booked")
    assert '"service template failed, using the default"' in settings_server.log_text()


def test_the_templates_folder_overrides_the_built_in_provider_notice(
    settings_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = make_provider(settings_server)
    book(provider, fresh_address(), hour=11)
    [(_, notice)] = wait_for(
        lambda: messages_to(smtp[1], f"{provider.username}@example.org"), "the provider notice"
    )
    assert (
        notice.get_body(preferencelist=("plain",))
        .get_content()
        .startswith("FROM THE FOLDER New booking Consultation")
    )


def test_a_provider_who_opts_out_gets_no_email_but_the_event_is_in_their_calendar(
    settings_server: RunningServer,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    provider = make_provider(settings_server)
    url = f"{settings_server.base_url}/api/v1/users/{provider.user_id}/preferences"
    assert requests.get(url, auth=provider.auth).json() == {
        "notifyByEmail": None,
        "effective": {"notifyByEmail": True},
    }
    bad = requests.put(url, auth=provider.auth, json={"notifyByEmail": "no"})
    assert bad.status_code == 400 and bad.json()["invalid-params"][0]["name"] == "notifyByEmail"
    assert requests.put(url, auth=provider.auth, json={"colour": 1}).status_code == 400
    other = make_provider(settings_server)
    assert requests.put(url, auth=other.auth, json={"notifyByEmail": False}).status_code == 403
    chosen = requests.put(url, auth=provider.auth, json={"notifyByEmail": False})
    assert chosen.status_code == 200 and chosen.json()["effective"]["notifyByEmail"] is False

    address = fresh_address()
    booked = book(provider, address, hour=12)
    wait_for(lambda: messages_to(smtp[1], address), "the client's invitation")
    database = database_for(settings_server.database_url)

    def notice_status() -> str | None:
        with database.read() as conn:
            return conn.execute(
                select(outbox.c.status).where(
                    outbox.c.appointment_id == booked["appointmentId"],
                    outbox.c.kind == imip.PROVIDER_NOTICE,
                )
            ).scalar()

    assert wait_for(lambda: notice_status() == "superseded", "the notice skipped")
    assert messages_to(smtp[1], f"{provider.username}@example.org") == []
    stored = requests.get(
        f"{settings_server.dav_url}{provider.username}/appointments/{booked['appointmentId']}.ics",
        auth=provider.auth,
    )
    assert stored.status_code == 200 and booked["appointmentId"] in stored.text


def test_with_notify_providers_off_only_providers_who_opt_in_are_emailed(
    tmp_path: Path,
    smtp: tuple[int, Collector],  # noqa: F811
) -> None:
    running = start_server(tmp_path, mail=smtp_settings(smtp[0]) + "\nnotify_providers = false")
    try:
        silent, keen = make_provider(running), make_provider(running)
        url = f"{running.base_url}/api/v1/users/{keen.user_id}/preferences"
        assert requests.put(url, auth=keen.auth, json={"notifyByEmail": True}).status_code == 200
        book(silent, fresh_address())
        book(keen, fresh_address())
        wait_for(
            lambda: messages_to(smtp[1], f"{keen.username}@example.org"), "the opted-in notice"
        )
        wait_for(lambda: "the provider chose no email notices" in running.log_text(), "skip")
        assert messages_to(smtp[1], f"{silent.username}@example.org") == []
    finally:
        running.stop()
