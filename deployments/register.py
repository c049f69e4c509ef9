"""Register the per-tenant deployments with a Prefect server for workers, instead of `o365sync serve`:

    PREFECT_API_URL=http://<server>:4200/api uv run python -m deployments.register --work-pool o365sync
    prefect worker start --pool o365sync

Re-run it after adding a tenant. The worker's environment needs the same O365SYNC_* settings (an absolute
O365SYNC_DATA_DIR) and the Prefect privacy settings of `o365sync.prefect_env.PRIVACY_DEFAULTS`.
"""

from __future__ import annotations

import argparse
import sys
from uuid import UUID

from o365sync.prefect_env import configure_prefect_env
from o365sync.settings import Settings


def register_deployments(settings: Settings, work_pool_name: str | None = None) -> dict[str, UUID]:
    """Create or update every per-tenant deployment on the current Prefect API without serving it; with
    `work_pool_name`, `prefect worker start --pool <work_pool_name>` runs them. Returns full name -> id."""
    from deployments.schedules import build_deployments

    return {d.full_name: d.apply(work_pool_name=work_pool_name) for d in build_deployments(settings)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-pool", required=True, help="work pool the workers poll (e.g. o365sync)")
    args = parser.parse_args(argv)
    configure_prefect_env()
    from o365sync.prefect_server import configured_api_url
    from o365sync.settings import load_settings

    if not configured_api_url():
        print("PREFECT_API_URL is not set: workers need a Prefect server (prefect server start).", file=sys.stderr)
        return 1
    registered = register_deployments(load_settings(), args.work_pool)
    if not registered:
        print("No tenant with the email feature is registered (o365sync tenant add).", file=sys.stderr)
        return 1
    for name in registered:
        print(f"registered {name} on work pool {args.work_pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
