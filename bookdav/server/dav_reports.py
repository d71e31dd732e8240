"""Fast answers to the CalDAV REPORTs Radicale answers slowly, from the SQL occurrence index.

Radicale answers a `free-busy-query` by parsing every candidate item with vobject, a
`calendar-query` with `<C:expand>` by dropping the time range before it asks storage (so it loads,
parses and expands the whole calendar), and builds every response of a sync-collection or
calendar-query as ElementTree objects. Here the index finds the candidate items and their
instances; items of the common shape (UTC or VTIMEZONE-backed DATE-TIMEs with DTEND, no RDATE,
STATUS confirmed or absent) are answered from the index and their stored text without parsing,
and every other candidate goes through Radicale's own code (`test_filter`, `freebusy_periods`,
`_expand`), so the answer is Radicale's. The one known difference: an instance of a zoned series
whose span crosses a DST change gets RFC 5545's exact duration (the index's) where Radicale adds
the duration on the wall clock.

Anything not recognised here, any request that is not the owner's with valid credentials, and any
limit Radicale would enforce falls through to Radicale, which then answers (401, 403, 400, ...)
exactly as it always does. The resource calendars (`/dav/resources/...`) are left to it too.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import xml.etree.ElementTree as ET
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import defusedxml.ElementTree as DefusedET
import radicale
from aiohttp import web
from radicale import item as radicale_item
from radicale import pathutils, xmlutils
from radicale.app import report as radicale_report
from radicale.item import filter as radicale_filter
from sqlalchemy import Connection, select

from bookdav.server.auth import basic_credentials
from bookdav.server.keys import CREDENTIALS, DATABASE
from bookdav.storage import calendars, sql
from bookdav.storage.resources import RESOURCES_PRINCIPAL
from bookdav.storage.schema import items
from bookdav.storage.users import CredentialCheck

ENCODING = "utf-8"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# Candidates are looked up this much wider than asked: Radicale reads floating and DATE values as
# UTC where the index uses the calendar's zone (at most 14 h apart), and includes an instance
# that starts exactly at the end of the range. Radicale's own code decides about the extras.
CANDIDATE_MARGIN_SECONDS = 86400
RECURRENCE_KEYS = frozenset({"rrule", "rdate", "exrule", "exdate"})
# vobject writes these VEVENT properties first, the rest sorted by name (its `sortFirst`).
VEVENT_FIRST_KEYS = ("uid", "recurrence-id", "dtstart", "duration", "dtend")
# zlib's fastest level, as nginx compresses by default: a one-week calendar-query at 10,000 events
# (270 kB) takes 1.4 ms and 39 kB where Radicale's level 6 takes 3.6 ms and 34 kB, on the event
# loop, for every request: more than building the answer from remembered fragments.
GZIP_LEVEL = 1
UTC_VALUE = re.compile(r"^\d{8}T\d{6}Z$")
LOCAL_VALUE = re.compile(r"^\d{8}T\d{6}$")


class _Memo:
    """A bounded memo of facts derived from an item's stored text, keyed by what determines them
    (the ETag is a hash of the text, so a changed item is a new key and nothing is invalidated).
    Bounded by the summed cost of its values (1 each unless told, bytes for response fragments);
    cleared whole when full: cheap, and the hot set refills on the next query. Plain dict
    operations: thread-safe enough for reader threads that at worst compute a value twice."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._cost = 0
        self._values: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return self._values.get(key)

    def put(self, key: Any, value: Any, cost: int = 1) -> None:
        if self._cost + cost > self._size:
            self._values.clear()
            self._cost = 0
        self._values[key] = value
        self._cost += cost


_PLAIN_FREE_BUSY = _Memo(100_000)
# Whole calendar-query answers (and free-busy periods), keyed by the calendar's (id,
# incarnation, revision) as the answering read sees it plus the path and the request body.
# Every write to a calendar, from any process, raises its revision in the writing transaction
# (as the slot cache relies on), so a changed calendar is a new key and an unchanged one answers
# without touching its items.
_ANSWERS = _Memo(16 * 1024 * 1024)
# Each calendar-query item's whole `<response>` as UTF-8, with what Radicale's limits count:
# keyed by (scope of the query, href, ETag[, indexed until]), bounded at 32 MiB of fragments.
_FRAGMENTS = _Memo(32 * 1024 * 1024)


def _clark(human_tag: str) -> str:
    return xmlutils.make_clark(human_tag)


def _seconds(value: dt.datetime) -> int:
    return int(value.timestamp())


def _utc_text(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime(TIMESTAMP_FORMAT)


# --- what is being asked -------------------------------------------------------------------------


@dataclass(frozen=True)
class FreeBusyQuery:
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class CalendarQuery:
    """A calendar-query whose only filter is a VEVENT time range, asking for getetag and/or
    calendar-data, expanded (`<C:expand>`) or not."""

    props: tuple[str, ...]
    range_start: dt.datetime
    range_end: dt.datetime
    # The filters Radicale tests uncertain items against (without the time range when expanding).
    main_filters: tuple[ET.Element, ...]
    expand_start: dt.datetime | None = None
    expand_end: dt.datetime | None = None

    @property
    def expand(self) -> bool:
        return self.expand_start is not None


@dataclass(frozen=True)
class SyncQuery:
    """A sync-collection asking for getetag (and/or getcontenttype) of what changed."""

    token: str
    props: tuple[str, ...]


Query = FreeBusyQuery | CalendarQuery | SyncQuery
SYNC_PROPS = frozenset({_clark("D:getetag"), _clark("D:getcontenttype")})


# Parsed REPORT bodies: a calendar app sends the same few again and again.
_QUERIES = _Memo(1_000)
_NOT_OURS = object()
_QUERY_BODY_LIMIT = 8192


def recognise(body: bytes) -> Query | None:
    """The fast-path query this REPORT body is, or None for anything else (Radicale answers).
    Remembered per body: the query objects are never changed once made."""
    known = _QUERIES.get(body)
    if known is None:
        known = _recognise(body)
        if len(body) <= _QUERY_BODY_LIMIT:
            _QUERIES.put(body, _NOT_OURS if known is None else known)
    return None if known is _NOT_OURS else known


def _recognise(body: bytes) -> Query | None:
    try:
        root = DefusedET.fromstring(body)
    except Exception:  # malformed or hostile XML: Radicale answers it (400)
        return None
    if root.tag == _clark("C:free-busy-query"):
        return _free_busy_query(root)
    if root.tag == _clark("C:calendar-query"):
        return _calendar_query(root)
    if root.tag == _clark("D:sync-collection"):
        return _sync_query(root)
    return None


def _time_range(element: ET.Element | None) -> tuple[dt.datetime, dt.datetime] | None:
    if element is None or element.tag != _clark("C:time-range") or len(element):
        return None
    if not element.get("start") or not element.get("end"):
        return None
    try:
        start, end = radicale_filter.parse_time_range(element)
    except ValueError:
        return None
    return (start, end) if start < end else None


def _free_busy_query(root: ET.Element) -> FreeBusyQuery | None:
    if len(root) != 1:
        return None
    found = _time_range(root[0])
    return FreeBusyQuery(*found) if found else None


def _sync_query(root: ET.Element) -> SyncQuery | None:
    allowed = {_clark("D:sync-token"), _clark("D:sync-level"), _clark("D:prop")}
    if any(child.tag not in allowed for child in root):
        return None  # D:limit and anything else: Radicale's answer
    prop = root.find(_clark("D:prop"))
    props = tuple(child.tag for child in prop) if prop is not None else ()
    if not props or not set(props) <= SYNC_PROPS or any(len(child) for child in prop or ()):
        return None
    return SyncQuery((root.findtext(_clark("D:sync-token")) or "").strip(), props)


def _calendar_query(root: ET.Element) -> CalendarQuery | None:
    prop = root.find(_clark("D:prop"))
    filters = root.findall(_clark("C:filter"))
    if prop is None or len(filters) != 1 or len(root) != 2:
        return None
    expand = prop.find(f"{_clark('C:calendar-data')}/{_clark('C:expand')}")
    if root.find(".//" + _clark("C:expand")) is not expand:
        return None
    expand_range: tuple[dt.datetime, dt.datetime] | None = None
    if expand is not None:
        try:
            expand_range = (
                dt.datetime.strptime(expand.get("start") or "", TIMESTAMP_FORMAT),
                dt.datetime.strptime(expand.get("end") or "", TIMESTAMP_FORMAT),
            )
        except ValueError:
            return None
    # Radicale lists every item, time range or not, for any other property (its expand skips
    # only getetag and calendar-data of an item without instances): leave those to it.
    props = tuple(child.tag for child in prop)
    if not props or not set(props) <= {_clark("D:getetag"), _clark("C:calendar-data")}:
        return None
    # Exactly VCALENDAR > VEVENT > time-range, nothing else (no prop-filter, no is-not-defined).
    (calendar_filter,) = filters
    if len(calendar_filter) != 1:
        return None
    vcalendar = calendar_filter[0]
    if not _is_comp_filter(vcalendar, "VCALENDAR") or len(vcalendar) != 1:
        return None
    vevent = vcalendar[0]
    if not _is_comp_filter(vevent, "VEVENT") or len(vevent) != 1:
        return None
    found = _time_range(vevent[0])
    if found is None:
        return None
    if expand_range is None:
        return CalendarQuery(props, found[0], found[1], (calendar_filter,))
    # The filters Radicale tests items against once it has dropped the time range.
    main_filter = copy.deepcopy(calendar_filter)
    main_filter[0][0].remove(main_filter[0][0][0])
    return CalendarQuery(
        props,
        found[0],
        found[1],
        (main_filter,),
        expand_range[0].replace(tzinfo=dt.UTC),
        expand_range[1].replace(tzinfo=dt.UTC),
    )


def _is_comp_filter(element: ET.Element, name: str) -> bool:
    return (
        element.tag == _clark("C:comp-filter")
        and set(element.attrib) == {"name"}
        and element.get("name", "").upper() == name
    )


# --- what an item looks like, read from its text without parsing it ------------------------------


@dataclass
class _Line:
    key: str  # lower-case property name, or the lower-case name of a nested component
    raw: str  # as stored, folded, with its line breaks
    params: str = ""
    value: str = ""


@dataclass
class _Shape:
    """An item's text cut into what the fast paths need."""

    header: list[_Line] = field(default_factory=list)
    timezone_ids: set[str] = field(default_factory=set)
    events: list[list[_Line]] = field(default_factory=list)
    others: int = 0  # components other than VTIMEZONE and VEVENT


def _logical_lines(text: str) -> list[str]:
    """Lines with their folds kept: a continuation line belongs to the line before."""
    lines: list[str] = []
    for physical in text.splitlines(keepends=True):
        if physical[:1] in (" ", "\t") and lines:
            lines[-1] += physical
        elif physical.strip():
            lines.append(physical)
    return lines


def _split(raw: str) -> tuple[str, str, str] | None:
    """(name, params, value) of one content line; None where quoting makes it ambiguous."""
    unfolded = re.sub(r"\r?\n[ \t]", "", raw).rstrip("\r\n")
    head, colon, value = unfolded.partition(":")
    if not colon or '"' in head:
        return None
    name, _, params = head.partition(";")
    return name.strip().lower(), params, value


def shape_of(text: str) -> _Shape | None:
    """The item's VCALENDAR properties, VTIMEZONE ids and VEVENT lines; None if unusual."""
    shape = _Shape()
    stack: list[str] = []
    event: list[_Line] = []
    nested: _Line | None = None
    for raw in _logical_lines(text):
        parts = _split(raw)
        if parts is None:
            return None
        name, params, value = parts
        if name == "begin":
            stack.append(value.strip().upper())
            if stack == ["VCALENDAR", "VEVENT"]:
                event = []
            elif len(stack) == 3 and stack[1] == "VEVENT":
                nested = _Line(value.strip().lower(), raw)
            elif len(stack) == 2 and stack[1] != "VTIMEZONE":
                shape.others += 1
            elif len(stack) > 3 and nested is not None:
                nested.raw += raw
            continue
        if name == "end":
            if not stack or stack[-1] != value.strip().upper():
                return None
            if len(stack) == 3 and stack[1] == "VEVENT" and nested is not None:
                nested.raw += raw
                event.append(nested)
                nested = None
            elif len(stack) > 3 and nested is not None:
                nested.raw += raw
            elif stack == ["VCALENDAR", "VEVENT"]:
                shape.events.append(event)
            stack.pop()
            continue
        if stack == ["VCALENDAR"]:
            shape.header.append(_Line(name, raw, params, value))
        elif stack == ["VCALENDAR", "VEVENT"]:
            event.append(_Line(name, raw, params, value))
        elif len(stack) > 2 and stack[1] == "VEVENT" and nested is not None:
            nested.raw += raw
        elif len(stack) == 2 and stack[1] == "VTIMEZONE" and name == "tzid":
            shape.timezone_ids.add(value.strip())
    if stack or not shape.events:
        return None
    return shape


def _lines(event: list[_Line], key: str) -> list[_Line]:
    return [line for line in event if line.key == key]


def _instant_kind(line: _Line, shape: _Shape) -> str | None:
    """ "utc", "tzid:<id>" or None (DATE, floating, unknown zone: Radicale's code decides)."""
    params = {}
    for param in filter(None, line.params.split(";")):
        name, _, value = param.partition("=")
        params[name.upper()] = value
    if set(params) - {"TZID", "VALUE"} or params.get("VALUE", "DATE-TIME") != "DATE-TIME":
        return None
    values = line.value.split(",")
    if "TZID" in params:
        if params["TZID"] not in shape.timezone_ids:
            return None
        return f"tzid:{params['TZID']}" if all(LOCAL_VALUE.match(v) for v in values) else None
    return "utc" if all(UTC_VALUE.match(v) for v in values) else None


def _plain_times(event: list[_Line], shape: _Shape) -> bool:
    """DTSTART and DTEND as instants (UTC or a zone the item defines), no DURATION: then the
    index's instances are Radicale's (up to the wall-clock duration across DST, see above)."""
    if len(_lines(event, "dtstart")) != 1 or len(_lines(event, "dtend")) != 1:
        return False
    if _lines(event, "duration") or _lines(event, "rdate") or _lines(event, "exrule"):
        return False
    timed = ("dtstart", "dtend", "recurrence-id", "exdate")
    return all(_instant_kind(line, shape) is not None for line in event if line.key in timed)


def _status(event: list[_Line]) -> str:
    found = _lines(event, "status")
    return found[0].value.strip().upper() if found else ""


def _transp(event: list[_Line]) -> str:
    found = _lines(event, "transp")
    return found[0].value.strip().upper() if found else ""


# --- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    start_utc: int
    end_utc: int
    busy: bool


_INSTANCES = (
    "SELECT item_id, start_utc, end_utc, busy FROM occurrences WHERE collection_id = :collection_id"
    " AND long_span = :long_span AND start_utc >= :lowest_start AND start_utc < :end_utc"
    " AND end_utc > :start_utc"
)


def instances_in_range(
    conn: Connection, collection: calendars.Collection, start_utc: int, end_utc: int
) -> dict[int, list[_Instance]]:
    """Indexed instances overlapping `[start_utc, end_utc)`, by item id, sorted by start.

    The same two bounded scans as `calendars.items_in_range` (short and long occurrences), but
    keeping each row: the fast paths need the instances of each item, not only the items.
    """
    bounds = [(False, calendars.SHORT_OCCURRENCE_SECONDS)]
    if collection.longest_occurrence_seconds:
        bounds.append((True, collection.longest_occurrence_seconds))
    found: dict[int, list[_Instance]] = {}
    for long_span, longest in bounds:
        rows = sql.rows(
            conn,
            _INSTANCES,
            {
                "collection_id": collection.id,
                "long_span": long_span,
                "lowest_start": start_utc - longest,
                "start_utc": start_utc,
                "end_utc": end_utc,
            },
        )
        for item_id, start, end, busy in rows:
            found.setdefault(item_id, []).append(_Instance(start, end, bool(busy)))
    for instances in found.values():
        instances.sort(key=lambda instance: (instance.start_utc, instance.end_utc))
    return found


def _radicale_item(collection: calendars.Collection, stored: calendars.StoredItem) -> Any:
    return radicale_item.Item(
        collection_path=collection.path,
        href=stored.href,
        text=stored.text,
        etag=stored.etag,
        uid=stored.uid,
        name="VCALENDAR",
        component_name=stored.component,
        time_range=(stored.start_utc, stored.end_utc),
    )


def _fully_indexed(stored: calendars.StoredItem, end_utc: int) -> bool:
    return stored.indexed_until is None or stored.indexed_until >= end_utc


class FallThrough(Exception):
    """Radicale must answer this request itself (a limit, or something not recognised)."""


class OverLimit(Exception):
    """The answer passes Radicale's `[reporting] max_expand_occurrence`: Radicale would answer
    400 too, after expanding the whole calendar (30 s at 100,000 events), so answer it now."""


# --- free-busy -----------------------------------------------------------------------------------


def free_busy_text(
    conn: Connection,
    collection: calendars.Collection,
    query: FreeBusyQuery,
    max_occurrence: int,
) -> str:
    """RFC 4791 section 7.10 VFREEBUSY for one calendar, as Radicale's free-busy report writes it
    (stamped now)."""
    return stamped_free_busy(free_busy_lines(conn, collection, query, max_occurrence), query)


def free_busy_lines(
    conn: Connection,
    collection: calendars.Collection,
    query: FreeBusyQuery,
    max_occurrence: int,
) -> str:
    """The FREEBUSY lines of `free_busy_text`: all of its answer that depends on the calendar.

    Candidates are exactly what Radicale would get from our storage plugin. Busy time of plain
    items (see `_plain_free_busy`) comes from the index; other items go through Radicale's own
    `freebusy_periods` (BUSY-TENTATIVE for tentative, FREE for cancelled, floating and DATE times
    read as UTC: Radicale's reading).
    """
    start_utc, end_utc = _seconds(query.start), _seconds(query.end)
    rows = _instances_with_versions(conn, collection, start_utc, end_utc)
    # Radicale's limit is per item: only counted when the instances could reach it at all.
    if (
        max_occurrence
        and len(rows) >= max_occurrence
        and max(Counter(row[0] for row in rows).values()) >= max_occurrence
    ):
        raise FallThrough("free-busy occurrence limit")
    periods: list[tuple[int, int, str]] = []
    # Most items are known plain by their ETag: their busy time is the index's, no text needed.
    plain = _PLAIN_FREE_BUSY.get
    to_read: dict[int, list[_Instance]] = {}  # candidates with indexed instances
    for item_id, start, end, busy, etag, indexed_until in rows:
        if (indexed_until is None or indexed_until >= end_utc) and plain(etag):
            if busy:
                periods.append((max(start, start_utc), min(end, end_utc), "BUSY"))
        else:
            to_read.setdefault(item_id, []).append(_Instance(start, end, bool(busy)))
    unindexed = calendars.unindexed_event_versions(conn, collection, end_utc)
    if unindexed:
        with_rows = {row[0] for row in rows}
        uncertain = [version[0] for version in unindexed if version[0] not in with_rows]
    else:
        uncertain = []
    stored_items = calendars.items_by_id(conn, [*to_read, *uncertain])
    filter_element = _free_busy_filter(query)
    for item_id, exact in [*((i, True) for i in to_read), *((i, False) for i in uncertain)]:
        stored = stored_items.get(item_id)
        if stored is None:
            continue
        if _fully_indexed(stored, end_utc) and _plain_free_busy(stored):
            periods.extend(_busy_periods(to_read.get(item_id, []), start_utc, end_utc))
            continue
        item = _radicale_item(collection, stored)
        try:
            if not exact and not radicale_report.test_filter("VCALENDAR", item, filter_element):
                continue
            found = radicale_report.freebusy_periods(item, query.start, query.end, max_occurrence)
        except Exception as exc:  # Radicale answers (400) for what its own code rejects
            raise FallThrough(str(exc)) from exc
        periods.extend((_seconds(s), _seconds(e), fbtype) for s, e, fbtype in found)
    return _free_busy_lines(periods)


_INSTANCES_WITH_VERSIONS = (
    "SELECT o.item_id, o.start_utc, o.end_utc, o.busy, i.etag, i.indexed_until"
    " FROM occurrences o JOIN items i ON i.id = o.item_id"
    " WHERE o.collection_id = :collection_id AND o.long_span = :long_span"
    " AND o.start_utc >= :lowest_start AND o.start_utc < :end_utc AND o.end_utc > :start_utc"
)


def _instances_with_versions(
    conn: Connection, collection: calendars.Collection, start_utc: int, end_utc: int
) -> list[tuple[int, int, int, Any, str, int | None]]:
    """`(item id, start, end, busy, etag, indexed_until)` of every indexed instance overlapping
    the range: the bounded scans of `instances_in_range`, each row with its item's version, so
    a free-busy answer needs one row per instance and nothing else for items known plain."""
    bounds = [(False, calendars.SHORT_OCCURRENCE_SECONDS)]
    if collection.longest_occurrence_seconds:
        bounds.append((True, collection.longest_occurrence_seconds))
    found: list[tuple[int, int, int, Any, str, int | None]] = []
    for long_span, longest in bounds:
        found.extend(
            sql.rows(
                conn,
                _INSTANCES_WITH_VERSIONS,
                {
                    "collection_id": collection.id,
                    "long_span": long_span,
                    "lowest_start": start_utc - longest,
                    "start_utc": start_utc,
                    "end_utc": end_utc,
                },
            )
        )
    return found


def _busy_periods(
    instances: list[_Instance], start_utc: int, end_utc: int
) -> list[tuple[int, int, str]]:
    return [
        (max(i.start_utc, start_utc), min(i.end_utc, end_utc), "BUSY") for i in instances if i.busy
    ]


def _plain_free_busy(stored: calendars.StoredItem) -> bool:
    """Whether the index's busy instances are exactly Radicale's BUSY periods for this item
    (remembered per ETag: reading the shape was most of a free-busy query's time)."""
    plain = _PLAIN_FREE_BUSY.get(stored.etag)
    if plain is None:
        plain = _plain_free_busy_text(stored.text)
        _PLAIN_FREE_BUSY.put(stored.etag, plain)
    return bool(plain)


def _plain_free_busy_text(text: str) -> bool:
    shape = shape_of(text)
    if shape is None or shape.others:
        return False
    return all(
        _plain_times(event, shape)
        and _status(event) in ("", "CONFIRMED")
        and _transp(event) in ("", "OPAQUE", "TRANSPARENT")
        for event in shape.events
    )


def _free_busy_filter(query: FreeBusyQuery) -> ET.Element:
    """The filter Radicale's free-busy code builds, for re-testing uncertain candidates."""
    time_range = ET.Element(
        _clark("C:time-range"),
        attrib={
            "start": query.start.strftime(TIMESTAMP_FORMAT),
            "end": query.end.strftime(TIMESTAMP_FORMAT),
        },
    )
    vevent = ET.Element(_clark("C:comp-filter"), attrib={"name": "VEVENT"})
    vevent.append(time_range)
    vcalendar = ET.Element(_clark("C:comp-filter"), attrib={"name": "VCALENDAR"})
    vcalendar.append(vevent)
    filter_element = ET.Element(_clark("C:filter"))
    filter_element.append(vcalendar)
    return filter_element


def stamped_free_busy(lines: str, query: FreeBusyQuery) -> str:
    """The VFREEBUSY around `lines`, stamped with the current DTSTAMP."""
    head, _, tail = _free_busy_envelope(query).rpartition("END:VFREEBUSY\r\n")
    return f"{head}{lines}END:VFREEBUSY\r\n{tail}"


def _free_busy_lines(periods: list[tuple[int, int, str]]) -> str:
    # Radicale's own merge (per FBTYPE, touching periods joined); it only compares the bounds,
    # so epoch seconds do as well as its datetimes.
    merged: list[tuple[int, int, str]] = radicale_report._merge_freebusy_periods(
        [p for p in periods if p[1] > p[0]]  # type: ignore[misc]
    )  # type: ignore[assignment]
    return "".join(
        f"FREEBUSY;FBTYPE={fbtype}:{_utc_text(start)}/{_utc_text(end)}\r\n"
        for start, end, fbtype in merged
    )


_ENVELOPES = _Memo(1_000)
_DTSTAMP_LINE = re.compile(r"\r\nDTSTAMP:\d{8}T\d{6}Z\r\n")


def _free_busy_envelope(query: FreeBusyQuery) -> str:
    """Radicale's VFREEBUSY without periods, rendered by its vobject code once per range (that
    cost ~0.35 ms a query) and stamped with the current DTSTAMP each time."""
    template = _ENVELOPES.get((query.start, query.end))
    if template is None:
        template = radicale_report.render_freebusy([], query.start, query.end)
        _ENVELOPES.put((query.start, query.end), template)
    now = dt.datetime.now(dt.UTC).strftime(TIMESTAMP_FORMAT)
    return _DTSTAMP_LINE.sub(f"\r\nDTSTAMP:{now}\r\n", template, count=1)


# --- calendar-query, plain and with expand --------------------------------------------------------


def calendar_query_multistatus(
    conn: Connection,
    collection: calendars.Collection,
    query: CalendarQuery,
    base_prefix: str,
    max_occurrence: int,
) -> bytes:
    """The multistatus Radicale's `xml_report` builds for this query, from index candidates,
    written as text (as `sync_multistatus` is).

    Per item, only `(id, href, etag)` is read: each item's `<response>` is remembered as bytes
    under its ETag (and the query's scope), so a calendar app asking for the same weeks again
    costs a dict lookup per item; texts are read only for what is not remembered. ElementTree,
    escaping and Radicale's href helpers cost ~40 us an item, more than the query itself."""
    prefix = f"{base_prefix}/{collection.path}/"
    found = (
        _expanded_fragments(conn, collection, query, prefix, max_occurrence)
        if query.expand
        else _plain_fragments(conn, collection, query, prefix, max_occurrence)
    )
    if not found:
        return b"<?xml version='1.0' encoding='utf-8'?>\n<multistatus xmlns=\"DAV:\" />"
    caldav = ' xmlns:C="urn:ietf:params:xml:ns:caldav"' if _CALENDAR_DATA in query.props else ""
    head = f"<?xml version='1.0' encoding='utf-8'?>\n<multistatus xmlns=\"DAV:\"{caldav}>"
    found.insert(0, head.encode(ENCODING))
    found.append(b"</multistatus>")
    return b"".join(found)


_GETETAG = _clark("D:getetag")
_CALENDAR_DATA = _clark("C:calendar-data")


def _response_fragment(
    prefix: str, href: str, etag: str, props: tuple[str, ...], text: str
) -> bytes:
    """One item's `<response>` as ElementTree writes it under `xml_bytes`'s namespaces."""
    found = "".join(
        f"<getetag>{_xml_text(etag)}</getetag>"
        if tag == _GETETAG
        else f"<C:calendar-data>{_xml_text(text)}</C:calendar-data>"
        for tag in props
    )
    return (
        f"<response><href>{_xml_text(quote(prefix + href))}</href><propstat><prop>{found}"
        "</prop><status>HTTP/1.1 200 OK</status></propstat></response>"
    ).encode(ENCODING)


def _plain_fragments(
    conn: Connection,
    collection: calendars.Collection,
    query: CalendarQuery,
    prefix: str,
    max_occurrence: int,
) -> list[bytes]:
    """Without expand, Radicale serves the stored text of what our storage plugin's
    `get_filtered` returns, re-testing only the uncertain candidates: the same here. A
    fragment is `(response bytes, VEVENT count)`: Radicale's anti-DoS limit counts the VEVENTs
    it serves, checked after each item."""
    start_utc, end_utc = _seconds(query.range_start), _seconds(query.range_end)
    versions = calendars.event_versions_in_range(conn, collection, start_utc, end_utc)
    scope = f"{prefix}\0{' '.join(query.props)}"
    remembered = [
        _FRAGMENTS.get((scope, href, etag)) if certain else None
        for _, href, etag, _, certain in versions
    ]
    missing = [version[0] for version, known in zip(versions, remembered, strict=True) if not known]
    texts = calendars.items_by_id(conn, missing) if missing else {}
    with_data = _CALENDAR_DATA in query.props
    found: list[bytes] = []
    event_count = 0
    for (item_id, href, etag, _, certain), fragment in zip(versions, remembered, strict=True):
        if fragment is None:
            stored = texts.get(item_id)
            if stored is None or not (certain or _passes_filters(collection, stored, query)):
                continue
            fragment = (
                _response_fragment(prefix, href, etag, query.props, stored.text),
                _vevent_count(stored.text),
            )
            _FRAGMENTS.put((scope, href, etag), fragment, len(fragment[0]))
        if with_data:
            event_count += fragment[1]
            if max_occurrence and event_count > max_occurrence:
                raise OverLimit("occurrence limit")
        found.append(fragment[0])
    return found


def _passes_filters(
    collection: calendars.Collection, stored: calendars.StoredItem, query: CalendarQuery
) -> bool:
    """Radicale's own test of an uncertain candidate against the query's filters."""
    item = _radicale_item(collection, stored)
    try:
        return all(radicale_report.test_filter("VCALENDAR", item, f) for f in query.main_filters)
    except Exception as exc:  # Radicale answers (400) for what its own code rejects
        raise FallThrough(str(exc)) from exc


def _vevent_count(text: str) -> int:
    """How many `BEGIN:VEVENT` lines Radicale counts in the item."""
    return sum(1 for line in text.splitlines() if line.upper() == "BEGIN:VEVENT")


# What `_template_expansion` could not write: Radicale's own code expands the item every time.
_RADICALE_EXPANDS = (b"", -1)


def _expanded_fragments(
    conn: Connection,
    collection: calendars.Collection,
    query: CalendarQuery,
    prefix: str,
    max_occurrence: int,
) -> list[bytes]:
    """Each candidate's response with its expanded calendar-data, as Radicale's expand answers.

    A fragment is `(response bytes, instance count)`, remembered under a key holding all the
    expansion depends on: the text (its ETag; the template path takes only UTC or item-defined
    zones, never the collection's), how far the item is indexed, the query's ranges, properties
    and limit (its instances in them follow from those), and the href."""
    range_start, range_end = _seconds(query.range_start), _seconds(query.range_end)
    low = range_start - CANDIDATE_MARGIN_SECONDS
    high = range_end + CANDIDATE_MARGIN_SECONDS
    versions = calendars.event_versions_in_range(conn, collection, low, high)
    scope = (
        f"{prefix}\0{' '.join(query.props)}\0{query.range_start}\0{query.range_end}"
        f"\0{query.expand_start}\0{query.expand_end}\0{max_occurrence}"
    )
    remembered = [
        _FRAGMENTS.get((scope, href, etag, indexed_until))
        for _, href, etag, indexed_until, _ in versions
    ]
    missing = [
        version[0]
        for version, known in zip(versions, remembered, strict=True)
        if known is None or known is _RADICALE_EXPANDS
    ]
    texts = calendars.items_by_id(conn, missing) if missing else {}
    indexed = instances_in_range(conn, collection, low, high) if missing else {}
    found: list[bytes] = []
    expanded_count = 0
    for (item_id, href, etag, indexed_until, _), fragment in zip(versions, remembered, strict=True):
        if fragment is None or fragment is _RADICALE_EXPANDS:
            stored = texts.get(item_id)
            if stored is None:
                continue
            expansion = None
            if fragment is None:
                expansion = _template_expansion(
                    stored, indexed.get(item_id, []), query, high, max_occurrence
                )
            if expansion is None:
                expansion = _radicale_expansion(
                    _radicale_item(collection, stored), query, max_occurrence
                )
                fragment = _fragment_of(prefix, href, etag, query.props, expansion)
                _FRAGMENTS.put((scope, href, etag, indexed_until), _RADICALE_EXPANDS)
            else:
                fragment = _fragment_of(prefix, href, etag, query.props, expansion)
                _FRAGMENTS.put((scope, href, etag, indexed_until), fragment, len(fragment[0]) + 1)
        instance_count = fragment[1]
        if instance_count == 0:
            continue  # Radicale drops both properties, so the whole response
        # Radicale expands once per property and counts each towards its limit.
        expanded_count += instance_count * len(query.props)
        if max_occurrence and expanded_count > max_occurrence:
            raise OverLimit("expand occurrence limit")
        found.append(fragment[0])
    return found


def _fragment_of(
    prefix: str, href: str, etag: str, props: tuple[str, ...], expansion: tuple[str, int]
) -> tuple[bytes, int]:
    calendar_text, instance_count = expansion
    if instance_count == 0:
        return b"", 0
    return _response_fragment(prefix, href, etag, props, calendar_text), instance_count


def _radicale_expansion(item: Any, query: CalendarQuery, max_occurrence: int) -> tuple[str, int]:
    """Radicale's own filter and expansion of one item: its answer for anything unusual."""
    assert query.expand_start is not None and query.expand_end is not None
    try:
        if not all(radicale_report.test_filter("VCALENDAR", item, f) for f in query.main_filters):
            return "", 0
        element = ET.Element(_clark("C:calendar-data"))
        element.text = item.serialize()
        expanded, count = radicale_report._expand(
            element=element,
            item=copy.copy(item),
            start=query.expand_start,
            end=query.expand_end,
            time_range_start=query.range_start,
            time_range_end=query.range_end,
            max_occurrence=max_occurrence,
        )
    except Exception as exc:  # Radicale answers (400) for what its own code rejects
        raise FallThrough(str(exc)) from exc
    return expanded.text or "", count


def _template_expansion(
    stored: calendars.StoredItem,
    instances: list[_Instance],
    query: CalendarQuery,
    candidates_end: int,
    max_occurrence: int,
) -> tuple[str, int] | None:
    """Radicale's `_expand` output for an item of the plain shape, written from its stored text
    and indexed instances; None when Radicale's code must do it.

    The stored text is vobject's serialization (Radicale stores `item.serialize()`), so a single
    event comes back as stored, and an instance of a series is the master's lines with DTSTART,
    DTEND and RECURRENCE-ID in UTC and the recurrence rules dropped, in vobject's property order.
    """
    if not _fully_indexed(stored, candidates_end):
        return None
    shape = shape_of(stored.text)
    if shape is None or shape.others or len(shape.events) != 1:
        return None
    (event,) = shape.events
    if not _plain_times(event, shape) or _lines(event, "recurrence-id"):
        return None
    range_start, range_end = _seconds(query.range_start), _seconds(query.range_end)
    if not _lines(event, "rrule"):
        # Radicale keeps a single event as it is when it overlaps the time range.
        overlaps = any(i.start_utc < range_end and i.end_utc > range_start for i in instances)
        return (stored.text, 1) if overlaps else ("", 0)
    duration = _radicale_duration(event, shape)
    if duration is None or duration <= 0:
        return None
    assert query.expand_start is not None and query.expand_end is not None
    expand_start, expand_end = _seconds(query.expand_start), _seconds(query.expand_end)
    # Radicale: rruleset.between(expand start - duration, expand end, inc=True) (its limit
    # counts these), then start <= range end and start + duration > range start.
    between = [
        i.start_utc for i in instances if expand_start - duration <= i.start_utc <= expand_end
    ]
    if max_occurrence and len(between) >= max_occurrence:
        raise OverLimit("expand occurrence limit")
    starts = [s for s in between if s <= range_end and s + duration > range_start]
    kept = [
        line
        for line in event
        if line.key not in RECURRENCE_KEYS and line.key not in ("dtstart", "dtend")
    ]
    if any("TZID=" in line.raw.upper() for line in kept):
        return None  # vobject would add a VTIMEZONE back for it
    if not starts:
        return "", 0
    header = "".join(line.raw for line in shape.header)
    events = "".join(_instance_text(kept, start, duration) for start in starts)
    return f"BEGIN:VCALENDAR\r\n{header}{events}END:VCALENDAR\r\n", len(starts)


def _radicale_duration(event: list[_Line], shape: _Shape) -> int | None:
    """DTEND - DTSTART as Radicale computes it: wall-clock when both are in one zone."""
    start_line, end_line = _lines(event, "dtstart")[0], _lines(event, "dtend")[0]
    start_kind, end_kind = _instant_kind(start_line, shape), _instant_kind(end_line, shape)
    if start_kind != end_kind:
        return None  # Radicale subtracts across zones exactly; rare, let its code do it
    start = dt.datetime.strptime(start_line.value[:15], "%Y%m%dT%H%M%S")
    end = dt.datetime.strptime(end_line.value[:15], "%Y%m%dT%H%M%S")
    return int((end - start).total_seconds())


def _instance_text(kept: list[_Line], start_utc: int, duration: int) -> str:
    """One expanded instance: vobject's order is UID, RECURRENCE-ID, DTSTART, DTEND, then the
    other properties (and nested components) by name, each name's lines in their stored order."""
    instant = _utc_text(start_utc)
    generated = {
        "recurrence-id": [f"RECURRENCE-ID:{instant}\r\n"],
        "dtstart": [f"DTSTART:{instant}\r\n"],
        "dtend": [f"DTEND:{_utc_text(start_utc + duration)}\r\n"],
    }
    by_key: dict[str, list[str]] = {key: list(lines) for key, lines in generated.items()}
    for line in kept:
        by_key.setdefault(line.key, []).append(line.raw)
    first = [key for key in VEVENT_FIRST_KEYS if key in by_key]
    ordered = first + sorted(key for key in by_key if key not in first)
    body = "".join(raw for key in ordered for raw in by_key[key])
    return f"BEGIN:VEVENT\r\n{body}END:VEVENT\r\n"


# --- sync-collection ------------------------------------------------------------------------------


def sync_multistatus(
    conn: Connection, collection: calendars.Collection, query: SyncQuery, base_prefix: str
) -> bytes:
    """Radicale's sync-collection answer, byte for byte, written as text: ElementTree alone
    costs more than the whole query for 10,000 items.

    Radicale puts the new sync token first, then a 404 response per href that no longer exists,
    then the current items in change order, each with its getetag/getcontenttype.
    """
    try:
        token, hrefs = calendars.changes_since(conn, collection, query.token)
    except calendars.InvalidSyncToken as exc:
        raise FallThrough(str(exc)) from exc  # Radicale: 403 DAV:valid-sync-token
    current = _etags_and_components(conn, collection.id, hrefs if query.token else None)
    prefix = f"{base_prefix}/{collection.path}/"
    parts = [
        "<?xml version='1.0' encoding='utf-8'?>\n",
        '<multistatus xmlns="DAV:">',
        f"<sync-token>{_xml_text(token)}</sync-token>",
    ]
    parts.extend(
        f"<response><href>{_xml_text(quote(prefix + href))}</href>"
        "<status>HTTP/1.1 404 Not Found</status></response>"
        for href in hrefs
        if href not in current
    )
    for href in hrefs:
        if href not in current:
            continue
        etag, component = current[href]
        props = "".join(
            f"<getetag>{_xml_text(etag)}</getetag>"
            if tag == _clark("D:getetag")
            else f"<getcontenttype>{_content_type(component)}</getcontenttype>"
            for tag in query.props
        )
        parts.append(
            f"<response><href>{_xml_text(quote(prefix + href))}</href>"
            f"<propstat><prop>{props}</prop>"
            "<status>HTTP/1.1 200 OK</status></propstat></response>"
        )
    parts.append("</multistatus>")
    return "".join(parts).encode(ENCODING)


def _content_type(component: str) -> str:
    """As `radicale.xmlutils.get_content_type` says it for a calendar item."""
    return f"text/calendar;charset={ENCODING}" + (f";component={component}" if component else "")


def _etags_and_components(
    conn: Connection, collection_id: int, hrefs: list[str] | None
) -> dict[str, tuple[str, str]]:
    """href -> (etag, component) of the collection's items (of `hrefs` only, if given), without
    reading their text as `calendars.get_items` does."""
    columns = select(items.c.href, items.c.etag, items.c.component).where(
        items.c.collection_id == collection_id
    )
    if hrefs is None:
        return {href: (etag, component) for href, etag, component in conn.execute(columns)}
    found: dict[str, tuple[str, str]] = {}
    wanted = list(dict.fromkeys(hrefs))
    for start in range(0, len(wanted), 500):  # stay under bound-parameter limits
        rows = conn.execute(columns.where(items.c.href.in_(wanted[start : start + 500])))
        found.update((href, (etag, component)) for href, etag, component in rows)
    return found


def _xml_text(text: str) -> str:
    """Escaped as ElementTree escapes element text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- the HTTP side -------------------------------------------------------------------------------


def calendar_path(request: web.Request, prefix: str) -> str | None:
    """`owner/calendar` of a request for a calendar collection, else None."""
    raw_path = request.raw_path.partition("?")[0]
    if not raw_path.startswith(prefix + "/"):
        return None
    unsafe = unquote(raw_path[len(prefix) :], encoding="utf-8", errors="strict")
    path = pathutils.strip_path(pathutils.sanitize_path(unsafe))
    parts = path.split("/")
    if len(parts) != 2 or not all(parts) or parts[0] == RESOURCES_PRINCIPAL:
        return None
    return path


async def answer_report(
    request: web.Request, body: bytes, application: radicale.Application, prefix: str
) -> web.Response | None:
    """Answer a REPORT from the index if it is one we recognise and the caller owns the
    calendar; None means "let Radicale answer" (it then does its own auth, rights and errors)."""
    if request.method != "REPORT" or request.headers.get("Content-Encoding"):
        return None
    try:
        path = calendar_path(request, prefix)
    except UnicodeDecodeError:
        return None
    if path is None:
        return None
    query = recognise(body)
    if query is None:
        return None
    credentials = basic_credentials(request.headers.get("Authorization", ""))
    if credentials is None:
        return None
    reporting = application.configuration
    limit = 0
    if isinstance(query, FreeBusyQuery):
        limit = reporting.get("reporting", "max_freebusy_occurrence")
    elif isinstance(query, CalendarQuery):
        limit = reporting.get("reporting", "max_expand_occurrence")
    check = request.app[CREDENTIALS]
    try:
        # The credentials, the calendar and the answer in one read on one thread.
        answer = await request.app[DATABASE].run_read(
            _answer_unit, check, credentials, path, body, query, prefix, limit
        )
        if answer is None:
            return None
    except FallThrough:
        return None
    except OverLimit:
        # Radicale's own answer to its limit (httputils.BAD_REQUEST), for the owner only.
        return _response(request, Answer(b"Bad Request"), "text/plain", application, status=400)
    if isinstance(query, FreeBusyQuery):
        return _response(request, answer, f"text/calendar; charset={ENCODING}", application)
    return _response(request, answer, f"text/xml; charset={ENCODING}", application)


def _answer_unit(
    conn: Connection,
    check: CredentialCheck,
    credentials: tuple[str, str],
    path: str,
    body: bytes,
    query: Query,
    prefix: str,
    limit: int,
) -> Answer | None:
    """The answer for the calendar's owner with valid credentials; None: Radicale answers."""
    user = check.verify(conn, *credentials)
    # Radicale's owner-only rights: a user reaches only their own calendars.
    if user is None or user.username != path.split("/", 1)[0]:
        return None
    collection = calendars.get_collection(conn, path)
    if collection is None or collection.tag != "VCALENDAR":
        return None
    if isinstance(query, SyncQuery):
        return Answer(sync_multistatus(conn, collection, query, prefix))
    key = (collection.id, collection.incarnation, collection.revision, path, body, limit)
    if isinstance(query, FreeBusyQuery):
        # Its periods are remembered; the VFREEBUSY around them is stamped at each asking.
        lines = _ANSWERS.get(key)
        if lines is None:
            lines = free_busy_lines(conn, collection, query, limit)
            _ANSWERS.put(key, lines, len(lines) + len(body))
        return Answer(stamped_free_busy(lines, query).encode(ENCODING))
    answer = _ANSWERS.get(key)
    if answer is None:
        answer = Answer(calendar_query_multistatus(conn, collection, query, prefix, limit))
        # Its cost: the answer, room for its gzip (about an eighth of it) and the request.
        _ANSWERS.put(key, answer, len(answer.body) * 5 // 4 + len(body))
    return answer


class Answer:
    """A REPORT's answer; its gzip is made once, so a remembered answer is compressed once."""

    __slots__ = ("_gzipped", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._gzipped: bytes | None = None

    def gzipped(self) -> bytes:
        if self._gzipped is None:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            self._gzipped = compressor.compress(self.body) + compressor.flush()
        return self._gzipped


def xml_bytes(element: ET.Element) -> bytes:
    """As Radicale's `_xml_response` writes XML (same declaration, same namespace prefixes)."""
    return ET.tostring(element, encoding=ENCODING, xml_declaration=True)


def _response(
    request: web.Request,
    answer: Answer,
    content_type: str,
    application: radicale.Application,
    status: int | None = None,
) -> web.Response:
    """Headers as Radicale's: gzip when the client takes it, plus `[headers]` from its config."""
    headers = {"Content-Type": content_type}
    body = answer.body
    accepted = {e.strip() for e in request.headers.get("Accept-Encoding", "").split(",")}
    if "gzip" in accepted:
        body = answer.gzipped()
        headers["Content-Encoding"] = "gzip"
    headers.update(getattr(application, "_extra_headers", {}) or {})
    if status is None:
        status = 200 if content_type.startswith("text/calendar") else 207
    response = web.Response(status=status, body=body)
    response.headers.popall("Content-Type", None)
    for name, value in headers.items():
        response.headers[name] = value
    return response
