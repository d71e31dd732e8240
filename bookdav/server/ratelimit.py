"""A per-client token bucket for public POSTs (guest bookings, sign-ups): 429 past the rate."""

from __future__ import annotations

import threading
import time

from bookdav.booking.errors import BookdavError


class RateLimited(BookdavError):
    status = 429
    title = "Too Many Requests"


class RateLimiter:
    """`per_minute` requests a minute per key, in bursts of up to `per_minute`; 0 switches it off."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        if self._rate == 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self._capacity, now))
            tokens = min(self._capacity, tokens + (now - last) * self._rate)
            if tokens < 1:
                retry_after = int((1 - tokens) / self._rate) + 1
                raise RateLimited(
                    f"too many requests; retry in {retry_after} s", retryAfterSeconds=retry_after
                )
            self._buckets[key] = (tokens - 1, now)
            if len(self._buckets) > 100_000:  # forget idle clients rather than grow forever
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
