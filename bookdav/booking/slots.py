"""The slot engine: free bookable slots from available blocks, busy time and a service's rules.

Pure computation on epoch seconds (UTC); nothing here parses iCalendar or reads the database.
Slots start at the start of each available block and then every `slot_interval` after it, so
working hours 09:00-17:00 with a 30-minute service give 09:00, 09:30, ..., 16:30.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Interval = tuple[int, int]

MINUTE = 60
DAY = 86_400
UNLIMITED_DAYS = 100_000  # "no advance limit": far past any window a search may ask for


@dataclass(frozen=True)
class Rules:
    """A service's business rules (minutes unless named otherwise), as the API names them."""

    min_notice_minutes: int = 60
    max_advance_days: int = 90
    buffer_before_minutes: int = 0
    buffer_after_minutes: int = 0
    slot_interval_minutes: int | None = None  # None: one slot every service duration
    cancellation_notice_minutes: int = 1440
    capacity: int = 1


@dataclass(frozen=True)
class SlotQuery:
    """What a client asks: slots of `duration_minutes` starting in [window_start, window_end)."""

    window_start: int
    window_end: int
    duration_minutes: int
    rules: Rules = field(default_factory=Rules)


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of intervals as sorted, disjoint, non-touching intervals; empty ones dropped."""
    merged: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def free_slots(
    query: SlotQuery,
    available: Iterable[Interval],
    busy: Iterable[Interval],
    now: int,
) -> list[Interval]:
    """Every slot inside an available block that overlaps no busy time (with buffers) and keeps
    the notice and advance rules."""
    rules = query.rules
    duration = query.duration_minutes * MINUTE
    step = (rules.slot_interval_minutes or query.duration_minutes) * MINUTE
    before = rules.buffer_before_minutes * MINUTE
    after = rules.buffer_after_minutes * MINUTE
    earliest = max(query.window_start, now + rules.min_notice_minutes * MINUTE)
    latest = min(query.window_end, now + rules.max_advance_days * DAY)
    blocked = merge(busy)
    blocked_ends = [end for _, end in blocked]
    slots: list[Interval] = []
    for block_start, block_end in merge(available):
        first = block_start
        if first < earliest:  # skip whole steps, keeping the block's alignment
            first += -(-(earliest - first) // step) * step
        for start in range(first, block_end - duration + 1, step):
            if start >= latest:
                break
            if not _overlaps(blocked, blocked_ends, start - before, start + duration + after):
                slots.append((start, start + duration))
    return slots


def _overlaps(blocked: Sequence[Interval], ends: Sequence[int], start: int, end: int) -> bool:
    """Whether [start, end) meets any of the sorted disjoint `blocked` intervals."""
    index = bisect.bisect_right(ends, start)
    return index < len(blocked) and blocked[index][0] < end


def within_notice_and_advance(slots: Iterable[Interval], rules: Rules, now: int) -> list[Interval]:
    """The slots that keep the notice and advance rules at `now`. Computing slots without those
    two rules and applying them here gives what `free_slots` gives with them (the grid does not
    depend on the clock), so the clock-free part can be cached."""
    earliest = now + rules.min_notice_minutes * MINUTE
    latest = now + rules.max_advance_days * DAY
    return [slot for slot in slots if earliest <= slot[0] < latest]
