"""Microsoft identity platform (v2 endpoints) simulator: OIDC discovery, JWKS, /authorize with automatic
sign-in and consent, /token for the authorization-code and refresh-token grants, and the v2 admin-consent endpoint.

Behaviour follows what MSAL Python needs and the Microsoft identity platform (v2) documents: HTTPS only (MSAL refuses
http), single-use 10-minute codes, PKCE S256, nonce echoed into the id_token, refresh-token rotation where the old
refresh token stays valid, Graph scopes echoed in short form without `offline_access`, and Entra-shaped error
bodies. Test controls: `login_as`, `revoke`, `inject`, and the `token_requests` log (no secrets in it).

Directory: app roles assigned per user (`assign_app_role`, the ID token's `roles`), directory roles by template id
(`assign_directory_role`, the ID token's `wids`), a per-tenant switch that disables user consent
(`set_tenant_policy(tid, user_consent=False)`: a user is refused with AADSTS90094 on /authorize and 65001 on /token
until an admin granted the scopes tenant-wide at `/{tenant}/v2.0/adminconsent`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import urlencode

from simulators.server import OnServer, Request, Response, SimServer
from simulators.tls import SimulatorTLS
from simulators.tokens import TokenAuthority, b64url
from simulators.world import SimTenant, SimUser, World

CODE_TTL_S = 600
RT_INACTIVITY_S = 90 * 86400
CONSUMERS_TID = "9188040d-6c67-4c5b-b112-36a304b66dad"
MULTI_TENANT = ("common", "organizations")
OIDC_SCOPES = ("openid", "profile", "email", "offline_access")
# Graph's resource identifiers; a scope "<resource>/<permission>" with one of these means Graph.
GRAPH_RESOURCES = (
    "https://graph.microsoft.com",
    "00000003-0000-0000-c000-000000000000",
    "https://graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
)
FAULT_KINDS = (
    "revoked",
    "inactive",
    "mfa",
    "consent",
    "invalid_client",
    "server_error",
    "unavailable",
    "throttled",
    "access_denied",
    "declined",
)
# Directory role template ids (the same in every tenant) of the roles that may grant tenant-wide consent to
# delegated Graph permissions: Global Administrator, Privileged Role Administrator, Cloud Application
# Administrator, Application Administrator.
GLOBAL_ADMINISTRATOR = "62e90394-69f5-4237-9190-012177145e10"
PRIVILEGED_ROLE_ADMINISTRATOR = "e8611ab8-c189-46e8-94e1-60213ab1f814"
CLOUD_APPLICATION_ADMINISTRATOR = "158c047a-c907-4556-b7ef-446551a6b5f7"
APPLICATION_ADMINISTRATOR = "9b895d92-2cd3-44c7-9d02-a6ac2d5ea5c3"
CONSENT_GRANTING_ROLES = frozenset(
    {GLOBAL_ADMINISTRATOR, PRIVILEGED_ROLE_ADMINISTRATOR, CLOUD_APPLICATION_ADMINISTRATOR, APPLICATION_ADMINISTRATOR}
)
# What `<resource>/.default` at the admin-consent endpoint grants: the registration's static permissions.
STATIC_PERMISSIONS = (
    "User.Read",
    "Mail.Read",
    "Calendars.Read",
    "Calendars.ReadWrite",
    "OnlineMeetings.ReadWrite",
    "Team.ReadBasic.All",
    "Channel.ReadBasic.All",
    "ChannelMessage.Send",
    "Chat.Create",
    "ChatMessage.Send",
)

_MESSAGES = {
    50173: "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user "
    "might have changed or reset their password. The grant was issued on '{issued}' and the "
    "TokensValidFrom date (before which tokens are not valid) for this user is '{valid_from}'.",
    700082: "The refresh token has expired due to inactivity. The token was issued on {issued} and was "
    "inactive for 90.00:00:00.",
    50076: "Due to a configuration change made by your administrator, or because you moved to a new "
    "location, you must use multi-factor authentication to access "
    "'00000003-0000-0000-c000-000000000000'.",
    65001: "The user or administrator has not consented to use the application with ID '{client_id}' named "
    "'{client_id}'. Send an interactive authorization request for this user and resource.",
    54005: "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an "
    "existing refresh token.",
    70008: "The provided authorization code or refresh token has expired due to inactivity. Send a new "
    "interactive authorization request for this user and resource.",
    501481: "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
    7000215: "Invalid client secret provided. Ensure the secret being sent in the request is the client "
    "secret value, not the client secret ID, for a secret added to app '{client_id}'.",
    7000218: "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
    700016: "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can "
    "happen if the application has not been installed by the administrator of the tenant or "
    "consented to by any user in the tenant. You may have sent your authentication request to the "
    "wrong tenant.",
    50011: "The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
    "configured for the application '{client_id}'. Make sure the redirect URI sent in the request "
    "matches one added to your application in the Azure portal.",
    50020: "User account '{upn}' from identity provider 'https://sts.windows.net/{user_tid}/' does not exist "
    "in tenant '{tenant}' and cannot access the application '{client_id}' in that tenant. The account "
    "needs to be added as an external user in the tenant first. Sign out and sign in again with a "
    "different Azure Active Directory user account.",
    90002: "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
    "into the correct cloud. Check with your subscription administrator, this may happen if there "
    "are no active subscriptions for the tenant.",
    9002313: "Invalid request. Request is malformed or invalid.",
    900144: "The request body must contain the following parameter: '{param}'.",
    70000: "The request was denied because one or more scopes requested are unauthorized or expired, or the "
    "provided grant is invalid: {detail}",
    700005: "Provided Authorization Code is intended to use against other tenant, thus rejected.",
    28000: "Provided value for the input parameter scope is not valid because it contains more than one "
    "resource. Scope {scope} is not valid.",
    500011: "The resource principal named {resource} was not found in the tenant named {tenant}.",
    70011: "The provided request must include a 'scope' input parameter.",
    65004: "User declined to consent to access the app.",
    90094: "The grant requires admin permission.",
    50000: "There was an error issuing a token or an issue with our sign-in service.",
    90033: "A transient error has occurred. Please try again.",
    50196: "The server terminated an operation because it encountered a client request loop. Please contact "
    "your app vendor.",
    70003: "The app requested an unsupported grant type '{grant_type}'.",
}


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    graph_scopes: list[str]
    oidc_scopes: list[str]
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    oid: str
    tid: str
    tenant_segment: str
    issued_at: float
    auth_time: float
    max_age: str | None
    used: bool = False


@dataclass
class _RefreshToken:
    oid: str
    tid: str
    client_id: str
    serial: int
    issued_at: float


_G = TypeVar("_G", _Code, _RefreshToken)  # a grant a token request redeems


@dataclass
class _Fault:
    kind: str
    grant_type: str
    remaining: int
    retry_after: int


@dataclass
class _TenantRef:
    segment: str  # as in the URL
    tid: str | None  # None for common/organizations
    tenant: SimTenant | None = None
    users: list[SimUser] = field(default_factory=list)


def _now_text(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%m/%d/%Y %H:%M:%S")


def split_scopes(raw: str) -> tuple[list[str], list[str], list[str]]:
    """(Graph permissions in short form, OIDC scopes, scopes for other resources)."""
    graph: list[str] = []
    oidc: list[str] = []
    other: list[str] = []
    for s in raw.split():
        if s.lower() in OIDC_SCOPES:
            if s.lower() not in oidc:
                oidc.append(s.lower())
            continue
        short = None
        for res in GRAPH_RESOURCES:
            if s.lower().startswith(res.lower() + "/"):
                short = s[len(res) + 1 :]
                break
        if short is None and "/" not in s and ":" not in s:
            short = s  # bare permission names mean Graph
        if short is None:
            other.append(s)
        elif short not in graph:
            graph.append(short)
    return graph, oidc, other


class IdentitySimulator(OnServer):
    """Entra ID (v2) on https://127.0.0.1:<port>; users and tenants come from `world`."""

    def __init__(
        self,
        world: World,
        tls: SimulatorTLS,
        tokens: TokenAuthority,
        clients: dict[str, tuple[str, list[str]]] | None = None,
        port: int = 0,
        access_token_ttl_s: int = 3599,
    ):
        self.world = world
        self.tokens = tokens
        self.clients = clients
        self.access_token_ttl_s = access_token_ttl_s
        self._lock = threading.RLock()
        self._next_user: str | None = None
        self._codes: dict[str, _Code] = {}
        self._rts: dict[str, _RefreshToken] = {}
        self._rt_serial = 0
        # oid -> (RTs with a serial <= this are bad, AADSTS code, revoked at)
        self._revoked: dict[str, tuple[int, int, float]] = {}
        self._consents: dict[tuple[str, str], set[str]] = {}  # (oid, client_id) -> Graph permissions
        self._admin_consents: dict[tuple[str, str], set[str]] = {}  # (tid, client_id) -> tenant-wide permissions
        self._no_user_consent: set[str] = set()  # tids whose users may not consent themselves
        self._app_roles: dict[str, set[str]] = {}  # oid -> app role values (the ID token's `roles`)
        self._directory_roles: dict[str, set[str]] = {}  # oid -> role template ids (the ID token's `wids`)
        self.admin_consent_requests: list[dict] = []
        self._faults: list[_Fault] = []
        self.token_requests: list[dict] = []  # one entry per POST /token; ids and outcomes only, no secrets
        self.authorize_requests: list[dict] = []
        t = r"/(?P<tenant>[^/]+)"
        self.server = SimServer(
            tls,
            [
                ("GET", t + r"/v2\.0/\.well-known/openid-configuration", self._openid_configuration),
                ("GET", t + r"/discovery/v2\.0/keys", self._keys),
                ("GET", r"/common/discovery/instance", self._instance_discovery),
                ("GET", t + r"/oauth2/v2\.0/authorize", self._authorize),
                ("POST", t + r"/oauth2/v2\.0/authorize", self._authorize),
                ("POST", t + r"/oauth2/v2\.0/token", self._token),
                ("GET", t + r"/v2\.0/adminconsent", self._admin_consent),
            ],
            port=port,
            name="identity-sim",
        )
        self.base_url = self.server.base_url
        self.port = self.server.port

    # ----------------------------------------------------------------- lifecycle
    @property
    def authority(self) -> str:
        return f"{self.base_url}/organizations"

    # ----------------------------------------------------------------- test controls
    def login_as(self, oid: str | None) -> None:
        """The user who 'signs in' on the following /authorize calls without a matching login_hint."""
        if oid is not None and not any(u.oid == oid for t in self.world.tenants for u in t.users):
            raise ValueError(f"no user with oid {oid} in the world")
        with self._lock:
            self._next_user = oid

    def revoke(self, oid: str, code: int = 50173) -> None:
        """Every refresh token issued so far for this user fails: invalid_grant `code` (50173 or 700082)."""
        with self._lock:
            self._revoked[oid] = (self._rt_serial, code, self.tokens.clock())

    def inject(self, kind: str, grant_type: str = "refresh_token", count: int = 1, retry_after: int = 1) -> None:
        """Fail the next `count` requests of `grant_type` ("refresh_token", "authorization_code", "any" for
        the token endpoint, "authorize" for the sign-in leg with kind "access_denied", or "adminconsent" with kind
        "declined")."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append(_Fault(kind, grant_type, count, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def consented_scopes(self, oid: str, client_id: str) -> set[str]:
        with self._lock:
            return set(self._consents.get((oid, client_id), set()))

    def withdraw_consent(self, oid: str, client_id: str, scopes: list[str] | None = None) -> None:
        """Remove a user's consent (all or some Graph permissions): their refreshes then fail with 65001."""
        with self._lock:
            have = self._consents.get((oid, client_id), set())
            if scopes is None:
                have.clear()
            else:
                have.difference_update(scopes)

    def assign_app_role(self, oid: str, value: str, assigned: bool = True) -> None:
        """Assign (or remove) the app role `value` to a user in their tenant's enterprise application: it shows in
        the `roles` claim of the user's next ID tokens."""
        self.world.user(oid)  # StopIteration for an unknown user
        with self._lock:
            roles = self._app_roles.setdefault(oid, set())
            roles.add(value) if assigned else roles.discard(value)

    def assign_directory_role(self, oid: str, template_id: str, assigned: bool = True) -> None:
        """Give (or take) a directory role by its template id: it shows in the `wids` claim."""
        self.world.user(oid)
        with self._lock:
            wids = self._directory_roles.setdefault(oid, set())
            wids.add(template_id) if assigned else wids.discard(template_id)

    def set_tenant_policy(self, tid: str, user_consent: bool = True) -> None:
        """`user_consent=False`: the tenant lets only administrators consent ("Do not allow user consent")."""
        with self._lock:
            self._no_user_consent.discard(tid) if user_consent else self._no_user_consent.add(tid)

    def admin_consented_scopes(self, tid: str, client_id: str) -> set[str]:
        with self._lock:
            return set(self._admin_consents.get((tid, client_id), set()))

    def revoke_admin_consent(self, tid: str, client_id: str) -> None:
        with self._lock:
            self._admin_consents.pop((tid, client_id), None)

    def _can_grant_tenant_wide(self, oid: str) -> bool:
        with self._lock:
            return bool(self._directory_roles.get(oid, set()) & CONSENT_GRANTING_ROLES)

    def _granted(self, user: SimUser | _RefreshToken | _Code, client_id: str) -> set[str]:
        """The Graph permissions a user may get tokens for: their own consents and their tenant's admin consents."""
        return self._consents.get((user.oid, client_id), set()) | self._admin_consents.get((user.tid, client_id), set())

    def _take_fault(self, grant_type: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                hit = f.grant_type == grant_type or (
                    f.grant_type == "any" and grant_type not in ("authorize", "adminconsent")
                )
                if hit and f.remaining > 0:
                    f.remaining -= 1
                    if f.remaining == 0:
                        self._faults.remove(f)
                    return f
        return None

    # ----------------------------------------------------------------- helpers
    def _resolve_tenant(self, segment: str) -> _TenantRef | None:
        seg = segment.lower()
        if seg in MULTI_TENANT:
            return _TenantRef(segment, None, None, [u for t in self.world.tenants for u in t.users])
        if seg == "consumers" or seg == CONSUMERS_TID:
            return _TenantRef(segment, CONSUMERS_TID, None, [])
        for t in self.world.tenants:
            if seg == t.tid.lower() or seg in (d.lower() for d in t.domains):
                return _TenantRef(segment, t.tid, t, list(t.users))
        return None

    def _error_body(self, error: str, code: int, req: Request, suberror: str | None = None, **fmt: str) -> dict:
        now = self.tokens.clock()
        ts = _now_text(now)
        trace = str(uuid.uuid4())
        corr = req.headers.get("client-request-id") or str(uuid.uuid4())
        try:
            text = _MESSAGES.get(code, "Error.").format(**fmt)
        except KeyError:
            text = _MESSAGES.get(code, "Error.")
        body: dict = {
            "error": error,
            "error_description": f"AADSTS{code}: {text}\r\nTrace ID: {trace}\r\nCorrelation ID: {corr}\r\n"
            f"Timestamp: {ts}",
            "error_codes": [code],
            "timestamp": ts,
            "trace_id": trace,
            "correlation_id": corr,
            "error_uri": f"{self.base_url}/error?code={code}",
        }
        if suberror is not None:
            body["suberror"] = suberror
        return body

    def _error_page(self, code: int, status: int = 400, **fmt: str) -> Response:
        text = _MESSAGES[code].format(**fmt)
        page = (
            "<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body>"
            "<h1>Sign in</h1><p>Sorry, but we're having trouble signing you in.</p>"
            f'<p id="error">AADSTS{code}: {html.escape(text)}</p>'
            f"<p>Request Id: {uuid.uuid4()}<br>Correlation Id: {uuid.uuid4()}<br>"
            f"Timestamp: {_now_text(self.tokens.clock())}</p></body></html>"
        )
        return Response(status, page)

    def _redirect(self, redirect_uri: str, params: dict[str, str], response_mode: str | None) -> Response:
        if response_mode == "form_post":
            inputs = "".join(
                f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>' for k, v in params.items()
            )
            page = (
                f'<html><head><title>Working...</title></head><body><form method="POST" '
                f'name="hiddenform" action="{html.escape(redirect_uri)}">{inputs}<noscript><p>Script is '
                f'disabled. Click Submit to continue.</p><input type="submit" value="Submit"/>'
                f"</noscript></form>"
                f"<script>document.forms[0].submit()</script></body></html>"
            )
            return Response(200, page)
        sep = "&" if "?" in redirect_uri else "?"
        return Response(302, b"", {"Location": f"{redirect_uri}{sep}{urlencode(params)}"})

    # ----------------------------------------------------------------- discovery
    def _openid_configuration(self, req: Request) -> Response:
        assert req.match is not None
        ref = self._resolve_tenant(req.match["tenant"])
        if ref is None:
            return Response(400, self._error_body("invalid_tenant", 90002, req, tenant=req.match["tenant"]))
        seg = ref.tid if ref.tid else ref.segment
        b = self.base_url
        issuer_tid = ref.tid or "{tenantid}"
        return Response(
            200,
            {
                "token_endpoint": f"{b}/{seg}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "jwks_uri": f"{b}/{seg}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{b}/{issuer_tid}/v2.0",
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{b}/{seg}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{b}/{seg}/oauth2/v2.0/devicecode",
                "http_logout_supported": True,
                "frontchannel_logout_supported": True,
                "end_session_endpoint": f"{b}/{seg}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub",
                    "iss",
                    "cloud_instance_name",
                    "cloud_instance_host_name",
                    "cloud_graph_host_name",
                    "msgraph_host",
                    "aud",
                    "exp",
                    "iat",
                    "auth_time",
                    "acr",
                    "nonce",
                    "preferred_username",
                    "name",
                    "tid",
                    "ver",
                    "at_hash",
                    "c_hash",
                    "email",
                ],
                "kerberos_endpoint": f"{b}/{seg}/kerberos",
                "tenant_region_scope": "EU" if ref.tid else None,
                "cloud_instance_name": "microsoftonline.com",
                "cloud_graph_host_name": "graph.windows.net",
                "msgraph_host": "graph.microsoft.com",
                "rbac_url": "https://pas.windows.net",
            },
        )

    def _keys(self, req: Request) -> Response:
        assert req.match is not None
        if self._resolve_tenant(req.match["tenant"]) is None:
            return Response(400, self._error_body("invalid_tenant", 90002, req, tenant=req.match["tenant"]))
        return Response(200, self.tokens.jwks())

    def _instance_discovery(self, req: Request) -> Response:
        host = self.base_url.split("://", 1)[1].split(":", 1)[0]
        return Response(
            200,
            {
                "tenant_discovery_endpoint": f"{self.base_url}/organizations/v2.0/.well-known/openid-configuration",
                "api-version": "1.1",
                "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
            },
        )

    # ----------------------------------------------------------------- authorize
    def _authorize(self, req: Request) -> Response:
        assert req.match is not None
        p = dict(req.query)
        if req.method == "POST":
            p.update(req.form())
        segment = req.match["tenant"]
        ref = self._resolve_tenant(segment)
        if ref is None:
            return self._error_page(90002, tenant=segment)
        client_id = p.get("client_id", "")
        redirect_uri = p.get("redirect_uri", "")
        bad_client = self._client_problem(client_id, redirect_uri, ref.tid or segment)
        if bad_client is not None:
            return bad_client
        state = p.get("state")
        response_mode = p.get("response_mode")

        def error_redirect(error: str, code: int, **fmt: str) -> Response:
            body = self._error_body(error, code, req, client_id=client_id, **fmt)
            params = {"error": error, "error_description": body["error_description"], "error_uri": body["error_uri"]}
            if state is not None:
                params["state"] = state
            return self._redirect(redirect_uri, params, response_mode)

        if p.get("response_type") != "code":
            return error_redirect("unsupported_response_type", 70000, detail="only response_type=code is simulated")
        graph, oidc, other = split_scopes(p.get("scope", ""))
        if not graph and not oidc and not other:
            return error_redirect("invalid_request", 70011)
        if other:
            return error_redirect(
                "invalid_scope", 500011, resource=other[0].rsplit("/", 1)[0], tenant=ref.tid or segment
            )
        method = p.get("code_challenge_method")
        if p.get("code_challenge") and (method or "plain") not in ("S256", "plain"):
            return error_redirect("invalid_request", 70000, detail="unsupported code_challenge_method")

        user = self._pick_user(p.get("login_hint"), ref)
        if user is None:
            return error_redirect("invalid_request", 50020, upn="(none)", user_tid="-", tenant=segment)
        if ref.tid is not None and user.tid != ref.tid:
            return error_redirect("invalid_request", 50020, upn=user.upn, user_tid=user.tid, tenant=ref.tid)
        fault = self._take_fault("authorize")
        if fault is not None and fault.kind == "access_denied":
            return error_redirect("access_denied", 65004)

        now = self.tokens.clock()
        code = "1.SIM-CODE." + secrets.token_urlsafe(48)
        with self._lock:
            needs_admin = user.tid in self._no_user_consent and not self._can_grant_tenant_wide(user.oid)
            if needs_admin and not set(graph) <= self._granted(user, client_id):
                refused = True
            else:
                refused = False
                if not needs_admin:
                    self._consents.setdefault((user.oid, client_id), set()).update(graph)  # auto-consent
        if refused:
            # Entra shows its "Need admin approval" page; with no admin-consent workflow the user's way back to the
            # app is this error (UNVERIFIED: the exact error name on the redirect).
            return error_redirect("access_denied", 90094)
        with self._lock:
            self._codes[code] = _Code(
                client_id=client_id,
                redirect_uri=redirect_uri,
                graph_scopes=graph,
                oidc_scopes=oidc,
                nonce=p.get("nonce"),
                code_challenge=p.get("code_challenge"),
                code_challenge_method=method,
                oid=user.oid,
                tid=user.tid,
                tenant_segment=segment,
                issued_at=now,
                auth_time=now,
                max_age=p.get("max_age"),
            )
            self.authorize_requests.append(
                {"at": now, "tenant": segment, "client_id": client_id, "oid": user.oid, "scope": " ".join(graph + oidc)}
            )
        params = {"code": code, "client_info": self._client_info(user)}
        if state is not None:
            params["state"] = state
        params["session_state"] = str(uuid.uuid5(uuid.NAMESPACE_OID, user.oid))
        return self._redirect(redirect_uri, params, response_mode)

    def _client_problem(self, client_id: str, redirect_uri: str, tenant: str) -> Response | None:
        """Entra's error page (no redirect) for an unknown client or an unregistered redirect URI."""
        if not client_id:
            return self._error_page(900144, param="client_id")
        if self.clients is not None and client_id not in self.clients:
            return self._error_page(700016, client_id=client_id, tenant=tenant)
        if not redirect_uri:
            return self._error_page(900144, param="redirect_uri")
        if self.clients is not None and redirect_uri not in self.clients[client_id][1]:
            return self._error_page(50011, redirect_uri=redirect_uri, client_id=client_id)
        return None

    # ----------------------------------------------------------------- admin consent (v2)
    def _admin_consent(self, req: Request) -> Response:
        """`GET /{tenant}/v2.0/adminconsent?client_id&scope&redirect_uri&state`: the signed-in administrator grants
        the scopes for the whole tenant. Success: `admin_consent=True&tenant=<tid>&scope=...&state=...`; a declined
        grant (fault "declined") `error=consent_required` (AADSTS65004); a user whose directory roles cannot grant
        tenant-wide consent `error=permission_denied` (UNVERIFIED: Entra shows its own page to such a user)."""
        assert req.match is not None
        p = dict(req.query)
        segment = req.match["tenant"]
        ref = self._resolve_tenant(segment)
        if ref is None or segment.lower() == "common":  # the v2 endpoint refuses `common`
            return self._error_page(90002, tenant=segment)
        client_id, redirect_uri = p.get("client_id", ""), p.get("redirect_uri", "")
        bad_client = self._client_problem(client_id, redirect_uri, ref.tid or segment)
        if bad_client is not None:
            return bad_client
        state = p.get("state")

        def back(params: dict[str, str]) -> Response:
            return self._redirect(redirect_uri, {**params, **({"state": state} if state is not None else {})}, None)

        def error(name: str, code: int, **fmt: str) -> Response:
            body = self._error_body(name, code, req, client_id=client_id, **fmt)
            return back({"admin_consent": "True", "error": name, "error_description": body["error_description"]})

        graph, _, other = split_scopes(p.get("scope", ""))
        if not graph or other:
            return error("invalid_request", 70011)
        if ".default" in graph:
            graph = [s for s in graph if s != ".default"] + list(STATIC_PERMISSIONS)
        user = self._pick_user(p.get("login_hint"), ref)
        if user is None:
            return error("invalid_request", 50020, upn="(none)", user_tid="-", tenant=segment)
        if ref.tid is not None and user.tid != ref.tid:
            return error("invalid_request", 50020, upn=user.upn, user_tid=user.tid, tenant=ref.tid)
        entry = {"at": self.tokens.clock(), "tenant": segment, "client_id": client_id, "oid": user.oid}
        fault = self._take_fault("adminconsent")
        if fault is not None and fault.kind == "declined":
            self.admin_consent_requests.append({**entry, "outcome": "declined"})
            return error("consent_required", 65004)
        if not self._can_grant_tenant_wide(user.oid):
            self.admin_consent_requests.append({**entry, "outcome": "permission_denied"})
            return back({"error": "permission_denied", "error_description": "The admin canceled the request"})
        with self._lock:
            self._admin_consents.setdefault((user.tid, client_id), set()).update(graph)
            self.admin_consent_requests.append({**entry, "outcome": "granted", "scope": " ".join(graph)})
        scope = " ".join(f"{GRAPH_RESOURCES[0]}/{s}" for s in dict.fromkeys(graph))
        return back({"admin_consent": "True", "tenant": user.tid, "scope": scope})

    def _pick_user(self, login_hint: str | None, ref: _TenantRef) -> SimUser | None:
        """login_hint if it names a user, else the user set by login_as, else the authority's first user."""
        users = [u for t in self.world.tenants for u in t.users]
        if login_hint:
            for u in users:
                if u.upn.lower() == login_hint.strip().lower():
                    return u
        with self._lock:
            nxt = self._next_user
        if nxt is not None:
            return self.world.user(nxt)
        if ref.tid is not None:
            return ref.users[0] if ref.users else (users[0] if users else None)
        return users[0] if users else None

    @staticmethod
    def _client_info(user: SimUser) -> str:
        return b64url(f'{{"uid":"{user.oid}","utid":"{user.tid}"}}'.encode())

    # ----------------------------------------------------------------- token
    def _token(self, req: Request) -> Response:
        assert req.match is not None
        form = req.form()
        grant_type = form.get("grant_type", "")
        entry: dict = {
            "at": self.tokens.clock(),
            "tenant": req.match["tenant"],
            "grant_type": grant_type,
            "client_id": form.get("client_id", ""),
            "scope": form.get("scope", ""),
            "oid": None,
        }
        resp = self._token_inner(req, form, grant_type, entry)
        entry["status"] = resp.status
        if isinstance(resp.body, dict):
            entry["error"] = resp.body.get("error")
            entry["error_codes"] = resp.body.get("error_codes", [])
        with self._lock:
            self.token_requests.append(entry)
        return resp

    def _token_inner(self, req: Request, form: dict[str, str], grant_type: str, entry: dict) -> Response:
        assert req.match is not None
        segment = req.match["tenant"]
        ref = self._resolve_tenant(segment)
        if ref is None:
            return Response(400, self._error_body("invalid_tenant", 90002, req, tenant=segment))
        client_id = form.get("client_id", "")
        secret = form.get("client_secret")
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
                client_id = client_id or cid
            except ValueError:
                pass
        if not client_id:
            return Response(400, self._error_body("invalid_request", 900144, req, param="client_id"))
        entry["client_id"] = client_id
        if self.clients is not None:
            if client_id not in self.clients:
                return Response(
                    400,
                    self._error_body(
                        "unauthorized_client", 700016, req, client_id=client_id, tenant=ref.tid or segment
                    ),
                )
            if secret is None and not form.get("client_assertion"):
                return Response(401, self._error_body("invalid_client", 7000218, req))
            if secret is not None and not secrets.compare_digest(secret, self.clients[client_id][0]):
                return Response(401, self._error_body("invalid_client", 7000215, req, client_id=client_id))

        fault = self._take_fault(grant_type)
        if fault is not None:
            return self._fault_response(fault, req, client_id)

        if grant_type == "authorization_code":
            return self._redeem_code(req, form, client_id, ref, entry)
        if grant_type == "refresh_token":
            return self._redeem_refresh_token(req, form, client_id, ref, entry)
        return Response(400, self._error_body("unsupported_grant_type", 70003, req, grant_type=grant_type))

    def _fault_response(self, fault: _Fault, req: Request, client_id: str) -> Response:
        now = self.tokens.clock()
        k = fault.kind
        if k == "revoked":
            return Response(
                400,
                self._error_body(
                    "invalid_grant", 50173, req, "bad_token", issued=_iso(now - 3600), valid_from=_iso(now)
                ),
            )
        if k == "inactive":
            return Response(
                400, self._error_body("invalid_grant", 700082, req, "bad_token", issued=_iso(now - RT_INACTIVITY_S))
            )
        if k == "mfa":
            body = self._error_body("invalid_grant", 50076, req, "basic_action")
            body["claims"] = '{"access_token":{"capolids":{"essential":true,"values":["sim-policy"]}}}'
            return Response(400, body)
        if k == "consent":
            return Response(400, self._error_body("invalid_grant", 65001, req, "consent_required", client_id=client_id))
        if k == "invalid_client":
            return Response(401, self._error_body("invalid_client", 7000215, req, client_id=client_id))
        if k == "server_error":
            return Response(500, self._error_body("server_error", 50000, req))
        if k == "unavailable":
            return Response(
                503, self._error_body("temporarily_unavailable", 90033, req), {"Retry-After": str(fault.retry_after)}
            )
        if k == "throttled":
            return Response(
                429, self._error_body("temporarily_unavailable", 50196, req), {"Retry-After": str(fault.retry_after)}
            )
        return Response(400, self._error_body("invalid_request", 9002313, req))

    def _scope_problem(self, req: Request, other: list[str], tenant: str) -> Response | None:
        if not other:
            return None
        resources = {s.rsplit("/", 1)[0] for s in other}
        if len(resources) > 1:
            return Response(400, self._error_body("invalid_scope", 28000, req, scope=" ".join(other)))
        return Response(400, self._error_body("invalid_scope", 500011, req, resource=resources.pop(), tenant=tenant))

    def _grant(
        self, req: Request, form: dict[str, str], param: str, grants: dict[str, _G], entry: dict
    ) -> _G | Response:
        """The code or refresh token the form's `param` names (caller holds the lock), or the error answer when it
        is missing or unknown; its user goes into the request log `entry`."""
        raw = form.get(param)
        if not raw:
            return Response(400, self._error_body("invalid_request", 900144, req, param=param))
        grant = grants.get(raw)
        if grant is None:
            return Response(400, self._error_body("invalid_grant", 9002313, req))
        entry["oid"] = grant.oid
        return grant

    def _redeemed_scopes(
        self,
        req: Request,
        form: dict[str, str],
        ref: _TenantRef,
        grant: _Code | _RefreshToken,
        client_id: str,
        *,
        nothing_is_default: bool,
    ) -> tuple[list[str], list[str]] | Response:
        """The (Graph, OIDC) scopes a redemption asks for: `.default` (or, with `nothing_is_default`, no Graph scope)
        means everything the user consented to the client; the error answer for a foreign resource's scope or one
        not consented."""
        graph, oidc, other = split_scopes(form.get("scope", ""))
        problem = self._scope_problem(req, other, ref.tid or ref.segment)
        if problem is not None:
            return problem
        consented = self._granted(grant, client_id)
        if (nothing_is_default and not graph) or ".default" in graph:
            graph = sorted(consented) or ["User.Read"]
        if any(s not in consented for s in graph):
            return Response(400, self._error_body("invalid_grant", 65001, req, "consent_required", client_id=client_id))
        return graph, oidc

    def _redeem_code(
        self, req: Request, form: dict[str, str], client_id: str, ref: _TenantRef, entry: dict
    ) -> Response:
        now = self.tokens.clock()
        with self._lock:
            code = self._grant(req, form, "code", self._codes, entry)
            if isinstance(code, Response):
                return code
            if code.used:
                return Response(400, self._error_body("invalid_grant", 54005, req))
            if now - code.issued_at > CODE_TTL_S:
                return Response(400, self._error_body("invalid_grant", 70008, req))
            if code.client_id != client_id:
                return Response(400, self._error_body("invalid_grant", 700005, req))
            if ref.tid is not None and ref.tid != code.tid:
                return Response(400, self._error_body("invalid_grant", 700005, req))
            if form.get("redirect_uri", "") != code.redirect_uri:
                return Response(
                    400,
                    self._error_body(
                        "invalid_grant",
                        70000,
                        req,
                        detail="The provided value for the input parameter 'redirect_uri' is not valid. The "
                        "expected value is a URI which matches a redirect URI registered for this client "
                        "application.",
                    ),
                )
            if code.code_challenge:
                verifier = form.get("code_verifier", "")
                if code.code_challenge_method == "S256":
                    computed = b64url(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
                else:
                    computed = verifier
                if not verifier or not secrets.compare_digest(computed, code.code_challenge):
                    return Response(400, self._error_body("invalid_grant", 501481, req))
            scopes = self._redeemed_scopes(req, form, ref, code, client_id, nothing_is_default=False)
            if isinstance(scopes, Response):
                return scopes
            graph, oidc = scopes
            code.used = True
            # What was consented on /authorize plus what the redemption asks for (already consented).
            graph_scopes = list(dict.fromkeys(code.graph_scopes + graph))
            oidc_scopes = list(dict.fromkeys(code.oidc_scopes + oidc))
        user = self.world.user(code.oid)
        return Response(
            200,
            self._issue(
                user,
                client_id,
                graph_scopes,
                oidc_scopes,
                code.nonce,
                code.auth_time if code.max_age is not None else None,
            ),
        )

    def _redeem_refresh_token(
        self, req: Request, form: dict[str, str], client_id: str, ref: _TenantRef, entry: dict
    ) -> Response:
        now = self.tokens.clock()
        with self._lock:
            rt = self._grant(req, form, "refresh_token", self._rts, entry)
            if isinstance(rt, Response):
                return rt
            if rt.client_id != client_id:
                return Response(
                    400,
                    self._error_body(
                        "invalid_grant", 70000, req, detail="the refresh token was issued to another client"
                    ),
                )
            revoked = self._revoked.get(rt.oid)
            if revoked is not None and rt.serial <= revoked[0]:
                code = revoked[1]
                if code == 700082:
                    return Response(
                        400, self._error_body("invalid_grant", 700082, req, "bad_token", issued=_iso(rt.issued_at))
                    )
                return Response(
                    400,
                    self._error_body(
                        "invalid_grant", code, req, "bad_token", issued=_iso(rt.issued_at), valid_from=_iso(revoked[2])
                    ),
                )
            if now - rt.issued_at > RT_INACTIVITY_S:
                return Response(
                    400, self._error_body("invalid_grant", 700082, req, "bad_token", issued=_iso(rt.issued_at))
                )
            if ref.tid is not None and ref.tid != rt.tid:
                return Response(400, self._error_body("invalid_grant", 700005, req))
            scopes = self._redeemed_scopes(req, form, ref, rt, client_id, nothing_is_default=True)
            if isinstance(scopes, Response):
                return scopes
            graph, oidc = scopes
        user = self.world.user(rt.oid)
        return Response(200, self._issue(user, client_id, graph, oidc, None, None))

    def _issue(
        self,
        user: SimUser,
        client_id: str,
        graph: list[str],
        oidc: list[str],
        nonce: str | None,
        auth_time: float | None,
    ) -> dict:
        now = self.tokens.clock()
        graph = sorted(graph, key=str.lower)
        ttl = self.access_token_ttl_s
        echo_oidc = [s for s in ("openid", "profile", "email") if s in oidc]
        out: dict = {
            "token_type": "Bearer",
            "scope": " ".join(graph + echo_oidc),
            "expires_in": ttl,
            "ext_expires_in": ttl,
            "access_token": self.tokens.issue_access_token(user.tid, user.oid, user.upn, graph, client_id, ttl),
        }
        if "offline_access" in oidc:
            with self._lock:
                self._rt_serial += 1
                rt = "1.SIM-RT." + secrets.token_urlsafe(64)
                self._rts[rt] = _RefreshToken(user.oid, user.tid, client_id, self._rt_serial, now)
            out["refresh_token"] = rt
        if "openid" in oidc:
            claims: dict = {
                "aud": client_id,
                "iss": f"{self.base_url}/{user.tid}/v2.0",
                "iat": int(now),
                "nbf": int(now),
                "exp": int(now) + 3600,
                "tid": user.tid,
                "sub": b64url(hashlib.sha256(f"{user.oid}|{client_id}".encode()).digest()),
                "ver": "2.0",
                "uti": b64url(uuid.uuid4().bytes),
                "sid": str(uuid.uuid5(uuid.NAMESPACE_OID, user.oid)),
            }
            if "profile" in oidc:
                claims.update(oid=user.oid, name=user.display_name, preferred_username=user.upn)
            if "email" in oidc:
                claims["email"] = user.upn
            with self._lock:
                roles = sorted(self._app_roles.get(user.oid, ()))
                wids = sorted(self._directory_roles.get(user.oid, ()))
            if roles:
                claims["roles"] = roles
            if wids:  # UNVERIFIED in ID tokens: Entra documents `wids` for access tokens (groupMembershipClaims)
                claims["wids"] = wids
            if nonce is not None:
                claims["nonce"] = nonce
            if auth_time is not None:
                claims["auth_time"] = int(auth_time)
            out["id_token"] = self.tokens.sign(claims)
        out["client_info"] = self._client_info(user)
        return out
