"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

from aiohttp import web

from bookdav.config import Settings
from bookdav.storage.db import Database
from bookdav.storage.users import CredentialCheck

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
CREDENTIALS = web.AppKey("credentials", CredentialCheck)
