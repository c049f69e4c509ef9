"""The sync retry policy (o365sync/sync_policy.py) and the store recording what it decides."""

from __future__ import annotations

import ast
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import o365sync.store as store_package
from o365sync.settings import Settings
from o365sync.store import open_store, read_sync_states, record_sync_state
from o365sync.sync_policy import (
    CATCHING_UP,
    RETRY_BASE,
    RETRY_MAX,
    WAITING_FOR_A_PERSON,
    SyncStanding,
    after_run,
    next_retry_delay,
)

NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
standings = st.builds(
    SyncStanding,
    st.none() | st.datetimes(timezones=st.just(UTC)),
    st.integers(0, 1000),
    st.none() | st.datetimes(timezones=st.just(UTC)),
)
stages = st.sampled_from(["idle", "syncing", "failed", CATCHING_UP, *sorted(WAITING_FOR_A_PERSON)])


@given(st.integers(0, 10_000))
def test_the_retry_delay_doubles_from_the_base_up_to_the_cap(failures):
    delay = next_retry_delay(failures)
    assert RETRY_BASE <= delay <= RETRY_MAX
    assert delay <= next_retry_delay(failures + 1) <= 2 * delay
    assert next_retry_delay(1) == RETRY_BASE and next_retry_delay(2) == 2 * RETRY_BASE


@given(standings, stages, st.none() | st.sampled_from(["GraphError", "invalid_grant"]))
def test_after_a_run(previous, stage, error):
    after = after_run(previous, stage, error, NOW)
    if error is not None:
        assert after.consecutive_failures == previous.consecutive_failures + 1
        assert after.last_success_at == previous.last_success_at
        expected = None if stage in WAITING_FOR_A_PERSON else NOW + next_retry_delay(after.consecutive_failures)
        assert after.next_retry_at == expected
    elif stage == "idle":
        assert after == SyncStanding(NOW, 0, None)
    else:
        assert after.next_retry_at is None and after.last_success_at == previous.last_success_at
        assert after.consecutive_failures == (0 if stage == CATCHING_UP else previous.consecutive_failures)


def test_the_store_records_what_the_policy_decides(tmp_path):
    with open_store(Settings(data_dir=tmp_path), "t1", write=True) as con:
        for _ in range(3):
            record_sync_state(con, "t1", "u1", "failed", error="GraphError")
        record_sync_state(con, "t1", "u2", "reconnect_needed", error="invalid_grant")
        failed, waiting = read_sync_states(con, "t1")
    assert failed["consecutive_failures"] == 3
    assert failed["next_retry_at"] - failed["last_run_at"] == next_retry_delay(3) == timedelta(hours=1)
    assert waiting["consecutive_failures"] == 1 and waiting["next_retry_at"] is None


def test_the_store_holds_no_retry_policy():
    """Back-off numbers and decisions live in sync_policy; the store package neither defines nor computes them."""
    for module in Path(store_package.__file__).parent.glob("*.py"):
        tree = ast.parse(module.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"RETRY_BASE", "RETRY_MAX", "WAITING_FOR_A_PERSON", "next_retry_delay"}, module.name


def test_a_mailbox_failing_for_weeks_still_gets_its_state_recorded(tmp_path):
    """From 38 failures in a row the uncapped doubling overflowed a timedelta and the state could not be saved."""
    with open_store(Settings(data_dir=tmp_path), "t1", write=True) as con:
        for _ in range(40):
            record_sync_state(con, "t1", "u1", "failed", error="GraphError")
        (state,) = read_sync_states(con, "t1")
    assert state["consecutive_failures"] == 40
    assert state["next_retry_at"] - state["last_run_at"] == RETRY_MAX
