"""Register the per-tenant deployments with a Prefect server for workers, instead of `o365sync serve`:

    PREFECT_API_URL=http://<server>:4200/api uv run python -m deployments.register --work-pool o365sync
    prefect worker start --pool o365sync

Re-run it after adding a tenant. Each deployment carries what its runs need to find the tenants wherever the worker
was started (job variables of a process worker): the settings of this shell and its `.env` as O365SYNC_*
variables (paths made absolute; secrets left out, Prefect stores job variables), the Prefect privacy settings of
`o365sync.prefect_env.PRIVACY_DEFAULTS`, and, when this directory has a `.env`, this directory as the runs' working
directory so they read the same `.env` (secrets included). Workers on other machines need the same paths.
Names `o365sync serve` manages on the same server are refused (`deployments.ownership`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args
from uuid import UUID

from pydantic import SecretStr

from o365sync.prefect_env import PRIVACY_DEFAULTS, configure_prefect_env, prefect_home_for
from o365sync.settings import Settings


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


def register_deployments(settings: Settings, work_pool_name: str) -> dict[str, UUID]:
    """Create or update every per-tenant deployment on the current Prefect API for `prefect worker start --pool
    <work_pool_name>` (with `worker_job_variables`). Returns full name -> id. Raises DeploymentOwnerConflict,
    before writing anything, when `o365sync serve` manages one of the names on this server."""
    from deployments.ownership import refuse_foreign
    from deployments.schedules import build_deployments
    from deployments.user_import import user_import_deployments

    deployments = build_deployments(settings) + user_import_deployments(settings)
    refuse_foreign(deployments, work_pool_name)
    job_variables = worker_job_variables(settings)
    out = {}
    for d in deployments:
        d.job_variables = job_variables
        out[d.full_name] = d.apply(work_pool_name=work_pool_name)
    return out


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
