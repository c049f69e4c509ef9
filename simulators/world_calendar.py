"""Calendars and Teams for a `World`: realistic per-user events, recurring series with exceptions, Teams with
channels, a mutation API for tests, and the ground truth of which meetings must be imported.

Generated from `random.Random(f"{seed}:calendars")`, so adding calendars never shifts the mail/CRM sequences.
Times are UTC `datetime`s; a series recurs at its local wall time in `time_zone` (Windows name, as Graph sends),
so its UTC times move across DST. Every change bumps `Calendars.seq` and stamps the event's `version`; the
Graph simulator diffs expanded windows for calendarView delta and reads the tombstones in `removed`.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from simulators.world import SimTenant, SimUser, World

# Windows time-zone names (what Graph puts in start/end.timeZone and originalStartTimeZone) -> IANA
WINDOWS_TZ = {
    "UTC": "UTC",
    "W. Europe Standard Time": "Europe/Berlin",
    "GMT Standard Time": "Europe/London",
    "Eastern Standard Time": "America/New_York",
    "Pacific Standard Time": "America/Los_Angeles",
}
EVENT_TYPE = "#microsoft.graph.event"
SKIPPED_SENSITIVITY = frozenset({"private"})
_ICAL_HEAD = "040000008200E00074C5B7101A82E008"  # Outlook GlobalObjectId: class id, then the instance date
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MEETING_TOPICS = (
    "Weekly sync",
    "Renewal call",
    "Pricing review",
    "QBR",
    "Onboarding check-in",
    "Roadmap preview",
    "Security review",
    "Pilot results",
    "Contract walkthrough",
    "Integration planning",
)


@dataclass(frozen=True)
class Attendee:
    name: str | None
    address: str | None
    response: str = "none"  # none|organizer|tentativelyAccepted|accepted|declined|notResponded
    type: str = "required"  # required|optional|resource


@dataclass
class Recurrence:
    """Weekly pattern: every `interval` weeks on `days` (0 = Monday) from the master's first start."""

    interval: int
    days: tuple[int, ...]
    until: date | None  # range endDate (inclusive, local) or None: noEnd


@dataclass
class Override:
    """An occurrence changed on its own (an exception) or deleted; keyed by its original UTC start."""

    start: datetime | None = None
    end: datetime | None = None
    subject: str | None = None
    body: str | None = None
    attendees: list[Attendee] | None = None
    deleted: bool = False
    version: int = 0


@dataclass
class SimEvent:
    id: str
    owner_oid: str
    ical_uid: str
    subject: str
    body: str  # the user's notes/agenda: the product must never store it
    start: datetime  # UTC; for a series master: the first occurrence
    end: datetime
    time_zone: str  # Windows name
    organizer: Attendee
    attendees: list[Attendee]
    kind: str  # generator label: customer_call, external, lead, stranger, standup, internal, private, cancelled
    sensitivity: str = "normal"  # normal|personal|private|confidential
    is_online: bool = False
    join_url: str | None = None
    is_cancelled: bool = False
    recurrence: Recurrence | None = None
    overrides: dict[datetime, Override] = field(default_factory=dict)
    version: int = 0
    created: datetime | None = None
    modified: datetime | None = None

    @property
    def type(self) -> str:
        return "seriesMaster" if self.recurrence else "singleInstance"


class Instance(NamedTuple):
    """What calendarView returns: a single instance, an occurrence or an exception (with its effective values)."""

    id: str
    event: SimEvent  # the single event or the series master
    type: str  # singleInstance | occurrence | exception
    start: datetime
    end: datetime
    original_start: datetime | None
    override: Override | None

    @property
    def subject(self) -> str:
        o = self.override
        return o.subject if o is not None and o.subject is not None else self.event.subject

    @property
    def attendees(self) -> list[Attendee]:
        o = self.override
        return o.attendees if o is not None and o.attendees is not None else self.event.attendees

    def participants(self) -> list[Attendee]:
        return [self.event.organizer, *self.attendees]


@dataclass
class SimChannel:
    id: str
    display_name: str
    membership_type: str  # standard | private | shared
    members: frozenset[str] | None = None  # None: every team member


@dataclass
class SimTeam:
    id: str
    tid: str
    display_name: str
    description: str
    members: frozenset[str]
    channels: list[SimChannel]


@dataclass
class SimChat:
    id: str
    tid: str
    chat_type: str  # oneOnOne | group
    members: tuple[str, ...]
    topic: str | None
    created: datetime


@dataclass(frozen=True)
class Post:
    """A message posted to a channel (`team_id`, `channel_id`) or a chat (`chat_id`)."""

    oid: str
    id: str
    content: str
    content_type: str
    team_id: str | None = None
    channel_id: str | None = None
    chat_id: str | None = None


@dataclass(frozen=True)
class CalendarWrite:
    """A PATCH the product made to an event (`fields`: the JSON body as sent)."""

    oid: str
    event_id: str
    fields: dict


@dataclass
class Calendars:
    world: World = field(repr=False, compare=False)
    events: dict[str, list[SimEvent]] = field(default_factory=dict)  # owner oid -> events (singles + masters)
    removed: dict[str, list[tuple[SimEvent, int]]] = field(default_factory=dict)  # owner -> (event, deleted at seq)
    teams: list[SimTeam] = field(default_factory=list)
    chats: dict[str, SimChat] = field(default_factory=dict)
    posts: list[Post] = field(default_factory=list)
    writes: list[CalendarWrite] = field(default_factory=list)
    online_meetings: list[dict] = field(default_factory=list)
    seq: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    # ------------------------------------------------------------------------------------------ reading
    def event(self, event_id: str) -> SimEvent:
        """A single event or series master currently in a calendar (KeyError otherwise)."""
        with self.world.lock:
            for evs in self.events.values():
                for ev in evs:
                    if ev.id == event_id:
                        return ev
        raise KeyError(event_id)

    def instances(self, oid: str, lo: datetime, hi: datetime, include_cancelled: bool = True) -> list[Instance]:
        """Every single instance, occurrence and exception of `oid` overlapping [lo, hi), by start then id."""
        with self.world.lock:
            out = [
                i
                for ev in self.events.get(oid, [])
                for i in expand(ev, lo, hi)
                if include_cancelled or not ev.is_cancelled
            ]
        out.sort(key=lambda i: (i.start, i.id))
        return out

    def find(self, oid: str, item_id: str) -> tuple[SimEvent, Instance | None] | None:
        """(event, None) for a single event or master, (master, instance) for an occurrence/exception id."""
        with self.world.lock:
            for ev in self.events.get(oid, []):
                if ev.id == item_id:
                    return ev, None
            for ev in self.events.get(oid, []):
                if ev.recurrence is not None:
                    for orig in _originals(ev, ev.start - timedelta(days=1), self.world.now + timedelta(days=1900)):
                        if occurrence_id(ev.id, orig) == item_id:
                            inst = _instance(ev, orig)
                            return (ev, inst) if inst is not None else None
        return None

    # ------------------------------------------------------------------------------------------ mutations
    def _bump(self, ev: SimEvent) -> int:
        self.seq += 1
        ev.version = self.seq
        ev.modified = self.world.now
        return self.seq

    def _target(self, item_id: str) -> tuple[SimEvent, datetime | None]:
        """(single event or master, original start of the occurrence or None)."""
        for oid in self.events:
            hit = self.find(oid, item_id)
            if hit is not None:
                ev, inst = hit
                return ev, inst.original_start if inst is not None else None
        raise KeyError(item_id)

    def _override(self, ev: SimEvent, orig: datetime) -> Override:
        o = ev.overrides.get(orig)
        if o is None:
            o = ev.overrides[orig] = Override()
        return o

    def reschedule(self, item_id: str, start: datetime, end: datetime | None = None) -> SimEvent:
        """Move a single event, a whole series (pattern restarts at `start`; its exceptions are dropped and its
        occurrences get new ids) or one occurrence (it becomes an exception with the same id)."""
        with self.world.lock:
            ev, orig = self._target(item_id)
            if orig is None:
                end = end or start + (ev.end - ev.start)
                ev.start, ev.end = start, end
                ev.overrides.clear()
            else:
                o = self._override(ev, orig)
                length = (o.end - o.start) if o.start and o.end else ev.end - ev.start
                o.start, o.end = start, end or start + length
                o.version = self.seq + 1
            self._bump(ev)
            return ev

    def change_attendees(self, item_id: str, add: Iterable[Attendee] = (), remove: Iterable[str] = ()) -> SimEvent:
        """Add attendees / remove them by address (case-insensitive) on an event, a series or one occurrence."""
        gone = {a.strip().lower() for a in remove}
        with self.world.lock:
            ev, orig = self._target(item_id)
            current = ev.attendees
            if orig is not None:
                o = self._override(ev, orig)
                current = o.attendees if o.attendees is not None else ev.attendees
            new = [a for a in current if (a.address or "").strip().lower() not in gone] + list(add)
            if orig is None:
                ev.attendees = new
            else:
                o.attendees, o.version = new, self.seq + 1
            self._bump(ev)
            return ev

    def update(self, item_id: str, **changes: object) -> SimEvent:
        """Change subject/body (also on one occurrence), sensitivity, is_online/join_url (events and series)."""
        with self.world.lock:
            ev, orig = self._target(item_id)
            if orig is not None:
                bad = set(changes) - {"subject", "body"}
                if bad:
                    raise ValueError(f"not updatable on an occurrence: {sorted(bad)}")
                o = self._override(ev, orig)
                for k, v in changes.items():
                    setattr(o, k, v)
                o.version = self.seq + 1
            else:
                bad = set(changes) - {"subject", "body", "sensitivity", "is_online", "join_url"}
                if bad:
                    raise ValueError(f"not updatable: {sorted(bad)}")
                for k, v in changes.items():
                    setattr(ev, k, v)
                if ev.is_online and not ev.join_url:
                    ev.join_url = _join_url(self.rng)
            self._bump(ev)
            return ev

    def cancel(self, item_id: str, delete: bool | None = None) -> SimEvent:
        """Cancel a meeting. Occurrence: deleted from the series. Event/series: deleted when `delete` or (default)
        when the owner organizes it; otherwise the attendee's copy stays with isCancelled and "Canceled: " subject."""
        with self.world.lock:
            ev, orig = self._target(item_id)
            if orig is not None:
                o = self._override(ev, orig)
                o.deleted, o.version = True, self.seq + 1
                self._bump(ev)
                return ev
            owner = self.world.user(ev.owner_oid).upn.lower()
            if delete or (delete is None and (ev.organizer.address or "").lower() == owner):
                return self.delete(ev.id)
            ev.is_cancelled = True
            ev.subject = f"Canceled: {ev.subject}"
            self._bump(ev)
            return ev

    def delete(self, event_id: str) -> SimEvent:
        """Delete a single event or a whole series (master id)."""
        with self.world.lock:
            ev = self.event(event_id)
            self.events[ev.owner_oid].remove(ev)
            self.removed.setdefault(ev.owner_oid, []).append((ev, self._bump(ev)))
            return ev

    delete_series = delete

    def add_event(
        self, owner_oid: str, kind: str = "external", start: datetime | None = None, recurring: bool = False
    ) -> SimEvent:
        """A new realistic event of generator `kind` (customer_call, external, lead, stranger, standup, internal,
        private) for `owner_oid`, starting at `start` (default: in 3 days at 14:00 UTC)."""
        with self.world.lock:
            user = self.world.user(owner_oid)
            gen = _Gen(self.rng, self.world.tenant(user.tid), user, self.world)
            start = start or (self.world.now + timedelta(days=3)).replace(hour=14, minute=0, second=0)
            ev = gen.make(kind, start, recurring)
            self._bump(ev)
            ev.created = self.world.now
            self.events.setdefault(owner_oid, []).append(ev)
            return ev

    # ------------------------------------------------------------------------------------------ ground truth
    def expected_meetings(
        self, tid: str, window_start: datetime, window_end: datetime, include_internal_for: Iterable[str] = ()
    ) -> dict[tuple[str, str], frozenset[str]]:
        """(user oid, event or occurrence id) -> CRM ids, for every instance overlapping [window_start, window_end).

        Skipped: `sensitivity` private; cancelled (isCancelled copies, deleted events/occurrences); internal
        meetings (every organizer/attendee address internal: domain one of the tenant's, or no "@") unless the owner
        is in `include_internal_for` (then with no CRM ids); external meetings matching nothing. Matching (organizer
        and attendees, like mail's from/to/cc): exact address to contacts and unconverted leads, registrable domain to
        accounts, through `World._crm_index` (free-mail and own domains never match)."""
        from simulators.world import _PSL, _norm

        people, accounts, own = self.world._crm_index(tid)
        internal_ok = set(include_internal_for)
        out: dict[tuple[str, str], frozenset[str]] = {}
        for user in self.world.tenant(tid).users:
            for inst in self.instances(user.oid, window_start, window_end, include_cancelled=False):
                if inst.event.sensitivity in SKIPPED_SENSITIVITY:
                    continue
                addrs = [a for p in inst.participants() if (a := _norm(p.address)) is not None]
                external = [a for a in addrs if "@" in a and a.rpartition("@")[2] not in own]
                if not external:
                    if user.oid in internal_ok:
                        out[(user.oid, inst.id)] = frozenset()
                    continue
                ids: set[str] = set()
                for a in external:
                    ids |= people.get(a, set())
                    ids |= accounts.get(_PSL.privatesuffix(a.rpartition("@")[2]) or "", set())
                if ids:
                    out[(user.oid, inst.id)] = frozenset(ids)
        return out


# ---------------------------------------------------------------------------------------------- expansion
def occurrence_id(master_id: str, original_start: datetime) -> str:
    """Stable id of an occurrence (an exception keeps it — UNVERIFIED that Graph keeps the occurrence id)."""
    digest = hashlib.blake2b(f"{master_id}|{original_start:%Y%m%dT%H%M}".encode(), digest_size=30).digest()
    return "AAMkAGOc" + base64.urlsafe_b64encode(digest).decode() + "AAEQ="


def occurrence_ical_uid(master_ical: str, original_start: datetime) -> str:
    """The GlobalObjectId of one instance: the master's with the instance date in bytes 16-19."""
    d = original_start
    return f"{master_ical[:32]}{d.year:04X}{d.month:02X}{d.day:02X}{master_ical[40:]}"


def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(WINDOWS_TZ.get(tz, tz))


def _originals(ev: SimEvent, lo: datetime, hi: datetime) -> Iterator[datetime]:
    """Original UTC starts of a series' occurrences in [lo, hi)."""
    rec = ev.recurrence
    assert rec is not None
    tz = _zone(ev.time_zone)
    first = ev.start.astimezone(tz)
    wall = first.replace(tzinfo=None)
    week0 = wall - timedelta(days=wall.weekday())
    step = 7 * rec.interval
    k = max(0, ((lo - ev.start).days - 8) // step)
    while True:
        week = week0 + timedelta(days=k * step)
        if week.replace(tzinfo=tz).astimezone(UTC) >= hi + timedelta(days=1):
            return
        for d in rec.days:
            local = week + timedelta(days=d)
            if local < wall or (rec.until is not None and local.date() > rec.until):
                continue
            utc = local.replace(tzinfo=tz).astimezone(UTC)
            if lo <= utc < hi:
                yield utc
        if rec.until is not None and week.date() > rec.until:
            return
        k += 1


def _instance(ev: SimEvent, orig: datetime) -> Instance | None:
    o = ev.overrides.get(orig)
    if o is not None and o.deleted:
        return None
    length = ev.end - ev.start
    if o is not None and (o.start or o.subject is not None or o.body is not None or o.attendees is not None):
        return Instance(occurrence_id(ev.id, orig), ev, "exception", o.start or orig, o.end or orig + length, orig, o)
    return Instance(occurrence_id(ev.id, orig), ev, "occurrence", orig, orig + length, orig, None)


def expand(ev: SimEvent, lo: datetime, hi: datetime) -> list[Instance]:
    """The event's instances overlapping [lo, hi): itself, or the series' occurrences with exceptions applied."""
    if ev.recurrence is None:
        return (
            [Instance(ev.id, ev, "singleInstance", ev.start, ev.end, None, None)]
            if ev.start < hi and ev.end > lo
            else []
        )
    length = ev.end - ev.start
    margin = max([length, *((abs(o.start - k) + length) for k, o in ev.overrides.items() if o.start)])
    out = []
    for orig in _originals(ev, lo - margin - timedelta(days=1), hi + margin + timedelta(days=1)):
        inst = _instance(ev, orig)
        if inst is not None and inst.start < hi and inst.end > lo:
            out.append(inst)
    return out


# ---------------------------------------------------------------------------------------------- generation
def _join_url(rng: random.Random) -> str:
    thread = base64.urlsafe_b64encode(rng.getrandbits(144).to_bytes(18, "big")).decode().rstrip("=")
    return (
        f"https://teams.microsoft.com/l/meetup-join/19%3ameeting_{thread}%40thread.v2/0?context=%7b%22Tid"
        f"%22%3a%22{uuid.UUID(int=rng.getrandbits(128))}%22%7d"
    )


def _event_id(rng: random.Random) -> str:
    return "AAMkAGEv" + base64.urlsafe_b64encode(rng.getrandbits(240).to_bytes(30, "big")).decode() + "AAA="


class _Gen:
    def __init__(self, rng: random.Random, tenant: SimTenant, user: SimUser, world: World):
        from simulators.world import FREE_MAIL_DOMAINS, website_domain

        crm = world.crm[tenant.tid]
        self.rng, self.user, self.tenant, self.now = rng, user, tenant, world.now
        self.me = Attendee(user.display_name, user.upn, "organizer")
        self.colleagues = [Attendee(u.display_name, u.upn) for u in tenant.users if u.oid != user.oid] or [
            Attendee("Team Room", f"room1@{tenant.domains[0]}", type="resource")
        ]
        self.contacts = [Attendee(f"{c.first_name} {c.last_name}", c.email) for c in crm.contacts]
        self.leads = [Attendee(f"{x.first_name} {x.last_name}", x.email) for x in crm.leads if not x.is_converted]
        self.account_doms = [
            d
            for a in crm.accounts
            if (d := website_domain(a.website)) and d not in FREE_MAIL_DOMAINS and d not in tenant.domains
        ]

    def _respond(self, a: Attendee) -> Attendee:
        resp = self.rng.choice(("accepted", "accepted", "tentativelyAccepted", "declined", "none"))
        return replace(a, response=resp, type=self.rng.choice(("required", "required", "optional")))

    def make(self, kind: str, start: datetime, recurring: bool = False) -> SimEvent:
        rng = self.rng
        subject = f"{rng.choice(_MEETING_TOPICS)} - {rng.randint(100, 999)}"
        if kind in ("customer_call", "external"):
            others = rng.sample(self.contacts, k=min(len(self.contacts), rng.randint(1, 2)))
            if rng.random() < 0.3 and self.account_doms:
                dom = rng.choice(self.account_doms)
                others.append(Attendee("New Person", f"new.person{rng.randint(1, 9999)}@{dom}"))
        elif kind == "lead":
            others = [rng.choice(self.leads or self.contacts)]
        elif kind == "stranger":
            others = [
                Attendee(
                    "A Stranger",
                    f"{rng.choice(('kim', 'lou', 'max'))}{rng.randint(1, 999)}@stranger{rng.randint(1, 99999)}.org",
                )
            ]
        elif kind in ("standup", "internal"):
            others = list(self.colleagues)
            subject = "Daily stand-up" if kind == "standup" else f"Internal: {subject}"
        elif kind == "private":
            others = [rng.choice(self.contacts)] if rng.random() < 0.5 and self.contacts else []
            subject = rng.choice(("Doctor", "Parent evening", "Bank appointment", "Lunch with a friend"))
        else:
            raise ValueError(f"unknown event kind {kind!r}")
        organizer = self.me
        if kind in ("customer_call", "external", "lead", "stranger") and rng.random() < 0.4:
            organizer = replace(others[0], response="organizer")
            others = [replace(self.me, response="none"), *others[1:]]
        if kind != "private" and rng.random() < 0.25:
            others.append(rng.choice(self.colleagues))
        attendees = [
            self._respond(a)
            if a.address != self.user.upn
            else replace(a, response=rng.choice(("accepted", "tentativelyAccepted", "none")))
            for a in others
        ]
        length = timedelta(minutes=15 if kind == "standup" else rng.choice((30, 30, 45, 60)))
        ical = f"{_ICAL_HEAD}00000000{uuid.UUID(int=rng.getrandbits(128)).hex.upper()}"
        ev = SimEvent(
            id=_event_id(rng),
            owner_oid=self.user.oid,
            ical_uid=ical,
            subject=subject,
            body=f"Agenda: {subject.lower()}.\nMy notes: budget looks tight, ask about timeline.",
            start=start,
            end=start + length,
            time_zone=rng.choice(tuple(WINDOWS_TZ)),
            organizer=organizer,
            attendees=attendees,
            kind=kind,
            created=self.now - timedelta(days=rng.randint(1, 90)),
        )
        if kind == "private":
            ev.sensitivity = "private"
        elif kind != "standup" and rng.random() < 0.5:
            ev.is_online, ev.join_url = True, _join_url(rng)
        if recurring or kind == "standup":
            tz = _zone(ev.time_zone)
            local = start.astimezone(tz)
            days = (0, 1, 2, 3, 4) if kind == "standup" else (local.weekday(),)
            span = rng.choice((None, 180, 300, 420))
            until = None if span is None else (local + timedelta(days=span)).date()
            ev.recurrence = Recurrence(interval=1 if kind == "standup" else rng.choice((1, 2)), days=days, until=until)
            if kind == "standup":  # a Monday
                ev.start = local.replace(tzinfo=None) - timedelta(days=local.weekday())
                ev.start = ev.start.replace(tzinfo=tz).astimezone(UTC)
                ev.end = ev.start + length
        return ev

    def start_at(self, lo_days: int, hi_days: int) -> datetime:
        """A weekday start between now + lo_days and now + hi_days at a business hour (UTC)."""
        rng = self.rng
        while True:  # weekdays only
            day = self.now + timedelta(days=rng.randint(lo_days, hi_days))
            if day.weekday() < 5:
                return day.replace(hour=rng.randint(7, 16), minute=rng.choice((0, 30)), second=0, microsecond=0)


def generate_calendars(world: World) -> Calendars:
    """Calendars (events in about [now - 30 days, now + 13 months]) and Teams for every user of `world`.

    Per user: 3 recurring customer calls (weekly/biweekly, CRM contacts or account-domain attendees; the first one
    with a moved and a cancelled future occurrence), a weekday stand-up series (internal), 6 one-off external meetings
    with contacts, 2 with leads, 2 with strangers only, 2 internal meetings, 2 private appointments (some with CRM
    contacts), 1 meeting the organizer cancelled (isCancelled copy) — about half the external ones online (Teams)."""
    rng = random.Random(f"{world.seed}:calendars")
    cal = Calendars(world=world, rng=rng)
    for tenant in world.tenants:
        for user in tenant.users:
            gen = _Gen(rng, tenant, user, world)
            evs: list[SimEvent] = []
            for i in range(3):
                ev = gen.make("customer_call", gen.start_at(-30, -8 + i), recurring=True)
                if i == 0:
                    origs = list(_originals(ev, world.now + timedelta(days=10), world.now + timedelta(days=120)))
                    moved, cancelled = origs[0], origs[2]
                    ev.overrides[moved] = Override(
                        start=moved + timedelta(days=1, hours=1),
                        end=moved + timedelta(days=1, hours=1) + (ev.end - ev.start),
                    )
                    ev.overrides[cancelled] = Override(deleted=True)
                evs.append(ev)
            evs.append(gen.make("standup", gen.start_at(-24, -20)))
            plan = [("external", 6), ("lead", 2), ("stranger", 2), ("internal", 2), ("private", 2)]
            for kind, n in plan:
                evs += [gen.make(kind, gen.start_at(-30, 395)) for _ in range(n)]
            gone = gen.make("external", gen.start_at(5, 60))
            if (gone.organizer.address or "").lower() == user.upn.lower():  # an attendee's copy of a cancellation
                gone.organizer = replace(gone.attendees[0], response="organizer")
                gone.attendees = [replace(gen.me, response="accepted"), *gone.attendees[1:]]
            gone.is_cancelled, gone.subject = True, f"Canceled: {gone.subject}"
            evs.append(gone)
            cal.events[user.oid] = evs
        cal.teams += _teams(rng, tenant)
    return cal


def _teams(rng: random.Random, tenant: SimTenant) -> list[SimTeam]:
    oids = [u.oid for u in tenant.users]
    teams = []
    for name, members in (
        ("Sales", oids),
        ("Customer Success", oids[: max(1, len(oids) - 1)]),
        ("Leadership", oids[:1]),
    ):

        def cid() -> str:
            return f"19:{uuid.UUID(int=rng.getrandbits(128)).hex}@thread.tacv2"

        channels = [
            SimChannel(cid(), "General", "standard"),
            SimChannel(cid(), "Deals", "standard"),
            SimChannel(cid(), "Key accounts", "private", frozenset(members[:1])),
            SimChannel(cid(), "Partner room", "shared", frozenset(members[-1:])),
        ]
        teams.append(
            SimTeam(
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                tenant.tid,
                f"{tenant.name} {name}",
                f"{name} team of {tenant.name}",
                frozenset(members),
                channels,
            )
        )
    return teams
