"""docs/SIMULATORS.md's examples run: its ```python blocks, in order, as one session (the fixture example at the end
only defines a test function)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "SIMULATORS.md"


def test_the_examples_in_the_simulators_guide_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 6
    session: dict[str, object] = {"__name__": "simulators_guide"}
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"{DOC.name} example {number}", "exec"), session)
    finally:
        running = session.get("running")
        if running is not None:
            running.stop()  # type: ignore[attr-defined]
