"""Prefect task: import one user's mailbox, header-first.

Pages of header fields stream through: match against the CRM snapshot, fetch bodies only for matched messages,
persist matched rows with the folder cursor in one transaction, and let the page die. Unmatched messages are
only counted. Whatever fails, nothing that leaves this task (return value, logs, exception message) carries
more than ids, counts and error codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.auth import ReconnectNeeded, TokenProvider, scopes_for
from o365sync.graph import GraphClient
from o365sync.http import make_http_client
from o365sync.mail import fetch_bodies, iter_header_pages
from o365sync.settings import Settings, load_settings
from o365sync.store import (
    MailBatch,
    RunCounts,
    load_crm_frames,
    open_store,
    read_cursors,
    record_sync_state,
    write_mail_batch,
)
from o365sync.tenants import TenantConfig, load_tenant
from tasks.match import CrmIndex, build_index, match_participants

MAIL_FOLDERS = ("inbox", "sentitems")
FLUSH_MATCHED = 2000  # matched messages buffered before a write
FLUSH_PAGES = 10  # pages without enough matches still advance the cursor this often

log = logging.getLogger("o365sync.mailbox")


class MailboxImportError(Exception):
    """A mailbox import failed; the message names the user id and the error class only."""


class NoCrmSnapshot(Exception):
    pass


@dataclass
class _Buffer:
    emails: list[pl.DataFrame] = field(default_factory=list)
    participants: list[pl.DataFrame] = field(default_factory=list)
    matches: list[pl.DataFrame] = field(default_factory=list)
    matched: int = 0
    pages: int = 0


def _since(cursor: tuple[datetime, datetime | None] | None, scan_start: datetime) -> datetime:
    """Resume from the folder's watermark unless the scan window now reaches further back."""
    if cursor is None:
        return scan_start
    cursor_start, watermark = cursor
    if scan_start < cursor_start or watermark is None:
        return scan_start
    return watermark


def import_folder(settings: Settings, tenant: TenantConfig, user_oid: str, client: GraphClient, index: CrmIndex,
                  folder: str, since: datetime, scan_start: datetime) -> RunCounts:
    counts = RunCounts()
    buf = _Buffer()
    watermark: datetime | None = None

    def flush() -> None:
        nonlocal counts
        if watermark is None:
            return
        batch = MailBatch(
            emails=pl.concat(buf.emails) if buf.emails else _EMPTY_EMAILS,
            participants=pl.concat(buf.participants) if buf.participants else _EMPTY_PARTICIPANTS,
            matches=pl.concat(buf.matches) if buf.matches else _EMPTY_MATCHES,
            cursors={folder: watermark},
        )
        with open_store(settings, tenant.id, write=True) as con:
            new = write_mail_batch(con, tenant.id, user_oid, scan_start, batch)
        counts += RunCounts(imported=new)
        buf.emails.clear()
        buf.participants.clear()
        buf.matches.clear()
        buf.matched = buf.pages = 0

    for page in iter_header_pages(client, folder, since, settings.graph_page_size):
        messages = pl.from_arrow(page.messages)
        participants = pl.from_arrow(page.participants)
        matches = match_participants(participants.select("graph_id", "address"), index)
        kept_ids = matches["graph_id"].unique()
        kept = messages.filter(pl.col("graph_id").is_in(kept_ids.implode()))
        counts += RunCounts(scanned=messages.height, matched=kept.height, discarded=messages.height - kept.height)
        if kept.height:
            bodies = dict(fetch_bodies(client, kept["graph_id"].to_list()))
            kept = kept.with_columns(
                pl.col("graph_id").replace_strict(bodies, default=None, return_dtype=pl.String).alias("body_text"))
            buf.emails.append(kept.select(_EMAIL_FIELDS))
            buf.participants.append(
                participants.filter(pl.col("graph_id").is_in(kept_ids.implode())).select(
                    "graph_id", "role", "name", pl.col("address").str.strip_chars().str.to_lowercase()))
            buf.matches.append(matches)
        page_max = messages["received_at"].max()
        if page_max is not None:
            watermark = page_max if watermark is None else max(watermark, page_max)
        buf.matched += kept.height
        buf.pages += 1
        del messages, participants, matches, kept, page  # unmatched content dies here
        if buf.matched >= FLUSH_MATCHED or buf.pages >= FLUSH_PAGES:
            flush()
    flush()
    return counts


_EMAIL_FIELDS = ["graph_id", "folder", "internet_message_id", "conversation_id", "subject", "body_text",
                 "from_name", "from_address", "received_at", "sent_at", "has_attachments", "web_link"]
_TS = pl.Datetime("us", "UTC")
_EMPTY_EMAILS = pl.DataFrame(schema={
    "graph_id": pl.String, "folder": pl.String, "internet_message_id": pl.String, "conversation_id": pl.String,
    "subject": pl.String, "body_text": pl.String, "from_name": pl.String, "from_address": pl.String,
    "received_at": _TS, "sent_at": _TS, "has_attachments": pl.Boolean, "web_link": pl.String})
_EMPTY_PARTICIPANTS = pl.DataFrame(schema={"graph_id": pl.String, "role": pl.String, "name": pl.String,
                                           "address": pl.String})
_EMPTY_MATCHES = pl.DataFrame(schema={"graph_id": pl.String, "crm_id": pl.String, "crm_kind": pl.String,
                                      "matched_address": pl.String})


def import_mailbox_now(settings: Settings, tenant_id: str, user_oid: str) -> RunCounts:
    """Import everything in the scan window for one mailbox (resuming from its cursors)."""
    tenant = load_tenant(settings, tenant_id)
    with open_store(settings, tenant_id, write=False) as con:
        people, accounts, scan_start = load_crm_frames(con)
        cursors = read_cursors(con, tenant_id, user_oid)
    if scan_start is None:
        raise NoCrmSnapshot(f"tenant {tenant_id} has no CRM snapshot yet")
    index = build_index(people, accounts, tenant.domains)
    counts = RunCounts()
    with TokenProvider(settings, tenant_id, user_oid, scopes_for(tenant.features)) as provider, \
            make_http_client(settings) as http:
        client = GraphClient(http, settings.graph_url, provider, max_in_flight=settings.max_requests_per_mailbox)
        for folder in MAIL_FOLDERS:
            since = _since(cursors.get(folder), scan_start)
            counts += import_folder(settings, tenant, user_oid, client, index, folder, since, scan_start)
    return counts


@task(name="import-mailbox", persist_result=False, cache_policy=NO_CACHE)
def import_mailbox(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    """One task per mailbox. Returns ids/counts only; failures are recorded in the user's sync state."""
    logger = get_run_logger()
    settings = load_settings()
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "importing")
    try:
        counts = import_mailbox_now(settings, tenant_id, user_oid)
    except ReconnectNeeded as exc:
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "reconnect_needed", error=exc.error)
        logger.warning("mailbox user=%s needs reconnect error=%s", user_oid, exc.error)
        return {"user_oid": user_oid, "status": "reconnect_needed", "scanned": 0, "matched": 0, "imported": 0,
                "discarded": 0}
    except Exception as exc:
        error = type(exc).__name__
        with open_store(settings, tenant_id, write=True) as con:
            record_sync_state(con, tenant_id, user_oid, "failed", error=error)
        # Not chained: the original message may quote mail content, and Prefect stores exception text.
        log.error("mailbox import failed user=%s error=%s", user_oid, error)
        raise MailboxImportError(f"mailbox import failed for user {user_oid}: {error}") from None
    with open_store(settings, tenant_id, write=True) as con:
        record_sync_state(con, tenant_id, user_oid, "idle", counts)
    logger.info("mailbox user=%s scanned=%d matched=%d imported=%d discarded=%d", user_oid, counts.scanned,
                counts.matched, counts.imported, counts.discarded)
    return {"user_oid": user_oid, "status": "ok", "scanned": counts.scanned, "matched": counts.matched,
            "imported": counts.imported, "discarded": counts.discarded}
