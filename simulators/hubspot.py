"""A HubSpot portal per world tenant, served over loopback HTTPS: private-app bearer
tokens, CRM v3 object listing with `after` cursors, the search API with its hard 10,000-result cap, deal
pipelines with stage metadata, the v4 associations batch read (`POST /crm/v4/associations/{from}/{to}/batch/read`,
at most 1,000 `inputs`; ids without links come back as 207 `errors` with `OBJECT_NOT_FOUND` /
`crm.associations.NO_ASSOCIATIONS_FOUND`; the first link is labelled Primary), and HubSpot-shaped errors
(`status/message/correlationId/category`). Search never returns archived records.

Mapping of the world's CRM (deterministic, ids are numeric strings in creation order):
- contacts -> contacts (`lifecyclestage=customer`); unconverted leads -> contacts with `lifecyclestage=lead`
  (converted leads are already contacts). Every contact whose world id hashes to 0 mod 3 gets
  `hs_additional_emails` = "<local>.alt@<domain>" of its (stripped) primary address; every one that hashes to
  0 mod 6 additionally gets "<local>@gmail.com" (see `additional_emails`).
- accounts -> companies: `domain` = the bare host of the Website (null without one), `website` as typed; every
  company with a domain whose id hashes to 0 mod 2 gets `hs_additional_domains` = "<stem>-group.com" (and for
  0 mod 4 also "<stem>.eu") (see `additional_domains`).
- opportunities -> deals: pipeline "default" (stage ids appointmentscheduled/…/closedwon/closedlost) or a custom
  pipeline "75e28846" with numeric stage ids; `hs_is_closed` "true"/"false", `createdate`, associations to the
  company. Contacts carry an association to their company.

Every property value is a string or null. Knobs for tests: `token_for(tid)`, `expire_tokens()`,
`throttle(policy, count, after, retry_after)`, `daily_limit`, `burst_limit`, `archive(tid, type, id)`,
`restore(tid, type, id)`, `touch(tid, type, id, **props)`, `create(tid, type, company=None, **props)`,
`associate(tid, type, id, company)`, `add_contacts(tid, n)`, `hs_id(tid, world_id)`, `search_cap` (10,000 by
default), the injected `clock`, and `requests` (a log without tokens). Every change (`touch`, `archive`,
`restore`, `create`, `associate`) sets the last-modified date (`lastmodifieddate` / `hs_lastmodifieddate` and
`updatedAt`) to `clock()`; a deal's `hs_is_closed*` follow its `dealstage` (calculated properties).

Not modelled: OAuth refresh (`/oauth/v1/token`), repeated `properties=` parameters (the shared server keeps only
the first value of a parameter, so send them comma-joined), the 5 req/s search limit, merges, 90-day purge,
search indexing lag, per-input paging of the v4 batch read (records here have at most one company), and removal
of an archived record's associations (links to archived companies stay listed).
"""

from __future__ import annotations

import bisect
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from simulators import server
from simulators.server import Handler, Request, Response, SimServer, wrapped_routes
from simulators.static_tokens import StaticTokens
from simulators.tls import SimulatorTLS
from simulators.world import World, website_domain

OBJECT_TYPES = ("contacts", "companies", "deals")
SEARCH_CAP = 10_000  # HubSpot: after + limit beyond this -> 400
LIST_MAX_LIMIT = 100
SEARCH_MAX_LIMIT = 200
DEFAULT_DAILY_MAX = 250_000
DEFAULT_BURST_MAX = 100  # per 10 s (Free/Starter); only enforced when `burst_limit` is set
INTERVAL_MS = 10_000

_MODIFIED_PROP = {"contacts": "lastmodifieddate", "companies": "hs_lastmodifieddate", "deals": "hs_lastmodifieddate"}
_DEFAULT_PROPS = {
    "contacts": ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"),
    "companies": ("createdate", "domain", "hs_lastmodifieddate", "hs_object_id", "name"),
    "deals": (
        "amount",
        "closedate",
        "createdate",
        "dealname",
        "dealstage",
        "hs_lastmodifieddate",
        "hs_object_id",
        "pipeline",
    ),
}
_DATE_PROPS = frozenset({"createdate", "lastmodifieddate", "hs_lastmodifieddate", "closedate"})
_V4_TYPES = {
    "contacts": "contacts",
    "contact": "contacts",
    "0-1": "contacts",
    "companies": "companies",
    "company": "companies",
    "0-2": "companies",
    "deals": "deals",
    "deal": "deals",
    "0-3": "deals",
}
# HUBSPOT_DEFINED association type ids: (primary, unlabeled) per (from, to)
_V4_TYPE_IDS = {
    ("contacts", "companies"): (1, 279),
    ("deals", "companies"): (5, 341),
    ("companies", "contacts"): (2, 280),
    ("companies", "deals"): (6, 342),
}
ASSOC_BATCH_MAX = 1_000
_ASSOC_TYPE = {
    ("contacts", "companies"): "contact_to_company",
    ("deals", "companies"): "deal_to_company",
    ("companies", "contacts"): "company_to_contact",
    ("companies", "deals"): "company_to_deal",
}

# (pipeline id, label, [(stage id, label, isClosed, probability)])
PIPELINES: tuple[tuple[str, str, tuple[tuple[str, str, bool, str], ...]], ...] = (
    (
        "default",
        "Sales Pipeline",
        (
            ("appointmentscheduled", "Appointment Scheduled", False, "0.2"),
            ("qualifiedtobuy", "Qualified To Buy", False, "0.4"),
            ("contractsent", "Contract Sent", False, "0.9"),
            ("closedwon", "Closed Won", True, "1.0"),
            ("closedlost", "Closed Lost", True, "0.0"),
        ),
    ),
    (
        "75e28846",
        "Renewals",
        (
            ("1001", "Renewal due", False, "0.5"),
            ("1002", "Renewed", True, "1.0"),
            ("1003", "Churned", True, "0.0"),
        ),
    ),
)


_STAGES = {(pid, stage[0]): stage for pid, _, stages in PIPELINES for stage in stages}


def _stable(text: str, modulo: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % modulo


def hs_datetime(value: datetime) -> str:
    """HubSpot's wire format: ISO-8601 UTC with milliseconds and a Z."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def _parse_dt(value: str) -> datetime:
    if value.lstrip("-").isdigit():
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def additional_emails(record_id: str, email: str | None) -> list[str]:
    """The secondary addresses the simulator gives a world contact/lead (documented in the module docstring)."""
    address = (email or "").strip()
    local, at, domain = address.partition("@")
    if not at or not local or not domain or _stable(record_id, 3):
        return []
    extra = [f"{local}.alt@{domain}"]
    if _stable(record_id, 6) == 0:
        extra.append(f"{local}@gmail.com")
    return extra


def additional_domains(record_id: str, domain: str | None) -> list[str]:
    """The extra company domains the simulator gives a world account."""
    if not domain or _stable(record_id, 2):
        return []
    stem = domain.split(".", 1)[0]
    extra = [f"{stem}-group.com"]
    if _stable(record_id, 4) == 0:
        extra.append(f"{stem}.eu")
    return extra


def _deal_closed_props(props: dict[str, str | None]) -> dict[str, str]:
    """The calculated hs_is_closed / _won / _lost of a deal's pipeline and stage (unknown stage: open)."""
    stage = _STAGES.get((str(props.get("pipeline")), str(props.get("dealstage"))))
    closed = bool(stage and stage[2])
    won = closed and stage is not None and stage[3] == "1.0"
    return {
        "hs_is_closed": "true" if closed else "false",
        "hs_is_closed_won": "true" if won else "false",
        "hs_is_closed_lost": "true" if closed and not won else "false",
    }


@dataclass
class _Rec:
    id: str
    props: dict[str, str | None]
    created: datetime
    updated: datetime
    archived: bool = False
    archived_at: datetime | None = None
    assoc: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class LoggedRequest(server.LoggedRequest):
    portal_tid: str | None = None
    query: dict[str, str] | None = None
    body: Any = None
    policy: str | None = None


def _error(status: int, message: str, category: str, **extra: Any) -> Response:
    body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category, **extra}
    return Response(status, body)


class HubSpotSimulator(SimServer):
    def __init__(
        self,
        world: World,
        tls: SimulatorTLS,
        port: int = 0,
        page_limit_default: int = 10,
        clock: Callable[[], float] = time.time,
        search_cap: int = SEARCH_CAP,
    ):
        self.world = world
        self.page_limit_default = page_limit_default
        self.clock = clock
        self.search_cap = search_cap
        self.daily_limit: int | None = None  # None: DEFAULT_DAILY_MAX in headers, never enforced
        self.burst_limit: int | None = None  # requests per rolling 10 s of `clock`; None: not enforced
        self.requests: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._tokens = StaticTokens(lambda: "pat-na1-" + str(uuid.UUID(bytes=secrets.token_bytes(16))))
        self._objects: dict[str, dict[str, dict[str, _Rec]]] = {}
        self._order: dict[str, dict[str, list[int]]] = {}
        self._ids: dict[str, dict[str, str]] = {}  # tid -> world id -> hubspot id
        self._next_id: dict[str, int] = {}
        self._daily_used: dict[str, int] = {}
        self._recent: dict[str, list[float]] = {}
        self._throttles: list[list[Any]] = []  # [policy, remaining (None = until cleared), skip, retry_after]
        for t in world.tenants:
            self._build_portal(t.tid)
            self._tokens.issue(t.tid)
        routes = [
            ("GET", r"/crm/v3/objects/(?P<type>contacts|companies|deals)/?", self._list),
            ("GET", r"/crm/v3/objects/(?P<type>contacts|companies|deals)/(?P<id>\d+)", self._get_one),
            ("POST", r"/crm/v3/objects/(?P<type>contacts|companies|deals)/search", self._search),
            ("GET", r"/crm/v3/pipelines/deals/?", self._pipelines),
            ("POST", r"/crm/v4/associations/(?P<from>[\w-]+)/(?P<to>[\w-]+)/batch/read", self._assoc_batch_read),
        ]
        super().__init__(tls, wrapped_routes(routes, self._wrap, self._not_found), port=port, name="hubspot-sim")

    # ------------------------------------------------------------------------------------------- portal data
    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC).replace(microsecond=0)

    def _add(
        self,
        tid: str,
        otype: str,
        props: dict[str, str | None],
        created: datetime,
        updated: datetime,
        world_id: str | None = None,
    ) -> _Rec:
        hs_id = str(self._next_id[tid])
        self._next_id[tid] += 1
        props = {
            **props,
            "hs_object_id": hs_id,
            "createdate": hs_datetime(created),
            _MODIFIED_PROP[otype]: hs_datetime(updated),
        }
        rec = _Rec(hs_id, props, created, updated)
        self._objects[tid][otype][hs_id] = rec
        self._order[tid][otype].append(int(hs_id))
        if world_id is not None:
            self._ids[tid][world_id] = hs_id
        return rec

    def _build_portal(self, tid: str) -> None:
        crm, now = self.world.crm[tid], self.world.now
        self._objects[tid] = {o: {} for o in OBJECT_TYPES}
        self._order[tid] = {o: [] for o in OBJECT_TYPES}
        self._ids[tid] = {}
        self._next_id[tid] = 101 + _stable(tid, 1000) * 1000
        self._daily_used[tid] = 0
        self._recent[tid] = []

        def stamps(record_id: str) -> tuple[datetime, datetime]:
            created = now - timedelta(days=30 + _stable(record_id, 400), minutes=_stable(record_id + "m", 1440))
            return created, min(now, created + timedelta(days=_stable(record_id + "s", 30)))

        for a in crm.accounts:
            domain = website_domain(a.website)
            extra = additional_domains(a.id, domain)
            props = {
                "name": a.name,
                "domain": domain,
                "website": a.website,
                "hs_additional_domains": ";".join(extra) or None,
            }
            self._add(tid, "companies", props, *stamps(a.id), world_id=a.id)
        people = [(c.id, c.first_name, c.last_name, c.email, c.account_id, "customer") for c in crm.contacts]
        people += [(x.id, x.first_name, x.last_name, x.email, None, "lead") for x in crm.leads if not x.is_converted]
        for wid, first, last, email, account_id, stage in people:
            extra = additional_emails(wid, email)
            props = {
                "firstname": first,
                "lastname": last,
                "email": email,
                "lifecyclestage": stage,
                "hs_additional_emails": ";".join(extra) or None,
            }
            rec = self._add(tid, "contacts", props, *stamps(wid), world_id=wid)
            if account_id and account_id in self._ids[tid]:
                company = self._ids[tid][account_id]
                rec.assoc["companies"] = [company]
                rec.props["associatedcompanyid"] = company
                self._objects[tid]["companies"][company].assoc.setdefault("contacts", []).append(rec.id)
        for o in crm.opportunities:
            pipeline_id, _, stages = PIPELINES[_stable(o.id + "p", 2)]
            open_stages = [s for s in stages if not s[2]]
            closed_stages = [s for s in stages if s[2]]
            candidates = closed_stages if o.is_closed else open_stages
            stage = candidates[_stable(o.id + "s", len(candidates))]
            won = stage[2] and stage[3] == "1.0"
            props = {
                "dealname": o.name,
                "pipeline": pipeline_id,
                "dealstage": stage[0],
                "hs_is_closed": "true" if o.is_closed else "false",
                "hs_is_closed_won": "true" if won else "false",
                "hs_is_closed_lost": "true" if o.is_closed and not won else "false",
                "closedate": hs_datetime(o.created + timedelta(days=45)),
                "amount": "1500.00",
            }
            rec = self._add(tid, "deals", props, o.created, min(now, o.created + timedelta(days=1)), world_id=o.id)
            if o.account_id in self._ids[tid]:
                company = self._ids[tid][o.account_id]
                rec.assoc["companies"] = [company]
                self._objects[tid]["companies"][company].assoc.setdefault("deals", []).append(rec.id)

    # ------------------------------------------------------------------------------------------- test knobs
    def token_for(self, tid: str) -> str:
        """The portal's current private-app token (a fresh one after `expire_tokens()`)."""
        return self._tokens.current(tid)

    def expire_tokens(self) -> None:
        """Every token issued so far answers 401 EXPIRED_AUTHENTICATION; `token_for` gives new ones."""
        with self._lock:
            self._tokens.expire_all()

    def throttle(
        self,
        policy: str = "TEN_SECONDLY_ROLLING",
        count: int | None = 1,
        after: int = 0,
        retry_after: int | None = None,
    ) -> None:
        """After `after` more requests, the next `count` (None: all until `clear_throttles()`) answer 429."""
        with self._lock:
            self._throttles.append([policy, count, after, retry_after])

    def clear_throttles(self) -> None:
        with self._lock:
            self._throttles.clear()

    def hs_id(self, tid: str, world_id: str) -> str:
        return self._ids[tid][world_id]

    def record(self, tid: str, object_type: str, record_id: str) -> _Rec:
        return self._objects[tid][object_type][self._ids[tid].get(record_id, record_id)]

    def archive(self, tid: str, object_type: str, record_id: str) -> None:
        """Delete (archive) a record: it leaves lists and search, and shows up with `archived=true`."""
        with self._lock:
            rec = self.record(tid, object_type, record_id)
            rec.archived, rec.archived_at = True, self._now()
            self._modified(object_type, rec)

    def restore(self, tid: str, object_type: str, record_id: str) -> None:
        with self._lock:
            rec = self.record(tid, object_type, record_id)
            rec.archived, rec.archived_at = False, None
            self.touch(tid, object_type, record_id)

    def touch(self, tid: str, object_type: str, record_id: str, **props: str | None) -> None:
        """Update properties; the last-modified date becomes `clock()` (a deal's hs_is_closed* follow its stage)."""
        with self._lock:
            rec = self.record(tid, object_type, record_id)
            rec.props.update(props)
            if object_type == "deals" and "dealstage" in props:
                rec.props.update(_deal_closed_props(rec.props))
            self._modified(object_type, rec)

    def create(self, tid: str, object_type: str, company: str | None = None, **props: str | None) -> str:
        """A new record created and modified at `clock()`, linked to `company` (HubSpot or world id) when
        given; returns its HubSpot id. Deals default to the default pipeline's first stage."""
        with self._lock:
            now = self._now()
            if object_type == "deals":
                props = {"pipeline": "default", "dealstage": "appointmentscheduled", "amount": "1500.00", **props}
                props.update(_deal_closed_props(props))
            rec = self._add(tid, object_type, dict(props), now, now)
            if company is not None:
                self._link(tid, object_type, rec, company)
            return rec.id

    def associate(self, tid: str, object_type: str, record_id: str, company: str | None) -> None:
        """Make `company` (HubSpot or world id; None: no company) the only company of a contact or deal. The
        record's last-modified date becomes `clock()` (for contacts `associatedcompanyid` changes; that a deal's
        `hs_lastmodifieddate` moves on an association change is an assumption [U])."""
        with self._lock:
            rec = self.record(tid, object_type, record_id)
            for old in rec.assoc.pop("companies", []):
                back = self._objects[tid]["companies"][old].assoc.get(object_type, [])
                if rec.id in back:
                    back.remove(rec.id)
            if object_type == "contacts":
                rec.props["associatedcompanyid"] = None
            if company is not None:
                self._link(tid, object_type, rec, company)
            self._modified(object_type, rec)

    def _link(self, tid: str, object_type: str, rec: _Rec, company: str) -> None:
        target = self.record(tid, "companies", company)
        rec.assoc["companies"] = [target.id]
        target.assoc.setdefault(object_type, []).append(rec.id)
        if object_type == "contacts":
            rec.props["associatedcompanyid"] = target.id

    def _modified(self, object_type: str, rec: _Rec) -> None:
        rec.updated = self._now()
        rec.props[_MODIFIED_PROP[object_type]] = hs_datetime(rec.updated)

    def add_contacts(self, tid: str, n: int, domain: str = "bulk.example.com") -> list[str]:
        """`n` synthetic contacts created and modified at `clock()`; returns their ids."""
        with self._lock:
            now = self._now()
            start = self._next_id[tid]
            return [
                self._add(
                    tid,
                    "contacts",
                    {
                        "firstname": "Bulk",
                        "lastname": str(start + i),
                        "email": f"bulk{start + i}@{domain}",
                        "lifecyclestage": "customer",
                        "hs_additional_emails": None,
                    },
                    now,
                    now,
                ).id
                for i in range(n)
            ]

    # ------------------------------------------------------------------------------------------- plumbing
    def _wrap(self, handler: Callable[[Request, str], tuple[Response, str | None]]) -> Handler:
        def wrapped(req: Request) -> Response:
            with self._lock:
                tid, resp, policy = self._gate(req)
                if resp is None:
                    resp, _ = handler(req, tid)  # type: ignore[arg-type]  # tid is set when resp is None
                body = req.json_or_none() if req.method == "POST" else None
                self.requests.append(
                    LoggedRequest(req.method, req.path, resp.status, tid, dict(req.query), body, policy)
                )
                if (
                    tid is not None
                    and req.path.startswith(("/crm/v3/objects", "/crm/v4/"))
                    and not req.path.endswith("search")
                ):
                    resp.headers.update(self._limit_headers(tid))
                return resp

        return wrapped

    def _limit_headers(self, tid: str) -> dict[str, str]:
        daily = self.daily_limit if self.daily_limit is not None else DEFAULT_DAILY_MAX
        burst = self.burst_limit if self.burst_limit is not None else DEFAULT_BURST_MAX
        recent = len(self._recent[tid])
        return {
            "X-HubSpot-RateLimit-Daily": str(daily),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, daily - self._daily_used[tid])),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(INTERVAL_MS),
            "X-HubSpot-RateLimit-Max": str(burst),
            "X-HubSpot-RateLimit-Remaining": str(max(0, burst - recent)),
            "X-HubSpot-RateLimit-Secondly": str(burst // 10),
            "X-HubSpot-RateLimit-Secondly-Remaining": str(max(0, burst // 10 - recent)),
        }

    def _rate_limited(self, tid: str, policy: str, retry_after: int | None) -> Response:
        messages = {
            "DAILY": "You have reached your daily limit.",
            "SECONDLY": "You have reached your secondly limit.",
            "TEN_SECONDLY_ROLLING": "You have reached your ten_secondly_rolling limit.",
        }
        resp = _error(
            429,
            messages.get(policy, "You have reached your limit."),
            "RATE_LIMITS",
            errorType="RATE_LIMIT",
            policyName=policy,
            requestId=str(uuid.uuid4()),
        )
        resp.body.pop("category")  # type: ignore[union-attr]  # 429 bodies carry errorType, not category
        resp.headers.update(self._limit_headers(tid))
        if retry_after is not None:
            resp.headers["Retry-After"] = str(retry_after)
        return resp

    def _gate(self, req: Request) -> tuple[str | None, Response | None, str | None]:
        """Authenticate and apply rate limits: (tid, error response or None, 429 policy or None)."""
        auth = req.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if self._tokens.is_expired(token):
            expired_at = self._now()
            return (
                None,
                _error(
                    401,
                    "The OAuth token used to make this call expired 0 second(s) ago.",
                    "EXPIRED_AUTHENTICATION",
                    context={"expire time": [hs_datetime(expired_at)]},
                ),
                None,
            )
        tid = self._tokens.tenant(token)
        if tid is None:
            return (
                None,
                _error(
                    401,
                    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can "
                    "find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                    "INVALID_AUTHENTICATION",
                ),
                None,
            )
        for t in self._throttles:
            if t[2] > 0:
                t[2] -= 1
                continue
            if t[1] is not None:
                t[1] -= 1
                if t[1] <= 0:
                    self._throttles.remove(t)
            return tid, self._rate_limited(tid, t[0], t[3]), t[0]
        if self.daily_limit is not None and self._daily_used[tid] >= self.daily_limit:
            return tid, self._rate_limited(tid, "DAILY", None), "DAILY"
        now = self.clock()
        recent = self._recent[tid] = [t for t in self._recent[tid] if now - t < INTERVAL_MS / 1000]
        if self.burst_limit is not None and len(recent) >= self.burst_limit:
            return tid, self._rate_limited(tid, "TEN_SECONDLY_ROLLING", None), "TEN_SECONDLY_ROLLING"
        recent.append(now)
        self._daily_used[tid] += 1
        return tid, None, None

    # ------------------------------------------------------------------------------------------- shapes
    def _shape(self, otype: str, rec: _Rec, props: list[str] | None, assoc: list[str]) -> dict[str, Any]:
        wanted = props if props else list(_DEFAULT_PROPS[otype])
        out: dict[str, Any] = {
            "id": rec.id,
            "properties": {p: rec.props.get(p) for p in wanted if p in rec.props or p in _DEFAULT_PROPS[otype]},
            "createdAt": hs_datetime(rec.created),
            "updatedAt": hs_datetime(rec.updated),
            "archived": rec.archived,
        }
        if rec.archived and rec.archived_at is not None:
            out["archivedAt"] = hs_datetime(rec.archived_at)
        links = {a: rec.assoc[a] for a in assoc if rec.assoc.get(a)}
        if links:
            out["associations"] = {
                a: {"results": [{"id": i, "type": _ASSOC_TYPE.get((otype, a), "unknown")} for i in ids]}
                for a, ids in links.items()
            }
        return out

    @staticmethod
    def _csv(value: Any) -> list[str]:
        if isinstance(value, list):
            return [str(v).strip() for v in value if str(v).strip()]
        return [p.strip() for p in str(value or "").split(",") if p.strip()]

    def _limit(self, raw: Any, maximum: int) -> int | None:
        if raw in (None, ""):
            return self.page_limit_default
        try:
            value = int(raw)
        except (TypeError, ValueError):
            return None
        return max(1, min(maximum, value))

    # ------------------------------------------------------------------------------------------- handlers
    def _list(self, req: Request, tid: str) -> tuple[Response, str | None]:
        assert req.match is not None
        otype = req.match["type"]
        limit = self._limit(req.query.get("limit"), LIST_MAX_LIMIT)
        if limit is None:
            return _error(400, "Invalid input JSON on line 1", "VALIDATION_ERROR"), tid
        archived = req.query.get("archived", "false").lower() == "true"
        after = req.query.get("after") or "0"
        if not after.isdigit():
            return _error(400, f"Invalid after value: {after}", "VALIDATION_ERROR"), tid
        props, assoc = self._csv(req.query.get("properties")), self._csv(req.query.get("associations"))
        order, objects = self._order[tid][otype], self._objects[tid][otype]
        results: list[dict[str, Any]] = []
        i = bisect.bisect_left(order, int(after))
        while i < len(order) and len(results) < limit:
            rec = objects[str(order[i])]
            if rec.archived == archived:
                results.append(self._shape(otype, rec, props, assoc))
            i += 1
        while i < len(order) and objects[str(order[i])].archived != archived:
            i += 1
        body: dict[str, Any] = {"results": results}
        if i < len(order):
            nxt = str(order[i])
            query = f"limit={limit}&after={nxt}" + (f"&properties={','.join(props)}" if props else "")
            body["paging"] = {"next": {"after": nxt, "link": f"{req.base_url}/crm/v3/objects/{otype}?{query}"}}
        return Response(200, body), tid

    def _get_one(self, req: Request, tid: str) -> tuple[Response, str | None]:
        assert req.match is not None
        otype, rid = req.match["type"], req.match["id"]
        rec = self._objects[tid][otype].get(rid)
        archived = req.query.get("archived", "false").lower() == "true"
        if rec is None or rec.archived != archived:
            return _error(404, "Object not found.", "OBJECT_NOT_FOUND"), tid
        props, assoc = self._csv(req.query.get("properties")), self._csv(req.query.get("associations"))
        return Response(200, self._shape(otype, rec, props, assoc)), tid

    @staticmethod
    def _value(prop: str, raw: str | None) -> Any:
        if raw is None:
            return None
        if prop in _DATE_PROPS:
            return _parse_dt(raw)
        if prop == "hs_object_id":
            return int(raw)
        return raw.lower()

    def _matches(self, rec: _Rec, f: dict[str, Any]) -> bool:
        prop, op = f.get("propertyName", ""), str(f.get("operator", "EQ")).upper()
        have = self._value(prop, rec.props.get(prop))
        if op == "HAS_PROPERTY":
            return have is not None
        if op == "NOT_HAS_PROPERTY":
            return have is None
        if op == "IN":
            return have is not None and have in {self._value(prop, str(v)) for v in f.get("values", [])}
        if op == "NOT_IN":
            return have is None or have not in {self._value(prop, str(v)) for v in f.get("values", [])}
        if op == "BETWEEN":
            lo, hi = self._value(prop, str(f.get("value"))), self._value(prop, str(f.get("highValue")))
            return have is not None and lo <= have <= hi
        want = self._value(prop, str(f.get("value")))
        if op == "EQ":
            return have == want
        if op == "NEQ":
            return have != want
        if have is None:
            return False
        return {"GT": have > want, "GTE": have >= want, "LT": have < want, "LTE": have <= want}[op]

    def _search(self, req: Request, tid: str) -> tuple[Response, str | None]:
        assert req.match is not None
        otype = req.match["type"]
        try:
            body = req.json() or {}
        except ValueError:
            return _error(400, "Invalid input JSON on line 1", "VALIDATION_ERROR"), tid
        groups = body.get("filterGroups") or []
        if (
            len(groups) > 5
            or sum(len(g.get("filters") or []) for g in groups) > 25
            or any(len(g.get("filters") or []) > 10 for g in groups)
        ):
            return _error(400, "Too many filters or filter groups", "VALIDATION_ERROR"), tid
        limit = self._limit(body.get("limit"), SEARCH_MAX_LIMIT)
        after = str(body.get("after") or "0")
        if limit is None or not after.isdigit():
            return _error(400, "Invalid input JSON on line 1", "VALIDATION_ERROR"), tid
        offset = int(after)
        if offset + limit > self.search_cap:
            return _error(
                400,
                "There was a problem with the request.",
                "VALIDATION_ERROR",
                subCategory="SEARCH_PAGING_LIMIT",
                errors=[
                    {
                        "message": f"The maximum number of results accessible via search is "
                        f"{self.search_cap}. Refine your filters to narrow the results."
                    }
                ],
            ), tid
        try:
            hits = [
                r
                for r in self._objects[tid][otype].values()
                if not r.archived
                and (not groups or any(all(self._matches(r, f) for f in g.get("filters") or []) for g in groups))
            ]
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"Invalid filter: {type(exc).__name__}", "VALIDATION_ERROR"), tid
        for s in reversed(body.get("sorts") or [{"propertyName": "hs_object_id", "direction": "ASCENDING"}]):
            prop = s.get("propertyName", "hs_object_id") if isinstance(s, dict) else str(s)
            desc = isinstance(s, dict) and str(s.get("direction", "")).upper() == "DESCENDING"
            present = [r for r in hits if r.props.get(prop) is not None]
            missing = [r for r in hits if r.props.get(prop) is None]
            present.sort(key=lambda r, p=prop: self._value(p, r.props.get(p)), reverse=desc)
            hits = present + missing
        page = hits[offset : offset + limit]
        out: dict[str, Any] = {
            "total": len(hits),
            "results": [self._shape(otype, r, self._csv(body.get("properties")), []) for r in page],
        }
        if offset + limit < len(hits):
            out["paging"] = {"next": {"after": str(offset + limit)}}
        return Response(200, out), tid

    def _pipelines(self, req: Request, tid: str) -> tuple[Response, str | None]:
        created = hs_datetime(self.world.now - timedelta(days=900))
        results = [
            {
                "id": pid,
                "label": label,
                "displayOrder": n,
                "archived": False,
                "createdAt": created,
                "updatedAt": created,
                "stages": [
                    {
                        "id": sid,
                        "label": slabel,
                        "displayOrder": k,
                        "archived": False,
                        "metadata": {"isClosed": "true" if closed else "false", "probability": prob},
                        "createdAt": created,
                        "updatedAt": created,
                    }
                    for k, (sid, slabel, closed, prob) in enumerate(stages)
                ],
            }
            for n, (pid, label, stages) in enumerate(PIPELINES)
        ]
        return Response(200, {"results": results}), tid

    def _assoc_batch_read(self, req: Request, tid: str) -> tuple[Response, str | None]:
        assert req.match is not None
        src, dst = _V4_TYPES.get(req.match["from"].lower()), _V4_TYPES.get(req.match["to"].lower())
        if src is None or dst is None or (src, dst) not in _V4_TYPE_IDS:
            return _error(
                400, f"Unknown object type or association: {req.match['from']} -> {req.match['to']}", "VALIDATION_ERROR"
            ), tid
        try:
            body = req.json() or {}
            ids = [str(i["id"]) for i in body.get("inputs") or []]
        except (ValueError, KeyError, TypeError, AttributeError):
            return _error(400, "Invalid input JSON on line 1", "VALIDATION_ERROR"), tid
        if len(ids) > ASSOC_BATCH_MAX:
            return _error(
                400, f"Batch input of {len(ids)} exceeds the limit of {ASSOC_BATCH_MAX}.", "VALIDATION_ERROR"
            ), tid
        primary, unlabeled = _V4_TYPE_IDS[(src, dst)]
        started = hs_datetime(self._now())
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for rid in dict.fromkeys(ids):
            rec = self._objects[tid][src].get(rid)
            links = rec.assoc.get(dst, []) if rec is not None and not rec.archived else []
            if not links:
                errors.append(
                    {
                        "status": "error",
                        "category": "OBJECT_NOT_FOUND",
                        "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
                        "message": f"No {dst[:-1]} is associated with {src[:-1]} {rid}.",
                        "context": {"fromObjectId": [rid], "fromObjectType": [src[:-1]], "toObjectType": [dst[:-1]]},
                    }
                )
                continue
            to = []
            for n, target in enumerate(links):
                types = [{"category": "HUBSPOT_DEFINED", "typeId": unlabeled, "label": None}]
                if n == 0:
                    types.insert(0, {"category": "HUBSPOT_DEFINED", "typeId": primary, "label": "Primary"})
                to.append({"toObjectId": int(target), "associationTypes": types})
            results.append({"from": {"id": rid}, "to": to})
        out: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": hs_datetime(self._now()),
        }
        if errors:
            out.update(errors=errors, numErrors=len(errors))
        return Response(207 if errors else 200, out), tid

    def _not_found(self, req: Request, tid: str) -> tuple[Response, str | None]:
        return _error(404, f"Unable to route {req.method} request with {req.path}", "OBJECT_NOT_FOUND"), tid
