"""Fast instant formatting agrees with datetime.isoformat everywhere, DST changes included."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from bookdav.booking.times import InstantFormatter

ZONES = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "UTC",
    "America/St_Johns",
    "Pacific/Chatham",
    "Africa/Casablanca",
]


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    instants=st.lists(st.integers(-2_000_000_000, 4_000_000_000), min_size=1, max_size=50),
)
def test_matches_datetime_isoformat(zone: str, instants: list[int]) -> None:
    formatter = InstantFormatter(zone)
    expected = [datetime.fromtimestamp(i, ZoneInfo(zone)).isoformat() for i in instants]
    assert formatter.format_all(instants) == expected


def test_both_sides_of_a_dst_change_in_one_bucket() -> None:
    formatter = InstantFormatter("Europe/Berlin")
    change = int(datetime(2027, 3, 28, 1, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    assert formatter.format(change - 1) == "2027-03-28T01:59:59+01:00"
    assert formatter.format(change) == "2027-03-28T03:00:00+02:00"
