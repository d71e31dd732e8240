"""The slot engine against a brute-force minute-grid reference, over random hours, events and rules."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from bookdav.booking.slots import (
    MINUTE,
    UNLIMITED_DAYS,
    Rules,
    SlotQuery,
    free_slots,
    merge,
    within_notice_and_advance,
)

HORIZON_MINUTES = 3 * 24 * 60  # three days of minutes keeps the reference fast


def reference_slots(
    query: SlotQuery, available: list[tuple[int, int]], busy: list[tuple[int, int]], now: int
) -> list[tuple[int, int]]:
    """Minute by minute: which minutes are available, which are busy; slots aligned to the start
    of each run of available minutes."""
    rules = query.rules
    free_minute = set()
    for start, end in available:
        free_minute.update(range(start // MINUTE, end // MINUTE))
    busy_minute = set()
    for start, end in busy:
        busy_minute.update(range(start // MINUTE, end // MINUTE))
    step = rules.slot_interval_minutes or query.duration_minutes
    slots = []
    for minute in sorted(free_minute):
        if minute - 1 in free_minute:
            continue  # not the start of a run
        run_end = minute
        while run_end in free_minute:
            run_end += 1
        start = minute
        while start + query.duration_minutes <= run_end:
            inside_window = query.window_start <= start * MINUTE < query.window_end
            notice_ok = start * MINUTE >= now + rules.min_notice_minutes * MINUTE
            advance_ok = start * MINUTE < now + rules.max_advance_days * 86_400
            padded = range(
                start - rules.buffer_before_minutes,
                start + query.duration_minutes + rules.buffer_after_minutes,
            )
            if inside_window and notice_ok and advance_ok and not busy_minute.intersection(padded):
                slots.append((start * MINUTE, (start + query.duration_minutes) * MINUTE))
            start += step
    return slots


def minute_intervals(max_count: int, max_length: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    interval = st.tuples(st.integers(0, HORIZON_MINUTES), st.integers(0, max_length)).map(
        lambda pair: (pair[0] * MINUTE, (pair[0] + pair[1]) * MINUTE)
    )
    return st.lists(interval, max_size=max_count)


rules_strategy = st.builds(
    Rules,
    min_notice_minutes=st.integers(0, 600),
    max_advance_days=st.integers(0, 4),
    buffer_before_minutes=st.integers(0, 45),
    buffer_after_minutes=st.integers(0, 45),
    slot_interval_minutes=st.one_of(st.none(), st.integers(5, 120)),
)


# Random hours, events, a duration, rules, a clock and a window: the scenarios both tests draw.
scenarios = given(
    available=minute_intervals(6, 600),
    busy=minute_intervals(12, 240),
    duration=st.integers(5, 180),
    rules=rules_strategy,
    now_minute=st.integers(0, HORIZON_MINUTES),
    window=st.tuples(st.integers(0, HORIZON_MINUTES), st.integers(0, HORIZON_MINUTES)),
)


@settings(max_examples=300, deadline=None)
@scenarios
def test_engine_matches_the_minute_grid_reference(
    available: list[tuple[int, int]],
    busy: list[tuple[int, int]],
    duration: int,
    rules: Rules,
    now_minute: int,
    window: tuple[int, int],
) -> None:
    query = SlotQuery(
        window_start=min(window) * MINUTE,
        window_end=max(window) * MINUTE,
        duration_minutes=duration,
        rules=rules,
    )
    now = now_minute * MINUTE
    assert free_slots(query, available, busy, now) == reference_slots(query, available, busy, now)


def test_working_day_with_a_meeting_loses_exactly_the_overlapping_slots() -> None:
    day = 9 * 60 * MINUTE
    query = SlotQuery(0, 86_400, 30, Rules(min_notice_minutes=0))
    available = [(day, day + 8 * 3600)]
    assert len(free_slots(query, available, [], now=0)) == 16
    meeting = [(day + 3600, day + 2 * 3600)]
    slots = free_slots(query, available, meeting, now=0)
    assert len(slots) == 14
    assert (day + 3600, day + 3600 + 1800) not in slots


def test_merge_joins_touching_and_overlapping_intervals() -> None:
    assert merge([(5, 10), (0, 5), (12, 14), (13, 20), (30, 30)]) == [(0, 10), (12, 20)]


@settings(max_examples=300, deadline=None)
@scenarios
def test_clock_free_candidates_cut_by_the_clock_equal_the_direct_answer(
    available: list[tuple[int, int]],
    busy: list[tuple[int, int]],
    duration: int,
    rules: Rules,
    now_minute: int,
    window: tuple[int, int],
) -> None:
    """What slot search caches (slots without notice/advance) and cuts per request is exact."""
    start, end = min(window) * MINUTE, max(window) * MINUTE
    timeless = dataclasses.replace(rules, min_notice_minutes=0, max_advance_days=UNLIMITED_DAYS)
    candidates = free_slots(SlotQuery(start, end, duration, timeless), available, busy, start)
    now = now_minute * MINUTE
    direct = free_slots(SlotQuery(start, end, duration, rules), available, busy, now)
    assert within_notice_and_advance(candidates, rules, now) == direct
