"""Sealed files (token caches, CRM secrets) and the key they are sealed with, under concurrency: threads and
processes writing and reading the same sealed file, and creating `secret.key` on a fresh data dir at once."""

from __future__ import annotations

import base64
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from o365sync.secrets import load_key, read_sealed, write_sealed
from o365sync.settings import Settings

OWNER = "tenant.user"
ROUNDS = 40
WORKERS = 8


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, token_key=None, _env_file=None)


def _write_and_read(
    data_dir: Path, worker: int, rounds: int, start: threading.Barrier | None = None
) -> tuple[str, list]:
    """Create (or read) the key, then write and read the one shared sealed file `rounds` times; (key, errors)."""
    if start is not None:
        start.wait()
    errors: list[str] = []
    try:
        key = load_key(_settings(data_dir))
    except Exception as exc:  # noqa: BLE001 - the test reports every failure
        return "", [f"load_key: {exc!r}"]
    path = data_dir / "tenants" / "t" / "connections" / "user.token"
    for n in range(rounds):
        try:
            write_sealed(path, key, OWNER, f"worker {worker} round {n}".encode())
            text = read_sealed(path, key, OWNER).decode()
            if not text.startswith("worker "):
                errors.append(f"read {text!r}")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
    return base64.b64encode(key).decode(), errors


def _leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_threads_creating_the_key_and_writing_one_sealed_file_at_once(tmp_path):
    for attempt in range(5):  # fresh data dirs: the key is created by whichever thread gets there first
        data_dir = tmp_path / f"data-{attempt}"
        start = threading.Barrier(WORKERS)
        with ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(lambda w, d=data_dir, s=start: _write_and_read(d, w, ROUNDS, s), range(WORKERS)))
        assert [e for _key, errors in results for e in errors] == []
        assert len({key for key, _ in results}) == 1
        assert base64.b64encode(load_key(_settings(data_dir))).decode() == results[0][0]
        assert _leftovers(data_dir) == []


def _process_worker(data_dir: str, worker: int, start) -> tuple[str, list]:  # noqa: ANN001 - a manager's Barrier
    start.wait()
    return _write_and_read(Path(data_dir), worker, ROUNDS)


@pytest.mark.slow
def test_processes_creating_the_key_and_writing_one_sealed_file_at_once(tmp_path):
    processes = 4
    context = multiprocessing.get_context("spawn")  # no fork of a threaded test process
    with context.Manager() as manager, context.Pool(processes) as pool:
        for attempt in range(3):
            data_dir = tmp_path / f"data-{attempt}"
            start = manager.Barrier(processes)
            results = pool.starmap(_process_worker, [(str(data_dir), w, start) for w in range(processes)])
            assert [e for _key, errors in results for e in errors] == []
            assert len({key for key, _ in results}) == 1
            assert base64.b64encode(load_key(_settings(data_dir))).decode() == results[0][0]
            assert _leftovers(data_dir) == []
            assert read_sealed(
                data_dir / "tenants" / "t" / "connections" / "user.token", load_key(_settings(data_dir)), OWNER
            ).startswith(b"worker ")


def test_sealed_files_and_the_key_are_private(tmp_path):
    key = load_key(_settings(tmp_path))
    path = tmp_path / "tenants" / "t" / "crm.secret"
    write_sealed(path, key, OWNER, b"secret")
    write_sealed(path, key, OWNER, b"secret 2")
    assert read_sealed(path, key, OWNER) == b"secret 2"
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()} == {
        "secret.key": 0o600,
        "crm.secret": 0o600,
        ".sealed.lock": 0o600,
    }
