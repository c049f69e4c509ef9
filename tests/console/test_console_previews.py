"""The console's preview runs beside the request (`app/console/previews.py`): one per user at a time, a bounded
number at once, kept for a while after it ends, failures as one sentence. Plain threads and events, no sleeps."""

from __future__ import annotations

import logging
import threading

import pytest

from app.console.previews import Previews


class Gate:
    """A preview maker that blocks until released, recording who it started for."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.entered = threading.Semaphore(0)
        self.release: dict[tuple[str, str], threading.Event] = {}

    def __call__(self, tenant_id: str, oid: str) -> dict:
        key = (tenant_id, oid)
        self.started.append(key)
        gate = self.release.setdefault(key, threading.Event())
        self.entered.release()
        assert gate.wait(30)
        return {"users": [{"oid": oid}], "run": len(self.started)}

    def open(self, tenant_id: str, oid: str) -> None:
        self.release.setdefault((tenant_id, oid), threading.Event()).set()


def test_a_second_click_while_it_runs_shows_the_same_run_and_a_click_after_it_ends_starts_anew() -> None:
    gate = Gate()
    previews = Previews(gate)
    first = previews.start("t1", "u1")
    assert gate.entered.acquire(timeout=30)
    assert previews.start("t1", "u1") is first and previews.get("t1", "u1") is first
    assert not first.finished.is_set() and first.result is None
    gate.open("t1", "u1")
    assert first.finished.wait(30)
    assert first.result == {"users": [{"oid": "u1"}], "run": 1} and first.finished_at is not None
    gate.release.clear()
    gate.open("t1", "u1")
    again = previews.start("t1", "u1")
    assert again is not first and again.finished.wait(30) and again.result["run"] == 2
    assert gate.started == [("t1", "u1"), ("t1", "u1")]


def test_users_and_tenants_are_kept_apart_and_only_at_once_run_together() -> None:
    gate = Gate()
    previews = Previews(gate, at_once=1)
    a = previews.start("t1", "u1")
    assert gate.entered.acquire(timeout=30)
    b = previews.start("t2", "u1")  # the same oid in another tenant is another preview
    assert previews.get("t2", "u1") is b and previews.get("t1", "u1") is a and previews.get("t1", "u2") is None
    assert not gate.entered.acquire(timeout=0.2)  # b waits for the only slot (a bounded check, not a sleep)
    assert gate.started == [("t1", "u1")]
    gate.open("t2", "u1")
    gate.open("t1", "u1")
    assert a.finished.wait(30) and b.finished.wait(30)
    assert gate.started == [("t1", "u1"), ("t2", "u1")]


def test_a_finished_preview_is_forgotten_after_keep_s() -> None:
    now = [1000.0]
    gate = Gate()
    gate.open("t1", "u1")
    previews = Previews(gate, keep_s=60, clock=lambda: now[0])
    run = previews.start("t1", "u1")
    assert run.finished.wait(30)
    now[0] += 59
    assert previews.get("t1", "u1") is run
    now[0] += 2
    assert previews.get("t1", "u1") is None


def test_a_failing_preview_ends_with_one_sentence_and_logs_only_the_class(caplog: pytest.LogCaptureFixture) -> None:
    def fails(tenant_id: str, oid: str) -> dict:
        raise RuntimeError("subject: secret deal terms")

    with caplog.at_level(logging.WARNING, logger="o365sync.console"):
        run = Previews(fails).start("t1", "u1")
        assert run.finished.wait(30)
    assert run.result == "The preview could not be made right now. Try again later."
    assert "RuntimeError" in caplog.text and "secret" not in caplog.text
