"""A Prefect API for scheduled work: the configured one, or a local `prefect server start` owned by this process.

Prefect's ephemeral API (what flows use when no PREFECT_API_URL is set) runs no scheduler, so schedules never fire
there. `ensure_prefect_api(settings)` therefore

* uses PREFECT_API_URL if it is set (environment, else the active Prefect profile) after checking `<url>/health`;
* otherwise starts `prefect server start --host 127.0.0.1 --port <port>` with PREFECT_HOME=`<data_dir>/prefect`
  (SQLite database, server log `server.log`), telemetry off and the SQLite ingest batch sizes raised (ingest is the
  bottleneck), waits for `/api/health`, points this process (and the flow-run subprocesses it starts) at it, and stops
  it on exit. A lock file in that PREFECT_HOME keeps a second local server off the same database.

`LocalPrefectServer` is that server process on its own (start, stop, start again), also used on PostgreSQL by
`deployments.postgres`. Every server started here gets `SERVER_ENV`: telemetry off, larger ingest batches, and
retention (finished flow runs with their logs and artifacts vacuumed after 14 days, events after 2; docs/OPERATIONS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from deployments.polling import wait_while
from o365sync.prefect_env import prefect_home_for
from o365sync.settings import Settings

DEFAULT_PORT = 4200
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 180.0  # fresh database: migrations took 18-23 s here, more on a loaded box
POLL_INTERVAL_S = 0.25
STOP_TIMEOUT_S = 20.0

SERVER_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    # SQLite ingest is the bottleneck; batch it (defaults 1/1/20/1).
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "500",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "200",
    # Retention: by default Prefect vacuums only events. Also delete finished flow runs (with
    # their task runs, states, logs and artifacts) two weeks after they ended, and orphans; events after 2 days
    # (heartbeats included); the vacuum service checks hourly.
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(14 * 86400),
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "3600",
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P2D",  # a timedelta (ISO 8601), not seconds
    "PREFECT_SERVER_SERVICES_DB_VACUUM_EVENT_RETENTION_OVERRIDES": json.dumps({"prefect.flow-run.heartbeat": 86400}),
}
"""Server settings applied unless the environment sets them already."""


class PrefectApiError(RuntimeError):
    pass


@dataclass(frozen=True)
class PrefectApi:
    api_url: str
    ui_url: str
    local: bool
    """True when this process started (and will stop) the server."""
    prefect_home: Path | None = None
    log_path: Path | None = None
    pid: int | None = None


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment, else from the active Prefect profile, else None."""
    if url := os.environ.get("PREFECT_API_URL", "").strip():
        return url
    with contextlib.suppress(Exception):
        from prefect.settings import PREFECT_API_URL
        from prefect.settings.profiles import load_current_profile

        if url := (load_current_profile().settings.get(PREFECT_API_URL) or ""):
            return str(url).strip() or None
    return None


def require_api_url(needed_by: str) -> str | None:
    """The configured API URL; without one, says on stderr that `needed_by` needs the server and returns None.

    The one line every command that talks to a Prefect server prints when none is configured."""
    if url := configured_api_url():
        return url
    print(f"PREFECT_API_URL is not set: {needed_by} the Prefect server (prefect server start).", file=sys.stderr)
    return None


def healthy(api_url: str, timeout: float = 5.0, *, local: bool = False) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if (key := os.environ.get("PREFECT_API_KEY")) else {}
    try:
        r = httpx.get(f"{api_url.rstrip('/')}/health", headers=headers, timeout=timeout, trust_env=not local)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def _port_free(port: int) -> bool:
    """Whether the server could listen on `port`. Probed the way uvicorn binds (SO_REUSEADDR), so a socket of the
    previous run lingering in TIME_WAIT does not count as "in use"; only a live listener does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pick_port(port: int | None, say: Callable[[str], None], default: int = DEFAULT_PORT) -> int:
    """`port` if given (in use: error); else `default`, or, when another program listens there, a free port
    announced with the reason (the UI address then differs from the usual one)."""
    if port:
        if not _port_free(port):
            raise PrefectApiError(
                f"port {port} on {HOST} is in use by another program; stop it or choose another --port"
            )
        return port
    if _port_free(default):
        return default
    other = _free_port()
    say(
        f"Port {default} on {HOST} is in use by another program, so the Prefect UI is on port {other} for this run "
        f"(free port {default}, or pass --port)."
    )
    return other


def _prefect_executable() -> list[str]:
    beside = Path(sys.executable).with_name("prefect")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "prefect"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the server gets SIGTERM if this process dies without cleaning up (SIGKILL, crash). ctypes is imported
    # by the parent: a child that switched to another OS user may not be able to read Python's files.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _server_lock(prefect_home: Path) -> Iterator[Path]:
    import fcntl

    path = prefect_home / "o365sync-server.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "another process"
            raise PrefectApiError(
                f"a local Prefect server for {prefect_home} is already running ({holder}); "
                f"stop it or point PREFECT_API_URL at it"
            ) from None
        yield path
    finally:
        os.close(fd)  # releases the lock


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # The server runs in its own session (so a terminal Ctrl-C reaches only us, and the runner can still pause its
    # schedules through the API before the server goes); signal that group.
    for sig, wait_s in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def use_api(api_url: str) -> Iterator[None]:
    """Point this process (settings context and environment, inherited by flow-run subprocesses) at `api_url`."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


@contextlib.contextmanager
def ensure_prefect_api(
    settings: Settings,
    *,
    port: int | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    echo: Callable[[str], None] | None = print,
) -> Iterator[PrefectApi]:
    """Yield a healthy Prefect API (see the module docstring); a server started here is stopped on exit.

    `port`: for a local server; default 4200, else (said so) any free port."""
    say = echo or (lambda _msg: None)
    if url := configured_api_url():
        url = url.rstrip("/")
        if not healthy(url, timeout=10.0):
            raise PrefectApiError(f"PREFECT_API_URL={url} does not answer {url}/health")
        api = PrefectApi(api_url=url, ui_url=_ui_url(url), local=False)
        say(f"Prefect API {url} (PREFECT_API_URL); UI {api.ui_url}")
        with use_api(url):
            yield api
        return

    prefect_home = prefect_home_for(settings.data_dir)
    prefect_home.mkdir(parents=True, exist_ok=True)
    with _server_lock(prefect_home) as lock_path:
        server = LocalPrefectServer(prefect_home, port=_pick_port(port, say), startup_timeout_s=startup_timeout_s)
        try:
            api = server.start(say)
            Path(lock_path).write_text(f"pid {api.pid}, {api.api_url}\n")
            with use_api(api.api_url):
                yield api
        finally:
            server.stop()
            with contextlib.suppress(OSError):
                Path(lock_path).write_text("")


class LocalPrefectServer:
    """One `prefect server start` (API, UI and every service in ONE process: splitting them needs Redis) on
    127.0.0.1, owned by this process: `start()` waits for `/api/health`, `stop()` stops it (SIGINT, then harder).
    It can be stopped and started again on the same port and database (a restart mid-cycle).

    `env`: extra server settings (e.g. PREFECT_SERVER_DATABASE_CONNECTION_URL for PostgreSQL); SERVER_ENV applies
    under them unless the environment sets a key already. The server's log is `<prefect_home>/server.log`."""

    def __init__(
        self,
        prefect_home: Path,
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.prefect_home = prefect_home
        self.port = port or _free_port()
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.log_path = prefect_home / "server.log"
        self.base = f"http://{HOST}:{self.port}"
        self.api_url = f"{self.base}/api"
        self._proc: subprocess.Popen[bytes] | None = None

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        for key, value in SERVER_ENV.items():
            env.setdefault(key, value)
        return (
            env
            | self.env
            | {
                "PREFECT_HOME": str(self.prefect_home),
                "PREFECT_SERVER_API_HOST": HOST,
                "PREFECT_SERVER_API_PORT": str(self.port),
                "PREFECT_SERVER_UI_API_URL": self.api_url,
            }
        )

    def start(self, say: Callable[[str], None] | None = None) -> PrefectApi:
        say = say or (lambda _msg: None)
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        say(
            f"Starting a local Prefect server on {self.base} "
            f"(PREFECT_HOME {self.prefect_home}, log {self.log_path}) ..."
        )
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            proc = self._proc = subprocess.Popen(
                [
                    *_prefect_executable(),
                    "server",
                    "start",
                    "--host",
                    HOST,
                    "--port",
                    str(self.port),
                    "--analytics-off",
                ],
                env=self._server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        try:

            def starting() -> bool:
                if healthy(self.api_url, timeout=2.0, local=True):
                    return False
                if proc.poll() is not None:
                    raise PrefectApiError(
                        f"the Prefect server exited with code {proc.returncode} during startup; "
                        f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                    )
                return True

            wait_while(
                starting,
                started + self.startup_timeout_s,
                lambda _: PrefectApiError(
                    f"the Prefect server was not healthy after {self.startup_timeout_s:.0f} s; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                ),
                POLL_INTERVAL_S,
            )
        except BaseException:
            self.stop()
            raise
        say(f"Prefect server ready after {time.monotonic() - started:.1f} s. UI: {self.base}  API: {self.api_url}")
        return self.api

    @property
    def api(self) -> PrefectApi:
        return PrefectApi(
            api_url=self.api_url,
            ui_url=self.base,
            local=True,
            prefect_home=self.prefect_home,
            log_path=self.log_path,
            pid=self._proc.pid if self._proc else None,
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None

    def __enter__(self) -> PrefectApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ui_url(api_url: str) -> str:
    """The UI address for an API URL: Prefect's PREFECT_UI_URL if set, else the API URL without its `/api`."""
    if ui := os.environ.get("PREFECT_UI_URL"):
        return ui.rstrip("/")
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url
