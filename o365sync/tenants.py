"""The tenant registry: who the customer is (Entra tenant id, verified domains), which CRM they use and which
features are on. One folder per tenant under the data directory; CRM secrets are sealed, never shown."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from o365sync.secrets import load_key, read_sealed, write_sealed
from o365sync.settings import Settings

# email: mail import; calendar: meeting import; notetaker: meetings to record (+ Explicit Consent Mode writes);
# teams: list the user's teams/channels and share summaries there.
FEATURES = ("email", "calendar", "notetaker", "teams")
Feature = Literal["email", "calendar", "notetaker", "teams"]
DEFAULT_FEATURES: list[str] = ["email", "calendar", "notetaker"]  # Teams sharing is opt-in per tenant
CRM_KINDS = ("salesforce", "hubspot", "pipedrive", "files")
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}")


class TenantNotFound(LookupError):
    pass


class CrmConnection(BaseModel):
    """Non-secret CRM connection settings; the secrets live sealed beside them (Salesforce: client_secret +
    refresh_token; HubSpot: access_token; Pipedrive: api_token; files: none)."""

    login_url: str = ""  # Salesforce login host, or the HubSpot / Pipedrive API base URL
    client_id: str = ""
    api_version: str = "59.0"
    directory: str | None = None  # crm_kind "files": folder with people/accounts/opportunities .csv or .parquet


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
        return v

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


def registry_dir(settings: Settings, tenant_id: str) -> Path:
    """Where the tenant's configuration lives (the control plane, always under `data_dir`)."""
    if not _TENANT_ID.fullmatch(tenant_id):
        raise TenantNotFound(f"invalid tenant id {tenant_id!r}")
    return settings.data_dir / "tenants" / tenant_id


def region_root(settings: Settings, region: str | None) -> Path:
    """The storage location of a data-residency region (`O365SYNC_REGIONS`); no region: `data_dir`."""
    if region is None:
        return settings.data_dir
    if region not in settings.regions:
        raise ValueError(f"unknown region {region!r}; configured: {sorted(settings.regions) or 'none'} "
                         "(O365SYNC_REGIONS)")
    return settings.regions[region]


def tenant_region(settings: Settings, tenant_id: str) -> str | None:
    path = registry_dir(settings, tenant_id) / "tenant.json"
    return json.loads(path.read_text()).get("region") if path.exists() else None


def tenant_dir(settings: Settings, tenant_id: str) -> Path:
    """Every data file of the tenant (store, token caches, CRM credentials, exports, locks, audit log) lives here,
    under its region's storage location; its analysts' snapshot beside it in `<root>/analytics/`."""
    return region_root(settings, tenant_region(settings, tenant_id)) / "tenants" / tenant_id


def save_tenant(settings: Settings, config: TenantConfig, crm_secrets: dict[str, str] | None = None) -> None:
    region_root(settings, config.region)  # refuse an unknown region before writing anything
    folder = registry_dir(settings, config.id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tenant.json.tmp"
    tmp.write_text(config.model_dump_json(indent=2))
    tmp.replace(folder / "tenant.json")
    if crm_secrets is not None:
        save_crm_secrets(settings, config.id, crm_secrets)


def load_tenant(settings: Settings, tenant_id: str) -> TenantConfig:
    path = registry_dir(settings, tenant_id) / "tenant.json"
    if not path.exists():
        raise TenantNotFound(f"tenant {tenant_id} is not registered (o365sync tenant add)")
    return TenantConfig.model_validate_json(path.read_text())


def list_tenants(settings: Settings) -> list[TenantConfig]:
    root = settings.data_dir / "tenants"
    if not root.exists():
        return []
    return [load_tenant(settings, p.parent.name) for p in sorted(root.glob("*/tenant.json"))]


def save_crm_secrets(settings: Settings, tenant_id: str, secrets: dict[str, str]) -> None:
    tenant_dir(settings, tenant_id).mkdir(parents=True, exist_ok=True)
    write_sealed(tenant_dir(settings, tenant_id) / "crm.secret", load_key(settings), f"crm:{tenant_id}",
                 json.dumps(secrets).encode())


def load_crm_secrets(settings: Settings, tenant_id: str) -> dict[str, str]:
    path = tenant_dir(settings, tenant_id) / "crm.secret"
    if not path.exists():
        return {}
    return json.loads(read_sealed(path, load_key(settings), f"crm:{tenant_id}"))
