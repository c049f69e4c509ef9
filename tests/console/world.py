"""A simulated world with the console served on loopback: three tenants (two registered here, one not), an admin by
app role in the first, an admin by directory role in the second, and reps. Shared by the HTTP and browser tests."""

from __future__ import annotations

import functools
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.demo import register_simulated_tenant
from app.import_trigger import IN_PROCESS
from app.web import run_in_thread
from o365sync.auth import ADMIN_APP_ROLE
from o365sync.http import ssl_context
from o365sync.settings import Settings
from simulators.identity import GLOBAL_ADMINISTRATOR
from simulators.running import RunningWorld, start_world
from simulators.world import SimUser, World, generate_world


@dataclass
class ConsoleWorld:
    settings: Settings
    running: RunningWorld
    world: World
    base: str  # http://localhost:<port>
    stop: object

    @property
    def admin(self) -> SimUser:  # tenant A, admin by app role
        return self.world.tenants[0].users[0]

    @property
    def rep(self) -> SimUser:  # tenant A
        return self.world.tenants[0].users[1]

    @property
    def other_rep(self) -> SimUser:  # tenant A
        return self.world.tenants[0].users[2]

    @property
    def admin_b(self) -> SimUser:  # tenant B, admin by directory role (Global Administrator)
        return self.world.tenants[1].users[0]

    @property
    def stranger(self) -> SimUser:  # a tenant that is not registered
        return self.world.tenants[2].users[0]

    def browser(self) -> httpx.Client:
        """A cookie-keeping client that follows redirects through the identity simulator (one 'browser')."""
        return httpx.Client(verify=ssl_context(self.settings), follow_redirects=True, trust_env=False, timeout=60)

    def sign_in(self, client: httpx.Client, user: SimUser) -> httpx.Response:
        self.running.identity.login_as(user.oid)
        return client.get(f"{self.base}/signin")


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def stand_up_console(
    tmp: Path, messages: int = 30, calendars: bool = False, import_on_connect: bool = False
) -> ConsoleWorld:
    """Three simulated tenants (two registered here) and the console on a free port. `import_on_connect`: a
    connect starts the user's import in a thread of the web server, as `o365sync web` does without Prefect."""
    world = generate_world(tenants=3, users_per_tenant=3, messages_per_user=messages, calendars=calendars)
    sock = free_socket()
    port = sock.getsockname()[1]
    redirect = f"http://localhost:{port}/auth/callback"
    running = start_world(world, tmp / "tls", redirect_uris=[redirect])
    env = running.settings_env(tmp / "data", redirect)
    settings = Settings(
        data_dir=Path(env["O365SYNC_DATA_DIR"]),
        authority_url=env["O365SYNC_AUTHORITY_URL"],
        graph_url=env["O365SYNC_GRAPH_URL"],
        ca_bundle=Path(env["O365SYNC_CA_BUNDLE"]),
        client_id=env["O365SYNC_CLIENT_ID"],
        client_secret=env["O365SYNC_CLIENT_SECRET"],  # type: ignore[arg-type]
        redirect_uri=redirect,
        connect_rate_limit="1000/minute",
    )
    for tenant in world.tenants[:2]:
        register_simulated_tenant(settings, running, tenant)
    running.identity.assign_app_role(world.tenants[0].users[0].oid, ADMIN_APP_ROLE)
    running.identity.assign_directory_role(world.tenants[1].users[0].oid, GLOBAL_ADMINISTRATOR)
    start_import = functools.partial(IN_PROCESS.start, settings) if import_on_connect else None
    _, stop = run_in_thread(settings, sock=sock, start_import=start_import)
    return ConsoleWorld(settings, running, world, f"http://localhost:{port}", stop)


def console_world(tmp_path_factory, name: str, **options: object) -> Iterator[ConsoleWorld]:  # noqa: ANN001
    """For a fixture to `yield from`: `stand_up_console(**options)` in a fresh folder, torn down after the test."""
    tmp = tmp_path_factory.mktemp(name)
    world = stand_up_console(tmp, **options)  # type: ignore[arg-type]
    yield world
    tear_down(world, tmp)


def tear_down(cw: ConsoleWorld, tmp: Path) -> None:
    cw.stop()  # type: ignore[operator]
    cw.running.stop()
    shutil.rmtree(tmp, ignore_errors=True)


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, "no CSRF field on the page"
    return found.group(1)
