"""A user leaves, a subscription ends: the policy, its locked state file and the audit (flows/offboarding.py runs
them as the Prefect flows `offboard-user` and `end-subscription`).

`offboard_user_now(settings, tenant_id, user_oid)` follows the tenant's policy (`offboarding`,
`offboarding_grace_days`):
- the user's token cache and connection metadata are removed at once (no sync can run for them any more);
- `retain`: nothing else; their imported data stays, `offboarding_status` shows them as retained;
- `delete`: once the grace period has passed, every row of the user (activities, sync state, cursors, Notetaker
  rows, channels, shares) is erased with `o365sync.erasure.erase` (compaction of the user's bucket file and the
  tenant file + snapshot + audit). With a grace
  period the decision is recorded in `tenant_dir/offboarding.json` (ids and times only); the daily retention flow,
  or offboarding the user again, completes the deletions that are due.

`end_subscription_now(settings, tenant_id)` deletes every file of the tenant (store, snapshot, exports, CRM snapshot and
credentials, token caches, registry entry); only the audit log entry remains.

Everything recorded is ids, times and counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from o365sync.auth import OFFBOARDING_FILE, disconnect, offboarding_records, token_path
from o365sync.erasure import Scope, append_audit, audit_path, erase
from o365sync.settings import Settings
from o365sync.tenants import load_tenant, tenant_dir

STATE_FILE = OFFBOARDING_FILE  # the web callback reads it too: an offboarded user is not connected again


@contextlib.contextmanager
def _state(settings: Settings, tenant_id: str) -> Iterator[dict[str, dict]]:
    """The tenant's offboarding records {oid: {policy, offboarded_at, delete_after, deleted_at}}, locked and
    written back atomically on exit."""
    folder = tenant_dir(settings, tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_FILE
    with open(folder / "offboarding.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = json.loads(path.read_text()) if path.exists() else {}
        before = json.dumps(records, sort_keys=True)
        yield records
        if json.dumps(records, sort_keys=True) != before:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(records, indent=2, sort_keys=True))
            os.replace(tmp, path)


def offboarding_status(settings: Settings, tenant_id: str) -> dict[str, dict]:
    """{user oid: {policy, offboarded_at, delete_after, deleted_at}} (ISO times; `deleted_at` None = pending or
    retained) — for `o365sync status` and `o365sync offboard status`."""
    return offboarding_records(settings, tenant_id)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def offboard_user_now(
    settings: Settings, tenant_id: str, user_oid: str, actor: str = "flow:offboard-user", now: datetime | None = None
) -> dict:
    """Apply the tenant's offboarding policy to one user (idempotent: a re-run keeps the first decision and its
    grace period, and completes the deletion once it is due). Returns the user's record plus counts."""
    tenant = load_tenant(settings, tenant_id)
    now = now or datetime.now(UTC)
    token_path(settings, tenant_id, user_oid)  # validates the id
    with _state(settings, tenant_id) as records:
        record = records.get(user_oid)
        reconnected = token_path(settings, tenant_id, user_oid).exists()
        # A new decision: first offboarding, a user who reconnected after their data was deleted, or a retained
        # user whose tenant switched to `delete`. Otherwise a re-run keeps the first decision (and grace period).
        new = (
            record is None
            or (record["deleted_at"] is not None and reconnected)
            or (record["deleted_at"] is None and record["policy"] != tenant.offboarding)
        )
        if new:
            record = {
                "policy": tenant.offboarding,
                "offboarded_at": _iso(now),
                "deleted_at": None,
                "delete_after": _iso(now + timedelta(days=tenant.offboarding_grace_days))
                if tenant.offboarding == "delete"
                else None,
            }
            records[user_oid] = record
    assert record is not None  # an existing decision, or the new one just made
    had_token = token_path(settings, tenant_id, user_oid).exists()
    disconnect(settings, tenant_id, user_oid)  # sync stops now, whatever the policy
    if new:
        append_audit(
            audit_path(settings, tenant_id),
            {
                "at": _iso(now),
                "actor": actor,
                "action": "offboard",
                "tenant_id": tenant_id,
                "ids": {"user_oids": [user_oid]},
                "policy": record["policy"],
                "delete_after": record["delete_after"],
                "token_caches_removed": int(had_token),
                "complete": True,
            },
        )
    out = {"user_oid": user_oid, **record, "deleted_rows": 0}
    if (
        record["policy"] == "delete"
        and record["deleted_at"] is None
        and datetime.fromisoformat(record["delete_after"]) <= now
    ):
        out |= _delete_user(settings, tenant_id, user_oid, actor)
    return out


def readmit_user_now(
    settings: Settings, tenant_id: str, user_oid: str, actor: str = "cli:readmit", now: datetime | None = None
) -> dict:
    """Let an offboarded user connect again (the connect callback refuses them while a record exists): drops their
    record, which also cancels a deletion still pending; data already deleted stays deleted. Audited."""
    load_tenant(settings, tenant_id)
    token_path(settings, tenant_id, user_oid)  # validates the id
    record = None
    if user_oid in offboarding_status(settings, tenant_id):  # checked first: a typo changes nothing
        with _state(settings, tenant_id) as records:
            record = records.pop(user_oid, None)
    if record is None:
        raise LookupError(f"user {user_oid} of tenant {tenant_id} is not offboarded; nothing to readmit")
    append_audit(
        audit_path(settings, tenant_id),
        {
            "at": _iso(now or datetime.now(UTC)),
            "actor": actor,
            "action": "readmit",
            "tenant_id": tenant_id,
            "ids": {"user_oids": [user_oid]},
            "policy": record["policy"],
            "pending_deletion_cancelled": record["policy"] == "delete" and record["deleted_at"] is None,
            "complete": True,
        },
    )
    return {"user_oid": user_oid, **record}


def _delete_user(settings: Settings, tenant_id: str, user_oid: str, actor: str) -> dict:
    result = erase(settings, tenant_id, Scope.user(user_oid), actor=actor, reason="offboarding")
    with _state(settings, tenant_id) as records:
        records[user_oid]["deleted_at"] = _iso(datetime.now(UTC))
        record = dict(records[user_oid])
    return {**record, "deleted_rows": result.deleted}


def complete_due_offboardings(
    settings: Settings, tenant_id: str, now: datetime | None = None, actor: str = "flow:retention"
) -> list[dict]:
    """Erase the users whose `delete` grace period has passed (run by the daily retention flow)."""
    now = now or datetime.now(UTC)
    due = [
        oid
        for oid, r in offboarding_status(settings, tenant_id).items()
        if r.get("policy") == "delete"
        and r.get("deleted_at") is None
        and r.get("delete_after")
        and datetime.fromisoformat(r["delete_after"]) <= now
    ]
    return [{"user_oid": oid, **_delete_user(settings, tenant_id, oid, actor)} for oid in due]


def end_subscription_now(settings: Settings, tenant_id: str, actor: str = "flow:end-subscription") -> dict:
    result = erase(settings, tenant_id, Scope.tenant(), actor=actor, reason="subscription_end")
    return {
        "users": len(result.ids.get("user_oids", [])),
        "rows": result.deleted,
        "files": result.files_removed,
        "bytes": result.bytes_before,
    }
