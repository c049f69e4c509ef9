"""A Pipedrive company per world tenant, served over loopback HTTPS.

API v2 list endpoints `GET /api/v2/{persons,organizations,deals}` with `limit` (default `page_limit_default`,
max 500), an opaque `cursor` (`additional_data.next_cursor`, null on the last page), `updated_since` (>=),
`updated_until` (<), `sort_by` id|update_time|add_time, `sort_direction` asc|desc, and for deals
`status=open,won,lost,deleted` (default: every status but deleted). v1 is not served (the adapter needs none).

Auth: API token in the `x-api-token` header or the legacy `?api_token=` query parameter (`token_for(tid)`);
anything else, and every unknown path, answers Pipedrive's 401 `unauthorized access` body with `x-401-by-gw`.

Mapping from the world's CRM (ids are Pipedrive integers, sequential per kind, in world order; see `ids`):
- persons: contacts, then unconverted leads (a converted lead's person is its contact). `emails[]` holds the
  world address (`primary: true`, label `work`, case/whitespace as typed). Persons whose Pipedrive id is
  divisible by 3 also get a non-primary `home` address from `secondary_email()`; when the id is divisible by 6
  that secondary item is listed first (the primary is not always `emails[0]`).
- organizations: accounts. Pipedrive has no domain field; `website` is present only on organizations for which
  `website_exposed(world_account_id)` holds (about two in three, "when the feature is enabled"), with the
  world's free-text value. The others carry no `website` key at all.
- deals: opportunities. `status` open when not closed, else won/lost (stable hash); `add_time` = created;
  `org_id` = the account's organization; `person_id` = the first contact of that account (or null).

Changes: `create(tid, kind, **fields)` adds a record and `update(tid, kind, id, **fields)` changes one, both with
`update_time` = clock. Deletions: `delete(tid, kind, id)` soft-deletes (`is_deleted: true`, `update_time` =
clock). Deleted persons and organizations stay in the v2 lists with `is_deleted: true` while `deleted_in_lists`
(default True) and disappear when it is False; deleted deals have `status: "deleted"` and are listed only with
`status=deleted`. Soft-deleted records are purged 30 days (by `clock`) after deletion.

Limits (knobs): `burst_limit` requests per token per `burst_window_s` (rolling, by `clock`) → 429
`Request over limit`; `daily_budget` tokens per company per UTC day (`list_cost` per list call) → 429 that
lasts until the next UTC midnight of `clock`; `inject(status, count)` fault queue. Every authenticated answer
carries `x-ratelimit-limit/remaining/reset`. The 429 bodies follow Pipedrive's generic error envelope; their
exact texts and the daily-budget headers are not verified against the live API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from simulators import server
from simulators.server import Handler, Request, Response, SimServer, wrapped_routes
from simulators.static_tokens import StaticTokens
from simulators.tls import SimulatorTLS
from simulators.world import World

KINDS = ("persons", "organizations", "deals")
MAX_LIMIT = 500
PURGE_AFTER = timedelta(days=30)
_FREE = ("gmail.com", "outlook.com", "yahoo.com", "icloud.com")
_SORT_KEYS = ("id", "update_time", "add_time")
_ERROR_INFO = "Please check developers.pipedrive.com"


def _stable(text: str, modulo: int) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % modulo


def website_exposed(world_account_id: str) -> bool:
    """Whether the simulated organization carries a `website` (deterministic, about 2 in 3)."""
    return _stable("website" + world_account_id, 3) != 0


def secondary_email(person_id: int, first_name: str, last_name: str) -> str | None:
    """The non-primary address of a person (ids divisible by 3), mixed case as a user would type it."""
    if person_id % 3:
        return None
    dom = _FREE[person_id % len(_FREE)]
    return f"{first_name}.{last_name}.{person_id}@{dom.capitalize()}"


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class LoggedRequest(server.LoggedRequest):
    tid: str | None = None
    auth: str | None = None  # "header" | "query" | None
    params: tuple[tuple[str, str], ...] = ()


def _error(status: int, error: str, headers: dict[str, str] | None = None) -> Response:
    body = {"success": False, "error": error, "errorCode": status, "error_info": _ERROR_INFO}
    return Response(status, body, dict(headers or {}))


def _unauthorized() -> Response:
    return _error(401, "unauthorized access", {"x-401-by-gw": "true"})


class PipedriveSimulator(SimServer):
    def __init__(
        self,
        world: World,
        tls: SimulatorTLS,
        port: int = 0,
        page_limit_default: int = 100,
        clock: Callable[[], float] = time.time,
        burst_limit: int | None = 80,
        burst_window_s: float = 2.0,
        daily_budget: int | None = None,
        list_cost: int = 10,
        deleted_in_lists: bool = True,
    ):
        self.world = world
        self.page_limit_default = page_limit_default
        self.clock = clock
        self.burst_limit = burst_limit
        self.burst_window_s = burst_window_s
        self.daily_budget = daily_budget
        self.list_cost = list_cost
        self.deleted_in_lists = deleted_in_lists
        self.requests: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._tokens = StaticTokens(lambda: secrets.token_hex(20))
        self._calls: dict[str, deque[float]] = {}  # token -> request times within the burst window
        self._spent: dict[str, tuple[str, int]] = {}  # tid -> (UTC day, tokens spent)
        self._faults: list[list[Any]] = []  # [status, remaining]
        self.ids: dict[str, dict[str, dict[str, int]]] = {}  # tid -> kind -> world id -> Pipedrive id
        self._records: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
        self._deleted_at: dict[tuple[str, str, int], datetime] = {}
        for t in world.tenants:
            self._build(t.tid)
            self._tokens.issue(t.tid)
        routes = [("GET", r"/api/v2/(?P<kind>persons|organizations|deals)/?", self._list)]
        served = wrapped_routes(routes, self._wrap, lambda req, tid: _unauthorized())  # any other path: 401
        super().__init__(tls, served, port=port, name="pipedrive-sim")

    # -- world mapping
    def _build(self, tid: str) -> None:
        crm, now = self.world.crm[tid], self.world.now

        def stamps(world_id: str) -> tuple[str, str]:
            created = now - timedelta(days=30 + _stable(world_id, 400), minutes=_stable(world_id + "m", 1440))
            modified = min(now, created + timedelta(days=_stable(world_id + "s", 30)))
            return _rfc3339(created), _rfc3339(modified)

        ids: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        recs: dict[str, dict[int, dict[str, Any]]] = {k: {} for k in KINDS}
        for n, a in enumerate(crm.accounts, start=1):
            ids["organizations"][a.id] = n
            add, upd = stamps(a.id)
            org: dict[str, Any] = {
                "id": n,
                "name": a.name,
                "owner_id": 1,
                "add_time": add,
                "update_time": upd,
                "is_deleted": False,
                "visible_to": 3,
                "address": None,
                "label_ids": [],
                "custom_fields": {},
            }
            if website_exposed(a.id):
                org["website"] = a.website
            recs["organizations"][n] = org
        people = [(c.id, c.first_name, c.last_name, c.email, c.account_id) for c in crm.contacts]
        people += [(x.id, x.first_name, x.last_name, x.email, None) for x in crm.leads if not x.is_converted]
        first_contact: dict[str, int] = {}
        for n, (wid, first, last, email, account_id) in enumerate(people, start=1):
            ids["persons"][wid] = n
            add, upd = stamps(wid)
            emails = [{"value": email, "primary": True, "label": "work"}]
            second = secondary_email(n, first, last)
            if second is not None:
                item = {"value": second, "primary": False, "label": "home"}
                emails = [item, *emails] if n % 6 == 0 else [*emails, item]
            org_id = ids["organizations"].get(account_id) if account_id else None
            if account_id and org_id is not None:
                first_contact.setdefault(account_id, n)
            recs["persons"][n] = {
                "id": n,
                "name": f"{first} {last}",
                "first_name": first,
                "last_name": last,
                "owner_id": 1,
                "org_id": org_id,
                "add_time": add,
                "update_time": upd,
                "is_deleted": False,
                "visible_to": 3,
                "emails": emails,
                "phones": [],
                "custom_fields": {},
            }
        for n, o in enumerate(crm.opportunities, start=1):
            ids["deals"][o.id] = n
            status = "open"
            if o.is_closed:
                status = "won" if _stable(o.id, 2) == 0 else "lost"
            closed = _rfc3339(o.created + timedelta(days=20)) if o.is_closed else None
            recs["deals"][n] = {
                "id": n,
                "title": o.name,
                "owner_id": 1,
                "person_id": first_contact.get(o.account_id),
                "org_id": ids["organizations"].get(o.account_id),
                "pipeline_id": 1,
                "stage_id": 1 + _stable(o.id + "st", 5),
                "status": status,
                "value": 0,
                "currency": "EUR",
                "add_time": _rfc3339(o.created),
                "update_time": _rfc3339(min(now, o.created + timedelta(days=1))),
                "close_time": closed,
                "won_time": closed if status == "won" else None,
                "lost_time": closed if status == "lost" else None,
                "is_deleted": False,
                "is_archived": False,
                "custom_fields": {},
            }
        self.ids[tid] = ids
        self._records[tid] = recs

    # -- test knobs
    def token_for(self, tid: str) -> str:
        return self._tokens.current(tid)

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (401); `token_for` then gives fresh ones."""
        with self._lock:
            self._tokens.expire_all()

    def inject(self, status: int, count: int = 1) -> None:
        """The next `count` requests answer `status` (429: a burst-limit answer)."""
        with self._lock:
            self._faults.append([status, count])

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def record(self, tid: str, kind: str, pd_id: int) -> dict[str, Any]:
        return self._records[tid][kind][pd_id]

    def delete(self, tid: str, kind: str, pd_id: int) -> None:
        """Soft-delete a record (Pipedrive id) at the simulator clock."""
        with self._lock:
            rec = self._records[tid][kind][pd_id]
            rec["is_deleted"] = True
            rec["update_time"] = _rfc3339(self.now())
            if kind == "deals":
                rec["status"] = "deleted"
            self._deleted_at[(tid, kind, pd_id)] = self.now()

    def create(self, tid: str, kind: str, **fields: Any) -> int:
        """A new record (next Pipedrive id of its kind) added and updated at the simulator clock; `fields` are
        its v2 fields (persons: `name`, `emails`, `org_id`; organizations: `name`, `website`; deals: `title`,
        `org_id`, `status`). Returns its id."""
        with self._lock:
            recs = self._records[tid][kind]
            pd_id = max(recs, default=0) + 1
            now = _rfc3339(self.now())
            rec: dict[str, Any] = {
                "id": pd_id,
                "owner_id": 1,
                "add_time": now,
                "update_time": now,
                "is_deleted": False,
                "visible_to": 3,
                "custom_fields": {},
            }
            if kind == "persons":
                rec.update(name=None, org_id=None, emails=[], phones=[])
            elif kind == "organizations":
                rec.update(name=None, address=None, label_ids=[])
            else:
                rec.update(
                    title=None,
                    person_id=None,
                    org_id=None,
                    pipeline_id=1,
                    stage_id=1,
                    status="open",
                    value=0,
                    currency="EUR",
                    close_time=None,
                    won_time=None,
                    lost_time=None,
                    is_archived=False,
                )
            rec.update(fields)
            recs[pd_id] = rec
            return pd_id

    def update(self, tid: str, kind: str, pd_id: int, **fields: Any) -> None:
        """Change fields of a record; `update_time` becomes the simulator clock."""
        with self._lock:
            rec = self._records[tid][kind][pd_id]
            rec.update(fields)
            rec["update_time"] = _rfc3339(self.now())

    def tokens_spent(self, tid: str) -> int:
        return self._spent.get(tid, ("", 0))[1]

    # -- plumbing
    def _wrap(self, handler: Callable[[Request, str], Response]) -> Handler:
        def wrapped(req: Request) -> Response:
            with self._lock:
                params = tuple(sorted((k, v) for k, v in req.query.items() if k != "api_token"))
                token, how = req.headers.get("x-api-token", ""), "header"
                if not token and req.query.get("api_token"):
                    token, how = req.query["api_token"], "query"
                tid = self._tokens.tenant(token) if token else None
                if tid is None:
                    self.requests.append(LoggedRequest(req.method, req.path, 401, None, how if token else None, params))
                    return _unauthorized()
                resp = self._admit(tid, token)
                if resp is None:
                    resp = handler(req, tid)
                    resp.headers.update(self._rate_headers(token))
                self.requests.append(LoggedRequest(req.method, req.path, resp.status, tid, how, params))
                return resp

        return wrapped

    def _window(self, token: str) -> deque[float]:
        calls = self._calls.setdefault(token, deque())
        now = self.clock()
        while calls and calls[0] <= now - self.burst_window_s:
            calls.popleft()
        return calls

    def _rate_headers(self, token: str) -> dict[str, str]:
        calls = self._window(token)
        limit = self.burst_limit if self.burst_limit is not None else 1000
        reset = self.burst_window_s - (self.clock() - calls[0]) if calls else self.burst_window_s
        return {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(0, limit - len(calls))),
            "x-ratelimit-reset": str(max(1, int(reset + 0.999))),
        }

    def _admit(self, tid: str, token: str) -> Response | None:
        """None when the request may run (counted), else the fault or 429 to answer."""
        if self._faults:
            fault = self._faults[0]
            fault[1] -= 1
            if fault[1] <= 0:
                self._faults.pop(0)
            if fault[0] == 429:
                limit = str(self.burst_limit if self.burst_limit is not None else 1000)
                headers = {"x-ratelimit-limit": limit, "x-ratelimit-remaining": "0", "x-ratelimit-reset": "2"}
                return _error(429, "Request over limit", headers)
            if fault[0] == 401:
                return _unauthorized()
            return _error(fault[0], "Internal server error")
        calls = self._window(token)
        if self.burst_limit is not None and len(calls) >= self.burst_limit:
            return _error(429, "Request over limit", self._rate_headers(token))
        now = self.now()
        day = now.date().isoformat()
        spent_day, spent = self._spent.get(tid, (day, 0))
        if spent_day != day:
            spent = 0
        if self.daily_budget is not None and spent + self.list_cost > self.daily_budget:
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            headers = self._rate_headers(token)
            headers.update(
                {"x-daily-requests-left": "0", "x-daily-budget-reset": str(int((midnight - now).total_seconds()))}
            )
            return _error(429, "Daily API token budget exceeded", headers)
        self._spent[tid] = (day, spent + self.list_cost)
        calls.append(self.clock())
        return None

    def _purge(self, tid: str) -> None:
        cutoff = self.now() - PURGE_AFTER
        for key, when in list(self._deleted_at.items()):
            if key[0] == tid and when < cutoff:
                self._records[tid][key[1]].pop(key[2], None)
                del self._deleted_at[key]

    def _list(self, req: Request, tid: str) -> Response:
        assert req.match is not None
        kind, q = req.match["kind"], req.query
        self._purge(tid)
        try:
            limit = int(q.get("limit") or self.page_limit_default)
            since = _parse_time(q["updated_since"]) if q.get("updated_since") else None
            until = _parse_time(q["updated_until"]) if q.get("updated_until") else None
        except ValueError:
            return _error(400, "Validation failed: invalid parameter")
        if not 1 <= limit <= MAX_LIMIT:
            return _error(400, f"Validation failed: limit: Must be between 1 and {MAX_LIMIT}")
        sort_by = q.get("sort_by") or "id"
        direction = q.get("sort_direction") or "asc"
        if sort_by not in _SORT_KEYS or direction not in ("asc", "desc"):
            return _error(400, "Validation failed: sort_by/sort_direction")
        rows = list(self._records[tid][kind].values())
        if kind == "deals":
            wanted = {s.strip() for s in (q.get("status") or "open,won,lost").split(",") if s.strip()}
            if not wanted <= {"open", "won", "lost", "deleted"}:
                return _error(400, "Validation failed: status")
            rows = [r for r in rows if r["status"] in wanted]
        elif not self.deleted_in_lists:
            rows = [r for r in rows if not r["is_deleted"]]
        if since is not None:
            rows = [r for r in rows if _parse_time(r["update_time"]) >= since]
        if until is not None:
            rows = [r for r in rows if _parse_time(r["update_time"]) < until]

        def key(r: dict[str, Any]) -> tuple[str, int]:
            return ("" if sort_by == "id" else r[sort_by], r["id"])

        rows.sort(key=key, reverse=direction == "desc")
        if q.get("cursor"):
            try:
                state = json.loads(base64.urlsafe_b64decode(q["cursor"].encode()))
                after = (state["v"], int(state["i"]))
                if state["s"] != sort_by or state["d"] != direction:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return _error(400, "Validation failed: cursor: Invalid cursor")
            rows = [r for r in rows if (key(r) < after if direction == "desc" else key(r) > after)]
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = key(page[-1])
            state = {"s": sort_by, "d": direction, "v": last[0], "i": last[1]}
            next_cursor = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
        body = {"success": True, "data": [dict(r) for r in page], "additional_data": {"next_cursor": next_cursor}}
        return Response(200, body)
