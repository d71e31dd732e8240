"""Remote calendar servers for the sync tests, all real and on loopback: Xandikos (PyPI), a stock
Radicale 3.9 with htpasswd logins, and an ICS feed served by aiohttp with ETags, 304s, a request
counter and switchable failures."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
from aiohttp import web


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}:\n{log.read_text(errors='replace')}")


@dataclass
class DavServer:
    """A CalDAV server process; `calendar_url` is one calendar collection on it."""

    process: subprocess.Popen[bytes]
    base_url: str
    calendar_url: str
    auth: tuple[str, str] | None
    command: list[str] = field(default_factory=list)
    log: Path | None = None

    def put(self, name: str, text: str) -> None:
        response = requests.put(
            self.calendar_url + name,
            data=text.encode(),
            auth=self.auth,
            headers={"Content-Type": "text/calendar; charset=utf-8"},
        )
        assert response.status_code in (200, 201, 204), response.text

    def delete(self, name: str) -> None:
        response = requests.delete(self.calendar_url + name, auth=self.auth)
        assert response.status_code in (200, 204), response.text

    def get(self, name: str) -> requests.Response:
        return requests.get(self.calendar_url + name, auth=self.auth)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        assert self.log is not None
        self.stop()
        port = int(self.base_url.rsplit(":", 1)[1])
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=self.log.open("a")
        )
        _wait_listening(port, self.process, self.log)


def start_xandikos(folder: Path) -> DavServer:
    port = free_port()
    log = folder / "xandikos.log"
    command = [
        sys.executable, "-m", "xandikos.web", "--defaults", "-d", str(folder / "data"),
        "-l", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait_listening(port, process, log)
    base = f"http://127.0.0.1:{port}"
    server = DavServer(process, base, f"{base}/user/calendars/calendar/", None, command, log)
    deadline = time.monotonic() + 20
    while requests.request("PROPFIND", server.calendar_url).status_code != 207:
        assert time.monotonic() < deadline, "xandikos has no default calendar"
        time.sleep(0.1)
    return server


RADICALE_USER = ("remote", "s3cret-pass")


def start_radicale(folder: Path, port: int | None = None) -> DavServer:
    """Stock Radicale with an htpasswd (plain) login `RADICALE_USER` and one calendar."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    htpasswd = folder / "users"
    htpasswd.write_text(f"{RADICALE_USER[0]}:{RADICALE_USER[1]}\n")
    log = folder / "radicale.log"
    command = [
        sys.executable, "-m", "radicale", "--config", "",
        "--server-hosts", f"127.0.0.1:{port}",
        "--storage-filesystem-folder", str(folder / "collections"),
        "--auth-type", "htpasswd", "--auth-htpasswd-filename", str(htpasswd),
        "--auth-htpasswd-encryption", "plain", "--auth-delay", "0",
        "--rights-type", "owner_only",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    _wait_listening(port, process, log)
    base = f"http://127.0.0.1:{port}"
    calendar_url = f"{base}/{RADICALE_USER[0]}/work/"
    server = DavServer(process, base, calendar_url, RADICALE_USER, command, log)
    if requests.request("PROPFIND", calendar_url, auth=RADICALE_USER).status_code == 404:
        made = requests.request("MKCALENDAR", calendar_url, auth=RADICALE_USER)
        assert made.status_code == 201, made.text
    return server


class FeedServer:
    """An ICS feed in a thread: `body` is served with a strong ETag and Last-Modified, 304 for a
    matching `If-None-Match`; `status` forces an error answer; `requests` counts GETs."""

    def __init__(self) -> None:
        self.body = b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\nEND:VCALENDAR\r\n"
        self.status = 200
        self.requests = 0
        self.bytes_sent = 0
        self.not_modified = 0
        # With a bearer token set, the feed wants it (OAuth2); /token hands it out.
        self.bearer = ""
        self.token_requests = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/calendar.ics?token=secret-feed-token"
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/calendar.ics", self._serve)
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.bearer and request.headers.get("Authorization") != f"Bearer {self.bearer}":
            return web.Response(status=401, text="token expired")
        if self.status != 200:
            return web.Response(status=self.status, text="remote trouble")
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        self.bytes_sent += len(self.body)
        return web.Response(
            body=self.body,
            headers={
                "ETag": etag,
                "Last-Modified": "Tue, 24 Nov 2026 10:00:00 GMT",
                "Content-Type": "text/calendar; charset=utf-8",
            },
        )

    async def _token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "refresh-1":
            return web.json_response({"error": "invalid_grant"}, status=400)
        return web.json_response({"access_token": self.bearer, "expires_in": 3600})

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def calendar(*events: str) -> str:
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//remote tests//EN\r\n"
        + "".join(events)
        + "END:VCALENDAR\r\n"
    )


def event(*lines: str, uid: str | None = None) -> str:
    inner = "".join(line + "\r\n" for line in lines)
    return (
        f"BEGIN:VEVENT\r\nUID:{uid or uuid.uuid4()}\r\nDTSTAMP:20260101T000000Z\r\n"
        f"{inner}END:VEVENT\r\n"
    )


def many_events(count: int, first_day: str = "20270104") -> Iterator[tuple[str, str]]:
    """(uid, VEVENT) pairs: `count` one-hour events, one a day from `first_day` at 07:00 UTC."""
    from datetime import date, timedelta

    start = date(int(first_day[:4]), int(first_day[4:6]), int(first_day[6:]))
    for n in range(count):
        day = (start + timedelta(days=n)).strftime("%Y%m%d")
        uid = f"bulk-{n}@remote.example"
        yield (
            uid,
            event(f"DTSTART:{day}T070000Z", f"DTEND:{day}T080000Z", f"SUMMARY:Bulk {n}", uid=uid),
        )
