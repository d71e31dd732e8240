"""Booking throughput and the one-slot stampede, on SQLite and on PostgreSQL.

    python bench/booking.py [--seconds 20] [--connections 64] [--stampede 500] [--backends sqlite,postgresql] [--processes 1,2]

Starts `bookdav serve` on loopback (PostgreSQL: a fresh database on BOOKDAV_TEST_DATABASE_URL's
server), makes 100 providers offering one 30-minute service around the clock, then, from a
separate process: 64 connections book distinct free slots for `--seconds`; afterwards every 201 is
checked to be a real booking (appointment row, VEVENT, its invitation and notice outbox rows). Then 500 clients race for
one slot: exactly one 201. Prints a Markdown table and writes it into docs/performance.md under
"## Booking (issue 12)".
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import replace_section, server_errors, start_bookdav  # noqa: E402

SECTION = "## Booking (issue 12)"
PROVIDERS = 100
DAYS = [f"{d}" for d in ("MO", "TU", "WE", "TH", "FR", "SA", "SU")]


def set_up(base_url: str, database_url: str) -> tuple[list[str], str]:
    """100 providers open around the clock, and one 30-minute service they all offer."""
    from bookdav.booking.accounts import add_user
    from bookdav.storage.db import Database

    database = Database(database_url)
    add_user(
        database,
        username="benchadmin",
        email="a@example.org",
        role="admin",
        password="bench-password",
    )
    admin = ("benchadmin", "bench-password")
    provider_ids = []
    for n in range(PROVIDERS):
        user = add_user(
            database,
            username=f"p{n}",
            email=f"p{n}@example.org",
            role="provider",
            password="bench-password",
            timezone="UTC",
        )
        provider_ids.append(user.id)
        requests.post(
            f"{base_url}/api/v1/providers/{user.id}/availability",
            auth=admin,
            json={
                "timezone": "UTC",
                "validFrom": "2026-01-01",
                "timeSlots": [
                    {"dayOfWeek": d, "startTime": "00:00", "endTime": "24:00"} for d in DAYS
                ],
            },
        ).raise_for_status()
    service = requests.post(
        f"{base_url}/api/v1/services",
        auth=admin,
        json={
            "name": "Consultation",
            "duration": 30,
            "providerIds": provider_ids,
            "rules": {"minNoticeMinutes": 0, "maxAdvanceDays": 730},
        },
    )
    service.raise_for_status()
    database.close()
    return provider_ids, service.json()["serviceId"]


async def storm(
    base_url: str,
    provider_ids: list[str],
    service_id: str,
    connections: int,
    seconds: float,
    first_day: datetime,
) -> dict[str, object]:
    """`connections` workers book distinct slots (round-robin over providers) for `seconds`."""
    import aiohttp

    slots = (
        (provider_ids[i % PROVIDERS], first_day + timedelta(minutes=30 * (i // PROVIDERS)))
        for i in itertools.count()
    )
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    created: list[str] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                provider_id, start = next(slots)
                body = {
                    "serviceId": service_id,
                    "providerId": provider_id,
                    "startTime": start.isoformat(),
                    "client": {"name": "Bench", "email": "bench@example.org"},
                }
                began = time.perf_counter()
                async with session.post(f"{base_url}/api/v1/appointments", json=body) as response:
                    answer = await response.read()
                latencies.append(time.perf_counter() - began)
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 201:
                    created.append(json.loads(answer)["appointmentId"])

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - began
    return {
        "per_second": statuses.get(201, 0) / elapsed,
        "statuses": statuses,
        "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99),
        "created": created,
    }


async def stampede(
    base_url: str, provider_id: str, service_id: str, clients: int, start: datetime
) -> dict[str, object]:
    """`clients` connections POST the same slot at once."""
    import aiohttp

    body = {
        "serviceId": service_id,
        "providerId": provider_id,
        "startTime": start.isoformat(),
        "client": {"name": "Racer", "email": "racer@example.org"},
    }
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    gate = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def one() -> None:
            await gate.wait()
            began = time.perf_counter()
            async with session.post(f"{base_url}/api/v1/appointments", json=body) as response:
                await response.read()
            latencies.append(time.perf_counter() - began)
            statuses[response.status] = statuses.get(response.status, 0) + 1

        tasks = [asyncio.create_task(one()) for _ in range(clients)]
        await asyncio.sleep(0.2)
        gate.set()
        await asyncio.gather(*tasks)
    return {"statuses": statuses, "p99_ms": _percentile(latencies, 0.99)}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    if fraction == 0.5:
        return statistics.median(ordered) * 1000
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000


def verify(database_url: str, created: list[str]) -> tuple[int, int]:
    """How many of the 201s are real bookings: row, VEVENT in the calendar, the two iMIP outbox
    rows (invitation and provider notice; reminder rows come on top); and how many of those
    messages were not sent yet when the storm ended (the outbox catches up after a rush)."""
    from sqlalchemy import func, select

    from bookdav.storage.db import Database
    from bookdav.storage.schema import appointments, items, outbox

    database = Database(database_url)
    real = 0
    with database.read() as conn:
        for chunk in range(0, len(created), 500):
            ids = created[chunk : chunk + 500]
            rows = conn.execute(
                select(appointments.c.id, appointments.c.event_href).where(
                    appointments.c.id.in_(ids)
                )
            ).all()
            events = set(
                conn.execute(
                    select(items.c.href).where(items.c.href.in_([r.event_href for r in rows]))
                ).scalars()
            )
            outboxed = dict(
                conn.execute(
                    select(outbox.c.appointment_id, func.count())
                    .where(
                        outbox.c.appointment_id.in_(ids),
                        outbox.c.kind.in_(("client.imip", "provider.notice")),
                    )
                    .group_by(outbox.c.appointment_id)
                ).all()
            )
            real += sum(1 for r in rows if r.event_href in events and outboxed.get(r.id) == 2)
        unsent = conn.execute(
            select(func.count()).where(
                outbox.c.kind.in_(("client.imip", "provider.notice")),
                outbox.c.status.in_(("pending", "sending")),
            )
        ).scalar_one()
    database.close()
    return real, unsent


def run_in_process(coroutine_name: str, *args: object) -> dict[str, object]:
    """The load generator in its own process, so it does not share the server's interpreter."""
    output = subprocess.run(
        [sys.executable, __file__, "--drive", json.dumps([coroutine_name, *args], default=str)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output)


def measure(
    backend: str, processes: int, seconds: float, connections: int, clients: int
) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bookdav-booking-") as tmp:
        database_url, drop = _database(backend, Path(tmp))
        process, base_url = start_bookdav(
            Path(tmp),
            f"[server]\nport = 0\nprocesses = {processes}\n[storage]\nurl = {database_url}\n"
            "[booking]\nguest_bookings_per_minute = 0\n[logging]\nlevel = warning\n",
        )
        result: dict[str, object] = {}
        try:
            print(f"[{backend}] setting up {PROVIDERS} providers ...", file=sys.stderr, flush=True)
            provider_ids, service_id = set_up(base_url, database_url)
            first_day = datetime.now(UTC).replace(
                hour=0, minute=0, second=0, microsecond=0
            ) + timedelta(days=2)
            print(
                f"[{backend}] booking storm, {connections} connections, {seconds:.0f} s ...",
                file=sys.stderr,
                flush=True,
            )
            result = run_in_process(
                "storm",
                base_url,
                provider_ids,
                service_id,
                connections,
                seconds,
                first_day.isoformat(),
            )
            created = result.pop("created")
            assert isinstance(created, list)
            result["real"], result["unsent"] = verify(database_url, created)
            print(f"[{backend}] stampede of {clients} ...", file=sys.stderr, flush=True)
            result["stampede"] = run_in_process(
                "stampede",
                base_url,
                provider_ids[0],
                service_id,
                clients,
                (first_day + timedelta(days=300)).isoformat(),
            )
        finally:
            process.terminate()
            process.wait()
            drop()
            if any(status.startswith("5") for status in _statuses_seen(result)):
                print(f"[{backend}] the server answered 5xx; its log says:", file=sys.stderr)
                print(server_errors(Path(tmp)), file=sys.stderr, flush=True)
    return {"backend": backend, "processes": processes, **result}


def _statuses_seen(result: dict[str, object]) -> list[str]:
    """Every status the storm and the stampede got, as far as they got."""
    statuses = result.get("statuses")
    seen = list(statuses) if isinstance(statuses, dict) else []
    stampede = result.get("stampede")
    if isinstance(stampede, dict):
        seen += list(stampede.get("statuses", {}))
    return [str(status) for status in seen]


def _database(backend: str, folder: Path) -> tuple[str, object]:
    if backend == "sqlite":
        return f"sqlite:///{folder}/bookdav.sqlite3", lambda: None
    import psycopg

    admin_url = os.environ.get(
        "BOOKDAV_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
    )
    admin_url = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"bookdav_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| backend | processes | bookings/s (c=64) | p50 (ms) | p99 (ms) | 201s verified real | other answers "
        "| mail not yet sent at the end | stampede: 201s | stampede: 409s | stampede p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        statuses = r["statuses"]
        stampede_result = r["stampede"]
        assert isinstance(statuses, dict) and isinstance(stampede_result, dict)
        others = {k: v for k, v in statuses.items() if str(k) != "201"}
        st = stampede_result["statuses"]
        assert isinstance(st, dict)
        lines.append(
            f"| {r['backend']} | {r['processes']} | {r['per_second']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['real']} of {statuses.get('201', 0)} | {others or '-'} | {r['unsent']} "
            f"| {st.get('201', 0)} | {st.get('409', 0)} | {stampede_result['p99_ms']:.0f} |"
        )
    lines.append("")
    lines.append(
        "Targets: >= 1,000 bookings/s with p99 <= 100 ms on SQLite, >= 600/s on "
        "PostgreSQL; the stampede: exactly one 201, p99 <= 500 ms."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stampede", type=int, default=500)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--processes", default="1,2", help="`[server] processes` values to measure, comma-separated"
    )
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        name, *rest = json.loads(args.drive)
        if name == "storm":
            base_url, provider_ids, service_id, connections, seconds, first = rest
            coroutine = storm(
                base_url,
                provider_ids,
                service_id,
                connections,
                seconds,
                datetime.fromisoformat(first),
            )
        else:
            base_url, provider_id, service_id, clients, start = rest
            coroutine = stampede(
                base_url, provider_id, service_id, clients, datetime.fromisoformat(start)
            )
        print(json.dumps(asyncio.run(coroutine)))
        return
    results = [
        measure(backend, int(processes), args.seconds, args.connections, args.stampede)
        for backend in args.backends.split(",")
        for processes in args.processes.split(",")
    ]
    body = table(results)
    print(body)
    machine = (
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; server, database and load generator share them."
    )
    replace_section(
        ROOT / "docs/performance.md",
        SECTION,
        f"Command: `python bench/booking.py`. {machine}\n\n{body}\n",
    )


if __name__ == "__main__":
    main()
