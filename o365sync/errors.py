"""The one root of the product's errors, and the one place a sync failure becomes a stage and a line people read.

Each class says whether a later run can succeed without anyone acting (`retriable`) and what the user or admin
must do (`action`, fixed text). What reaches the sync state is the class name plus that fixed text, never the
exception's message: messages may quote ids a Graph or CRM answer carried, and Prefect stores exception text.
Imports nothing of ours, so every layer can derive from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Self

RETRIED = "nothing: a later run retries with back-off"
FAILED = "failed"  # a retriable failure: backs off 15 min -> 6 h
ACTION_NEEDED = "action_needed"  # a failure retrying cannot fix: no retry until someone acts


def _remake(cls: type[O365SyncError], args: tuple, kwargs: dict[str, Any]) -> O365SyncError:
    return cls(*args, **kwargs)


class O365SyncError(Exception):
    """Root of every error of o365sync. `retriable`: a later run may succeed with nobody acting; `action`: what
    the user or admin must do (fixed text, never content); `stage`: the sync stage a user's sync ends in."""

    retriable: ClassVar[bool] = True
    action: ClassVar[str] = RETRIED
    stage: ClassVar[str | None] = None  # None: FAILED if retriable, else ACTION_NEEDED
    _made_with: tuple[tuple, dict[str, Any]]  # the constructor's arguments, for pickling

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        self = super().__new__(cls, *args)
        self._made_with = (args, kwargs)
        return self

    def __reduce__(self) -> tuple:
        """Pickle as the call that made it, with the attributes it has now (Prefect persists exceptions): whatever
        message a subclass passes up, unpickling calls its own constructor again."""
        args, kwargs = self._made_with
        return (_remake, (type(self), args, kwargs), self.__dict__)

    def state_error(self) -> str:
        """The content-free line kept in the sync state: the class name, and what to do when it is not just wait."""
        name = type(self).__name__
        return name if self.action == RETRIED else f"{name}: {self.action}"


class ConsentNeeded(O365SyncError):
    """The tenant turned on a feature after the user connected: they must reconnect to grant its scopes."""

    retriable = False
    action = "the user must connect again to grant the permissions of newly enabled features"
    stage = "consent_needed"

    def __init__(self, tenant_id: str, oid: str, missing: Sequence[str]):
        self.tenant_id, self.oid, self.missing = tenant_id, oid, list(missing)
        super().__init__(f"user {tenant_id}/{oid} must reconnect to consent to {', '.join(self.missing)}")

    def state_error(self) -> str:
        return "consent_needed"


class TenantError(O365SyncError):
    """An error about one tenant, made from its id alone (kept as `tenant_id`, and through pickling); a subclass
    says what happened in `text`, formatted with the tenant id."""

    text: ClassVar[str] = "tenant {tenant_id}"

    def __init__(self, tenant_id: str):
        self.tenant_id = tenant_id
        super().__init__(self.text.format(tenant_id=tenant_id))


class NoCrmSnapshot(TenantError):
    """The tenant has no CRM snapshot yet, so nothing can be matched; the next tenant sync refreshes it first."""

    action = "refresh the CRM snapshot (the next tenant sync does it; `o365sync crm refresh` now)"
    text = "tenant {tenant_id} has no CRM snapshot yet"

    def state_error(self) -> str:
        return type(self).__name__


def sync_failure(exc: BaseException) -> tuple[str, str]:
    """(stage, error text) of a user's sync that raised `exc`: the class's own stage, `action_needed` for an error
    retrying cannot fix, `failed` (retried with back-off) for the rest, unknown exceptions included (class name
    only)."""
    if not isinstance(exc, O365SyncError):
        return FAILED, type(exc).__name__
    stage = exc.stage or (FAILED if exc.retriable else ACTION_NEEDED)
    return stage, exc.state_error()
