"""Webhooks: subscriptions through the API, deliveries through the outbox, signed with HMAC-SHA256,
received by a real aiohttp server on loopback (one that fails at first, too)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from aiohttp import web

from bookdav.storage.db import database_for
from bookdav.storage.webhooks import insert_webhook
from tests.conftest import RunningServer, start_server
from tests.test_appointments import _api_instant, booking_body
from tests.test_availability import Provider, make_provider, next_monday
from tests.test_notifications import client, free_port, fresh_address, wait_for

SECRET = "a-long-shared-secret-for-tests"


class Receiver:
    """An aiohttp server in its own thread that records each POST; the first `failures` POSTs
    get a 503."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.failures > 0:
            self.failures -= 1
            self.statuses.append(503)
            return web.Response(status=503, text="not now")
        self.received.append((dict(request.headers), body))
        self.statuses.append(204)
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture(scope="module")
def hook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # The receivers listen on loopback, which only an explicit setting lets webhooks reach.
    running = start_server(
        tmp_path_factory.mktemp("webhooks"), server="allow_private_networks = true"
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("webhooks-guarded"))
    yield running
    running.stop()


def subscribe(provider: Provider, url: str, events: list[str]) -> requests.Response:
    return requests.post(
        f"{provider.server.base_url}/api/v1/webhooks",
        auth=provider.auth,
        json={"url": url, "events": events, "secret": SECRET},
    )


def book(provider: Provider, hour: int) -> dict[str, Any]:
    response = requests.post(
        f"{provider.server.base_url}/api/v1/appointments",
        json=booking_body(
            provider, _api_instant(next_monday(3), hour), client=client(fresh_address())
        ),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def test_subscribed_events_arrive_signed_and_others_do_not(hook_server: RunningServer) -> None:
    receiver = Receiver()
    try:
        provider = make_provider(hook_server)
        created = subscribe(
            provider, receiver.url, ["appointment.created", "appointment.cancelled"]
        )
        assert created.status_code == 201, created.text
        hook = created.json()
        assert "secret" not in hook and hook["events"] == [
            "appointment.created",
            "appointment.cancelled",
        ]
        booked = book(provider, 10)
        url = f"{hook_server.base_url}/api/v1/appointments/{booked['appointmentId']}"
        moved = requests.put(
            url, auth=provider.auth, json={"startTime": _api_instant(next_monday(3), 12)}
        )
        assert moved.status_code == 200
        assert requests.delete(url, auth=provider.auth).status_code == 200
        wait_for(lambda: len(receiver.received) == 2, "two deliveries")
        time.sleep(1)  # the move is not subscribed: nothing else comes
        assert [e["event"] for e in receiver.events()] == [
            "appointment.created",
            "appointment.cancelled",
        ]
        for headers, body in receiver.received:
            expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert headers["X-Bookdav-Signature"] == f"sha256={expected}"
            assert headers["X-Bookdav-Event"] == json.loads(body)["event"]
            assert headers["Content-Type"] == "application/json"
        assert len({h["X-Bookdav-Delivery"] for h, _ in receiver.received}) == 2
        last = receiver.events()[-1]["appointment"]
        assert last["appointmentId"] == booked["appointmentId"]
        assert last["status"] == "cancelled" and "manageToken" not in last
    finally:
        receiver.stop()


def test_a_failing_receiver_gets_the_same_signed_delivery_again_until_it_accepts(
    hook_server: RunningServer,
) -> None:
    receiver = Receiver(failures=1)
    try:
        provider = make_provider(hook_server)
        assert subscribe(provider, receiver.url, ["appointment.created"]).status_code == 201
        book(provider, 11)
        wait_for(lambda: receiver.received, "the retried delivery", timeout=30)
        assert receiver.statuses == [503, 204]
        assert '"outbox row deferred"' in hook_server.log_text()
        assert "HTTP 503" in hook_server.log_text()
    finally:
        receiver.stop()


def test_webhook_requests_are_validated_owned_and_deletable(hook_server: RunningServer) -> None:
    provider, other = make_provider(hook_server), make_provider(hook_server)
    base = f"{hook_server.base_url}/api/v1/webhooks"
    for body, field in (
        ({"url": "ftp://x.example/", "events": ["appointment.created"]}, "url"),
        ({"url": "http://u:p@x.example/", "events": ["appointment.created"]}, "url"),
        ({"url": "https://x.example/", "events": ["appointment.eaten"]}, "events"),
        ({"url": "https://x.example/", "events": []}, "events"),
        ({"url": "https://x.example/", "events": ["appointment.created"], "secret": "short"}, ""),
    ):
        body.setdefault("secret", SECRET)
        answer = requests.post(base, auth=provider.auth, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.headers["Content-Type"].startswith("application/problem+json")
        assert answer.json()["invalid-params"][0]["name"] == (field or "secret")
    anonymous = requests.post(
        base, json={"url": "https://x.example/", "events": ["appointment.created"]}
    )
    assert anonymous.status_code == 401
    hook = subscribe(provider, "https://x.example/hook", ["appointment.created"]).json()
    assert [h["webhookId"] for h in requests.get(base, auth=provider.auth).json()["items"]] == [
        hook["webhookId"]
    ]
    assert requests.get(base, auth=other.auth).json()["items"] == []
    assert requests.delete(f"{base}/{hook['webhookId']}", auth=other.auth).status_code == 403
    assert requests.delete(f"{base}/{hook['webhookId']}", auth=provider.auth).status_code == 204
    assert requests.delete(f"{base}/{hook['webhookId']}", auth=provider.auth).status_code == 404
    assert requests.get(base, auth=provider.auth).json()["items"] == []


def test_an_admins_webhook_hears_every_providers_appointments(hook_server: RunningServer) -> None:
    receiver = Receiver()
    try:
        admin = hook_server.add_user("admin")
        admin_auth = (admin, hook_server.passwords[admin])
        created = requests.post(
            f"{hook_server.base_url}/api/v1/webhooks",
            auth=admin_auth,
            json={"url": receiver.url, "events": ["appointment.created"], "secret": SECRET},
        )
        assert created.status_code == 201, created.text
        first, second = make_provider(hook_server), make_provider(hook_server)
        booked = [book(first, 9)["appointmentId"], book(second, 9)["appointmentId"]]
        wait_for(
            lambda: {e["appointment"]["appointmentId"] for e in receiver.events()} >= set(booked),
            "both providers' bookings",
        )
        hook_id = created.json()["webhookId"]
        gone = requests.delete(f"{hook_server.base_url}/api/v1/webhooks/{hook_id}", auth=admin_auth)
        assert gone.status_code == 204
    finally:
        receiver.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://10.1.2.3/hook",
        "http://[::1]/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[64:ff9b::a00:1]/hook",  # 10.0.0.1 through NAT64
    ],
)
def test_a_webhook_to_a_private_network_is_refused_unless_allowed(
    guarded_server: RunningServer, url: str
) -> None:
    provider = make_provider(guarded_server)
    answer = subscribe(provider, url, ["appointment.created"])
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["invalid-params"][0]["name"] == "url"
    assert "allow_private_networks" in problem["invalid-params"][0]["reason"]
    assert (
        requests.get(f"{guarded_server.base_url}/api/v1/webhooks", auth=provider.auth).json()[
            "items"
        ]
        == []
    )


def test_a_stored_webhook_to_a_private_address_is_not_delivered(
    guarded_server: RunningServer,
) -> None:
    """The delivery checks again: a hook stored before the guard (or whose name now resolves to a
    private address) never reaches the receiver."""
    receiver = Receiver()
    try:
        provider = make_provider(guarded_server)
        with database_for(guarded_server.database_url).write() as conn:
            insert_webhook(conn, provider.user_id, receiver.url, ["appointment.created"], SECRET)
        booked = book(provider, 10)

        def webhook_rows() -> list[dict[str, Any]]:
            rows = requests.get(
                f"{guarded_server.base_url}/api/v1/outbox",
                auth=provider.auth,
                params={"appointmentId": booked["appointmentId"]},
            ).json()["items"]
            return [row for row in rows if row["kind"] == "webhook"]

        wait_for(lambda: [r["status"] for r in webhook_rows()] == ["failed"], "a failed row")
        assert "non-public address" in webhook_rows()[0]["lastError"]
        assert receiver.statuses == []
    finally:
        receiver.stop()
