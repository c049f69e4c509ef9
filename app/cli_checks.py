"""What the command line checks before any side effect, and what people see when a command fails.

Every check raises `BadInput`: one line naming the cause and the fix. `OneLineErrors` (the Typer group class of
every command group) prints it as that one line with exit code != 0; usage errors become one line too, and any
other exception — a bug — prints one line saying where its details were logged (`<data dir>/logs/cli-errors.log`,
mode 0600) instead of a traceback. Checks only read: a store that does not exist is not created.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

# Typer vendors Click; its usage errors are not re-exported.
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from o365sync.settings import Settings

T = TypeVar("T")
error_console = Console(stderr=True)
ERROR_LOG = Path("logs") / "cli-errors.log"


class BadInput(Exception):
    """Bad input a person gave (or a state the command cannot act on): the message is one line with the cause
    and the fix; nothing was changed."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def say_error(message: str) -> None:
    """One line on stderr (never wrapped, never markup-interpreted)."""
    error_console.print(
        f"error: {' '.join(str(message).split())}", style="red", soft_wrap=True, markup=False, highlight=False
    )


def fail(message: str, exit_code: int = 1) -> typer.Exit:
    """Print `message` as the one error line and return the Exit to raise."""
    say_error(message)
    return typer.Exit(exit_code)


def _log_unexpected(exc: BaseException) -> str:
    """Append the traceback (no local variables) to the data dir's error log (0600 in a 0700 folder); returns
    where, or why it could not be written."""
    try:
        from o365sync.settings import load_settings

        path = load_settings().data_dir.absolute() / ERROR_LOG
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} o365sync {' '.join(sys.argv[1:2])}\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return f"details in {path}"
    except Exception as log_exc:  # noqa: BLE001 - the last resort must not fail itself
        return f"details could not be logged ({type(log_exc).__name__})"


class OneLineErrors(TyperGroup):
    """A command group whose failures reach people as one line: BadInput (exit code of the input), usage errors
    (exit 2, with the command's --help), anything unexpected (exit 1, details logged, no traceback)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BadInput as exc:
            raise fail(str(exc), exc.exit_code) from None
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            raise fail(f"{exc.format_message()} (see: {where} --help)", 2) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug, not bad input
            raise fail(f"unexpected {type(exc).__name__}: {exc}"[:300] + f" — {_log_unexpected(exc)}") from None


class _WithoutTraceback(logging.Formatter):
    """Prefect's console format minus the traceback: a failed run's log line still names the exception."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def run_flow(flow: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a Prefect flow for a command: Prefect's console log (the root logger's console handler) shows no
    tracebacks — the command ends with its own one line; the flow run in Prefect keeps its state message."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))
    return flow(*args, **kwargs)


def command_group(help: str) -> typer.Typer:  # noqa: A002
    return typer.Typer(help=help, no_args_is_help=True, cls=OneLineErrors, pretty_exceptions_enable=False)


# ------------------------------------------------------------------------------------------------ checks
def registered_tenant(settings: Settings, tenant_id: str):  # noqa: ANN201
    """The tenant's configuration, or BadInput if it is not registered (or its id is not a tenant id)."""
    from o365sync.tenants import TenantNotFound, load_tenant

    try:
        return load_tenant(settings, tenant_id)
    except TenantNotFound as exc:
        raise BadInput(f"{exc}; registered tenants: o365sync tenant list") from None
    except ValueError as exc:  # an unreadable tenant.json
        raise BadInput(f"tenant {tenant_id}: its configuration cannot be read ({type(exc).__name__})") from None


def only_tenant(settings: Settings, tenant_id: str | None):  # noqa: ANN201
    """`tenant_id`'s configuration; without one, the only registered tenant (BadInput if there are none or
    several)."""
    if tenant_id:
        return registered_tenant(settings, tenant_id)
    from o365sync.tenants import list_tenants

    tenants = list_tenants(settings)
    if len(tenants) != 1:
        raise BadInput(
            "no tenant is registered (o365sync tenant add)"
            if not tenants
            else f"{len(tenants)} tenants are registered: choose one with --tenant "
            f"({', '.join(t.id for t in tenants)})",
            2,
        )
    return tenants[0]


def object_id(settings: Settings, tenant_id: str, value: str) -> str:
    """A user object id that can name a file (no '/', '..', spaces; the rule of `auth.token_path`)."""
    from o365sync.auth import token_path

    try:
        token_path(settings, tenant_id, value)
    except ValueError:
        raise BadInput(f"{value!r} is not a user object id (letters, digits, '.', '_', '-'; max 64)", 2) from None
    return value


def has_store(settings: Settings, tenant_id: str) -> bool:
    from o365sync.store import store_path

    return store_path(settings, tenant_id).exists()


def read_store(settings: Settings, tenant_id: str, sql: str, params: list) -> list[tuple]:
    """Rows of a read-only query on the live store; [] if the tenant has no store (none is created)."""
    if not has_store(settings, tenant_id):
        return []
    from o365sync.store import open_store

    with open_store(settings, tenant_id, write=False) as con:
        return con.execute(sql, params).fetchall()


def known_user(settings: Settings, tenant, user_oid: str) -> str:  # noqa: ANN001
    """A user of the tenant: connected now, or with data or choices we keep (store rows, offboarding record,
    preferences, blocklist). BadInput "nothing matched" otherwise."""
    from o365sync.auth import connection_info, token_path
    from o365sync.offboarding import offboarding_status

    object_id(settings, tenant.id, user_oid)
    if token_path(settings, tenant.id, user_oid).exists() or connection_info(settings, tenant.id, user_oid):
        return user_oid
    if (
        user_oid in tenant.user_preferences
        or user_oid in tenant.user_blocklists
        or user_oid in offboarding_status(settings, tenant.id)
    ):
        return user_oid
    held = read_store(
        settings,
        tenant.id,
        "SELECT 1 FROM sync_state WHERE tenant_id = ? AND user_oid = ? UNION ALL "
        "SELECT 1 FROM emails WHERE tenant_id = ? AND user_oid = ? UNION ALL SELECT 1 FROM meetings "
        "WHERE tenant_id = ? AND user_oid = ? LIMIT 1",
        [tenant.id, user_oid] * 3,
    )
    if held:
        return user_oid
    raise BadInput(
        f"nothing matched: user {user_oid} never connected to tenant {tenant.id} and has no data there "
        f"(connected users: o365sync tenant show {tenant.id})"
    )


def connected_user(settings: Settings, tenant, user_oid: str) -> str:  # noqa: ANN001
    """A user with a stored token (commands that call Graph for them)."""
    from o365sync.auth import token_path

    object_id(settings, tenant.id, user_oid)
    if not token_path(settings, tenant.id, user_oid).exists():
        known_user(settings, tenant, user_oid)  # "nothing matched" for a stranger
        raise BadInput(
            f"user {user_oid} of tenant {tenant.id} is not connected: they must reconnect (/connect?tenant={tenant.id})"
        )
    return user_oid


def crm_configured(settings: Settings, tenant) -> None:  # noqa: ANN001
    """The tenant's CRM can be read at all: a files CRM has an existing directory, an API CRM its secrets."""
    from o365sync.tenants import load_crm_secrets

    fix = f"(o365sync tenant show {tenant.id}; change it with o365sync tenant)"
    if tenant.crm_kind == "files":
        folder = tenant.crm.directory if tenant.crm else None
        if not folder:
            raise BadInput(f"tenant {tenant.id}: its CRM is 'files' but no CRM directory is configured {fix}")
        if not Path(folder).is_dir():
            raise BadInput(f"tenant {tenant.id}: the CRM directory {folder} does not exist or is not a folder {fix}")
        return
    if tenant.crm is None or not tenant.crm.login_url:
        raise BadInput(f"tenant {tenant.id}: no {tenant.crm_kind} connection is configured {fix}")
    needed = {"salesforce": "refresh_token", "hubspot": "access_token", "pipedrive": "api_token"}[tenant.crm_kind]
    if not load_crm_secrets(settings, tenant.id).get(needed):
        raise BadInput(f"tenant {tenant.id}: the {tenant.crm_kind} {needed.replace('_', ' ')} is not stored {fix}")


def new_folder_destination(path: Path) -> Path:
    """A folder we may create: it does not exist yet and its nearest existing parent is a folder we can write
    in (probed by creating and removing a temporary folder there, so read-only and virtual file systems fail
    here and not half way)."""
    path = path.expanduser().absolute()
    if path.exists() or path.is_symlink():
        raise BadInput(f"{path} already exists: give a new folder", 2)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadInput(f"cannot create {path}: {parent} is not a folder", 2)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".o365sync-probe-", dir=parent))
    except OSError as exc:
        raise BadInput(
            f"cannot write to {path}: {exc.strerror or type(exc).__name__} in {parent}; "
            "choose a folder you can write to",
            2,
        ) from None
    return path
