"""Reading remote calendars over HTTP: CalDAV collections and ICS feeds, incrementally.

WebDAV is spoken directly with aiohttp (not the synchronous `caldav` library) so a pull is async,
cheap, and every request can be counted:
- CalDAV: RFC 6578 sync-collection with the last sync token (one small REPORT when nothing
  changed); a server without it, or a token it refuses, falls back to the CTag (one PROPFIND
  when nothing changed) and a Depth 1 PROPFIND of ETags; whatever changed is fetched with
  calendar-multiget in batches.
- ICS feeds: a conditional GET (`If-None-Match`, `If-Modified-Since`); a 304 costs nothing. A
  feed is split into one object per UID (a master and its overrides), compared by digest.
Credentials: HTTP Basic (app passwords), or OAuth2 bearer tokens refreshed against the token
endpoint (Google's CalDAV API).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

import aiohttp
import icalendar
from multidict import CIMultiDict

from bookdav import net

DAV = "DAV:"
CALDAV = "urn:ietf:params:xml:ns:caldav"
CALSERVER = "http://calendarserver.org/ns/"
MULTIGET_BATCH = 100
TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)
MAX_FEED_BYTES = 50 * 1024 * 1024
USER_AGENT = "bookdav-sync/1"
MAX_REDIRECTS = 5
MAX_SYNC_PAGES = 100  # truncated sync-collection answers followed per pull


class RemoteError(Exception):
    """The remote answered something we cannot use (an HTTP error, a malformed document)."""


class FeedRejected(RemoteError):
    """An ICS feed that is not a calendar: nothing of it is applied, the mirror stays."""


@dataclass
class Traffic:
    """Requests made and bytes received by one pull: what an unchanged cycle should keep small."""

    requests: int = 0
    bytes_received: int = 0


@dataclass
class RemoteObject:
    """One remote calendar object: where it lives, its version, its iCalendar text."""

    href: str
    etag: str
    text: str


@dataclass
class Changes:
    """What a pull found: objects to (re)mirror, hrefs gone, and the state for the next pull."""

    changed: list[RemoteObject] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    traffic: Traffic = field(default_factory=Traffic)


@dataclass
class Credentials:
    username: str = ""
    password: str = ""
    oauth: Mapping[str, str] | None = None

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> Credentials:
        oauth = value.get("oauth")
        return cls(
            username=str(value.get("username") or ""),
            password=str(value.get("password") or ""),
            oauth=dict(oauth) if isinstance(oauth, dict) else None,
        )


# Access tokens live in memory only (an hour each); the refresh token is what is stored.
_access_tokens: dict[str, tuple[str, float]] = {}
_token_lock = asyncio.Lock()


class Client:
    """One pull's HTTP session: authentication, counting, errors as `RemoteError`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        *,
        allow_private_networks: bool,
    ) -> None:
        self.session = session
        self.credentials = credentials
        self.allow_private_networks = allow_private_networks
        self.traffic = Traffic()

    async def _auth_headers(self, refresh: bool = False) -> dict[str, str]:
        oauth = self.credentials.oauth
        if oauth:
            return {"Authorization": f"Bearer {await self._access_token(oauth, refresh)}"}
        if self.credentials.username or self.credentials.password:
            basic = aiohttp.BasicAuth(self.credentials.username, self.credentials.password)
            return {"Authorization": basic.encode()}
        return {}

    async def _access_token(self, oauth: Mapping[str, str], refresh: bool) -> str:
        key = hashlib.sha256(
            f"{oauth.get('tokenUrl')}|{oauth.get('clientId')}|{oauth.get('refreshToken')}".encode()
        ).hexdigest()
        async with _token_lock:
            cached = _access_tokens.get(key)
            if cached and cached[1] > time.monotonic() and not refresh:
                return cached[0]
            form = {
                "grant_type": "refresh_token",
                "refresh_token": oauth.get("refreshToken", ""),
                "client_id": oauth.get("clientId", ""),
                "client_secret": oauth.get("clientSecret", ""),
            }
            self.check_address(oauth.get("tokenUrl", ""))
            self.traffic.requests += 1
            async with self.session.post(oauth.get("tokenUrl", ""), data=form) as response:
                body = await response.read()
                self.traffic.bytes_received += len(body)
                if response.status != 200:
                    raise RemoteError(f"token endpoint answered {response.status}")
                try:
                    document = await response.json(content_type=None)
                    token = str(document["access_token"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise RemoteError("token endpoint sent no access_token") from exc
            lifetime = float(document.get("expires_in") or 3600)
            _access_tokens[key] = (token, time.monotonic() + max(lifetime - 60, 30))
            return token

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200, 207),
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one request; 401 with OAuth refreshes the token once. A status outside `ok`
        raises `RemoteError` naming it."""
        for attempt in (0, 1):
            credentials = await self._auth_headers(refresh=attempt == 1)
            status, response_headers, payload = await self._send(
                method, url, body, dict(headers or {}), credentials
            )
            if status == 401 and self.credentials.oauth and attempt == 0:
                continue
            if status not in ok:
                raise RemoteError(f"{method} {_safe(url)} answered {status}")
            return status, response_headers, payload
        raise AssertionError("unreachable")

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | str | None,
        headers: dict[str, str],
        credentials: dict[str, str],
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request, following redirects here (each hop's address is checked, and
        credentials never go to another origin than the one they were given for)."""
        origin = _origin(url)
        for _hop in range(MAX_REDIRECTS + 1):
            self.check_address(url)
            all_headers = {"User-Agent": USER_AGENT, **headers}
            if _origin(url) == origin:
                all_headers.update(credentials)
            self.traffic.requests += 1
            try:
                async with self.session.request(
                    method, url, data=body, headers=all_headers, allow_redirects=False
                ) as response:
                    payload = await _read_body(response)
                    self.traffic.bytes_received += len(payload)
                    if len(payload) > MAX_FEED_BYTES:
                        raise RemoteError(
                            f"{method} {_safe(url)}: more than {MAX_FEED_BYTES} bytes"
                        )
                    status = response.status
                    response_headers = CIMultiDict(response.headers)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise RemoteError(f"{method} {_safe(url)}: {type(exc).__name__}: {exc}") from exc
            location = response_headers.get("Location")
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                if status == 303:
                    method, body = "GET", None
                continue
            return status, response_headers, payload
        raise RemoteError(f"{method} {_safe(url)}: more than {MAX_REDIRECTS} redirects")

    def check_address(self, url: str) -> None:
        """Refuse a URL whose host is a non-public IP literal (names are checked when resolved,
        by `net.PublicAddressesOnly`), unless private networks are allowed."""
        if self.allow_private_networks:
            return
        try:
            net.refuse_private_literal(url)
        except net.PrivateAddress as exc:
            raise RemoteError(str(exc)) from exc


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, but never more than one byte past `MAX_FEED_BYTES` (a runaway remote)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(256 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_FEED_BYTES:
            break
    return b"".join(chunks)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port


def _safe(url: str) -> str:
    """A URL for messages and logs: no query string (feeds carry secrets there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def safe_url(url: str) -> str:
    return _safe(url)


def new_session(*, allow_private_networks: bool) -> aiohttp.ClientSession:
    """A session for remote calendars; unless allowed, only public addresses are reached."""
    return net.client_session(allow_private_networks=allow_private_networks, timeout=TIMEOUT)


# --- CalDAV --------------------------------------------------------------------------------------


def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root)


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def _sync_body(token: str) -> bytes:
    root = ET.Element(_q(DAV, "sync-collection"))
    ET.SubElement(root, _q(DAV, "sync-token")).text = token or None
    ET.SubElement(root, _q(DAV, "sync-level")).text = "1"
    ET.SubElement(ET.SubElement(root, _q(DAV, "prop")), _q(DAV, "getetag"))
    return _xml(root)


def _propfind_body(*props: tuple[str, str]) -> bytes:
    root = ET.Element(_q(DAV, "propfind"))
    prop = ET.SubElement(root, _q(DAV, "prop"))
    for namespace, name in props:
        ET.SubElement(prop, _q(namespace, name))
    return _xml(root)


def _multiget_body(hrefs: list[str]) -> bytes:
    root = ET.Element(_q(CALDAV, "calendar-multiget"))
    prop = ET.SubElement(root, _q(DAV, "prop"))
    ET.SubElement(prop, _q(DAV, "getetag"))
    ET.SubElement(prop, _q(CALDAV, "calendar-data"))
    for href in hrefs:
        ET.SubElement(root, _q(DAV, "href")).text = href
    return _xml(root)


@dataclass
class _Response:
    href: str
    status: int  # of the response, or of the propstat that holds the props
    props: dict[str, str]


def _parse_multistatus(body: bytes) -> tuple[list[_Response], str | None]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise RemoteError(f"malformed multistatus: {exc}") from exc
    if root.tag != _q(DAV, "multistatus"):
        raise RemoteError(f"expected a multistatus, got {root.tag}")
    found = []
    for response in root.findall(_q(DAV, "response")):
        href = canonical_href((response.findtext(_q(DAV, "href")) or "").strip())
        status = _status_code(response.findtext(_q(DAV, "status")))
        props: dict[str, str] = {}
        for propstat in response.findall(_q(DAV, "propstat")):
            code = _status_code(propstat.findtext(_q(DAV, "status")))
            if code != 200:
                continue
            status = status or 200
            container = propstat.find(_q(DAV, "prop"))
            for prop in [] if container is None else list(container):
                if prop.tag == _q(DAV, "resourcetype"):
                    props[prop.tag] = " ".join(child.tag for child in prop)
                else:
                    props[prop.tag] = (prop.text or "").strip()
        found.append(_Response(href, status or 200, props))
    token = root.findtext(_q(DAV, "sync-token"))
    return found, token.strip() if token else None


def canonical_href(href: str) -> str:
    """One spelling per href (servers percent-encode `@` or spaces differently from one report
    to the next): how hrefs are compared, stored and sent back."""
    return quote(unquote(href), safe="/:@!$&'()*+,;=-._~")


def _status_code(line: str | None) -> int:
    if not line:
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def _is_collection_href(href: str, collection_url: str) -> bool:
    path = canonical_href(href if href.startswith("/") else urlsplit(href).path)
    return path.rstrip("/") == canonical_href(urlsplit(collection_url).path).rstrip("/")


class SyncCollectionUnsupported(Exception):
    pass


class TokenRefused(Exception):
    pass


async def pull_caldav(
    client: Client, url: str, state: Mapping[str, Any], known: Mapping[str, str]
) -> Changes:
    """The changes since `state` of the calendar collection at `url`; `known` maps each remote
    href the mirror holds to its ETag."""
    collection_url = url if url.endswith("/") else url + "/"
    changes = Changes(traffic=client.traffic)
    if state.get("mode") != "ctag":
        try:
            await _by_sync_collection(client, collection_url, state, known, changes)
            return changes
        except SyncCollectionUnsupported:
            pass
    await _by_ctag(client, collection_url, state, known, changes)
    return changes


async def _sync_report(client: Client, url: str, token: str) -> tuple[list[_Response], str | None]:
    status, _headers, body = await client.request(
        "REPORT",
        url,
        body=_sync_body(token),
        # RFC 6578 3.2: the report is defined for Depth 0 (sync-level says how deep).
        headers={"Depth": "0", "Content-Type": "application/xml; charset=utf-8"},
        ok=(207, 400, 403, 404, 405, 409, 412, 415, 501),
    )
    if status == 207:
        return _parse_multistatus(body)
    if token and status in (400, 403, 409, 412):
        raise TokenRefused(status)  # RFC 6578: DAV:valid-sync-token; start over
    if status == 404:
        raise RemoteError(f"REPORT {_safe(url)} answered 404: no such calendar")
    raise SyncCollectionUnsupported(status)


async def _by_sync_collection(
    client: Client,
    url: str,
    state: Mapping[str, Any],
    known: Mapping[str, str],
    changes: Changes,
) -> None:
    token = str(state.get("syncToken") or "")
    full = not token
    listed: dict[str, str] = {}
    for _page in range(MAX_SYNC_PAGES):
        try:
            responses, new_token = await _sync_report(client, url, token)
        except TokenRefused:
            if full:
                raise RemoteError("the server refuses its own sync token") from None
            full, token, listed, changes.removed = True, "", {}, []
            responses, new_token = await _sync_report(client, url, "")
        if not new_token:
            raise SyncCollectionUnsupported("no sync-token in the answer")
        truncated = False
        for response in responses:
            if _is_collection_href(response.href, url):
                # RFC 6578 3.6: 507 on the collection itself: more changes after this token.
                truncated = response.status == 507
                continue
            if response.href.endswith("/"):
                continue
            if response.status == 404:
                changes.removed.append(response.href)
                listed.pop(response.href, None)
            elif response.status == 200:
                listed[response.href] = response.props.get(_q(DAV, "getetag"), "")
        token = new_token
        if not truncated:
            break
    else:
        raise RemoteError(f"sync-collection still truncated after {MAX_SYNC_PAGES} pages")
    if full:  # an initial sync lists everything: what it does not list is gone
        changes.removed.extend(href for href in known if href not in listed)
    wanted = [href for href, etag in listed.items() if not etag or known.get(href) != etag]
    changes.changed = await _multiget(client, url, wanted)
    changes.state = {"mode": "sync", "syncToken": new_token}


async def _by_ctag(
    client: Client,
    url: str,
    state: Mapping[str, Any],
    known: Mapping[str, str],
    changes: Changes,
) -> None:
    _status, _headers, body = await client.request(
        "PROPFIND",
        url,
        body=_propfind_body((CALSERVER, "getctag"), (DAV, "getetag")),
        headers={"Depth": "0", "Content-Type": "application/xml; charset=utf-8"},
        ok=(207,),
    )
    responses, _token = _parse_multistatus(body)
    props = responses[0].props if responses else {}
    ctag = props.get(_q(CALSERVER, "getctag")) or props.get(_q(DAV, "getetag")) or ""
    if ctag and ctag == state.get("ctag"):
        changes.state = dict(state)
        return
    _status, _headers, body = await client.request(
        "PROPFIND",
        url,
        body=_propfind_body((DAV, "getetag"), (DAV, "resourcetype")),
        headers={"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
        ok=(207,),
    )
    responses, _token = _parse_multistatus(body)
    listed = {
        r.href: r.props.get(_q(DAV, "getetag"), "")
        for r in responses
        if r.status == 200
        and not _is_collection_href(r.href, url)
        and "collection" not in r.props.get(_q(DAV, "resourcetype"), "")
    }
    changes.removed = [href for href in known if href not in listed]
    wanted = [href for href, etag in listed.items() if not etag or known.get(href) != etag]
    changes.changed = await _multiget(client, url, wanted)
    changes.state = {"mode": "ctag", "ctag": ctag}


async def _multiget(client: Client, url: str, hrefs: list[str]) -> list[RemoteObject]:
    found: list[RemoteObject] = []
    for start in range(0, len(hrefs), MULTIGET_BATCH):
        batch = hrefs[start : start + MULTIGET_BATCH]
        _status, _headers, body = await client.request(
            "REPORT",
            url,
            body=_multiget_body(batch),
            headers={"Depth": "1", "Content-Type": "application/xml; charset=utf-8"},
            ok=(207,),
        )
        responses, _token = _parse_multistatus(body)
        for response in responses:
            text = response.props.get(_q(CALDAV, "calendar-data"))
            if response.status == 200 and text:
                etag = response.props.get(_q(DAV, "getetag")) or _digest(text)
                found.append(RemoteObject(response.href, etag, text))
    return found


# --- ICS feeds -----------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:32] + '"'


async def pull_feed(
    client: Client, url: str, state: Mapping[str, Any], known: Mapping[str, str]
) -> Changes:
    """The feed's changes: nothing on a 304, else every UID whose content changed and every
    UID that disappeared. Raises `FeedRejected` for a body that is not an iCalendar stream."""
    headers = {"Accept": "text/calendar, */*;q=0.5"}
    if state.get("etag"):
        headers["If-None-Match"] = str(state["etag"])
    if state.get("lastModified"):
        headers["If-Modified-Since"] = str(state["lastModified"])
    status, response_headers, body = await client.request(
        "GET", url, headers=headers, ok=(200, 304)
    )
    changes = Changes(traffic=client.traffic)
    if status == 304:
        changes.state = dict(state)
        return changes
    objects = split_feed(body)
    changes.changed = [o for o in objects if known.get(o.href) != o.etag]
    present = {o.href for o in objects}
    changes.removed = [href for href in known if href not in present]
    changes.state = {
        key: value
        for key, value in (
            ("etag", response_headers.get("ETag")),
            ("lastModified", response_headers.get("Last-Modified")),
        )
        if value
    }
    return changes


def split_feed(body: bytes) -> list[RemoteObject]:
    """One calendar object per UID (its master and overrides, with the time zones they use).
    Anything that is not a VCALENDAR stream is `FeedRejected`."""
    text = body.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not text.upper().startswith("BEGIN:VCALENDAR"):
        raise FeedRejected(f"not an iCalendar feed (starts with {text[:40]!r})")
    try:
        feed = icalendar.Calendar.from_ical(text)
    except ValueError as exc:
        raise FeedRejected(f"unparseable iCalendar feed: {exc}") from exc
    timezones = {str(tz.get("TZID")): tz for tz in feed.walk("VTIMEZONE")}
    by_uid: dict[str, list[icalendar.cal.Component]] = {}
    for event in feed.walk("VEVENT"):
        uid = str(event.get("UID") or "")
        if uid:
            by_uid.setdefault(uid, []).append(event)
    objects = []
    for uid, events in by_uid.items():
        calendar = icalendar.Calendar()
        calendar.add("prodid", "-//bookdav//feed split//EN")
        calendar.add("version", "2.0")
        for tzid in sorted(_tzids(events)):
            if tzid in timezones:
                calendar.add_component(timezones[tzid])
        for event in events:
            calendar.add_component(event)
        text = calendar.to_ical().decode()
        objects.append(RemoteObject(f"uid:{uid}", _digest(text), text))
    return objects


def _tzids(events: list[icalendar.cal.Component]) -> set[str]:
    found = set()
    for event in events:
        for name in ("DTSTART", "DTEND", "RECURRENCE-ID", "EXDATE", "RDATE"):
            values = event.get(name)
            for value in values if isinstance(values, list) else [values]:
                tzid = getattr(value, "params", {}).get("TZID") if value is not None else None
                if tzid:
                    found.add(str(tzid))
    return found


def resource_url(collection_url: str, name: str) -> str:
    """The URL of `name` inside a collection."""
    base = collection_url if collection_url.endswith("/") else collection_url + "/"
    return urljoin(base, name)
