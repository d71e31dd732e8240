"""How an outbox handler says a row must not be retried."""

from __future__ import annotations


class Undeliverable(ValueError):
    """Delivering this row can never succeed (unknown event, unusable address, a kind nobody
    handles): retrying will not help, so the row is marked failed at once."""


class Superseded(Exception):
    """The row announces a state that a later row (written with the later state) announces
    again, or that no longer holds: it is marked superseded and not delivered."""
