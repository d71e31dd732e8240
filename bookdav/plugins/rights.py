"""Radicale rights plugin: owner-only, plus the shared resource calendars for staff.

Configured as `[rights] type = bookdav.plugins.rights` with `url = <database URL>`. A user reaches
only `/dav/<username>/` (admins no further over CalDAV); providers and admins may also read and
write the items in the calendars under `/dav/resources/`, but not create or delete those
calendars (the API does that): "d" denies deleting a collection, and a path that names no resource
gets no rights at all, so MKCALENDAR there is refused.
"""

from __future__ import annotations

import threading
import time

from radicale import config, pathutils
from radicale.rights import owner_only

from bookdav.storage.db import database_for
from bookdav.storage.resources import RESOURCES_PRINCIPAL, resource_by_slug
from bookdav.storage.users import user_by_username
from bookdav.sync.store import MIRROR_PREFIX

ROLE_CACHE_SECONDS = 30.0
STAFF_ROLES = frozenset({"admin", "provider"})


class Rights(owner_only.Rights):
    def __init__(self, configuration: config.Configuration) -> None:
        super().__init__(configuration)
        self._database = database_for(configuration.get("rights", "url"))
        self._roles: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def authorization(self, user: str, user_groups: set[str], path: str) -> str:
        sane_path = pathutils.strip_path(path)
        if user and sane_path.split("/", 1)[0] == RESOURCES_PRINCIPAL:
            if self._role(user) not in STAFF_ROLES:
                return ""
            if "/" not in sane_path:
                return "R"
            slug = sane_path.split("/")[1]
            return "rwd" if sane_path.count("/") == 1 and self._is_resource(slug) else ""
        if user and sane_path.count("/") == 1 and sane_path.split("/")[1].startswith(MIRROR_PREFIX):
            # An external calendar's mirror: the sync worker writes it, its owner only reads it.
            return "r" if super().authorization(user, user_groups, path) else ""
        return super().authorization(user, user_groups, path)

    def _is_resource(self, slug: str) -> bool:
        with self._database.read() as conn:
            return resource_by_slug(conn, slug) is not None

    def _role(self, username: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._roles.get(username)
        if cached and cached[1] > now:
            return cached[0]
        with self._database.read() as conn:
            user = user_by_username(conn, username)
        role = user.role if user and user.status == "active" else ""
        with self._lock:
            self._roles[username] = (role, now + ROLE_CACHE_SECONDS)
        return role
