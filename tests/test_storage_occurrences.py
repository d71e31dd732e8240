"""How a calendar object becomes occurrence intervals: recurrence, overrides, zones, busy time."""

from __future__ import annotations

import datetime as dt
import math

import vobject
from dateutil.rrule import rrulestr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from radicale.item import filter as radicale_filter

from bookdav.storage.occurrences import (
    TIMESTAMP_MAX,
    Occurrence,
    item_times,
    occurrences_between,
    zone_named,
)
from tests.storage_fixtures import event, vcalendar, vevent

UTC = dt.UTC
BERLIN = zone_named("Europe/Berlin")
NEW_YORK = zone_named("America/New_York")
FAR_HORIZON = int(dt.datetime(2030, 1, 1, tzinfo=UTC).timestamp())


def utc(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=UTC).timestamp())


def spans(text: str, zone: dt.tzinfo = UTC, horizon: int = FAR_HORIZON) -> list[tuple[int, int]]:
    return [(o.start_utc, o.end_utc) for o in item_times(text, zone, horizon).occurrences]


def test_a_timed_event_occupies_dtstart_to_dtend() -> None:
    times = item_times(
        event("a", "DTSTART:20240105T100000Z", "DTEND:20240105T113000Z"), UTC, FAR_HORIZON
    )
    assert times.occurrences == (Occurrence(utc(2024, 1, 5, 10), utc(2024, 1, 5, 11, 30), True),)
    assert (times.start_utc, times.end_utc, times.indexed_until) == (
        utc(2024, 1, 5, 10),
        utc(2024, 1, 5, 11, 30),
        None,
    )


def test_rrule_with_exdate_and_an_override_replacing_its_instance() -> None:
    text = vcalendar(
        vevent(
            "r",
            "DTSTART:20240101T090000Z",
            "DURATION:PT1H",
            "RRULE:FREQ=DAILY;COUNT=4",
            "EXDATE:20240102T090000Z",
        ),
        vevent(
            "r",
            "RECURRENCE-ID:20240103T090000Z",
            "DTSTART:20240103T150000Z",
            "DTEND:20240103T170000Z",
        ),
    )
    assert spans(text) == [
        (utc(2024, 1, 1, 9), utc(2024, 1, 1, 10)),
        (utc(2024, 1, 3, 15), utc(2024, 1, 3, 17)),
        (utc(2024, 1, 4, 9), utc(2024, 1, 4, 10)),
    ]


def test_rdate_adds_instances() -> None:
    text = event(
        "d", "DTSTART:20240101T090000Z", "DTEND:20240101T100000Z", "RDATE:20240110T120000Z"
    )
    assert spans(text) == [
        (utc(2024, 1, 1, 9), utc(2024, 1, 1, 10)),
        (utc(2024, 1, 10, 12), utc(2024, 1, 10, 13)),
    ]


def test_all_day_event_spans_whole_days_in_the_collection_zone_across_dst() -> None:
    text = event("ad", "DTSTART;VALUE=DATE:20240331", "DTEND;VALUE=DATE:20240401")
    # Berlin's 31 March 2024 lasts 23 hours (CET -> CEST).
    assert spans(text, BERLIN) == [(utc(2024, 3, 30, 23), utc(2024, 3, 31, 22))]
    assert spans(text, UTC) == [(utc(2024, 3, 31), utc(2024, 4, 1))]


def test_all_day_override_replaces_the_day_it_names() -> None:
    text = vcalendar(
        vevent("w", "DTSTART;VALUE=DATE:20240101", "RRULE:FREQ=DAILY;COUNT=3"),
        vevent("w", "RECURRENCE-ID;VALUE=DATE:20240102", "DTSTART;VALUE=DATE:20240110"),
    )
    assert spans(text) == [
        (utc(2024, 1, 1), utc(2024, 1, 2)),
        (utc(2024, 1, 3), utc(2024, 1, 4)),
        (utc(2024, 1, 10), utc(2024, 1, 11)),
    ]


def test_floating_time_is_wall_clock_in_the_collection_zone() -> None:
    text = event("f", "DTSTART:20240115T090000", "DTEND:20240115T100000")
    assert spans(text, NEW_YORK) == [(utc(2024, 1, 15, 14), utc(2024, 1, 15, 15))]


def test_weekly_event_with_tzid_keeps_its_wall_clock_time_across_dst() -> None:
    text = event(
        "t",
        "DTSTART;TZID=Europe/Berlin:20240328T090000",
        "DTEND;TZID=Europe/Berlin:20240328T100000",
        "RRULE:FREQ=WEEKLY;COUNT=2",
    )
    # No VTIMEZONE in the object: the TZID is taken as the IANA zone of that name.
    assert spans(text) == [
        (utc(2024, 3, 28, 8), utc(2024, 3, 28, 9)),
        (utc(2024, 4, 4, 7), utc(2024, 4, 4, 8)),
    ]


def test_duration_in_days_is_nominal_across_dst() -> None:
    text = event("n", "DTSTART;TZID=Europe/Berlin:20240330T120000", "DURATION:P1D")
    assert spans(text) == [(utc(2024, 3, 30, 11), utc(2024, 3, 31, 10))]


def test_transparent_and_cancelled_instances_are_not_busy() -> None:
    transparent = item_times(
        event("t", "DTSTART:20240101T090000Z", "DTEND:20240101T100000Z", "TRANSP:TRANSPARENT"),
        UTC,
        FAR_HORIZON,
    )
    assert [o.busy for o in transparent.occurrences] == [False]
    text = vcalendar(
        vevent(
            "c", "DTSTART:20240101T090000Z", "DTEND:20240101T100000Z", "RRULE:FREQ=DAILY;COUNT=2"
        ),
        vevent(
            "c",
            "RECURRENCE-ID:20240102T090000Z",
            "DTSTART:20240102T090000Z",
            "DTEND:20240102T100000Z",
            "STATUS:CANCELLED",
        ),
    )
    assert [o.busy for o in item_times(text, UTC, FAR_HORIZON).occurrences] == [True, False]


def test_default_durations_follow_rfc_5545() -> None:
    assert item_times(event("d", "DTSTART;VALUE=DATE:20240101"), UTC, FAR_HORIZON).occurrences == (
        Occurrence(utc(2024, 1, 1), utc(2024, 1, 2), True),
    )
    # A DATE-TIME with no end is a moment: CalDAV matches it as one second; it blocks no time.
    assert item_times(event("m", "DTSTART:20240101T090000Z"), UTC, FAR_HORIZON).occurrences == (
        Occurrence(utc(2024, 1, 1, 9), utc(2024, 1, 1, 9, 0, 1), False),
    )


def test_open_rrule_is_indexed_up_to_the_horizon_and_left_open_after() -> None:
    text = event("o", "DTSTART:20240101T090000Z", "DTEND:20240101T100000Z", "RRULE:FREQ=WEEKLY")
    horizon = utc(2024, 2, 1)
    times = item_times(text, UTC, horizon)
    assert len(times.occurrences) == 5  # 1, 8, 15, 22, 29 January
    assert times.indexed_until == horizon
    assert times.end_utc == TIMESTAMP_MAX
    assert times.recurring


def test_a_rule_longer_than_the_cap_stops_at_the_first_unindexed_instance() -> None:
    text = event("c", "DTSTART:20240101T090000Z", "DURATION:PT1H", "RRULE:FREQ=DAILY;COUNT=50")
    times = item_times(text, UTC, FAR_HORIZON, max_occurrences=10)
    assert len(times.occurrences) == 10
    assert times.indexed_until == utc(2024, 1, 11, 9)


def test_occurrences_between_reaches_past_the_horizon() -> None:
    text = event("o", "DTSTART:20240101T090000Z", "DTEND:20240101T100000Z", "RRULE:FREQ=WEEKLY")
    found = occurrences_between(text, UTC, utc(2040, 1, 1), utc(2040, 1, 8))
    assert len(found) == 1
    assert dt.datetime.fromtimestamp(found[0].start_utc, UTC).weekday() == 0  # a Monday


def test_todo_gets_radicale_time_range_and_no_occurrences() -> None:
    text = vcalendar(
        "BEGIN:VTODO\nUID:t\nDTSTAMP:20240101T000000Z\nDTSTART:20240101T090000Z\n"
        "DUE:20240102T090000Z\nEND:VTODO"
    )
    times = item_times(text, UTC, FAR_HORIZON)
    assert times.component == "VTODO"
    assert times.occurrences == ()
    assert times.start_utc <= utc(2024, 1, 1, 9) and times.end_utc >= utc(2024, 1, 2, 9)


# --- property: the index agrees with Radicale's own expansion ------------------------------------


def radicale_spans(text: str) -> list[tuple[int, int]]:
    """Brute-force reference: every range Radicale's filter visits."""
    found: list[tuple[int, int]] = []

    def on_range(start: dt.datetime, end: dt.datetime, is_recurrence: bool) -> bool:
        found.append((math.floor(start.timestamp()), math.ceil(end.timestamp())))
        return False

    radicale_filter.visit_time_ranges(vobject.readOne(text), "VEVENT", on_range, lambda _: True)
    return sorted(found)


def stamp(moment: dt.datetime, floating: bool) -> str:
    return moment.strftime("%Y%m%dT%H%M%S") + ("" if floating else "Z")


@st.composite
def recurring_events(draw: st.DrawFn) -> str:
    floating = draw(st.booleans())
    start = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=15 * draw(st.integers(0, 35_000)))
    minutes = draw(st.integers(1, 3 * 24 * 60))
    freq = draw(st.sampled_from(["DAILY", "WEEKLY", "MONTHLY"]))
    count = draw(st.integers(1, 25))
    interval = draw(st.integers(1, 3))
    master_props = [
        f"DTSTART:{stamp(start, floating)}",
        f"DTEND:{stamp(start + dt.timedelta(minutes=minutes), floating)}",
        f"RRULE:FREQ={freq};INTERVAL={interval};COUNT={count}",
    ]
    rule = list(rrulestr(master_props[2][len("RRULE:") :], dtstart=start))
    picked = draw(st.sets(st.integers(0, len(rule) - 1), max_size=min(4, len(rule))))
    excluded = [i for i in picked if i % 2 == 0]
    moved = [i for i in picked if i % 2 == 1]
    master_props += [f"EXDATE:{stamp(rule[i], floating)}" for i in excluded]
    components = [vevent("p", *master_props)]
    for i in moved:
        shift = dt.timedelta(minutes=draw(st.integers(-600, 600)))
        components.append(
            vevent(
                "p",
                f"RECURRENCE-ID:{stamp(rule[i], floating)}",
                f"DTSTART:{stamp(rule[i] + shift, floating)}",
                f"DTEND:{stamp(rule[i] + shift + dt.timedelta(minutes=30), floating)}",
            )
        )
    return vcalendar(*components)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recurring_events())
def test_index_matches_radicales_expansion_for_utc_and_floating_events(text: str) -> None:
    assert spans(text, UTC) == radicale_spans(text)
