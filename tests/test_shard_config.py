"""Shard configuration without a Prefect server: a tenant's shard holds its files (shard = region, refused
otherwise), shard names map to work queues, bad assignments are refused in one line before anything changes, one
worker per shard on a machine (its lock dies with it), and the zombie-run automation's trigger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from pydantic import ValidationError

from deployments.shards import ShardRefused, assign_shard, check_assignment, shard_queue
from deployments.worker import WorkerRefused, take_shard_lock
from deployments.zombies import zombie_automation
from o365sync.residency import MoveRefused, move_tenant
from o365sync.settings import load_settings
from o365sync.tenants import TenantConfig, load_tenant, save_tenant


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    regions = {name: str(tmp_path / name) for name in ("a", "b")}
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("O365SYNC_REGIONS", json.dumps(regions))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return load_settings()


def test_a_tenants_shard_is_where_its_files_are():
    assert TenantConfig(id="t1", domains=["x.example"], region="a", shard="a").shard == "a"
    with pytest.raises(ValidationError, match="shard 'a' keeps its tenants' files in region 'a', not 'b'"):
        TenantConfig(id="t1", domains=["x.example"], region="b", shard="a")
    assert (shard_queue("a"), shard_queue(None)) == ("shard-a", None)


def test_bad_assignments_are_refused_before_anything_changes(settings):
    save_tenant(settings, TenantConfig(id="t1", domains=["x.example"]))
    (settings.data_dir / "tenants" / "t1" / "marker").write_text("data")
    with pytest.raises(ShardRefused, match=r"unknown shard 'c'.*configured: a, b\); nothing was changed"):
        assign_shard(settings, "t1", "c")
    result = assign_shard(settings, "t1", "a")  # no Prefect API configured: files and config only
    assert result["files"] >= 1 and (settings.regions["a"] / "tenants" / "t1" / "marker").read_text() == "data"
    assert (load_tenant(settings, "t1").shard, load_tenant(settings, "t1").region) == ("a", "a")
    with pytest.raises(ShardRefused, match="tenant t1 is already on shard a; nothing was changed"):
        check_assignment(settings, load_tenant(settings, "t1"), "a")
    with pytest.raises(MoveRefused, match="runs on worker shard a"):
        move_tenant(settings, "t1", "b")  # the plain residency move would separate the files from the shard
    assert load_tenant(settings, "t1").shard == "a"


def test_one_worker_per_shard_and_its_lock_dies_with_it(settings):
    fd = take_shard_lock(settings, "pool", "a")
    try:
        with pytest.raises(WorkerRefused, match="shard a of work pool pool already has a worker on this machine"):
            take_shard_lock(settings, "pool", "a")
        take_shard_lock(settings, "pool", "b")  # another shard is independent
    finally:
        os.close(fd)
    # a process that took the lock and was killed: the kernel released it
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from deployments.worker import take_shard_lock; "
            "from o365sync.settings import load_settings; take_shard_lock(load_settings(), 'pool', 'a'); os._exit(9)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 9, child.stderr[-2000:]
    os_fd = take_shard_lock(settings, "pool", "a")
    assert os_fd >= 0
    with pytest.raises(WorkerRefused, match="unknown shard 'z'"):
        take_shard_lock(settings, "pool", "z")


def test_the_zombie_automation_waits_longer_than_the_heartbeat():
    automation = zombie_automation(90)
    trigger = automation.trigger
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.Completed" in trigger.expect
    assert trigger.within == timedelta(seconds=90) and trigger.posture == "Proactive"
    assert automation.actions[0].state.value == "CRASHED"
