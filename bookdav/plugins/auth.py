"""Radicale auth plugin: CalDAV logins checked against bookdav's users table.

Configured as `[auth] type = bookdav.plugins.auth` with `url = <database URL>`.
"""

from __future__ import annotations

from radicale import auth, config

from bookdav.storage.db import database_for
from bookdav.storage.users import CredentialCheck


class Auth(auth.BaseAuth):
    def __init__(self, configuration: config.Configuration) -> None:
        super().__init__(configuration)
        self._database = database_for(configuration.get("auth", "url"))
        self._credentials = CredentialCheck()

    def _login(self, login: str, password: str) -> str:
        with self._database.read() as conn:
            user = self._credentials.verify(conn, login, password)
        return user.username if user else ""
