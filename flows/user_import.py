"""Prefect flow `user-import`: one user's import, started the moment they connect or re-consent (the web callback
creates a run of `user-import/all-tenants` on the tenant's shard queue, or of the tenant's `user-import-<tenant>`
deployment under `o365sync serve`; app/import_trigger.py) instead of at the tenant's next slot. Parameters: the
tenant id and the user's object id only.

The body is library code (`o365sync.sync.user_import.import_user_now`: CRM snapshot if stale, the user's mail and
calendar, the analysts' snapshot, under the tenant's per-feature sync locks); its steps here are the same Prefect
tasks the tenant flows run, so the run shows them and their counts. Results are not persisted; ids and counts only.
"""

from __future__ import annotations

from prefect import get_run_logger

from flows._reporting import run_name
from flows.failures import flow
from flows.tenant_sync import USER_TASKS
from o365sync.settings import load_settings
from o365sync.sync.user_import import import_user_now
from tasks.crm_snapshot import snapshot_crm

TASK_NAMES = {"email": "sync-mailbox", "calendar": "sync-calendar"}


def _run_name() -> str:
    from prefect.runtime import flow_run

    return f"{run_name('user-import')()} / {flow_run.parameters.get('user_id', '')}"


@flow(name="user-import", flow_run_name=_run_name, persist_result=False)
def user_import(tenant_id: str, user_id: str) -> dict[str, int]:
    def sync_feature(feature: str) -> dict:
        task = USER_TASKS[feature].with_options(task_run_name=f"{TASK_NAMES[feature]}-{user_id}")
        return task(tenant_id, user_id)

    return import_user_now(
        load_settings(),
        tenant_id,
        user_id,
        sync_feature=sync_feature,
        refresh_crm=lambda: snapshot_crm(tenant_id),
        log=get_run_logger(),
    )


if __name__ == "__main__":
    import sys

    print(user_import(sys.argv[1], sys.argv[2]))
