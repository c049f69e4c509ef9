"""Configuration: `O365SYNC_` environment variables or an optional `.env`, with defaults that make the demo run.

Sovereign clouds are configuration only: point `authority_url` and `graph_url` at e.g.
`https://login.microsoftonline.us` + `https://graph.microsoft.us/v1.0` (US Gov) or
`https://login.chinacloudapi.cn` + `https://microsoftgraph.chinacloudapi.cn/v1.0` (China).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Mail syncs every 15 minutes. A user's sync ends itself (the `sync_max_seconds` deadline, checked between pages,
# plus at most one request's `http_timeout_s`) before the next slot, committing what it read. Prefect's task
# `timeout_seconds` is not used: our tasks run in worker threads, where Prefect cannot interrupt blocking I/O and
# only warns on every run (measured with Prefect 3.9.1).
SYNC_SLOT_SECONDS = 15 * 60
SYNC_MAX_SECONDS_LIMIT = SYNC_SLOT_SECONDS - 120


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="O365SYNC_", env_file=".env", extra="ignore")

    data_dir: Path = Path("./data")
    # How many bucket files a new tenant's users are hashed into (o365sync.store.partitions); fixed per tenant when
    # its store is made. An erasure rewrites one bucket; ~64 MB buckets measured best (docs/benchmarks.md).
    store_buckets: int = Field(default=16, ge=1, le=4096)
    authority_url: str = "https://login.microsoftonline.com"
    # `organizations`: any work/school tenant (multi-tenant app); a tenant id or domain pins one tenant.
    authority_tenant: str = "organizations"
    graph_url: str = "https://graph.microsoft.com/v1.0"
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    redirect_uri: str = "http://localhost:8400/auth/callback"
    # PEM bundle trusted for the authority, Graph and CRM endpoints (private/sovereign endpoints, simulators).
    ca_bundle: Path | None = None
    # base64 of 32 bytes (AES-256-GCM) for tokens and CRM secrets at rest; generated into data_dir if unset.
    token_key: SecretStr | None = None
    http_timeout_s: float = 60.0
    graph_page_size: int = 500
    max_requests_per_mailbox: int = 4
    # Outlook allows 10,000 requests per 10 minutes per app and mailbox; keep headroom (we count on send, Graph
    # counts on arrival, and retries count too). 0 switches the client's own budget off (only for a Graph without
    # that limit, e.g. the simulator in a limits-off benchmark; Graph itself then answers 429 + Retry-After).
    graph_request_budget: int = Field(default=9500, ge=0)
    # CRM refreshes: incremental from the last modification seen minus this overlap (clock skew, equal
    # timestamps, search indexing lag), and a full re-read this often to drop records deleted without a trace.
    crm_refresh_overlap_minutes: int = 10
    crm_reconcile_hours: float = 24.0
    # Data residency: region name -> storage root, e.g. O365SYNC_REGIONS='{"eu": "/srv/eu", "us": "/srv/us"}'.
    # A tenant's files live under its region's root; tenants without a region under data_dir.
    regions: dict[str, Path] = {}
    # Calendar: the [today, today + 365 days] window is re-anchored (a new baseline round) this often.
    calendar_reanchor_hours: float = 24.0
    # `o365sync web`: GET /connect needs no login, so what it may hold and how often one address may call it are
    # bounded. A pending sign-in (10 minutes at most) takes ~2 KB; completed ones are removed at once.
    connect_max_pending: int = Field(default=1000, ge=1)
    connect_max_pending_per_tenant: int = Field(default=100, ge=1)
    # Per client address (the socket peer, or X-Forwarded-For from a trusted proxy; IPv6 per /64), in the notation
    # of the `limits` package, e.g. "30/minute" or "30/minute;300/hour".
    connect_rate_limit: str = "30/minute"

    @property
    def graph_budget(self) -> int | None:
        """The per-mailbox request budget for `GraphClient` (requests per 10 minutes), None when switched off (0)."""
        return self.graph_request_budget or None

    @field_validator("connect_rate_limit")
    @classmethod
    def _rate_limit(cls, v: str) -> str:
        from limits import parse_many

        parse_many(v)  # ValueError names the bad part
        return v

    # Paging limits of one user's mail or calendar sync per run (a server answering a fresh nextLink forever, or more
    # mail than a slot can take): the run stops there, commits what it read and the next run goes on. Pages per
    # listing: 5,000 for each of the two mail folders stays within the 10,000 requests Outlook allows a mailbox per
    # 10 minutes. Wall time: 10 of the 15 minutes between mail syncs, at most a minute before the task timeout.
    sync_max_pages: int = Field(5000, ge=1)
    sync_max_seconds: float = Field(600.0, gt=0, le=SYNC_MAX_SECONDS_LIMIT)
    # Ops signals (Prefect events, tasks/ops_signals.py): a user throttled by Graph with no success for this long,
    # and a user whose sync failed this many times in a row, are reported once (when the condition starts).
    ops_throttled_minutes: float = Field(60.0, gt=0)
    ops_failed_runs: int = Field(3, ge=1)

    @property
    def authority(self) -> str:
        return f"{self.authority_url.rstrip('/')}/{self.authority_tenant}"

    @cached_property
    def key_file(self) -> Path:
        return self.data_dir / "secret.key"


def load_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
