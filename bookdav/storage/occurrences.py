"""Turn a calendar object into the time intervals it occupies: the occurrence index's rows.

Computed once, when an item is written, so that time-range reads (CalDAV calendar-query, free-busy,
the slot engine) never parse iCalendar. A VEVENT becomes one `Occurrence(start_utc, end_utc, busy)`
per instance: RRULE + RDATE - EXDATE, each RECURRENCE-ID override replacing the instance it names;
DATE values are whole days and floating times are wall-clock times, both in the collection's zone
(RFC 4791 section 9.9 takes floating times in the calendar's zone); the end comes from DTEND
(exact), DURATION (days nominal, the rest exact), else one day for a DATE and zero for a DATE-TIME
(RFC 5545 3.6.1), which matches RFC 4791's table as `[start, start + 1 s)` and is not busy.
TRANSP:TRANSPARENT and STATUS:CANCELLED instances are not busy.

Open-ended RRULEs are expanded up to a horizon (the caller passes now + 2 years), and any rule
stops after `MAX_INDEXED_OCCURRENCES`; the result then says `indexed_until`: every instance that
starts before it is indexed, anything later must be asked of the item itself.

Why vobject and not icalendar + dateutil (measured here): Radicale hands storage an already
parsed vobject component on every upload, so expanding it costs no second parse (parsing a small
event with a VTIMEZONE: vobject ~2.4 ms, icalendar ~0.5 ms; expanding two years of a weekly series
~3.5 ms), and vobject's `getrruleset()` is the very rule set Radicale's own filters
(`radicale.item.filter`) evaluate, so instances agree with what Radicale re-tests (a hypothesis
test checks this against `visit_time_ranges`). We do not call `visit_time_ranges` itself because it
takes floating and DATE values as UTC, does not drop instances overridden with a DATE
RECURRENCE-ID, and cannot tell us which instances are busy. VTODO and VJOURNAL get Radicale's
`find_time_range` as their whole range only: they never block time.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import vobject
from radicale import item as radicale_item
from radicale.item import filter as radicale_filter

TIMESTAMP_MIN: int = radicale_filter.TIMESTAMP_MIN
TIMESTAMP_MAX: int = radicale_filter.TIMESTAMP_MAX
HORIZON_SECONDS = 2 * 366 * 86400
# More instances than this (a 15-minute series, a daily one from decades ago) are left to the item.
MAX_INDEXED_OCCURRENCES = 20_000
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Occurrence:
    """One instance of an event, as half-open UTC seconds `[start_utc, end_utc)`."""

    start_utc: int
    end_utc: int
    busy: bool


@dataclass(frozen=True)
class ItemTimes:
    """Everything the index stores about an item's time: its whole range and its instances."""

    component: str
    start_utc: int
    end_utc: int
    occurrences: tuple[Occurrence, ...]
    recurring: bool
    # None: every instance is indexed. Otherwise every instance starting before this is indexed.
    indexed_until: int | None


@dataclass(frozen=True)
class _Length:
    """An event's length: whole days counted on the wall clock (nominal), plus exact seconds."""

    days: int
    seconds: float
    # False for zero/negative lengths: such an event marks a moment, it blocks no time.
    occupies_time: bool


def zone_named(name: str | None) -> dt.tzinfo:
    """The IANA zone called `name`, or UTC for an empty or unknown name."""
    if not name:
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC


def _iana_zone_of(tzinfo: dt.tzinfo) -> ZoneInfo | None:
    """The IANA zone a VTIMEZONE is named after, if it is named after one.

    A TZID such as Europe/Berlin means that zone; the VTIMEZONE beside it is only a snapshot
    (icalendar writes RDATE lists that stop in 2037, and dateutil's reading of those gives the
    wrong offset: measured +01:00 for Berlin in May 2027). The wall time stays, the rules come
    from the tz database."""
    name = getattr(tzinfo, "_tzid", None)
    return _zone_or_none(name) if isinstance(name, str) else None


@functools.lru_cache(maxsize=512)
def _zone_or_none(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def to_utc_seconds(value: dt.date, zone: dt.tzinfo) -> int:
    """An instant in epoch seconds; DATE means midnight and naive (floating) means wall time, both
    in `zone`."""
    moment = value if isinstance(value, dt.datetime) else dt.datetime.combine(value, dt.time())
    tzinfo = moment.tzinfo
    if tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    elif (named := _iana_zone_of(tzinfo)) is not None:
        moment = moment.replace(tzinfo=named)
    elif hasattr(tzinfo, "localize"):
        # vobject resolves a TZID without VTIMEZONE to a pytz zone, which dateutil's rule
        # arithmetic leaves at the wrong offset: place the wall time in that zone again.
        moment = tzinfo.localize(moment.replace(tzinfo=None))
    return math.floor(moment.timestamp())


def component_name(vcalendar: vobject.base.Component) -> str:
    """The first non-VTIMEZONE component's name, as Radicale's `find_tag` says."""
    return radicale_item.find_tag(vcalendar)


def item_times(
    calendar: vobject.base.Component | str,
    zone: dt.tzinfo,
    horizon_utc: int,
    max_occurrences: int = MAX_INDEXED_OCCURRENCES,
) -> ItemTimes:
    """Everything the index needs from one calendar object (vobject VCALENDAR or its text)."""
    if isinstance(calendar, str):
        calendar = vobject.readOne(calendar)
    tag = component_name(calendar)
    if tag != "VEVENT":
        start, end = radicale_item.find_time_range(calendar, tag)
        return ItemTimes(tag, start, end, (), _has_recurrence(calendar, tag), None)
    occurrences, indexed_until = event_occurrences(calendar, zone, horizon_utc, max_occurrences)
    recurring = _has_recurrence(calendar, tag)
    if not occurrences:
        # Nothing indexed: either every instance was excluded, or all lie past the horizon.
        start = end = indexed_until if indexed_until is not None else 0
    else:
        start = occurrences[0].start_utc
        end = max(occurrence.end_utc for occurrence in occurrences)
    if indexed_until is not None:
        end = TIMESTAMP_MAX
    return ItemTimes(tag, start, end, tuple(occurrences), recurring, indexed_until)


def event_occurrences(
    calendar: vobject.base.Component,
    zone: dt.tzinfo,
    until_utc: int,
    max_occurrences: int = MAX_INDEXED_OCCURRENCES,
) -> tuple[list[Occurrence], int | None]:
    """The VEVENT instances of `calendar`, sorted, and the `indexed_until` bound (None if all).

    Open rules are expanded to instances starting before `until_utc`; any rule stops after
    `max_occurrences` instances.
    """
    master, overrides = _master_and_overrides(calendar.contents.get("vevent", []))
    occurrences = [_single_occurrence(override, zone) for override in overrides]
    indexed_until: int | None = None
    if master is not None:
        overridden = {to_utc_seconds(override.recurrence_id.value, zone) for override in overrides}
        master_occurrences, indexed_until = _expand_master(
            master, zone, overridden, until_utc, max_occurrences
        )
        occurrences.extend(master_occurrences)
    occurrences.sort(key=lambda occurrence: (occurrence.start_utc, occurrence.end_utc))
    return occurrences, indexed_until


def occurrences_between(
    calendar: vobject.base.Component | str,
    zone: dt.tzinfo,
    start_utc: int,
    end_utc: int,
    max_occurrences: int = 10 * MAX_INDEXED_OCCURRENCES,
) -> list[Occurrence]:
    """The instances overlapping `[start_utc, end_utc)`, expanding the item itself: for windows
    past an item's `indexed_until`."""
    if isinstance(calendar, str):
        calendar = vobject.readOne(calendar)
    if component_name(calendar) != "VEVENT":
        return []
    occurrences, _ = event_occurrences(calendar, zone, end_utc, max_occurrences)
    return [o for o in occurrences if o.start_utc < end_utc and o.end_utc > start_utc]


def _has_recurrence(calendar: vobject.base.Component, tag: str) -> bool:
    components = calendar.contents.get(tag.lower(), [])
    return any(
        "rrule" in component.contents or "rdate" in component.contents for component in components
    )


def _master_and_overrides(
    components: Iterable[vobject.base.Component],
) -> tuple[vobject.base.Component | None, list[vobject.base.Component]]:
    master = None
    overrides = []
    for component in components:
        recurrence_id = component.contents.get("recurrence-id")
        if recurrence_id and recurrence_id[0].value:
            overrides.append(component)
        elif master is None:
            master = component
        else:
            raise ValueError("more than one VEVENT without RECURRENCE-ID")
    return master, overrides


def _is_busy(component: vobject.base.Component) -> bool:
    transp = _text_value(component, "transp")
    status = _text_value(component, "status")
    return transp != "TRANSPARENT" and status != "CANCELLED"


def _text_value(component: vobject.base.Component, name: str) -> str:
    lines = component.contents.get(name)
    if not lines or not isinstance(lines[0].value, str):
        return ""
    return lines[0].value.strip().upper()


def _dtstart(component: vobject.base.Component) -> dt.date:
    lines = component.contents.get("dtstart")
    if not lines:
        raise ValueError("VEVENT without DTSTART")
    return lines[0].value


def _length(component: vobject.base.Component, zone: dt.tzinfo) -> _Length:
    start = _dtstart(component)
    start_is_date = not isinstance(start, dt.datetime)
    dtend = component.contents.get("dtend")
    if dtend:
        end = dtend[0].value
        if start_is_date and not isinstance(end, dt.datetime):
            days = (end - start).days
            return _Length(days, 0, days > 0)
        seconds = to_utc_seconds(end, zone) - to_utc_seconds(start, zone)
        return _Length(0, seconds, seconds > 0)
    duration = component.contents.get("duration")
    if duration:
        value: dt.timedelta = duration[0].value
        if value <= dt.timedelta(0):
            return _Length(0, 1, False)
        return _Length(value.days, value.seconds + value.microseconds / 1e6, True)
    if start_is_date:
        return _Length(1, 0, True)
    # RFC 4791 9.9 matches a DTSTART-only event as [DTSTART, DTSTART + 1 s).
    return _Length(0, 1, False)


def _occurrence_at(start: dt.date, length: _Length, busy: bool, zone: dt.tzinfo) -> Occurrence:
    start_utc = to_utc_seconds(start, zone)
    if length.days:
        end_utc = to_utc_seconds(start + dt.timedelta(days=length.days), zone)
    else:
        end_utc = start_utc
    end_utc += math.ceil(length.seconds)
    return Occurrence(start_utc, end_utc, busy and length.occupies_time)


def _single_occurrence(component: vobject.base.Component, zone: dt.tzinfo) -> Occurrence:
    return _occurrence_at(_dtstart(component), _length(component, zone), _is_busy(component), zone)


def _is_open_ended(component: vobject.base.Component) -> bool:
    return any(
        ";UNTIL=" not in f";{rrule.value.upper()}" and ";COUNT=" not in f";{rrule.value.upper()}"
        for rrule in component.contents.get("rrule", [])
    )


def _instance_starts(component: vobject.base.Component) -> Iterator[dt.date]:
    if "rrule" not in component.contents and "rdate" not in component.contents:
        return iter((_dtstart(component),))
    ruleset = component.getrruleset(addRDate=True)
    if ruleset is None:
        return iter((_dtstart(component),))
    return iter(ruleset)


def _expand_master(
    master: vobject.base.Component,
    zone: dt.tzinfo,
    overridden: set[int],
    until_utc: int,
    max_occurrences: int,
) -> tuple[list[Occurrence], int | None]:
    length = _length(master, zone)
    busy = _is_busy(master)
    open_ended = _is_open_ended(master)
    occurrences: list[Occurrence] = []
    for count, start in enumerate(_instance_starts(master)):
        start_utc = to_utc_seconds(start, zone)
        if open_ended and start_utc >= until_utc:
            return occurrences, until_utc
        if count == max_occurrences:
            return occurrences, start_utc
        if start_utc not in overridden:
            occurrences.append(_occurrence_at(start, length, busy, zone))
    return occurrences, None
