"""The dispatchers' plan (deployments/dispatch_plan.py) as properties, and the deployments `register` builds for
workers (deployments/dispatch.py): one per job kind without a schedule, one dispatcher per scheduled kind on an
interval schedule. No Prefect server here; tests/test_shard_workers.py dispatches against a real one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.dispatch_plan import (
    DISPATCH_QUEUE,
    JOB_KINDS,
    LEAD_S,
    SCHEDULED,
    batches,
    dispatched_window,
    dispatcher_anchor,
    plan_window,
    stuck_before,
    window_of,
)
from deployments.schedules import CALENDAR_SYNC, EMAIL_SYNC, RETENTION, TEAMS_REFRESH, schedule_offset_s
from o365sync.tenants import TenantConfig

FEATURES = st.lists(st.sampled_from(["email", "calendar", "teams"]), unique=True)
IDS = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True)
TENANTS = st.lists(
    st.builds(
        lambda tid, features, shard: TenantConfig(
            id=tid, domains=["tenant.example"], features=features, shard=shard, region=shard
        ),
        IDS,
        FEATURES,
        st.sampled_from([None, "a", "b"]),
    ),
    max_size=30,
    unique_by=lambda t: t.id,
)
WHEN = st.datetimes(min_value=datetime(2026, 1, 2), max_value=datetime(2040, 1, 1), timezones=st.just(UTC))


@settings(deadline=None)  # a shared, loaded machine: no per-example timing
@given(TENANTS, st.sampled_from(SCHEDULED), WHEN)
def test_each_due_tenant_once_per_window_on_its_queue_within_the_window_with_a_stable_key(tenants, kind, when):
    interval = JOB_KINDS[kind].interval_s
    assert interval is not None
    window = window_of(when, interval)
    runs = plan_window(kind, tenants, window)
    due = [t for t in tenants if "email" in t.features and JOB_KINDS[kind].applies_to(t)]
    assert sorted(r.tenant_id for r in runs) == sorted(t.id for t in due)  # every due tenant, exactly once
    assert [r.scheduled_at for r in runs] == sorted(r.scheduled_at for r in runs)  # earliest first
    by_id = {t.id: t for t in due}
    for run in runs:
        tenant = by_id[run.tenant_id]
        assert run.work_queue_name == (f"shard-{tenant.shard}" if tenant.shard else None)
        assert window <= run.scheduled_at < window + timedelta(seconds=interval)
        assert run.scheduled_at - window == timedelta(seconds=schedule_offset_s(tenant.id, kind, interval))
    assert plan_window(kind, tenants, window) == runs  # the same window again: the same keys
    assert len({r.idempotency_key for r in runs}) == len(runs)
    following = plan_window(kind, tenants, window + timedelta(seconds=interval))
    assert not {r.idempotency_key for r in runs} & {r.idempotency_key for r in following}
    skip = {t.id for t in due[::2]}
    assert sorted(r.tenant_id for r in plan_window(kind, tenants, window, skip=skip)) == sorted(
        t.id for t in due if t.id not in skip
    )
    assert sum(map(len, batches(runs))) == len(runs) and all(len(b) <= 100 for b in batches(runs))


def test_features_decide_the_kinds_a_tenant_is_dispatched_for():
    both = TenantConfig(id="both", domains=["b.example"], features=["email", "calendar", "teams"])
    mail = TenantConfig(id="mail", domains=["m.example"], features=["email"])
    none = TenantConfig(id="none", domains=["n.example"], features=[])
    window = window_of(datetime(2030, 5, 1, tzinfo=UTC), 86400)
    assert {k: {r.tenant_id for r in plan_window(k, [both, mail, none], window)} for k in SCHEDULED} == {
        EMAIL_SYNC: {"both", "mail"},
        CALENDAR_SYNC: {"both"},
        TEAMS_REFRESH: {"both"},
        RETENTION: {"both", "mail"},
    }


@settings(deadline=None)
@given(st.sampled_from(SCHEDULED), st.integers(0, 10_000), st.integers(0, 86_400 * 1_000_000 - 1))
def test_a_dispatcher_run_dispatches_the_window_after_its_scheduled_time_even_when_late(kind, k, lateness):
    """The dispatcher's schedule fires LEAD_S before each window; a run started late (up to a whole interval)
    still dispatches the window it was scheduled for, never a later one."""
    interval = JOB_KINDS[kind].interval_s
    assert interval is not None
    scheduled = dispatcher_anchor() + timedelta(seconds=interval * k)
    window = scheduled + timedelta(seconds=LEAD_S)
    assert window_of(window, interval) == window
    assert dispatched_window(scheduled, interval) == window
    late = timedelta(microseconds=lateness % (interval * 1_000_000))  # anything short of a whole interval
    assert dispatched_window(scheduled + late, interval) == window


def test_the_scheduled_time_prefect_gives_a_run_is_understood():
    """`prefect.runtime.flow_run.scheduled_start_time` is a pendulum DateTime, not a plain datetime."""
    from prefect.runtime import flow_run

    at = flow_run.scheduled_start_time  # outside a run: now, of the same type
    assert type(at) is not datetime
    window = dispatched_window(at, 900)
    assert type(window) is datetime and window_of(window, 900) == window
    ahead = datetime.fromtimestamp(at.timestamp(), UTC) + timedelta(seconds=LEAD_S)
    assert window <= ahead < window + timedelta(seconds=900)  # off the schedule's grid: the window LEAD_S on


def test_runs_of_the_previous_window_are_not_stuck_earlier_ones_are():
    window = window_of(datetime(2030, 5, 1, 12, 7, tzinfo=UTC), 900)
    previous = window - timedelta(seconds=900)
    assert stuck_before(window, 900) < previous  # a run due at the previous window's start is not stuck
    assert stuck_before(window, 900) >= previous - timedelta(seconds=1)


def test_register_builds_one_unscheduled_deployment_per_kind_and_an_interval_dispatcher_per_scheduled_kind():
    from prefect.client.schemas.schedules import IntervalSchedule

    from deployments.dispatch import ALL_TENANTS, dispatcher_deployments, job_kind_deployments

    kinds = job_kind_deployments()
    assert sorted(d.full_name for d in kinds) == sorted(f"{k}/{ALL_TENANTS}" for k in JOB_KINDS)
    assert all(not d.schedules and d.concurrency_limit is None and not d.parameters for d in kinds)
    dispatchers = dispatcher_deployments()
    assert {d.full_name: d.parameters for d in dispatchers} == {f"dispatch/{k}": {"kind": k} for k in SCHEDULED}
    for d in dispatchers:
        (schedule,) = d.schedules
        assert isinstance(schedule.schedule, IntervalSchedule)  # never RRule
        interval = schedule.schedule.interval.total_seconds()
        assert interval == JOB_KINDS[d.parameters["kind"]].interval_s
        assert schedule.schedule.anchor_date == dispatcher_anchor()
        assert d.work_queue_name == DISPATCH_QUEUE
    intervals = {d.parameters["kind"]: d.schedules[0].schedule.interval for d in dispatchers}
    assert intervals == {
        EMAIL_SYNC: timedelta(minutes=15),
        CALENDAR_SYNC: timedelta(hours=1),
        TEAMS_REFRESH: timedelta(days=1),
        RETENTION: timedelta(days=1),
    }
