"""The zombie-run automation: `python -m deployments.zombies [--within 90]`.

Open-source Prefect has no reaper for a run whose process died without reporting (a worker machine that died, a
SIGKILLed flow process): it stays Running forever and keeps its concurrency slots. A running flow sends a
`prefect.flow-run.heartbeat` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (Prefect's default 180; the
shard workers of `deployments.worker` use 30). This creates (or replaces) the automation of Prefect's docs
("detect zombie flows"): when a heartbeat is followed by neither another heartbeat nor a final state within
`within` seconds, the run is set to Crashed, which releases its slots. `within` must exceed the heartbeat interval
with margin (3 intervals by default), or healthy runs get crashed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from uuid import UUID

NAME = "o365sync-crash-zombie-runs"
DEFAULT_WITHIN_S = 90


def zombie_automation(within_s: int = DEFAULT_WITHIN_S):  # noqa: ANN201 (prefect's AutomationCore)
    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    heartbeat = "prefect.flow-run.heartbeat"
    return AutomationCore(
        name=NAME,
        description=f"Crash flow runs whose heartbeat stopped for {within_s} s (their process is gone).",
        trigger=EventTrigger(
            after={heartbeat},
            expect={
                heartbeat,
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_s} s: the flow run's process is gone (worker or machine died).",
            )
        ],
    )


def ensure_zombie_automation(within_s: int = DEFAULT_WITHIN_S) -> UUID:
    """Create the automation on the current Prefect API, replacing one of the same name; returns its id."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(NAME):
            client.delete_automation(old.id)
        return client.create_automation(zombie_automation(within_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.zombies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--within", type=int, default=DEFAULT_WITHIN_S, help="seconds without heartbeat (> 30)")
    args = parser.parse_args(argv)
    from o365sync.prefect_env import configure_prefect_env

    configure_prefect_env()
    from deployments.prefect_server import require_api_url

    if args.within <= 30:
        print(f"--within {args.within} must exceed the 30 s heartbeat interval (e.g. 90)", file=sys.stderr)
        return 1
    if not require_api_url("automations live on"):
        return 1
    automation_id = ensure_zombie_automation(args.within)
    print(f"automation {NAME} ({automation_id}): runs without heartbeat for {args.within} s are set to Crashed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
