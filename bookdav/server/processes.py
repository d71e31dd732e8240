"""Several `bookdav serve` processes on one port, started by the first, living and dying with it.

One Python process runs one event loop under one GIL: on SQLite a booking storm saturates it at
well under a core's worth of the database's capacity. With `[server] processes = N` the process
the user started (the first) binds the port with SO_REUSEPORT, applies the migrations, and starts
N - 1 siblings (`python -m bookdav _sibling`), each binding the same port; the kernel spreads new
connections over them. They share the database as separate hosts would (PostgreSQL advisory
locks; on SQLite one writer at a time through `SqliteWriteLock`), and every cache that matters is
keyed by calendar revisions, so a write through one is seen through the others at once.

A sibling reads its settings (the first process's, resolved, with the actual port) as one JSON
line on stdin and says "ready" on stdout once it listens; the first process waits for that before
it prints its banner, so clients that connect then are spread over all of them. The pipe on the
sibling's stdin stays open: when the first process ends, however it ends (kill -9 included), the
sibling reads end-of-file and shuts down. Only the first process listens for inbound mail
(`[mail] inbound_listen`: one port, one listener); the outbox and sync workers run in each, as
they would on separate hosts.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bookdav.config import Settings
from bookdav.logs import log_event

log = logging.getLogger("bookdav")

READY = b"ready\n"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


class SiblingFailed(Exception):
    """A sibling process did not start listening."""


def start_siblings(settings: Settings, count: int) -> list[subprocess.Popen[bytes]]:
    """Start `count` siblings with `settings` and wait until each listens."""
    values = {section: dict(options) for section, options in settings.values.items()}
    values["mail"]["inbound_listen"] = ""
    line = json.dumps(
        {"values": values, "base_dir": str(settings.base_dir), "source": settings.source}
    ).encode()
    siblings = []
    try:
        for _ in range(count):
            sibling = subprocess.Popen(
                [sys.executable, "-m", "bookdav", "_sibling"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            siblings.append(sibling)
            assert sibling.stdin is not None
            sibling.stdin.write(line + b"\n")
            sibling.stdin.flush()
        for sibling in siblings:
            _wait_ready(sibling)
    except BaseException:
        stop_siblings(siblings)
        raise
    log_event(log, "sibling processes listening", pids=[s.pid for s in siblings])
    return siblings


def _wait_ready(sibling: subprocess.Popen[bytes]) -> None:
    assert sibling.stdout is not None
    answer: list[bytes] = []
    reader = threading.Thread(target=lambda: answer.append(sibling.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(START_TIMEOUT_SECONDS)
    if answer != [READY]:
        raise SiblingFailed(
            f"sibling process {sibling.pid} did not start (exit code {sibling.poll()}); "
            "its log is above"
        )
    sibling.stdout.close()


def stop_siblings(siblings: list[subprocess.Popen[bytes]]) -> None:
    """Ask each sibling to finish (SIGTERM: it completes what is under way), then wait."""
    for sibling in siblings:
        if sibling.poll() is None:
            sibling.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for sibling in siblings:
        try:
            sibling.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            sibling.kill()
            sibling.wait()
        if sibling.stdin is not None:
            sibling.stdin.close()


def read_sibling_settings(stream: IO[bytes]) -> Settings:
    """The settings line the first process wrote (see `start_siblings`)."""
    blob = json.loads(stream.readline())
    return Settings(values=blob["values"], base_dir=Path(blob["base_dir"]), source=blob["source"])


def say_ready() -> None:
    """Tell the first process this sibling listens; nothing else is written to that pipe."""
    sys.stdout.buffer.write(READY)
    sys.stdout.flush()
    sys.stdout = sys.stderr


def watch_lifeline(stream: IO[bytes], stop: Callable[[], object]) -> None:
    """Call `stop` (from another thread) once the first process has gone: stdin's end-of-file."""

    def watch() -> None:
        while stream.read(65536):
            pass
        stop()

    threading.Thread(target=watch, name="lifeline", daemon=True).start()
