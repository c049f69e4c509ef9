"""Teams sharing: list the user's joined teams and channels, and post an activity summary to a channel or a chat.

Least privilege: every Graph call goes through a `GraphClient` restricted to `TEAMS_ALLOWLIST` (joinedTeams,
channels, channel/chat message POSTs, chat creation): nothing here can read message history. Teams is opt-in per
tenant: `require_teams` refuses before a token is asked for or a byte is sent when the tenant has not enabled it,
and reports `ConsentNeeded` (without asking MSAL, which would fail the grant) when the user connected before the
tenant turned Teams on.

A summary names the activity (meeting: subject, time with its time zone, CRM accounts and matched contacts,
attendee names; email: subject, date, CRM links) and never includes a body. A share is idempotent per
(activity, target): see `share_activity` and docs/TEAMS.md.

Exception messages carry ids and classes only (Prefect stores them): never subjects, names or addresses.
Nothing here imports Prefect (tasks/teams_task.py and flows/teams.py do).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import duckdb
import msgspec
from tzlocal.windows_tz import win_tz

from o365sync.auth import consent_needed, scopes_for
from o365sync.errors import ConsentNeeded, O365SyncError, TenantError
from o365sync.graph import TEAMS_ALLOWLIST, ForbiddenRequest, GraphClient, GraphError
from o365sync.settings import Settings
from o365sync.store import open_store
from o365sync.teams_store import (
    ChannelRow,
    ShareRecord,
    abandon_share,
    begin_share,
    complete_share,
    find_channel,
    get_share,
    replace_channels,
    share_id_for,
)
from o365sync.tenants import load_tenant
from o365sync.user_graph import user_graph_client

__all__ = [
    "ACTIVITY_KINDS",
    "TEAMS_SCOPES",
    "ActivityNotFound",
    "ChannelNotFound",
    "ConsentNeeded",
    "RefreshResult",
    "ShareResult",
    "TeamsDisabled",
    "TeamsError",
    "create_chat",
    "list_channels",
    "post_channel_message",
    "post_chat_message",
    "refresh_channels",
    "render_email_summary",
    "render_meeting_summary",
    "render_summary",
    "require_teams",
    "share_activity",
    "teams_client",
]

log = logging.getLogger("o365sync.teams")

TEAMS_SCOPES = scopes_for(["teams"])
ACTIVITY_KINDS = ("meeting", "email")
MAX_CHAT_MEMBERS = 250  # Graph's limit for a group chat
MAX_LISTED = 8  # names listed per line of a summary before "and N more"
# A Graph answer that certainly means "not posted": the request was refused, nothing was created. 408/429 and
# 5xx (after the client's own retries) and network errors are ambiguous: the post may have gone through.
_DEFINITE_REFUSAL = frozenset({400, 401, 403, 404, 409, 413, 415, 422})


# ----------------------------------------------------------------------------------------------- errors
class TeamsError(O365SyncError):
    """Base class; messages carry ids and error classes only."""


class TeamsDisabled(TeamsError, TenantError):
    retriable = False
    action = "an admin must enable the tenant's 'teams' feature"
    text = "tenant {tenant_id} has not enabled Teams sharing (feature 'teams')"


class ChannelNotFound(TeamsError):
    retriable = False
    action = "pick a channel the user can post to"

    def __init__(self, tenant_id: str, oid: str, team_id: str, channel_id: str):
        self.tenant_id, self.oid, self.team_id, self.channel_id = tenant_id, oid, team_id, channel_id
        super().__init__(
            f"channel {channel_id} of team {team_id} is not among the channels user {tenant_id}/{oid} "
            "can post to (checked after refreshing the user's channel list)"
        )


class ActivityNotFound(TeamsError):
    retriable = False
    action = "pick an email or meeting that is in the store"

    def __init__(self, tenant_id: str, oid: str, kind: str, activity_id: str):
        self.tenant_id, self.oid, self.kind, self.activity_id = tenant_id, oid, kind, activity_id
        super().__init__(f"{kind} {activity_id} of user {tenant_id}/{oid} is not in the store")


# ----------------------------------------------------------------------------------------------- access
def require_teams(settings: Settings, tenant_id: str, oid: str) -> list[str]:
    """The scopes to ask for, after checking (without any network call) that the tenant enabled Teams and that
    the user's connection was granted every Teams scope. Raises TeamsDisabled or ConsentNeeded."""
    if not load_tenant(settings, tenant_id).feature_on("teams", oid):
        raise TeamsDisabled(tenant_id)
    missing = consent_needed(settings, tenant_id, oid, TEAMS_SCOPES)
    if missing:
        raise ConsentNeeded(tenant_id, oid, missing)
    return list(TEAMS_SCOPES)


@contextmanager
def teams_client(settings: Settings, tenant_id: str, oid: str) -> Iterator[GraphClient]:
    """A Graph client for one user that can make the Teams calls and nothing else (checks `require_teams`)."""
    scopes = require_teams(settings, tenant_id, oid)
    with user_graph_client(settings, tenant_id, oid, scopes, allow=TEAMS_ALLOWLIST) as client:
        yield client


def _seg(value: str) -> str:
    return quote(value, safe="")


# ----------------------------------------------------------------------------------------------- listing
class _Team(msgspec.Struct):
    id: str
    display_name: str | None = msgspec.field(default=None, name="displayName")


class _Channel(msgspec.Struct):
    id: str
    display_name: str | None = msgspec.field(default=None, name="displayName")
    membership_type: str | None = msgspec.field(default=None, name="membershipType")


class _Teams(msgspec.Struct):
    value: list[_Team] = []


class _Channels(msgspec.Struct):
    value: list[_Channel] = []


class _Created(msgspec.Struct):
    id: str


def list_channels(client: GraphClient) -> list[ChannelRow]:
    """The signed-in user's joined teams and the channels they can see in each (standard, and the private and
    shared channels they are a member of; Graph hides the others). Names and membership types only."""
    teams: list[_Team] = []
    for page in client.iter_pages("me/joinedTeams", None):
        teams += msgspec.json.decode(page, type=_Teams).value
    rows: list[ChannelRow] = []
    for team in teams:
        path = f"teams/{_seg(team.id)}/channels"
        for page in client.iter_pages(path, {"$select": "id,displayName,membershipType"}):
            rows += [
                ChannelRow(team.id, team.display_name, c.id, c.display_name, c.membership_type)
                for c in msgspec.json.decode(page, type=_Channels).value
            ]
    return rows


@dataclass(frozen=True)
class RefreshResult:
    teams: int
    channels: int


def refresh_channels(settings: Settings, tenant_id: str, oid: str, client: GraphClient | None = None) -> RefreshResult:
    """List the user's teams and channels and replace their stored list in one transaction."""
    if client is None:
        with teams_client(settings, tenant_id, oid) as own:
            return refresh_channels(settings, tenant_id, oid, own)
    rows = list_channels(client)
    with open_store(settings, tenant_id, write=True) as con:
        stored = replace_channels(con, tenant_id, oid, rows)
    result = RefreshResult(teams=len({r.team_id for r in rows}), channels=stored)
    log.info("teams refresh user=%s teams=%d channels=%d", oid, result.teams, result.channels)
    return result


# ----------------------------------------------------------------------------------------------- posting
def _message(content: str) -> bytes:
    return msgspec.json.encode({"body": {"contentType": "html", "content": content}})


def post_channel_message(client: GraphClient, team_id: str, channel_id: str, content_html: str) -> str:
    """POST teams/{team}/channels/{channel}/messages (ChannelMessage.Send); returns the new message id."""
    resp = client.request(
        "POST",
        f"teams/{_seg(team_id)}/channels/{_seg(channel_id)}/messages",
        idempotent=False,
        content=_message(content_html),
    )
    return msgspec.json.decode(resp.content, type=_Created).id


def post_chat_message(client: GraphClient, chat_id: str, content_html: str) -> str:
    """POST chats/{chat}/messages (ChatMessage.Send); returns the new message id."""
    resp = client.request("POST", f"chats/{_seg(chat_id)}/messages", content=_message(content_html), idempotent=False)
    return msgspec.json.decode(resp.content, type=_Created).id


def chat_members(user_oid: str, members: Sequence[str]) -> list[str]:
    """The chat's members: the user's own object id first, then the others (object ids or UPNs), deduplicated."""
    out = [user_oid]
    for m in members:
        m = m.strip()
        if m and m.lower() not in {o.lower() for o in out}:
            out.append(m)
    return out


def create_chat(client: GraphClient, user_oid: str, members: Sequence[str], topic: str | None = None) -> str:
    """POST chats (Chat.Create): a oneOnOne chat with one other member (Graph returns the existing chat of the two
    if there is one), else a group chat (`topic` only applies there). Members are bound by object id or UPN as
    `{graph}/users('{id}')`, each with the role owner; the signed-in user must be one of them. Returns the chat id."""
    everyone = chat_members(user_oid, members)
    if len(everyone) < 2:
        raise ValueError("a chat needs at least one member besides the user")
    if len(everyone) > MAX_CHAT_MEMBERS:
        raise ValueError(f"a group chat has at most {MAX_CHAT_MEMBERS} members")
    body: dict[str, Any] = {
        "chatType": "oneOnOne" if len(everyone) == 2 else "group",
        "members": [
            {
                "@odata.type": "#microsoft.graph.aadUserConversationMember",
                "roles": ["owner"],
                "user@odata.bind": f"{client.base_url}/users('{m.replace(chr(39), chr(39) * 2)}')",
            }
            for m in everyone
        ],
    }
    if topic and body["chatType"] == "group":
        body["topic"] = topic[:250]
    resp = client.request("POST", "chats", content=msgspec.json.encode(body), idempotent=False)
    return msgspec.json.decode(resp.content, type=_Created).id


# ----------------------------------------------------------------------------------------------- summaries
def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _listing(names: Sequence[str]) -> str:
    shown = [_esc(n) for n in names[:MAX_LISTED]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


# Windows zone names (what Graph reports as originalStartTimeZone) → IANA: the CLDR table maintained in tzlocal.
_WINDOWS_TZ: dict[str, str] = {"UTC": "UTC", **win_tz}


def _zone(tz_name: str | None) -> tuple[ZoneInfo, str]:
    """The zone to show a meeting in and its label: an IANA name as is, a Windows name mapped (label kept as
    Graph gave it), anything unknown → UTC."""
    for candidate in (tz_name, _WINDOWS_TZ.get(tz_name or "")):
        if candidate:
            try:
                return ZoneInfo(candidate), tz_name or candidate
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC"), "UTC"


def _when(start: datetime | None, end: datetime | None, tz_name: str | None, all_day: bool | None) -> str:
    """`Tue 14 May 2025, 15:00–15:30 (W. Europe Standard Time)`: local time in the meeting's own time zone
    (IANA or Windows name), else UTC; always labelled with the zone shown."""
    if start is None:
        return "time unknown"
    zone, label = _zone(tz_name)
    s = start.astimezone(zone)
    if all_day:
        return f"{s:%a %d %b %Y} (all day)"
    text = f"{s:%a %d %b %Y, %H:%M}"
    if end is not None:
        e = end.astimezone(zone)
        text += f"–{e:%H:%M}" if e.date() == s.date() else f" – {e:%a %d %b %Y, %H:%M}"
    return f"{text} ({label})"


def _crm_links(
    con: duckdb.DuckDBPyConnection, match_table: str, key_column: str, tenant_id: str, oid: str, activity_id: str
) -> tuple[list[str], list[str]]:
    """(CRM account names, matched people as `Name (kind)`) of one activity, primary link first."""
    rows = con.execute(
        f"SELECT m.crm_kind, coalesce(a.name, pa.name) AS account, p.name AS person, p.kind, "
        f"coalesce(m.is_primary, false) AS prim FROM {match_table} m "
        "LEFT JOIN (SELECT crm_id, any_value(name) AS name FROM crm_accounts GROUP BY crm_id) a "
        "  ON m.crm_kind = 'account' AND a.crm_id = m.crm_id "
        "LEFT JOIN (SELECT crm_id, any_value(name) AS name, any_value(kind) AS kind, "
        "  any_value(account_id) AS account_id FROM crm_people GROUP BY crm_id) p "
        "  ON m.crm_kind <> 'account' AND p.crm_id = m.crm_id "
        "LEFT JOIN (SELECT crm_id, any_value(name) AS name FROM crm_accounts GROUP BY crm_id) pa "
        "  ON pa.crm_id = p.account_id "
        f"WHERE m.tenant_id = ? AND m.user_oid = ? AND m.{key_column} = ? "
        "ORDER BY prim DESC, m.crm_kind, m.crm_id",
        [tenant_id, oid, activity_id],
    ).fetchall()
    accounts: list[str] = []
    people: list[str] = []
    for _kind, account, person, person_kind, _prim in rows:
        if account and account not in accounts:
            accounts.append(account)
        if person:
            label = f"{person} ({(person_kind or 'contact').replace('_', ' ')})"
            if label not in people:
                people.append(label)
    return accounts, people


def _page(title: str, lines: list[tuple[str, str]], footer: str) -> str:
    body = "".join(f"<br><b>{_esc(k)}:</b> {v}" for k, v in lines if v)
    return f"<p><b>{title}</b>{body}</p><p><i>{_esc(footer)}</i></p>"


def _stored_activity(
    con: duckdb.DuckDBPyConnection, tenant_id: str, oid: str, kind: str, activity_id: str, columns: str
) -> tuple:
    """`columns` of the user's stored email or meeting (`kind`), or ActivityNotFound."""
    table, key = ("emails", "graph_id") if kind == "email" else ("meetings", "event_id")
    row = con.execute(
        f"SELECT {columns} FROM {table} WHERE tenant_id = ? AND user_oid = ? AND {key} = ? LIMIT 1",
        [tenant_id, oid, activity_id],
    ).fetchone()
    if row is None:
        raise ActivityNotFound(tenant_id, oid, kind, activity_id)
    return row


def render_meeting_summary(con: duckdb.DuckDBPyConnection, tenant_id: str, oid: str, event_id: str) -> str:
    """HTML summary of a stored meeting: subject, time with time zone, organizer, CRM accounts, matched contacts,
    attendee names. Never the meeting body."""
    columns = "subject, start_at, end_at, start_tz, is_all_day, organizer_name, organizer_address"
    row = _stored_activity(con, tenant_id, oid, "meeting", event_id, columns)
    subject, start, end, tz_name, all_day, org_name, org_address = row
    attendees = [
        r[0]
        for r in con.execute(
            "SELECT coalesce(nullif(trim(name), ''), address) FROM meeting_attendees "
            "WHERE tenant_id = ? AND user_oid = ? AND event_id = ? AND role <> 'resource' "
            "ORDER BY lower(coalesce(nullif(trim(name), ''), address))",
            [tenant_id, oid, event_id],
        ).fetchall()
    ]
    accounts, people = _crm_links(con, "meeting_crm_matches", "event_id", tenant_id, oid, event_id)
    lines = [
        ("When", _esc(_when(start, end, tz_name, all_day))),
        ("Organizer", _esc(org_name or org_address or "")),
        ("CRM account" + ("s" if len(accounts) > 1 else ""), _listing(accounts)),
        ("CRM contacts", _listing(people)),
        ("Attendees", _listing(list(dict.fromkeys(attendees)))),
    ]
    return _page(f"Meeting: {_esc(subject or '(no subject)')}", lines, "Shared from o365sync")


def render_email_summary(con: duckdb.DuckDBPyConnection, tenant_id: str, oid: str, graph_id: str) -> str:
    """HTML summary of a stored email: subject, date, sender name, CRM accounts and contacts. Never the body."""
    subject, at, from_name = _stored_activity(
        con, tenant_id, oid, "email", graph_id, "subject, coalesce(sent_at, received_at), from_name"
    )
    accounts, people = _crm_links(con, "email_crm_matches", "graph_id", tenant_id, oid, graph_id)
    lines = [
        ("Date", _esc(f"{at.astimezone(UTC):%a %d %b %Y, %H:%M} (UTC)") if at else ""),
        ("From", _esc(from_name or "")),
        ("CRM account" + ("s" if len(accounts) > 1 else ""), _listing(accounts)),
        ("CRM contacts", _listing(people)),
    ]
    return _page(f"Email: {_esc(subject or '(no subject)')}", lines, "Shared from o365sync")


def render_summary(
    con: duckdb.DuckDBPyConnection, tenant_id: str, oid: str, activity_kind: str, activity_id: str
) -> str:
    if activity_kind == "meeting":
        return render_meeting_summary(con, tenant_id, oid, activity_id)
    if activity_kind == "email":
        return render_email_summary(con, tenant_id, oid, activity_id)
    raise ValueError(f"activity kind must be one of {ACTIVITY_KINDS}")


# ----------------------------------------------------------------------------------------------- sharing
@dataclass(frozen=True)
class ShareResult:
    """`status`: posted (now) | already_posted (an earlier run recorded the message id; nothing sent) |
    uncertain (an earlier run recorded its intent but not a message id: it may have posted; nothing sent unless
    forced). Ids only."""

    share_id: str
    status: str
    target_kind: str
    target_id: str | None
    message_id: str | None
    refreshed: bool = False  # the channel list was refreshed to find the channel

    def as_dict(self) -> dict[str, str | None | bool]:
        return {
            "share_id": self.share_id,
            "status": self.status,
            "target_kind": self.target_kind,
            "target_id": self.target_id,
            "message_id": self.message_id,
            "refreshed": self.refreshed,
        }


def _from_record(rec: ShareRecord) -> ShareResult:
    return ShareResult(
        rec.share_id, "already_posted" if rec.posted else "uncertain", rec.target_kind, rec.target_id, rec.message_id
    )


def share_activity(
    settings: Settings,
    tenant_id: str,
    oid: str,
    activity_kind: str,
    activity_id: str,
    *,
    team_id: str | None = None,
    channel_id: str | None = None,
    members: Sequence[str] | None = None,
    topic: str | None = None,
    force: bool = False,
) -> ShareResult:
    """Post the summary of one stored activity to a channel (`team_id` + `channel_id`) or to a chat with
    `members` (object ids or UPNs; one member: 1:1 chat, several: group chat), once per (activity, target).

    Order: feature and consent checks (no network) → earlier share? (recorded message id: `already_posted`; intent
    without one: `uncertain`, nothing is sent unless `force`) → render (store only) → channel known (else one
    refresh, else ChannelNotFound) or chat created → intent recorded → message posted → message id recorded.
    A definite refusal by Graph drops the intent (a retry may post); an ambiguous failure (timeout, 5xx, network
    error, process death) keeps it, so a retry answers `uncertain` instead of posting twice."""
    if activity_kind not in ACTIVITY_KINDS:
        raise ValueError(f"activity kind must be one of {ACTIVITY_KINDS}")
    if (team_id is None) != (channel_id is None) or (team_id is None) == (not members):
        raise ValueError("give either team_id and channel_id, or chat members")
    target_kind = "channel" if team_id else "chat"
    target_key = [team_id or "", channel_id or ""] if target_kind == "channel" else list(members or [])
    share_id = share_id_for(tenant_id, oid, activity_kind, activity_id, target_kind, target_key)
    require_teams(settings, tenant_id, oid)
    with open_store(settings, tenant_id, write=False) as con:
        earlier = get_share(con, tenant_id, share_id)
        if earlier is not None and (earlier.posted or not force):
            log.info("teams share=%s user=%s status=%s", share_id, oid, _from_record(earlier).status)
            return _from_record(earlier)
        content = render_summary(con, tenant_id, oid, activity_kind, activity_id)
        known = find_channel(con, tenant_id, oid, team_id, channel_id) if team_id and channel_id else None
    refreshed = False
    with teams_client(settings, tenant_id, oid) as client:
        if target_kind == "channel":
            assert team_id is not None and channel_id is not None
            if known is None:
                refresh_channels(settings, tenant_id, oid, client)
                refreshed = True
                with open_store(settings, tenant_id, write=False) as con:
                    known = find_channel(con, tenant_id, oid, team_id, channel_id)
                if known is None:
                    raise ChannelNotFound(tenant_id, oid, team_id, channel_id)
            target_id = channel_id
        else:
            target_id = create_chat(client, oid, list(members or []), topic)
        record = ShareRecord(share_id, oid, target_kind, target_id, activity_kind, activity_id)
        with open_store(settings, tenant_id, write=True) as con:
            existing = begin_share(con, tenant_id, record, replace=force)
        if existing is not None:  # a concurrent run got there first
            return _from_record(existing)
        try:
            if target_kind == "channel":
                assert team_id is not None and channel_id is not None
                message_id = post_channel_message(client, team_id, channel_id, content)
            else:
                message_id = post_chat_message(client, target_id, content)
        except GraphError as exc:  # anything else (e.g. an unreadable 201 answer) may have posted: intent kept
            definite = isinstance(exc, ForbiddenRequest) or exc.status in _DEFINITE_REFUSAL
            if definite:
                with open_store(settings, tenant_id, write=True) as con:
                    abandon_share(con, tenant_id, share_id)
            log.warning(
                "teams share=%s user=%s post failed error=%s status=%s intent=%s",
                share_id,
                oid,
                type(exc).__name__,
                exc.status,
                "dropped" if definite else "kept",
            )
            raise
    with open_store(settings, tenant_id, write=True) as con:
        complete_share(con, tenant_id, share_id, message_id)
    log.info("teams share=%s user=%s target=%s posted message=%s", share_id, oid, target_kind, message_id)
    return ShareResult(share_id, "posted", target_kind, target_id, message_id, refreshed)
