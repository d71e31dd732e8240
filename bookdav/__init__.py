"""bookdav: appointment booking that speaks CalDAV.

One aiohttp process serves CalDAV (Radicale, mounted in-process), the booking API and the booking pages.
"""

__version__ = "0.1.0"
