"""Connecting users with MSAL (authorization-code flow + PKCE) and holding their tokens.

- One MSAL `SerializableTokenCache` per user (Microsoft's guidance for web apps), sealed with AES-GCM at
  `<data_dir>/tenants/<tid>/connections/<oid>.token`, owner `"<tid>.<oid>"`; plain metadata in `<oid>.json`.
- Users are keyed by (tenant id, object id), never by e-mail address.
- Authority and Graph URLs come only from settings; nothing here knows about the simulators.
- Exception messages carry ids and error codes only (Prefect stores them): never a UPN or e-mail address.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import httpx
import msal
import requests
from msal.exceptions import MsalServiceError

from o365sync.errors import O365SyncError
from o365sync.http import make_http_client
from o365sync.secrets import SecretError, load_key, read_sealed, write_sealed
from o365sync.settings import Settings
from o365sync.tenants import TenantNotFound, load_tenant, region_root, tenant_dir

BASE_SCOPES = ["User.Read"]
# Short-form Graph permissions: Entra echoes the short form as the token's scope, and MSAL finds a cached access
# token only if the requested scopes are within it (the long form missed the cache on every call).
# Least privilege: calendar import only reads; the calendar and online-meeting writes of Notetaker's Explicit
# Consent Mode are requested only when the tenant turned that mode on.
FEATURE_SCOPES: dict[str, list[str]] = {
    "email": ["Mail.Read"],
    "calendar": ["Calendars.Read"],
    "notetaker": [],
    "teams": ["Team.ReadBasic.All", "Channel.ReadBasic.All", "ChannelMessage.Send", "Chat.Create", "ChatMessage.Send"],
}
CONSENT_MODE_SCOPES = ["Calendars.ReadWrite", "OnlineMeetings.ReadWrite"]
# A granted scope that covers another (Entra grants the broader one; the narrower is then implied).
_IMPLIED = {"calendars.read": "calendars.readwrite"}
FLOW_TTL_S = 600.0
# A sign-in name is a UPN (at most 113 characters: 64 + "@" + 48) or, with "e-mail as alternate login ID", an e-mail
# address (at most 254, RFC 5321). 254 refuses no valid name and bounds what one pending sign-in holds.
MAX_LOGIN_HINT = 254
# Written by o365sync/offboarding.py: {user oid: {policy, offboarded_at, delete_after, deleted_at}}.
OFFBOARDING_FILE = "offboarding.json"

RECONNECT_ERRORS = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required", "no_account", "no_token"}
)
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
CONFIG_ERRORS = frozenset({"invalid_client", "unauthorized_client"})


# --------------------------------------------------------------------------- errors
class AuthError(O365SyncError):
    """Base class. Subclasses pickle by their fields, so they survive Prefect's result persistence."""


class ReconnectNeeded(AuthError):
    """The user's grant is gone (revoked, expired, consent withdrawn, MFA needed, no token): connect again."""

    retriable = False
    action = "the user must connect again"
    stage = "reconnect_needed"

    def __init__(self, tenant_id: str, oid: str, error: str, error_codes: Iterable[int] = ()):
        self.tenant_id, self.oid, self.error = tenant_id, oid, error
        self.error_codes = list(error_codes)
        super().__init__(f"user {tenant_id}/{oid} must reconnect: {error} {self.error_codes}")

    def state_error(self) -> str:
        return self.error  # the OAuth error code (invalid_grant, ...): what status shows under "reconnect needed"


class AuthConfigError(AuthError):
    """Our app registration is rejected (invalid_client: secret expired/wrong, app not in tenant)."""

    retriable = False
    action = (
        "an admin must fix the app registration (renew the client secret and set O365SYNC_CLIENT_SECRET, or "
        "consent the app in the tenant), then run `o365sync import --tenant <id>`"
    )

    def __init__(self, error: str, error_codes: Iterable[int] = (), context: str = ""):
        self.error, self.error_codes, self.context = error, list(error_codes), context
        super().__init__(f"app registration rejected{' for ' + context if context else ''}: {error} {self.error_codes}")


class AuthTransient(AuthError):
    """Network error, 5xx or 429 at the identity platform: retry later; the stored tokens are kept."""

    def __init__(self, detail: str, error_codes: Iterable[int] = ()):
        self.detail, self.error_codes = detail, list(error_codes)
        super().__init__(f"identity platform temporarily unavailable: {detail} {self.error_codes}")


class ConnectError(AuthError):
    """The sign-in (connect) could not be completed; `error` is an OAuth error or one of ours."""

    retriable = False
    action = "the user must sign in again from the connect link"

    def __init__(self, error: str, error_codes: Iterable[int] = (), detail: str = ""):
        self.error, self.error_codes, self.detail = error, list(error_codes), detail
        super().__init__(f"connect failed: {error} {self.error_codes}{': ' + detail if detail else ''}")


class WrongTenant(ConnectError):
    """The account that signed in belongs to another Entra tenant than the one being connected."""

    action = "the user must sign in with an account of the tenant being connected"

    def __init__(self, expected_tid: str, actual_tid: str):
        self.expected_tid, self.actual_tid = expected_tid, actual_tid
        super().__init__("wrong_tenant", (), f"signed-in account belongs to tenant {actual_tid}, not {expected_tid}")


class TenantGone(ConnectError):
    """The tenant is not (or no longer) registered: its subscription ended, or the link names another one."""

    action = "an admin must register the tenant (o365sync tenant add) or send the right connect link"

    def __init__(self, tenant_id: str):
        self.tenant_id = tenant_id
        super().__init__("tenant_not_registered", (), f"tenant {tenant_id} is not registered")


class UserOffboarded(ConnectError):
    """The signed-in user was offboarded (pending, retained or deleted): only an administrator can re-admit them."""

    action = "an admin must re-admit the user before they can connect"

    def __init__(self, tenant_id: str, oid: str):
        self.tenant_id, self.oid = tenant_id, oid
        super().__init__("user_offboarded", (), f"user {tenant_id}/{oid} was offboarded")


class InvalidLoginHint(ConnectError):
    """The login_hint of a connect link is longer than any sign-in name or holds control characters."""

    action = "the user must open the connect link as it was sent (without an edited login_hint)"

    def __init__(self) -> None:
        super().__init__("invalid_login_hint", (), f"login_hint must be at most {MAX_LOGIN_HINT} printable characters")


class ConnectSetupError(AuthError):
    """This server cannot store a connection of the tenant (region not configured, storage not writable, no key):
    found before the sign-in starts, so no sign-in code is spent. `cause` is for operators."""

    retriable = False
    action = "an operator must configure the tenant's region, storage or encryption key on this server"

    def __init__(self, tenant_id: str, cause: str):
        self.tenant_id, self.cause = tenant_id, cause
        super().__init__(f"cannot connect users of tenant {tenant_id}: {cause}")


class SignInsBusy(AuthError):
    """Too many sign-ins are pending (for the tenant or overall); one frees up within `retry_after_s`."""

    action = "the user must wait a minute and sign in again"

    def __init__(self, scope: str, retry_after_s: int):
        self.scope, self.retry_after_s = scope, retry_after_s
        super().__init__(f"too many pending sign-ins ({scope}); retry in {retry_after_s} s")


class _FileChanged(Exception):
    """Internal: the token file changed on disk under a failing provider; reload instead of deleting it."""


_AADSTS = re.compile(r"AADSTS(\d+)")


def _codes_of(result: dict[str, Any]) -> list[int]:
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes:
        return [int(c) for c in codes if str(c).isdigit()]
    return [int(c) for c in _AADSTS.findall(str(result.get("error_description", "")))]


# --------------------------------------------------------------------------- MSAL plumbing
class MsalHttpxClient:
    """The http_client MSAL needs (get/post/close) on top of httpx (MSAL calls only these three methods).

    httpx transport errors become `requests.exceptions.ConnectionError`, the only "network error" MSAL
    recognises (it then falls back to a still-valid cached access token)."""

    def __init__(self, client: httpx.Client):
        self._c = client

    def get(self, url: str, params: Any = None, headers: Any = None, **kw: Any) -> httpx.Response:
        return self._req("GET", url, params=params, headers=headers, **kw)

    def post(self, url: str, params: Any = None, data: Any = None, headers: Any = None, **kw: Any) -> httpx.Response:
        return self._req("POST", url, params=params, data=data, headers=headers, **kw)

    def _req(
        self,
        method: str,
        url: str,
        params: Any = None,
        data: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **_: Any,
    ) -> httpx.Response:
        kw: dict[str, Any] = {"headers": {k: v for k, v in (headers or {}).items() if v is not None}}
        if params:
            kw["params"] = params
        if isinstance(data, str | bytes):
            kw["content"] = data
        elif data is not None:
            kw["data"] = data
        if timeout is not None:
            kw["timeout"] = timeout
        try:
            return self._c.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise requests.exceptions.ConnectionError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self._c.close()


def build_app(
    settings: Settings, cache: msal.SerializableTokenCache | None, http_client: httpx.Client | None = None
) -> msal.ConfidentialClientApplication:
    """A confidential client on settings.authority. Does network I/O (tenant discovery): call lazily.

    Pass `http_client` to own (and close) the connection pool; by default one is made from settings."""
    if not settings.client_id:
        raise AuthConfigError("missing_client_id", (), "O365SYNC_CLIENT_ID is not set")
    try:
        return msal.ConfidentialClientApplication(
            settings.client_id,
            client_credential=settings.client_secret.get_secret_value(),
            authority=settings.authority,
            instance_discovery=False,  # never call login.microsoftonline.com/common/discovery/instance
            azure_region=False,  # never probe IMDS / REGION_NAME
            http_client=MsalHttpxClient(http_client or make_http_client(settings)),
            token_cache=cache,
        )
    except requests.exceptions.RequestException as exc:
        raise AuthTransient(f"tenant discovery failed: {type(exc).__name__}") from exc
    except MsalServiceError as exc:
        raise AuthTransient(f"tenant discovery failed: {exc}") from exc


def scopes_for(features: Iterable[str], explicit_consent: bool = False) -> list[str]:
    """The delegated scopes `features` need (User.Read first). Explicit Consent Mode adds the Notetaker writes."""
    scopes = list(BASE_SCOPES)
    features = list(features)
    extra = CONSENT_MODE_SCOPES if explicit_consent and "notetaker" in features else []
    for feature in features:
        if feature not in FEATURE_SCOPES:
            raise ValueError(f"unknown feature {feature!r}; known: {sorted(FEATURE_SCOPES)}")
    for s in [s for f in features for s in FEATURE_SCOPES[f]] + extra:
        if s not in scopes:
            scopes.append(s)
    return scopes


def missing_scopes(granted: Iterable[str], required: Iterable[str]) -> list[str]:
    """The `required` scopes a connection was not granted (case-insensitive, resource prefix ignored)."""
    have = {s.rsplit("/", 1)[-1].lower() for s in granted}
    return [s for s in required if s.lower() not in have and _IMPLIED.get(s.lower()) not in have]


def consent_needed(settings: Settings, tenant_id: str, oid: str, required: Iterable[str]) -> list[str]:
    """Scopes a connected user still has to consent to (the tenant turned a feature on after they connected);
    asking MSAL for them would fail the grant, so callers check this first and mark the user instead."""
    return missing_scopes(connection_info(settings, tenant_id, oid).get("scopes") or [], required)


# --------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class ConnectedUser:
    tenant_id: str
    oid: str
    upn: str
    display_name: str


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _safe(value: str, what: str) -> str:
    if not _ID.fullmatch(value or ""):
        raise ValueError(f"invalid {what}")
    return value


def connections_dir(settings: Settings, tenant_id: str) -> Path:
    return tenant_dir(settings, _safe(tenant_id, "tenant id")) / "connections"


def token_path(settings: Settings, tenant_id: str, oid: str) -> Path:
    return connections_dir(settings, tenant_id) / f"{_safe(oid, 'object id')}.token"


def _meta_path(settings: Settings, tenant_id: str, oid: str) -> Path:
    return connections_dir(settings, tenant_id) / f"{_safe(oid, 'object id')}.json"


def _owner(tenant_id: str, oid: str) -> str:
    return f"{tenant_id}.{oid}"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def _read_meta(settings: Settings, tenant_id: str, oid: str) -> dict:
    path = _meta_path(settings, tenant_id, oid)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_cache(
    settings: Settings, tenant_id: str, oid: str, cache: msal.SerializableTokenCache, path: Path | None = None
) -> None:
    write_sealed(
        path or token_path(settings, tenant_id, oid),
        load_key(settings),
        _owner(tenant_id, oid),
        cache.serialize().encode(),
    )


def _load_cache(settings: Settings, tenant_id: str, oid: str) -> msal.SerializableTokenCache:
    cache = msal.SerializableTokenCache()
    cache.deserialize(
        read_sealed(token_path(settings, tenant_id, oid), load_key(settings), _owner(tenant_id, oid)).decode()
    )
    return cache


def connected_users(settings: Settings, tenant_id: str) -> list[ConnectedUser]:
    """Users of the tenant with a stored token (a user whose grant failed is listed again after reconnect)."""
    folder = connections_dir(settings, tenant_id)
    if not folder.exists():
        return []
    out = []
    for token in folder.glob("*.token"):
        meta = _read_meta(settings, tenant_id, token.stem)
        if meta.get("tid") != tenant_id or meta.get("oid") != token.stem:
            continue
        out.append(ConnectedUser(tenant_id, token.stem, meta.get("upn", ""), meta.get("display_name", "")))
    return sorted(out, key=lambda u: (u.upn.lower(), u.oid))


def connection_info(settings: Settings, tenant_id: str, oid: str) -> dict:
    """The plain metadata of a connection (oid, tid, upn, display_name, connected_at, scopes, and after a
    failed grant `reconnect_needed` = {error, error_codes, at}); {} if the user never connected."""
    return _read_meta(settings, tenant_id, oid)


def disconnect(settings: Settings, tenant_id: str, oid: str) -> None:
    """Forget a user's tokens and metadata."""
    token_path(settings, tenant_id, oid).unlink(missing_ok=True)
    _meta_path(settings, tenant_id, oid).unlink(missing_ok=True)


def offboarding_records(settings: Settings, tenant_id: str) -> dict[str, dict]:
    """The tenant's offboarded users {oid: {policy, offboarded_at, delete_after, deleted_at}} (ISO times;
    `deleted_at` None = deletion pending or data retained), as o365sync/offboarding.py records them."""
    path = tenant_dir(settings, tenant_id) / OFFBOARDING_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def check_ready(settings: Settings, tenant_id: str) -> None:
    """Everything storing a connection of `tenant_id` needs: the tenant is registered, its storage location resolves
    (its region is configured here), exists and is writable, and the token key is usable. Checked before a sign-in
    starts, so a server that cannot store the result never spends the user's sign-in code."""
    try:
        tenant = load_tenant(settings, tenant_id)
    except TenantNotFound:
        raise TenantGone(tenant_id) from None
    try:
        root = region_root(settings, tenant.region)
    except ValueError as exc:  # the tenant lives in a region this server was not configured with
        raise ConnectSetupError(tenant_id, str(exc)) from None
    if not root.is_dir():
        raise ConnectSetupError(
            tenant_id, f"storage location {root} does not exist (region {tenant.region or '(default)'})"
        )
    folder = connections_dir(settings, tenant_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConnectSetupError(tenant_id, f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        load_key(settings)
    except (SecretError, OSError, ValueError) as exc:
        raise ConnectSetupError(tenant_id, f"token key unusable: {exc}") from None


# --------------------------------------------------------------------------- connect
@dataclass
class _Pending:
    flow: dict[str, Any]
    tenant_id: str
    scopes: list[str]
    expires_at: float


class PendingSignIns:
    """Sign-ins started (`begin_connect`) and not yet completed, keyed by their `state`, in this process only.

    Bounded, because starting one needs no login: at most `settings.connect_max_pending_per_tenant` per tenant and
    `settings.connect_max_pending` overall, each kept FLOW_TTL_S. Entries expire in insertion order (one TTL), so
    purging looks only at the oldest ones."""

    def __init__(self, ttl_s: float = FLOW_TTL_S):
        self.ttl_s = ttl_s
        self._entries: dict[str, _Pending] = {}
        self._per_tenant: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._purge(time.monotonic())
            return len(self._entries)

    def _purge(self, now: float) -> None:
        while self._entries:
            state, oldest = next(iter(self._entries.items()))
            if oldest.expires_at > now:
                return
            self._remove(state)

    def _remove(self, state: str) -> _Pending | None:
        entry = self._entries.pop(state, None)
        if entry is not None:
            self._per_tenant[entry.tenant_id] -= 1
            if not self._per_tenant[entry.tenant_id]:
                del self._per_tenant[entry.tenant_id]
        return entry

    def _refuse_if_full(self, settings: Settings, tenant_id: str, now: float) -> None:
        self._purge(now)
        if len(self._entries) >= settings.connect_max_pending:
            oldest = next(iter(self._entries.values()))
            raise SignInsBusy("all tenants", max(1, int(oldest.expires_at - now + 1)))
        if self._per_tenant[tenant_id] >= settings.connect_max_pending_per_tenant:
            oldest = next(p for p in self._entries.values() if p.tenant_id == tenant_id)
            raise SignInsBusy(f"tenant {tenant_id}", max(1, int(oldest.expires_at - now + 1)))

    def check_room(self, settings: Settings, tenant_id: str) -> None:
        """Raise SignInsBusy if a sign-in of `tenant_id` could not be added now (before any network I/O)."""
        with self._lock:
            self._refuse_if_full(settings, tenant_id, time.monotonic())

    def add(self, settings: Settings, flow: dict[str, Any], tenant_id: str, scopes: list[str]) -> None:
        with self._lock:
            now = time.monotonic()
            self._refuse_if_full(settings, tenant_id, now)
            self._entries[flow["state"]] = _Pending(flow, tenant_id, scopes, now + self.ttl_s)
            self._per_tenant[tenant_id] += 1

    def holds(self, state: str) -> bool:
        """Whether `state` is a sign-in of this store still in progress (the callback serves several stores)."""
        with self._lock:
            self._purge(time.monotonic())
            return state in self._entries

    def pop(self, state: str) -> _Pending | None:
        with self._lock:
            self._purge(time.monotonic())
            return self._remove(state)


_pending = PendingSignIns()  # the default store of this process (the web app keeps its own)
_warn_lock = threading.Lock()


def _check_login_hint(login_hint: str | None) -> None:
    if login_hint is not None and (len(login_hint) > MAX_LOGIN_HINT or not login_hint.isprintable()):
        raise InvalidLoginHint()


def _start_flow(settings: Settings, scopes: list[str], **options: Any) -> dict[str, Any]:
    """MSAL's auth-code flow (PKCE, nonce) with a fresh state, in query mode."""
    with make_http_client(settings) as hc:
        app = build_app(settings, None, hc)
    with _warn_lock, warnings.catch_warnings():
        # Query mode is deliberate: the flow lives server-side keyed by state, so no cookie is needed.
        warnings.filterwarnings("ignore", message=".*form_post.*", category=UserWarning)
        return app.initiate_auth_code_flow(
            scopes, redirect_uri=settings.redirect_uri, state=secrets.token_urlsafe(24), **options
        )


def begin_connect(
    settings: Settings,
    tenant_id: str,
    features: list[str],
    login_hint: str | None = None,
    explicit_consent: bool = False,
    pending: PendingSignIns | None = None,
) -> str:
    """Start the authorization-code flow for a user of `tenant_id`; returns the URL to send the browser to.

    Checks first (nothing is started otherwise): the hint, everything the callback needs (`check_ready`) and room
    in the pending store. The MSAL flow (PKCE verifier, nonce) stays in this process, keyed by `state`."""
    store = _pending if pending is None else pending
    _safe(tenant_id, "tenant id")
    _check_login_hint(login_hint)
    scopes = scopes_for(features, explicit_consent)
    check_ready(settings, tenant_id)
    store.check_room(settings, tenant_id)
    flow = _start_flow(settings, scopes, login_hint=login_hint)
    auth_uri = flow.pop("auth_uri")  # not needed after the redirect: keep only what the callback uses
    store.add(settings, flow, tenant_id, scopes)
    return auth_uri


_OAUTH_ERROR = re.compile(r"[a-z_]{1,64}")


def _refused_after_sign_in(settings: Settings, tenant_id: str, oid: str) -> ConnectError | None:
    """Why a signed-in user must not be connected (tenant gone, user offboarded), or None."""
    try:
        load_tenant(settings, tenant_id)
    except TenantNotFound:
        return TenantGone(tenant_id)
    if oid in offboarding_records(settings, tenant_id):
        return UserOffboarded(tenant_id, oid)
    return None


def _refuse_idp_error(auth_response: dict[str, str]) -> None:
    """ConnectError if the identity platform answered with an error. Caller-chosen text: keep a well-formed OAuth
    error name only, and from error_description only the codes (it may contain the UPN, AADSTS50020)."""
    if auth_response.get("error"):
        error = str(auth_response["error"])
        raise ConnectError(
            error if _OAUTH_ERROR.fullmatch(error) else "unrecognised_error",
            [int(c) for c in _AADSTS.findall(auth_response.get("error_description", "")[:2048])][:8],
        )


def _redeem(
    settings: Settings,
    flow: dict[str, Any],
    auth_response: dict[str, str],
    cache: msal.SerializableTokenCache | None,
    context: str,
) -> dict[str, Any]:
    """MSAL's redemption of the callback's code, its failures as our errors (`context` names whose)."""
    try:
        with make_http_client(settings) as hc:
            result = build_app(settings, cache, hc).acquire_token_by_auth_code_flow(flow, auth_response)
    except (requests.exceptions.RequestException, httpx.HTTPError) as exc:
        raise AuthTransient(f"code redemption failed: {type(exc).__name__}") from exc
    except MsalServiceError as exc:
        raise AuthTransient(f"code redemption failed: {exc}") from exc
    except (ValueError, RuntimeError) as exc:  # state or nonce mismatch
        raise ConnectError("invalid_response", (), type(exc).__name__) from exc
    if "error" in result:
        error = str(result["error"])
        if error in CONFIG_ERRORS:
            raise AuthConfigError(error, _codes_of(result), context)
        if error in TRANSIENT_ERRORS:
            raise AuthTransient(error, _codes_of(result))
        raise ConnectError(error, _codes_of(result))
    return result


def complete_connect(
    settings: Settings, auth_response: dict[str, str], pending: PendingSignIns | None = None
) -> ConnectedUser:
    """Redeem the code of the callback (its whole query dict), check the tenant and the user, persist the user's
    cache. Nothing is stored for a tenant that is gone or a user who was offboarded; both are checked again after
    writing (an end of subscription or an offboarding may run meanwhile) and what was written is then removed."""
    store = _pending if pending is None else pending
    entry = store.pop(auth_response.get("state", ""))
    if entry is None:
        raise ConnectError("unknown_state", (), "sign-in link expired or already used; start again")
    _refuse_idp_error(auth_response)
    check_ready(settings, entry.tenant_id)
    cache = msal.SerializableTokenCache()
    result = _redeem(settings, entry.flow, auth_response, cache, f"tenant {entry.tenant_id}")
    claims = result.get("id_token_claims") or {}
    tid, oid = str(claims.get("tid", "")), str(claims.get("oid", ""))
    if not tid or not oid:
        raise ConnectError("invalid_id_token", (), "id_token lacks tid/oid")
    if tid != entry.tenant_id:
        raise WrongTenant(entry.tenant_id, tid)
    if refused := _refused_after_sign_in(settings, tid, oid):
        raise refused
    user = ConnectedUser(
        tid, oid, str(claims.get("preferred_username") or claims.get("upn") or ""), str(claims.get("name", ""))
    )
    token, meta = token_path(settings, tid, oid), _meta_path(settings, tid, oid)  # resolved once
    _save_cache(settings, tid, oid, cache, token)
    _write_json(
        meta,
        {
            "oid": oid,
            "tid": tid,
            "upn": user.upn,
            "display_name": user.display_name,
            "connected_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "scopes": str(result.get("scope", "")).split() or entry.scopes,
        },
    )
    if refused := _refused_after_sign_in(settings, tid, oid):
        token.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        if isinstance(refused, TenantGone):  # do not leave an empty folder behind for a tenant that is gone
            for folder in (token.parent, token.parent.parent):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise refused
    return user


# --------------------------------------------------------------------------- tokens for sync
class TokenProvider:
    """`provider(force_refresh=False) -> access token` for one user; force_refresh=True after a Graph 401.

    Thread-safe (one lock around acquisition). Reloads the sealed cache when the file changed on disk
    (another worker refreshed, or the user reconnected). On a dead grant it raises ReconnectNeeded, removes
    the account and deletes the token file."""

    def __init__(self, settings: Settings, tenant_id: str, oid: str, scopes: list[str]):
        self.settings, self.tenant_id, self.oid = settings, tenant_id, oid
        self.scopes = list(scopes)
        self._path = token_path(settings, tenant_id, oid)
        self._lock = threading.Lock()
        self._cache: msal.SerializableTokenCache | None = None
        self._app: msal.ConfidentialClientApplication | None = None
        self._sig: tuple[int, int] | None = None
        self._http: httpx.Client | None = None

    def __call__(self, force_refresh: bool = False) -> str:
        with self._lock:
            try:
                return self._acquire(force_refresh)
            except _FileChanged:  # the user reconnected meanwhile: one more try with the new cache
                pass
            try:
                return self._acquire(force_refresh)
            except _FileChanged:
                raise AuthTransient(f"token cache of {self.tenant_id}/{self.oid} changed concurrently") from None

    def _file_sig(self) -> tuple[int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        sig = self._file_sig()
        if sig is None:
            self._drop()
            raise ReconnectNeeded(self.tenant_id, self.oid, "no_token")
        try:
            cache = _load_cache(self.settings, self.tenant_id, self.oid)
        except SecretError as exc:
            raise AuthConfigError("token_undecryptable", (), f"user {self.tenant_id}/{self.oid}") from exc
        self._drop()
        self._http = make_http_client(self.settings)
        self._app = build_app(self.settings, cache, self._http)
        self._cache, self._sig = cache, sig

    def _drop(self) -> None:
        self._cache = self._app = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def close(self) -> None:
        """Release the HTTP connection pool (the provider reopens it if called again)."""
        with self._lock:
            self._drop()
            self._sig = None

    def __enter__(self) -> TokenProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self, force_refresh: bool) -> str:
        if self._app is None or self._file_sig() != self._sig:
            self._load()
        assert self._app is not None and self._cache is not None
        home, who = f"{self.oid}.{self.tenant_id}", f"{self.tenant_id}/{self.oid}"
        account = next((a for a in self._app.get_accounts() if a.get("home_account_id") == home), None)
        if account is None:
            self._reconnect("no_account", [])
        try:
            result = self._app.acquire_token_silent_with_error(self.scopes, account, force_refresh=force_refresh)
        except (requests.exceptions.RequestException, httpx.HTTPError) as exc:
            raise AuthTransient(f"token refresh for {who}: {type(exc).__name__}") from exc
        except MsalServiceError as exc:
            raise AuthTransient(f"token refresh for {who}: {exc}") from exc
        if result is None:
            self._reconnect("no_token", [])
        error = result.get("error")
        if error:
            codes = _codes_of(result)
            if error in TRANSIENT_ERRORS:
                raise AuthTransient(f"token refresh for {who}: {error}", codes)
            if error in CONFIG_ERRORS:
                raise AuthConfigError(str(error), codes, f"user {who}")
            if result.get("suberror") == "consent_required":
                error = "consent_required"
            self._reconnect(str(error), codes, account)
        if self._cache.has_state_changed:
            _save_cache(self.settings, self.tenant_id, self.oid, self._cache)
            self._sig = self._file_sig()
        return str(result["access_token"])

    def _reconnect(self, error: str, codes: list[int], account: dict | None = None) -> NoReturn:
        current = self._file_sig()
        if current is not None and current != self._sig:
            # The user reconnected (or another worker rotated the cache) meanwhile: never delete that file.
            self._drop()
            raise _FileChanged
        if account is not None and self._app is not None:
            self._app.remove_account(account)
        self._path.unlink(missing_ok=True)
        meta = _read_meta(self.settings, self.tenant_id, self.oid)
        if meta:
            meta["reconnect_needed"] = {
                "error": error,
                "error_codes": codes,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _write_json(_meta_path(self.settings, self.tenant_id, self.oid), meta)
        self._drop()
        self._sig = None
        raise ReconnectNeeded(self.tenant_id, self.oid, error, codes)


# --------------------------------------------------------------------------- console sign-in and admin consent
# Who is a tenant admin in the console: an app role of our registration assigned in the tenant's enterprise
# application, or a directory role that may grant tenant-wide consent to delegated Graph permissions (template ids
# are the same in every tenant): Global Administrator, Privileged Role Administrator, Cloud Application
# Administrator, Application Administrator.
ADMIN_APP_ROLE = "O365Sync.Admin"
ADMIN_ROLE_TEMPLATES = frozenset(
    {
        "62e90394-69f5-4237-9190-012177145e10",
        "e8611ab8-c189-46e8-94e1-60213ab1f814",
        "158c047a-c907-4556-b7ef-446551a6b5f7",
        "9b895d92-2cd3-44c7-9d02-a6ac2d5ea5c3",
    }
)
SIGN_IN_SCOPES = ["User.Read"]
SIGN_IN_KEY = "console-sign-in"  # the PendingSignIns bucket of console sign-ins (no tenant is known before)
ADMIN_CONSENT_FILE = "admin_consent.json"
_CLOCK_SKEW_S = 300


class SignInRefused(ConnectError):
    """A console sign-in whose ID token is not for us (audience, issuer) or whose tenant is not onboarded."""

    action = "the user must sign in with a work account of an organisation registered with this service"

    def __init__(self, reason: str, tenant_id: str = ""):
        self.reason, self.tenant_id = reason, tenant_id
        super().__init__(reason, (), f"console sign-in refused for tenant {tenant_id or '-'}")


@dataclass(frozen=True)
class SignedIn:
    """Who signed in to the console, from a checked ID token."""

    tenant_id: str
    oid: str
    upn: str
    display_name: str
    roles: tuple[str, ...] = ()
    wids: tuple[str, ...] = ()

    @property
    def is_admin(self) -> bool:
        return ADMIN_APP_ROLE in self.roles or bool(ADMIN_ROLE_TEMPLATES & set(self.wids))


def begin_sign_in(settings: Settings, pending: PendingSignIns, login_hint: str | None = None) -> tuple[str, str]:
    """Start an OpenID Connect sign-in (auth code + PKCE, query mode); returns (URL for the browser, state). The flow
    stays server-side in `pending`, keyed by state (an MSAL flow does not fit a cookie next to a session)."""
    _check_login_hint(login_hint)
    pending.check_room(settings, SIGN_IN_KEY)
    flow = _start_flow(settings, SIGN_IN_SCOPES, login_hint=login_hint, prompt=None if login_hint else "select_account")
    auth_uri = flow.pop("auth_uri")
    pending.add(settings, flow, SIGN_IN_KEY, SIGN_IN_SCOPES)
    return auth_uri, flow["state"]


def checked_identity(settings: Settings, claims: dict[str, Any], now: float | None = None) -> SignedIn:
    """The signed-in user from ID token claims, after the checks MSAL >= 1.38 no longer makes: audience = our client
    id, issuer names the token's tenant, not expired, tenant onboarded here. Raises SignInRefused otherwise."""
    now = time.time() if now is None else now
    tid, oid = str(claims.get("tid", "")).lower(), str(claims.get("oid", "")).lower()
    if claims.get("aud") != settings.client_id:
        raise SignInRefused("wrong_audience", tid)
    if not tid or not oid or not _ID.fullmatch(tid) or not _ID.fullmatch(oid):
        raise SignInRefused("invalid_id_token", tid)
    if f"/{tid}/" not in str(claims.get("iss", "")).lower() + "/":
        raise SignInRefused("wrong_issuer", tid)
    if float(claims.get("exp", 0)) < now - _CLOCK_SKEW_S:
        raise SignInRefused("expired_id_token", tid)
    try:
        load_tenant(settings, tid)
    except TenantNotFound:
        raise SignInRefused("tenant_not_onboarded", tid) from None
    listed = lambda v: tuple(str(x) for x in v) if isinstance(v, list) else ()  # noqa: E731
    return SignedIn(
        tid,
        oid,
        str(claims.get("preferred_username") or claims.get("upn") or ""),
        str(claims.get("name", "")),
        listed(claims.get("roles")),
        tuple(w.lower() for w in listed(claims.get("wids"))),
    )


def complete_sign_in(settings: Settings, auth_response: dict[str, str], pending: PendingSignIns) -> SignedIn:
    """Redeem a console sign-in's code and check the ID token (`checked_identity`). No token is kept: the console
    needs only who signed in."""
    entry = pending.pop(auth_response.get("state", ""))
    if entry is None or entry.tenant_id != SIGN_IN_KEY:
        raise ConnectError("unknown_state", (), "sign-in expired or already used; start again")
    _refuse_idp_error(auth_response)
    result = _redeem(settings, entry.flow, auth_response, None, "console sign-in")
    return checked_identity(settings, result.get("id_token_claims") or {})


# Graph's resource identifier per national cloud (resource-qualified scopes name it, not a private endpoint).
_GRAPH_RESOURCES = (
    "graph.microsoft.com",
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
)


def graph_resource(settings: Settings) -> str:
    """Graph's resource identifier for resource-qualified scopes: the national cloud's Graph host of
    `settings.graph_url`, else the global one (a private or simulated endpoint stands in for global Graph)."""
    host = httpx.URL(settings.graph_url).host
    return f"https://{host if host in _GRAPH_RESOURCES else _GRAPH_RESOURCES[0]}"


def admin_consent_url(settings: Settings, tenant_id: str, scopes: Iterable[str], state: str) -> str:
    """The v2 admin-consent URL for `tenant_id` (never `common`), asking for `scopes` resource-qualified."""
    resource = graph_resource(settings)
    query = httpx.QueryParams(
        {
            "client_id": settings.client_id,
            "scope": " ".join(f"{resource}/{s}" for s in scopes),
            "redirect_uri": settings.redirect_uri,
            "state": state,
        }
    )
    return f"{settings.authority_url.rstrip('/')}/{_safe(tenant_id, 'tenant id')}/v2.0/adminconsent?{query}"


def record_admin_consent(settings: Settings, tenant_id: str, scopes: Iterable[str], by_oid: str) -> dict:
    """Remember that an admin of the tenant granted `scopes` tenant-wide (short form), when and who."""
    info = {
        "scopes": sorted({s.rsplit("/", 1)[-1] for s in scopes}),
        "granted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "by": _safe(by_oid, "object id"),
    }
    _write_json(tenant_dir(settings, tenant_id) / ADMIN_CONSENT_FILE, info)
    return info


def admin_consent_info(settings: Settings, tenant_id: str) -> dict:
    """The tenant's last recorded admin consent ({scopes, granted_at, by}), {} if none."""
    try:
        return json.loads((tenant_dir(settings, tenant_id) / ADMIN_CONSENT_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
