"""Calendar sync of one user (no Prefect import; the task wraps it): keep the meetings of [anchor, anchor + 365 days]
that involve the CRM, current.

- Window: anchored at 00:00 UTC of the day of the baseline and re-anchored (a new baseline round over the new
  window) once it is `calendar_reanchor_hours` old — calendarView delta freezes both bounds into its token, so a
  meeting that enters the far end of the range appears at the next re-anchor (at most a day late by default).
  A baseline also reconciles: stored meetings inside the window it did not return are gone from the calendar.
- Rounds: calendarView delta from the stored deltaLink; every series the round touches is re-read in full over the
  window (its instances replace the stored ones: moved, added and silently cancelled occurrences alike);
  `@removed` and cancelled meetings leave the store. An expired token, or a saved link that cannot be followed
  (another Graph URL), starts a new baseline over the same window (counted as a resync).
- Limits per run (`sync_max_pages` per listing, `sync_max_seconds`): a round cut short writes what it read (the
  instances it saw, the series it re-read, the removals) under the old cursor, without reconciling; the next run
  replays the round from the old deltaLink.
- Kept: not private; external meetings with at least one CRM match (organizer and attendees, matched like mail's
  from/to/cc, same primary-link precedence); internal meetings (every participant in the tenant's domains) only for
  users who opted in, without CRM links. Everything else is discarded in memory, counted only.
- Round, rows and the new deltaLink commit in one transaction: a run that dies is redone by the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from o365sync.auth import connection_info, consent_needed, scopes_for
from o365sync.calendar import Meeting, iter_series, read_delta_round
from o365sync.crm_index import crm_index_for
from o365sync.errors import ConsentNeeded, NoCrmSnapshot
from o365sync.graph import CALENDAR_CONSENT_WRITE_ALLOWLIST, CALENDAR_READ_ALLOWLIST, DeltaTokenExpired
from o365sync.matching import CrmIndex, match_participants
from o365sync.notetaker import run_notetaker
from o365sync.store import (
    MEETING_COLUMNS,
    CalendarCursor,
    MeetingBatch,
    read_calendar_cursor,
    write_meeting_batch,
)
from o365sync.sync.mailbox import LIMIT_REASONS, resync_reason
from o365sync.tenant_context import Tenant
from o365sync.tenants import TenantConfig
from o365sync.user_graph import user_graph_client

WINDOW = timedelta(days=365)
SKIPPED_SENSITIVITY = frozenset({"private"})


@dataclass
class CalendarCounts:
    scanned: int = 0
    kept: int = 0
    internal: int = 0
    discarded: int = 0
    removed: int = 0
    baseline: bool = False
    private: int = 0
    to_record: int = 0
    links_added: int = 0
    resync: str | None = None  # why the saved deltaLink was dropped (mailbox_sync.resync_reason)
    stopped: str | None = None  # the paging limit the run stopped at (a mailbox_sync.LIMIT_REASONS value)
    odd_text: int = 0  # meetings whose text was not valid Unicode (U+FFFD)


def calendar_scopes(tenant: TenantConfig) -> list[str]:
    return scopes_for(
        ["calendar", "notetaker"] if "notetaker" in tenant.features else ["calendar"], tenant.notetaker_explicit_consent
    )


def anchored_window(now: datetime) -> tuple[datetime, datetime]:
    anchor = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return anchor, anchor + WINDOW


def _frames(kept: list[Meeting], internal: set[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = [
        {
            "event_id": m.event_id,
            "event_type": m.event_type,
            "series_master_id": m.series_master_id,
            "ical_uid": m.ical_uid,
            "subject": m.subject,
            "start_at": m.start_at,
            "start_tz": m.start_tz,
            "end_at": m.end_at,
            "end_tz": m.end_tz,
            "is_all_day": m.is_all_day,
            "is_online": m.is_online,
            "join_url": m.join_url,
            "organizer_name": m.organizer_name,
            "organizer_address": m.organizer_address,
            "is_internal": m.event_id in internal,
            "web_link": m.web_link,
        }
        for m in kept
    ]
    schema: dict[str, Any] = {c: pl.String for c in MEETING_COLUMNS} | {
        "start_at": pl.Datetime("us", "UTC"),
        "end_at": pl.Datetime("us", "UTC"),
        "is_all_day": pl.Boolean,
        "is_online": pl.Boolean,
        "is_internal": pl.Boolean,
    }
    attendees = [
        {"event_id": m.event_id, "role": role, "name": name, "address": address, "response": response}
        for m in kept
        for role, name, address, response in m.participants
    ]
    return (
        pl.DataFrame(rows, schema=schema),
        pl.DataFrame(attendees, schema={k: pl.String for k in ("event_id", "role", "name", "address", "response")}),
    )


def classify(
    instances: list[Meeting], index: CrmIndex, keep_internal: bool, counts: CalendarCounts
) -> tuple[list[Meeting], set[str], pl.DataFrame]:
    """(kept instances, ids of kept internal ones, CRM links of the kept external ones)."""
    candidates = [
        m for m in instances if not m.is_cancelled and (m.sensitivity or "").lower() not in SKIPPED_SENSITIVITY
    ]
    counts.private += sum((m.sensitivity or "").lower() in SKIPPED_SENSITIVITY for m in instances)
    parts = pl.DataFrame(
        [
            {"graph_id": m.event_id, "address": a, "role": "from" if r == "organizer" else r}
            for m in candidates
            for r, _n, a, _s in m.participants
        ],
        schema={"graph_id": pl.String, "address": pl.String, "role": pl.String},
    )
    links = match_participants(parts, index).rename({"graph_id": "event_id"})
    matched = set(links["event_id"].to_list())
    internal: set[str] = set()
    for m in candidates:
        external = [
            a
            for _r, _n, a, _s in m.participants
            if "@" in a and a.strip().lower().rpartition("@")[2] not in index.own_domains
        ]
        if not external and keep_internal:
            internal.add(m.event_id)
    kept = [m for m in candidates if m.event_id in matched or m.event_id in internal]
    counts.kept += len(kept) - len(internal)
    counts.internal += len(internal)
    counts.discarded += len(instances) - len(kept)
    return kept, internal, links


def sync_calendar_now(tenant: Tenant, user_oid: str, now: datetime | None = None) -> CalendarCounts:
    """Bring one user's meetings up to date (see the module docstring)."""
    settings, tenant_id, config = tenant.settings, tenant.id, tenant.config
    counts = CalendarCounts()
    if not config.feature_on("calendar", user_oid):
        return counts
    scopes = calendar_scopes(config)
    missing = consent_needed(settings, tenant_id, user_oid, scopes)
    if missing:
        raise ConsentNeeded(tenant_id, user_oid, missing)
    now = now or datetime.now(UTC)
    index, scan_start = crm_index_for(settings, config)
    if scan_start is None:
        raise NoCrmSnapshot(tenant_id)
    with tenant.open_store(write=False, user_oid=user_oid) as con:
        cursor = read_calendar_cursor(con, tenant_id, user_oid)
    stored = cursor
    if cursor is None or now - cursor.window_start >= timedelta(hours=settings.calendar_reanchor_hours):
        cursor = CalendarCursor(*anchored_window(now))  # (re-)anchor: a new baseline round
    window = (cursor.window_start, cursor.window_end)
    allow = CALENDAR_READ_ALLOWLIST + (CALENDAR_CONSENT_WRITE_ALLOWLIST if config.notetaker_explicit_consent else ())
    with user_graph_client(
        settings, tenant_id, user_oid, scopes, allow=allow, max_pages=settings.sync_max_pages
    ) as client:
        client.stop_paging_after(settings.sync_max_seconds)
        try:
            rnd = read_delta_round(client, window, cursor.delta_link, settings.graph_page_size)
        except DeltaTokenExpired as dead:  # evicted, or a link we cannot follow (LinkNotFollowable)
            counts.resync = resync_reason(dead)
            stored = cursor = CalendarCursor(*window)
            rnd = read_delta_round(client, window, None, settings.graph_page_size)
        counts.baseline = cursor.delta_link is None
        instances = list(rnd.instances.values())
        reread: set[str] = set()
        for master_id, series in iter_series(client, rnd.series, window):
            instances += series or []  # None: the series is gone; its stored instances are dropped below
            reread.add(master_id)
        complete = rnd.complete and reread == rnd.series
        if not complete:
            counts.stopped = LIMIT_REASONS["PageCap" if not client.past_deadline() else "TimeCap"]
        counts.scanned = len(instances)
        counts.odd_text = sum(m.text_repaired for m in instances)
        kept, internal, links = classify(instances, index, config.preferences_for(user_oid).internal_meetings, counts)
        meetings, attendees = _frames(kept, internal)
        del instances, kept  # unmatched meetings end here, in memory
        # Cut short: keep the stored cursor (its deltaLink replays the round next run) and do not reconcile.
        resume = (
            CalendarCursor(window[0], window[1], rnd.delta_link, now)
            if complete
            else (stored or CalendarCursor(*window))
        )
        batch = MeetingBatch(
            meetings,
            attendees,
            links,
            drop_ids=set(rnd.instances) | rnd.removed,
            drop_series=reread | rnd.removed,
            cursor=resume,
            reconcile=counts.baseline and complete,
            scanned=counts.scanned,
        )
        with tenant.open_store(write=True, user_oid=user_oid) as con:
            counts.removed = write_meeting_batch(con, tenant_id, user_oid, batch)
        organizer = str(connection_info(settings, tenant_id, user_oid).get("upn") or "")
        notes = run_notetaker(client, settings, config, user_oid, organizer, now)
        counts.to_record, counts.links_added = notes.to_record, notes.links_added
    return counts
