"""A completed connect (or re-consent) starts that user's import at once, instead of at the tenant's next slot.

`start_user_import(settings, tenant_id, user_id)` is what the web callback calls after a successful connect:

* **Prefect server configured** (PREFECT_API_URL in the environment or the active profile): a run of the
  `user-import` deployment (deployments/user_import.py: `all-tenants` on the tenant's shard queue for workers, the
  tenant's own under `o365sync serve`) is created, so the call returns as soon as the run exists (scheduled now;
  `o365sync serve` or a worker starts it). Its idempotency key names the tenant, the user and the connect's time:
  a retried start of the same connect makes no second run.
* **No Prefect server**: the import runs in a daemon thread of this process with the plain library steps
  (`o365sync.sync.user_import.import_user_now`). One thread per user at a time: a connect while that user's import
  runs asks for one more run after it (so a re-consent that added a feature is imported too), never a second
  thread beside it.

Never two imports of one mailbox at once, in either mode: the import holds the tenant's per-feature sync locks
(the ones every tenant flow takes; under `o365sync serve` the tenant's deployment also runs one import at a
time, ENQUEUE). The callback's response never waits for an import. Starting can fail (Prefect unreachable, the
deployment not served yet): the page then says so in one line with a reference, the log has the reference, ids
and the error class (never content), and the connect itself stands — the tenant's next scheduled sync imports the
user.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from o365sync.settings import Settings

log = logging.getLogger("o365sync.import")

STARTED = "Your mailbox import has started; this page can be closed while it runs."
QUEUED = "Your mailbox import is already running; it runs once more when it ends, for what you just granted."
PENDING = "Your mailbox import is being started; if it does not start, the next scheduled sync imports your mailbox."
START_WAIT_S = 5.0  # how long the page waits for the Prefect API to create the run
NOT_STARTED = (
    "Your mailbox import could not be started right now; it starts with the next scheduled sync (reference {ref})."
)


@dataclass(frozen=True)
class ImportStarted:
    """What starting a user's import did. `how`: "prefect" (a deployment run was created), "in-process" (a thread
    of this process runs it), "queued" (this user's import is running here; it runs once more after) or "failed"
    (nothing started; `ref` is in the log). `line`: the one sentence a page shows."""

    how: str  # "prefect" | "pending" (the Prefect API did not answer within START_WAIT_S) | "in-process" | ...
    line: str
    flow_run_id: str | None = None
    ref: str | None = None


def prefect_api_url() -> str | None:
    """The configured Prefect API (environment, else the active profile), or None: then imports run in-process."""
    from deployments.prefect_server import configured_api_url

    return configured_api_url()


def start_user_import(settings: Settings, tenant_id: str, user_id: str) -> ImportStarted:
    """Start the user's import (see the module); never raises."""
    try:
        if prefect_api_url():
            return _start_on_prefect(settings, tenant_id, user_id)
        return IN_PROCESS.start(settings, tenant_id, user_id)
    except Exception as exc:
        ref = secrets.token_hex(4)
        log.warning(
            "user import not started: ref=%s tenant=%s user=%s error=%s", ref, tenant_id, user_id, type(exc).__name__
        )
        return ImportStarted("failed", NOT_STARTED.format(ref=ref), ref=ref)


def _start_on_prefect(settings: Settings, tenant_id: str, user_id: str) -> ImportStarted:
    """Create the deployment run; wait for the API at most START_WAIT_S (an API that hangs must not hold the page:
    the request then goes on in the background and its outcome is logged)."""
    from deployments.user_import import USER_IMPORT, start_user_import_run
    from o365sync.auth import connection_info

    connected_at = connection_info(settings, tenant_id, user_id).get("connected_at", "")
    outcome: dict[str, Any] = {"waited": True}  # "run" or "error" once the API answered
    lock = threading.Lock()

    def create() -> None:
        try:
            result: dict[str, Any] = {
                "run": start_user_import_run(
                    settings, tenant_id, user_id, f"{USER_IMPORT}:{tenant_id}:{user_id}:{connected_at}"
                )
            }
        except Exception as exc:
            result = {"error": exc}
        with lock:
            outcome.update(result)
            late = not outcome["waited"]
        if "run" in result:
            log.info("user import started: tenant=%s user=%s flow_run=%s", tenant_id, user_id, result["run"].id)
        elif late:  # the page has been sent already: only the log can tell
            error = type(result["error"]).__name__
            log.warning("user import not started: tenant=%s user=%s error=%s", tenant_id, user_id, error)

    context = contextvars.copy_context()  # the caller's Prefect settings (API URL) apply in the helper thread
    helper = threading.Thread(target=context.run, args=(create,), name=f"start-user-import-{user_id}", daemon=True)
    helper.start()
    helper.join(START_WAIT_S)
    with lock:
        outcome["waited"] = False
        if "error" in outcome:
            raise outcome["error"]
        if "run" not in outcome:
            log.warning("user import start pending: tenant=%s user=%s (the Prefect API is slow)", tenant_id, user_id)
            return ImportStarted("pending", PENDING)
    return ImportStarted("prefect", STARTED, flow_run_id=str(outcome["run"].id))


def import_in_process(settings: Settings, tenant_id: str, user_id: str) -> dict[str, int]:
    """The user's import with the library's own steps (no Prefect): what a thread of the web server runs."""
    from o365sync.sync.mailbox import sync_mailbox_now
    from o365sync.sync.runner import run_user_sync
    from o365sync.sync.user_import import import_user_now
    from o365sync.tenant_context import resolve_tenant
    from tasks.calendar_task import calendar_run_counts
    from tasks.crm_snapshot import refresh_crm_snapshot

    work = {"email": sync_mailbox_now, "calendar": calendar_run_counts}
    return import_user_now(
        settings,
        tenant_id,
        user_id,
        sync_feature=lambda feature: run_user_sync(
            resolve_tenant(settings, tenant_id), feature, user_id, work[feature], log
        ),
        refresh_crm=lambda: refresh_crm_snapshot(settings, tenant_id),
        log=log,
    )


class InProcessImports:
    """Imports running in daemon threads of this process, at most one per user: `start` while one runs marks it to
    run once more when it ends (any number of connects meanwhile make one more run, not one each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._again: dict[tuple[str, str], bool] = {}  # running user -> run once more after this run
        self.threads: dict[tuple[str, str], threading.Thread] = {}

    def start(self, settings: Settings, tenant_id: str, user_id: str) -> ImportStarted:
        key = (tenant_id, user_id)
        with self._lock:
            if key in self._again:
                self._again[key] = True
                return ImportStarted("queued", QUEUED)
            self._again[key] = False
            thread = threading.Thread(
                target=self._run, args=(settings, key), name=f"user-import-{user_id}", daemon=True
            )
            self.threads[key] = thread
        try:
            thread.start()
        except BaseException:
            with self._lock:
                del self._again[key]
            raise
        log.info("user import started in-process: tenant=%s user=%s", tenant_id, user_id)
        return ImportStarted("in-process", STARTED)

    def running(self, tenant_id: str, user_id: str) -> bool:
        with self._lock:
            return (tenant_id, user_id) in self._again

    def _run(self, settings: Settings, key: tuple[str, str]) -> None:
        while True:
            try:
                import_in_process(settings, *key)
            except Exception as exc:  # the user's sync state says what failed; the log gets ids and the class
                log.warning("user import failed: tenant=%s user=%s error=%s", *key, type(exc).__name__)
            with self._lock:
                if not self._again[key]:
                    del self._again[key]
                    return
                self._again[key] = False


IN_PROCESS = InProcessImports()


def import_starter(settings: Settings) -> Callable[[str, str], ImportStarted]:
    """`start_user_import` bound to `settings`, for the web app (`app.web.create_app(start_import=...)`). With a
    Prefect server configured, Prefect's client is imported now, so the first callback does not wait for it."""
    if prefect_api_url():
        import prefect.deployments  # noqa: F401

    return functools.partial(start_user_import, settings)
