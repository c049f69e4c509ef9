"""Export a conversation (JSON + one `.eml` per message) or a meeting / series (JSON) on a user's request.

Exports are written under `tenant_dir/exports/` (the tenant's region) and nowhere else: the content goes into these
files only, never into logs, Prefect or the audit log. Any erasure of the tenant removes every export file (they may
hold erased rows), see docs/DATA_LIFECYCLE.md. Ids in file names are hashed (Graph ids carry '/', '+', '=').
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import duckdb

from o365sync.analytics import export_lock
from o365sync.settings import Settings
from o365sync.store import open_store, store_path, write_synced
from o365sync.tenants import load_tenant, tenant_dir


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the export folder
    kind: str  # conversation | meeting | series
    items: int  # messages or meeting instances
    files: int


def exports_dir(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, tenant_id) / "exports"


_CONVERSATION = "tenant_id = ? AND conversation_id = ? AND (?::VARCHAR IS NULL OR user_oid = ?)"


def _meeting_scope(
    event_id: str | None, series_id: str | None, tenant_id: str, user_oid: str | None
) -> tuple[str, list]:
    key = event_id or series_id or ""
    match = "event_id = ?" if event_id else "(series_master_id = ? OR event_id = ?)"
    return (
        f"tenant_id = ? AND {match} AND (?::VARCHAR IS NULL OR user_oid = ?)",
        [tenant_id, *([key] if event_id else [key, key]), user_oid, user_oid],
    )


def _require_rows(settings: Settings, tenant_id: str, table: str, scope: str, params: list, what: str) -> None:
    """TenantNotFound / LookupError ("nothing matched") before anything is created: the export lock makes a
    file, and reading a tenant without a store would create one."""
    load_tenant(settings, tenant_id)
    found = False
    if store_path(settings, tenant_id).exists():
        with open_store(settings, tenant_id, write=False) as con:
            found = con.execute(f"SELECT 1 FROM {table} WHERE {scope} LIMIT 1", params).fetchone() is not None
    if not found:
        raise LookupError(f"nothing matched: {what} is not stored in tenant {tenant_id}")


def _slug(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> list[dict]:
    cur = con.execute(sql, params)
    columns = [d[0] for d in cur.description]
    return [dict(zip(columns, r, strict=True)) for r in cur.fetchall()]


def _iso(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _target(settings: Settings, tenant_id: str, kind: str, key: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    folder = exports_dir(settings, tenant_id) / f"{kind}-{_slug(key)}-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    os.chmod(folder, 0o700)
    return folder


def resolve_conversation(
    con: duckdb.DuckDBPyConnection, tenant_id: str, graph_id: str, user_oid: str | None = None
) -> str:
    """The conversation id of a stored message (LookupError if the message is not stored or has none)."""
    row = con.execute(
        "SELECT conversation_id FROM emails WHERE tenant_id = ? AND graph_id = ? AND "
        "(?::VARCHAR IS NULL OR user_oid = ?) AND conversation_id IS NOT NULL LIMIT 1",
        [tenant_id, graph_id, user_oid, user_oid],
    ).fetchone()
    if row is None:
        raise LookupError(
            f"nothing matched: message {graph_id} is not stored in tenant {tenant_id} (or has no conversation id)"
        )
    return row[0]


def _mailbox(name: str | None, address: str) -> Address | str:
    try:
        return Address(display_name=name or "", addr_spec=address.strip())
    except (ValueError, IndexError):
        return address.strip()


def to_eml(message: dict) -> bytes:
    """An RFC 5322 message from a stored email: From/To/Cc/Date/Subject/Message-ID and the text body."""
    msg = EmailMessage()
    if message.get("from_address"):
        msg["From"] = _mailbox(message.get("from_name"), message["from_address"])
    for role, header in (("to", "To"), ("cc", "Cc")):
        people = [_mailbox(p["name"], p["address"]) for p in message["participants"] if p["role"] == role]
        if people:
            msg[header] = people
    when = message.get("sent_at") or message.get("received_at")
    if isinstance(when, datetime):
        msg["Date"] = format_datetime(when)
    msg["Subject"] = (message.get("subject") or "").replace("\r", " ").replace("\n", " ")
    if message.get("internet_message_id"):
        msg["Message-ID"] = message["internet_message_id"]
    msg["X-O365Sync-Conversation-Id"] = message.get("conversation_id") or ""
    msg.set_content(message.get("body_text") or "")
    return msg.as_bytes()


def export_conversation(
    settings: Settings,
    tenant_id: str,
    conversation_id: str | None = None,
    graph_id: str | None = None,
    user_oid: str | None = None,
    eml: bool = True,
) -> ExportResult:
    """Every stored message of a conversation (one user's copy, or every user's with `user_oid` None) as
    `conversation.json` (headers, participants, CRM links, body text) plus `messages/NNN.eml`. Holds the shared
    export lock from read to write, so an erasure deletes this export or runs before it reads."""
    if (conversation_id is None) == (graph_id is None):
        raise ValueError("give a conversation id or a message's graph id")
    whose = f" of user {user_oid}" if user_oid else ""
    if conversation_id is None:
        _require_rows(
            settings,
            tenant_id,
            "emails",
            "tenant_id = ? AND graph_id = ? AND conversation_id IS NOT NULL AND (?::VARCHAR IS NULL OR user_oid = ?)",
            [tenant_id, graph_id, user_oid, user_oid],
            f"message {graph_id}{whose} (with a conversation id)",
        )
    else:
        _require_rows(
            settings,
            tenant_id,
            "emails",
            _CONVERSATION,
            [tenant_id, conversation_id, user_oid, user_oid],
            f"conversation {conversation_id}{whose}",
        )
    with export_lock(settings, tenant_id, exclusive=False):
        return _export_conversation(settings, tenant_id, conversation_id, graph_id, user_oid, eml)


_LINK_FIELDS = ("crm_id", "crm_kind", "matched_address", "is_primary")


def _attach(
    con: duckdb.DuckDBPyConnection,
    items: list[dict],
    name: str,
    table: str,
    fields: tuple[str, ...],
    order: str,
    scope: tuple[str, list],
) -> None:
    """Each item (a message or meeting row of `scope`: the keyed condition and its parameters) gets `name`: the
    `fields` of its rows in `table` (an email_* or meeting_* detail table; same user_oid and key), by `order`."""
    key = "graph_id" if table.startswith("email") else "event_id"
    keyed, params = scope
    sql = f"SELECT user_oid, {key}, {', '.join(fields)} FROM {table} WHERE {keyed} ORDER BY {order}"
    details = _rows(con, sql, params)
    for item in items:
        k = (item["user_oid"], item[key])
        item[name] = [{x: d[x] for x in fields} for d in details if (d["user_oid"], d[key]) == k]


def _export_conversation(
    settings: Settings,
    tenant_id: str,
    conversation_id: str | None,
    graph_id: str | None,
    user_oid: str | None,
    eml: bool,
) -> ExportResult:
    """Every stored message of a conversation (one user's copy, or every user's with `user_oid` None) as
    `conversation.json` (headers, participants, CRM links, body text) plus `messages/NNN.eml`."""
    with open_store(settings, tenant_id, write=False) as con:
        if conversation_id is None:
            conversation_id = resolve_conversation(con, tenant_id, graph_id or "", user_oid)
        params, scope = [tenant_id, conversation_id, user_oid, user_oid], _CONVERSATION
        messages = _rows(
            con,
            f"SELECT * EXCLUDE (tenant_id) FROM emails WHERE {scope} ORDER BY coalesce(sent_at, received_at), graph_id",
            params,
        )
        keyed = (f"(user_oid, graph_id) IN (SELECT (user_oid, graph_id) FROM emails WHERE {scope})", params)
        fields = ("role", "name", "address")
        _attach(con, messages, "participants", "email_participants", fields, "role, address", keyed)
        _attach(con, messages, "crm_links", "email_crm_matches", _LINK_FIELDS, "crm_id", keyed)
    if not messages:
        raise LookupError(
            f"nothing matched: conversation {conversation_id} has no stored messages in tenant "
            f"{tenant_id}{f' for user {user_oid}' if user_oid else ''}"
        )
    folder = _target(settings, tenant_id, "conversation", conversation_id)
    doc = {
        "tenant_id": tenant_id,
        "conversation_id": conversation_id,
        "user_oid": user_oid,
        "exported_at": datetime.now(UTC).isoformat(),
        "messages": messages,
    }
    write_synced(folder / "conversation.json", json.dumps(doc, indent=2, default=_iso).encode())
    files = 1
    if eml:
        (folder / "messages").mkdir()
        for n, m in enumerate(messages, 1):
            write_synced(folder / "messages" / f"{n:03d}.eml", to_eml(m))
            files += 1
    return ExportResult(folder, "conversation", len(messages), files)


def export_meeting(
    settings: Settings,
    tenant_id: str,
    event_id: str | None = None,
    series_id: str | None = None,
    user_oid: str | None = None,
) -> ExportResult:
    """A meeting instance (`event_id`) or every stored occurrence of a series (`series_id`) as `meeting.json`:
    the meeting rows, attendees and CRM links (under the shared export lock, like conversations)."""
    if (event_id is None) == (series_id is None):
        raise ValueError("give an event id or a series id")
    _require_rows(
        settings,
        tenant_id,
        "meetings",
        *_meeting_scope(event_id, series_id, tenant_id, user_oid),
        f"{'meeting' if event_id else 'series'} {event_id or series_id}" + (f" of user {user_oid}" if user_oid else ""),
    )
    with export_lock(settings, tenant_id, exclusive=False):
        return _export_meeting(settings, tenant_id, event_id, series_id, user_oid)


def _export_meeting(
    settings: Settings, tenant_id: str, event_id: str | None, series_id: str | None, user_oid: str | None
) -> ExportResult:
    """A meeting instance (`event_id`) or every stored occurrence of a series (`series_id`) as `meeting.json`:
    the meeting rows, attendees and CRM links."""
    key = event_id or series_id or ""
    scope, params = _meeting_scope(event_id, series_id, tenant_id, user_oid)
    with open_store(settings, tenant_id, write=False) as con:
        meetings = _rows(
            con, f"SELECT * EXCLUDE (tenant_id) FROM meetings WHERE {scope} ORDER BY start_at, event_id", params
        )
        keyed = (f"(user_oid, event_id) IN (SELECT (user_oid, event_id) FROM meetings WHERE {scope})", params)
        fields = ("role", "name", "address", "response")
        _attach(con, meetings, "attendees", "meeting_attendees", fields, "role, address", keyed)
        _attach(con, meetings, "crm_links", "meeting_crm_matches", _LINK_FIELDS, "crm_id", keyed)
    if not meetings:
        raise LookupError(
            f"nothing matched: {'meeting' if event_id else 'series'} {key} is not stored in tenant "
            f"{tenant_id}{f' for user {user_oid}' if user_oid else ''}"
        )
    kind = "meeting" if event_id else "series"
    folder = _target(settings, tenant_id, kind, key)
    doc = {
        "tenant_id": tenant_id,
        f"{'event' if event_id else 'series'}_id": key,
        "user_oid": user_oid,
        "exported_at": datetime.now(UTC).isoformat(),
        "meetings": meetings,
    }
    write_synced(folder / "meeting.json", json.dumps(doc, indent=2, default=_iso).encode())
    return ExportResult(folder, kind, len(meetings), 1)
