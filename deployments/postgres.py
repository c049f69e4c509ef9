"""A private PostgreSQL cluster and a Prefect server on it, for development, CI, tests and benchmarks.

Production runs PostgreSQL as a service (docs/OPERATIONS.md); this module gives every test session or bench its own
throwaway cluster without a system service:

    with local_postgres() as pg:                        # initdb + postgres on a free 127.0.0.1 port
        with prefect_server_on_postgres(pg) as api:     # `prefect server start` (all services, one process)
            api.api_url                                 # http://127.0.0.1:<port>/api
    # both stopped (the server first), the cluster's directory removed if this call created it

    with prefect_stack() as stack:                      # the same in one call; stack.restart() restarts both
        stack.api_url, stack.pg.url

`LocalPostgres` and `LocalPrefectServer` also have `start()` / `stop()`, to restart either mid-test.

* The binaries are found on PATH (`initdb`, `pg_ctl` ...), else in the newest `/usr/lib/postgresql/<version>/bin`
  (Debian's `postgresql` package).
* PostgreSQL refuses to run as root: as root, `initdb` and `postgres` run as the `postgres` OS user (the Debian
  package creates it) and the cluster lives in a fresh `/tmp` directory owned by it (a directory under a root-only
  parent, such as pytest's tmp_path, would be unreachable for that user).
* The cluster listens on 127.0.0.1 only (its Unix socket in its own directory), with password authentication
  (scram-sha-256; a random password in `<root>/password`, private). Its superuser `prefect` owns the database
  `prefect`, so Prefect's migrations may create the `pg_trgm` extension.
* `url` is `postgresql+asyncpg://prefect:<password>@127.0.0.1:<port>/prefect`, for
  PREFECT_SERVER_DATABASE_CONNECTION_URL (alias PREFECT_API_DATABASE_CONNECTION_URL).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deployments.polling import wait_while
from deployments.prefect_server import (
    POLL_INTERVAL_S,
    LocalPrefectServer,
    PrefectApiError,
    _die_with_parent,
    _free_port,
    _tail,
)

HOST = "127.0.0.1"
DATABASE = "prefect"
SUPERUSER = "prefect"
SERVICE_USER = "postgres"
"""The OS user PostgreSQL runs as when this process is root."""
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class PostgresError(PrefectApiError):
    """PostgreSQL is missing, or would not initialise or start (one line saying what to do)."""


def postgres_bin_dir() -> Path:
    """The directory holding `initdb` and `postgres`: beside `initdb` on PATH, else the newest Debian one."""
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0],
    )
    if not versions:
        raise PostgresError(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
            "apt-get install -y postgresql"
        )
    return versions[-1]


def _run_as() -> str | None:
    """The OS user to run PostgreSQL as: None (this user) unless this process is root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root and there is no {SERVICE_USER!r} OS user to run it as: "
            "apt-get install -y postgresql creates it (or run as a non-root user)"
        ) from None
    return SERVICE_USER


class LocalPostgres:
    """A PostgreSQL cluster in `root` (created if missing; None: a fresh temporary directory, removed on `close`)."""

    def __init__(self, root: Path | None = None, *, port: int | None = None) -> None:
        self.user = _run_as()
        self.bin = postgres_bin_dir()
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="o365sync-pg-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._password_file = self.root / "password"

    @property
    def password(self) -> str:
        return self._password_file.read_text().strip()

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect's server takes (asyncpg driver)."""
        return f"postgresql+asyncpg://{SUPERUSER}:{self.password}@{HOST}:{self.port}/{DATABASE}"

    def _popen(self, args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            args,
            user=self.user,
            group=self.user,
            extra_groups=[] if self.user else None,
            cwd=self.root,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    def _chown(self, path: Path) -> None:
        if self.user:
            record = pwd.getpwnam(self.user)
            os.chown(path, record.pw_uid, record.pw_gid)

    def initdb(self) -> None:
        """Create the cluster unless it exists (a restarted cluster keeps its data)."""
        if (self.data / "PG_VERSION").exists():
            return
        self._chown(self.root)
        os.chmod(self.root, 0o700)
        if not self._password_file.exists():
            with open(os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_urlsafe(24) + "\n")
            self._chown(self._password_file)
        proc = self._popen(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                f"--pwfile={self._password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise PostgresError(f"initdb failed in {self.data}: {out.decode(errors='replace').strip()[-2000:]}")

    def start(self) -> str:
        """Start PostgreSQL (creating the cluster and the database if needed); returns `url`."""
        if self.running:
            return self.url
        self.initdb()
        with open(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
            self._chown(self.log_path)
            self._proc = self._popen(
                [
                    str(self.bin / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    f"listen_addresses={HOST}",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=off" if self._owns_root else "fsync=on",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        proc = self._proc

        def starting() -> bool:
            if self._ready():
                return False
            if proc.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited with code {proc.returncode} during startup; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            return True

        def not_ready(_: bool) -> PostgresError:
            self.stop()
            return PostgresError(f"PostgreSQL was not ready after {STARTUP_TIMEOUT_S:.0f} s; see {self.log_path}")

        wait_while(starting, time.monotonic() + STARTUP_TIMEOUT_S, not_ready, POLL_INTERVAL_S)
        self._create_database()
        return self.url

    def _psql(self, sql: str, database: str = "postgres") -> str:
        proc = subprocess.run(
            [str(self.bin / "psql"), "-h", HOST, "-p", str(self.port), "-U", SUPERUSER, "-d", database]
            + ["-v", "ON_ERROR_STOP=1", "-tAc", sql],
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGPASSWORD": self.password},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise PostgresError(f"psql failed ({sql!r}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _create_database(self) -> None:
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"):
            self._psql(f"CREATE DATABASE {DATABASE} OWNER {SUPERUSER}")

    def query(self, sql: str) -> str:
        """Run one SQL statement in the `prefect` database; its rows as psql's unaligned text."""
        return self._psql(sql, DATABASE)

    def _ready(self) -> bool:
        return (
            subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-d", "postgres"],
                capture_output=True,
                timeout=10,
            ).returncode
            == 0
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, *, immediate: bool = False) -> None:
        """Fast shutdown (SIGINT: connections ended, clean checkpoint); `immediate`: SIGQUIT, like a crash (the
        next start recovers from the WAL)."""
        if self._proc is None:
            return
        for sig in (signal.SIGQUIT if immediate else signal.SIGINT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            try:
                self._proc.wait(STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        self._proc = None

    def close(self) -> None:
        """Stop, and remove the cluster if this object created its directory."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def local_postgres(root: Path | None = None, *, port: int | None = None) -> Iterator[LocalPostgres]:
    """A running cluster (see LocalPostgres); stopped (and its temporary directory removed) on exit."""
    with LocalPostgres(root, port=port) as pg:
        yield pg


def postgres_server_env(pg: LocalPostgres) -> dict[str, str]:
    """The settings that put a Prefect server on `pg`."""
    return {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": pg.url,
        "PREFECT_API_DATABASE_CONNECTION_URL": pg.url,  # the older name, in case a profile sets it
    }


def prefect_server_on_postgres(
    pg: LocalPostgres,
    prefect_home: Path | None = None,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> LocalPrefectServer:
    """A `LocalPrefectServer` (not started: use it as a context manager, or `start()`) whose database is `pg`.

    `prefect_home`: the server's PREFECT_HOME (its log `server.log`); default `<pg.root>/prefect`. `env`: more
    server settings (they win over the retention and batch defaults of `deployments.prefect_server.SERVER_ENV`)."""
    home = prefect_home or pg.root / "prefect-home"
    return LocalPrefectServer(home, port=port, env=postgres_server_env(pg) | (env or {}))


@dataclass
class PrefectStack:
    """A PostgreSQL cluster and a Prefect server on it; each can be stopped and started again."""

    pg: LocalPostgres
    server: LocalPrefectServer

    @property
    def api_url(self) -> str:
        return self.server.api_url

    def restart(self, *, immediate: bool = False) -> None:
        """Stop the server and PostgreSQL (`immediate`: PostgreSQL as if it crashed), then start both again."""
        self.server.stop()
        self.pg.stop(immediate=immediate)
        self.pg.start()
        self.server.start()


@contextlib.contextmanager
def prefect_stack(
    root: Path | None = None, *, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[PrefectStack]:
    """`local_postgres(root)` plus `prefect_server_on_postgres` (on `port`, with `env`), both started; both stopped
    on exit, the server first."""
    with local_postgres(root) as pg:
        server = prefect_server_on_postgres(pg, port=port, env=env)
        with server:
            yield PrefectStack(pg, server)
