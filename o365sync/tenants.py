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

FEATURES = ("email",)
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


class TenantConfig(BaseModel):
    id: str
    name: str = ""
    domains: list[str] = Field(min_length=1)
    features: list[Literal["email"]] = Field(default_factory=lambda: ["email"])
    crm_kind: Literal["salesforce", "hubspot", "pipedrive", "files"] = "salesforce"
    crm: CrmConnection | None = None
    # Mail to or from these addresses or domains is never imported (tenant-wide, and per user object id).
    blocklist: list[str] = Field(default_factory=list)
    user_blocklists: dict[str, list[str]] = Field(default_factory=dict)

    def blocklist_for(self, user_oid: str) -> list[str]:
        return sorted(set(self.blocklist) | set(self.user_blocklists.get(user_oid, [])))

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


def tenant_dir(settings: Settings, tenant_id: str) -> Path:
    if not _TENANT_ID.fullmatch(tenant_id):
        raise TenantNotFound(f"invalid tenant id {tenant_id!r}")
    return settings.data_dir / "tenants" / tenant_id


def save_tenant(settings: Settings, config: TenantConfig, crm_secrets: dict[str, str] | None = None) -> None:
    folder = tenant_dir(settings, config.id)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tenant.json.tmp"
    tmp.write_text(config.model_dump_json(indent=2))
    tmp.replace(folder / "tenant.json")
    if crm_secrets is not None:
        save_crm_secrets(settings, config.id, crm_secrets)


def load_tenant(settings: Settings, tenant_id: str) -> TenantConfig:
    path = tenant_dir(settings, tenant_id) / "tenant.json"
    if not path.exists():
        raise TenantNotFound(f"tenant {tenant_id} is not registered (o365sync tenant add)")
    return TenantConfig.model_validate_json(path.read_text())


def list_tenants(settings: Settings) -> list[TenantConfig]:
    root = settings.data_dir / "tenants"
    if not root.exists():
        return []
    return [load_tenant(settings, p.parent.name) for p in sorted(root.glob("*/tenant.json"))]


def save_crm_secrets(settings: Settings, tenant_id: str, secrets: dict[str, str]) -> None:
    write_sealed(tenant_dir(settings, tenant_id) / "crm.secret", load_key(settings), f"crm:{tenant_id}",
                 json.dumps(secrets).encode())


def load_crm_secrets(settings: Settings, tenant_id: str) -> dict[str, str]:
    path = tenant_dir(settings, tenant_id) / "crm.secret"
    if not path.exists():
        return {}
    return json.loads(read_sealed(path, load_key(settings), f"crm:{tenant_id}"))
