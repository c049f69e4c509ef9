"""`flow`: Prefect's `@flow`, except that a flow that fails leaves no file behind; `tenant_flow`: the same for a flow
about one tenant, with the options every such flow shares.

When a flow function raises, Prefect pickles the exception into its local result storage (`$PREFECT_HOME/storage`)
even with `persist_result=False` (`flow_engine.handle_exception` writes it; measured with Prefect 3.9): one file per
failed run that nothing ever deletes, outside the tenant's region and out of reach of erasure. A flow that *returns* a
Failed state holding the exception writes nothing (the result is only persisted when persistence is on), while
the run still ends Failed with the same message, its log shows the traceback, and a caller of the flow function
still gets the exception raised.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import prefect
from prefect import get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.hashing import file_hash

from flows._reporting import run_name


def _failure_returned(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            get_run_logger().error("Encountered exception during execution:", exc_info=True)
            return Failed(data=exc, message=f"Flow run encountered an exception: {type(exc).__name__}: {exc}")

    return run


def flow(**options: Any) -> Callable[[Callable[..., Any]], prefect.Flow]:
    """`prefect.flow(**options)` for a function whose failures must not be pickled to disk (see the module)."""

    def decorate(fn: Callable[..., Any]) -> prefect.Flow:
        # Prefect versions a flow by the hash of its function's file: keep that the flow's own file, not this one.
        if source := inspect.getsourcefile(fn):
            options.setdefault("version", file_hash(source))
        return prefect.flow(**options)(_failure_returned(fn))

    return decorate


USERS_IN_PARALLEL = 4  # per-user tasks of one tenant run at a time


def tenant_flow(name: str) -> Callable[[Callable[..., Any]], prefect.Flow]:
    """A flow whose first parameter is `tenant_id`: named `name`, its runs "<name>: <tenant>", results not
    persisted, its per-user tasks on a thread pool of USERS_IN_PARALLEL."""
    return flow(
        name=name,
        flow_run_name=run_name(name),
        persist_result=False,
        task_runner=ThreadPoolTaskRunner(max_workers=USERS_IN_PARALLEL),
    )
