"""The identity-platform simulator on the wire (plain httpx, no MSAL): the contract the product relies on."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from simulators.identity import IdentitySimulator
from simulators.tls import create_tls
from simulators.tokens import TokenAuthority, b64url, b64url_decode
from simulators.world import generate_world

CLIENT_ID, SECRET, REDIRECT = "app-1", "s3cret", "http://localhost:8400/auth/callback"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tls = create_tls(tmp_path_factory.mktemp("tls"))
    world = generate_world(tenants=2, users_per_tenant=2, messages_per_user=5)
    clock = Clock()
    tokens = TokenAuthority(clock=clock)
    sim = IdentitySimulator(world, tls, tokens, clients={CLIENT_ID: (SECRET, [REDIRECT])}).start()
    client = httpx.Client(verify=tls.client_context(), trust_env=False)
    yield sim, world, tokens, clock, client
    client.close()
    sim.stop()


def claims_of(jwt: str) -> dict:
    return json.loads(b64url_decode(jwt.split(".")[1]))


def authorize(
    sim,
    client,
    user=None,
    tenant="organizations",
    scope="Mail.Read User.Read openid profile offline_access",
    verifier=None,
    **extra,
):
    if user is not None:
        sim.login_as(user.oid)
    verifier = verifier or secrets.token_urlsafe(32)
    params = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "redirect_uri": REDIRECT,
        "scope": scope,
        "state": "st-1",
        "nonce": hashlib.sha256(b"n").hexdigest(),
        "client_info": "1",
        "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
        "code_challenge_method": "S256",
        **extra,
    }
    r = client.get(f"{sim.base_url}/{tenant}/oauth2/v2.0/authorize", params=params)
    return r, verifier


def redeem(sim, client, code, verifier, scope="Mail.Read User.Read openid profile offline_access", **extra):
    form = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": REDIRECT,
        "scope": scope,
        "client_info": "1",
        **extra,
    }
    return client.post(f"{sim.base_url}/organizations/oauth2/v2.0/token", data=form)


def refresh(sim, client, rt, scope="Mail.Read User.Read openid profile offline_access", secret=SECRET):
    form = {
        "client_id": CLIENT_ID,
        "client_secret": secret,
        "grant_type": "refresh_token",
        "refresh_token": rt,
        "scope": scope,
        "client_info": "1",
    }
    return client.post(f"{sim.base_url}/organizations/oauth2/v2.0/token", data=form)


def sign_in(sim, client, user):
    r, verifier = authorize(sim, client, user)
    q = dict(parse_qsl(urlsplit(r.headers["location"]).query))
    tok = redeem(sim, client, q["code"], verifier)
    assert tok.status_code == 200, tok.text
    return tok.json()


def assert_entra_error(resp, status, error, code, suberror=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert re.fullmatch(
        rf"AADSTS{code}: .+\r\nTrace ID: [0-9a-f-]{{36}}\r\n"
        r"Correlation ID: [0-9a-f-]{36}\r\n"
        r"Timestamp: \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ",
        body["error_description"],
        re.S,
    )
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= body.keys()
    assert body.get("suberror") == suberror
    return body


def test_discovery_for_multi_tenant_tenant_id_domain_and_unknown(env):
    sim, world, tokens, _, client = env
    t = world.tenants[0]
    org = client.get(f"{sim.base_url}/organizations/v2.0/.well-known/openid-configuration").json()
    assert org["token_endpoint"] == f"{sim.base_url}/organizations/oauth2/v2.0/token"
    assert org["authorization_endpoint"] == f"{sim.base_url}/organizations/oauth2/v2.0/authorize"
    assert org["issuer"] == f"{sim.base_url}/{{tenantid}}/v2.0"
    for seg in (t.tid, t.domains[0]):
        doc = client.get(f"{sim.base_url}/{seg}/v2.0/.well-known/openid-configuration").json()
        assert doc["token_endpoint"] == f"{sim.base_url}/{t.tid}/oauth2/v2.0/token"
        assert doc["issuer"] == f"{sim.base_url}/{t.tid}/v2.0"
    bad = client.get(f"{sim.base_url}/nosuch.example/v2.0/.well-known/openid-configuration")
    assert_entra_error(bad, 400, "invalid_tenant", 90002)
    assert client.get(org["jwks_uri"]).json() == tokens.jwks()
    assert sim.authority == f"{sim.base_url}/organizations"


def test_authorize_rejects_unknown_client_and_redirect_uri_with_html_page(env):
    sim, _, _, _, client = env
    r, _ = authorize(sim, client, client_id="other-app")
    assert r.status_code == 400 and "AADSTS700016" in r.text and "text/html" in r.headers["content-type"]
    r, _ = authorize(sim, client, redirect_uri="http://evil.example/cb")
    assert r.status_code == 400 and "AADSTS50011" in r.text


def test_authorize_redirects_with_code_client_info_state_and_picks_user(env):
    sim, world, _, _, client = env
    a, b = world.tenants[0].users
    r, _ = authorize(sim, client, a)
    assert r.status_code == 302
    loc = r.headers["location"]
    assert loc.startswith(REDIRECT + "?")
    q = dict(parse_qsl(urlsplit(loc).query))
    assert set(q) == {"code", "client_info", "state", "session_state"} and q["state"] == "st-1"
    assert json.loads(b64url_decode(q["client_info"])) == {"uid": a.oid, "utid": a.tid}
    # login_hint wins over login_as
    r, _ = authorize(sim, client, a, login_hint=b.upn.upper())
    q = dict(parse_qsl(urlsplit(r.headers["location"]).query))
    assert json.loads(b64url_decode(q["client_info"]))["uid"] == b.oid


def test_user_of_another_tenant_on_tenant_authority_gets_50020(env):
    sim, world, _, _, client = env
    other = world.tenants[1].users[0]
    r, _ = authorize(sim, client, other, tenant=world.tenants[0].tid)
    q = dict(parse_qsl(urlsplit(r.headers["location"]).query))
    assert q["error"] == "invalid_request" and q["error_description"].startswith("AADSTS50020:")
    assert q["state"] == "st-1" and "code" not in q


def test_code_redemption_pkce_nonce_short_scopes_and_single_use(env):
    sim, world, tokens, _, client = env
    user = world.tenants[0].users[0]
    r, verifier = authorize(sim, client, user)
    code = dict(parse_qsl(urlsplit(r.headers["location"]).query))["code"]
    assert_entra_error(redeem(sim, client, code, "x" * 43), 400, "invalid_grant", 501481)
    wrong_redirect = redeem(sim, client, code, verifier, redirect_uri="http://localhost:1/other")
    assert_entra_error(wrong_redirect, 400, "invalid_grant", 70000)
    tok = redeem(sim, client, code, verifier)
    assert tok.status_code == 200, tok.text
    body = tok.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "Mail.Read User.Read openid profile"
    assert body["expires_in"] == body["ext_expires_in"] == 3599
    assert body["refresh_token"] and json.loads(b64url_decode(body["client_info"])) == {
        "uid": user.oid,
        "utid": user.tid,
    }
    idt = claims_of(body["id_token"])
    assert idt["nonce"] == hashlib.sha256(b"n").hexdigest()
    assert (idt["aud"], idt["oid"], idt["tid"], idt["ver"]) == (CLIENT_ID, user.oid, user.tid, "2.0")
    assert idt["preferred_username"] == user.upn and idt["name"] == user.display_name
    assert idt["iss"] == f"{sim.base_url}/{user.tid}/v2.0" and idt["nbf"] <= idt["iat"] < idt["exp"]
    tokens.decode(body["id_token"])  # RS256 with the published key
    at = tokens.verify_access_token(body["access_token"])
    assert at.scopes == {"Mail.Read", "User.Read"} and (at.oid, at.tid) == (user.oid, user.tid)
    assert_entra_error(redeem(sim, client, code, verifier), 400, "invalid_grant", 54005)


def test_code_expires_after_ten_minutes(env):
    sim, world, _, clock, client = env
    r, verifier = authorize(sim, client, world.tenants[0].users[0])
    code = dict(parse_qsl(urlsplit(r.headers["location"]).query))["code"]
    clock.t += 601
    assert_entra_error(redeem(sim, client, code, verifier), 400, "invalid_grant", 70008)


def test_client_secret_is_checked(env):
    sim, world, _, _, client = env
    r, verifier = authorize(sim, client, world.tenants[0].users[0])
    code = dict(parse_qsl(urlsplit(r.headers["location"]).query))["code"]
    bad = redeem(sim, client, code, verifier, client_secret="nope")
    assert_entra_error(bad, 401, "invalid_client", 7000215)


def test_no_refresh_token_without_offline_access(env):
    sim, world, _, _, client = env
    r, verifier = authorize(sim, client, world.tenants[0].users[0], scope="User.Read openid profile")
    code = dict(parse_qsl(urlsplit(r.headers["location"]).query))["code"]
    body = redeem(sim, client, code, verifier, scope="User.Read openid profile").json()
    assert "refresh_token" not in body and body["scope"] == "User.Read openid profile"


def test_refresh_rotation_keeps_old_token_valid_until_revoked(env):
    sim, world, tokens, _, client = env
    user = world.tenants[1].users[0]
    first = sign_in(sim, client, user)
    second = refresh(sim, client, first["refresh_token"])
    assert second.status_code == 200, second.text
    rt2 = second.json()["refresh_token"]
    assert rt2 != first["refresh_token"]
    assert refresh(sim, client, first["refresh_token"]).status_code == 200  # old RT still valid (Entra)
    assert "nonce" not in claims_of(second.json()["id_token"])
    sim.revoke(user.oid)
    for rt in (first["refresh_token"], rt2):
        assert_entra_error(refresh(sim, client, rt), 400, "invalid_grant", 50173, "bad_token")
    # a fresh sign-in after the revocation works again
    again = sign_in(sim, client, user)
    assert refresh(sim, client, again["refresh_token"]).status_code == 200


def test_refresh_errors_unknown_token_unconsented_scope_and_700082(env):
    sim, world, _, _, client = env
    user = world.tenants[1].users[1]
    body = sign_in(sim, client, user)
    assert_entra_error(refresh(sim, client, "1.SIM-RT.unknown"), 400, "invalid_grant", 9002313)
    not_consented = refresh(sim, client, body["refresh_token"], scope="Calendars.Read openid offline_access")
    assert_entra_error(not_consented, 400, "invalid_grant", 65001, "consent_required")
    assert refresh(sim, client, body["refresh_token"], secret="bad").status_code == 401
    sim.revoke(user.oid, code=700082)
    assert_entra_error(refresh(sim, client, body["refresh_token"]), 400, "invalid_grant", 700082, "bad_token")


@pytest.mark.parametrize(
    "kind,status,error,code",
    [
        ("revoked", 400, "invalid_grant", 50173),
        ("consent", 400, "invalid_grant", 65001),
        ("server_error", 500, "server_error", 50000),
        ("unavailable", 503, "temporarily_unavailable", 90033),
        ("throttled", 429, "temporarily_unavailable", 50196),
    ],
)
def test_injected_faults_hit_the_next_matching_request_only(env, kind, status, error, code):
    sim, world, _, _, client = env
    body = sign_in(sim, client, world.tenants[0].users[1])
    sim.inject(kind, retry_after=7)
    r = refresh(sim, client, body["refresh_token"])
    assert r.status_code == status and r.json()["error"] == error and r.json()["error_codes"] == [code]
    if status in (429, 503):
        assert r.headers["retry-after"] == "7"
    assert refresh(sim, client, body["refresh_token"]).status_code == 200


def test_request_log_records_outcomes_without_secrets(env):
    sim, world, _, _, client = env
    before = len(sim.token_requests)
    body = sign_in(sim, client, world.tenants[0].users[0])
    refresh(sim, client, body["refresh_token"])
    log = sim.token_requests[before:]
    assert [(e["grant_type"], e["status"]) for e in log] == [("authorization_code", 200), ("refresh_token", 200)]
    text = repr(log)
    assert body["refresh_token"] not in text and SECRET not in text and body["access_token"] not in text


def test_basic_auth_and_form_post_response_mode(env):
    sim, world, _, _, client = env
    user = world.tenants[0].users[0]
    r, verifier = authorize(sim, client, user, response_mode="form_post")
    assert r.status_code == 200 and f'action="{REDIRECT}"' in r.text
    code = re.search(r'name="code" value="([^"]+)"', r.text)[1]
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "code_verifier": verifier,
        "redirect_uri": REDIRECT,
        "scope": "User.Read openid profile offline_access",
    }
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    tok = client.post(
        f"{sim.base_url}/organizations/oauth2/v2.0/token",
        content=urlencode(form),
        headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert tok.status_code == 200, tok.text


def test_tenant_authority_defaults_to_its_own_first_user(env):
    sim, world, _, _, client = env
    sim.login_as(None)
    t = world.tenants[1]
    r, _ = authorize(sim, client, tenant=t.domains[0])
    q = dict(parse_qsl(urlsplit(r.headers["location"]).query))
    assert json.loads(b64url_decode(q["client_info"])) == {"uid": t.users[0].oid, "utid": t.tid}
    with pytest.raises(ValueError):
        sim.login_as("not-a-user")
