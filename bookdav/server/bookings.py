"""Writing a booking, the same from every front (the JSON API and the booking page): the stampede
shortcuts (a shared look per slot, an early look for contended providers) and the retry when the
service gained a resource to lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
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

SlotKey = tuple[str, str, int]  # provider id, service id, start


Outcome = BaseException | None  # what a look found: the refusal to repeat, or None (go on)


class _Looks:
    """The looks at one slot: the next one to begin (shared by all who ask until it does) and
    the task that runs them one after the other."""

    __slots__ = ("next", "task")

    def __init__(self) -> None:
        self.next: asyncio.Future[Outcome] | None = None
        self.task: asyncio.Future[None] | None = None


class SlotGates:
    """The booking of each single slot under way in this process, and looks at a slot shared by
    the bookings that want it meanwhile.

    When hundreds of clients want one slot, the first is written and every other one waits here
    for that write to end instead of queueing for the provider's write lock (where each would
    re-check and hear 409 one at a time). Then one read looks at the slot for all of them. A look
    is shared only by bookings that asked before it began, so each hears what a look of its own
    would have said: who asks while one runs gets the next, which starts when it ends. A taken
    slot answers them all 409 from that one read; if it is still free (the first booking failed)
    they go on to the writer, which decides as always. Bookings of different slots never wait
    for each other."""

    def __init__(self) -> None:
        self._writing: dict[SlotKey, asyncio.Future[None]] = {}
        self._looks: dict[SlotKey, _Looks] = {}

    def busy(self, key: SlotKey) -> bool:
        """Whether a booking of this slot is being written in this process."""
        return key in self._writing

    async def look(self, key: SlotKey, look: Callable[[], Awaitable[None]]) -> None:
        """Raise what a look at `key` begun no earlier than now raises (`booking.SlotTaken`,
        `booking.NotBookable`); `look` runs it, unless a look asked for meanwhile does."""
        outcome = await asyncio.shield(self._look_from_now(key, look))
        if isinstance(outcome, booking.SlotTaken | booking.NotBookable):
            raise type(outcome)(outcome.detail, **outcome.extra)

    @contextlib.asynccontextmanager
    async def writing(
        self, key: SlotKey, look: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Wait for the booking of `key` under way (if any) and look once it is done (raising
        as `look` does), then hold the gate while writing."""
        loop = asyncio.get_running_loop()
        while (under_way := self._writing.get(key)) is not None:
            await asyncio.shield(under_way)
            await self.look(key, look)
        gate: asyncio.Future[None] = loop.create_future()
        self._writing[key] = gate
        try:
            yield
        finally:
            del self._writing[key]
            gate.set_result(None)

    def _look_from_now(
        self, key: SlotKey, look: Callable[[], Awaitable[None]]
    ) -> asyncio.Future[Outcome]:
        """The outcome of a look at `key` that begins no earlier than now: the next one to
        begin, shared by all who ask until it does."""
        looks = self._looks.get(key)
        if looks is None:
            looks = self._looks[key] = _Looks()
            looks.task = asyncio.ensure_future(self._run_looks(key, looks, look))
        if looks.next is None:
            looks.next = asyncio.get_running_loop().create_future()
        return looks.next

    async def _run_looks(
        self, key: SlotKey, looks: _Looks, look: Callable[[], Awaitable[None]]
    ) -> None:
        current: asyncio.Future[Outcome] | None = None
        try:
            while looks.next is not None:
                current, looks.next = looks.next, None  # it begins now: later askers wait
                current.set_result(await _outcome_of(look))
        finally:
            del self._looks[key]
            for pending in (current, looks.next):
                if pending is not None and not pending.done():
                    pending.cancel()  # the server is shutting down


async def _outcome_of(look: Callable[[], Awaitable[None]]) -> Outcome:
    try:
        await look()
        return None
    except (booking.SlotTaken, booking.NotBookable) as exc:
        return exc  # logged by the look itself
    except Exception as exc:  # any other failure: whoever waits goes on to the writer
        log_event(log, "shared slot look failed", reason=str(exc))
        return None


SLOT_GATES = web.AppKey("booking_slot_gates", SlotGates)


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
    `prepared` on) holding the principals' locks; the appointment and its VEVENT are prepared
    first when they can be (`booking.prepare`), so the writer has less to do under the lock.

    Unless `shortcut` is off (a keyed retry may be owed its stored 201) or it is a series: a
    booking of a slot whose booking is under way in this process waits for it and hears the
    shared look's answer (`SlotGates`); one arriving while another slot of the provider is being
    booked first looks on its own (`booking.refuse_early`). Either only ever answers an early
    409/422; the writer decides. `LocksMissing` runs the unit once more with the locks it names
    (passed to `learned`, for a cache)."""
    database = request.app[DATABASE]
    gates = request.app[SLOT_GATES]

    async def look() -> None:
        try:
            await database.run_read(booking.refuse_early, wanted)
        except (booking.SlotTaken, booking.NotBookable) as exc:
            log_event(log, "booking refused early", provider_id=wanted.provider_id, reason=str(exc))
            raise

    key = (wanted.provider_id, wanted.service_id, wanted.start_utc)
    with request.app[IN_FLIGHT].booking(wanted.provider_id) as contended:
        if not shortcut or wanted.recurrence is not None:
            return await _write(request, wanted, unit_of_work, principals, learned)
        if contended and not gates.busy(key):
            await gates.look(key, look)  # the provider is being booked: look (shared) first
        async with gates.writing(key, look):
            return await _write(request, wanted, unit_of_work, principals, learned)


async def _write(
    request: web.Request,
    wanted: booking.BookingRequest,
    unit_of_work: Callable[[Connection, Sequence[str], booking.Prepared | None], T],
    principals: Sequence[str],
    learned: Callable[[list[str]], None] | None,
) -> T:
    database = request.app[DATABASE]
    prepared = booking.prepare(wanted, request.app[SETTINGS].public_base_url)
    try:
        return await database.run_write(
            unit_of_work, principals, prepared, principals=principals, pipelined=True
        )
    except booking.LocksMissing as exc:
        if learned is not None:
            learned(exc.needed)
        return await database.run_write(
            unit_of_work, exc.needed, prepared, principals=exc.needed, pipelined=True
        )
