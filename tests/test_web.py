"""The connect endpoints end to end: a browser (httpx) goes web app -> identity simulator -> web app callback, with
real MSAL, real files and the real uvicorn server on loopback."""

from __future__ import annotations

import contextlib
import html
import logging
import socket
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from pydantic import SecretStr

from app.web import SECURITY_HEADERS, run_in_thread
from o365sync.auth import PendingSignIns, connected_users, token_path
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, load_tenant, save_tenant
from simulators.identity import IdentitySimulator
from simulators.tls import create_tls
from simulators.tokens import TokenAuthority
from simulators.world import generate_world

HOSTILE = "HOSTILE<script>alert(1)</script>"
EXPIRED_LINK = "This sign-in link expired or was already used. Start again from your connect link."
OTHER_ORG = "This account belongs to another organisation than the one this link connects."
NO_ACCESS = "Access was not granted: the permissions were declined, or your organisation lets only an administrator"
CODE_EXPIRED = "This sign-in took too long or its code was already used."
MISCONFIGURED = "This connection service is not set up correctly, so your account cannot be connected now."
UNAVAILABLE = "Microsoft's sign-in service is unavailable right now."
TENANT_GONE = "Your organisation is not (or no longer) registered with this service, so nothing was connected."
OFFBOARDED = "Your account was offboarded from your organisation's activity capture"
UNKNOWN = "The sign-in could not be completed. Start again from your connect link; if it happens again"


@contextlib.contextmanager
def web_server(
    sim, tls, data_dir, pending: PendingSignIns | None = None, **settings_kw
) -> Iterator[tuple[Settings, str]]:
    """A real uvicorn server of the connect app, its redirect URI registered with the identity simulator."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    redirect = f"http://127.0.0.1:{sock.getsockname()[1]}/auth/callback"
    sim.clients["app-1"][1].append(redirect)
    settings = Settings(
        **{
            "data_dir": data_dir,
            "authority_url": sim.base_url,
            "graph_url": "https://127.0.0.1:1/v1.0",
            "client_id": "app-1",
            "client_secret": SecretStr("s3cret"),
            "redirect_uri": redirect,
            "ca_bundle": tls.ca_pem,
            **settings_kw,
        }
    )
    base_url, stop = run_in_thread(settings, sock=sock, pending=pending)
    try:
        yield settings, base_url
    finally:
        stop()


def register(settings, world, **tenant_kw) -> None:
    for t in world.tenants:
        save_tenant(settings, TenantConfig(id=t.tid, name=t.name, domains=t.domains, features=["email"], **tenant_kw))


@pytest.fixture(scope="module")
def tls_of_env(tmp_path_factory):
    return create_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def env(tmp_path_factory, tls_of_env):
    tls = tls_of_env
    world = generate_world(tenants=2, users_per_tenant=2, messages_per_user=5)
    sim = IdentitySimulator(world, tls, TokenAuthority(), clients={"app-1": ("s3cret", [])}).start()
    with web_server(sim, tls, tmp_path_factory.mktemp("data"), connect_rate_limit="1000/minute") as (settings, url):
        register(settings, world)
        browser = httpx.Client(verify=tls.client_context(), trust_env=False, follow_redirects=True)
        yield sim, world, settings, url, browser
        browser.close()
    sim.stop()


def start(browser, base_url, tenant_id, **params) -> httpx.Response:
    """GET /connect without following: the redirect to the sign-in, or the page shown instead."""
    return browser.get(f"{base_url}/connect", params={"tenant": tenant_id, **params}, follow_redirects=False)


def page(response: httpx.Response) -> str:
    """The page as people read it (entities decoded)."""
    return html.unescape(response.text)


def state_of(redirect: httpx.Response) -> str:
    assert redirect.status_code == 302, page(redirect)
    return dict(parse_qsl(urlsplit(redirect.headers["location"]).query))["state"]


def files_of(settings, tenant_id) -> list[str]:
    return sorted(
        str(p.relative_to(settings.data_dir))
        for p in settings.data_dir.rglob("*")
        if tenant_id in str(p) and p.is_file()
    )


def test_connect_end_to_end(env):
    sim, world, settings, base_url, browser = env
    user = world.tenants[0].users[1]
    sim.login_as(user.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": user.tid})
    assert r.status_code == 200, page(r)
    assert f"Connected {user.display_name}. You can close this window." in page(r)
    assert [h.url.host for h in r.history] == ["127.0.0.1", "127.0.0.1"]  # web -> identity -> web
    assert r.history[0].status_code == 302 and r.history[1].status_code == 302
    assert token_path(settings, user.tid, user.oid).exists()
    assert user.oid in [u.oid for u in connected_users(settings, user.tid)]
    # replaying the callback URL does not connect anyone again
    replay = browser.get(str(r.url))
    assert replay.status_code == 400 and EXPIRED_LINK in page(replay) and "unknown_state" not in page(replay)


def test_login_hint_is_passed_through(env):
    sim, world, settings, base_url, browser = env
    a, b = world.tenants[1].users
    sim.login_as(a.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": b.tid, "login_hint": b.upn})
    assert r.status_code == 200 and f"Connected {b.display_name}." in page(r)


def test_unknown_or_missing_tenant(env):
    _, _, _, base_url, browser = env
    r = browser.get(f"{base_url}/connect", params={"tenant": "no-such-tenant"})
    assert r.status_code == 404 and TENANT_GONE in page(r)
    r = browser.get(f"{base_url}/connect", params={"tenant": "x" * 5000})
    assert r.status_code == 404 and "xxx" not in page(r)
    r = browser.get(f"{base_url}/connect")
    assert r.status_code == 400 and "This connect link is incomplete" in page(r)


def test_account_from_another_tenant_is_refused(env):
    sim, world, settings, base_url, browser = env
    stranger = world.tenants[1].users[0]
    sim.login_as(stranger.oid)
    r = browser.get(f"{base_url}/connect", params={"tenant": world.tenants[0].tid})
    assert r.status_code == 403 and OTHER_ORG in page(r) and "wrong_tenant" not in page(r)
    assert stranger.upn not in page(r) and stranger.tid not in page(r)
    assert stranger.oid not in [u.oid for u in connected_users(settings, world.tenants[0].tid)]


def test_every_response_carries_the_security_headers(env):
    sim, world, _, base_url, browser = env
    user = world.tenants[0].users[0]
    sim.login_as(user.oid)
    redirect = start(browser, base_url, user.tid)
    pages = [
        redirect,
        browser.get(redirect.headers["location"]),  # the connected page, after the sign-in
        browser.get(f"{base_url}/auth/callback", params={"code": "x"}),
        browser.get(f"{base_url}/nowhere"),
        browser.get(f"{base_url}/healthz"),
    ]
    assert [p.status_code for p in pages] == [302, 200, 400, 404, 200]
    for page in pages:
        for name, value in SECURITY_HEADERS.items():
            assert page.headers.get(name) == value, (page.url, name)
    assert "default-src 'none'" in SECURITY_HEADERS["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["Content-Security-Policy"]


def test_a_broken_registry_entry_asks_for_the_administrator_with_a_reference(env, caplog):
    _, _, settings, base_url, browser = env
    broken = settings.data_dir / "tenants" / "broken-tenant"
    broken.mkdir(parents=True)
    (broken / "tenant.json").write_text('{"id": "broken-tenant", "domains": [')  # cut off
    with caplog.at_level(logging.WARNING, logger="o365sync.web"):
        r = browser.get(f"{base_url}/connect", params={"tenant": "broken-tenant"}, follow_redirects=False)
    assert r.status_code == 503 and "not set up correctly" in page(r)
    ref = page(r).split("reference: ")[1][:8]
    assert "Traceback" not in r.text and "ValidationError" not in r.text and "tenant.json" not in r.text
    assert any(ref in m and "tenant.json" in m for m in caplog.messages)  # the cause is for operators
    assert r.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


@pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
def test_an_unexpected_failure_shows_a_page_with_a_reference_not_a_traceback(tmp_path, caplog):
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.web import create_app

    def boom(request):
        raise RuntimeError("a bug in a page")

    app = create_app(Settings(data_dir=tmp_path))
    app.router.routes.append(Route("/boom", boom))
    with caplog.at_level(logging.ERROR, logger="o365sync.web"), TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
    assert r.status_code == 500 and "Your account could not be connected." in page(r)
    ref = page(r).split("reference: ")[1][:8]
    assert "Traceback" not in r.text and "a bug in a page" not in r.text
    assert any(ref in m for m in caplog.messages)
    assert r.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


# ------------------------------------------------------------------ item 10: fixed wording, no echo
@pytest.mark.parametrize(
    ("error", "description", "status", "sentence"),
    [
        ("access_denied", f"AADSTS65004: User declined to consent. {HOSTILE}", 403, NO_ACCESS),
        ("access_denied", "AADSTS90094: The grant requires admin permission.", 403, NO_ACCESS),
        ("consent_required", "AADSTS65001", 403, NO_ACCESS),
        (
            "invalid_request",
            "AADSTS50020: User account alice@x.example from identity provider does not exist in tenant",
            403,
            OTHER_ORG,
        ),
        ("invalid_grant", "AADSTS54005: OAuth2 Authorization code was already redeemed", 400, CODE_EXPIRED),
        (
            "invalid_grant",
            f"AADSTS70008: The provided authorization code or refresh token has expired. {HOSTILE}",
            400,
            CODE_EXPIRED,
        ),
        ("invalid_client", "AADSTS7000215: Invalid client secret provided.", 503, MISCONFIGURED),
        ("unauthorized_client", "AADSTS700016: Application not found in the directory", 503, MISCONFIGURED),
        ("invalid_request", "AADSTS50011: The redirect URI does not match", 503, MISCONFIGURED),
        ("temporarily_unavailable", "AADSTS90033", 503, UNAVAILABLE),
        ("server_error", HOSTILE, 503, UNAVAILABLE),
        (HOSTILE, HOSTILE, 400, UNKNOWN),
        ("made_up_error", "AADSTS12345678 " + HOSTILE * 1000, 400, UNKNOWN),
    ],
)
def test_callback_errors_show_a_fixed_sentence_and_never_the_callers_text(env, error, description, status, sentence):
    sim, world, settings, base_url, browser = env
    user = world.tenants[0].users[0]
    state = state_of(start(browser, base_url, user.tid))
    r = browser.get(
        f"{base_url}/auth/callback", params={"state": state, "error": error, "error_description": description}
    )
    assert r.status_code == status and sentence in page(r)
    assert "HOSTILE" not in page(r) and "alert" not in page(r) and "AADSTS" not in page(r)
    assert error not in page(r) and "alice@" not in page(r)
    if sentence in (MISCONFIGURED, UNKNOWN):  # a short reference for operators, the codes are in their log
        assert "reference: " in page(r)
    if status == 503:
        assert (r.headers.get("Retry-After") is not None) == (sentence == UNAVAILABLE)


def test_unknown_state_with_hostile_error_text(env):
    _, _, _, base_url, browser = env
    r = browser.get(
        f"{base_url}/auth/callback", params={"state": HOSTILE, "error": HOSTILE, "error_description": HOSTILE}
    )
    assert r.status_code == 400 and EXPIRED_LINK in page(r) and "HOSTILE" not in page(r)


@pytest.mark.parametrize(
    ("fault", "status", "sentence"),
    [
        ("revoked", 400, CODE_EXPIRED),  # invalid_grant at code redemption
        ("consent", 403, NO_ACCESS),
        ("invalid_client", 503, MISCONFIGURED),
        ("unavailable", 503, UNAVAILABLE),
    ],
)
def test_code_redemption_failures_show_a_fixed_sentence(env, caplog, fault, status, sentence):
    sim, world, settings, base_url, browser = env
    user = world.tenants[1].users[1]
    sim.login_as(user.oid)
    sim.inject(fault, grant_type="authorization_code")
    with caplog.at_level(logging.INFO, logger="o365sync.web"):
        r = browser.get(f"{base_url}/connect", params={"tenant": user.tid})
    assert r.status_code == status and sentence in page(r) and "AADSTS" not in page(r)
    assert any("connect failed" in m for m in caplog.messages)  # ops get the case and the codes


def test_a_code_redeemed_with_another_sign_ins_verifier_is_refused(env):
    sim, world, settings, base_url, browser = env
    user = world.tenants[1].users[0]
    sim.login_as(user.oid)
    first = browser.get(start(browser, base_url, user.tid).headers["location"], follow_redirects=False)
    code = dict(parse_qsl(urlsplit(first.headers["location"]).query))["code"]
    other_state = state_of(start(browser, base_url, user.tid))
    n = len(sim.token_requests)
    r = browser.get(f"{base_url}/auth/callback", params={"state": other_state, "code": code})
    assert r.status_code == 400 and CODE_EXPIRED in page(r) and "501481" not in page(r)
    assert [e.get("error_codes") for e in sim.token_requests[n:]] == [[501481]]  # PKCE mismatch, really redeemed


# ------------------------------------------------------------------ item 4: nothing stored for a tenant or user gone
def test_sign_in_completing_after_the_subscription_ended_stores_nothing(env, tmp_path, tls_of_env):
    from o365sync.offboarding import end_subscription_now

    sim, world, _, _, browser = env
    user = world.tenants[0].users[0]
    with web_server(sim, tls_of_env, tmp_path / "data") as (settings, base_url):
        register(settings, world)
        sim.login_as(user.oid)
        redirect = start(browser, base_url, user.tid)
        state_of(redirect)
        end_subscription_now(settings, user.tid)
        r = browser.get(redirect.headers["location"])  # sign-in at Microsoft, back to our callback
    assert r.status_code == 404 and TENANT_GONE in page(r)
    assert files_of(settings, user.tid) == [f"audit/{user.tid}.jsonl"]
    assert not (settings.data_dir / "tenants" / user.tid).exists()


@pytest.mark.parametrize("policy", ["retain", "delete"])
def test_an_offboarded_user_is_not_connected_again(env, tmp_path, tls_of_env, policy):
    from o365sync.erasure import read_audit
    from o365sync.offboarding import offboard_user_now, offboarding_status, readmit_user_now

    sim, world, _, _, browser = env
    alice, bob = world.tenants[1].users
    with web_server(sim, tls_of_env, tmp_path / "data") as (settings, base_url):
        register(settings, world, offboarding=policy, offboarding_grace_days=30)
        sim.login_as(bob.oid)
        assert f"Connected {bob.display_name}" in page(browser.get(f"{base_url}/connect", params={"tenant": bob.tid}))
        offboard_user_now(settings, bob.tid, bob.oid)
        r = browser.get(f"{base_url}/connect", params={"tenant": bob.tid})
        assert r.status_code == 403 and OFFBOARDED in page(r) and bob.upn not in page(r)
        assert not token_path(settings, bob.tid, bob.oid).exists() and connected_users(settings, bob.tid) == []
        # the pending sign-in of a user offboarded while signing in is refused too; others still connect
        sim.login_as(alice.oid)
        redirect = start(browser, base_url, alice.tid)
        offboard_user_now(settings, alice.tid, alice.oid)
        assert OFFBOARDED in page(browser.get(redirect.headers["location"]))
        assert not token_path(settings, alice.tid, alice.oid).exists()
        other = world.tenants[0].users[0]
        sim.login_as(other.oid)
        assert browser.get(f"{base_url}/connect", params={"tenant": other.tid}).status_code == 200
        # the administrator re-admits bob (audited): he connects again
        readmit_user_now(settings, bob.tid, bob.oid)
        sim.login_as(bob.oid)
        assert f"Connected {bob.display_name}" in page(browser.get(f"{base_url}/connect", params={"tenant": bob.tid}))
        assert bob.oid not in offboarding_status(settings, bob.tid) and alice.oid in offboarding_status(
            settings, bob.tid
        )
        assert [e["action"] for e in read_audit(settings, bob.tid)] == ["offboard", "offboard", "readmit"]


# ------------------------------------------------------------------ item 15: a server that cannot store, refuses first
def test_tenant_in_a_region_this_server_does_not_know_fails_before_the_sign_in(env, tmp_path, tls_of_env, caplog):
    sim, world, _, _, browser = env
    user = world.tenants[0].users[0]
    eu = tmp_path / "eu"
    eu.mkdir()
    with web_server(sim, tls_of_env, tmp_path / "data") as (settings, base_url):  # started without regions
        register(settings.model_copy(update={"regions": {"eu": eu}}), world, region="eu")
        sim.login_as(user.oid)
        authorizations = len(sim.authorize_requests)
        with caplog.at_level(logging.WARNING, logger="o365sync.web"):
            r = start(browser, base_url, user.tid)
    assert r.status_code == 503 and MISCONFIGURED in page(r) and "location" not in r.headers
    assert len(sim.authorize_requests) == authorizations  # no sign-in started, no code spent
    assert any("unknown region 'eu'" in m and "O365SYNC_REGIONS" in m for m in caplog.messages)
    assert files_of(settings, user.tid) == [f"tenants/{user.tid}/tenant.json"]
    assert not any(eu.rglob("*"))


def test_tenant_moved_to_an_unknown_region_during_a_sign_in_gets_a_clear_page(env, tmp_path, tls_of_env):
    sim, world, _, _, browser = env
    user = world.tenants[0].users[0]
    eu = tmp_path / "eu"
    eu.mkdir()
    with web_server(sim, tls_of_env, tmp_path / "data") as (settings, base_url):
        register(settings, world)
        sim.login_as(user.oid)
        redirect = start(browser, base_url, user.tid)
        state_of(redirect)
        tenant = load_tenant(settings, user.tid)  # an admin shell that knows the region moves the tenant
        tenant.region = "eu"
        save_tenant(settings.model_copy(update={"regions": {"eu": eu}}), tenant)
        redemptions = len(sim.token_requests)
        r = browser.get(redirect.headers["location"])
    assert r.status_code == 503 and MISCONFIGURED in page(r)
    assert len(sim.token_requests) == redemptions  # checked before the code is redeemed
    assert not list(settings.data_dir.rglob("*.token")) and not any(eu.rglob("*"))


def test_unwritable_storage_fails_before_the_sign_in(env, tmp_path, tls_of_env):
    sim, world, _, _, browser = env
    user = world.tenants[1].users[0]
    with web_server(sim, tls_of_env, tmp_path / "data") as (settings, base_url):
        register(settings, world)
        (settings.data_dir / "tenants" / user.tid / "connections").write_text("not a folder")
        authorizations = len(sim.authorize_requests)
        r = start(browser, base_url, user.tid)
    assert r.status_code == 503 and MISCONFIGURED in page(r) and len(sim.authorize_requests) == authorizations


# ------------------------------------------------------------------ item 9: bounded inputs
def test_pending_sign_ins_are_capped_per_tenant_and_overall(env, tmp_path, tls_of_env):
    sim, world, _, _, browser = env
    t0, t1 = world.tenants
    pending = PendingSignIns()
    with web_server(
        sim,
        tls_of_env,
        tmp_path / "data",
        pending=pending,
        connect_max_pending=3,
        connect_max_pending_per_tenant=2,
        connect_rate_limit="1000/minute",
    ) as (settings, base_url):
        register(settings, world)
        assert [start(browser, base_url, t0.tid).status_code for _ in range(2)] == [302, 302]
        refused = start(browser, base_url, t0.tid)
        assert refused.status_code == 503 and "Too many sign-ins are in progress" in page(refused)
        assert 1 <= int(refused.headers["Retry-After"]) <= 601
        assert start(browser, base_url, t1.tid).status_code == 302  # another tenant still gets through
        assert len(pending) == 3
        for _ in range(50):  # over the overall cap: refused, the store does not grow
            assert start(browser, base_url, t1.tid, login_hint="u" * 250).status_code == 503
        assert len(pending) == 3


def test_an_over_long_login_hint_is_refused_before_any_redirect(env, tmp_path, tls_of_env):
    sim, world, _, _, browser = env
    user = world.tenants[0].users[0]
    pending = PendingSignIns()
    with web_server(sim, tls_of_env, tmp_path / "data", pending=pending, connect_rate_limit="1000/minute") as (
        settings,
        base_url,
    ):
        register(settings, world)
        authorizations = len(sim.authorize_requests)
        for hint in ("a" * 255, "a" * 60_000, "alice\n@x.example"):
            r = start(browser, base_url, user.tid, login_hint=hint)
            assert r.status_code == 400 and "location" not in r.headers and "login_hint" in page(r)
            assert "aaaa" not in page(r)
        assert len(pending) == 0 and len(sim.authorize_requests) == authorizations
        longest = "a" * 240 + "@x.example.com"  # 254 characters: the longest e-mail address
        assert start(browser, base_url, user.tid, login_hint=longest).status_code == 302
        assert len(pending) == 1


def test_one_client_over_the_rate_gets_429_while_another_gets_through(env, tmp_path, tls_of_env):
    sim, world, _, _, _ = env
    user = world.tenants[0].users[0]
    with (
        web_server(sim, tls_of_env, tmp_path / "data", connect_rate_limit="3/minute") as (settings, base_url),
        httpx.Client(trust_env=False) as first,
        httpx.Client(trust_env=False, transport=httpx.HTTPTransport(local_address="127.0.0.2")) as second,
    ):
        register(settings, world)
        assert [start(first, base_url, user.tid).status_code for _ in range(3)] == [302, 302, 302]
        limited = start(first, base_url, user.tid)
        assert limited.status_code == 429 and "Too many sign-ins were started from your network" in page(limited)
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert f"Wait {limited.headers['Retry-After']} seconds" in page(limited)
        assert start(second, base_url, user.tid).status_code == 302  # another address is not limited
        assert start(first, base_url, "no-such-tenant").status_code == 429  # every call counts
