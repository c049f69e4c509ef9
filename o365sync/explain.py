"""Why one message was (or would be) imported or not: `explain_message` fetches that item's headers from Graph now
(the pipeline's `HEADER_FIELDS` and sensitivity `$expand`, read-only, the user's delegated token), runs the real
exclusions (`o365sync.exclusions`) and matching (`o365sync.matching`, against the tenant's current CRM snapshot) in
memory and says what the pipeline decides, with its reasons, and what the store holds of it now.

Nothing about the item is stored or logged: the result lives in memory for the caller to show; the store is only
read (whether the item is stored, whether it was erased). Decisions use the oracle's vocabulary (`REASONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import polars as pl

from o365sync.auth import scopes_for
from o365sync.calendar import Meeting, read_event
from o365sync.crm_index import crm_index_for
from o365sync.errors import NoCrmSnapshot
from o365sync.exclusions import REASONS as EXCLUSION_REASONS
from o365sync.graph import (
    CALENDAR_READ_ALLOWLIST,
    MAIL_READ_ALLOWLIST,
    SENSITIVITY_EXPAND,
    Allow,
    GraphClient,
    GraphNotFound,
)
from o365sync.mail import HEADER_FIELDS, parse_page
from o365sync.matching import KIND_RANK, ROLE_RANK, CrmIndex, normalise_address
from o365sync.participants import name_index_for, resolve_non_smtp
from o365sync.store import open_store, read_calendar_cursor, store_path
from o365sync.sync.calendar import SKIPPED_SENSITIVITY, CalendarCounts, anchored_window, calendar_scopes, classify
from o365sync.sync.mailbox import MAIL_FOLDERS, classify_headers
from o365sync.tenant_context import Tenant
from o365sync.user_graph import user_graph_client

# Decisions, in the order the pipeline takes them: first one wins.
REASONS = ("not_synced_folder", *EXCLUSION_REASONS, "no_crm_match", "matched")
# Decisions for one calendar event, in the calendar sync's order (o365sync/sync/calendar.py): a series master is
# never stored itself (its occurrences are), an instance outside the sync window is not read, then the rules.
EVENT_REASONS = (
    "series_master",
    "outside_window",
    "cancelled",
    "private",
    "internal_kept",
    "internal_only",
    "no_crm_match",
    "matched",
)
# One message by Graph id, or the copies of one internetMessageId; the folders' ids tell inbox/sentitems apart.
EXPLAIN_ALLOWLIST: tuple[Allow, ...] = (*MAIL_READ_ALLOWLIST, Allow("GET", "me/messages"))


@dataclass(frozen=True)
class MatchedRecord:
    crm_id: str
    crm_kind: str
    matched_address: str
    role: str  # the matched participant's role: from, sender, to or cc (the best one if several)
    is_primary: bool


@dataclass(frozen=True)
class Explanation:
    graph_id: str
    folder: str  # inbox, sentitems, or "other" (not synced)
    decision: str  # one of REASONS
    matches: tuple[MatchedRecord, ...]  # primary first
    primary_why: str | None  # which precedence rule chose the primary record
    stored: bool  # the store holds this message for the user now
    erased: bool  # a tombstone (erasure) keeps it from ever being imported again


@dataclass(frozen=True)
class EventExplanation:
    event_id: str
    event_type: str  # singleInstance, occurrence, exception or seriesMaster
    decision: str  # one of EVENT_REASONS
    window: tuple[datetime, datetime]  # the calendar sync's window the event was judged against
    matches: tuple[MatchedRecord, ...]  # primary first
    primary_why: str | None
    stored: bool
    erased: bool  # a tombstone of the event or of its series


def _get_json_page(client: GraphClient, message: str) -> bytes:
    """The raw Graph page (`{"value": [...]}`) holding the message: by internetMessageId (`<…>`) or by Graph id."""
    params = {"$select": ",".join(HEADER_FIELDS), "$expand": SENSITIVITY_EXPAND}
    if message.startswith("<") and message.endswith(">"):
        literal = message.replace("'", "''")
        params |= {"$filter": f"internetMessageId eq '{literal}'", "$top": "10"}
        return client.get("me/messages", params).content
    raw = client.get(f"me/messages/{quote(message, safe='')}", params).content
    return b'{"value":[' + raw + b"]}"


def _primary_why(matches: list[MatchedRecord]) -> str | None:
    if not matches:
        return None
    best = matches[0]
    if len(matches) == 1:
        return "the only matched record"
    same_kind = [m for m in matches if m.crm_kind == best.crm_kind]
    if len(same_kind) == 1:
        return f"kind {best.crm_kind} ranks first (contact > person_account > lead > account)"
    same_role = [m for m in same_kind if ROLE_RANK.get(m.role) == ROLE_RANK.get(best.role)]
    if len(same_role) == 1:
        return f"same kind; matched the {best.role} participant (from > sender > to > cc)"
    return "same kind and participant role; the smallest CRM id wins"


def _matched_records(matched: pl.DataFrame, participants: pl.DataFrame) -> list[MatchedRecord]:
    """The matcher's links of one item (MATCH_SCHEMA) with the role of the participant each matched through
    (the best role when the address took several), primary first."""
    roles = (
        participants.select(normalise_address(pl.col("address")).alias("address"), "role")
        .with_columns(pl.col("role").replace_strict(ROLE_RANK, default=len(ROLE_RANK)).alias("rank"))
        .sort("rank")
        .unique("address", keep="first")
    )
    role_of = dict(zip(roles["address"], roles["role"], strict=True))
    found = [
        MatchedRecord(m["crm_id"], m["crm_kind"], m["matched_address"], role_of[m["matched_address"]], m["is_primary"])
        for m in matched.iter_rows(named=True)
    ]
    found.sort(key=lambda m: (not m.is_primary, KIND_RANK[m.crm_kind], ROLE_RANK.get(m.role, 9), m.crm_id))
    return found


def current_crm_index(tenant: Tenant) -> tuple[CrmIndex, datetime]:
    """The current CRM snapshot's index and scan start; `NoCrmSnapshot` (before any Graph call) when there is none.
    Creates no store."""
    if not store_path(tenant.settings, tenant.id).exists():
        raise NoCrmSnapshot(tenant.id)
    index, scan_start = crm_index_for(tenant.settings, tenant.config)
    if scan_start is None:
        raise NoCrmSnapshot(tenant.id)
    return index, scan_start


def explain_message(tenant: Tenant, user_oid: str, message: str) -> Explanation:
    """Explain one message of `user_oid`'s mailbox (`message`: an internetMessageId in angle brackets, or a Graph
    id). Raises `NoCrmSnapshot` before any Graph call when there is nothing to match against, `GraphNotFound`
    when the mailbox has no such message (also when no copy of that internetMessageId is there)."""
    settings, config = tenant.settings, tenant.config
    index, _scan_start = current_crm_index(tenant)
    with user_graph_client(settings, tenant.id, user_oid, scopes_for(["email"]), allow=EXPLAIN_ALLOWLIST) as client:
        page = parse_page(_get_json_page(client, message), "other")
        if page.messages.num_rows == 0:
            raise GraphNotFound(404, "ErrorItemNotFound")  # what Graph says for an unknown id
        folders = {client.get(f"me/mailFolders/{f}", {"$select": "id"}).json()["id"]: f for f in MAIL_FOLDERS}
    messages = pl.DataFrame(page.messages)
    participants = pl.DataFrame(page.participants)
    # Several copies of one internetMessageId: the one in a synced folder explains the import.
    messages = messages.with_columns(
        pl.col("parent_folder_id").replace_strict(folders, default="other", return_dtype=pl.String).alias("folder")
    ).sort(pl.col("folder") == "other")
    row = messages.row(0, named=True)
    gid = row["graph_id"]
    messages, participants = messages.head(1), participants.filter(pl.col("graph_id") == gid)
    participants, _ = resolve_non_smtp(participants, name_index_for(settings, config))  # as the import does

    found: list[MatchedRecord] = []
    if row["folder"] == "other":
        decision = "not_synced_folder"
    else:
        blocklist = config.blocklist_for(user_oid)
        excluded, matched = classify_headers(messages, participants, config.domains, blocklist, index)
        found = _matched_records(matched, participants)
        decision = excluded["reason"][0] if excluded.height else "matched" if found else "no_crm_match"

    with open_store(settings, tenant.id, write=False) as con:
        stored = bool(
            con.execute(
                "SELECT count(*) FROM emails WHERE tenant_id = ? AND user_oid = ? AND "
                "(graph_id = ? OR internet_message_id = ?)",
                [tenant.id, user_oid, gid, row["internet_message_id"]],
            ).fetchall()[0][0]
        )
        erased = bool(
            con.execute(
                "SELECT count(*) FROM erased WHERE tenant_id = ? AND coalesce(user_oid, ?) = ? AND "
                "((kind = 'conversation' AND key = ?) OR (kind = 'message' AND key = ?))",
                [tenant.id, user_oid, user_oid, row["conversation_id"], row["internet_message_id"]],
            ).fetchall()[0][0]
        )
    return Explanation(gid, row["folder"], decision, tuple(found), _primary_why(found), stored, erased)


def meeting_decision(meeting: Meeting, kept_internal: bool, matched: bool, own_domains: frozenset[str]) -> str:
    """Why the calendar sync keeps or discards one instance it read, given what its `classify` decided (kept as an
    internal meeting, matched): read off the same fields `classify` tests, first reason wins."""
    if meeting.is_cancelled:
        return "cancelled"
    if (meeting.sensitivity or "").lower() in SKIPPED_SENSITIVITY:
        return "private"
    if kept_internal:
        return "internal_kept"
    if matched:
        return "matched"
    external = any(
        "@" in a and a.strip().lower().rpartition("@")[2] not in own_domains for _r, _n, a, _s in meeting.participants
    )
    return "no_crm_match" if external else "internal_only"


def _event_decision(
    meeting: Meeting, window: tuple[datetime, datetime], index: CrmIndex, keep_internal: bool
) -> tuple[str, pl.DataFrame]:
    """(decision, CRM links) of one event by the calendar sync's own `classify`."""
    if meeting.event_type == "seriesMaster":
        return "series_master", pl.DataFrame()
    if not (meeting.start_at < window[1] and meeting.end_at > window[0]):  # calendarView: overlaps the window
        return "outside_window", pl.DataFrame()
    _kept, internal, links = classify([meeting], index, keep_internal, CalendarCounts())
    return meeting_decision(meeting, bool(internal), bool(links.height), index.own_domains), links


def explain_event(tenant: Tenant, user_oid: str, event_id: str, now: datetime | None = None) -> EventExplanation:
    """Explain one calendar event of `user_oid` (a Graph event id: single meeting, occurrence, exception or series
    master). Raises `NoCrmSnapshot` before any Graph call when there is nothing to match against, `GraphNotFound`
    when the calendar has no such event. The window is the user's current sync window (a fresh one if the
    calendar was never synced)."""
    settings, config = tenant.settings, tenant.config
    index, _scan_start = current_crm_index(tenant)
    with open_store(settings, tenant.id, write=False) as con:
        cursor = read_calendar_cursor(con, tenant.id, user_oid)
    window = (cursor.window_start, cursor.window_end) if cursor else anchored_window(now or datetime.now(UTC))
    with user_graph_client(
        settings, tenant.id, user_oid, calendar_scopes(config), allow=CALENDAR_READ_ALLOWLIST
    ) as client:
        meeting = read_event(client, event_id)
    keep_internal = config.preferences_for(user_oid).internal_meetings
    decision, links = _event_decision(meeting, window, index, keep_internal)
    found: list[MatchedRecord] = []
    if decision == "matched":
        parts = pl.DataFrame(
            [{"address": a, "role": "from" if r == "organizer" else r} for r, _n, a, _s in meeting.participants],
            schema={"address": pl.String, "role": pl.String},
        )
        found = _matched_records(links, parts)
    with open_store(settings, tenant.id, write=False) as con:
        stored = bool(
            con.execute(
                "SELECT count(*) FROM meetings WHERE tenant_id = ? AND user_oid = ? AND event_id = ?",
                [tenant.id, user_oid, meeting.event_id],
            ).fetchall()[0][0]
        )
        erased = bool(
            con.execute(
                "SELECT count(*) FROM erased WHERE tenant_id = ? AND coalesce(user_oid, ?) = ? AND "
                "((kind = 'event' AND key = ?) OR (kind = 'series' AND key = ?))",
                [tenant.id, user_oid, user_oid, meeting.event_id, meeting.series_master_id or meeting.event_id],
            ).fetchall()[0][0]
        )
    return EventExplanation(
        meeting.event_id,
        meeting.event_type,
        decision,
        window,
        tuple(found),
        _primary_why(found),
        stored,
        erased,
    )


MESSAGE_DECISIONS = {
    "not_synced_folder": "not imported: it is in neither Inbox nor Sent Items",
    "draft": "excluded: a draft",
    "meeting_message": "excluded: a meeting request/response (eventMessage)",
    "sensitive": "excluded: marked personal, private or confidential",
    "automated_sender": "excluded: an automated sender (no-reply style address)",
    "blocklisted": "excluded: a participant's address or domain is on the tenant's or the user's blocklist",
    "internal_only": "excluded: no participant outside the tenant's domains",
    "no_crm_match": "not imported: no external participant matches a CRM record",
    "matched": "imported: matches CRM records",
}
EVENT_DECISIONS = {
    "series_master": "not imported itself: a series master; its occurrences are imported (explain one by its id)",
    "outside_window": "not imported: outside the calendar sync's window",
    "cancelled": "not imported: cancelled",
    "private": "not imported: marked private",
    "internal_kept": "imported without CRM links: an internal meeting, and the user keeps internal meetings",
    "internal_only": "not imported: no participant outside the tenant's domains",
    "no_crm_match": "not imported: no external participant matches a CRM record",
    "matched": "imported: matches CRM records",
}


def explanation_lines(result: Explanation | EventExplanation) -> list[str]:
    """What `explain` prints (and the console shows), one line each: the item, the decision and its reason, the
    matched CRM records with the primary first and why, stored now, erased."""
    if isinstance(result, EventExplanation):
        start, end = (f"{w:%Y-%m-%d}" for w in result.window)
        out = [f"event {result.event_id} ({result.event_type}; sync window {start} .. {end})"]
        out.append(f"decision: {result.decision} — {EVENT_DECISIONS[result.decision]}")
    else:
        out = [f"message {result.graph_id} ({result.folder})"]
        out.append(f"decision: {result.decision} — {MESSAGE_DECISIONS[result.decision]}")
    for m in result.matches:
        mark = "primary" if m.is_primary else "also"
        role = "organizer" if isinstance(result, EventExplanation) and m.role == "from" else m.role
        out.append(f"  {mark}: {m.crm_kind} {m.crm_id} by {role} {m.matched_address}")
    if result.primary_why:
        out.append(f"primary because: {result.primary_why}")
    out.append(f"stored now: {'yes' if result.stored else 'no'}")
    if result.erased:
        out.append("erased: yes — a tombstone keeps it from ever being imported again")
    return out
