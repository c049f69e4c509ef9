"""`preview` against what the real initial import then stores on the same world: per user and source the
imported counts by primary CRM record kind and by month are the store's, bodies to read are the matched messages,
and preview changes no file of the data dir but the user's encrypted token cache (MSAL may refresh it); a message
erased after the import counts as erased, not matched."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from o365sync.preview import preview_report
from o365sync.store import open_store
from o365sync.tenant_context import resolve_tenant
from o365sync.tenants import UserPreferences, load_tenant, save_tenant
from simulators.world import generate_world
from tests.product import stand_up_with_crm


def _files(root: Path) -> dict[str, str]:
    """Every file but token caches -> sha256 of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".token"
    }


@pytest.fixture
def product(tmp_path, monkeypatch, prefect_server):  # noqa: ARG001 - the import flow needs the Prefect API
    world = generate_world(seed=12, users_per_tenant=2, messages_per_user=150, contacts_per_tenant=30, calendars=True)
    for p in stand_up_with_crm(
        world, tmp_path, monkeypatch, features=["email", "calendar"], O365SYNC_GRAPH_PAGE_SIZE="40"
    ):
        tenant = world.tenants[0]
        config = load_tenant(p.settings, tenant.tid)
        config.user_preferences[tenant.users[1].oid] = UserPreferences(internal_meetings=True)
        save_tenant(p.settings, config)
        yield p


def _stored(p, tid: str) -> dict[tuple[str, str], dict[str, Counter]]:
    """(user, source) -> {"by_kind": primary kinds, "by_month": imported items per month} of the store."""
    queries = {
        "email": (
            "SELECT e.user_oid, m.crm_kind FROM email_crm_matches m "
            "JOIN emails e USING (tenant_id, user_oid, graph_id) WHERE m.is_primary",
            "SELECT user_oid, strftime(received_at AT TIME ZONE 'UTC', '%Y-%m') FROM emails",
        ),
        "calendar": (
            "SELECT user_oid, crm_kind FROM meeting_crm_matches WHERE is_primary",
            "SELECT user_oid, strftime(start_at AT TIME ZONE 'UTC', '%Y-%m') FROM meetings",
        ),
    }
    out: dict[tuple[str, str], dict[str, Counter]] = {}
    with open_store(p.settings, tid, write=False) as con:
        for source, (kinds, months) in queries.items():
            for key, sql in (("by_kind", kinds), ("by_month", months)):
                for oid, value in con.execute(sql).fetchall():
                    out.setdefault((oid, source), {"by_kind": Counter(), "by_month": Counter()})[key][value] += 1
    return out


@pytest.mark.slow
def test_preview_counts_equal_what_the_import_then_stores(product):
    from app.cli import app
    from flows.initial_import import initial_import

    p = product
    tenant = p.world.tenants[0]
    tid = tenant.tid
    before = _files(p.settings.data_dir)
    out = CliRunner().invoke(app, ["preview", "--tenant", tid, "--format", "json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    table = CliRunner().invoke(app, ["preview", "--tenant", tid, "--user", tenant.users[0].oid])
    assert table.exit_code == 0, table.output
    assert "Top accounts" in table.output and "Estimated import time" in table.output
    assert _files(p.settings.data_dir) == before, "preview changed a file other than a token cache"
    users = {u["user_oid"]: u["name"] for u in report["users"]}
    assert report == preview_report(resolve_tenant(p.settings, tid), users)

    initial_import(tid)
    stored = _stored(p, tid)
    assert {u["user_oid"] for u in report["users"]} == {u.oid for u in tenant.users}
    for u in report["users"]:
        for source in ("email", "calendar"):
            got = u[source]
            assert got is not None
            want = stored.get((u["user_oid"], source), {"by_kind": Counter(), "by_month": Counter()})
            assert got["by_kind"] == dict(want["by_kind"]), (u["user_oid"], source)
            assert got["by_month"] == dict(want["by_month"]), (u["user_oid"], source)
        assert u["email"]["by_kind"] and u["calendar"]["by_month"]
        reasons = u["email"]["by_reason"]
        assert reasons["matched"] > 0 and reasons["no_crm_match"] > 0
        assert u["email"]["body_requests"] == reasons["matched"]
        assert u["requests"] > u["email"]["body_requests"] and u["estimated_seconds"] > 0
    internal = {u["user_oid"]: u["calendar"]["by_reason"].get("internal_kept", 0) for u in report["users"]}
    assert internal[tenant.users[0].oid] == 0 < internal[tenant.users[1].oid]  # only the second keeps internal ones
    names = {r[0] for r in _account_names(p, tid)}
    assert report["top_accounts"] and {a["name"] for a in report["top_accounts"]} <= names

    # an erased message would not be imported again: preview counts it as erased, and still equals the store
    from o365sync.erasure import Scope, erase

    oid = tenant.users[0].oid
    with open_store(p.settings, tid, write=False) as con:
        gid = con.execute("SELECT graph_id FROM emails WHERE user_oid = ? ORDER BY graph_id LIMIT 1", [oid]).fetchone()
    erase(p.settings, tid, Scope.message(gid[0], user_oid=oid), actor="test:preview", reason="user_request")
    before_erasure = next(u for u in report["users"] if u["user_oid"] == oid)["email"]["by_reason"]
    again = preview_report(resolve_tenant(p.settings, tid), {oid: "first"})["users"][0]["email"]
    assert again["by_reason"]["erased"] == 1
    assert again["by_reason"]["matched"] == before_erasure["matched"] - 1
    assert again["by_month"] == dict(_stored(p, tid)[(oid, "email")]["by_month"])


def _account_names(p, tid: str) -> list[tuple[str]]:
    with open_store(p.settings, tid, write=False) as con:
        return con.execute("SELECT coalesce(name, crm_id) FROM crm_accounts").fetchall()
