"""The CRM adapter registry: every CRM kind a tenant may be configured with has an adapter, every adapter has the
`CrmAdapter` members with compatible signatures, and each builds its connection from (tenant, secrets) alone."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from crm_adapters.registry import ADAPTERS
from o365sync.crm import CrmAdapter, CrmError
from o365sync.tenants import _CRM_SECRETS, CRM_KINDS, CrmConnection, TenantConfig


def test_registry_covers_every_crm_kind_a_tenant_accepts() -> None:
    accepted = typing.get_args(TenantConfig.model_fields["crm_kind"].annotation)
    assert set(ADAPTERS) == set(CRM_KINDS) == set(accepted) == set(_CRM_SECRETS)


def _parameters(function: object) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_each_adapter_satisfies_the_protocol(kind: str) -> None:
    adapter = ADAPTERS[kind]
    methods = {name for name, value in vars(CrmAdapter).items() if inspect.isfunction(value) and name[0] != "_"}
    members = set(CrmAdapter.__annotations__) | methods
    assert {"INCREMENTAL", "connection", "fetch_snapshot", "fetch_changes"} <= members
    for name in members:
        assert hasattr(adapter, name), f"{kind} lacks {name}"
    assert isinstance(adapter.INCREMENTAL, bool)
    for name in ("connection", "fetch_snapshot", "fetch_changes"):
        wanted = _parameters(getattr(CrmAdapter, name))[1:]  # without self
        got = _parameters(getattr(adapter, name))
        assert got[: len(wanted)] == wanted, f"{kind}.{name}{inspect.signature(getattr(adapter, name))}"
        extra = list(inspect.signature(getattr(adapter, name)).parameters.values())[len(wanted) :]
        assert all(p.default is not p.empty for p in extra), f"{kind}.{name}: extra parameters need defaults"


def _secrets(kind: str) -> dict[str, str]:
    return {name: f"{name}-value" for name in _CRM_SECRETS[kind].values()}


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_connection_from_tenant_config_and_secrets(kind: str, tmp_path: Path) -> None:
    crm = CrmConnection(login_url="https://crm.example.com", client_id="cid", directory=str(tmp_path))
    tenant = TenantConfig(id="t1", domains=["example.com"], crm_kind=kind, crm=crm)
    conn = ADAPTERS[kind].connection(tenant, _secrets(kind))
    for secret in _secrets(kind).values():
        assert secret not in repr(conn)  # secrets stay out of logs and tracebacks
    with pytest.raises(CrmError, match="connection is not configured"):
        ADAPTERS[kind].connection(tenant.model_copy(update={"crm": None}), _secrets(kind))
    for missing in _CRM_SECRETS[kind].values():
        if missing == "client_secret":  # Salesforce without a client secret: a public connected app
            continue
        less = {k: v for k, v in _secrets(kind).items() if k != missing}
        with pytest.raises(CrmError, match=rf"the {kind} {missing} is not stored \(o365sync tenant update"):
            ADAPTERS[kind].connection(tenant, less)
