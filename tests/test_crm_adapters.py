"""What every API CRM adapter must do, written once and run against each CRM's simulator on loopback TLS
(`tests/crm_cases.py`): the snapshot equals the world, tenants stay apart, the watermark is the newest modification,
a snapshot plus the changes since its watermark (minus an overlap) equals a fresh snapshot, overlapping windows are
idempotent, short rate limits are waited out, the daily quota and a dead token end the read at once. No mocks of
our code, no sleeps (the sleep recorder is injected, the simulators' clocks are driven)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import polars as pl
import pytest

from o365sync.crm import CrmAuthError, CrmQuotaExhausted, CrmSnapshot
from simulators.world import World
from tests.crm_cases import CrmCase, fixtures, ts
from tests.crm_helpers import Clock, Sleeps, apply_changes, assert_same

case_fixture, world_fixture, clock_fixture, sim_fixture = fixtures()

OVERLAP = timedelta(minutes=5)


@dataclass
class Mutated:
    """A full snapshot of the first tenant, then an hour later one of each change (`case.mutate`), then a minute."""

    tid: str
    conn: Any
    snap: CrmSnapshot
    since: datetime  # the snapshot's watermark minus the overlap
    ids: dict[str, str]  # the CRM ids `case.mutate` involved
    mutated_at: datetime


@pytest.fixture
def mutated(case: CrmCase, world: World, sim: Any, http: httpx.Client, clock: Clock) -> Mutated:
    tid = world.tenants[0].tid
    conn = case.conn(sim, tid, page_limit=4)  # several cursor pages per list where the CRM takes a page size
    snap = case.adapter.fetch_snapshot(conn, http, sleep=Sleeps())
    assert snap.watermark is not None
    clock.t += 3600
    ids = case.mutate(world, sim, tid)
    mutated_at = ts(clock)
    clock.t += 60
    return Mutated(tid, conn, snap, snap.watermark - OVERLAP, ids, mutated_at)


def test_snapshot_equals_world_for_each_tenant(case: CrmCase, world: World, sim: Any, http: httpx.Client) -> None:
    for tenant in world.tenants:
        snap = case.adapter.fetch_snapshot(case.conn(sim, tenant.tid), http, sleep=Sleeps())
        assert_same(snap, case.expected(world, sim, tenant.tid))


def test_snapshot_watermark_is_newest_modification(case: CrmCase, world: World, sim: Any, http: httpx.Client) -> None:
    tid = world.tenants[0].tid
    snap = case.adapter.fetch_snapshot(case.conn(sim, tid), http, sleep=Sleeps())
    assert snap.watermark == case.newest_modified(sim, tid)


def test_changes_applied_equal_fresh_snapshot(
    case: CrmCase, world: World, sim: Any, http: httpx.Client, mutated: Mutated
) -> None:
    conn, snap, ids = mutated.conn, mutated.snap, mutated.ids
    sim.requests.clear()

    sleeps = Sleeps()
    changes = case.adapter.fetch_changes(conn, http, mutated.since, sleep=sleeps)
    case.check_changes(world, sim, mutated.tid, ids, changes)
    fresh = case.adapter.fetch_snapshot(conn, http, sleep=Sleeps())
    assert not sleeps
    assert_same(apply_changes(snap, changes), fresh)
    assert changes.watermark == mutated.mutated_at == fresh.watermark
    for key, names in case.changed.items():
        assert {ids[name] for name in names} <= changes.changed_ids[key], key
    for frame, names in case.left_scope.items():  # left the scope: an id without rows
        assert not {ids[name] for name in names} & set(getattr(changes, frame)["crm_id"]), names
    assert set(changes.accounts.filter(pl.col("crm_id") == ids["company"])["domain"]) == {"newname.co.uk"}


def test_overlapping_windows_are_idempotent(
    case: CrmCase, sim: Any, http: httpx.Client, clock: Clock, mutated: Mutated
) -> None:
    conn, snap = mutated.conn, mutated.snap
    first = case.adapter.fetch_changes(conn, http, mutated.since, sleep=Sleeps())
    once = apply_changes(snap, first)
    assert_same(apply_changes(once, first), once)  # the same changes twice
    assert first.watermark is not None
    again = case.adapter.fetch_changes(conn, http, first.watermark - OVERLAP, sleep=Sleeps())  # overlapping window
    assert again.changed_ids["people"] and again.changed_ids["people"] <= first.changed_ids["people"]
    assert_same(apply_changes(once, again), once)
    wide = case.adapter.fetch_changes(conn, http, snap.watermark - timedelta(days=400), sleep=Sleeps())
    assert_same(apply_changes(snap, wide), once)
    # nothing changed since the watermark: nothing read, no watermark
    clock.t += 3600
    quiet = case.adapter.fetch_changes(conn, http, ts(clock), sleep=Sleeps())
    assert quiet.watermark is None and not any(quiet.changed_ids.values()) and quiet.people.is_empty()


def test_changes_wait_out_rate_limits_and_stop_at_quota_and_dead_tokens(
    case: CrmCase, sim: Any, http: httpx.Client, mutated: Mutated
) -> None:
    tid, conn, snap, since = mutated.tid, mutated.conn, mutated.snap, mutated.since
    plain = case.adapter.fetch_changes(conn, http, since, sleep=Sleeps())

    waits = case.throttle(sim)
    sleeps = Sleeps()
    throttled = case.adapter.fetch_changes(conn, http, since, sleep=sleeps)
    assert sleeps == waits and throttled.changed_ids == plain.changed_ids
    assert_same(apply_changes(snap, throttled), apply_changes(snap, plain))

    case.quota_on(sim, tid)
    sleeps = Sleeps()
    with pytest.raises(CrmQuotaExhausted) as quota:
        case.adapter.fetch_changes(conn, http, since, sleep=sleeps)
    assert quota.value.status == 429 and quota.value.code == case.daily_code and not sleeps
    assert case.token(conn) not in str(quota.value)
    case.quota_off(sim)

    sim.expire_tokens()
    with pytest.raises(CrmAuthError) as auth:
        case.adapter.fetch_changes(conn, http, since, sleep=sleeps)
    assert auth.value.status == 401 and not sleeps
    assert case.token(conn) not in str(auth.value) and case.token(conn) not in repr(conn)
    reconnected = case.conn(sim, tid)  # a new token reads again
    assert case.adapter.fetch_changes(reconnected, http, since, sleep=Sleeps()).changed_ids == plain.changed_ids
