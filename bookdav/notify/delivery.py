"""Where mail goes: an SMTP server (aiosmtplib) or, with no `[mail] smtp_host`, a local Maildir.

Both take the envelope explicitly (sender, recipients): recipients are never read back from the
headers, so nothing written into a header can add one.
"""

from __future__ import annotations

import asyncio
import mailbox
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiosmtplib

from bookdav.config import Settings

SMTP_TIMEOUT_SECONDS = 30.0


class Transport(Protocol):
    """Hands one message on; raises on failure (the outbox retries it)."""

    description: str

    async def send(self, message: EmailMessage, sender: str, recipients: Sequence[str]) -> None: ...


class MaildirTransport:
    """Delivers into a Maildir (created if missing): the default for development and tests, and a
    spool any MDA or mail reader can pick up."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"maildir {self.path}"

    async def send(self, message: EmailMessage, sender: str, recipients: Sequence[str]) -> None:
        # Serializing and mailbox's blocking file I/O (write, fsync-free rename): off the loop.
        await asyncio.to_thread(self._add, message)

    def _add(self, message: EmailMessage) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        box = mailbox.Maildir(self.path, create=True)
        box.add(message.as_bytes())


class SmtpTransport:
    """One SMTP session per message: plain, STARTTLS (required, not opportunistic) or implicit
    TLS; logs in only when a username is set."""

    def __init__(self, settings: Settings) -> None:
        self.host: str = settings.get("mail", "smtp_host")
        self.port: int = settings.get("mail", "smtp_port")
        self.username: str = settings.get("mail", "smtp_username")
        self._password: str = settings.get("mail", "smtp_password")
        self.tls: str = settings.get("mail", "smtp_tls")
        self.description = f"smtp {self.host}:{self.port} tls={self.tls}"
        self.tls_context = tls_context(
            settings.get("mail", "smtp_verify"), settings.get("mail", "smtp_ca_file")
        )

    async def send(self, message: EmailMessage, sender: str, recipients: Sequence[str]) -> None:
        await aiosmtplib.send(
            message,
            sender=sender,
            recipients=list(recipients),
            hostname=self.host,
            port=self.port,
            username=self.username or None,
            password=self._password if self.username else None,
            use_tls=self.tls == "tls",
            # False, not None: with "none" aiosmtplib must not upgrade on its own either.
            start_tls=self.tls == "starttls",
            tls_context=self.tls_context if self.tls != "none" else None,
            timeout=SMTP_TIMEOUT_SECONDS,
        )


def tls_context(verify: bool, ca_file: str) -> ssl.SSLContext:
    """Certificates checked against the system's CAs (or `ca_file`'s) and the host name, unless
    `verify` is off (then TLS still encrypts, but anyone on the path could pose as the server)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def transport_for(settings: Settings) -> Transport:
    """SMTP when `[mail] smtp_host` is set, else the Maildir at `[mail] maildir`."""
    if settings.get("mail", "smtp_host"):
        return SmtpTransport(settings)
    return MaildirTransport(settings.get("mail", "maildir"))
