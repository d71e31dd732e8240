"""Rendering many instants as ISO 8601 local times with offset, fast.

Slot lists are long (a month is hundreds of slots) and `datetime.fromtimestamp(ts, zone)
.isoformat()` costs a zone lookup per value, which measured as a third of a slot search. Offsets
only change at a zone's transitions, so they are looked up once per 15-minute bucket (checked at
both ends of the bucket, so a transition inside one is still exact) and the text is assembled from
integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

BUCKET_SECONDS = 900
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class InstantFormatter:
    """Formats epoch seconds as `YYYY-MM-DDTHH:MM:SS+HH:MM` in one zone."""

    def __init__(self, zone: str) -> None:
        self._zone = ZoneInfo(zone)
        self._offsets: dict[int, int | None] = {}
        self._days: dict[int, str] = {}

    def _offset_seconds(self, instant: int) -> int:
        bucket = instant // BUCKET_SECONDS
        offset = self._offsets.get(bucket, -1)
        if offset == -1:
            first = self._exact_offset(bucket * BUCKET_SECONDS)
            last = self._exact_offset(bucket * BUCKET_SECONDS + BUCKET_SECONDS - 1)
            offset = first if first == last else None
            self._offsets[bucket] = offset
        return self._exact_offset(instant) if offset is None else offset

    def _exact_offset(self, instant: int) -> int:
        delta = datetime.fromtimestamp(instant, UTC).astimezone(self._zone).utcoffset()
        assert delta is not None
        return int(delta.total_seconds())

    def format(self, instant: int) -> str:
        offset = self._offset_seconds(instant)
        if offset % 60:  # historic local mean time: let datetime spell the odd offset
            return datetime.fromtimestamp(instant, self._zone).isoformat()
        local = instant + offset
        day_number, seconds = divmod(local, 86_400)
        day = self._days.get(day_number)
        if day is None:
            day = self._days[day_number] = date.fromordinal(_EPOCH_ORDINAL + day_number).isoformat()
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        sign = "+" if offset >= 0 else "-"
        offset_hours, offset_minutes = divmod(abs(offset) // 60, 60)
        return (
            f"{day}T{hours:02d}:{minutes:02d}:{secs:02d}"
            f"{sign}{offset_hours:02d}:{offset_minutes:02d}"
        )

    def format_all(self, instants: Iterable[int]) -> list[str]:
        return [self.format(instant) for instant in instants]
