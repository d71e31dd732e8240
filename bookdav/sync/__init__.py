"""External calendars: CalDAV accounts and ICS feeds mirrored as busy time."""
