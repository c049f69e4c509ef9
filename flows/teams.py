"""Prefect flows for Teams sharing.

- `teams-refresh` (parameter: the tenant id): every connected user's joined teams and channels, one task per user;
  meant for a slow schedule (daily; a share also refreshes a user's list when its channel is missing).
- `teams-share`: post one activity's summary to a channel or to a 1:1/group chat, once per (activity, target).

Parameters, logs and results are ids and counts only: chat members are passed as object ids (an address in a
flow parameter would be stored by Prefect), summaries never leave the run.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.futures import wait

from flows._reporting import report_totals, user_task_name
from flows.failures import flow, tenant_flow
from o365sync.auth import connected_users
from o365sync.errors import O365SyncError
from o365sync.settings import load_settings
from o365sync.sync.tenant import sync_states
from o365sync.teams import ConsentNeeded, TeamsDisabled, share_activity
from o365sync.tenant_context import resolve_tenant
from tasks.ops_signals import emit_signals, user_signals
from tasks.teams_task import refresh_user_channels


class TeamsRefreshIncomplete(O365SyncError):
    """Some users' channel lists could not be refreshed (ids and error classes are in the logs)."""


class TeamsShareError(O365SyncError):
    """A share failed; the message names ids and the error class only."""


@tenant_flow("teams-refresh")
def teams_refresh(tenant_id: str) -> dict[str, int]:
    """Refresh the channel list of every connected user of the tenant (nothing at all when Teams is off)."""
    tenant = resolve_tenant(load_settings(), tenant_id)
    if not tenant.config.feature_on("teams"):
        get_run_logger().warning("teams-refresh tenant=%s skipped: Teams sharing is not enabled", tenant.id)
        return {"users": 0, "disabled": 1}
    settings = tenant.settings
    users = connected_users(settings, tenant.id)
    before = sync_states(tenant, "teams")
    task = refresh_user_channels
    futures = [task.with_options(task_run_name=user_task_name(task.name, u)).submit(tenant.id, u.oid) for u in users]
    wait(futures)
    after = sync_states(tenant, "teams")
    emit_signals(
        tenant.config,
        users,
        user_signals("teams", before, after, settings.ops_throttled_minutes, settings.ops_failed_runs),
    )
    rows: list[dict] = []
    for user, future in zip(users, futures, strict=True):
        if future.state.is_completed():
            rows.append(future.result())
        else:
            rows.append({"user_oid": user.oid, "status": "failed", "teams": 0, "channels": 0})
    totals = {
        "users": len(users),
        "teams": sum(int(r["teams"]) for r in rows),
        "channels": sum(int(r["channels"]) for r in rows),
    }
    for status in ("ok", "consent_needed", "reconnect_needed", "failed"):
        totals[status] = sum(r["status"] == status for r in rows)
    report_totals("teams-refresh", tenant, totals, table=rows, what="per-user status and counts")
    if totals["failed"]:
        raise TeamsRefreshIncomplete(f"{totals['failed']} of {len(users)} users failed in tenant {tenant.id}")
    return totals


@flow(name="teams-share", persist_result=False)
def teams_share(
    tenant_id: str,
    user_oid: str,
    activity_kind: str,
    activity_id: str,
    team_id: str | None = None,
    channel_id: str | None = None,
    member_oids: list[str] | None = None,
    force: bool = False,
) -> dict[str, str | bool | None]:
    """Share a stored meeting (`activity_kind` "meeting", id = event id) or email ("email", Graph id) of `user_oid`
    to a channel (`team_id` + `channel_id`) or a chat with `member_oids` (object ids; one: 1:1, several: group).

    Returns ids and a status: posted | already_posted | uncertain (an earlier run may have posted; re-run with
    force=True to post anyway) | consent_needed | disabled. Other failures raise TeamsShareError."""
    logger = get_run_logger()
    if any("@" in m for m in member_oids or []):
        raise ValueError("member_oids must be object ids (Prefect stores flow parameters; no addresses)")
    settings = load_settings()
    try:
        result = share_activity(
            settings,
            tenant_id,
            user_oid,
            activity_kind,
            activity_id,
            team_id=team_id,
            channel_id=channel_id,
            members=member_oids,
            force=force,
        ).as_dict()
    except TeamsDisabled:
        logger.warning("teams-share tenant=%s refused: Teams sharing is not enabled", tenant_id)
        return {"status": "disabled", "share_id": None}
    except ConsentNeeded as exc:
        logger.warning(
            "teams-share user=%s consent needed for %d scope(s): user must reconnect", user_oid, len(exc.missing)
        )
        return {"status": "consent_needed", "share_id": None}
    except Exception as exc:
        error = type(exc).__name__
        logger.error("teams-share user=%s %s=%s failed error=%s", user_oid, activity_kind, activity_id, error)
        raise TeamsShareError(
            f"teams share of {activity_kind} {activity_id} by user {user_oid} failed: {error}"
        ) from None
    logger.info(
        "teams-share user=%s %s=%s target=%s:%s status=%s share=%s message=%s",
        user_oid,
        activity_kind,
        activity_id,
        result["target_kind"],
        result["target_id"],
        result["status"],
        result["share_id"],
        result["message_id"],
    )
    return result


if __name__ == "__main__":
    import sys

    print(teams_refresh(sys.argv[1]))
