"""`SlotGates`: bookings of one slot queue behind the booking of it under way, and one look after
it answers them all. The whole server races (one 201 among hundreds, over HTTP, on SQLite and
PostgreSQL, one and two processes) are in test_appointments, test_booking_races and
test_processes; here the gate's own rules, with a look and a write that count their calls."""

from __future__ import annotations

import asyncio

import pytest

from bookdav.booking import appointments as booking
from bookdav.server.bookings import SlotGates

KEY = ("provider", "service", 1_800_000_000)


class Slot:
    """One slot: a look that says whether it is taken, and writes that may fail."""

    def __init__(self, failing_writes: int = 0) -> None:
        self.taken = False
        self.looks = 0
        self.writes = 0
        self.failing_writes = failing_writes

    async def look(self) -> None:
        """A read: it sees the slot as it was when it began."""
        self.looks += 1
        taken = self.taken
        await asyncio.sleep(0.01)
        if taken:
            raise booking.SlotTaken("this time is no longer free")

    async def book(self, gates: SlotGates) -> str:
        async with gates.writing(KEY, self.look):
            self.writes += 1
            await asyncio.sleep(0.05)
            if self.writes <= self.failing_writes:
                raise RuntimeError("the write failed")
            self.taken = True
            return "booked"


async def test_a_hundred_bookings_of_one_slot_share_one_look_after_the_write() -> None:
    slot, gates = Slot(), SlotGates()
    outcomes = await asyncio.gather(*(slot.book(gates) for _ in range(100)), return_exceptions=True)
    assert outcomes.count("booked") == 1
    assert sum(isinstance(o, booking.SlotTaken) for o in outcomes) == 99
    assert (slot.writes, slot.looks) == (1, 1)
    assert not gates.busy(KEY)


async def test_when_the_first_write_fails_the_next_waiter_writes() -> None:
    slot, gates = Slot(failing_writes=1), SlotGates()
    outcomes = await asyncio.gather(*(slot.book(gates) for _ in range(50)), return_exceptions=True)
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 1
    assert outcomes.count("booked") == 1
    assert sum(isinstance(o, booking.SlotTaken) for o in outcomes) == 48
    assert (slot.writes, slot.looks) == (2, 2)


async def test_a_booking_arriving_after_the_write_does_not_wait() -> None:
    slot, gates = Slot(), SlotGates()
    assert await slot.book(gates) == "booked"
    slot.taken = False  # cancelled meanwhile: the slot is free again
    assert await slot.book(gates) == "booked"
    assert slot.looks == 0  # nothing was under way: no look, the writer decides


async def test_who_asks_while_a_look_runs_gets_the_next_look() -> None:
    """A look is shared only by those who asked before it began: asking while one runs (it may
    have read the slot free just before it was taken) waits for the next one."""
    slot, gates = Slot(), SlotGates()
    first = asyncio.ensure_future(gates.look(KEY, slot.look))
    await asyncio.sleep(0.003)  # the first look has begun and read the slot free
    slot.taken = True
    second = asyncio.ensure_future(gates.look(KEY, slot.look))
    third = asyncio.ensure_future(gates.look(KEY, slot.look))
    await first
    for later in (second, third):
        with pytest.raises(booking.SlotTaken):
            await later
    assert slot.looks == 2  # the second and the third shared the next look
