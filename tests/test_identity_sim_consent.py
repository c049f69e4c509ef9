"""The identity simulator's directory side on the wire: app roles and directory roles in ID tokens, the v2
admin-consent endpoint, and tenants that let only administrators consent (AADSTS90094 / 65001 until granted)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from simulators.identity import (
    APPLICATION_ADMINISTRATOR,
    GLOBAL_ADMINISTRATOR,
    IdentitySimulator,
)
from simulators.tls import create_tls
from simulators.tokens import TokenAuthority
from simulators.world import generate_world
from tests.test_identity_sim import CLIENT_ID, REDIRECT, SECRET, Clock, authorize, claims_of, redeem, refresh

SCOPE = "Mail.Read User.Read openid profile offline_access"


@pytest.fixture()
def env(tmp_path_factory):
    tls = create_tls(tmp_path_factory.mktemp("tls"))
    world = generate_world(tenants=2, users_per_tenant=2, messages_per_user=2)
    sim = IdentitySimulator(world, tls, TokenAuthority(clock=Clock()), clients={CLIENT_ID: (SECRET, [REDIRECT])})
    sim.start()
    client = httpx.Client(verify=tls.client_context(), trust_env=False)
    yield sim, world, client
    client.close()
    sim.stop()


def query(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code == 302, resp.text
    location = resp.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return dict(parse_qsl(urlsplit(location).query))


def admin_consent(sim, client, user, tenant="organizations", scope="https://graph.microsoft.com/Mail.Read", **extra):
    sim.login_as(user.oid)
    params = {"client_id": CLIENT_ID, "redirect_uri": REDIRECT, "scope": scope, "state": "st-a", **extra}
    return client.get(f"{sim.base_url}/{tenant}/v2.0/adminconsent", params=params)


def test_id_token_carries_app_roles_and_directory_roles_only_when_assigned(env):
    sim, world, client = env
    alice, bob = world.tenants[0].users
    sim.assign_app_role(alice.oid, "O365Sync.Admin")
    sim.assign_directory_role(alice.oid, GLOBAL_ADMINISTRATOR)
    r, verifier = authorize(sim, client, alice)
    claims = claims_of(redeem(sim, client, query(r)["code"], verifier).json()["id_token"])
    assert claims["roles"] == ["O365Sync.Admin"]
    assert claims["wids"] == [GLOBAL_ADMINISTRATOR]
    assert (claims["tid"], claims["oid"], claims["preferred_username"]) == (alice.tid, alice.oid, alice.upn)
    r, verifier = authorize(sim, client, bob)
    plain = claims_of(redeem(sim, client, query(r)["code"], verifier).json()["id_token"])
    assert "roles" not in plain and "wids" not in plain
    sim.assign_app_role(alice.oid, "O365Sync.Admin", assigned=False)
    r, verifier = authorize(sim, client, alice)
    assert "roles" not in claims_of(redeem(sim, client, query(r)["code"], verifier).json()["id_token"])


def test_admin_consent_grants_for_the_admins_tenant_and_echoes_state(env):
    sim, world, client = env
    admin = world.tenants[0].users[0]
    sim.assign_directory_role(admin.oid, APPLICATION_ADMINISTRATOR)
    q = query(
        admin_consent(
            sim, client, admin, scope="https://graph.microsoft.com/Mail.Read https://graph.microsoft.com/User.Read"
        )
    )
    assert q == {
        "admin_consent": "True",
        "tenant": admin.tid,
        "scope": "https://graph.microsoft.com/Mail.Read https://graph.microsoft.com/User.Read",
        "state": "st-a",
    }
    assert sim.admin_consented_scopes(admin.tid, CLIENT_ID) == {"Mail.Read", "User.Read"}
    assert sim.admin_consented_scopes(world.tenants[1].tid, CLIENT_ID) == set()
    default = query(admin_consent(sim, client, admin, tenant=admin.tid, scope="https://graph.microsoft.com/.default"))
    assert "https://graph.microsoft.com/Calendars.Read" in default["scope"].split()


def test_admin_consent_errors(env):
    sim, world, client = env
    admin, rep = world.tenants[0].users
    other = world.tenants[1].users[0]
    sim.assign_directory_role(admin.oid, GLOBAL_ADMINISTRATOR)
    denied = query(admin_consent(sim, client, rep))
    assert denied["error"] == "permission_denied" and denied["state"] == "st-a" and "tenant" not in denied
    sim.inject("declined", grant_type="adminconsent")
    declined = query(admin_consent(sim, client, admin))
    assert declined["error"] == "consent_required" and declined["admin_consent"] == "True"
    assert declined["error_description"].startswith("AADSTS65004")
    foreign = query(admin_consent(sim, client, other, tenant=admin.tid))
    assert foreign["error_description"].startswith("AADSTS50020")
    assert sim.admin_consented_scopes(admin.tid, CLIENT_ID) == set()
    assert [e["outcome"] for e in sim.admin_consent_requests] == ["permission_denied", "declined"]
    bad_redirect = admin_consent(sim, client, admin, redirect_uri="https://evil.example/cb")
    assert bad_redirect.status_code == 400 and "AADSTS50011" in bad_redirect.text
    assert client.get(f"{sim.base_url}/common/v2.0/adminconsent", params={"client_id": CLIENT_ID}).status_code == 400


def test_tenant_without_user_consent_refuses_users_until_an_admin_granted(env):
    sim, world, client = env
    admin, rep = world.tenants[0].users
    sim.set_tenant_policy(rep.tid, user_consent=False)
    sim.assign_directory_role(admin.oid, GLOBAL_ADMINISTRATOR)
    refused = query(authorize(sim, client, rep)[0])
    assert refused["error"] == "access_denied" and refused["error_description"].startswith("AADSTS90094")
    assert sim.consented_scopes(rep.oid, CLIENT_ID) == set()
    # An administrator may still sign in (consenting for themselves)...
    r, verifier = authorize(sim, client, admin)
    assert redeem(sim, client, query(r)["code"], verifier).status_code == 200
    # ...and after the tenant-wide grant the user signs in and refreshes.
    query(
        admin_consent(
            sim, client, admin, scope="https://graph.microsoft.com/Mail.Read https://graph.microsoft.com/User.Read"
        )
    )
    r, verifier = authorize(sim, client, rep)
    tokens = redeem(sim, client, query(r)["code"], verifier, scope=SCOPE).json()
    assert tokens["scope"].split()[:2] == ["Mail.Read", "User.Read"]
    assert refresh(sim, client, tokens["refresh_token"]).status_code == 200
    # A scope beyond the grant is refused again; withdrawing the grant fails the refresh with 65001.
    beyond = query(authorize(sim, client, rep, scope="Calendars.Read " + SCOPE)[0])
    assert beyond["error_description"].startswith("AADSTS90094")
    sim.revoke_admin_consent(rep.tid, CLIENT_ID)
    body = refresh(sim, client, tokens["refresh_token"]).json()
    assert (body["error"], body["error_codes"], body["suberror"]) == ("invalid_grant", [65001], "consent_required")
