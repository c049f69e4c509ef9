"""`o365sync demo`: the whole product against a simulated world, in one process.

Starts the simulators, registers the demo tenant, connects its users through the real MSAL auth-code flow
(via our own web endpoints, exactly as a browser would), runs the initial-import Prefect flow on the embedded
API, then prints a summary and example queries (`o365sync sql`, on the analysts' snapshot). Everything is
pointed at the simulators by settings only.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

DEMO_FEATURES = ["email", "calendar", "notetaker", "teams"]
EXAMPLE_QUERIES = {
    "Emails per CRM record kind": """
SELECT crm_kind, count(DISTINCT graph_id) AS emails, count(DISTINCT crm_id) AS records
FROM email_crm_matches GROUP BY crm_kind ORDER BY emails DESC""",
    "Most active accounts (direct domain matches and via their contacts)": """
SELECT a.name AS account, count(DISTINCT m.graph_id) AS emails, max(e.received_at) AS last_email
FROM email_crm_matches m
JOIN emails e USING (tenant_id, user_oid, graph_id)
LEFT JOIN crm_people p ON p.crm_id = m.crm_id
JOIN crm_accounts a ON a.crm_id = coalesce(p.account_id, m.crm_id)
GROUP BY a.name ORDER BY emails DESC LIMIT 5""",
    "Open opportunities and their email activity in the last 30 days": """
SELECT o.name AS opportunity, o.created_at::DATE AS opened, count(DISTINCT e.graph_id) AS emails_30d
FROM crm_opportunities o
LEFT JOIN crm_people p ON p.account_id = o.account_id
LEFT JOIN email_crm_matches m ON m.crm_id IN (o.account_id, p.crm_id)
LEFT JOIN emails e ON e.graph_id = m.graph_id AND e.received_at >= now() - INTERVAL 30 DAY
WHERE NOT o.is_closed GROUP BY ALL ORDER BY emails_30d DESC LIMIT 5""",
    "Upcoming customer meetings per account": """
SELECT coalesce(a.name, pa.name) AS account, count(DISTINCT mt.event_id) AS meetings, min(mt.start_at) AS next
FROM meetings mt JOIN meeting_crm_matches m USING (tenant_id, user_oid, event_id)
LEFT JOIN crm_accounts a ON m.crm_kind = 'account' AND a.crm_id = m.crm_id
LEFT JOIN crm_people p ON m.crm_kind <> 'account' AND p.crm_id = m.crm_id
LEFT JOIN crm_accounts pa ON pa.crm_id = p.account_id
WHERE mt.start_at >= now() AND coalesce(a.name, pa.name) IS NOT NULL
GROUP BY ALL ORDER BY meetings DESC LIMIT 5""",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(
    data_dir: Path, seed: int, users: int, messages: int, contacts: int, console: Console, keep_console: bool = False
) -> dict:
    from o365sync.prefect_env import configure_prefect_env, prefect_home_for
    from o365sync.startup import make_new_files_private

    make_new_files_private()
    configure_prefect_env(prefect_home=str(prefect_home_for(data_dir)))
    from simulators.running import start_world

    started = time.perf_counter()
    world = demo_world(seed, users, messages, contacts)
    tenant = world.tenants[0]
    web_port = _free_port()
    redirect_uri = f"http://localhost:{web_port}/auth/callback"
    running = start_world(world, data_dir / "simulator-tls", redirect_uris=[redirect_uri])
    try:
        os.environ.update(running.settings_env(data_dir, redirect_uri))
        result = _demo_with_world(running, tenant, web_port, console, started)
        if keep_console:
            serve_console(running, tenant, web_port, console)
        return result
    finally:
        running.stop()


def serve_console(running, tenant, web_port: int, console: Console) -> None:  # noqa: ANN001
    """Keep the world up and serve `o365sync web` (the console) on the demo's port until Ctrl-C. The tenant's first
    user is its administrator (app role O365Sync.Admin and Global Administrator); the others are reps."""
    import threading

    from app.import_trigger import import_starter
    from app.web import run_in_thread
    from o365sync.auth import ADMIN_APP_ROLE
    from o365sync.settings import load_settings
    from simulators.identity import GLOBAL_ADMINISTRATOR

    admin = tenant.users[0]
    # Who "is signed in at Microsoft": the sign-in link's login_hint, else the tenant's first user (the admin, who
    # therefore also grants admin consent at the tenant's admin-consent URL).
    running.identity.login_as(None)
    running.identity.assign_app_role(admin.oid, ADMIN_APP_ROLE)
    running.identity.assign_directory_role(admin.oid, GLOBAL_ADMINISTRATOR)
    settings = load_settings()  # a connect starts the rep's import at once (in-process: the demo has no Prefect server)
    _, stop = run_in_thread(settings, port=web_port, start_import=import_starter(settings))
    base = f"http://localhost:{web_port}"
    console.print(f"\n[bold]Console[/] {base}/  (the simulated Microsoft sign-in picks the account named below)")
    console.print(f"  admin {admin.display_name}: {base}/signin?login_hint={admin.upn}", highlight=False)
    for user in tenant.users[1:]:
        console.print(f"  rep {user.display_name}: {base}/signin?login_hint={user.upn}", highlight=False)
    console.print("Ctrl-C stops.")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def demo_world(seed: int, users: int, messages: int, contacts: int):  # noqa: ANN201
    """The demo's world (also `o365sync simulate`'s): one tenant, mail, calendars, Teams and every CRM."""
    from simulators.world import generate_world

    return generate_world(
        seed=seed, users_per_tenant=users, messages_per_user=messages, contacts_per_tenant=contacts, calendars=True
    )


def simulate_world(
    data_dir: Path, seed: int, users: int, messages: int, contacts: int, web_port: int, echo: Callable[[str], None]
):  # noqa: ANN201
    """Start the demo's world (until `.stop()`) and `echo` how to point the product at it."""
    from simulators.running import start_world

    world = demo_world(seed, users, messages, contacts)
    redirect = f"http://localhost:{web_port}/auth/callback"
    running = start_world(world, data_dir / "simulator-tls", redirect_uris=[redirect])
    try:
        for line in simulate_instructions(running, data_dir, web_port):
            echo(line)
    except BaseException:
        running.stop()
        raise
    return running


def simulate_instructions(running, data_dir: Path, web_port: int) -> list[str]:  # noqa: ANN001
    """URLs, settings, and per tenant the complete `tenant add` (the demo's features; CRM secrets in the
    environment of that one command, never as options) and each user's connect link."""
    redirect = f"http://localhost:{web_port}/auth/callback"
    sf = running.salesforce
    lines = [
        f"identity platform  {running.identity.base_url}",
        f"Microsoft Graph    {running.graph.base_url}",
        f"Salesforce         {sf.base_url}",
        "",
        "# settings (e.g. in .env):",
    ]
    lines += [f"{key}={value}" for key, value in running.settings_env(data_dir, redirect).items()]
    for t in running.world.tenants:
        secrets = {
            "O365SYNC_CRM_CLIENT_SECRET": sf.client_secret,
            "O365SYNC_CRM_REFRESH_TOKEN": sf.refresh_token_for(t.tid),
        }
        command = [
            "o365sync",
            "tenant",
            "add",
            "--id",
            t.tid,
            "--name",
            t.name,
            *(arg for d in t.domains for arg in ("--domain", d)),
            "--crm",
            "salesforce",
            "--crm-login-url",
            sf.base_url,
            "--crm-client-id",
            sf.client_id,
            *(arg for f in DEMO_FEATURES for arg in ("--feature", f)),
        ]
        lines += [
            "",
            f"# tenant {t.name}: users {', '.join(u.upn for u in t.users)}",
            " ".join(f"{k}={shlex.quote(v)}" for k, v in secrets.items()) + " " + shlex.join(command),
        ]
        lines += [
            f"# connect {u.display_name}: http://localhost:{web_port}/connect?tenant={t.tid}&login_hint={u.upn}"
            for u in t.users
        ]
    lines += [
        "",
        "Then: o365sync web, open the connect links, o365sync import --tenant <id>, and query with "
        'o365sync sql "SELECT kind, count(*) FROM activities GROUP BY ALL". Ctrl-C stops.',
    ]
    return lines


def simulated_crm(running, tenant, crm_kind: str, files_dir: Path | None = None):  # noqa: ANN001, ANN201
    """The tenant's CRM connection and secrets for one of the simulated CRMs (or a file export of its data)."""
    from o365sync.tenants import CrmConnection

    if crm_kind == "salesforce":
        sf = running.salesforce
        return (
            CrmConnection(login_url=sf.base_url, client_id=sf.client_id),
            {"client_secret": sf.client_secret, "refresh_token": sf.refresh_token_for(tenant.tid)},
        )
    if crm_kind == "hubspot":
        hubspot = running.hubspot
        return CrmConnection(login_url=hubspot.base_url), {"access_token": hubspot.token_for(tenant.tid)}
    if crm_kind == "pipedrive":
        pipedrive = running.pipedrive
        return CrmConnection(login_url=pipedrive.base_url), {"api_token": pipedrive.token_for(tenant.tid)}
    if crm_kind == "files":
        from simulators.crm_files import write_crm_files

        assert files_dir is not None, "crm_kind files needs a directory"
        write_crm_files(running.world.crm[tenant.tid], files_dir)
        return CrmConnection(directory=str(files_dir)), {}
    raise ValueError(f"unknown CRM kind {crm_kind!r}")


def register_simulated_tenant(
    settings,  # noqa: ANN001
    running,  # noqa: ANN001
    tenant,  # noqa: ANN001
    crm_kind: str = "salesforce",
    features: list[str] | None = None,
    explicit_consent: bool = False,
) -> None:
    """Register a simulated tenant (fresh: its earlier files are removed) with one of the simulated CRMs."""
    from o365sync.tenants import TenantConfig, save_tenant, tenant_dir

    shutil.rmtree(tenant_dir(settings, tenant.tid), ignore_errors=True)
    connection, secrets = simulated_crm(running, tenant, crm_kind, tenant_dir(settings, tenant.tid) / "crm-files")
    save_tenant(
        settings,
        TenantConfig(
            id=tenant.tid,
            name=tenant.name,
            domains=tenant.domains,
            features=features or ["email"],
            notetaker_explicit_consent=explicit_consent,
            crm_kind=crm_kind,
            crm=connection,
        ),
        secrets,
    )


def register_and_connect(
    settings,
    running,
    tenant,
    web_port: int,
    crm_kind: str = "salesforce",  # noqa: ANN001
    features: list[str] | None = None,
    explicit_consent: bool = False,
) -> None:
    """Register a simulated tenant (fresh) and connect each of its users through our web endpoints + MSAL.
    `features` default: email only."""
    from app.web import run_in_thread
    from o365sync.http import ssl_context

    register_simulated_tenant(settings, running, tenant, crm_kind, features, explicit_consent)
    # One browser signs every user in from one address: let the per-address rate limit admit all of them.
    base_url, stop_web = run_in_thread(
        settings.model_copy(update={"connect_rate_limit": f"{max(30, len(tenant.users))}/minute"}), port=web_port
    )
    try:
        with httpx.Client(verify=ssl_context(settings), follow_redirects=True, trust_env=False) as browser:
            for user in tenant.users:
                running.identity.login_as(user.oid)
                reply = browser.get(f"{base_url}/connect", params={"tenant": tenant.tid})
                reply.raise_for_status()
    finally:
        stop_web()


def _demo_with_world(running, tenant, web_port: int, console: Console, started: float) -> dict:  # noqa: ANN001
    from app.cli_sql import query_snapshot
    from flows.initial_import import initial_import
    from flows.teams import teams_refresh
    from o365sync.auth import connected_users
    from o365sync.settings import load_settings
    from o365sync.store import open_store, snapshot_path
    from o365sync.sync.calendar import anchored_window
    from o365sync.tenants import tenant_dir

    settings = load_settings()
    console.print(
        f"[bold]Simulated world[/] tenant {tenant.name} ({tenant.tid}), {len(tenant.users)} users, "
        f"{sum(len(running.world.mailboxes[u.oid]) for u in tenant.users)} messages"
    )
    register_and_connect(settings, running, tenant, web_port, features=DEMO_FEATURES)
    console.print(
        f"Connected {len(tenant.users)} users through MSAL (auth code + PKCE), features {', '.join(DEMO_FEATURES)}"
    )
    t0 = time.perf_counter()
    totals = initial_import(tenant.tid)
    flow_s = time.perf_counter() - t0
    teams = teams_refresh(tenant.tid)  # the daily teams-refresh flow, run now: each user's channel list

    names = {u.oid: u.display_name or u.oid for u in connected_users(settings, tenant.tid)}
    table = Table(title="Initial import per user (o365sync status shows more)")
    for col in ("user", "feature", "stage", "scanned", "matched", "imported", "discarded"):
        table.add_column(col, justify="left" if col in ("user", "feature", "stage") else "right")
    with open_store(settings, tenant.tid, write=False) as con:
        for oid, feature, *row in con.execute(
            "SELECT user_oid, feature, stage, scanned, matched, imported, discarded FROM sync_state "
            "WHERE feature IN ('email', 'calendar') ORDER BY user_oid, feature DESC"
        ).fetchall():
            table.add_row(names.get(oid, oid), feature, *(str(v) for v in row))
        meetings = con.execute("SELECT count(*), count(*) FILTER (WHERE is_internal) FROM meetings").fetchone()
        listed = con.execute("SELECT count(*) FROM notetaker_queue WHERE status = 'to_record'").fetchone()[0]
    console.print(table)
    expected = len(running.world.expected_matches(tenant.tid))
    lo, hi = anchored_window(datetime.now(UTC))
    expected_meetings = len(running.world.calendars.expected_meetings(tenant.tid, lo, hi))
    console.print(
        f"Imported {totals['imported']} of {totals['scanned']} scanned messages "
        f"(ground truth: {expected} must be imported); {meetings[0]} meetings of the next 12 months "
        f"(ground truth: {expected_meetings}), {listed} listed for Notetaker; "
        f"{teams['channels']} Teams channels listed; flow {flow_s:.1f}s, "
        f"total {time.perf_counter() - started:.1f}s"
    )
    snap = snapshot_path(settings, tenant.tid)
    console.print(f"\n[bold]Analyst snapshot[/]: {snap}  (live store: {tenant_dir(settings, tenant.tid)})")
    for title, sql in EXAMPLE_QUERIES.items():
        console.print(f"\n[bold]{title}[/]", highlight=False)
        console.print(f'o365sync sql "{" ".join(sql.split())}"', soft_wrap=True, highlight=False, markup=False)
        columns, rows = query_snapshot(settings, tenant.tid, sql)
        out = Table(*columns)
        for row in rows:
            out.add_row(*(str(v) for v in row))
        console.print(out)
    return {**totals, "expected": expected}
