"""The tenant registry: who the customer is (Entra tenant id, verified domains), which CRM they use and which
features are on. One folder per tenant under the data directory; CRM secrets are sealed, never shown."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from o365sync.secrets import load_key, read_sealed, write_sealed
from o365sync.settings import Settings

# email: mail import; calendar: meeting import; notetaker: meetings to record (+ Explicit Consent Mode writes);
# teams: list the user's teams/channels and share summaries there.
FEATURES = ("email", "calendar", "notetaker", "teams")
Feature = Literal["email", "calendar", "notetaker", "teams"]
DEFAULT_FEATURES: list[Feature] = ["email", "calendar", "notetaker"]  # Teams sharing is opt-in per tenant
CRM_KINDS = ("salesforce", "hubspot", "pipedrive", "files")
# CRM secrets never come from the command line (visible in `ps` and shell history): these environment variables,
# or the same names as `NAME=value` lines on standard input. Per CRM kind: variable -> name of the stored secret.
CRM_SECRET_VARIABLES = ("O365SYNC_CRM_CLIENT_SECRET", "O365SYNC_CRM_REFRESH_TOKEN", "O365SYNC_CRM_TOKEN")
_CRM_SECRETS: dict[str, dict[str, str]] = {
    "salesforce": {"O365SYNC_CRM_CLIENT_SECRET": "client_secret", "O365SYNC_CRM_REFRESH_TOKEN": "refresh_token"},
    "hubspot": {"O365SYNC_CRM_TOKEN": "access_token"},  # private-app token
    "pipedrive": {"O365SYNC_CRM_TOKEN": "api_token"},
    "files": {},
}
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


log = logging.getLogger(__name__)


class TenantNotFound(LookupError):
    pass


class TenantExists(ValueError):
    def __init__(self, tenant_id: str):
        super().__init__(
            f"tenant {tenant_id} is already registered; change it with `o365sync tenant update "
            f"{tenant_id} [options]` (options left out keep their value)"
        )


class TenantUnreadable(TenantNotFound):
    """The tenant's registry entry exists but cannot be read or is invalid: an operator must repair it."""


class TenantMisplaced(TenantNotFound):
    """The tenant's files are under another storage root than its configuration says (nothing may be created at
    the configured one: it would start an empty store beside the real one)."""


def canonical_id(entra_id: str) -> str:
    """Entra tenant and object ids are GUIDs, which sign-ins report in lower case: a GUID-shaped id is lower-cased,
    so an id typed in upper case names the same tenant (or user) everywhere. Other ids are kept as they are."""
    return entra_id.lower() if _GUID.fullmatch(entra_id) else entra_id


class CrmConnection(BaseModel):
    """Non-secret CRM connection settings; the secrets live sealed beside them (Salesforce: client_secret +
    refresh_token; HubSpot: access_token; Pipedrive: api_token; files: none)."""

    login_url: str = ""  # Salesforce login host, or the HubSpot / Pipedrive API base URL
    client_id: str = ""
    api_version: str = "59.0"
    directory: str | None = None  # crm_kind "files": folder with people/accounts/opportunities .csv or .parquet

    @field_validator("login_url")
    @classmethod
    def _https_only(cls, v: str) -> str:
        if v and not v.lower().startswith("https://"):
            raise ValueError(f"CRM URL {v!r} must start with https:// (credentials are never sent in clear text)")
        return v


class UserPreferences(BaseModel):
    """What a user chose for themselves (defaults: calendar on, internal meetings off, Notetaker on)."""

    calendar: bool = True
    internal_meetings: bool = False  # import meetings where every participant is in the tenant's domains
    notetaker: bool = True


class TenantConfig(BaseModel):
    id: str
    name: str = ""
    domains: list[str] = Field(min_length=1)
    features: list[Feature] = Field(default_factory=lambda: list(DEFAULT_FEATURES))
    # Notetaker's Explicit Consent Mode: matched external meetings get a Teams link and a consent notice.
    notetaker_explicit_consent: bool = False
    crm_kind: Literal["salesforce", "hubspot", "pipedrive", "files"] = "salesforce"
    crm: CrmConnection | None = None
    # Mail to or from these addresses or domains is never imported (tenant-wide, and per user object id).
    blocklist: list[str] = Field(default_factory=list)
    user_blocklists: dict[str, list[str]] = Field(default_factory=dict)

    user_preferences: dict[str, UserPreferences] = Field(default_factory=dict)
    # Data residency: the storage location of every file of this tenant (O365SYNC_REGIONS); None = data_dir.
    # Change it only with `o365sync tenant move`, which moves the files.
    region: str | None = None
    # Sharding (docs/OPERATIONS.md): the worker shard that runs this tenant, i.e. the work queue `shard-<name>`. A
    # shard is a storage location of O365SYNC_REGIONS owned by one worker machine, so the tenant's files are in the
    # region of the same name. None: not sharded (the work pool's default queue). Change it only with
    # `o365sync tenant assign`, which moves the files and the runs.
    shard: str | None = None
    # Retention: activities older than this (from their date) are deleted by the daily retention flow, except
    # conversations/meetings linked to a still-open opportunity (docs/DATA_LIFECYCLE.md).
    retention_days: int = Field(default=1095, ge=1)
    # When a user is removed: delete their data (after the grace period) or retain it (sync stops).
    offboarding: Literal["delete", "retain"] = "delete"
    offboarding_grace_days: int = Field(default=0, ge=0)

    def blocklist_for(self, user_oid: str) -> list[str]:
        return sorted(set(self.blocklist) | set(self.user_blocklists.get(user_oid, [])))

    def preferences_for(self, user_oid: str) -> UserPreferences:
        return self.user_preferences.get(user_oid, UserPreferences())

    def feature_on(self, feature: str, user_oid: str | None = None) -> bool:
        """The tenant enabled `feature` and (for per-user features) the user did not turn it off."""
        if feature not in self.features:
            return False
        prefs = self.preferences_for(user_oid) if user_oid else UserPreferences()
        return {"calendar": prefs.calendar, "notetaker": prefs.notetaker and prefs.calendar}.get(feature, True)

    @field_validator("id")
    @classmethod
    def _safe_id(cls, v: str) -> str:
        if not _TENANT_ID.fullmatch(v):
            raise ValueError("tenant id must be the Entra tenant id (letters, digits, '.', '_', '-'; max 64)")
        return canonical_id(v)

    @model_validator(mode="after")
    def _shard_holds_the_files(self) -> TenantConfig:
        if self.shard is not None and self.shard != self.region:
            raise ValueError(
                f"shard {self.shard!r} keeps its tenants' files in region {self.shard!r}, not "
                f"{self.region or 'default'!r}: change both with `o365sync tenant assign {self.id} --shard <name>`"
            )
        return self

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.strip().lower()
            if not _DOMAIN.fullmatch(d):
                raise ValueError(f"not a domain name: {d!r}")
            out.append(d)
        return sorted(set(out))

    @field_validator("blocklist")
    @classmethod
    def _blocklist(cls, v: list[str]) -> list[str]:
        return sorted({blocklist_entry(e) for e in v})

    @field_validator("user_blocklists")
    @classmethod
    def _user_blocklists(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {oid: sorted({blocklist_entry(e) for e in entries}) for oid, entries in v.items() if entries}


def blocklist_entry(entry: str) -> str:
    """An address or a bare domain, lower-cased; anything else is refused with a clear message."""
    value = entry.strip().lower().lstrip("@")
    local, at, domain = value.rpartition("@")
    if (at and not local) or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"not an address or domain: {entry!r}")
    return value


def crm_secrets_for(crm_kind: str, given: dict[str, str]) -> dict[str, str] | None:
    """The secrets to store for `crm_kind` from `given` (variable name -> value; None: nothing given). Refuses a
    partial set (a Salesforce client secret without its refresh token is useless) and secrets of another CRM."""
    given = {k: v for k, v in given.items() if v}
    if not given:
        return None
    wanted = _CRM_SECRETS[crm_kind]
    if foreign := sorted(set(given) - set(wanted)):
        raise ValueError(
            f"{', '.join(foreign)} is not used by a {crm_kind} CRM (it takes "
            f"{', '.join(wanted) or 'no secrets'}); nothing was saved"
        )
    if missing := sorted(set(wanted) - set(given)):
        raise ValueError(
            f"a {crm_kind} CRM needs {' and '.join(wanted)} together ({', '.join(missing)} missing); nothing was saved"
        )
    return {wanted[k]: v for k, v in given.items()}


def registry_dir(settings: Settings, tenant_id: str) -> Path:
    """Where the tenant's configuration lives (the control plane, always under `data_dir`)."""
    if not _TENANT_ID.fullmatch(tenant_id):
        raise TenantNotFound(f"invalid tenant id {tenant_id!r}")
    return settings.data_dir / "tenants" / canonical_id(tenant_id)


def region_root(settings: Settings, region: str | None) -> Path:
    """The storage location of a data-residency region (`O365SYNC_REGIONS`); no region: `data_dir`."""
    if region is None:
        return settings.data_dir
    if region not in settings.regions:
        raise ValueError(
            f"unknown region {region!r}; configured: {sorted(settings.regions) or 'none'} (O365SYNC_REGIONS)"
        )
    return settings.regions[region]


def tenant_region(settings: Settings, tenant_id: str) -> str | None:
    path = registry_dir(settings, tenant_id) / "tenant.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("region")
    except ValueError:
        return _read_config(path).region  # raises the one-line TenantNotFound naming the file


def holds_tenant_files(folder: Path) -> bool:
    """Whether a tenant folder holds data: anything but the registry entry (`data_dir`'s folder doubles as the
    registry) and lock files (which mark no data)."""
    try:
        return any(not (p.name.startswith("tenant.json") or p.name.endswith(".lock")) for p in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


STORE_FILE = "store.duckdb"  # the tenant's live store, in its folder


def tenant_locations(settings: Settings, tenant_id: str, region: str | None) -> tuple[Path, Path]:
    """(the tenant's folder, its analysts' snapshot) under `region`'s storage root."""
    root = region_root(settings, region)
    tenant_id = canonical_id(tenant_id)
    return root / "tenants" / tenant_id, root / "analytics" / f"{tenant_id}.duckdb"


def tenant_dir(settings: Settings, tenant_id: str) -> Path:
    """Every data file of the tenant (store, token caches, CRM credentials, exports, locks, audit log) lives here,
    under its region's storage location; its analysts' snapshot beside it in `<root>/analytics/`.

    Raises `TenantMisplaced` when this folder holds nothing while another storage root holds the tenant's files
    (e.g. tenant.json's region was reset by hand): whatever the caller would write here would start a second,
    empty copy of the tenant."""
    return checked_tenant_dir(settings, tenant_id, tenant_region(settings, tenant_id))


def checked_tenant_dir(settings: Settings, tenant_id: str, region: str | None) -> Path:
    """`tenant_dir` for a tenant whose configured region the caller has read already (`TenantMisplaced` alike)."""
    folder = tenant_locations(settings, tenant_id, region)[0]
    if not holds_tenant_files(folder):
        for other in (None, *settings.regions):
            elsewhere = tenant_locations(settings, tenant_id, other)[0]
            if other != region and holds_tenant_files(elsewhere) and elsewhere.resolve() != folder.resolve():
                raise TenantMisplaced(
                    f"tenant {canonical_id(tenant_id)}'s files are in {elsewhere.resolve()} (region "
                    f"{other or 'default'}) but tenant.json says region {region or 'default'}; nothing was "
                    f"changed. Point it back with: o365sync tenant move {canonical_id(tenant_id)} "
                    f"--region {other or 'default'}"
                )
    return folder


def save_tenant(
    settings: Settings, config: TenantConfig, crm_secrets: dict[str, str] | None = None, create: bool = False
) -> None:
    """Write the tenant's configuration (and CRM secrets if given). `create`: only if the tenant is not registered
    yet (atomically: a concurrent registration of the same id fails with `TenantExists`)."""
    region_root(settings, config.region)  # refuse an unknown region before writing anything
    folder = registry_dir(settings, config.id)
    target = folder / "tenant.json"
    if create and target.exists():
        raise TenantExists(config.id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tenant.json.{os.getpid()}.tmp"
    tmp.write_text(config.model_dump_json(indent=2))
    if create:
        try:
            os.link(tmp, target)  # fails if it exists: never replaces a registration
        except FileExistsError:
            raise TenantExists(config.id) from None
        finally:
            tmp.unlink()
    else:
        tmp.replace(target)
    if crm_secrets is not None:
        save_crm_secrets(settings, config.id, crm_secrets)


def change_blocklist(
    settings: Settings, tenant_id: str, entries: list[str], user: str | None = None, remove: bool = False
) -> list[str]:
    """Add (or with `remove` take off) `entries` on the tenant's blocklist, or on `user`'s own list; the list as
    saved. Every entry is checked first: one that is not an address or domain raises ValueError, nothing saved.
    The caller decides whether `user` may be given (a known user of this tenant)."""
    tenant = load_tenant(settings, tenant_id)
    values = {blocklist_entry(e) for e in entries}
    if not values:
        raise ValueError("no address or domain given; nothing was changed")
    current = set(tenant.user_blocklists.get(user, [])) if user else set(tenant.blocklist)
    updated = sorted(current - values if remove else current | values)
    field = {"user_blocklists": {**tenant.user_blocklists, user: updated}} if user else {"blocklist": updated}
    save_tenant(settings, TenantConfig.model_validate({**tenant.model_dump(), **field}))
    return updated


def load_tenant(settings: Settings, tenant_id: str) -> TenantConfig:
    path = registry_dir(settings, tenant_id) / "tenant.json"
    if not path.exists():
        raise TenantNotFound(
            f"tenant {canonical_id(tenant_id)} is not registered in the data dir "
            f"{settings.data_dir.resolve()}: set O365SYNC_DATA_DIR to the data dir it was added "
            "in, or register it with `o365sync tenant add`"
        )
    return _read_config(path)


def registered_tenant(settings: Settings, tenant_id: str) -> TenantConfig:
    """The configuration of the tenant a run is about; not registered: one line naming the data dir searched (a
    worker or shell with another O365SYNC_DATA_DIR, or another working directory for the default `./data`, looks
    elsewhere)."""
    try:
        return load_tenant(settings, tenant_id)
    except (TenantUnreadable, TenantMisplaced):
        raise  # registered, but its entry or files need an operator: the message says what to do
    except TenantNotFound:
        raise TenantNotFound(
            f"tenant {tenant_id} is not registered in data dir {settings.data_dir.resolve()}: run with the "
            "O365SYNC_DATA_DIR it was added in (workers get it from `python -m deployments.register`)"
        ) from None


def _read_config(path: Path) -> TenantConfig:
    """tenant.json, or `TenantNotFound` with one line naming the file and what is wrong with it."""
    try:
        return TenantConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        problem = f"is invalid ({where + ': ' if where else ''}{err['msg']})"
    except (OSError, UnicodeDecodeError) as exc:
        problem = f"cannot be read ({exc.__class__.__name__})"
    raise TenantUnreadable(
        f"{path.resolve()} {problem}: restore it from a backup, or remove its folder and "
        "register the tenant again (o365sync tenant add)"
    )


def scan_tenants(settings: Settings) -> tuple[list[TenantConfig], list[str]]:
    """(the registered tenants, one line per entry of `<data_dir>/tenants/` that is not a readable tenant)."""
    root = settings.data_dir / "tenants"
    tenants: list[TenantConfig] = []
    problems: list[str] = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        path = entry / "tenant.json"
        if not entry.is_dir():
            problems.append(f"{entry.resolve()} is not a tenant folder; skipped")
        elif not path.is_file():
            problems.append(f"{entry.resolve()} has no tenant.json; skipped")
        else:
            try:
                config = _read_config(path)
            except TenantNotFound as exc:
                problems.append(f"{exc}; skipped")
                continue
            if config.id != entry.name:
                problems.append(f"{path.resolve()} holds tenant id {config.id!r}, not its folder's name; skipped")
            else:
                tenants.append(config)
    return tenants, problems


def registry_problems(settings: Settings) -> list[str]:
    """Entries of the tenant registry that are skipped (stray files, folders without or with a broken
    tenant.json), one line each, for `tenant list`, `status` and `serve` to show."""
    return scan_tenants(settings)[1]


def list_tenants(settings: Settings) -> list[TenantConfig]:
    """Every readable tenant; a bad entry is skipped with a warning naming it (one entry never hides the rest)."""
    tenants, problems = scan_tenants(settings)
    for problem in problems:
        log.warning("tenant registry: %s", problem)
    return tenants


def save_crm_secrets(settings: Settings, tenant_id: str, secrets: dict[str, str]) -> None:
    """Sealed into the tenant's folder under its current region (wherever its other files are)."""
    folder = tenant_dir(settings, tenant_id)
    folder.mkdir(parents=True, exist_ok=True)
    write_sealed(
        folder / "crm.secret", load_key(settings), f"crm:{canonical_id(tenant_id)}", json.dumps(secrets).encode()
    )


def load_crm_secrets(settings: Settings, tenant_id: str) -> dict[str, str]:
    path = tenant_dir(settings, tenant_id) / "crm.secret"
    if not path.exists():
        return {}
    return json.loads(read_sealed(path, load_key(settings), f"crm:{canonical_id(tenant_id)}"))
