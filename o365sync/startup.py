"""What an o365sync process does first: make every file it will write private, and point Prefect into the data dir.

Every file of the product (stores, snapshots, exports, tokens, Prefect's database and logs) is readable by its own
OS user only: files 0600, folders 0700. Rather than a mode on each `open`/`mkdir` (DuckDB, Prefect and shutil create
files too), the process umask is set to 0o077 once, at start-up of every process that writes tenant files:

* the CLI (`app.cli`, on import): every command, including `web`, `demo` and `serve`; the Prefect server and
  the flow-run subprocesses that `serve` starts inherit the umask;
* `app.demo.run_demo` (also run by tests without the CLI);
* the `flows` package (`flows/__init__.py`): Prefect workers start flow runs without our CLI, but every flow run
  imports its flow from `flows.*` before it touches a file.

Data dirs written by versions before this one hold 0644 files in 0755 folders: `tighten_existing` removes the group
and other bits below a storage root once, when the root itself is still open to others (a root that is 0700 hides
everything below it, so this costs one `stat` per root afterwards).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

PRIVATE_UMASK = 0o077


def make_new_files_private() -> None:
    """From now on, files this process (and its children) creates are 0600 and folders 0700."""
    os.umask(PRIVATE_UMASK)


def tighten_existing(roots: Iterable[Path]) -> int:
    """Remove group/other permissions below each root that is ours and still open to others (a data dir of an
    earlier version); the root last, so an interrupted pass is repeated. Symlinks are not followed. Returns the
    number of paths changed."""
    changed = 0
    for root in roots:
        try:
            st = root.stat()
        except OSError:
            continue
        if st.st_uid != os.geteuid() or not stat.S_IMODE(st.st_mode) & 0o077:
            continue
        for folder, dirs, files in os.walk(root, topdown=False):
            for name in [*files, *dirs]:
                changed += _make_private(Path(folder, name))
        changed += _make_private(root)
    return changed


def _make_private(path: Path) -> int:
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode) or not stat.S_IMODE(st.st_mode) & 0o077:
            return 0
        path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
    except OSError:  # not ours, or gone meanwhile
        return 0
    return 1


def start_process() -> None:
    """Start-up of a CLI process, before anything imports Prefect: private files, Prefect's home (its database,
    result storage, logs) in `<data dir>/prefect`, and old files under the storage roots tightened."""
    from o365sync.prefect_env import configure_prefect_env, prefect_home_for
    from o365sync.settings import load_settings

    make_new_files_private()
    try:
        settings = load_settings()
    except Exception:  # noqa: BLE001 - a bad setting is reported by the command that needs it
        configure_prefect_env()
        return
    configure_prefect_env(prefect_home=str(prefect_home_for(settings.data_dir)))
    if changed := tighten_existing([settings.data_dir, *settings.regions.values()]):
        print(
            f"o365sync: made {changed} files and folders of an earlier version private (0600/0700) under "
            f"{settings.data_dir} and the region roots",
            file=sys.stderr,
        )
