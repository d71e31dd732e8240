"""`[server] processes = 2`: one `bookdav serve` starts a sibling on the same port and database.

Proved on SQLite (where the siblings take turns at the one writer through `SqliteWriteLock`) and on
PostgreSQL: both processes answer, a slot goes to exactly one of many racing clients, a CalDAV
write through either is seen at once, and the sibling ends with the process that started it,
also after kill -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import RunningServer, start_server, write_config
from tests.test_appointments import _api_instant, booking_body, count_bookings
from tests.test_availability import make_provider, next_monday, stamp, vevent
from tests.test_multiprocess import fresh_postgres_database
from tests.test_server import assert_clean_failure, run_bookdav

RACERS = 120


@pytest.fixture(params=["sqlite", "postgresql"])
def two_process_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    with contextlib.ExitStack() as stack:
        url = (
            stack.enter_context(fresh_postgres_database())
            if request.param == "postgresql"
            else None
        )
        running = start_server(tmp_path, database_url=url, server="processes = 2")
        stack.callback(running.stop)
        yield running


def siblings_of(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run `bookdav _sibling`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"_sibling" in command:
            found.append(int(entry.name))
    return found


def answering_pids(server: RunningServer, path: str) -> set[int]:
    """Which processes logged a request for `path` (the JSON log names each line's pid)."""
    pids = set()
    for line in server.log_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "request" and record.get("path") == path:
                pids.add(record["pid"])
    return pids


def test_one_slot_goes_to_one_client_through_two_processes(
    two_process_server: RunningServer,
) -> None:
    server = two_process_server
    assert len(siblings_of(server.process.pid)) == 1
    provider = make_provider(server)
    start = _api_instant(next_monday(7), 10)
    gate = threading.Barrier(40)

    def attempt(n: int) -> int:
        if n < 40:
            gate.wait()
        # A new connection each time: the kernel spreads them over both listening processes.
        return requests.post(
            f"{server.base_url}/api/v1/appointments",
            json=booking_body(provider, start),
            headers={"Connection": "close"},
            timeout=60,
        ).status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(attempt, range(RACERS)))
    assert statuses.count(201) == 1, statuses
    assert statuses.count(409) == RACERS - 1
    assert count_bookings(provider) == (1, 1)
    assert len(answering_pids(server, "/api/v1/appointments")) == 2


def test_a_caldav_write_through_either_process_blocks_the_slot_at_once(
    two_process_server: RunningServer,
) -> None:
    server = two_process_server
    provider = make_provider(server)
    monday = next_monday(9)
    for hour in range(9, 15):  # each on a new connection, so both processes take some
        href = f"busy-{hour}.ics"
        put = requests.put(
            f"{server.dav_url}{provider.username}/appointments/{href}",
            data=vevent(f"DTSTART:{stamp(monday, hour)}", f"DTEND:{stamp(monday, hour + 1)}"),
            auth=provider.auth,
            headers={"Content-Type": "text/calendar", "Connection": "close"},
            timeout=60,
        )
        assert put.status_code == 201, put.text
        booked = requests.post(
            f"{server.base_url}/api/v1/appointments",
            json=booking_body(provider, _api_instant(monday, hour)),
            headers={"Connection": "close"},
            timeout=60,
        )
        assert booked.status_code == 409, booked.text


def _wait_gone(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_the_sibling_ends_with_the_first_process(tmp_path: Path) -> None:
    stopped = start_server(tmp_path / "stopped", server="processes = 2")
    siblings = siblings_of(stopped.process.pid)
    assert siblings
    stopped.stop()  # SIGTERM: the first process stops its siblings, then itself
    assert _wait_gone(siblings, 15)

    killed = start_server(tmp_path / "killed", server="processes = 2")
    siblings = siblings_of(killed.process.pid)
    assert siblings
    os.kill(killed.process.pid, signal.SIGKILL)
    killed.process.wait()
    assert _wait_gone(siblings, 15), "a sibling outlived the process that started it"


def test_several_processes_on_an_in_memory_database_are_refused(tmp_path: Path) -> None:
    """Each process would have a database of its own: a clear error, not two diverging servers."""
    config = write_config(tmp_path, database_url="sqlite:///:memory:", server="processes = 2")
    result = run_bookdav("serve", "--config", str(config))
    assert_clean_failure(result, "[server] processes")
    assert result.returncode == 2
