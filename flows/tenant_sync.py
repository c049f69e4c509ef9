"""The body shared by the tenant flows: CRM snapshot if stale, one task per connected mailbox, a summary.

Only one sync of a tenant runs at a time (a per-tenant file lock, on top of the deployments' concurrency
limits); a second one skips instead of doing the same work twice. In scheduled runs, users whose last failure
set a retry time in the future are left alone until then.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from o365sync.auth import connected_users
from o365sync.settings import load_settings
from o365sync.store import (
    latest_crm_snapshot_at,
    open_store,
    publish_snapshot,
    read_crm_state,
    read_sync_states,
)
from o365sync.tenants import tenant_dir
from tasks.crm_snapshot import snapshot_crm
from tasks.mailbox_task import sync_mailbox

COUNT_KEYS = ("scanned", "matched", "imported", "discarded")


class SyncIncomplete(Exception):
    """Some mailboxes failed; their sync state says why and when they are retried."""


def artifact_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', tenant_id.lower())}"[:100]


@contextlib.contextmanager
def tenant_sync_lock(path) -> Iterator[bool]:  # noqa: ANN001
    """Non-blocking: yields False when another process is syncing this tenant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def sync_tenant(tenant_id: str, artifact_prefix: str, crm_max_age: timedelta,
                respect_backoff: bool = True) -> dict[str, int]:
    """`respect_backoff=False` (a run an operator starts by hand) retries failed mailboxes now."""
    logger = get_run_logger()
    settings = load_settings()
    with tenant_sync_lock(tenant_dir(settings, tenant_id) / "sync.lock") as acquired:
        if not acquired:
            logger.warning("tenant=%s is already being synced by another run; skipping", tenant_id)
            return {"skipped": 1}
        now = datetime.now(UTC)
        with open_store(settings, tenant_id, write=False) as con:
            snapshot_at = latest_crm_snapshot_at(con)
            states = {s["user_oid"]: s for s in read_sync_states(con, tenant_id)}
        crm: dict = {}
        if snapshot_at is None or now - snapshot_at >= crm_max_age:
            try:
                crm = snapshot_crm(tenant_id)
            except Exception as exc:  # a CRM outage must not stop mail sync while an earlier snapshot exists
                if snapshot_at is None:
                    raise
                logger.warning("tenant=%s CRM snapshot failed (%s); matching against the snapshot of %s",
                               tenant_id, type(exc).__name__, snapshot_at.isoformat(timespec="seconds"))
        users = connected_users(settings, tenant_id)
        due = [u for u in users
               if not respect_backoff or (states.get(u.oid, {}).get("next_retry_at") or now) <= now]
        futures = [sync_mailbox.with_options(task_run_name=f"sync-mailbox-{u.oid}").submit(tenant_id, u.oid)
                   for u in due]
        wait(futures)
        rows, failed = [], 0
        for user, future in zip(due, futures, strict=True):
            if future.state.is_completed():
                rows.append(future.result())
            else:
                failed += 1
                rows.append({"user_oid": user.oid, "status": "failed", **dict.fromkeys(COUNT_KEYS, 0),
                             "excluded": ""})
        for user in users:
            if user not in due:
                rows.append({"user_oid": user.oid, "status": "waiting_for_retry", **dict.fromkeys(COUNT_KEYS, 0),
                             "excluded": ""})
        with open_store(settings, tenant_id, write=False) as con:
            after = {s["user_oid"]: s for s in read_sync_states(con, tenant_id)}
        for row in rows:
            state = after.get(row["user_oid"], {})
            row |= {"stage": state.get("stage", ""), "last_success": _iso(state.get("last_success_at")),
                    "failures": state.get("consecutive_failures", 0), "next_retry": _iso(state.get("next_retry_at")),
                    "last_error": state.get("last_error") or ""}
        totals = {k: sum(int(r[k]) for r in rows) for k in COUNT_KEYS}
        totals |= {"mailboxes": len(users), "failed": failed, "waiting": len(users) - len(due),
                   "reconnect_needed": sum(r["status"] == "reconnect_needed" for r in rows),
                   "crm_refreshed": int(bool(crm))}
        totals |= {f"crm_{k}": int(v) for k, v in crm.items() if k in ("people", "accounts", "changed")}
        with open_store(settings, tenant_id, write=False) as con:
            crm_state = read_crm_state(con) or {}
        rows.append({"user_oid": "(crm)", "status": crm_state.get("status", "never_refreshed"),
                     **dict.fromkeys(COUNT_KEYS, 0), "excluded": "", "stage": crm.get("mode", ""),
                     "last_success": _iso(crm_state.get("last_success_at")), "failures": 0, "next_retry": "",
                     "last_error": crm_state.get("last_error") or ""})
        create_table_artifact(key=artifact_key(artifact_prefix, tenant_id), table=rows,
                              description=f"{artifact_prefix} of tenant {tenant_id}: per-user status and counts")
        publish_snapshot(settings, tenant_id)
    logger.info("%s tenant=%s %s", artifact_prefix, tenant_id, " ".join(f"{k}={v}" for k, v in totals.items()))
    if failed:
        raise SyncIncomplete(f"{failed} of {len(due)} mailboxes failed in tenant {tenant_id}")
    return totals
