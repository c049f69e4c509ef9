"""Comments and docs point only at documents a reader of the repository has: every `<name>.md` named in a *.py file
or in docs/*.md / README.md exists in the repo, and nothing points at a path on the machine it was written on."""

from __future__ import annotations

import re
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parent.parent
SKIP_DIRS = {"data", "node_modules", "__pycache__"}
URL = re.compile(r"\w+://\S+")
MD_NAME = re.compile(r"(?<![\w/.-])((?:\.\.?/)*[\w-]+(?:/[\w.-]+)*\.md)\b")
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|tmp/[\w-]+)/[\w./-]+")


def scanned_files(root: Path) -> list[Path]:
    """Every *.py file of the repository (outside hidden and generated folders), README.md and docs/*.md."""
    python = [
        p
        for p in root.rglob("*.py")
        if not any(part.startswith(".") or part in SKIP_DIRS for part in p.relative_to(root).parts[:-1])
    ]
    files = python + [root / "README.md", *root.glob("docs/*.md")]
    return sorted(p for p in files if p != THIS_FILE)  # this file's examples are dangling on purpose


def dangling_references(root: Path) -> list[str]:
    """`file:line: reference` for each `.md` name that resolves neither from the repo root, docs/ nor the file's folder,
    and each absolute path of a machine (e.g. /work/...)."""
    found = []
    for path in scanned_files(root):
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            text = URL.sub("", line)
            where = f"{path.relative_to(root)}:{number}"
            for name in MD_NAME.findall(text):
                if not any((folder / name).is_file() for folder in (root, root / "docs", path.parent)):
                    found.append(f"{where}: {name}")
            found += [f"{where}: {p}" for p in MACHINE_PATH.findall(text)]
    return found


def test_every_referenced_document_is_in_the_repo():
    assert dangling_references(ROOT) == []


def test_the_check_finds_references_to_documents_elsewhere(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("see docs/GUIDE.md and https://example.org/x/notes.md\n")
    (tmp_path / "docs" / "GUIDE.md").write_text("next: OTHER.md, then ../README.md\n")
    (tmp_path / "docs" / "OTHER.md").write_text("fine\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("# limits (graph.md §5.2)\n# see /work/shared/reference/msal.md\n")
    assert dangling_references(tmp_path) == [
        "pkg/mod.py:1: graph.md",
        "pkg/mod.py:2: /work/shared/reference/msal.md",
    ]


ERROR_NAME = re.compile(r"`([A-Z]\w*(?:Error|Needed|Exception))\b")


def test_every_exception_class_the_docs_name_exists():
    """Docs name exception classes (`UserSyncError`, ...); a renamed or removed class leaves them wrong."""
    named = {
        name for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md")] for name in ERROR_NAME.findall(doc.read_text())
    }
    source = "\n".join(p.read_text(encoding="utf-8") for p in scanned_files(ROOT) if p.suffix == ".py")
    assert sorted(n for n in named if not re.search(rf"^\s*class {n}\b", source, re.M)) == []
