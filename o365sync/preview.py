"""What an initial import would bring, before it runs: `preview_user` lists the user's scan window the way the
import does (mail: `iter_header_pages` of Inbox and Sent Items from the CRM's scan start, headers only with the
import's `$select`; calendar, when on for the user: the import's calendarView delta round and series re-reads over
the window it would anchor), runs the import's own rules (`classify_headers`, the calendar sync's `classify`),
fetches no body and stores nothing. What it keeps is counts only: by reason, by the primary CRM record's kind, by
month, per CRM account (resolved to names from the snapshot), and the requests the import would make.

The store is only read (the CRM snapshot, and tombstones: an erased message would not be imported again). The only
file that may change is the user's encrypted token cache, when MSAL refreshes an expired access token.

Estimated import time (`estimate_seconds`): Graph lists pages one after another (each nextLink comes with the
previous page), and body reads go in `$batch`es of 20 whose inner requests Outlook runs `MAX_IN_FLIGHT` at a time;
every request is assumed to take `REQUEST_LATENCY_S`. Outlook allows `OUTLOOK_BUDGET` requests per app and
mailbox in `OUTLOOK_BUDGET_WINDOW_S` (a batch's inner requests count one each), which bounds the time from below.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import polars as pl

from o365sync.auth import consent_needed, scopes_for
from o365sync.calendar import iter_series, read_delta_round
from o365sync.explain import current_crm_index, meeting_decision
from o365sync.graph import (
    BATCH_LIMIT,
    CALENDAR_READ_ALLOWLIST,
    MAIL_READ_ALLOWLIST,
    OUTLOOK_BUDGET,
    OUTLOOK_BUDGET_WINDOW_S,
    GraphClient,
)
from o365sync.mail import iter_header_pages
from o365sync.matching import CrmIndex
from o365sync.participants import name_index_for, resolve_non_smtp
from o365sync.store import open_store
from o365sync.sync.calendar import CalendarCounts, anchored_window, calendar_scopes, classify
from o365sync.sync.mailbox import FILTERED_ROUND_CAP, MAIL_FOLDERS, classify_headers
from o365sync.tenant_context import Tenant
from o365sync.user_graph import user_graph_client

REQUEST_LATENCY_S = 0.25  # assumed time of one Graph request (a header page or one inner body request)
MAX_IN_FLIGHT = 4  # Outlook's concurrent requests per app and mailbox
ACCOUNT_KIND = "account"


@dataclass
class SourcePreview:
    """Counts of one source (email or calendar) of one user; items are messages or meeting instances."""

    by_reason: Counter[str] = field(default_factory=Counter)  # matched, an exclusion rule, no_crm_match, erased…
    by_kind: Counter[str] = field(default_factory=Counter)  # primary CRM record's kind of each matched item
    by_month: Counter[str] = field(default_factory=Counter)  # imported items per YYYY-MM (received / start, UTC)
    by_account: Counter[str] = field(default_factory=Counter)  # account crm id -> matched items touching it
    listing_requests: int = 0  # what the import lists (mail: its delta baseline too)
    body_requests: int = 0  # messages whose body the import would read (one inner `$batch` request each)


@dataclass
class UserPreview:
    user_oid: str
    email: SourcePreview
    calendar: SourcePreview | None  # None: calendar sync is off (or not consented) for the user

    @property
    def requests(self) -> int:
        sources = [self.email] + ([self.calendar] if self.calendar else [])
        return sum(s.listing_requests + s.body_requests for s in sources)

    @property
    def batch_calls(self) -> int:
        """`$batch` calls the import would make for the bodies (`BATCH_LIMIT` per call)."""
        return -(-self.email.body_requests // BATCH_LIMIT)

    @property
    def seconds(self) -> float:
        sources = [self.email] + ([self.calendar] if self.calendar else [])
        return estimate_seconds(sum(s.listing_requests for s in sources), sum(s.body_requests for s in sources))


@dataclass(frozen=True)
class CrmNames:
    """What the counts need of the CRM snapshot: the account of each person (a frame: a snapshot can hold a million
    people), and account names."""

    account_of: pl.DataFrame  # crm_id, crm_kind, account_id of the people that belong to an account
    account_name: dict[str, str]

    def accounts(self, links: pl.DataFrame) -> pl.DataFrame:
        """(item_id, account_id) once per item and account its matched records touch: a matched account itself,
        or the account of a matched contact or lead."""
        direct = links.filter(pl.col("crm_kind") == ACCOUNT_KIND).select("item_id", account_id="crm_id")
        via = links.join(self.account_of, on=["crm_id", "crm_kind"]).select("item_id", "account_id")
        return pl.concat([direct, via]).unique()


def estimate_seconds(listing_requests: int, body_requests: int) -> float:
    """The import's time by the module's model: sequential listing pages plus body requests `MAX_IN_FLIGHT` at a
    time, or the budget's floor when the requests do not fit into one budget window."""
    latency = (listing_requests + body_requests / MAX_IN_FLIGHT) * REQUEST_LATENCY_S
    budget_floor = (listing_requests + body_requests) / OUTLOOK_BUDGET * OUTLOOK_BUDGET_WINDOW_S
    return max(latency, budget_floor if listing_requests + body_requests > OUTLOOK_BUDGET else 0.0)


def crm_names(tenant: Tenant) -> CrmNames:
    with open_store(tenant.settings, tenant.id, write=False) as con:
        people = con.sql(
            "SELECT DISTINCT crm_id, kind::VARCHAR AS crm_kind, account_id FROM crm_people WHERE account_id IS NOT NULL"
        ).pl()
        names = con.execute("SELECT crm_id, name FROM crm_accounts").fetchall()
    return CrmNames(people, {c: n or c for c, n in names})


def _count(out: SourcePreview, links: pl.DataFrame, imported: pl.DataFrame, names: CrmNames) -> None:
    """Add what the import would store: `imported` (item_id, at) and the CRM `links` (MATCH_SCHEMA with item_id)
    of those items."""
    links = links.filter(pl.col("item_id").is_in(imported["item_id"].implode()))
    out.by_kind.update(dict(links.filter(pl.col("is_primary")).group_by("crm_kind").len().iter_rows()))
    months = imported.select(pl.col("at").dt.strftime("%Y-%m").alias("month")).group_by("month").len()
    out.by_month.update(dict(months.iter_rows()))
    out.by_account.update(dict(names.accounts(links).group_by("account_id").len().iter_rows()))


def _tombstones(tenant: Tenant, user_oid: str) -> dict[str, set[str]]:
    """kind (message, conversation, event, series) -> erased keys of the user: the import skips them."""
    with open_store(tenant.settings, tenant.id, write=False) as con:
        rows = con.execute(
            "SELECT kind, key FROM erased WHERE tenant_id = ? AND coalesce(user_oid, ?) = ?",
            [tenant.id, user_oid, user_oid],
        ).fetchall()
    out: dict[str, set[str]] = {k: set() for k in ("message", "conversation", "event", "series")}
    for kind, key in rows:
        out.setdefault(kind, set()).add(key)
    return out


def preview_mail(
    tenant: Tenant, user_oid: str, client: GraphClient, index: CrmIndex, scan_start: datetime, names: CrmNames
) -> SourcePreview:
    """The mail half: every header of the scan window through the import's rules. A matched message the import
    would skip counts as `duplicate` (its internetMessageId already seen in the other folder) or `erased`."""
    out = SourcePreview()
    config, size = tenant.config, tenant.settings.graph_page_size
    blocklist = config.blocklist_for(user_oid)
    erased = _tombstones(tenant, user_oid)
    people = name_index_for(tenant.settings, config)  # X500 and name-only participants, resolved as the import does
    seen: set[str] = set()
    for folder in MAIL_FOLDERS:
        pages = 0
        for page in iter_header_pages(client, folder, scan_start, size):
            pages += 1
            messages = pl.DataFrame(page.messages).unique("graph_id", keep="last", maintain_order=True)
            participants, _ = resolve_non_smtp(pl.DataFrame(page.participants), people)
            excluded, links = classify_headers(messages, participants, config.domains, blocklist, index)
            out.by_reason.update(dict(excluded.group_by("reason").len().iter_rows()))
            kept = messages.filter(pl.col("graph_id").is_in(links["graph_id"].unique().implode()))
            out.by_reason["no_crm_match"] += messages.height - excluded.height - kept.height
            imported = []
            for gid, imid, conversation, at in kept.select(
                "graph_id", "internet_message_id", "conversation_id", "received_at"
            ).iter_rows():
                if imid in erased["message"] or conversation in erased["conversation"]:
                    out.by_reason["erased"] += 1
                elif imid is not None and imid in seen:
                    out.by_reason["duplicate"] += 1
                else:
                    imported.append((gid, at))
                    seen.add(imid)
            out.by_reason["matched"] += len(imported)
            out.body_requests += len(imported)
            when = pl.DataFrame(imported, schema={"item_id": pl.String, "at": pl.Datetime("us", "UTC")}, orient="row")
            _count(out, links.rename({"graph_id": "item_id"}), when, names)
            del page, messages, excluded, links, kept  # the headers end here, in memory
        # the import also takes a delta baseline of the folder: about as many pages, at most the filtered cap's
        out.listing_requests += pages + min(pages, -(-FILTERED_ROUND_CAP // size) + 1)
    return out


def preview_calendar(
    tenant: Tenant, user_oid: str, client: GraphClient, index: CrmIndex, names: CrmNames, now: datetime
) -> SourcePreview:
    """The calendar half: the import's baseline round and series re-reads over the window it would anchor now,
    each instance counted under the calendar sync's decision (`meeting_decision`)."""
    out = SourcePreview()
    window = anchored_window(now)
    before = client.budget_used()
    rnd = read_delta_round(client, window, None, tenant.settings.graph_page_size)
    instances = list(rnd.instances.values())
    for _master, series in iter_series(client, rnd.series, window):
        instances += series or []
    out.listing_requests = client.budget_used() - before
    keep_internal = tenant.config.preferences_for(user_oid).internal_meetings
    _kept, internal, links = classify(instances, index, keep_internal, CalendarCounts())
    matched = set(links["event_id"].to_list())
    erased = _tombstones(tenant, user_oid)
    imported = []
    for m in instances:
        reason = meeting_decision(m, m.event_id in internal, m.event_id in matched, index.own_domains)
        if reason in ("matched", "internal_kept") and (
            m.event_id in erased["event"] or (m.series_master_id or "") in erased["series"]
        ):
            reason = "erased"
        out.by_reason[reason] += 1
        if reason in ("matched", "internal_kept"):
            imported.append((m.event_id, m.start_at))
    when = pl.DataFrame(imported, schema={"item_id": pl.String, "at": pl.Datetime("us", "UTC")}, orient="row")
    _count(out, links.rename({"event_id": "item_id"}), when, names)
    del instances  # meetings end here, in memory
    return out


def preview_user(tenant: Tenant, user_oid: str, names: CrmNames, now: datetime | None = None) -> UserPreview:
    """Preview one connected user's initial import (see the module docstring). Raises `NoCrmSnapshot` before any
    Graph call when there is nothing to match against. The calendar is previewed when it is on for the user and
    they consented to it."""
    settings, config = tenant.settings, tenant.config
    index, scan_start = current_crm_index(tenant)
    with user_graph_client(settings, tenant.id, user_oid, scopes_for(["email"]), allow=MAIL_READ_ALLOWLIST) as client:
        email = preview_mail(tenant, user_oid, client, index, scan_start, names)
    calendar = None
    scopes = calendar_scopes(config)
    if config.feature_on("calendar", user_oid) and not consent_needed(settings, tenant.id, user_oid, scopes):
        with user_graph_client(settings, tenant.id, user_oid, scopes, allow=CALENDAR_READ_ALLOWLIST) as client:
            calendar = preview_calendar(tenant, user_oid, client, index, names, now or datetime.now(UTC))
    return UserPreview(user_oid, email, calendar)


def top_accounts(previews: list[UserPreview], names: CrmNames, n: int = 10) -> list[tuple[str, int]]:
    """(account name, imported items) of the `n` accounts with the most matched mail and meetings."""
    total: Counter[str] = Counter()
    for p in previews:
        for source in (p.email, p.calendar):
            if source is not None:
                total.update(source.by_account)
    return [(names.account_name.get(a, a), count) for a, count in total.most_common(n)]


def preview_report(tenant: Tenant, users: dict[str, str], now: datetime | None = None) -> dict[str, Any]:
    """The preview of `users` (object id -> display name or UPN) as one plain report (stable keys; what the CLI
    prints as JSON and the console renders): per user and source the counts, the tenant's top accounts, the
    requests, the estimate and its assumptions."""
    names = crm_names(tenant)
    previews = [preview_user(tenant, oid, names, now) for oid in users]

    def source(s: SourcePreview | None) -> dict[str, Any] | None:
        if s is None:
            return None
        return {
            "by_reason": dict(sorted((+s.by_reason).items())),
            "by_kind": dict(sorted(s.by_kind.items())),
            "by_month": dict(sorted(s.by_month.items())),
            "listing_requests": s.listing_requests,
            "body_requests": s.body_requests,
        }

    return {
        "tenant": tenant.id,
        "users": [
            {
                "user_oid": p.user_oid,
                "name": users[p.user_oid],
                "email": source(p.email),
                "calendar": source(p.calendar),
                "requests": p.requests,
                "batch_calls": p.batch_calls,
                "estimated_seconds": round(p.seconds, 1),
            }
            for p in previews
        ],
        "top_accounts": [{"name": n, "count": c} for n, c in top_accounts(previews, names)],
        "estimate": {
            "longest_mailbox_seconds": round(max((p.seconds for p in previews), default=0.0), 1),
            "all_mailboxes_one_after_another_seconds": round(sum(p.seconds for p in previews), 1),
            "request_latency_seconds": REQUEST_LATENCY_S,
            "concurrent_requests_per_mailbox": MAX_IN_FLIGHT,
            "budget_requests": OUTLOOK_BUDGET,
            "budget_window_seconds": OUTLOOK_BUDGET_WINDOW_S,
            "batch_size": BATCH_LIMIT,
        },
    }


def breakdown(report: dict[str, Any], key: str) -> dict[str, dict[str, int]]:
    """One breakdown of a `preview_report` (`by_reason`, `by_kind` or `by_month`) summed over its users: row ->
    {"email": n, "calendar": n}, rows sorted."""
    out: dict[str, dict[str, int]] = {}
    for user in report["users"]:
        for source in ("email", "calendar"):
            for row, n in ((user[source] or {}).get(key) or {}).items():
                out.setdefault(row, {"email": 0, "calendar": 0})[source] += n
    return dict(sorted(out.items()))
