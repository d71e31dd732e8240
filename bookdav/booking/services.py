"""Services as the domain sees them: duration, price and the business rules slot search applies."""

from __future__ import annotations

import dataclasses
import re
import secrets
import unicodedata
from collections.abc import Mapping
from typing import Any

from bookdav.booking.slots import Rules

# API name -> (Rules attribute, smallest, largest). Stored as JSON under the API names.
RULE_FIELDS: dict[str, tuple[str, int, int]] = {
    "minNoticeMinutes": ("min_notice_minutes", 0, 525_600),
    "maxAdvanceDays": ("max_advance_days", 1, 730),
    "bufferBeforeMinutes": ("buffer_before_minutes", 0, 1_440),
    "bufferAfterMinutes": ("buffer_after_minutes", 0, 1_440),
    "slotIntervalMinutes": ("slot_interval_minutes", 5, 1_440),
    "cancellationNoticeMinutes": ("cancellation_notice_minutes", 0, 525_600),
    "capacity": ("capacity", 1, 1_000),
}


def rules_from_json(raw: Mapping[str, Any]) -> Rules:
    """Rules from their stored JSON; keys not given keep their defaults."""
    return Rules(**{RULE_FIELDS[key][0]: value for key, value in raw.items() if key in RULE_FIELDS})


def rules_json(rules: Rules) -> dict[str, Any]:
    values = dataclasses.asdict(rules)
    return {api_name: values[attribute] for api_name, (attribute, _, _) in RULE_FIELDS.items()}


def slug_for(name: str) -> str:
    """A URL-friendly name for booking links, with a short random tail so it is unique."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    base = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:60] or "service"
    return f"{base}-{secrets.token_hex(2)}"
