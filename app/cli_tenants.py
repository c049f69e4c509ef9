"""`o365sync tenant …` and `o365sync user …`: register, inspect, move and configure tenants; a user's own
choices. Secrets are stored encrypted and never shown."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from o365sync.settings import load_settings
from o365sync.tenants import CRM_SECRET_VARIABLES

if TYPE_CHECKING:
    from o365sync.tenants import TenantConfig

tenant_app = typer.Typer(help="Register and inspect tenants.", no_args_is_help=True)
user_app = typer.Typer(help="Per-user choices (calendar import, internal meetings, Notetaker).", no_args_is_help=True)
console = Console()


def _fail(message: str, code: int = 2) -> NoReturn:
    """One red line, exit code != 0 (nothing was changed: every check runs before anything is written)."""
    console.print(f"[red]{message}[/]", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _registered(settings, tenant_id: str, code: int = 2) -> TenantConfig:  # noqa: ANN001
    """The registered tenant's configuration, or its one-line "not found" (nothing was changed)."""
    from o365sync.tenants import TenantNotFound, load_tenant

    try:
        return load_tenant(settings, tenant_id)
    except TenantNotFound as exc:
        _fail(str(exc), code)


# Options shared by `tenant add` and `tenant update` (update: an option left out keeps its value).
Name = Annotated[str | None, typer.Option(help="Display name.")]
Domains = Annotated[list[str] | None, typer.Option("--domain", help="Verified domain (repeat).")]
Crm = Annotated[str | None, typer.Option(help="CRM kind: salesforce, hubspot, pipedrive or files.")]
CrmLoginUrl = Annotated[
    str | None, typer.Option(help="Salesforce login URL, or the HubSpot/Pipedrive API base URL (https only).")
]
CrmClientId = Annotated[str | None, typer.Option(help="Salesforce OAuth client id.")]
CrmDirectory = Annotated[str | None, typer.Option(help="crm=files: folder with people/accounts CSV or Parquet.")]
Features = Annotated[
    list[str] | None,
    typer.Option(
        "--feature",
        help="Enabled feature (repeat): email, calendar, notetaker, teams. Default: email, calendar, notetaker.",
    ),
]
ExplicitConsent = Annotated[
    bool | None,
    typer.Option(
        "--explicit-consent/--no-explicit-consent",
        help="Notetaker Explicit Consent Mode (Teams links and consent notices on matched external meetings).",
    ),
]
RetentionDays = Annotated[int | None, typer.Option(help="Delete activities older than this many days.")]
Offboarding = Annotated[
    str | None, typer.Option(help="When a user is removed: delete (after the grace period) or retain their data.")
]
GraceDays = Annotated[int | None, typer.Option(help="Days before an offboarded user's data is deleted.")]
SecretsStdin = Annotated[
    bool,
    typer.Option(
        "--crm-secrets-stdin",
        help="Read the CRM secrets from standard input "
        "as NAME=value lines (names as the environment variables "
        f"{', '.join(CRM_SECRET_VARIABLES)}); default: from the environment.",
    ),
]
# Refused: secrets on the command line are visible in `ps` and shell history.
_OldSecret = Annotated[str | None, typer.Option(hidden=True)]
_OLD_SECRET_OPTIONS = {
    "--crm-client-secret": "O365SYNC_CRM_CLIENT_SECRET",
    "--crm-refresh-token": "O365SYNC_CRM_REFRESH_TOKEN",
    "--crm-token": "O365SYNC_CRM_TOKEN",
}


def _refuse_secret_arguments(*values: str | None) -> None:
    for (option, variable), value in zip(_OLD_SECRET_OPTIONS.items(), values, strict=True):
        if value is not None:
            _fail(
                f"{option} is no longer accepted (command-line arguments show in `ps` and shell history): set "
                f"{variable} in the environment, or pipe `{variable}=...` into the command with --crm-secrets-stdin"
            )


def _given_secrets(from_stdin: bool) -> dict[str, str]:
    """The CRM secrets given: `NAME=value` lines on standard input, or else the environment variables."""
    if not from_stdin:
        return {name: os.environ.get(name, "") for name in CRM_SECRET_VARIABLES}
    given: dict[str, str] = {}
    for number, line in enumerate(sys.stdin.read().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or name.strip() not in CRM_SECRET_VARIABLES:
            _fail(
                f"line {number} of standard input is not NAME=value with NAME one of "
                f"{', '.join(CRM_SECRET_VARIABLES)}; nothing was saved"
            )
        given[name.strip()] = value.strip()
    return given


# command option -> TenantConfig field (and CrmConnection field for the crm_* ones)
_CONFIG_FIELDS = {
    "name": "name",
    "domain": "domains",
    "feature": "features",
    "explicit_consent": "notetaker_explicit_consent",
    "crm": "crm_kind",
    "retention_days": "retention_days",
    "offboarding": "offboarding",
    "offboarding_grace_days": "offboarding_grace_days",
}
_CRM_FIELDS = {"crm_login_url": "login_url", "crm_client_id": "client_id", "crm_directory": "directory"}


def _config(base: dict, options: dict[str, object]) -> TenantConfig:
    """`base` (the current configuration, or a new tenant's id) with the command's options that were given (not
    None); one line if the result is invalid."""
    from pydantic import ValidationError

    from o365sync.tenants import TenantConfig

    data = {**base, **{field: options[o] for o, field in _CONFIG_FIELDS.items() if options[o] not in (None, [])}}
    data["crm"] = {
        **(data.get("crm") or {}),
        **{field: options[o] for o, field in _CRM_FIELDS.items() if options[o] is not None},
    }
    data["crm"]["directory"] = data["crm"].get("directory") or None
    try:
        return TenantConfig.model_validate(data)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()))


def _secrets(config: TenantConfig, from_stdin: bool) -> dict[str, str] | None:
    from o365sync.tenants import crm_secrets_for

    try:
        return crm_secrets_for(config.crm_kind, _given_secrets(from_stdin))
    except ValueError as exc:
        _fail(str(exc))


@tenant_app.command("add")
def tenant_add(
    id: Annotated[str, typer.Option("--id", help="Entra tenant id.")],
    domain: Domains,
    name: Name = "",
    crm: Crm = "salesforce",
    crm_login_url: CrmLoginUrl = "https://login.salesforce.com",
    crm_client_id: CrmClientId = "",
    crm_directory: CrmDirectory = None,
    feature: Features = None,
    explicit_consent: ExplicitConsent = False,
    retention_days: RetentionDays = None,
    offboarding: Offboarding = None,
    offboarding_grace_days: GraceDays = None,
    crm_secrets_stdin: SecretsStdin = False,
    crm_client_secret: _OldSecret = None,
    crm_refresh_token: _OldSecret = None,
    crm_token: _OldSecret = None,
) -> None:
    """Register a new tenant (`tenant update` changes one). CRM secrets come from the environment or standard input
    (--crm-secrets-stdin), never from arguments; they are stored encrypted and never shown."""
    from o365sync.tenants import TenantExists, registry_dir, save_tenant

    _refuse_secret_arguments(crm_client_secret, crm_refresh_token, crm_token)
    if not domain:
        _fail("give at least one --domain (the tenant's verified domains)")
    config = _config({"id": id}, locals())
    settings = load_settings()
    if (registry_dir(settings, config.id) / "tenant.json").exists():
        _fail(str(TenantExists(config.id)))
    secrets = _secrets(config, crm_secrets_stdin)
    try:
        save_tenant(settings, config, secrets, create=True)
    except TenantExists as exc:
        _fail(str(exc))
    console.print(f"tenant {config.id} saved")


@tenant_app.command("update")
def tenant_update(
    tenant_id: str,
    name: Name = None,
    domain: Domains = None,
    crm: Crm = None,
    crm_login_url: CrmLoginUrl = None,
    crm_client_id: CrmClientId = None,
    crm_directory: CrmDirectory = None,
    feature: Features = None,
    explicit_consent: ExplicitConsent = None,
    retention_days: RetentionDays = None,
    offboarding: Offboarding = None,
    offboarding_grace_days: GraceDays = None,
    crm_secrets_stdin: SecretsStdin = False,
    crm_client_secret: _OldSecret = None,
    crm_refresh_token: _OldSecret = None,
    crm_token: _OldSecret = None,
) -> None:
    """Change a registered tenant: only the options given (--domain and --feature replace the lists); region,
    blocklists and users' choices are kept. New CRM secrets (environment or --crm-secrets-stdin) are stored with
    the tenant's other files; changing the CRM kind without new secrets forgets the old ones."""
    from o365sync.tenants import TenantNotFound, save_tenant, tenant_dir

    _refuse_secret_arguments(crm_client_secret, crm_refresh_token, crm_token)
    settings = load_settings()
    current = _registered(settings, tenant_id, 1)
    config = _config(current.model_dump(), locals())
    secrets = _secrets(config, crm_secrets_stdin)
    if secrets is None and config.crm_kind != current.crm_kind:
        secrets = {}  # the old CRM's secrets are of no use to the new one
    if secrets is not None:
        try:
            tenant_dir(settings, config.id)  # where they go: refuse a tenant whose files are elsewhere first
        except TenantNotFound as exc:
            _fail(str(exc), 1)
    save_tenant(settings, config, secrets)
    changed = sorted(k for k, v in config.model_dump().items() if v != current.model_dump()[k])
    console.print(
        f"tenant {config.id} updated: {', '.join(changed) or 'no setting changed'}"
        + (f"; CRM secrets replaced ({', '.join(sorted(secrets)) or 'none'})" if secrets is not None else "")
    )


@tenant_app.command("list")
def tenant_list() -> None:
    """List registered tenants (entries of the registry that cannot be read are named and skipped)."""
    from o365sync.tenants import scan_tenants

    tenants, problems = scan_tenants(load_settings())
    table = Table("id", "name", "domains", "crm", "features", "shard")
    for t in tenants:
        table.add_row(t.id, t.name, ", ".join(t.domains), t.crm_kind, ", ".join(t.features), t.shard or "")
    console.print(table)
    for problem in problems:
        console.print(f"[yellow]warning: {problem}[/]", soft_wrap=True, highlight=False)


@tenant_app.command("show")
def tenant_show(tenant_id: str) -> None:
    """Show one tenant (without secrets) and its connected users."""
    from o365sync.auth import connected_users
    from o365sync.tenants import TenantNotFound, load_crm_secrets, load_tenant

    settings = load_settings()
    try:
        t = load_tenant(settings, tenant_id)
        secrets, users = load_crm_secrets(settings, t.id), connected_users(settings, t.id)
    except TenantNotFound as exc:
        _fail(str(exc), 1)
    console.print(t.model_dump_json(indent=2))
    console.print(f"CRM secrets stored: {', '.join(sorted(secrets)) or 'none'}")
    for u in users:
        console.print(f"connected user {u.oid} ({u.display_name})")


def _known_user(settings, tenant: TenantConfig, user: str) -> str:  # noqa: ANN001
    """The user's canonical object id if they are, or were, connected to the tenant (or already have settings of
    their own); otherwise one line saying nothing matched, and the command ends without saving."""
    from o365sync.auth import connection_info
    from o365sync.tenants import TenantNotFound, canonical_id

    oid = canonical_id(user.strip())
    try:
        known = (
            oid in tenant.user_preferences
            or oid in tenant.user_blocklists
            or bool(connection_info(settings, tenant.id, oid))
        )
    except TenantNotFound as exc:
        _fail(str(exc), 1)
    except ValueError:
        _fail(
            f"{user!r} is not a user object id (a GUID such as 00000000-0000-0000-0000-000000000000); nothing was saved"
        )
    if not known:
        _fail(
            f"nothing matched: user {oid} never connected to tenant {tenant.id} (its users: `o365sync tenant "
            f"show {tenant.id}`); nothing was saved",
            1,
        )
    return oid


@user_app.command("set")
def user_set(
    tenant_id: str,
    user: Annotated[str, typer.Argument(help="The user's object id.")],
    calendar: Annotated[bool | None, typer.Option("--calendar/--no-calendar", help="Import meetings.")] = None,
    internal_meetings: Annotated[
        bool | None, typer.Option("--internal-meetings/--no-internal-meetings", help="Also import internal meetings.")
    ] = None,
    notetaker: Annotated[
        bool | None, typer.Option("--notetaker/--no-notetaker", help="Notetaker for my meetings.")
    ] = None,
) -> None:
    """Change one connected user's choices; options left out keep their value."""
    from o365sync.tenants import save_tenant

    settings = load_settings()
    t = _registered(settings, tenant_id)
    user = _known_user(settings, t, user)
    changes = {
        k: v
        for k, v in {"calendar": calendar, "internal_meetings": internal_meetings, "notetaker": notetaker}.items()
        if v is not None
    }
    prefs = t.preferences_for(user).model_copy(update=changes)
    t.user_preferences[user] = prefs
    save_tenant(settings, t)
    console.print(f"user {user}: " + ", ".join(f"{k}={'on' if v else 'off'}" for k, v in prefs.model_dump().items()))


@tenant_app.command("move")
def tenant_move(
    tenant_id: str,
    region: Annotated[str, typer.Option(help="Target region (a key of O365SYNC_REGIONS); 'default' = data_dir.")],
) -> None:
    """Move every file of a tenant (store, snapshot, tokens, credentials, exports) to another region's storage.
    Refuses to overwrite a store already at the destination, or a destination that is the current location."""
    from o365sync.residency import move_tenant
    from o365sync.tenants import TenantNotFound

    try:
        result = move_tenant(load_settings(), tenant_id, None if region == "default" else region)
    except (TenantNotFound, ValueError) as exc:
        _fail(str(exc))
    console.print(
        f"tenant {result['tenant']} now stored in region {result['region']} ({result['files']} files "
        f"moved, {result['removed_locations']} old locations removed)"
    )


@tenant_app.command("assign")
def tenant_assign(
    tenant_id: str,
    shard: Annotated[
        str, typer.Option(help="Target worker shard (a key of O365SYNC_REGIONS on its worker's machine).")
    ],
    wait: Annotated[int, typer.Option(help="Seconds to wait for the tenant's running syncs to end.")] = 900,
) -> None:
    """Move a tenant to another worker shard: its waiting runs are held (running syncs awaited), its files moved
    to the shard's storage, the held runs re-created on the shard's work queue (`shard-<name>`)."""
    from deployments.prefect_server import PrefectApiError
    from deployments.shards import assign_shard
    from o365sync.tenants import TenantNotFound

    settings = load_settings()
    try:
        result = assign_shard(settings, tenant_id, shard, drain_timeout_s=wait, say=console.print)
    except (TenantNotFound, ValueError, PrefectApiError) as exc:
        _fail(str(exc))
    console.print(
        f"tenant {result['tenant']} now on shard {shard} (work queue shard-{shard}; {result['files']} files "
        f"moved, {result['removed_locations']} old locations removed)"
    )


@tenant_app.command("block")
def tenant_block(
    tenant_id: str,
    entries: Annotated[list[str], typer.Argument(help="Addresses or domains never to import mail with.")],
    user: Annotated[str | None, typer.Option(help="Only for this user (object id); default: tenant-wide.")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the entries off the list instead.")] = False,
) -> None:
    """Add (or remove) blocklist entries, tenant-wide or for one connected user."""
    from o365sync.tenants import TenantNotFound, change_blocklist

    settings = load_settings()
    t = _registered(settings, tenant_id)
    if user is not None:
        user = _known_user(settings, t, user)
    try:
        updated = change_blocklist(settings, t.id, entries, user=user, remove=remove)
    except (TenantNotFound, ValueError) as exc:
        _fail(str(exc))
    owner = f"user {user}" if user else f"tenant {t.id}"
    console.print(f"blocklist of {owner}: {', '.join(updated) or '(empty)'}")
