"""What the benchmarks share: starting `bookdav serve`, and writing their tables into
docs/performance.md, one section per benchmark."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HEADER = "# Performance\n\nFigures from the benchmarks under `bench/`; each section is rewritten by its command.\n"


def replace_section(path: Path, heading: str, body: str) -> None:
    """Put `body` under `heading` (a `## ...` line), replacing what was there, keeping the rest."""
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    start = text.find(heading + "\n")
    section = f"{heading}\n\n{body.rstrip()}\n"
    if start == -1:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + (text[end:] if end != -1 else "")
    path.write_text(text, encoding="utf-8")


def start_bookdav(folder: Path, config: str) -> tuple[subprocess.Popen[str], str]:
    """`bookdav serve` with `config` (an INI text; use port = 0) in `folder`; returns the process
    and its base URL, read from the start-up banner. Its log goes to `folder`/bookdav.log."""
    path = folder / "config.ini"
    path.write_text(config, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKDAV_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bookdav", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=(folder / "bookdav.log").open("w"),
        text=True,
        env=env,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on " in line:
            return process, line.rsplit("listening on ", 1)[1].strip()
    raise RuntimeError("bookdav did not start")


def server_errors(folder: Path, limit: int = 40) -> str:
    """The first error lines (and tracebacks) of the server's log in `folder`, for a bench that
    saw a 5xx: it is printed, so a rare failure in a long run can be told, not guessed."""
    path = folder / "bookdav.log"
    if not path.exists():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    wanted = [line for line in lines if "error" in line.lower() or "traceback" in line.lower()]
    return "\n".join(wanted[:limit])
