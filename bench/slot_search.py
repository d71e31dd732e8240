"""Slot search over HTTP: one provider, one month, 1,000 and 10,000 events in their calendars.

    python bench/slot_search.py [--sizes 1000,10000] [--requests 400] [--seconds 10]

Starts `bookdav serve` on loopback, loads the events straight into its database, spread evenly over
five years around the searched month (45 minutes each, a tenth of them weekly for 20 weeks: a
provider's history and future, not one solid wall of meetings), then drives GET /api/v1/providers/{id}/availability from a separate process:
latency percentiles at concurrency 1, throughput at concurrency 16. Prints a Markdown table and
writes it into docs/performance.md under "## Slot search (issue 11)".
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
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import replace_section, start_bookdav  # noqa: E402

SECTION = "## Slot search (issue 11)"
BASE = datetime(2025, 1, 1, 8, 0, tzinfo=UTC)
SPREAD_MINUTES = 5 * 525_600
MONTH = ("2027-06-01", "2027-06-30")


def event_text(i: int, count: int) -> str:
    start = BASE + timedelta(minutes=i * (SPREAD_MINUTES // count))
    end = start + timedelta(minutes=45)
    rule = "RRULE:FREQ=WEEKLY;COUNT=20\r\n" if i % 10 == 0 else ""
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bookdav bench//EN\r\nBEGIN:VEVENT\r\n"
        f"UID:p{i}@bench\r\nDTSTAMP:20260101T000000Z\r\n"
        f"DTSTART:{start:%Y%m%dT%H%M%SZ}\r\nDTEND:{end:%Y%m%dT%H%M%SZ}\r\n{rule}"
        f"SUMMARY:Busy {i}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )


def set_up_provider(base_url: str, folder: Path, events: int) -> tuple[str, str]:
    """A provider with weekday hours, a 30-minute service and `events` busy events."""
    from bookdav.booking.accounts import add_user
    from bookdav.storage import calendars
    from bookdav.storage.db import Database

    database = Database(f"sqlite:///{folder}/bookdav.sqlite3")
    add_user(
        database,
        username="bench",
        email="bench@example.org",
        role="provider",
        password="bench-password",
        timezone="Europe/Berlin",
    )
    auth = ("bench", "bench-password")
    me = requests.get(f"{base_url}/api/v1/users/me", auth=auth).json()
    hours = requests.post(
        f"{base_url}/api/v1/providers/{me['userId']}/availability",
        auth=auth,
        json={
            "timezone": "Europe/Berlin",
            "validFrom": "2027-01-01",
            "timeSlots": [
                {"dayOfWeek": d, "startTime": "09:00", "endTime": "17:00"}
                for d in ("MO", "TU", "WE", "TH", "FR")
            ],
        },
    )
    hours.raise_for_status()
    service = requests.post(
        f"{base_url}/api/v1/services",
        auth=auth,
        json={
            "name": "Consultation",
            "duration": 30,
            "rules": {"minNoticeMinutes": 0, "maxAdvanceDays": 730},
        },
    )
    service.raise_for_status()
    with database.write(["bench"]) as conn:
        calendar = calendars.get_collection(conn, "bench/appointments")
        assert calendar is not None
        for i in range(events):
            calendars.put_item(conn, calendar, f"p{i}.ics", event_text(i, events))
    database.close()
    return me["userId"], service.json()["serviceId"]


async def drive(urls: list[str], concurrency: int, count: int, seconds: float) -> dict[str, float]:
    """Send requests (cycling through `urls`) from `concurrency` workers until `count` are done
    or `seconds` pass."""
    import aiohttp

    next_url = itertools.cycle(urls)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while len(latencies) < count and time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.get(next(next_url)) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "per_second": len(latencies) / elapsed,
        "requests": len(latencies),
    }


def run_driver(
    url: str | list[str], concurrency: int, count: int, seconds: float
) -> dict[str, float]:
    """The load generator runs in its own process, so it does not share the server's cores' GIL."""
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--drive",
            json.dumps([url] if isinstance(url, str) else url),
            "--concurrency",
            str(concurrency),
            "--requests",
            str(count),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output)


def measure(size: int, count: int, seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bookdav-slots-") as tmp:
        folder = Path(tmp)
        process, base_url = start_bookdav(
            folder,
            "[server]\nport = 0\n[storage]\nurl = sqlite:///bookdav.sqlite3\n"
            "[logging]\nlevel = warning\n",
        )
        try:
            print(f"loading {size} events ...", file=sys.stderr, flush=True)
            provider_id, service_id = set_up_provider(base_url, folder, size)
            url = (
                f"{base_url}/api/v1/providers/{provider_id}/availability?serviceId={service_id}"
                f"&startDate={MONTH[0]}&endDate={MONTH[1]}"
            )
            slots = requests.get(url).json()["slots"]
            run_driver(url, 4, 100, 5)  # warm-up
            print(f"measuring {size} events ...", file=sys.stderr, flush=True)
            single = run_driver(url, 1, count, 60)
            parallel = run_driver(url, 16, 10**9, seconds)
            # Cold: each search a window never asked before, so nothing comes from the cache.
            first = date.fromisoformat(MONTH[0])
            cold_urls = [
                url.replace(
                    f"startDate={MONTH[0]}", f"startDate={first + timedelta(days=n)}"
                ).replace(f"endDate={MONTH[1]}", f"endDate={first + timedelta(days=n + 29)}")
                for n in range(1, 101)
            ]
            cold = run_driver(cold_urls, 1, len(cold_urls), 120)
        finally:
            process.terminate()
            process.wait()
    return {
        "size": size,
        "slots": len(slots),
        "single": single,
        "parallel": parallel,
        "cold": cold,
    }


def table(results: list[dict[str, object]]) -> str:
    lines = [
        "| events | slots in month | p50 c=1 (ms) | p99 c=1 (ms) | searches/s c=16 "
        "| p99 c=16 (ms) | cold p50 / p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        single, parallel, cold = r["single"], r["parallel"], r["cold"]
        assert isinstance(single, dict) and isinstance(parallel, dict) and isinstance(cold, dict)
        lines.append(
            f"| {r['size']:,} | {r['slots']} | {single['p50_ms']:.2f} | {single['p99_ms']:.2f} "
            f"| {parallel['per_second']:.0f} | {parallel['p99_ms']:.1f} "
            f"| {cold['p50_ms']:.2f} / {cold['p99_ms']:.2f} |"
        )
    if len(results) >= 2:
        small, large = results[0]["single"], results[-1]["single"]
        assert isinstance(small, dict) and isinstance(large, dict)
        lines.append("")
        lines.append(
            f"p50 at {results[-1]['size']:,} events is {large['p50_ms'] / small['p50_ms']:.2f}x "
            f"the p50 at {results[0]['size']:,} (target: within 1.5x). Targets: p50 <= 5 ms, "
            "p99 <= 20 ms at c=1; >= 500 searches/s at c=16. The hot columns repeat one month's "
            "search (served from the revision-keyed cache); the cold column asks a new window "
            "every time (nothing cached)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--drive", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        print(
            json.dumps(
                asyncio.run(
                    drive(json.loads(args.drive), args.concurrency, args.requests, args.seconds)
                )
            )
        )
        return
    results = [measure(int(size), args.requests, args.seconds) for size in args.sizes.split(",")]
    body = table(results)
    machine = (
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, SQLite; month {MONTH[0]}..{MONTH[1]}, a 30-minute "
        "service, Mon-Fri 09:00-17:00 Europe/Berlin; the load generator in its own process."
    )
    print(body)
    replace_section(
        ROOT / "docs/performance.md",
        SECTION,
        f"Command: `python bench/slot_search.py`. {machine}\n\n{body}\n",
    )


if __name__ == "__main__":
    main()
