"""When a user's sync runs again: the failure count, the last success and the next retry, decided after each run.

The store records what this module decides (`store.record_sync_state` calls `after_run`), so the back-off, or
which stages wait for a person instead of a retry, changes here without touching SQL. Imports only the error
model's stage names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from o365sync.errors import ACTION_NEEDED

RETRY_BASE = timedelta(minutes=15)
RETRY_MAX = timedelta(hours=6)
CATCHING_UP = "catching_up"  # the run stopped at its paging limit, committed what it read; the next run goes on
# No retry until someone acts: the user connects again, or an admin does what the error says (`action_needed`).
WAITING_FOR_A_PERSON = frozenset({"reconnect_needed", "consent_needed", ACTION_NEEDED})


def next_retry_delay(consecutive_failures: int) -> timedelta:
    """15 min, 30 min, 1 h, ... capped at 6 h: a failing mailbox backs off instead of hammering Graph. The doublings
    stop once past the cap (uncapped, 38 failures in a row - about 8 days of a failing mailbox - overflow a
    timedelta)."""
    doublings = min(max(0, consecutive_failures - 1), (RETRY_MAX // RETRY_BASE).bit_length())
    return min(RETRY_BASE * 2**doublings, RETRY_MAX)


@dataclass(frozen=True)
class SyncStanding:
    """What the policy keeps per user and feature between runs."""

    last_success_at: datetime | None = None
    consecutive_failures: int = 0
    next_retry_at: datetime | None = None


def after_run(previous: SyncStanding, stage: str, error: str | None, now: datetime) -> SyncStanding:
    """The standing after a run that ended in `stage` (with `error`, or None). A success (`idle`) resets the
    failures; a failure counts one more and is retried after `next_retry_delay` unless it waits for a person;
    `CATCHING_UP` is neither a success (the lag keeps growing) nor a failure (no back-off: the next run goes on);
    any other stage (a run starting) changes nothing but clears the retry time."""
    if error is None and stage == "idle":
        return SyncStanding(now, 0)
    if error is not None:
        failures = previous.consecutive_failures + 1
        retry = None if stage in WAITING_FOR_A_PERSON else now + next_retry_delay(failures)
        return SyncStanding(previous.last_success_at, failures, retry)
    if stage == CATCHING_UP:
        return SyncStanding(previous.last_success_at, 0)
    return SyncStanding(previous.last_success_at, previous.consecutive_failures)


def due_on_schedule(stage: str | None, next_retry_at: datetime | None, now: datetime) -> bool:
    """Whether a scheduled run syncs a user now: once their retry time has passed (or they have none), except after
    a failure retrying cannot fix (`action_needed`): scheduled runs leave it alone until someone acts and starts a
    run by hand (`o365sync import`)."""
    return stage != ACTION_NEEDED and (next_retry_at or now) <= now
