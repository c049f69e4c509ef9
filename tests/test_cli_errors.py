"""Every command of the CLI, given bad input, fails with one line and changes nothing.

The table below has a row for every command of the Typer app (enumerated from the app: a new command without a
row fails `test_every_command_has_a_row`). Each case runs the real command against a real data dir (a simulated
tenant imported through the real flow, a second tenant with a misconfigured CRM) and asserts: exit code != 0,
no traceback, exactly one line of output, and the data dir byte-identical before and after.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from app.cli import app
from app.cli_checks import OneLineErrors
from simulators.world import generate_world
from tests.product import stand_up

FILES_TENANT = "files-crm-without-directory"
BAD_PATH = "/proc/o365sync-cannot-write-here"

# Commands whose bad-input fixes belong to other helpers of issue 10 and are not on this branch yet: the
# integrator removes each entry once the fix is merged (the case then must pass).
PENDING_ELSEWHERE: dict[str, str] = {}


def _cases() -> dict[str, list[tuple[list[str], dict[str, str]]]]:
    """command path -> [(arguments, extra environment)]; `{T}`, `{U}`, `{FILE}`, `{EMPTY}` filled in at run time."""
    return {
        "demo": [(["--users", "0"], {})],
        "simulate": [(["--users", "0"], {}), (["--web-port", "0"], {})],
        "web": [(["--port", "70000"], {})],
        "serve": [([], {"O365SYNC_DATA_DIR": "{EMPTY}"})],
        "import": [(["--tenant", "nosuch"], {}), (["--tenant", FILES_TENANT], {}), (["--tenant", "../x"], {})],
        "explain": [
            (["--tenant", "nosuch", "--user", "{U}", "--message", "x"], {}),
            (["--tenant", "{T}", "--user", "nobody", "--message", "x"], {}),
            (["--tenant", "{T}", "--user", "{U}"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--message", "x", "--event", "y"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--event", "no-such-event-id"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--message", "no-such-graph-id"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--message", "<no-such@example.com>"], {}),
        ],
        "preview": [
            (["--tenant", "nosuch"], {}),
            (["--tenant", "{T}", "--user", "nobody"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--format", "yaml"], {}),
            (["--tenant", FILES_TENANT], {}),
        ],
        "status": [(["--tenant", "nosuch"], {}), ([], {"O365SYNC_DATA_DIR": "{FILE}"})],
        "export": [
            (["--tenant", "nosuch"], {}),
            (["--tenant", "{T}", "--out", BAD_PATH], {}),
            (["--tenant", "{T}", "--out", "{FILE}"], {}),
            (["--tenant", "{T}", "--view", "secrets"], {}),
        ],
        "sql": [
            (["--tenant", "nosuch", "SELECT 1"], {}),
            (["SELECT 1"], {}),
            (["--tenant", "{T}", "SELEC kind FROM activities"], {}),
            (["--tenant", "{T}", "DELETE FROM emails"], {}),
            (["--tenant", "{T}", "CREATE TABLE leak AS SELECT * FROM emails"], {}),
            (["--tenant", "{T}", f"COPY (SELECT * FROM emails) TO '{BAD_PATH}.csv'"], {}),
            (["--tenant", "{T}", "ATTACH '/tmp/o365sync-sql-attach.duckdb' AS x"], {}),
            (["--tenant", FILES_TENANT, "SELECT 1"], {}),
        ],
        "conversation export": [
            (["--tenant", "nosuch", "--id", "x"], {}),
            (["--tenant", "{T}", "--id", "typo"], {}),
            (["--tenant", "{T}", "--message", "typo"], {}),
            (["--tenant", FILES_TENANT, "--id", "x"], {}),
        ],
        "conversation delete": [
            (["--tenant", "{T}", "--id", "typo"], {}),
            (["--tenant", "{T}", "--id", "{CONV}", "--id", "typo"], {}),
            (["--tenant", "{T}", "--id", "{CONV}", "--user", "nobody"], {}),
            (["--tenant", "{T}", "--message", "typo"], {}),
            (["--tenant", "nosuch", "--id", "x"], {}),
            (["--tenant", "{T}"], {}),
            (["--tenant", FILES_TENANT, "--id", "x"], {}),
        ],
        "meeting export": [
            (["--tenant", "{T}", "--event", "typo"], {}),
            (["--tenant", "{T}", "--series", "typo"], {}),
            (["--tenant", "nosuch", "--event", "x"], {}),
        ],
        "meeting delete": [
            (["--tenant", "{T}", "--event", "typo"], {}),
            (["--tenant", "{T}", "--series", "typo"], {}),
            (["--tenant", "nosuch", "--event", "x"], {}),
        ],
        "retention run": [(["--tenant", "nosuch"], {})],
        "ops automations create": [([], {}), (["--webhook", "ftp://example.invalid/x"], {})],
        "offboard user": [
            (["--tenant", "{T}", "../../../tmp/x"], {}),
            (["--tenant", "{T}", "nobody"], {}),
            (["--tenant", "nosuch", "{U}"], {}),
        ],
        "offboard tenant": [(["--tenant", "nosuch", "--yes"], {}), (["--tenant", "{T}"], {})],
        "offboard status": [(["--tenant", "nosuch"], {})],
        "teams channels": [
            (["--tenant", "nosuch"], {}),
            (["--tenant", "{T}", "--user", "nobody"], {}),
            (["--tenant", "{T}", "--user", "../x", "--refresh"], {}),
            (["--tenant", FILES_TENANT], {}),
        ],
        "teams share": [
            (["--tenant", "{T}", "--user", "nobody", "--meeting", "m", "--member", "{U}"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--meeting", "typo", "--member", "{U2}"], {}),
            (["--tenant", "{T}", "--user", "{U}", "--email", "typo", "--team", "t", "--channel", "c"], {}),
            (["--tenant", "nosuch", "--user", "{U}", "--meeting", "m", "--member", "{U2}"], {}),
        ],
        "tenant add": [
            (["--id", "{T}", "--domain", "example.org"], {}),
            (["--id", "new-tenant", "--domain", "example.org", "--crm-token", "secret"], {}),
            (["--id", "new-tenant", "--domain", "example.org", "--crm-login-url", "http://sf.example"], {}),
            (
                ["--id", "new-tenant", "--domain", "example.org"],
                {"O365SYNC_CRM_CLIENT_SECRET": "only-half-of-the-salesforce-secrets"},
            ),
        ],
        "tenant update": [
            (["nosuch", "--name", "x"], {}),
            (["{T}", "--crm-login-url", "http://sf.example"], {}),
            (["{T}", "--domain", "not a domain"], {}),
        ],
        "tenant resync": [
            (["nosuch"], {}),
            (["{T}", "--user", "nobody"], {}),
            (["{T}", "--user", "../x"], {}),
            (["{T}", "--feature", "teams"], {}),
        ],
        "crm confirm-drop": [(["--tenant", "nosuch"], {}), (["--tenant", "{T}"], {})],
        "offboard readmit": [
            (["--tenant", "{T}", "{U}"], {}),
            (["--tenant", "{T}", "../x"], {}),
            (["--tenant", "nosuch", "{U}"], {}),
        ],
        "tenant list": [([], {"O365SYNC_DATA_DIR": "{FILE}"})],
        "tenant show": [(["nosuch"], {})],
        "tenant move": [(["nosuch", "--region", "eu"], {})],
        "tenant assign": [(["nosuch", "--shard", "a"], {}), (["{T}", "--shard", "nosuch"], {})],
        "tenant block": [(["nosuch", "spam.example"], {}), (["{T}", "spam.example", "--user", "x y"], {})],
        "user set": [(["{T}", "nobody", "--no-calendar"], {})],
    }


CASES = _cases()


def command_paths(command, prefix: str = "") -> list[str]:  # noqa: ANN001
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return [prefix]
    return [p for name, sub in sorted(subcommands.items()) for p in command_paths(sub, f"{prefix} {name}".strip())]


def test_every_command_has_a_row():
    missing = sorted(set(command_paths(get_command(app))) - set(CASES))
    assert not missing, f"commands without a bad-input row in tests/test_cli_errors.py: {missing}"


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under `root` (or `root` itself, a file) -> the digest of its bytes ("dir" for a folder)."""
    paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() for p in paths
    }


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.fixture(scope="module")
def world_dir(prefect_server, tmp_path_factory):  # noqa: ARG001 - the import flow needs the Prefect API
    """A data dir with a tenant imported through the real flow, plus a tenant whose files CRM has no folder."""
    from flows.initial_import import initial_import
    from o365sync.tenants import CrmConnection, TenantConfig, save_tenant

    tmp = tmp_path_factory.mktemp("cli-errors")
    world = generate_world(tenants=1, users_per_tenant=2, messages_per_user=60, calendars=True)
    with pytest.MonkeyPatch.context() as mp:
        product = stand_up(world, tmp, mp, features=["email", "calendar", "teams"])
        try:
            tenant = world.tenants[0]
            initial_import(tenant.tid)
            save_tenant(
                product.settings,
                TenantConfig(id=FILES_TENANT, domains=["example.org"], crm_kind="files", crm=CrmConnection()),
            )
            from o365sync.store import open_store

            with open_store(product.settings, tenant.tid, write=False) as con:
                conv = con.execute(
                    "SELECT conversation_id FROM emails WHERE conversation_id IS NOT NULL LIMIT 1"
                ).fetchone()[0]
            (tmp / "a-file").write_text("not a folder\n")
            (tmp / "empty").mkdir()
            yield {
                "dir": product.settings.data_dir,
                "env": dict(os.environ),
                "T": tenant.tid,
                "U": tenant.users[0].oid,
                "U2": tenant.users[1].oid,
                "CONV": conv,
                "FILE": str(tmp / "a-file"),
                "EMPTY": str(tmp / "empty"),
            }
        finally:
            product.running.stop()


def _fill(value: str, w: dict) -> str:
    return re.sub(r"\{([A-Z0-9]+)\}", lambda m: w[m.group(1)], value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, args, env",
    [(p, a, e) for p, rows in CASES.items() for a, e in rows],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v if isinstance(v, str) else "",
)
def test_bad_input_is_one_line_and_changes_nothing(world_dir, path, args, env):
    if path in PENDING_ELSEWHERE:
        pytest.skip(PENDING_ELSEWHERE[path])
    w = world_dir
    args = [_fill(a, w) for a in args]
    env = {k: _fill(v, w) for k, v in env.items()}
    watched = Path(env.get("O365SYNC_DATA_DIR", w["dir"]))
    before = tree_digest(watched)
    result = CliRunner().invoke(app, [*path.split(), *args], env={**w["env"], "COLUMNS": "80", **env})
    out = plain(result.output)
    assert result.exit_code != 0, out
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit), out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    after = tree_digest(watched)
    assert after == before, f"changed: {sorted(k for k in before | after if before.get(k) != after.get(k))}"
    assert not Path(BAD_PATH).exists() and not Path("/tmp/o365sync-sql-attach.duckdb").exists()
    assert not Path("/tmp/x").exists() or "offboard" not in path


def test_a_bug_prints_one_line_and_logs_the_details_privately(tmp_path):
    """The last resort: an unexpected exception is one line naming the log; the traceback is in the log (0600)."""
    assert isinstance(get_command(app), OneLineErrors)
    broken = typer.Typer(cls=OneLineErrors)
    broken.command("explode")(lambda: {}["missing-key"])
    broken.command("other")(lambda: None)
    result = CliRunner().invoke(broken, ["explode"], env={"O365SYNC_DATA_DIR": str(tmp_path), "COLUMNS": "80"})
    out = plain(result.output)
    assert result.exit_code == 1 and "Traceback" not in out
    assert len([line for line in out.splitlines() if line.strip()]) == 1
    log = tmp_path / "logs" / "cli-errors.log"
    assert f"details in {log}" in out.replace("\n", "")
    assert "Traceback" in log.read_text() and "missing-key" in log.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(log.parent.stat().st_mode) == 0o700


def test_a_store_of_a_newer_version_is_an_operators_line_not_a_bug(tmp_path):
    """A downgrade meets a store written by a newer o365sync: one line saying what to do, nothing logged as a bug."""
    import duckdb

    from o365sync.settings import Settings
    from o365sync.store import open_store, store_path

    settings = Settings(data_dir=tmp_path)
    with open_store(settings, "t1", write=True):
        pass
    with duckdb.connect(str(store_path(settings, "t1"))) as con:
        newest = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        con.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, now())", [newest + 1])

    def open_for_writing() -> None:
        with open_store(settings, "t1", write=True):
            pass

    cli = typer.Typer(cls=OneLineErrors)
    cli.command("open")(open_for_writing)
    cli.command("other")(lambda: None)
    result = CliRunner().invoke(cli, ["open"], env={"O365SYNC_DATA_DIR": str(tmp_path), "COLUMNS": "200"})
    out = plain(result.output).strip()
    assert result.exit_code == 1 and "\n" not in out and "unexpected" not in out and "upgrade o365sync" in out
    assert not (tmp_path / "logs").exists()


def test_a_usage_error_is_one_line():
    result = CliRunner().invoke(app, ["import"], env={"COLUMNS": "80"})
    assert result.exit_code == 2
    out = plain(result.output).strip()
    assert "\n" not in out and "--tenant" in out and "--help" in out


@pytest.mark.slow
def test_a_typo_in_a_conversation_delete_leaves_no_tombstone(world_dir):
    """Issue 10 item 16: no permanent "never import" entry for an id that never existed."""
    from o365sync.settings import load_settings
    from o365sync.store import open_store

    w = world_dir
    result = CliRunner().invoke(
        app, ["conversation", "delete", "--tenant", w["T"], "--id", "typo"], env={**w["env"], "COLUMNS": "80"}
    )
    assert result.exit_code == 1 and "nothing matched" in plain(result.output)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in w["env"].items():
            if k.startswith("O365SYNC_"):
                mp.setenv(k, v)
        with open_store(load_settings(), w["T"], write=False) as con:
            assert con.execute("SELECT count(*) FROM erased").fetchone()[0] == 0
