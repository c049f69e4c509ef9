"""The DuckDB store: idempotent batches, cursor atomicity, cross-process locking, published snapshots."""

from __future__ import annotations

import ast
import multiprocessing
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

import o365sync.store as store_package
from o365sync.settings import Settings
from o365sync.store import (
    FolderCursor,
    MailBatch,
    open_store,
    publish_snapshot,
    read_cursors,
    snapshot_path,
    write_mail_batch,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)
TS = pl.Datetime("us", "UTC")


def make_batch(ids: list[str], watermark: datetime, subject: str = "s") -> MailBatch:
    n = len(ids)
    emails = pl.DataFrame(
        {
            "graph_id": ids,
            "folder": ["inbox"] * n,
            "internet_message_id": [f"<{i}>" for i in ids],
            "conversation_id": ["c"] * n,
            "subject": [subject] * n,
            "body_text": ["b"] * n,
            "from_name": ["n"] * n,
            "from_address": ["a@acme.com"] * n,
            "received_at": [T0] * n,
            "sent_at": [T0] * n,
            "has_attachments": [False] * n,
            "web_link": ["w"] * n,
        },
        schema_overrides={"received_at": TS, "sent_at": TS},
    )
    participants = pl.DataFrame(
        {"graph_id": ids, "role": ["from"] * n, "name": ["n"] * n, "address": ["a@acme.com"] * n}
    )
    matches = pl.DataFrame(
        {
            "graph_id": ids,
            "crm_id": ["a1"] * n,
            "crm_kind": ["account"] * n,
            "matched_address": ["a@acme.com"] * n,
            "is_primary": [True] * n,
        }
    )
    return MailBatch(emails, participants, matches, {"inbox": FolderCursor(T0, received_watermark=watermark)})


def counts(con) -> tuple[int, int, int]:
    return tuple(
        con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
        for t in ("emails", "email_participants", "email_crm_matches")
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def test_batches_are_idempotent_and_deduplicated(settings):
    with open_store(settings, "t1", write=True) as con:
        assert write_mail_batch(con, "t1", "u1", make_batch(["m1", "m2", "m2"], T0)).imported == 2
        assert write_mail_batch(con, "t1", "u1", make_batch(["m1", "m2"], T0, subject="edited")).imported == 0
        assert counts(con) == (2, 2, 2)
        assert con.execute("SELECT DISTINCT subject FROM emails").fetchall() == [("edited",)]
        # Same Graph id for another user is a different row (keyed on tenant, user, id).
        assert write_mail_batch(con, "t1", "u2", make_batch(["m1"], T0)).imported == 1
        assert counts(con) == (3, 3, 3)


def test_cursor_moves_only_with_its_rows(settings):
    with open_store(settings, "t1", write=True) as con:
        write_mail_batch(con, "t1", "u1", make_batch(["m1"], T0))
        broken = make_batch(["m2"], T0 + timedelta(days=1))
        broken = MailBatch(broken.emails, broken.participants.drop("role"), broken.matches, broken.cursors)
        with pytest.raises(duckdb.Error):
            write_mail_batch(con, "t1", "u1", broken)
        assert counts(con) == (1, 1, 1)
        assert read_cursors(con, "t1", "u1")["inbox"].received_watermark == T0


def test_connections_are_utc(settings):
    with open_store(settings, "t1", write=True) as con:
        assert con.execute("SELECT current_setting('TimeZone')").fetchall()[0][0] == "UTC"


def _writer(data_dir: str, worker: int, batches: int) -> None:
    s = Settings(data_dir=Path(data_dir))
    for b in range(batches):
        with open_store(s, "t1", write=True) as con:
            write_mail_batch(con, "t1", f"u{worker}", make_batch([f"m{b}-{i}" for i in range(50)], T0))


def _reader(data_dir: str, reads: int) -> None:
    s = Settings(data_dir=Path(data_dir))
    for _ in range(reads):
        with open_store(s, "t1", write=False) as con:
            con.execute("SELECT count(*) FROM emails").fetchall()


@pytest.mark.slow
def test_concurrent_processes_queue_instead_of_failing(settings):
    with open_store(settings, "t1", write=True):
        pass
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(settings.data_dir), w, 8)) for w in range(3)]
    procs.append(ctx.Process(target=_reader, args=(str(settings.data_dir), 20)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with open_store(settings, "t1", write=False) as con:
        assert counts(con) == (3 * 8 * 50,) * 3


def _read_snapshot(path: str, queue) -> None:
    with duckdb.connect(path, read_only=True) as con:
        queue.put(con.execute("SELECT count(*) FROM emails").fetchall()[0][0])


@pytest.mark.slow
def test_analysts_read_the_snapshot_while_a_writer_holds_the_live_store(settings):
    with open_store(settings, "t1", write=True) as con:
        write_mail_batch(con, "t1", "u1", make_batch(["m1", "m2"], T0))
    target = publish_snapshot(settings, "t1")
    assert target == snapshot_path(settings, "t1")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with open_store(settings, "t1", write=True) as con:
        write_mail_batch(con, "t1", "u1", make_batch(["m3"], T0))
        reader = ctx.Process(target=_read_snapshot, args=(str(target), queue))
        reader.start()
        reader.join(60)
    assert reader.exitcode == 0 and queue.get(timeout=5) == 2


def test_the_store_never_imports_analytics():
    """analytics builds on the store (snapshots, exports); the store must not import it back (no import cycle)."""
    code = "import sys, o365sync.store; print(sorted(m for m in sys.modules if m.startswith('o365sync.analytics')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for module in Path(store_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("o365sync.analytics") for n in names), module.name


def test_every_name_imported_from_the_store_package_is_exported():
    """The package split keeps `from o365sync.store import X` working wherever the product or its tests use it."""
    root = Path(__file__).resolve().parent.parent
    wanted = set()
    for folder in ("o365sync", "tasks", "flows", "deployments", "crm_adapters", "tests", "bench"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == "o365sync.store":
                    wanted |= {a.name for a in node.names}
    assert wanted, "no import of o365sync.store found"
    assert sorted(n for n in wanted if not hasattr(store_package, n)) == []
    assert set(store_package.__all__) >= wanted
