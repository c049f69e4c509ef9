"""Prefect flow: a tenant's initial import — CRM snapshot, then one task per connected mailbox, then a summary.

Parameters, task names, logs and the artifact carry ids and counts only (Prefect keeps all of them).
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from o365sync.auth import connected_users
from o365sync.settings import load_settings
from o365sync.store import publish_snapshot
from tasks.crm_snapshot import snapshot_crm
from tasks.mailbox_import import import_mailbox

MAILBOXES_IN_PARALLEL = 4


class ImportIncomplete(Exception):
    """Some mailboxes failed; their sync state says why."""


def artifact_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}-{re.sub(r'[^a-z0-9-]+', '-', tenant_id.lower())}"[:100]


@flow(name="initial-import", persist_result=False,
      task_runner=ThreadPoolTaskRunner(max_workers=MAILBOXES_IN_PARALLEL))
def initial_import(tenant_id: str) -> dict[str, int]:
    logger = get_run_logger()
    settings = load_settings()
    crm = snapshot_crm(tenant_id)
    users = connected_users(settings, tenant_id)
    futures = [import_mailbox.with_options(task_run_name=f"import-mailbox-{u.oid}").submit(tenant_id, u.oid)
               for u in users]
    wait(futures)
    rows, failed = [], 0
    for user, future in zip(users, futures, strict=True):
        if future.state.is_completed():
            rows.append(future.result())
        else:
            failed += 1
            rows.append({"user_oid": user.oid, "status": "failed", "scanned": 0, "matched": 0, "imported": 0,
                         "discarded": 0})
    totals = {k: sum(int(r[k]) for r in rows) for k in ("scanned", "matched", "imported", "discarded")}
    totals |= {"mailboxes": len(users), "failed": failed,
               "reconnect_needed": sum(r["status"] == "reconnect_needed" for r in rows),
               "crm_people": int(crm["people"]), "crm_accounts": int(crm["accounts"])}
    create_table_artifact(key=artifact_key("initial-import", tenant_id), table=rows,
                          description=f"Initial import of tenant {tenant_id}: per-user counts")
    publish_snapshot(settings, tenant_id)
    logger.info("initial import tenant=%s %s", tenant_id, " ".join(f"{k}={v}" for k, v in totals.items()))
    if failed:
        raise ImportIncomplete(f"{failed} of {len(users)} mailboxes failed in tenant {tenant_id}")
    return totals


if __name__ == "__main__":
    import sys

    print(initial_import(sys.argv[1]))
