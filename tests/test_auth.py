"""Connecting users and getting their tokens: real MSAL against the identity simulator on loopback TLS."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr

from o365sync.auth import (
    AuthConfigError,
    AuthTransient,
    ConnectedUser,
    ConnectError,
    ConnectSetupError,
    InvalidLoginHint,
    PendingSignIns,
    ReconnectNeeded,
    SignInsBusy,
    TenantGone,
    TokenProvider,
    UserOffboarded,
    WrongTenant,
    begin_connect,
    complete_connect,
    connected_users,
    connection_info,
    scopes_for,
    token_path,
)
from o365sync.secrets import SecretError, load_key, read_sealed
from o365sync.settings import Settings
from o365sync.tenants import TenantConfig, save_tenant
from simulators.identity import IdentitySimulator
from simulators.tls import create_tls
from simulators.tokens import TokenAuthority
from simulators.world import generate_world

REDIRECT = "http://localhost:8400/auth/callback"
SCOPES = scopes_for(["email"])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tls = create_tls(tmp_path_factory.mktemp("tls"))
    world = generate_world(tenants=2, users_per_tenant=2, messages_per_user=5)
    tokens = TokenAuthority()
    sim = IdentitySimulator(world, tls, tokens, clients={"app-1": ("s3cret", [REDIRECT])}).start()
    yield sim, world, tls, tokens
    sim.stop()


def make_settings(tmp_path, sim, tls, **kw) -> Settings:
    """Settings pointing at the simulator, with every tenant of its world registered (users connect only to
    registered tenants)."""
    base = dict(
        data_dir=tmp_path,
        authority_url=sim.base_url,
        graph_url="https://127.0.0.1:1/v1.0",
        client_id="app-1",
        client_secret=SecretStr("s3cret"),
        redirect_uri=REDIRECT,
        ca_bundle=tls.ca_pem,
    )
    base.update(kw)
    settings = Settings(**base)
    for t in sim.world.tenants:
        save_tenant(settings, TenantConfig(id=t.tid, name=t.name, domains=t.domains, features=["email"]))
    return settings


@pytest.fixture
def make_provider():
    made: list[TokenProvider] = []

    def make(settings, user) -> TokenProvider:
        made.append(TokenProvider(settings, user.tid, user.oid, SCOPES))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def settings(env, tmp_path):
    sim, _, tls, _ = env
    return make_settings(tmp_path, sim, tls)


def sign_in(settings, sim, tls, user, tenant_id=None) -> dict[str, str]:
    """Play the browser: open the authorize URL, read the redirect back to us."""
    sim.login_as(user.oid)
    url = begin_connect(settings, tenant_id or user.tid, ["email"])
    with httpx.Client(verify=tls.client_context(), trust_env=False) as browser:
        r = browser.get(url)
    assert r.status_code == 302, r.text
    loc = r.headers["location"]
    assert loc.startswith(REDIRECT + "?")
    return dict(parse_qsl(urlsplit(loc).query))


def connect(settings, sim, tls, user) -> ConnectedUser:
    return complete_connect(settings, sign_in(settings, sim, tls, user))


def used_then_revoked(env, settings, make_provider, user) -> TokenProvider:
    """A provider of the connected `user` that got its tokens once; then the user's grant is revoked."""
    sim, _, tls, _ = env
    connect(settings, sim, tls, user)
    provider = make_provider(settings, user)
    provider()
    sim.revoke(user.oid)
    return provider


def stored_cache(settings, user) -> dict:
    return json.loads(
        read_sealed(token_path(settings, user.tid, user.oid), load_key(settings), f"{user.tid}.{user.oid}")
    )


def refresh_token_of(settings, user) -> str:
    (rt,) = stored_cache(settings, user)["RefreshToken"].values()
    return rt["secret"]


def test_scopes_for_features():
    assert scopes_for([]) == ["User.Read"]
    assert scopes_for(["email"]) == ["User.Read", "Mail.Read"]
    with pytest.raises(ValueError):
        scopes_for(["fax"])


def test_connect_persists_a_sealed_per_user_cache(env, settings):
    sim, world, tls, _ = env
    user = world.tenants[0].users[0]
    connected = connect(settings, sim, tls, user)
    assert connected == ConnectedUser(user.tid, user.oid, user.upn, user.display_name)
    path = token_path(settings, user.tid, user.oid)
    assert path == settings.data_dir / "tenants" / user.tid / "connections" / f"{user.oid}.token"
    assert path.stat().st_mode & 0o777 == 0o600
    raw = path.read_bytes()
    rt = refresh_token_of(settings, user)
    assert rt.encode() not in raw and user.upn.encode() not in raw and b"RefreshToken" not in raw
    with pytest.raises(SecretError):
        read_sealed(path, load_key(settings), f"{user.tid}.{world.tenants[0].users[1].oid}")
    meta = connection_info(settings, user.tid, user.oid)
    assert (meta["oid"], meta["tid"], meta["upn"], meta["display_name"]) == (
        user.oid,
        user.tid,
        user.upn,
        user.display_name,
    )
    assert set(meta["scopes"]) >= {"Mail.Read", "User.Read"} and meta["connected_at"]
    assert connected_users(settings, user.tid) == [connected]
    assert connected_users(settings, world.tenants[1].tid) == []


def test_silent_token_then_forced_refresh_persists_the_rotated_refresh_token(env, settings, make_provider):
    sim, world, tls, tokens = env
    user = world.tenants[0].users[1]
    connect(settings, sim, tls, user)
    rt1 = refresh_token_of(settings, user)
    provider = make_provider(settings, user)
    n = len(sim.token_requests)
    at1 = provider()
    assert provider() == at1
    assert len(sim.token_requests) == n  # served from the cache; MSAL's AT target matches the short scopes
    claims = tokens.verify_access_token(at1)
    assert (claims.oid, claims.tid) == (user.oid, user.tid) and {"Mail.Read", "User.Read"} <= claims.scopes
    at2 = provider(force_refresh=True)
    assert at2 != at1 and [e["grant_type"] for e in sim.token_requests[n:]] == ["refresh_token"]
    rt2 = refresh_token_of(settings, user)
    assert rt2 != rt1
    # a new provider (another process) starts from the rotated cache on disk
    assert make_provider(settings, user)() == at2


def test_short_lived_access_tokens_are_refreshed_silently(env, tmp_path, make_provider):
    _, world, tls, tokens = env
    with IdentitySimulator(world, tls, tokens, access_token_ttl_s=120) as sim:  # < MSAL's 5-minute margin
        settings = make_settings(tmp_path, sim, tls)
        user = world.tenants[1].users[0]
        connect(settings, sim, tls, user)
        provider = make_provider(settings, user)
        n = len(sim.token_requests)
        provider()
        provider()
        assert [e["grant_type"] for e in sim.token_requests[n:]] == ["refresh_token", "refresh_token"]


def test_revoked_grant_needs_reconnect_and_removes_the_token(env, settings, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[1].users[1]
    provider = used_then_revoked(env, settings, make_provider, user)
    with pytest.raises(ReconnectNeeded) as info:
        provider(force_refresh=True)
    exc = info.value
    assert (exc.tenant_id, exc.oid, exc.error) == (user.tid, user.oid, "invalid_grant")
    assert exc.error_codes == [50173]
    assert user.upn not in str(exc) and "@" not in str(exc)
    assert not token_path(settings, user.tid, user.oid).exists()
    assert connected_users(settings, user.tid) == []
    assert connection_info(settings, user.tid, user.oid)["reconnect_needed"]["error_codes"] == [50173]
    with pytest.raises(ReconnectNeeded) as again:
        provider()
    assert again.value.error == "no_token"
    # the user reconnects: the same provider picks up the new cache (no 60 s MSAL replay in the way)
    connect(settings, sim, tls, user)
    assert provider(force_refresh=True)
    assert [u.oid for u in connected_users(settings, user.tid)] == [user.oid]


def test_consent_withdrawn_needs_reconnect(env, settings, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[0].users[0]
    connect(settings, sim, tls, user)
    sim.inject("consent")
    with pytest.raises(ReconnectNeeded) as info:
        make_provider(settings, user)(force_refresh=True)
    assert info.value.error == "consent_required" and info.value.error_codes == [65001]


@pytest.mark.parametrize("kind", ["unavailable", "server_error", "throttled"])
def test_transient_identity_errors_keep_the_tokens(env, settings, kind, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[0].users[1]
    connect(settings, sim, tls, user)
    sim.inject(kind, retry_after=30)
    with pytest.raises(AuthTransient):
        make_provider(settings, user)(force_refresh=True)
    assert token_path(settings, user.tid, user.oid).exists()
    assert make_provider(settings, user)(force_refresh=True)


def test_unreachable_identity_platform_is_transient(env, settings, tmp_path, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[0].users[1]
    connect(settings, sim, tls, user)
    down = make_settings(tmp_path, sim, tls, authority_url="https://127.0.0.1:1")
    with pytest.raises(AuthTransient):
        make_provider(down, user)()
    assert token_path(settings, user.tid, user.oid).exists()


def test_wrong_client_secret_is_a_config_error(env, settings, tmp_path, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[1].users[0]
    connect(settings, sim, tls, user)
    bad = make_settings(tmp_path, sim, tls, client_secret=SecretStr("wrong"))
    with pytest.raises(AuthConfigError) as info:
        make_provider(bad, user)(force_refresh=True)
    assert info.value.error == "invalid_client" and info.value.error_codes == [7000215]
    assert token_path(settings, user.tid, user.oid).exists()
    with pytest.raises(AuthConfigError):
        complete_connect(bad, sign_in(bad, sim, tls, user))


def test_account_of_another_tenant_is_rejected(env, settings):
    sim, world, tls, _ = env
    stranger = world.tenants[1].users[0]
    with pytest.raises(WrongTenant) as info:
        complete_connect(settings, sign_in(settings, sim, tls, stranger, tenant_id=world.tenants[0].tid))
    assert stranger.upn not in str(info.value)
    assert not token_path(settings, stranger.tid, stranger.oid).exists()
    assert connected_users(settings, world.tenants[0].tid) == []


def test_callback_state_is_single_use_and_errors_carry_codes_only(env, settings):
    sim, world, tls, _ = env
    user = world.tenants[0].users[0]
    response = sign_in(settings, sim, tls, user)
    complete_connect(settings, response)
    with pytest.raises(ConnectError) as info:
        complete_connect(settings, response)
    assert info.value.error == "unknown_state"
    sim.login_as(user.oid)
    begin = begin_connect(settings, user.tid, ["email"])
    state = dict(parse_qsl(urlsplit(begin).query))["state"]
    denied = {
        "error": "access_denied",
        "state": state,
        "error_description": f"AADSTS65004: {user.upn} declined.\r\nTrace ID: x",
    }
    with pytest.raises(ConnectError) as info:
        complete_connect(settings, denied)
    assert (info.value.error, info.value.error_codes) == ("access_denied", [65004])
    assert user.upn not in str(info.value)


def test_provider_is_safe_to_share_between_threads(env, settings, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[1].users[1]
    connect(settings, sim, tls, user)
    provider = make_provider(settings, user)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: provider(force_refresh=i % 2 == 0), range(12)))
    assert all(results)
    assert stored_cache(settings, user)["RefreshToken"]


def test_errors_survive_pickling():
    for exc in (
        ReconnectNeeded("t", "o", "invalid_grant", [50173]),
        AuthTransient("x", [90033]),
        AuthConfigError("invalid_client", [7000215], "ctx"),
        ConnectError("access_denied", [65004]),
        WrongTenant("a", "b"),
        TenantGone("t"),
        UserOffboarded("t", "o"),
        InvalidLoginHint(),
        ConnectSetupError("t", "unknown region"),
        SignInsBusy("tenant t", 30),
    ):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)


def test_a_loaded_provider_follows_a_reconnect_instead_of_deleting_it(env, settings, make_provider):
    sim, world, tls, _ = env
    user = world.tenants[0].users[0]
    provider = used_then_revoked(env, settings, make_provider, user)
    connect(settings, sim, tls, user)  # reconnect before the provider ever saw the revocation
    assert provider(force_refresh=True)
    assert token_path(settings, user.tid, user.oid).exists()


CAPS = Settings(connect_max_pending=5, connect_max_pending_per_tenant=3)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "pop"]), st.sampled_from(["t1", "t2", "t3"]), st.integers(0, 12))))
def test_pending_sign_ins_never_exceed_their_caps(ops):
    store, model = PendingSignIns(), {}
    for op, tenant, n in ops:
        state = f"s{n}"
        if op == "pop":
            assert (store.pop(state) is not None) == (state in model)
            model.pop(state, None)
            continue
        if state in model:
            continue
        total, mine = len(model), sum(1 for t in model.values() if t == tenant)
        if total >= CAPS.connect_max_pending or mine >= CAPS.connect_max_pending_per_tenant:
            with pytest.raises(SignInsBusy) as info:
                store.add(CAPS, {"state": state}, tenant, [])
            assert 1 <= info.value.retry_after_s <= 601
        else:
            store.add(CAPS, {"state": state}, tenant, [])
            model[state] = tenant
        assert len(store) == len(model) <= CAPS.connect_max_pending


def test_expired_pending_sign_ins_free_their_place():
    store = PendingSignIns(ttl_s=0)  # every entry is expired by the next call
    for n in range(20):
        store.add(CAPS, {"state": f"s{n}"}, "t1", [])
    assert len(store) == 0 and store.pop("s19") is None


def test_bad_login_hint_or_unregistered_tenant_starts_nothing(env, settings):
    sim, world, _, _ = env
    store = PendingSignIns()
    user = world.tenants[0].users[0]
    n = len(sim.authorize_requests)
    with pytest.raises(InvalidLoginHint):
        begin_connect(settings, user.tid, ["email"], login_hint="x" * 255, pending=store)
    with pytest.raises(TenantGone):
        begin_connect(settings, "not-registered", ["email"], pending=store)
    assert len(store) == 0 and len(sim.authorize_requests) == n
    assert begin_connect(settings, user.tid, ["email"], login_hint="x" * 254, pending=store)
    assert len(store) == 1
