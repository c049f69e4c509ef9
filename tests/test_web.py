"""The connect endpoints end to end: a browser (httpx following redirects) goes web app -> identity
simulator -> web app callback, with real MSAL and real files."""

from __future__ import annotations

import socket

import httpx
import pytest
from pydantic import SecretStr

from o365sync.auth import connected_users, token_path
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, save_tenant
from o365sync.web import run_in_thread
from simulators.identity import IdentitySimulator
from simulators.tls import create_tls
from simulators.tokens import TokenAuthority
from simulators.world import generate_world


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tls = create_tls(tmp_path_factory.mktemp("tls"))
    world = generate_world(tenants=2, users_per_tenant=2, messages_per_user=5)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    redirect = f"http://127.0.0.1:{sock.getsockname()[1]}/auth/callback"
    sim = IdentitySimulator(world, tls, TokenAuthority(), clients={"app-1": ("s3cret", [redirect])}).start()
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings(data_dir=data_dir, authority_url=sim.base_url, graph_url="https://127.0.0.1:1/v1.0",
                        client_id="app-1", client_secret=SecretStr("s3cret"), redirect_uri=redirect,
                        ca_bundle=tls.ca_pem)
    for t in world.tenants:
        save_tenant(settings, TenantConfig(id=t.tid, name=t.name, domains=t.domains, features=["email"]))
    base_url, stop = run_in_thread(settings, sock=sock)
    browser = httpx.Client(verify=tls.client_context(), trust_env=False, follow_redirects=True)
    yield sim, world, settings, base_url, browser
    browser.close()
    stop()
    sim.stop()


def test_connect_end_to_end(env):
    sim, world, settings, base_url, browser = env
    user = world.tenants[0].users[1]
    sim.login_as(user.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": user.tid})
    assert r.status_code == 200, r.text
    assert f"Connected {user.display_name}. You can close this window." in r.text
    assert [h.url.host for h in r.history] == ["127.0.0.1", "127.0.0.1"]  # web -> identity -> web
    assert r.history[0].status_code == 302 and r.history[1].status_code == 302
    assert token_path(settings, user.tid, user.oid).exists()
    assert user.oid in [u.oid for u in connected_users(settings, user.tid)]
    # replaying the callback URL does not connect anyone again
    replay = browser.get(str(r.url))
    assert replay.status_code == 400 and "unknown_state" in replay.text


def test_login_hint_is_passed_through(env):
    sim, world, settings, base_url, browser = env
    a, b = world.tenants[1].users
    sim.login_as(a.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": b.tid, "login_hint": b.upn})
    assert r.status_code == 200 and f"Connected {b.display_name}." in r.text


def test_unknown_or_missing_tenant(env):
    _, _, _, base_url, browser = env
    assert browser.get(f"{base_url}/connect", params={"tenant": "no-such-tenant"}).status_code == 404
    assert browser.get(f"{base_url}/connect").status_code == 400


def test_account_from_another_tenant_is_refused(env):
    sim, world, settings, base_url, browser = env
    stranger = world.tenants[1].users[0]
    sim.login_as(stranger.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": world.tenants[0].tid})
    assert r.status_code == 400 and "wrong_tenant" in r.text
    assert stranger.upn not in r.text
    assert stranger.oid not in [u.oid for u in connected_users(settings, world.tenants[0].tid)]


def test_declined_consent_shows_the_error_code_only(env):
    sim, world, _, base_url, browser = env
    user = world.tenants[0].users[0]
    sim.login_as(user.oid)
    sim.inject("access_denied", grant_type="authorize")
    r = browser.get(f"{base_url}/connect", params={"tenant": user.tid})
    assert r.status_code == 400
    assert "access_denied" in r.text and "AADSTS65004" in r.text
    assert user.upn not in r.text and "Trace ID" not in r.text


def test_callback_without_state(env):
    _, _, _, base_url, browser = env
    r = browser.get(f"{base_url}/auth/callback", params={"code": "x"})
    assert r.status_code == 400 and "s3cret" not in r.text
