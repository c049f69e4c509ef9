"""The error model: one root, per class retriable + action + content-free text, one mapping to a sync stage; a fatal
configuration error in a real sync stops retrying and says what to do, a transient one still backs off."""

from __future__ import annotations

import inspect
import os
import pickle

import pytest

import crm_adapters.base
import flows.teams
import flows.tenant_sync
import o365sync.auth
import o365sync.erasure
import o365sync.graph
import o365sync.sync.runner
import o365sync.sync.user_import
import o365sync.teams
import tasks.teams_task
from o365sync.errors import ACTION_NEEDED, FAILED, O365SyncError, sync_failure
from o365sync.store import open_store
from o365sync.sync_policy import RETRY_BASE, WAITING_FOR_A_PERSON

CONTENT = "Subject: merger with Contoso <ceo@contoso.example>"  # stands for anything read from a mailbox or a CRM
MODULES = (crm_adapters.base, flows.teams, flows.tenant_sync, o365sync.auth, o365sync.erasure, o365sync.graph)
MODULES += (o365sync.sync.runner, o365sync.sync.user_import, o365sync.teams, tasks.teams_task)

# Every error class of the product: (retriable, stage a user's sync ends in). A new class must be added here.
TABLE: dict[str, tuple[bool, str]] = {
    "O365SyncError": (True, FAILED),
    "ConsentNeeded": (False, "consent_needed"),
    "TenantError": (True, FAILED),
    "NoCrmSnapshot": (True, FAILED),
    "GraphError": (True, FAILED),
    "GraphAuthError": (True, FAILED),
    "GraphForbidden": (False, ACTION_NEEDED),
    "GraphNotFound": (True, FAILED),
    "GraphBadRequest": (False, ACTION_NEEDED),
    "GraphThrottled": (True, FAILED),
    "GraphUnavailable": (True, FAILED),
    "GraphPagingError": (True, FAILED),
    "DeltaTokenExpired": (True, FAILED),
    "LinkNotFollowable": (True, FAILED),
    "RunLimitReached": (True, FAILED),
    "ForbiddenRequest": (True, FAILED),
    "AuthError": (True, FAILED),
    "ReconnectNeeded": (False, "reconnect_needed"),
    "AuthConfigError": (False, ACTION_NEEDED),
    "AuthTransient": (True, FAILED),
    "ConnectError": (False, ACTION_NEEDED),
    "WrongTenant": (False, ACTION_NEEDED),
    "TenantGone": (False, ACTION_NEEDED),
    "UserOffboarded": (False, ACTION_NEEDED),
    "InvalidLoginHint": (False, ACTION_NEEDED),
    "SignInRefused": (False, ACTION_NEEDED),
    "ConnectSetupError": (False, ACTION_NEEDED),
    "SignInsBusy": (True, FAILED),
    "TeamsError": (True, FAILED),
    "TeamsDisabled": (False, ACTION_NEEDED),
    "ChannelNotFound": (False, ACTION_NEEDED),
    "ActivityNotFound": (False, ACTION_NEEDED),
    "ErasureError": (True, FAILED),
    "CrmError": (True, FAILED),
    "CrmAuthError": (False, ACTION_NEEDED),
    "CrmQuotaExhausted": (True, FAILED),
    "CrmFileError": (False, ACTION_NEEDED),
    "CrmDropRefused": (False, ACTION_NEEDED),
    "UserSyncError": (True, FAILED),
    "SyncIncomplete": (True, FAILED),
    "UserImportIncomplete": (True, FAILED),
    "TeamsRefreshError": (True, FAILED),
    "TeamsRefreshIncomplete": (True, FAILED),
    "TeamsShareError": (True, FAILED),
}


def _all_classes() -> list[type[O365SyncError]]:
    found, todo = [], [O365SyncError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += [c for c in cls.__subclasses__() if c not in found and c not in todo]
    return [c for c in found if c.__module__.split(".")[0] in {"o365sync", "crm_adapters", "flows", "tasks"}]


def _with_content(cls: type[O365SyncError]) -> O365SyncError:
    """An instance whose every argument is content, as if a Graph or CRM answer had been quoted into it (but for
    the OAuth error code of a dead grant, which the identity platform picks from a fixed set)."""
    if cls is o365sync.auth.ReconnectNeeded:
        return cls(CONTENT, CONTENT, "invalid_grant", [50173])
    required = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.default is p.empty and p.kind is not p.VAR_POSITIONAL and p.kind is not p.VAR_KEYWORD
    ]
    return (
        cls(*[CONTENT] * len(required)) if required else cls(CONTENT) if cls.__init__ is Exception.__init__ else cls()
    )


def test_every_error_class_is_in_the_table_and_defined_once():
    names = [c.__name__ for c in _all_classes()]
    assert len(names) == len(set(names)), "an error class is defined twice"
    assert set(names) == set(TABLE)


@pytest.mark.parametrize("cls", _all_classes(), ids=lambda c: c.__name__)
def test_each_error_says_if_it_is_retriable_what_to_do_and_no_content(cls):
    retriable, stage = TABLE[cls.__name__]
    exc = _with_content(cls)
    assert cls.retriable is retriable
    assert isinstance(cls.action, str) and len(cls.action) > 10
    mapped_stage, text = sync_failure(exc)
    assert mapped_stage == stage
    assert text.startswith(cls.__name__) or stage in WAITING_FOR_A_PERSON
    assert "merger" not in text and "contoso" not in text.lower(), text
    if stage == ACTION_NEEDED:
        assert cls.action in text  # what must be done reaches the sync state (and `o365sync status`)
    copy = pickle.loads(pickle.dumps(exc))  # survives Prefect's result persistence
    assert type(copy) is cls and sync_failure(copy) == sync_failure(exc)
    assert str(copy) == str(exc) and vars(copy) == vars(exc)


def test_an_exception_that_is_not_ours_is_retried_under_its_class_name():
    assert sync_failure(KeyError(CONTENT)) == (FAILED, "KeyError")


def _state(settings, tenant_id: str, oid: str) -> dict:
    with open_store(settings, tenant_id, write=False) as con:
        row = con.execute(
            "SELECT stage, last_error, last_run_at, next_retry_at, consecutive_failures FROM sync_state "
            "WHERE user_oid = ? AND feature = 'email'",
            [oid],
        ).fetchone()
    return dict(zip(("stage", "error", "run_at", "retry_at", "failures"), row, strict=True))


@pytest.mark.slow
def test_a_rejected_app_secret_stops_retrying_and_status_says_what_to_do(prefect_server, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import app
    from flows.email_sync import email_sync
    from flows.initial_import import ImportIncomplete, initial_import
    from simulators.world import generate_world
    from tests.product import stand_up

    world = generate_world(seed=21, tenants=1, users_per_tenant=1, messages_per_user=10, contacts_per_tenant=10)
    p = stand_up(world, tmp_path, monkeypatch)
    try:
        tid, oid = world.tenants[0].tid, world.tenants[0].users[0].oid
        # A transient failure (the identity platform answers 500 to the token refresh) still backs off.
        p.running.identity.inject("server_error", count=20)
        p.running.tokens.revoke_access_tokens(oid)
        with pytest.raises(ImportIncomplete):
            initial_import(tid)
        transient = _state(p.settings, tid, oid)
        assert (transient["stage"], transient["error"], transient["failures"]) == (FAILED, "AuthTransient", 1)
        assert transient["retry_at"] - transient["run_at"] == RETRY_BASE

        # Our app secret rejected: no retry, and the state says what an admin must do.
        p.running.identity.clear_faults()
        good_secret = os.environ["O365SYNC_CLIENT_SECRET"]
        monkeypatch.setenv("O365SYNC_CLIENT_SECRET", "expired-secret")
        with pytest.raises(ImportIncomplete):
            initial_import(tid)
        fatal = _state(p.settings, tid, oid)
        assert (fatal["stage"], fatal["retry_at"], fatal["failures"]) == (ACTION_NEEDED, None, 2)
        assert fatal["error"] == f"AuthConfigError: {o365sync.auth.AuthConfigError.action}"
        status = CliRunner().invoke(app, ["status", "--tenant", tid], env={"COLUMNS": "300"})
        assert status.exit_code == 0
        assert "action needed" in status.output and "next retry none until someone acts" in status.output
        assert "an admin must fix the app registration" in status.output

        # A scheduled run leaves the user alone (no token request with the rejected secret) ...
        asked = len(p.running.identity.token_requests)
        totals = email_sync(tid)
        assert (totals["waiting"], totals["failed"]) == (1, 0)
        assert len(p.running.identity.token_requests) == asked
        # ... until the admin fixed it and runs the import by hand.
        monkeypatch.setenv("O365SYNC_CLIENT_SECRET", good_secret)
        initial_import(tid)
        assert _state(p.settings, tid, oid)["stage"] == "idle"
    finally:
        p.running.stop()
