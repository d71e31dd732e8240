"""Writing benchmark tables into docs/performance.md, one section per benchmark."""

from __future__ import annotations

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
