"""The command line: commands listed, tenants registered with clear errors, secrets never printed."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from app.cli import app

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


SALESFORCE = [
    "tenant",
    "add",
    "--id",
    TENANT,
    "--name",
    "Contoso",
    "--domain",
    "Contoso.com",
    "--domain",
    "contoso.onmicrosoft.com",
    "--crm-login-url",
    "https://sf.example",
    "--crm-client-id",
    "cid",
]


def nothing_written(data_dir) -> bool:
    return not (data_dir / "tenants").exists() or not any((data_dir / "tenants").iterdir())


@pytest.mark.parametrize("how", ["stdin", "environment"])
def test_tenant_add_list_show_never_prints_secrets(how, data_dir):
    secrets = {"O365SYNC_CRM_CLIENT_SECRET": "TOPSECRET-1", "O365SYNC_CRM_REFRESH_TOKEN": "TOPSECRET-2"}
    if how == "stdin":
        result = runner.invoke(
            app, [*SALESFORCE, "--crm-secrets-stdin"], input="".join(f"{k}={v}\n" for k, v in secrets.items())
        )
    else:
        result = runner.invoke(app, SALESFORCE, env=secrets)
    assert result.exit_code == 0, result.output
    listed = plain(runner.invoke(app, ["tenant", "list"]).output)
    shown = plain(runner.invoke(app, ["tenant", "show", TENANT]).output)
    assert TENANT in listed and "contoso.com" in listed
    assert "client_secret" in shown and "refresh_token" in shown  # names of stored secrets only
    for out in (listed, shown):
        assert "TOPSECRET" not in out
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert b"TOPSECRET" not in stored


@pytest.mark.parametrize(
    "args, message",
    [
        (["--id", "../etc", "--domain", "contoso.com"], "tenant id"),
        (["--id", TENANT, "--domain", "not a domain"], "not a domain name"),
        (["--id", TENANT, "--domain", "contoso.com", "--feature", "teleport"], "feature"),
    ],
)
def test_tenant_add_rejects_bad_input_clearly(args, message, data_dir):
    result = runner.invoke(app, ["tenant", "add", *args])
    assert result.exit_code == 2
    assert message in plain(result.output)
    assert nothing_written(data_dir)


@pytest.mark.parametrize(
    "option, variable",
    [
        ("--crm-client-secret", "O365SYNC_CRM_CLIENT_SECRET"),
        ("--crm-refresh-token", "O365SYNC_CRM_REFRESH_TOKEN"),
        ("--crm-token", "O365SYNC_CRM_TOKEN"),
    ],
)
@pytest.mark.parametrize("command", ["add", "update"])
def test_secrets_as_arguments_are_refused_with_the_way_to_pass_them(command, option, variable, data_dir):
    if command == "update":
        assert runner.invoke(app, ["tenant", "add", "--id", TENANT, "--domain", "contoso.com"]).exit_code == 0
        before = sorted(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
        args = ["tenant", "update", TENANT, option, "TOPSECRET"]
    else:
        args = [*SALESFORCE, option, "TOPSECRET"]
    result = runner.invoke(app, args)
    out = plain(result.output)
    assert result.exit_code == 2 and len(out.strip().splitlines()) == 1, out
    assert option in out and variable in out and "--crm-secrets-stdin" in out and "TOPSECRET" not in out
    if command == "update":
        assert sorted(p.read_bytes() for p in data_dir.rglob("*") if p.is_file()) == before
    else:
        assert nothing_written(data_dir)


@pytest.mark.parametrize(
    "args, env, stdin, message",
    [
        ([], {"O365SYNC_CRM_CLIENT_SECRET": "s"}, None, "O365SYNC_CRM_REFRESH_TOKEN missing"),
        ([], {"O365SYNC_CRM_REFRESH_TOKEN": "r"}, None, "O365SYNC_CRM_CLIENT_SECRET missing"),
        (["--crm-secrets-stdin"], {}, "O365SYNC_CRM_CLIENT_SECRET=s\n", "O365SYNC_CRM_REFRESH_TOKEN missing"),
        ([], {"O365SYNC_CRM_TOKEN": "t"}, None, "O365SYNC_CRM_TOKEN is not used by a salesforce CRM"),
        (
            ["--crm", "hubspot"],
            {"O365SYNC_CRM_CLIENT_SECRET": "s", "O365SYNC_CRM_TOKEN": "t"},
            None,
            "O365SYNC_CRM_CLIENT_SECRET is not used by a hubspot CRM",
        ),
        (["--crm", "files", "--crm-directory", "/x"], {"O365SYNC_CRM_TOKEN": "t"}, None, "not used by a files CRM"),
        (["--crm-login-url", "http://sf.example"], {}, None, "must start with https://"),
        (["--crm-secrets-stdin"], {}, "TOPSECRET\n", "line 1 of standard input is not NAME=value"),
        (["--crm-secrets-stdin"], {}, "O365SYNC_CRM_PASSWORD=TOPSECRET\n", "line 1 of standard input"),
    ],
)
def test_dropped_or_clear_text_crm_credentials_are_refused(args, env, stdin, message, data_dir):
    result = runner.invoke(app, [*SALESFORCE[:-4], *args], env=env, input=stdin)
    out = plain(result.output)
    assert result.exit_code == 2 and message in out and len(out.strip().splitlines()) == 1, out
    assert "TOPSECRET" not in out
    assert nothing_written(data_dir)


def test_tenant_add_creates_only_and_points_to_update(data_dir):
    assert (
        runner.invoke(
            app,
            [
                "tenant",
                "add",
                "--id",
                TENANT,
                "--domain",
                "contoso.com",
                "--feature",
                "email",
                "--retention-days",
                "30",
            ],
        ).exit_code
        == 0
    )
    assert runner.invoke(app, ["tenant", "block", TENANT, "evil.com"]).exit_code == 0
    config = data_dir / "tenants" / TENANT / "tenant.json"
    before = config.read_bytes()
    again = runner.invoke(
        app,
        ["tenant", "add", "--id", TENANT, "--domain", "fabrikam.com"],
        env={"O365SYNC_CRM_CLIENT_SECRET": "s", "O365SYNC_CRM_REFRESH_TOKEN": "r"},
    )
    out = plain(again.output)
    assert again.exit_code == 2 and len(out.strip().splitlines()) == 1, out
    assert "already registered" in out and f"o365sync tenant update {TENANT}" in out
    assert config.read_bytes() == before and not (data_dir / "tenants" / TENANT / "crm.secret").exists()


def test_tenant_update_changes_only_the_options_given(data_dir):
    from o365sync.settings import load_settings
    from o365sync.tenants import load_crm_secrets, load_tenant

    assert (
        runner.invoke(
            app,
            [
                *SALESFORCE,
                "--feature",
                "email",
                "--feature",
                "teams",
                "--retention-days",
                "30",
                "--offboarding",
                "retain",
            ],
            env={"O365SYNC_CRM_CLIENT_SECRET": "s", "O365SYNC_CRM_REFRESH_TOKEN": "r"},
        ).exit_code
        == 0
    )
    assert runner.invoke(app, ["tenant", "block", TENANT, "evil.com"]).exit_code == 0
    settings = load_settings()
    before = load_tenant(settings, TENANT)
    result = runner.invoke(app, ["tenant", "update", TENANT, "--name", "Contoso Ltd", "--explicit-consent"])
    assert result.exit_code == 0, result.output
    after = load_tenant(settings, TENANT)
    assert after.name == "Contoso Ltd" and after.notetaker_explicit_consent
    assert after.model_dump(exclude={"name", "notetaker_explicit_consent"}) == before.model_dump(
        exclude={"name", "notetaker_explicit_consent"}
    )
    assert load_crm_secrets(settings, TENANT) == {"client_secret": "s", "refresh_token": "r"}

    result = runner.invoke(
        app,
        [
            "tenant",
            "update",
            TENANT,
            "--crm",
            "hubspot",
            "--crm-login-url",
            "https://api.hubspot.example",
            "--crm-secrets-stdin",
        ],
        input="O365SYNC_CRM_TOKEN=pat-1\n",
    )
    assert result.exit_code == 0, result.output
    assert load_crm_secrets(settings, TENANT) == {"access_token": "pat-1"}
    assert load_tenant(settings, TENANT).blocklist == ["evil.com"]
    result = runner.invoke(app, ["tenant", "update", TENANT, "--crm", "files", "--crm-directory", "/srv/crm"])
    assert result.exit_code == 0 and load_crm_secrets(settings, TENANT) == {}  # the old CRM's token is gone
    missing = runner.invoke(app, ["tenant", "update", "nosuch", "--name", "x"])
    assert missing.exit_code == 1 and "not registered" in plain(missing.output)


def test_status_of_an_empty_registry():
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0
    assert "No tenants registered" in plain(result.output)


def test_unknown_tenant_is_a_clear_error(data_dir):
    result = runner.invoke(app, ["tenant", "show", "nobody"])
    out = " ".join(plain(result.output).split())
    assert result.exit_code == 1
    assert "not registered" in out and str(data_dir.resolve()) in out
    assert "O365SYNC_DATA_DIR" in out and "o365sync tenant add" in out


def test_registry_entries_that_cannot_be_read_are_skipped_with_a_warning(data_dir, caplog):
    from o365sync.settings import load_settings
    from o365sync.tenants import list_tenants, registry_problems

    assert runner.invoke(app, ["tenant", "add", "--id", TENANT, "--domain", "contoso.com"]).exit_code == 0
    tenants = data_dir / "tenants"
    (tenants / "notes.txt").write_text("stray")
    (tenants / "empty-folder").mkdir()
    (tenants / "cut-off").mkdir()
    (tenants / "cut-off" / "tenant.json").write_text('{"id": "cut-off", "domains": ["contoso.')
    (tenants / "wrong-id").mkdir()
    (tenants / "wrong-id" / "tenant.json").write_text('{"id": "other", "domains": ["contoso.com"]}')

    result = runner.invoke(app, ["tenant", "list"])
    out = plain(result.output)
    assert result.exit_code == 0 and TENANT in out
    for name in ("notes.txt", "empty-folder", "cut-off", "wrong-id"):
        assert f"warning: {tenants.resolve() / name}" in out
    settings = load_settings()
    assert [t.id for t in list_tenants(settings)] == [TENANT]
    assert len(registry_problems(settings)) == 4 and all("skipped" in p for p in registry_problems(settings))
    assert sum("tenant registry" in r.getMessage() for r in caplog.records if r.levelname == "WARNING") == 4
    broken = runner.invoke(app, ["tenant", "show", "cut-off"])
    assert broken.exit_code == 1 and "tenant.json is invalid" in " ".join(plain(broken.output).split())


def test_blocklist_entries_are_validated_and_stored(data_dir):
    runner.invoke(app, ["tenant", "add", "--id", TENANT, "--domain", "contoso.com"])
    assert runner.invoke(app, ["tenant", "block", TENANT, "Bob@Spam.io", "evil.com"]).exit_code == 0
    bad = runner.invoke(app, ["tenant", "block", TENANT, "not an address"])
    assert bad.exit_code == 2 and "not an address or domain" in plain(bad.output)
    assert runner.invoke(app, ["tenant", "block", TENANT, "evil.com", "--remove"]).exit_code == 0
    from o365sync.settings import load_settings
    from o365sync.tenants import load_tenant

    t = load_tenant(load_settings(), TENANT)
    assert t.blocklist == ["bob@spam.io"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["user", "set", TENANT, "0f3e8a52-9d2c-4b7e-8f1a-2c3d4e5f6a7b", "--no-calendar"], "nothing matched"),
        (["tenant", "block", TENANT, "x.org", "--user", "0f3e8a52-9d2c-4b7e-8f1a-2c3d4e5f6a7b"], "nothing matched"),
        (["tenant", "block", TENANT, "x.org", "--user", "x y"], "is not a user object id"),
        (["user", "set", TENANT, "../../etc", "--no-calendar"], "is not a user object id"),
    ],
)
def test_settings_of_a_user_who_never_connected_are_refused(args, message, data_dir):
    runner.invoke(app, ["tenant", "add", "--id", TENANT, "--domain", "contoso.com"])
    before = (data_dir / "tenants" / TENANT / "tenant.json").read_bytes()
    result = runner.invoke(app, args)
    out = plain(result.output)
    assert result.exit_code != 0 and message in out and len(out.strip().splitlines()) == 1, out
    assert (data_dir / "tenants" / TENANT / "tenant.json").read_bytes() == before
