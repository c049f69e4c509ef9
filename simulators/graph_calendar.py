"""Microsoft Graph calendar, online-meeting and Teams endpoints over a `World`'s `calendars`
(simulators/world_calendar.py), dispatched from `GraphSimulator` (auth, budget, faults, concurrency, request log and
error shape are graph.py's). Behaviour follows Microsoft's Graph documentation of events,
calendarView delta, online meetings and Teams.

- `GET /me/calendarView` (window required, 1825-day cap, series expanded, exceptions applied, deleted occurrences
  absent, `$select`, `$top`/`Prefer: odata.maxpagesize` paging with `$skip` nextLinks, `Prefer: outlook.timezone`);
- `GET /me/calendarView/delta`: the window is frozen in server-side state behind opaque tokens. A round diffs the
  expanded window against what the previous round delivered: new/changed single instances and exceptions come in
  full, occurrences **bare** (id, type, seriesMasterId, start, end) with their full series master (a series is never
  split across pages), and `@removed` {reason: deleted} for items that left the window or were deleted. Organizer
  cancellations delete the event (`@removed`); an attendee's cancelled copy stays, as an update with
  `isCancelled: true`. Knobs: `delta_deleted_occurrences` (False, as observed: a deleted occurrence is not reported,
  only its master comes again) and `delta_out_of_window_removed` (True, as documented: events changed outside the
  window come as `@removed` noise);
- `GET /me/events/{id}` (master, single, occurrence, exception), `GET /me/events/{id}/instances`,
  `PATCH /me/events/{id}` (subject, body, isOnlineMeeting, onlineMeetingProvider only; logged in
  `Calendars.writes`), `POST /me/onlineMeetings`, `GET /me/joinedTeams`, `GET /teams/{id}/channels`,
  `POST /teams/{id}/channels/{id}/messages`, `POST /chats`, `POST /chats/{id}/messages` (posts in `Calendars.posts`).
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from simulators.graph import HALF_EMOJI, GraphFail, _Ctx, _encode, _iso, _prefer, _quote_id, _select
from simulators.server import Request, Response
from simulators.world_calendar import (
    _DAYS,
    EVENT_TYPE,
    WINDOWS_TZ,
    Calendars,
    CalendarWrite,
    Instance,
    Post,
    SimChat,
    SimEvent,
    _join_url,
    expand,
    occurrence_ical_uid,
    occurrence_id,
)

if TYPE_CHECKING:
    from simulators.graph import GraphSimulator

MAX_WINDOW_DAYS = 1825
CAL_READ = frozenset({"Calendars.Read", "Calendars.ReadWrite"})
CAL_WRITE = frozenset({"Calendars.ReadWrite"})
ONLINE_MEETINGS = frozenset({"OnlineMeetings.ReadWrite"})
TEAMS_READ = frozenset(
    {
        "Team.ReadBasic.All",
        "TeamSettings.Read.All",
        "TeamSettings.ReadWrite.All",
        "User.Read.All",
        "User.ReadWrite.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)
CHANNELS_READ = frozenset(
    {
        "Channel.ReadBasic.All",
        "ChannelSettings.Read.All",
        "ChannelSettings.ReadWrite.All",
        "Group.Read.All",
        "Group.ReadWrite.All",
        "Directory.Read.All",
        "Directory.ReadWrite.All",
    }
)
CHANNEL_SEND = frozenset({"ChannelMessage.Send", "Group.ReadWrite.All"})
CHAT_CREATE = frozenset({"Chat.Create", "Chat.ReadWrite"})
CHAT_SEND = frozenset({"ChatMessage.Send", "Chat.ReadWrite"})
PATCHABLE = frozenset({"subject", "body", "isOnlineMeeting", "onlineMeetingProvider"})
# Default properties, in Graph's order (https://learn.microsoft.com/en-us/graph/api/resources/event); `id` and
# `@odata.etag` are always returned.
EVENT_PROPS = (
    "createdDateTime",
    "lastModifiedDateTime",
    "changeKey",
    "categories",
    "transactionId",
    "originalStartTimeZone",
    "originalEndTimeZone",
    "iCalUId",
    "uid",
    "reminderMinutesBeforeStart",
    "isReminderOn",
    "hasAttachments",
    "subject",
    "bodyPreview",
    "importance",
    "sensitivity",
    "isAllDay",
    "isCancelled",
    "isOrganizer",
    "responseRequested",
    "seriesMasterId",
    "showAs",
    "type",
    "webLink",
    "onlineMeetingUrl",
    "isOnlineMeeting",
    "onlineMeetingProvider",
    "allowNewTimeProposals",
    "occurrenceId",
    "isDraft",
    "hideAttendees",
    "responseStatus",
    "body",
    "start",
    "end",
    "location",
    "locations",
    "recurrence",
    "attendees",
    "organizer",
    "onlineMeeting",
)
EVENT_SELECTABLE = {p.lower(): p for p in (*EVENT_PROPS, "id")}
BARE_PROPS = ("seriesMasterId", "type", "start", "end")
_MISSING_WINDOW = (
    "This request requires a time window specified by the query string parameters StartDateTime and EndDateTime."
)
_TOO_WIDE = (
    "Your request can't be completed. The range between the start and end dates is greater than the allowed "
    f"range. Maximum number of days: {MAX_WINDOW_DAYS}"
)
_USERS_BIND = re.compile(r"users\('([^']+)'\)", re.IGNORECASE)
_CT = "application/json; odata.metadata=minimal; odata.streaming=true; charset=utf-8"


@dataclass
class _CalState:
    """One calendarView delta lineage (`_gone` reads `evicted` and `generation` like mail's sync states)."""

    oid: str
    lo: datetime
    hi: datetime
    generation: int = 0
    evicted: str | None = None


@dataclass
class _CalRound:
    state: _CalState
    groups: list[list[dict]]  # rendered items; a series (master + its instances) is one group, never split
    snapshot: dict[str, tuple]  # item id -> fingerprint as delivered by the end of this round
    end_seq: int


@dataclass
class _Knobs:
    delta_deleted_occurrences: bool = False
    delta_out_of_window_removed: bool = True


class CalendarEndpoints:
    """The calendar/Teams half of `GraphSimulator`; `sim.calendar` is this object."""

    def __init__(self, sim: GraphSimulator, **knobs: Any):
        self.sim = sim
        self._defaults = _Knobs(**knobs)
        self.knobs = _Knobs(**knobs)
        self._tokens: dict[str, tuple[str, Any, Any]] = {}
        self._states: list[_CalState] = []

    @property
    def cal(self) -> Calendars:
        w = self.sim.world
        if w.calendars is None:  # a world generated without calendars: empty calendars, no teams
            w.calendars = Calendars(world=w, rng=random.Random(f"{w.seed}:calendars"))
        return w.calendars

    def routes(self) -> tuple[tuple[str, str, Any], ...]:
        return (
            ("GET", r"/v1\.0/me/calendarView/delta", self._delta),
            ("GET", r"/v1\.0/me/calendarView", self._calendar_view),
            ("GET", r"/v1\.0/me/events/([^/]+)/instances", self._instances),
            ("GET", r"/v1\.0/me/events/([^/]+)", self._get_event),
            ("PATCH", r"/v1\.0/me/events/([^/]+)", self._patch_event),
            ("POST", r"/v1\.0/me/onlineMeetings/createOrGet", self._online_meeting),
            ("POST", r"/v1\.0/me/onlineMeetings", self._online_meeting),
            ("GET", r"/v1\.0/me/joinedTeams", self._joined_teams),
            ("GET", r"/v1\.0/teams/([^/]+)/channels", self._channels),
            ("POST", r"/v1\.0/teams/([^/]+)/channels/([^/]+)/messages", self._channel_message),
            ("POST", r"/v1\.0/chats", self._create_chat),
            ("POST", r"/v1\.0/chats/([^/]+)/messages", self._chat_message),
        )

    def reset(self) -> None:
        self.knobs = _Knobs(**vars(self._defaults))

    def evict_delta_tokens(self, oid: str, code: str = "SyncStateNotFound") -> int:
        """Evict every calendarView delta sync state of `oid`: its links answer 410 SyncStateNotFound."""
        with self.sim._lock:
            hit = [st for st in self._states if st.oid == oid and st.evicted is None]
            for st in hit:
                st.evicted = code
            return len(hit)

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _need(ctx: _Ctx, allowed: frozenset[str], teams: bool = False) -> None:
        scopes = ctx.claims.scopes if ctx.claims else frozenset()
        if scopes & allowed:
            return
        if teams:  # UNVERIFIED exact text; the shape Teams APIs are reported to answer with
            raise GraphFail(
                403,
                "Forbidden",
                "Missing scope permissions on the request. API requires one of "
                f"'{', '.join(sorted(allowed))}'. Scopes on the request '{', '.join(sorted(scopes))}'",
            )
        raise GraphFail(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    @staticmethod
    def _window(req: Request) -> tuple[datetime, datetime]:
        q = {k.lower(): v for k, v in req.query.items()}
        raw = q.get("startdatetime"), q.get("enddatetime")
        if not raw[0] or not raw[1]:
            raise GraphFail(400, "ErrorInvalidParameter", _MISSING_WINDOW)
        out = []
        for value in raw:
            try:
                dt = datetime.fromisoformat(value.strip().replace(" ", "+").upper().replace("Z", "+00:00"))
            except ValueError:  # UNVERIFIED code/text for an unparsable bound
                raise GraphFail(400, "ErrorInvalidParameter", f"The value '{value}' is not a valid DateTime.") from None
            out.append(dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC))
        lo, hi = out
        if hi - lo > timedelta(days=MAX_WINDOW_DAYS):
            raise GraphFail(400, "ErrorInvalidRequest", _TOO_WIDE)
        return lo, hi  # UNVERIFIED: end <= start answers an empty collection here

    @staticmethod
    def _applied(headers: dict[str, str], text: str) -> None:
        prev = headers.get("Preference-Applied")
        headers["Preference-Applied"] = f"{prev}, {text}" if prev else text

    def _zone(self, req: Request, headers: dict[str, str]) -> str:
        name = _prefer(req.headers).get("outlook.timezone")
        if not name:
            return "UTC"
        try:
            ZoneInfo(WINDOWS_TZ.get(name, name))
        except (ZoneInfoNotFoundError, ValueError):
            return "UTC"  # UNVERIFIED: Graph's answer to an unknown zone name
        self._applied(headers, f'outlook.timezone="{name}"')
        return name

    @staticmethod
    def _select(req: Request) -> tuple[str, ...] | None:
        raw = next((v for k, v in req.query.items() if k.lower() == "$select"), None)
        return _select(raw, EVENT_SELECTABLE, "event")

    @staticmethod
    def _dtz(dt: datetime, zone: str) -> dict:
        local = dt.astimezone(ZoneInfo(WINDOWS_TZ.get(zone, zone)))
        return {"dateTime": local.strftime("%Y-%m-%dT%H:%M:%S.0000000"), "timeZone": zone}

    def _props(self, ev: SimEvent, inst: Instance | None, zone: str, body_type: str) -> dict:
        """Every property of a series master (`inst` None and a recurrence), a single event or an instance."""
        o = inst.override if inst is not None else None
        typ = inst.type if inst is not None else ev.type
        iid = inst.id if inst is not None else ev.id
        start, end = (inst.start, inst.end) if inst is not None else (ev.start, ev.end)
        attendees = inst.attendees if inst is not None else ev.attendees
        body = o.body if o is not None and o.body is not None else ev.body
        version = max(ev.version, o.version if o is not None else 0)
        change_key = base64.urlsafe_b64encode(
            hashlib.blake2b(f"{iid}|{version}".encode(), digest_size=18).digest()
        ).decode()
        owner = self.sim.world.user(ev.owner_oid).upn.lower()
        is_org = (ev.organizer.address or "").lower() == owner
        mine = next((a for a in attendees if (a.address or "").lower() == owner), None)
        response = "organizer" if is_org else (mine.response if mine else "none")
        sub = typ in ("occurrence", "exception")
        assert inst is None or not sub or inst.original_start is not None
        ical = (
            occurrence_ical_uid(ev.ical_uid, inst.original_start)
            if sub and inst and inst.original_start
            else ev.ical_uid
        )
        created = _iso(ev.created or self.sim.world.now - timedelta(days=30))
        rec = None
        if typ == "seriesMaster" and ev.recurrence is not None:
            r = ev.recurrence
            local = ev.start.astimezone(ZoneInfo(WINDOWS_TZ.get(ev.time_zone, ev.time_zone)))
            rec = {
                "pattern": {
                    "type": "weekly",
                    "interval": r.interval,
                    "month": 0,
                    "dayOfMonth": 0,
                    "daysOfWeek": [_DAYS[d] for d in r.days],
                    "firstDayOfWeek": "sunday",
                    "index": "first",
                },
                "range": {
                    "type": "endDate" if r.until else "noEnd",
                    "startDate": local.date().isoformat(),
                    "endDate": r.until.isoformat() if r.until else "0001-01-01",
                    "recurrenceTimeZone": ev.time_zone,
                    "numberOfOccurrences": 0,
                },
            }
        html_body = self.sim._body(SimpleNamespace(body=body), body_type)
        online = {"joinUrl": ev.join_url} if ev.is_online and ev.join_url else None
        subject = inst.subject if inst is not None else ev.subject
        if ev.id in self.sim.lone_surrogate_ids and subject is not None:  # fault knob (GraphSimulator)
            subject += HALF_EMOJI
        return {
            "@odata.etag": f'W/"{change_key}"',
            "id": iid,
            "createdDateTime": created,
            "lastModifiedDateTime": _iso(ev.modified) if ev.modified else created,
            "changeKey": change_key,
            "categories": [],
            "transactionId": None,
            "originalStartTimeZone": ev.time_zone,
            "originalEndTimeZone": ev.time_zone,
            "iCalUId": ical,
            "uid": ev.ical_uid,
            "reminderMinutesBeforeStart": 15,
            "isReminderOn": True,
            "hasAttachments": False,
            "subject": subject,
            "bodyPreview": body[:255],
            "importance": "normal",
            "sensitivity": ev.sensitivity,
            "isAllDay": False,
            "isCancelled": ev.is_cancelled,
            "isOrganizer": is_org,
            "responseRequested": True,
            "seriesMasterId": ev.id if sub else None,
            "showAs": "busy",
            "type": typ,
            "webLink": f"https://outlook.office365.com/owa/?itemid={_quote_id(iid)}&exvsurl=1&path=/calendar/item",
            "onlineMeetingUrl": None,
            "isOnlineMeeting": ev.is_online,
            "onlineMeetingProvider": "teamsForBusiness" if ev.is_online else "unknown",
            "allowNewTimeProposals": True,
            "occurrenceId": f"OID.{ev.id}.{inst.original_start:%Y-%m-%d}"
            if sub and inst and inst.original_start
            else None,
            "isDraft": False,
            "hideAttendees": False,
            "responseStatus": {"response": response, "time": "0001-01-01T00:00:00Z"},
            "body": html_body,
            "start": self._dtz(start, zone),
            "end": self._dtz(end, zone),
            "location": {"displayName": "Microsoft Teams Meeting" if ev.is_online else "", "locationType": "default"},
            "locations": [],
            "recurrence": rec,
            "attendees": [
                {
                    "type": a.type,
                    "status": {"response": a.response, "time": "0001-01-01T00:00:00Z"},
                    "emailAddress": {"name": a.name, "address": a.address},
                }
                for a in attendees
            ],
            "organizer": {"emailAddress": {"name": ev.organizer.name, "address": ev.organizer.address}},
            "onlineMeeting": online,
        }

    def _render(
        self,
        ev: SimEvent,
        inst: Instance | None,
        zone: str,
        body_type: str,
        select: tuple[str, ...] | None = None,
        typed: bool = False,
        bare: bool = False,
    ) -> dict:
        full = self._props(ev, inst, zone, body_type)
        out: dict[str, Any] = {"@odata.type": EVENT_TYPE} if typed else {}
        out["@odata.etag"], out["id"] = full["@odata.etag"], full["id"]
        for p in BARE_PROPS if bare else (select if select is not None else EVENT_PROPS):
            if p != "id":
                out[p] = full[p]
        return out

    @staticmethod
    def _collection(context: str, items: list[dict], link: tuple[str, str] | None, headers: dict) -> Response:
        body = b'{"@odata.context":' + _encode(context)
        if link is not None:
            body += b',"' + link[0].encode() + b'":' + _encode(link[1])
        headers["Content-Type"] = _CT
        return Response(200, body + b',"value":' + _encode(items) + b"}", headers)

    # ---------------------------------------------------------------- calendarView
    def _calendar_view(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        self._need(ctx, CAL_READ)
        lo, hi = self._window(req)
        for k in req.query:
            if k.startswith("$") and k.lower() not in ("$select", "$top", "$skip", "$count"):
                raise GraphFail(400, "BadRequest", f"Query option '{k}' is not supported.")  # UNVERIFIED
        select = self._select(req)
        headers: dict[str, str] = {}
        zone, body_type = self._zone(req, headers), self.sim._body_type(req, headers)
        if any(k.lower() == "$top" for k in req.query):
            size = self.sim._parse_int(req, "$top", 10, 1, 1000)
        else:
            size = self.sim._page_size(req, headers)
        skip = self.sim._parse_int(req, "$skip", 0, 0, 10**9)
        insts = self.cal.instances(ctx.claims.oid, lo, hi)
        with self.sim.world.lock:
            items = [self._render(i.event, i, zone, body_type, select) for i in insts[skip : skip + size]]
        link = None
        if skip + size < len(insts) or self.sim.endless_next_links:
            query = {k: v for k, v in req.query.items() if k.lower() != "$skip"}
            query["$skip"] = str(skip + size)
            link = ("@odata.nextLink", f"{req.base_url}{req.path}?{urlencode(query, safe='$,:')}")
        sel = f"({','.join(select)})" if select else ""
        return self._collection(
            f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/calendarView{sel}", items, link, headers
        )

    def _lookup(self, ctx: _Ctx, raw: str) -> tuple[SimEvent, Instance | None]:
        assert ctx.claims is not None
        hit = self.cal.find(ctx.claims.oid, unquote(raw))
        if hit is None:
            raise GraphFail(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return hit

    def _event_response(
        self, req: Request, ctx: _Ctx, ev: SimEvent, inst: Instance | None, select: tuple[str, ...] | None = None
    ) -> Response:
        assert ctx.claims is not None
        headers: dict[str, str] = {}
        zone, body_type = self._zone(req, headers), self.sim._body_type(req, headers)
        with self.sim.world.lock:
            item = self._render(ev, inst, zone, body_type, select)
        context = f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/events/$entity"
        headers["Content-Type"] = _CT
        return Response(200, _encode({"@odata.context": context, **item}), headers)

    def _get_event(self, req: Request, ctx: _Ctx) -> Response:
        assert req.match is not None
        self._need(ctx, CAL_READ)
        select = self._select(req)
        ev, inst = self._lookup(ctx, req.match.group(1))
        return self._event_response(req, ctx, ev, inst, select)

    def _instances(self, req: Request, ctx: _Ctx) -> Response:
        """`GET /me/events/{master id}/instances`: occurrences and exceptions in the window, one page
        (UNVERIFIED: no paging here)."""
        assert req.match is not None and ctx.claims is not None
        self._need(ctx, CAL_READ)
        lo, hi = self._window(req)
        select = self._select(req)
        ev, inst = self._lookup(ctx, req.match.group(1))
        headers: dict[str, str] = {}
        zone, body_type = self._zone(req, headers), self.sim._body_type(req, headers)
        with self.sim.world.lock:
            insts = sorted(expand(ev, lo, hi), key=lambda i: (i.start, i.id)) if inst is None else [inst]
            items = [self._render(ev, i, zone, body_type, select) for i in insts if ev.recurrence is not None]
        return self._collection(
            f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/events('{ev.id}')/instances", items, None, headers
        )

    # ---------------------------------------------------------------- calendarView delta
    def _delta(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        self._need(ctx, CAL_READ)
        oid = ctx.claims.oid
        query = {k.lower(): v for k, v in req.query.items()}
        headers: dict[str, str] = {}
        zone, body_type = self._zone(req, headers), self.sim._body_type(req, headers)
        size = self.sim._page_size(req, headers)
        if "$skiptoken" in query or "$deltatoken" in query:
            token = query.get("$skiptoken") or query.get("$deltatoken") or ""
            with self.sim._lock:
                entry = self._tokens.get(token)
            if entry is None:
                raise self.sim._gone(None)
            kind, obj, extra = entry
            state: _CalState = obj.state if kind == "page" else obj
            if state.oid != oid or state.evicted:
                raise self.sim._gone(state)  # type: ignore[arg-type]
            if kind == "page":
                rnd, pos = obj, extra
            else:
                rnd, pos = self._plan(state, *extra, zone=zone, body_type=body_type), 0
        else:
            for k in req.query:  # $select is not supported on event delta: ignored (UNVERIFIED: or a 400)
                if k.startswith("$") and k.lower() not in ("$select", "$top"):
                    raise GraphFail(400, "BadRequest", f"Query option '{k}' is not supported.")  # UNVERIFIED
            lo, hi = self._window(req)
            state = _CalState(oid, lo, hi)
            with self.sim._lock:
                self._states.append(state)
            rnd, pos = self._plan(state, None, None, zone=zone, body_type=body_type), 0
        chosen: list[dict] = []
        while pos < len(rnd.groups) and (not chosen or len(chosen) + len(rnd.groups[pos]) <= size):
            chosen += rnd.groups[pos]
            pos += 1
        token = secrets.token_urlsafe(24)
        base = f"{req.base_url}/v1.0/me/calendarView/delta"
        if pos < len(rnd.groups) or self.sim.endless_next_links:
            entry = ("page", rnd, pos)
            link = ("@odata.nextLink", f"{base}?$skiptoken={token}")
        else:
            entry = ("delta", rnd.state, (rnd.snapshot, rnd.end_seq))
            link = ("@odata.deltaLink", f"{base}?$deltatoken={token}")
        with self.sim._lock:
            self._tokens[token] = entry
        return self._collection(f"{req.base_url}/v1.0/$metadata#Collection(event)", chosen, link, headers)

    def _plan(
        self, state: _CalState, base: dict[str, tuple] | None, since: int | None, *, zone: str, body_type: str
    ) -> _CalRound:
        """Diff the window now against `base` (None: the initial round, everything in the window). Occurrence
        fingerprints include the master's version, so a series change re-sends its bare occurrences too
        (UNVERIFIED)."""
        cal, k = self.cal, self.knobs
        groups: list[tuple[datetime, list[dict]]] = []
        removed: list[str] = []
        snapshot: dict[str, tuple] = {}
        with self.sim.world.lock:
            end_seq = cal.seq
            events = cal.events.get(state.oid, [])
            deleted_occ: set[str] = set()
            for ev in events:
                insts = expand(ev, state.lo, state.hi)
                deleted_occ |= {occurrence_id(ev.id, orig) for orig, o in ev.overrides.items() if o.deleted}
                if not insts:
                    continue
                cur: list[tuple[str, tuple, SimEvent, Instance | None, bool]] = []
                if ev.recurrence is not None:
                    cur.append((ev.id, ("m", ev.version), ev, None, False))
                    for i in insts:
                        fp = ("o", i.start, i.end, ev.version) if i.type == "occurrence" else ("x", ev.version)
                        cur.append((i.id, fp, ev, i, i.type == "occurrence"))
                else:
                    cur.append((ev.id, ("s", ev.version), ev, insts[0], False))
                items = []
                for iid, fp, e, inst, bare in cur:
                    snapshot[iid] = fp
                    if base is None or base.get(iid) != fp:
                        items.append(self._render(e, inst, zone, body_type, typed=True, bare=bare))
                if items:
                    groups.append((insts[0].start, items))
            if base is not None:
                removed = [
                    i for i in base if i not in snapshot and (k.delta_deleted_occurrences or i not in deleted_occ)
                ]
                if k.delta_out_of_window_removed and since is not None:  # documented noise (event: delta)
                    noise = [ev.id for ev in events if ev.version > since and ev.id not in snapshot]
                    noise += [ev.id for ev, seq in cal.removed.get(state.oid, []) if seq > since]
                    removed += [i for i in dict.fromkeys(noise) if i not in base and i not in removed]
            state.generation += 1
        groups.sort(key=lambda g: g[0])
        out = [g for _, g in groups]
        out += [[{"@odata.type": EVENT_TYPE, "id": i, "@removed": {"reason": "deleted"}}] for i in removed]
        return _CalRound(state, out, snapshot, end_seq)

    # ---------------------------------------------------------------- writes
    def _patch_event(self, req: Request, ctx: _Ctx) -> Response:
        """Only the fields Explicit Consent Mode needs; anything else is refused (a simulator limit, not Graph's:
        real Graph accepts every writable property)."""
        assert req.match is not None and ctx.claims is not None
        self._need(ctx, CAL_WRITE)
        payload = req.json_or_none()
        if not isinstance(payload, dict) or not payload:
            raise GraphFail(400, "ErrorInvalidRequest", "Empty Payload. JSON content expected.")
        bad = sorted(set(payload) - PATCHABLE)
        if bad:
            raise GraphFail(400, "ErrorInvalidRequest", f"The simulator does not model changing {bad}.")
        ev, inst = self._lookup(ctx, req.match.group(1))
        changes: dict[str, Any] = {}
        if "subject" in payload:
            changes["subject"] = str(payload["subject"])
        if "body" in payload:
            body = payload["body"]
            if not isinstance(body, dict) or not isinstance(body.get("content"), str):
                raise GraphFail(400, "ErrorInvalidRequest", "Invalid body.")
            changes["body"] = body["content"]
        if payload.get("isOnlineMeeting") is True and not ev.is_online:  # once online, it can't be undone (DOC)
            if inst is not None:
                raise GraphFail(400, "ErrorInvalidRequest", "Set isOnlineMeeting on the series master.")
            changes["is_online"] = True
        with self.sim.world.lock:
            if changes:
                self.cal.update(inst.id if inst is not None else ev.id, **changes)
            self.cal.writes.append(CalendarWrite(ctx.claims.oid, inst.id if inst is not None else ev.id, dict(payload)))
            hit = self.cal.find(ctx.claims.oid, inst.id if inst is not None else ev.id)
        assert hit is not None
        return self._event_response(req, ctx, *hit)

    def _online_meeting(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        self._need(ctx, ONLINE_MEETINGS, teams=True)
        payload = req.json_or_none()
        if not isinstance(payload, dict):
            raise GraphFail(400, "BadRequest", "Invalid request body.")
        external_id = None
        if req.path.rstrip("/").lower().endswith("/creatorget"):  # idempotent form, keyed by externalId (GD)
            external_id = payload.get("externalId")
            if not isinstance(external_id, str) or not external_id:
                raise GraphFail(400, "BadRequest", "externalId is required.")  # UNVERIFIED text
        now = datetime.fromtimestamp(self.sim.tokens.clock(), UTC).replace(microsecond=0)
        context = f"{req.base_url}/v1.0/$metadata#users('{ctx.claims.oid}')/onlineMeetings/$entity"
        with self.sim.world.lock:
            cal = self.cal
            old = next(
                (
                    m
                    for m in cal.online_meetings
                    if external_id and m["oid"] == ctx.claims.oid and m.get("externalId") == external_id
                ),
                None,
            )
            if old is not None:
                return Response(200, {"@odata.context": context, **{k: v for k, v in old.items() if k != "oid"}})
            url = _join_url(cal.rng)
            user = self.sim.world.user(ctx.claims.oid)
            meeting = {
                "id": base64.urlsafe_b64encode(uuid.UUID(int=cal.rng.getrandbits(128)).bytes).decode().rstrip("="),
                "creationDateTime": _iso(now),
                "subject": payload.get("subject"),
                "startDateTime": payload.get("startDateTime") or _iso(now),
                "endDateTime": payload.get("endDateTime") or _iso(now + timedelta(hours=1)),
                "joinWebUrl": url,
                "joinUrl": url,
                "videoTeleconferenceId": None,
                "participants": {
                    "organizer": {
                        "upn": user.upn,
                        "role": "presenter",
                        "identity": {"user": {"id": user.oid, "tenantId": user.tid}},
                    },
                    "attendees": [],
                },
                "chatInfo": {"threadId": f"19:meeting_{secrets.token_urlsafe(12)}@thread.v2", "messageId": "0"},
                "externalId": external_id,
            }
            cal.online_meetings.append({"oid": ctx.claims.oid, **meeting})
        return Response(201, {"@odata.context": context, **meeting})

    # ---------------------------------------------------------------- Teams
    def _joined_teams(self, req: Request, ctx: _Ctx) -> Response:
        assert ctx.claims is not None
        self._need(ctx, TEAMS_READ, teams=True)
        oid = ctx.claims.oid
        value = [
            {"id": t.id, "displayName": t.display_name, "description": t.description}
            for t in self.cal.teams
            if oid in t.members
        ]
        return Response(
            200, {"@odata.context": f"{req.base_url}/v1.0/$metadata#teams", "@odata.count": len(value), "value": value}
        )

    def _team(self, ctx: _Ctx, raw: str) -> Any:
        assert ctx.claims is not None
        team = next((t for t in self.cal.teams if t.id == unquote(raw)), None)
        if team is None:
            raise GraphFail(404, "NotFound", "No team found with Group Id " + unquote(raw))
        if ctx.claims.oid not in team.members:  # UNVERIFIED status/code for a non-member
            raise GraphFail(403, "Forbidden", "User is not a member of the team.")
        return team

    def _channels(self, req: Request, ctx: _Ctx) -> Response:
        assert req.match is not None and ctx.claims is not None
        self._need(ctx, CHANNELS_READ, teams=True)
        team = self._team(ctx, req.match.group(1))
        flt = next((v for k, v in req.query.items() if k.lower() == "$filter"), None)
        want = None
        if flt is not None:
            m = re.fullmatch(r"\s*membershipType\s+eq\s+'(\w+)'\s*", flt)
            if m is None:
                raise GraphFail(400, "BadRequest", "Invalid filter clause")  # UNVERIFIED text
            want = m.group(1)
        oid = ctx.claims.oid
        value = [
            {
                "id": c.id,
                "createdDateTime": "2024-01-08T09:00:00Z",
                "displayName": c.display_name,
                "description": None,
                "isFavoriteByDefault": None,
                "email": "",
                "tenantId": team.tid,
                "webUrl": f"https://teams.microsoft.com/l/channel/{c.id}/{c.display_name}?groupId={team.id}",
                "membershipType": c.membership_type,
            }
            for c in team.channels
            if (c.members is None or oid in c.members) and (want is None or c.membership_type == want)
        ]
        return Response(
            200,
            {
                "@odata.context": f"{req.base_url}/v1.0/$metadata#teams('{team.id}')/channels",
                "@odata.count": len(value),
                "value": value,
            },
        )

    def _message_body(self, req: Request) -> tuple[str, str]:
        payload = req.json_or_none()
        body = payload.get("body") if isinstance(payload, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("content"), str) or not body["content"]:
            raise GraphFail(400, "BadRequest", "Message body cannot be empty.")  # UNVERIFIED text
        return body["content"], str(body.get("contentType") or "text")

    def _posted(self, req: Request, ctx: _Ctx, content: str, ctype: str, **where: str | None) -> Response:
        assert ctx.claims is not None
        user = self.sim.world.user(ctx.claims.oid)
        now = datetime.fromtimestamp(self.sim.tokens.clock(), UTC)
        with self.sim.world.lock:
            posts = self.cal.posts
            mid = str(int(now.timestamp() * 1000) + len(posts))
            posts.append(Post(ctx.claims.oid, mid, content, ctype, **where))
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        channel = {"teamId": where["team_id"], "channelId": where["channel_id"]} if where.get("team_id") else None
        return Response(
            201,
            {
                "@odata.context": f"{req.base_url}/v1.0/$metadata#chatMessage/$entity",
                "id": mid,
                "replyToId": None,
                "etag": mid,
                "messageType": "message",
                "createdDateTime": stamp,
                "lastModifiedDateTime": stamp,
                "lastEditedDateTime": None,
                "deletedDateTime": None,
                "subject": None,
                "summary": None,
                "chatId": where.get("chat_id"),
                "importance": "normal",
                "locale": "en-us",
                "webUrl": None,
                "channelIdentity": channel,
                "policyViolation": None,
                "eventDetail": None,
                "from": {
                    "application": None,
                    "device": None,
                    "user": {
                        "id": user.oid,
                        "displayName": user.display_name,
                        "userIdentityType": "aadUser",
                        "tenantId": user.tid,
                    },
                },
                "body": {"contentType": ctype, "content": content},
                "attachments": [],
                "mentions": [],
                "reactions": [],
            },
        )

    def _channel_message(self, req: Request, ctx: _Ctx) -> Response:
        assert req.match is not None and ctx.claims is not None
        self._need(ctx, CHANNEL_SEND, teams=True)
        team = self._team(ctx, req.match.group(1))
        cid = unquote(req.match.group(2))
        channel = next((c for c in team.channels if c.id == cid), None)
        if channel is None or (channel.members is not None and ctx.claims.oid not in channel.members):
            raise GraphFail(404, "NotFound", "Channel not found.")  # UNVERIFIED: hidden channels as not found
        content, ctype = self._message_body(req)
        return self._posted(req, ctx, content, ctype, team_id=team.id, channel_id=channel.id)

    def _create_chat(self, req: Request, ctx: _Ctx) -> Response:
        """oneOnOne (exactly 2 members, an existing chat is returned) or group; the caller must be a member.
        Members bind to users of the caller's tenant by oid or UPN."""
        assert ctx.claims is not None
        self._need(ctx, CHAT_CREATE, teams=True)
        payload = req.json_or_none()
        if not isinstance(payload, dict) or payload.get("chatType") not in ("oneOnOne", "group"):
            raise GraphFail(400, "BadRequest", "Invalid chatType.")
        tenant = self.sim.world.tenant(ctx.claims.tid)
        members: list[str] = []
        for m in payload.get("members") or []:
            bind = m.get("user@odata.bind", "") if isinstance(m, dict) else ""
            hit = _USERS_BIND.search(bind)
            key = hit.group(1).lower() if hit else ""
            user = next((u for u in tenant.users if key in (u.oid.lower(), u.upn.lower())), None)
            if user is None:
                raise GraphFail(404, "NotFound", f"User '{key}' not found.")  # UNVERIFIED
            if user.oid not in members:
                members.append(user.oid)
        if ctx.claims.oid not in members:
            raise GraphFail(400, "BadRequest", "The creator of the chat must be a member of the chat.")  # UNVERIFIED
        chat_type = payload["chatType"]
        if (chat_type == "oneOnOne") != (len(members) == 2) or len(members) < 2:
            raise GraphFail(400, "BadRequest", "Invalid number of members for the chat type.")  # UNVERIFIED
        now = datetime.fromtimestamp(self.sim.tokens.clock(), UTC).replace(microsecond=0)
        with self.sim.world.lock:
            cal = self.cal
            if chat_type == "oneOnOne":
                cid = f"19:{'_'.join(sorted(members))}@unq.gbl.spaces"
                chat = cal.chats.get(cid)
            else:
                cid, chat = f"19:{uuid.UUID(int=cal.rng.getrandbits(128)).hex}@thread.v2", None
            if chat is None:
                topic = payload.get("topic") if chat_type == "group" else None
                chat = cal.chats[cid] = SimChat(cid, ctx.claims.tid, chat_type, tuple(members), topic, now)
        return Response(
            201,
            {
                "@odata.context": f"{req.base_url}/v1.0/$metadata#chats/$entity",
                "id": chat.id,
                "topic": chat.topic,
                "createdDateTime": _iso(chat.created),
                "lastUpdatedDateTime": _iso(chat.created),
                "chatType": chat.chat_type,
                "tenantId": chat.tid,
                "webUrl": f"https://teams.microsoft.com/l/chat/{chat.id}/0?tenantId={chat.tid}",
            },
        )

    def _chat_message(self, req: Request, ctx: _Ctx) -> Response:
        assert req.match is not None and ctx.claims is not None
        self._need(ctx, CHAT_SEND, teams=True)
        chat = self.cal.chats.get(unquote(req.match.group(1)))
        if chat is None or ctx.claims.oid not in chat.members:
            raise GraphFail(404, "NotFound", "Chat not found.")  # UNVERIFIED
        content, ctype = self._message_body(req)
        return self._posted(req, ctx, content, ctype, chat_id=chat.id)
