"""The LMTP listener for iMIP replies, run on the app's event loop when `[mail] inbound_listen` is
set (off by default). Point the MTA's delivery for the reply address (the `from_address`, or a
dedicated one) at it; every message goes through `bookdav.notify.inbound.ingest`.

LMTP answers per message: 250 applied, 550 refused (with the reason, so the MTA's bounce says
it), 451 when the database is away (the MTA retries). The listener trusts the MTA to have checked
SPF/DKIM/DMARC: the From check here only makes sure the answer comes from the attendee's address.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiosmtpd.lmtp import LMTP

from bookdav.config import ConfigError
from bookdav.logs import log_event
from bookdav.notify import inbound
from bookdav.server.keys import DATABASE, SETTINGS
from bookdav.storage.db import Database

log = logging.getLogger("bookdav.inbound")


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[mail] inbound_listen: {value!r} is not host:port")
    return host.strip("[]"), int(port)


class ReplyHandler:
    """aiosmtpd handler: each message's DATA is one reply to ingest."""

    def __init__(self, database: Database, manage_url_base: str) -> None:
        self.database = database
        self.manage_url_base = manage_url_base

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            applied = await inbound.ingest(self.database, data, self.manage_url_base)
        except inbound.Refused as exc:
            reason = " ".join(str(exc).split())[:200].encode("ascii", "replace").decode()
            return f"550 5.7.1 reply refused: {reason}"
        except Exception:
            log.exception("imip reply could not be applied now")
            return "451 4.3.0 temporary failure, try again later"
        return f"250 2.0.0 reply applied ({applied.action})"


async def inbound_ctx(app: web.Application) -> AsyncIterator[None]:
    """Listen for LMTP while the app runs, if configured."""
    settings = app[SETTINGS]
    listen = settings.get("mail", "inbound_listen")
    if not listen:
        yield
        return
    host, port = parse_listen(listen)
    handler = ReplyHandler(app[DATABASE], settings.public_base_url)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: LMTP(handler, data_size_limit=inbound.MAX_MESSAGE_BYTES, loop=loop), host, port
    )
    log_event(log, "lmtp listener started", listen=f"{host}:{port}")
    yield
    server.close()
    await server.wait_closed()
