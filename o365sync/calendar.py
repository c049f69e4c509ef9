"""Graph calendar reads: one calendarView delta round, and series instances, parsed into `Meeting` records.

Delta over a window returns single instances and exceptions in full, series masters in full, occurrences *bare*
(id, type, seriesMasterId, start, end) and `@removed` entries; a cancelled occurrence may not be reported at all
(observed). So every series a round touches is re-read through `/me/events/{master}/instances` over the window
(with `$select`, so no body is fetched), and its stored instances are replaced by that answer. Event bodies from
delta (delta has no `$select`) stay in memory and are never stored.

Text Python cannot hold (a lone surrogate such as `"Deal \\ud83d"`) becomes U+FFFD and the meeting is marked
`text_repaired` instead of failing the page. A round cut short by the run's paging limits comes back with
`complete` false: what it read is still valid (the caller keeps the old deltaLink and replays the round next run).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import msgspec

from o365sync.graph import GraphClient, GraphNotFound, GraphPagingError, RunLimitReached, decode_page
from o365sync.mail import graph_datetime

INSTANCE_FIELDS = (
    "id",
    "type",
    "seriesMasterId",
    "iCalUId",
    "subject",
    "start",
    "end",
    "originalStartTimeZone",
    "originalEndTimeZone",
    "isAllDay",
    "isCancelled",
    "sensitivity",
    "isOnlineMeeting",
    "onlineMeeting",
    "organizer",
    "attendees",
    "webLink",
)
ROLE_OF_ATTENDEE = {"required": "to", "optional": "cc"}  # resources (rooms) are not participants


class _Address(msgspec.Struct):
    name: str | None = None
    address: str | None = None


class _Recipient(msgspec.Struct):
    emailAddress: _Address | None = None  # noqa: N815 (Graph's names)


class _Status(msgspec.Struct):
    response: str | None = None


class _Attendee(msgspec.Struct):
    type: str | None = None
    status: _Status | None = None
    emailAddress: _Address | None = None  # noqa: N815


class _When(msgspec.Struct):
    dateTime: str  # noqa: N815
    timeZone: str = "UTC"  # noqa: N815


class _Online(msgspec.Struct):
    joinUrl: str | None = None  # noqa: N815


class _Event(msgspec.Struct, rename={"removed": "@removed"}):
    id: str
    removed: dict | None = None
    type: str | None = None
    seriesMasterId: str | None = None  # noqa: N815
    iCalUId: str | None = None  # noqa: N815
    subject: str | None = None
    start: _When | None = None
    end: _When | None = None
    originalStartTimeZone: str | None = None  # noqa: N815
    originalEndTimeZone: str | None = None  # noqa: N815
    isAllDay: bool = False  # noqa: N815
    isCancelled: bool = False  # noqa: N815
    sensitivity: str | None = None
    isOnlineMeeting: bool = False  # noqa: N815
    onlineMeeting: _Online | None = None  # noqa: N815
    organizer: _Recipient | None = None
    attendees: list[_Attendee] | None = None
    webLink: str | None = None  # noqa: N815


class _Page(
    msgspec.Struct, rename={"value": "value", "next_link": "@odata.nextLink", "delta_link": "@odata.deltaLink"}
):
    value: list[_Event] = []
    next_link: str | None = None
    delta_link: str | None = None


_decode_page = msgspec.json.Decoder(_Page).decode


@dataclass
class Meeting:
    """One instance (single meeting, occurrence or exception) as stored; participants as (role, name, address,
    response) with role organizer / to (required) / cc (optional)."""

    event_id: str
    event_type: str
    series_master_id: str | None
    ical_uid: str | None
    subject: str | None
    start_at: datetime
    start_tz: str | None
    end_at: datetime
    end_tz: str | None
    is_all_day: bool
    is_online: bool
    join_url: str | None
    organizer_name: str | None
    organizer_address: str | None
    web_link: str | None
    sensitivity: str | None
    is_cancelled: bool
    participants: list[tuple[str, str | None, str, str | None]] = field(default_factory=list)
    text_repaired: bool = False  # some text was not valid Unicode and became U+FFFD


@dataclass
class DeltaRound:
    """What one delta round reported: full instances, ids removed, series to re-read, the next deltaLink."""

    instances: dict[str, Meeting] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    delta_link: str | None = None
    complete: bool = True  # False: stopped at the run's paging limit (no deltaLink yet)


def _utc(when: _When) -> datetime:
    """Graph's `dateTimeTimeZone` (UTC unless a Prefer: outlook.timezone was sent; we send none)."""
    value = datetime.fromisoformat(when.dateTime.rstrip("Z")[:26])
    if when.timeZone.upper() not in ("UTC", "ETC/UTC", "COORDINATED UNIVERSAL TIME"):
        raise ValueError(f"unexpected event time zone {when.timeZone!r} (the client requests UTC)")
    return value.replace(tzinfo=UTC)


def _pages(
    client: GraphClient, path: str, params: dict | None, headers: dict | None = None
) -> Iterator[tuple[_Page, frozenset[int]]]:
    for raw in client.iter_pages(path, params, headers):
        yield decode_page(raw, _decode_page, _Page, _Event)


def _meeting(ev: _Event, repaired: bool = False) -> Meeting:
    if ev.start is None or ev.end is None:
        raise ValueError("event without start/end")
    org = ev.organizer.emailAddress if ev.organizer and ev.organizer.emailAddress else _Address()
    parts: list[tuple[str, str | None, str, str | None]] = []
    if org.address:
        parts.append(("organizer", org.name, org.address, "organizer"))
    for a in ev.attendees or []:
        role = ROLE_OF_ATTENDEE.get((a.type or "required").lower())
        if role and a.emailAddress and a.emailAddress.address:
            parts.append((role, a.emailAddress.name, a.emailAddress.address, a.status.response if a.status else None))
    join = ev.onlineMeeting.joinUrl if ev.onlineMeeting else None
    return Meeting(
        ev.id,
        ev.type or "singleInstance",
        ev.seriesMasterId,
        ev.iCalUId,
        ev.subject,
        _utc(ev.start),
        ev.originalStartTimeZone,
        _utc(ev.end),
        ev.originalEndTimeZone,
        ev.isAllDay,
        bool(ev.isOnlineMeeting or join),
        join,
        org.name,
        org.address,
        ev.webLink,
        ev.sensitivity,
        ev.isCancelled,
        parts,
        repaired,
    )


def read_delta_round(
    client: GraphClient, window: tuple[datetime, datetime], delta_link: str | None, page_size: int
) -> DeltaRound:
    """One whole calendarView delta round (a user's year of meetings fits in memory; only the final deltaLink may be
    persisted). Raises DeltaTokenExpired when the stored link is dead (or cannot be followed); at the run's paging
    limit returns what was read with `complete` false."""
    headers = {"Prefer": f"odata.maxpagesize={page_size}"}
    params = None
    start = delta_link
    if start is None:
        start = "me/calendarView/delta"
        params = {"startDateTime": graph_datetime(window[0]), "endDateTime": graph_datetime(window[1])}
    out = DeltaRound()
    try:
        for page, odd in _pages(client, start, params, headers):
            _add_page(out, page, odd)
    except RunLimitReached:
        out.complete, out.delta_link = False, None
        return out
    if out.delta_link is None:
        raise GraphPagingError(0, "MissingDeltaLink")
    return out


def _add_page(out: DeltaRound, page: _Page, odd: frozenset[int]) -> None:
    for i, ev in enumerate(page.value):
        if ev.removed is not None:
            out.removed.add(ev.id)
            out.instances.pop(ev.id, None)
        elif ev.type == "seriesMaster":
            out.series.add(ev.id)
        elif ev.type in ("occurrence", "exception") and ev.seriesMasterId:
            out.series.add(ev.seriesMasterId)  # bare or not: the series is re-read as a whole
        else:
            out.instances[ev.id] = _meeting(ev, i in odd)
    out.delta_link = page.delta_link or out.delta_link


def read_series(client: GraphClient, master_id: str, window: tuple[datetime, datetime]) -> list[Meeting] | None:
    """Every occurrence and exception of a series inside the window; None when the series no longer exists."""
    params = {
        "startDateTime": graph_datetime(window[0]),
        "endDateTime": graph_datetime(window[1]),
        "$select": ",".join(INSTANCE_FIELDS),
    }
    out: list[Meeting] = []
    try:
        for page, odd in _pages(client, f"me/events/{quote(master_id, safe='')}/instances", params):
            out += [_meeting(ev, i in odd) for i, ev in enumerate(page.value) if ev.removed is None]
    except GraphNotFound:
        return None
    return out


def read_event(client: GraphClient, event_id: str) -> Meeting:
    """One event (single instance, occurrence, exception or series master) by id, with the instance fields the
    sync selects (no body). Raises GraphNotFound when the calendar has no such event."""
    raw = client.get(f"me/events/{quote(event_id, safe='')}", {"$select": ",".join(INSTANCE_FIELDS)}).content
    page, odd = decode_page(b'{"value":[' + raw + b"]}", _decode_page, _Page, _Event)
    return _meeting(page.value[0], 0 in odd)


def iter_series(
    client: GraphClient, series: set[str], window: tuple[datetime, datetime]
) -> Iterator[tuple[str, list[Meeting] | None]]:
    """Each series re-read; stops (the caller keeps what it got) once the client's paging deadline has passed."""
    for master_id in sorted(series):
        if client.past_deadline():
            return
        yield master_id, read_series(client, master_id, window)
