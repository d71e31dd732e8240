"""Writing a booking, the same from every front (the JSON API and the booking page): the stampede
shortcut for contended providers and the retry when the service gained a resource to lock."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from aiohttp import web
from sqlalchemy import Connection

from bookdav.booking import appointments as booking
from bookdav.logs import log_event
from bookdav.server.keys import DATABASE, SETTINGS

T = TypeVar("T")
log = logging.getLogger("bookdav.booking")


class InFlight:
    """Bookings of each provider under way in this process. A booking that arrives while another
    for the same provider is under way first looks, on a reader thread, whether its slot is
    already taken: when hundreds of clients want one slot, the losers hear 409 from readers in
    parallel instead of queueing one by one for the provider's write lock. An uncontended booking
    skips the look (it would only cost time)."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}

    @contextlib.contextmanager
    def booking(self, provider_id: str) -> Iterator[bool]:
        """Count this booking in; yields whether another was already under way."""
        already = self._count.get(provider_id, 0)
        self._count[provider_id] = already + 1
        try:
            yield already > 0
        finally:
            if self._count[provider_id] == 1:
                del self._count[provider_id]
            else:
                self._count[provider_id] -= 1


IN_FLIGHT = web.AppKey("bookings_in_flight", InFlight)


async def write_booking(
    request: web.Request,
    wanted: booking.BookingRequest,
    unit_of_work: Callable[[Connection, Sequence[str], booking.Prepared | None], T],
    principals: Sequence[str],
    *,
    shortcut: bool = True,
    learned: Callable[[list[str]], None] | None = None,
) -> T:
    """Run `unit_of_work(conn, principals, prepared)` (which calls `booking.book`, passing
    `prepared` on) holding the principals' locks. The appointment and its VEVENT are prepared
    here first when they can be (`booking.prepare`), so the writer has less to do under the lock. Contended, and unless `shortcut` is off, `booking.refuse_early` first raises `SlotTaken`
    for a slot already gone; `LocksMissing` runs it once more with the locks it names (passed to
    `learned`, for a cache)."""
    database = request.app[DATABASE]
    with request.app[IN_FLIGHT].booking(wanted.provider_id) as contended:
        if contended and shortcut:
            try:
                await database.run_read(booking.refuse_early, wanted)
            except (booking.SlotTaken, booking.NotBookable) as exc:
                log_event(
                    log, "booking refused early", provider_id=wanted.provider_id, reason=str(exc)
                )
                raise
        prepared = booking.prepare(wanted, request.app[SETTINGS].public_base_url)
        try:
            return await database.run_write(
                unit_of_work, principals, prepared, principals=principals
            )
        except booking.LocksMissing as exc:
            if learned is not None:
                learned(exc.needed)
            return await database.run_write(
                unit_of_work, exc.needed, prepared, principals=exc.needed
            )
