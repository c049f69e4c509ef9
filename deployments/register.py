"""Register the per-tenant deployments with a Prefect server for workers, instead of `o365sync serve`:

    PREFECT_API_URL=http://<server>:4200/api uv run python -m deployments.register --work-pool o365sync
    prefect worker start --pool o365sync

Re-run it after adding, removing or re-sharding a tenant (or from a timer: it is idempotent); deployments of
tenants no longer registered are deleted, so their schedules disappear; workers pick up new deployments without a
restart. Each tenant's deployments target its shard's work queue `shard-<name>` (`deployments.shards`).
Each deployment carries what its runs need to find the tenants wherever the worker
was started (job variables of a process worker): the settings of this shell and its `.env` as O365SYNC_*
variables (paths made absolute; secrets left out, Prefect stores job variables), the Prefect privacy settings of
`o365sync.prefect_env.PRIVACY_DEFAULTS`, and, when this directory has a `.env`, this directory as the runs' working
directory so they read the same `.env` (secrets included). Workers on other machines need the same paths.
Names `o365sync serve` manages on the same server are refused (`deployments.ownership`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import cast, get_args
from uuid import UUID

from pydantic import SecretStr

from o365sync.prefect_env import PRIVACY_DEFAULTS, configure_prefect_env, prefect_home_for
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, list_tenants


def _absolute(value: object) -> object:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, dict):
        return {k: _absolute(v) for k, v in value.items()}
    return value


def worker_job_variables(settings: Settings, cwd: Path | None = None) -> dict:
    """Job variables (process work pool) that give a run this shell's settings: `env` and maybe `working_dir`."""
    cwd = cwd or Path.cwd()
    fields = Settings.model_fields
    secret = {n for n, f in fields.items() if SecretStr in (f.annotation, *get_args(f.annotation))}
    env = dict(PRIVACY_DEFAULTS)
    for name in sorted((settings.model_fields_set | {"data_dir"}) - secret):
        value = _absolute(getattr(settings, name))
        if value is not None:
            env[f"O365SYNC_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    # Prefect's home of the run (where Prefect would write its local storage) inside the data dir, as `serve` does.
    env["PREFECT_HOME"] = str(prefect_home_for(settings.data_dir))
    out: dict = {"env": env}
    if (cwd / ".env").is_file():
        out["working_dir"] = str(cwd.resolve())
    return out


def register_deployments(
    settings: Settings,
    work_pool_name: str,
    *,
    tenants: list[TenantConfig] | None = None,
    paused: dict[str, bool] | None = None,
    prune: bool = True,
) -> dict[str, UUID]:
    """Create or update the per-tenant deployments on the current Prefect API for `prefect worker start --pool
    <work_pool_name>` (with `worker_job_variables`), each on its tenant's shard queue (`deployments.shards`).
    Returns full name -> id. Raises DeploymentOwnerConflict, before writing anything, when `o365sync serve`
    manages one of the names on this server.

    `tenants`: only these (default: every registered one). `paused`: deployment name -> paused (default: not
    paused). `prune`: also delete the pool's per-tenant deployments of tenants no longer registered (or without
    the email feature), so their schedules disappear."""
    from deployments.ownership import refuse_foreign
    from deployments.schedules import build_deployments
    from deployments.shards import shard_queue
    from deployments.user_import import user_import_deployments

    deployments = build_deployments(settings, tenants=tenants) + user_import_deployments(settings, tenants=tenants)
    refuse_foreign(deployments, work_pool_name)
    ensure_work_pool(work_pool_name)
    shards = {t.id: t.shard for t in (tenants if tenants is not None else list_tenants(settings))}
    job_variables = worker_job_variables(settings)
    out = {}
    for d in deployments:
        d.job_variables = job_variables
        d.work_queue_name = shard_queue(shards.get(str(d.parameters["tenant_id"])))
        d.paused = (paused or {}).get(d.name, False)
        out[d.full_name] = cast(UUID, d.apply(work_pool_name=work_pool_name))  # outside an event loop: the id
    if prune and tenants is None:
        for name in prune_deployments(work_pool_name, keep=set(out)):
            print(f"removed {name} (its tenant is no longer registered with the email feature)")
    return out


def ensure_work_pool(name: str) -> None:
    """Create the process work pool `name` unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )


def prune_deployments(work_pool_name: str, keep: set[str]) -> list[str]:
    """Delete the per-tenant deployments of `work_pool_name` (a deployment named `<flow>-<tenant>` with that tenant
    as parameter, as `deployments.schedules` builds them) whose full name is not in `keep`. Returns their names."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    from deployments.schedules import KINDS, deployment_name
    from deployments.user_import import USER_IMPORT

    removed = []
    kinds = [*KINDS, USER_IMPORT]
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=kinds)))}
        offset = 0
        while batch := client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[work_pool_name])), limit=200, offset=offset
        ):
            offset += len(batch)
            for d in batch:
                kind, tenant = flows.get(d.flow_id), d.parameters.get("tenant_id")
                full = f"{kind}/{d.name}"
                if kind and isinstance(tenant, str) and d.name == deployment_name(kind, tenant) and full not in keep:
                    client.delete_deployment(d.id)
                    removed.append(full)
                    offset -= 1
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.register", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work-pool", required=True, help="work pool the workers poll (e.g. o365sync)")
    args = parser.parse_args(argv)
    configure_prefect_env()
    from deployments.prefect_server import configured_api_url
    from o365sync.settings import load_settings

    if not configured_api_url():
        print("PREFECT_API_URL is not set: workers need a Prefect server (prefect server start).", file=sys.stderr)
        return 1
    from deployments.ownership import DeploymentOwnerConflict

    try:
        registered = register_deployments(load_settings(), args.work_pool)
    except DeploymentOwnerConflict as exc:
        print(exc, file=sys.stderr)
        return 1
    if not registered:
        print("No tenant with the email feature is registered (o365sync tenant add).", file=sys.stderr)
        return 1
    for name in registered:
        print(f"registered {name} on work pool {args.work_pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
