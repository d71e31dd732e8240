"""Radicale storage plugin: Radicale's collections and items kept in bookdav's SQL database.

Configure with `[storage] type = bookdav.plugins.storage` and `url = <SQLAlchemy URL>`. A thin
adapter: every query lives in `bookdav.storage.calendars`. `acquire_lock` opens the database
transaction (a write transaction holds the lock of each principal the request touches) and keeps
its connection in a thread-local, so every storage call of one request sees one snapshot and
nested `acquire_lock` calls reuse it. Items are built from columns; nothing is parsed on reads.
"""

from __future__ import annotations

import contextlib
import email.utils
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

from radicale import config, pathutils, types
from radicale import item as radicale_item
from radicale import storage as radicale_storage
from radicale.item import filter as radicale_filter
from sqlalchemy import Connection

from bookdav.storage import calendars
from bookdav.storage.db import Database, database_for


@dataclass
class _HeldLock:
    database: Database
    mode: str
    connection: Connection


_held = threading.local()


def _held_lock() -> _HeldLock | None:
    return getattr(_held, "lock", None)


def _http_date(epoch_seconds: int) -> str:
    return email.utils.formatdate(epoch_seconds, usegmt=True)


@contextlib.contextmanager
def _null_child_context(path: str, href: str | None) -> Iterator[None]:
    yield


class Collection(radicale_storage.BaseCollection):
    """One collection row, read once per request; the root ("") has no row."""

    def __init__(self, storage: Storage, record: calendars.Collection | None, path: str = ""):
        self._storage = storage
        self._record = record
        self._path = record.path if record else path

    @property
    def path(self) -> str:
        return self._path

    @property
    def record(self) -> calendars.Collection | None:
        return self._record

    def get_meta(self, key: str | None = None) -> Any:
        props = self._record.props if self._record else {}
        return dict(props) if key is None else props.get(key)

    def set_meta(self, props: Mapping[str, str]) -> None:
        record = self._require_record()
        with self._storage.connection() as conn:
            self._record = calendars.set_props(conn, record, props)

    @property
    def last_modified(self) -> str:
        return _http_date(self._record.modified_at if self._record else int(time.time()))

    @property
    def etag(self) -> str:
        return self._record.etag if self._record else '"root"'

    def sync(self, old_token: str = "") -> tuple[str, Iterable[str]]:
        record = self._require_record()
        with self._storage.connection() as conn:
            try:
                return calendars.changes_since(conn, record, old_token)
            except calendars.InvalidSyncToken as exc:
                # Radicale answers a ValueError with the DAV:valid-sync-token precondition.
                raise ValueError(str(exc)) from exc

    def get_multi(self, hrefs: Iterable[str]) -> Iterable[tuple[str, radicale_item.Item | None]]:
        hrefs = list(hrefs)
        if self._record is None:
            return [(href, None) for href in hrefs]
        with self._storage.connection() as conn:
            found = calendars.get_items(conn, self._record.id, hrefs)
        return [(href, self._item(found[href]) if href in found else None) for href in hrefs]

    def get_all(self) -> Iterable[radicale_item.Item]:
        if self._record is None:
            return []
        with self._storage.connection() as conn:
            stored = calendars.all_items(conn, self._record.id)
        return [self._item(item) for item in stored]

    def get_filtered(
        self, filters: Iterable[ET.Element]
    ) -> Iterable[tuple[radicale_item.Item, bool]]:
        if self._record is None or not self.tag:
            return []
        tag, start, end, simple = radicale_filter.simplify_prefilters(filters, self.tag)
        if self.tag != "VCALENDAR":
            return [(item, False) for item in self.get_all()]
        with self._storage.connection() as conn:
            found = calendars.items_in_range(conn, self._record, start, end, tag)
        return [(self._item(item), simple and exact) for item, exact in found]

    def has_uid(self, uid: str) -> bool:
        if self._record is None:
            return False
        with self._storage.connection() as conn:
            return calendars.has_uid(conn, self._record.id, uid)

    def upload(
        self, href: str, item: radicale_item.Item
    ) -> tuple[radicale_item.Item, radicale_item.Item | None]:
        record = self._require_record()
        with self._storage.connection(write=True) as conn:
            stored, replaced = calendars.put_item(
                conn,
                record,
                href,
                item.serialize(),
                calendar=item.vobject_item,
                uid=item.uid,
                etag=item.etag,
            )
            self._record = calendars.get_collection_by_id(conn, record.id)
        return self._item(stored), self._item(replaced) if replaced else None

    def delete(self, href: str | None = None) -> None:
        record = self._require_record()
        with self._storage.connection(write=True) as conn:
            if href is None:
                calendars.delete_collection(conn, record.path)
                return
            if not calendars.delete_item(conn, record, href):
                raise radicale_storage.ComponentNotFoundError(href)
            self._record = calendars.get_collection_by_id(conn, record.id)

    def _require_record(self) -> calendars.Collection:
        if self._record is None:
            raise ValueError("the root collection cannot be changed")
        return self._record

    def _item(self, stored: calendars.StoredItem) -> radicale_item.Item:
        return radicale_item.Item(
            collection_path=self._path,
            collection=self,
            href=stored.href,
            last_modified=_http_date(stored.modified_at),
            text=stored.text,
            etag=stored.etag,
            uid=stored.uid,
            name="VCALENDAR" if self.tag == "VCALENDAR" else "VCARD",
            component_name=stored.component,
            time_range=(stored.start_utc, stored.end_utc),
        )


class Storage(radicale_storage.BaseStorage):
    """Radicale's storage entry point over `bookdav.storage.calendars`."""

    # Paths are strings in a database, not file names: any href Radicale accepts is safe.
    _is_collision_free = True
    _supports_unicode = True
    _supports_trailing_whitespace = True
    _supports_problematic_chars = True

    def __init__(self, configuration: config.Configuration) -> None:
        super().__init__(configuration)
        url = configuration.get("storage", "url")
        if not url:
            raise RuntimeError("[storage] url (a SQLAlchemy URL) is required by bookdav")
        self._database = database_for(url)

    @types.contextmanager
    def acquire_lock(self, mode: str, user: str = "", *args: Any, **kwargs: Any) -> Iterator[None]:
        """ "r": a read transaction; "w": a write transaction holding the locks of the owners of
        `path` and `to_path` (or of `user`). Nested calls in one thread reuse the outer one."""
        held = _held_lock()
        if held is not None:
            if mode == "w" and held.mode != "w":
                raise RuntimeError("cannot take the write lock inside a read lock")
            yield
            return
        if mode == "w":
            owners = {calendars.owner_of(kwargs.get(k) or "") for k in ("path", "to_path")}
            principals = {owner for owner in owners if owner} or {user}
            transaction = self._database.write(sorted(principals))
        else:
            transaction = self._database.read()
        with transaction as conn:
            _held.lock = _HeldLock(self._database, mode, conn)
            try:
                yield
            finally:
                _held.lock = None

    @contextlib.contextmanager
    def connection(self, write: bool = False) -> Iterator[Connection]:
        """The request's connection; outside `acquire_lock` (Radicale reads a little after
        unlocking) a short transaction of its own."""
        held = _held_lock()
        if held is not None and held.database is self._database:
            if write and held.mode != "w":
                raise RuntimeError("storage write without the write lock")
            if not write:
                yield held.connection
                return
            # Radicale answers a ValueError from storage with a 400/409 response and then leaves
            # the lock normally, which commits: a savepoint undoes this call's partial writes.
            with held.connection.begin_nested():
                yield held.connection
            return
        transaction = self._database.write() if write else self._database.read()
        with transaction as conn:
            yield conn

    def discover(
        self,
        path: str,
        depth: str = "0",
        child_context_manager: Callable[[str, str | None], ContextManager[None]] | None = None,
        user_groups: set[str] = set(),  # noqa: B006 (Radicale's signature)
    ) -> Iterable[types.CollectionOrItem]:
        child_context = child_context_manager or _null_child_context
        sane_path = pathutils.strip_path(path)
        with self.connection() as conn:
            found = self._find(conn, sane_path)
            if found is None:
                return []
            if not isinstance(found, Collection):
                return [found]
            children = calendars.child_collections(conn, sane_path) if depth != "0" else []
        if depth == "0":
            return [found]
        return self._with_children(found, children, child_context)

    def _find(self, conn: Connection, sane_path: str) -> Collection | radicale_item.Item | None:
        if not sane_path:
            return Collection(self, None, "")
        record = calendars.get_collection(conn, sane_path)
        if record is not None:
            return Collection(self, record)
        parent_path, _, href = sane_path.rpartition("/")
        parent = calendars.get_collection(conn, parent_path) if parent_path else None
        if parent is None:
            return None
        stored = calendars.get_item(conn, parent.id, href)
        return Collection(self, parent)._item(stored) if stored else None

    def _with_children(
        self,
        collection: Collection,
        children: list[calendars.Collection],
        child_context: Callable[[str, str | None], ContextManager[None]],
    ) -> Iterator[types.CollectionOrItem]:
        yield collection
        for item in collection.get_all():
            with child_context(collection.path, item.href):
                yield item
        for child in children:
            with child_context(child.path, None):
                yield Collection(self, child)

    def move(
        self,
        item: radicale_item.Item,
        to_collection: radicale_storage.BaseCollection,
        to_href: str,
    ) -> None:
        assert isinstance(item.collection, Collection) and isinstance(to_collection, Collection)
        assert item.href
        source = item.collection._require_record()
        target = to_collection._require_record()
        with self.connection(write=True) as conn:
            calendars.move_item(conn, source, item.href, target, to_href)

    def create_collection(
        self,
        href: str,
        items: Iterable[radicale_item.Item] | None = None,
        props: Mapping[str, str] | None = None,
    ) -> tuple[Collection, dict[str, radicale_item.Item], list[str]]:
        sane_path = pathutils.strip_path(href)
        with self.connection(write=True) as conn:
            old = calendars.get_collection(conn, sane_path) if props else None
            old_items = {i.href: i for i in calendars.all_items(conn, old.id)} if old else {}
            record = calendars.create_collection(conn, sane_path, props)
            collection = Collection(self, record)
            if not props or items is None or record.tag not in ("VCALENDAR", "VADDRESSBOOK"):
                return collection, {}, []
            hrefs = self._upload_all(conn, collection, items)
            collection._record = calendars.get_collection_by_id(conn, record.id)
        replaced = {h: Collection(self, old)._item(old_items[h]) for h in hrefs if h in old_items}
        return collection, replaced, [h for h in hrefs if h not in old_items]

    def _upload_all(
        self, conn: Connection, collection: Collection, items: Iterable[radicale_item.Item]
    ) -> list[str]:
        """Store a whole uploaded calendar/address book, one href per UID as Radicale names them."""
        assert collection.record is not None
        suffix = ".ics" if collection.tag == "VCALENDAR" else ".vcf"
        hrefs: list[str] = []
        for item in items:
            href = self._free_href(item.uid, suffix, set(hrefs))
            calendars.put_item(
                conn,
                collection.record,
                href,
                item.serialize(),
                calendar=item.vobject_item,
                uid=item.uid,
                etag=item.etag,
            )
            hrefs.append(href)
        return hrefs

    @staticmethod
    def _free_href(uid: str, suffix: str, taken: set[str]) -> str:
        """The collection was just (re)created empty, so only this upload's hrefs are taken."""
        candidates = [
            uid if uid.lower().endswith(suffix) else uid + suffix,
            radicale_item.get_etag(uid).strip('"') + suffix,
        ]
        for href in candidates:
            if pathutils.is_safe_path_component(href) and href not in taken:
                return href
        return radicale_item.find_available_uid(lambda h: h in taken, suffix)

    def verify(self) -> bool:
        with self.connection() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True


__all__ = ["Collection", "Storage"]
