"""Nothing of a flow run is written outside the tenant's storage root and the data dir's Prefect home, and a failed
run writes nothing at all to Prefect's result storage (where a raised exception would be pickled, out of reach of
erasure; prefect_scale.md §6).

Real import flows, one of them failing (a mailbox answers a permanent error), run in this process and through the
CLI in a subprocess that has no PREFECT_HOME of its own; HOME, the temp dir and the working directory are fresh
folders, and every file that appears in them, or in Prefect's home, is listed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flows.initial_import import ImportIncomplete, initial_import
from simulators.world import generate_world
from tests.product import stand_up

ROOT = Path(__file__).resolve().parents[1]


def _files(*roots: Path) -> set[Path]:
    return {p for root in roots if root.exists() for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def product(tmp_path, monkeypatch):
    world = generate_world(seed=23, users_per_tenant=2, messages_per_user=60, contacts_per_tenant=20)
    p = stand_up(world, tmp_path, monkeypatch)
    yield p
    p.running.stop()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> dict[str, Path]:
    """Fresh HOME, temp dir and working directory for the code under test."""
    places = {name: tmp_path / name for name in ("home", "tmp", "cwd")}
    for folder in places.values():
        folder.mkdir()
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setenv("TMPDIR", str(places["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", str(places["tmp"]))
    monkeypatch.chdir(places["cwd"])
    return places


def test_flow_runs_in_process_write_nothing_outside_the_data_dir(prefect_server, product, elsewhere):
    tenant = product.world.tenants[0]
    prefect_home = Path(os.environ["PREFECT_HOME"])
    watched = [*elsewhere.values(), prefect_home]
    before = _files(*watched)

    product.running.graph.inject(tenant.users[0].oid, 400, code="ErrorInvalidRequest", path_contains="sentitems")
    with pytest.raises(ImportIncomplete):
        initial_import(tenant.tid)
    assert initial_import(tenant.tid)["failed"] == 0

    assert sorted(map(str, _files(*watched) - before)) == []
    assert not _files(prefect_home / "storage", product.settings.data_dir / "prefect" / "storage")


def test_a_failed_cli_import_writes_nothing_outside_the_data_dir(prefect_server, product, elsewhere):
    from prefect.settings import PREFECT_API_URL

    tenant = product.world.tenants[0]
    product.running.graph.inject(tenant.users[1].oid, 400, code="ErrorInvalidRequest")
    # The CLI as an operator runs it: O365SYNC_* settings, a Prefect API, no PREFECT_HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PYTHONPATH": str(ROOT)}
    before = _files(*elsewhere.values())

    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "import", "--tenant", tenant.tid],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert done.returncode != 0 and "SyncIncomplete" in done.stderr + done.stdout  # the run did fail
    assert sorted(map(str, _files(*elsewhere.values()) - before)) == []
    assert not _files(product.settings.data_dir / "prefect" / "storage")


def test_every_flow_returns_its_failure_instead_of_raising():
    """The class: a flow defined with `prefect.flow` instead of `flows.failures.flow` would pickle its failures."""
    import importlib
    import pkgutil

    from prefect import Flow

    import flows
    from flows.failures import _failure_returned

    wrapper_code = _failure_returned(lambda: None).__code__
    found = {
        obj.name: obj.fn.__code__ is wrapper_code
        for info in pkgutil.iter_modules(flows.__path__)
        for obj in vars(importlib.import_module(f"flows.{info.name}")).values()
        if isinstance(obj, Flow)
    }
    assert len(found) >= 7 and [name for name, wrapped in found.items() if not wrapped] == []
