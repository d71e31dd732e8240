"""Structured logs: one line per event, `event key=value ...` as text or as JSON.

Call `log_event(logger, "request", method=..., status=...)`; never pass secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class StructuredFormatter(logging.Formatter):
    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        timestamp += f".{int(record.msecs):03d}Z"
        message = record.getMessage()
        if self.as_json:
            document = {
                "ts": timestamp,
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": message,
                "pid": record.process,  # `[server] processes` > 1 interleave in one stream
                **fields,
            }
            if record.exc_info:
                document["exception"] = self.formatException(record.exc_info)
            return json.dumps(document, default=str)
        parts = [timestamp, record.levelname.lower(), record.name, message]
        parts += [f"{key}={_text_value(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)
    return text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(as_json=fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Radicale and Alembic are chatty at info; ours logs each request and migration once.
    radicale_level = logging.DEBUG if level == "debug" else logging.WARNING
    logging.getLogger("radicale").setLevel(radicale_level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(radicale_level)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})
