"""Errors the domain raises; the web layer turns each into an RFC 9457 problem with its status."""

from __future__ import annotations


class BookdavError(Exception):
    status = 400
    title = "Bad Request"

    def __init__(self, detail: str = "", **extra: object) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.extra = extra


class InvalidInput(BookdavError):
    """A field of the request is missing, of the wrong type or out of range."""

    status = 400
    title = "Invalid request"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(
            f"{field}: {reason}", **{"invalid-params": [{"name": field, "reason": reason}]}
        )
        self.field = field
        self.reason = reason


class Unauthorized(BookdavError):
    status = 401
    title = "Unauthorized"


class Forbidden(BookdavError):
    status = 403
    title = "Forbidden"


class NotFound(BookdavError):
    status = 404
    title = "Not Found"


class Conflict(BookdavError):
    """The request lost a race or clashes with what exists (a taken slot, a taken username)."""

    status = 409
    title = "Conflict"


class PolicyViolation(BookdavError):
    """Well-formed, but a business rule says no (outside hours, too short notice)."""

    status = 422
    title = "Unprocessable Content"
