"""External conformance: a vdirsyncer two-way sync between a filesystem vdir and bookdav.

Starts `bookdav serve` (SQLite, a provider account, a fresh calendar), writes 100 events into a
vdir, syncs them up, then edits and deletes events on both sides (different ones on each), syncs
again, and checks that both sides hold exactly the expected events with the expected summaries,
and that one more sync changes nothing. Exits non-zero on any mismatch.

Run from anywhere: `python conformance/vdirsyncer_roundtrip.py` (vdirsyncer from the test extras).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import icalendar
import requests
from caldav.calendarobjectresource import Event
from caldav.davclient import DAVClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RunningServer, start_server  # noqa: E402 (needs the repo on the path)

EVENT_COUNT = 100
CALENDAR = "vdirsyncer-roundtrip"
# Which events each side changes between the two syncs; the sets do not overlap, so no conflict.
EDITED_LOCALLY = range(0, 10)
DELETED_LOCALLY = range(10, 20)
EDITED_REMOTELY = range(20, 30)
DELETED_REMOTELY = range(30, 40)


class Mismatch(Exception):
    """The two sides disagree, or disagree with what the edits should have left."""


def uid(number: int) -> str:
    return f"roundtrip-{number:03d}@bookdav.test"


def event_text(number: int, summary: str) -> str:
    day = 1 + number % 28
    month = 1 + number // 28
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//bookdav//vdirsyncer roundtrip//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid(number)}\r\nDTSTAMP:20300101T000000Z\r\n"
        f"DTSTART:2030{month:02d}{day:02d}T090000Z\r\nDTEND:2030{month:02d}{day:02d}T100000Z\r\n"
        f"SUMMARY:{summary}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )


def summaries_of(texts: list[str]) -> dict[str, str]:
    """UID -> SUMMARY of every event in these calendar objects."""
    found: dict[str, str] = {}
    for text in texts:
        for component in icalendar.Calendar.from_ical(text).walk("VEVENT"):
            found[str(component["UID"])] = str(component["SUMMARY"])
    return found


class Vdir:
    """The local side: one .ics file per event, as vdirsyncer's filesystem storage keeps it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def write(self, number: int, summary: str) -> None:
        # Write a new file and rename it over the old one: a new inode and mtime, so vdirsyncer
        # sees the change even within the same clock tick.
        target = self.path / f"{uid(number)}.ics"
        scratch = target.with_suffix(".tmp")
        scratch.write_text(event_text(number, summary), encoding="utf-8")
        scratch.replace(target)

    def edit(self, number: int, summary: str) -> None:
        matches = [p for p in self.path.glob("*.ics") if uid(number) in p.read_text()]
        if len(matches) != 1:
            raise Mismatch(f"{uid(number)} is in {len(matches)} local files")
        text = matches[0].read_text(encoding="utf-8")
        calendar = icalendar.Calendar.from_ical(text)
        for component in calendar.walk("VEVENT"):
            component["SUMMARY"] = summary
        scratch = matches[0].with_suffix(".tmp")
        scratch.write_bytes(calendar.to_ical())
        scratch.replace(matches[0])

    def delete(self, number: int) -> None:
        for path in self.path.glob("*.ics"):
            if uid(number) in path.read_text():
                path.unlink()

    def summaries(self) -> dict[str, str]:
        return summaries_of([p.read_text(encoding="utf-8") for p in self.path.glob("*.ics")])


class Remote:
    """The bookdav side, through the caldav client library."""

    def __init__(self, server: RunningServer, username: str) -> None:
        self.url = f"{server.dav_url}{username}/{CALENDAR}/"
        self.username = username
        self.password = server.passwords[username]
        self.client = DAVClient(url=server.dav_url, username=username, password=self.password)
        self.calendar = self.client.calendar(url=self.url)

    def create(self) -> None:
        response = requests.request(
            "MKCALENDAR", self.url, auth=(self.username, self.password), timeout=30
        )
        if response.status_code != 201:
            raise Mismatch(f"MKCALENDAR {self.url}: {response.status_code} {response.text}")

    def _event(self, number: int) -> Event:
        return self.calendar.event_by_uid(uid(number))

    def edit(self, number: int, summary: str) -> None:
        event = self._event(number)
        event.icalendar_component["SUMMARY"] = summary
        event.save()

    def delete(self, number: int) -> None:
        self._event(number).delete()

    def summaries(self) -> dict[str, str]:
        return summaries_of([event.data for event in self.calendar.events()])


def vdirsyncer(config: Path, *args: str) -> str:
    """Run vdirsyncer non-interactively; raise with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "vdirsyncer", "--config", str(config), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise Mismatch(f"vdirsyncer {' '.join(args)} exited {result.returncode}:\n{output}")
    return output


def sync_actions(output: str) -> list[str]:
    """The items a sync copied or deleted, from vdirsyncer's INFO log."""
    return [line for line in output.splitlines() if "Copying (" in line or "Deleting item" in line]


def write_config(work: Path, remote: Remote) -> Path:
    config = work / "vdirsyncer.conf"
    config.write_text(
        f"""[general]
status_path = "{work / "status"}/"

[pair bookdav]
a = "local"
b = "remote"
collections = null
conflict_resolution = "a wins"

[storage local]
type = "filesystem"
path = "{work / "vdir"}/"
fileext = ".ics"

[storage remote]
type = "caldav"
url = "{remote.url}"
username = "{remote.username}"
password = "{remote.password}"
""",
        encoding="utf-8",
    )
    return config


def expect_equal(label: str, actual: dict[str, str], expected: dict[str, str]) -> None:
    if actual == expected:
        print(f"  {label}: {len(actual)} events, as expected")
        return
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    raise Mismatch(f"{label}: missing {missing}, unexpected {extra}, wrong summary {wrong}")


def roundtrip(work: Path) -> None:
    server = start_server(work / "bookdav")
    try:
        username = server.add_user("provider")
        remote = Remote(server, username)
        remote.create()
        local = Vdir(work / "vdir")
        config = write_config(work, remote)
        expected = {uid(n): f"Event {n}" for n in range(EVENT_COUNT)}
        for n in range(EVENT_COUNT):
            local.write(n, f"Event {n}")

        vdirsyncer(config, "discover")
        vdirsyncer(config, "sync")
        print(f"first sync (vdir -> bookdav, {EVENT_COUNT} events):")
        expect_equal("bookdav", remote.summaries(), expected)

        for n in EDITED_LOCALLY:
            local.edit(n, f"Edited locally {n}")
            expected[uid(n)] = f"Edited locally {n}"
        for n in EDITED_REMOTELY:
            remote.edit(n, f"Edited on bookdav {n}")
            expected[uid(n)] = f"Edited on bookdav {n}"
        for n in DELETED_LOCALLY:
            local.delete(n)
            del expected[uid(n)]
        for n in DELETED_REMOTELY:
            remote.delete(n)
            del expected[uid(n)]

        actions = sync_actions(vdirsyncer(config, "--verbosity", "INFO", "sync"))
        print(f"second sync (10 edits and 10 deletions on each side): {len(actions)} actions")
        if len(actions) != 2 * (len(EDITED_LOCALLY) + len(DELETED_LOCALLY)):
            raise Mismatch("unexpected actions in the second sync:\n" + "\n".join(actions))
        expect_equal("vdir", local.summaries(), expected)
        expect_equal("bookdav", remote.summaries(), expected)

        changes = sync_actions(vdirsyncer(config, "--verbosity", "INFO", "sync"))
        if changes:
            raise Mismatch("a third sync still changed things:\n" + "\n".join(changes))
        print("third sync: nothing left to do")
    finally:
        server.stop()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bookdav-vdirsyncer-") as folder:
        try:
            roundtrip(Path(folder))
        except Mismatch as exc:
            print(f"FAIL: {exc}", file=sys.stderr)
            return 1
    print("OK: vdirsyncer round-trips edits and deletions both ways")
    return 0


if __name__ == "__main__":
    sys.exit(main())
