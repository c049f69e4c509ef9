"""Prefect task: refresh one user's Teams channel list. Returns ids and counts only; a failure is re-raised as
`TeamsRefreshError(user id, error class)` without its message (Prefect stores exception text)."""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from o365sync.auth import ReconnectNeeded
from o365sync.errors import O365SyncError
from o365sync.settings import load_settings
from o365sync.store import RunCounts, record_sync_state
from o365sync.teams import ConsentNeeded, TeamsDisabled, refresh_channels
from o365sync.tenant_context import Tenant, resolve_tenant

log = logging.getLogger("o365sync.teams")


class TeamsRefreshError(O365SyncError):
    """A channel refresh failed; the message names the user id and the error class only."""


def _summary(user_oid: str, status: str, teams: int = 0, channels: int = 0) -> dict[str, int | str]:
    return {"user_oid": user_oid, "status": status, "teams": teams, "channels": channels}


def _record(tenant: Tenant, user_oid: str, stage: str, error: str | None = None, channels: int = 0) -> None:
    """The user's Teams state, shown by `o365sync status` beside mail and calendar (feature "teams")."""
    with tenant.open_store(write=True) as con:
        record_sync_state(
            con,
            tenant.id,
            user_oid,
            stage,
            RunCounts(scanned=channels, imported=channels),
            error=error,
            feature="teams",
        )


@task(name="refresh-teams-channels", persist_result=False, cache_policy=NO_CACHE)
def refresh_user_channels(tenant_id: str, user_oid: str) -> dict[str, int | str]:
    """status: ok | consent_needed (connected before the tenant enabled Teams; no Graph call was made) |
    reconnect_needed | disabled (the tenant has not enabled Teams; no Graph call was made)."""
    logger = get_run_logger()
    tenant = resolve_tenant(load_settings(), tenant_id)
    try:
        result = refresh_channels(tenant.settings, tenant.id, user_oid)
    except TeamsDisabled:
        logger.warning("teams refresh user=%s skipped: tenant=%s has Teams sharing off", user_oid, tenant.id)
        return _summary(user_oid, "disabled")
    except ConsentNeeded as exc:
        logger.warning(
            "teams refresh user=%s consent needed for %d scope(s): user must reconnect", user_oid, len(exc.missing)
        )
        _record(tenant, user_oid, "consent_needed", "consent_needed")
        return _summary(user_oid, "consent_needed")
    except ReconnectNeeded as exc:
        logger.warning("teams refresh user=%s needs reconnect error=%s codes=%s", user_oid, exc.error, exc.error_codes)
        _record(tenant, user_oid, "reconnect_needed", exc.error)
        return _summary(user_oid, "reconnect_needed")
    except Exception as exc:
        error = type(exc).__name__
        log.error("teams refresh failed user=%s error=%s", user_oid, error)
        _record(tenant, user_oid, "failed", error)
        raise TeamsRefreshError(f"teams channel refresh failed for user {user_oid}: {error}") from None
    logger.info("teams refresh user=%s teams=%d channels=%d", user_oid, result.teams, result.channels)
    _record(tenant, user_oid, "idle", channels=result.channels)
    return _summary(user_oid, "ok", result.teams, result.channels)
