"""The command line: commands listed, tenants registered with clear errors, secrets never printed."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from o365sync.cli import app

runner = CliRunner()
TENANT = "6513270e-269e-4d37-b2a7-4de452e6b438"


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("O365SYNC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    return tmp_path


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_the_commands():
    out = plain(runner.invoke(app, ["--help"]).output)
    for command in ("demo", "simulate", "tenant", "web", "import", "status"):
        assert command in out


def test_tenant_add_list_show_never_prints_secrets(data_dir):
    result = runner.invoke(app, ["tenant", "add", "--id", TENANT, "--name", "Contoso", "--domain", "Contoso.com",
                                 "--domain", "contoso.onmicrosoft.com", "--crm-login-url", "https://sf.example",
                                 "--crm-client-id", "cid", "--crm-client-secret", "TOPSECRET-1",
                                 "--crm-refresh-token", "TOPSECRET-2"])
    assert result.exit_code == 0, result.output
    listed = plain(runner.invoke(app, ["tenant", "list"]).output)
    shown = plain(runner.invoke(app, ["tenant", "show", TENANT]).output)
    assert TENANT in listed and "contoso.com" in listed
    assert "client_secret" in shown and "refresh_token" in shown  # names of stored secrets only
    for out in (listed, shown):
        assert "TOPSECRET" not in out
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert b"TOPSECRET" not in stored


@pytest.mark.parametrize("args, message", [
    (["--id", "../etc", "--domain", "contoso.com"], "tenant id"),
    (["--id", TENANT, "--domain", "not a domain"], "not a domain name"),
    (["--id", TENANT, "--domain", "contoso.com", "--feature", "teleport"], "feature"),
])
def test_tenant_add_rejects_bad_input_clearly(args, message, data_dir):
    result = runner.invoke(app, ["tenant", "add", *args])
    assert result.exit_code == 2
    assert message in plain(result.output)
    assert not (data_dir / "tenants").exists() or not any((data_dir / "tenants").iterdir())


def test_status_of_an_empty_registry():
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "No tenants registered" in plain(result.output)


def test_unknown_tenant_is_a_clear_error():
    result = runner.invoke(app, ["tenant", "show", "nobody"])
    assert result.exit_code == 1
    assert "not registered" in plain(result.output)


def test_blocklist_entries_are_validated_and_stored(data_dir):
    runner.invoke(app, ["tenant", "add", "--id", TENANT, "--domain", "contoso.com"])
    assert runner.invoke(app, ["tenant", "block", TENANT, "Bob@Spam.io", "evil.com"]).exit_code == 0
    assert runner.invoke(app, ["tenant", "block", TENANT, "x.org", "--user", "u-1"]).exit_code == 0
    bad = runner.invoke(app, ["tenant", "block", TENANT, "not an address"])
    assert bad.exit_code == 2 and "not an address or domain" in plain(bad.output)
    assert runner.invoke(app, ["tenant", "block", TENANT, "evil.com", "--remove"]).exit_code == 0
    from o365sync.settings import load_settings
    from o365sync.tenants import load_tenant

    t = load_tenant(load_settings(), TENANT)
    assert t.blocklist == ["bob@spam.io"] and t.blocklist_for("u-1") == ["bob@spam.io", "x.org"]
