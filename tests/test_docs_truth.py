"""What the docs and docstrings point at exists in this repository.

Three checks over the tracked files: no file cites the method summary that lives outside the
repository (the method is ``docs/method.md``), every ``docs/...`` path a file names exists, and
every module path in ``docs/architecture.md``'s package map exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".rst", ".toml", ".txt", ".cfg", ".yaml", ".yml", ".ini"}
# Written in two pieces so that this file does not cite it either.
OUTSIDE_METHOD_FILE = "METHOD" + ".md"
# A path under docs/ with a file extension, not part of a longer path (``shared/docs/...``).
DOCS_PATH = re.compile(r"(?<![\w/.-])docs/[\w/.-]*\w\.(?:md|rst|py|png|json|jsonl|log|txt)\b")


def _tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [
        ROOT / name
        for name in listed
        if name and Path(name).suffix in TEXT_SUFFIXES and (ROOT / name).is_file()
    ]


def _package_map_paths(text: str) -> list[str]:
    """The paths the package map's text block names, each joined to the folders above it.

    A line is ``<indent><path>[, <path> ...]  <description>``; a folder (``name/``) opens a
    level for the lines indented below it; a line indented as far as the descriptions is a
    continuation and names nothing.
    """
    section = text.split("## The package map", 1)[1]
    block = section.split("```text", 1)[1].split("```", 1)[0]
    entry = re.compile(r"^( *)([\w./-]+(?:, [\w./-]+)*)(?:\s{2,}|$)")
    stack: list[tuple[int, str]] = []
    paths: list[str] = []
    for line in block.splitlines():
        found = entry.match(line)
        if not found or len(found.group(1)) >= 20:
            continue
        indent = len(found.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        for name in found.group(2).split(", "):
            path = parent + name
            paths.append(path)
            if name.endswith("/"):
                stack.append((indent, path))
    return paths


def test_no_tracked_file_cites_the_outside_method_summary() -> None:
    citing = [
        str(path.relative_to(ROOT))
        for path in _tracked_text_files()
        if OUTSIDE_METHOD_FILE in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not citing, f"cite docs/method.md or the paper's section instead: {citing}"


def test_every_docs_path_named_in_a_tracked_file_exists() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in _tracked_text_files()
        if "docs/logs/" not in path.as_posix() and path != Path(__file__).resolve()
        for name in set(DOCS_PATH.findall(path.read_text(encoding="utf-8", errors="replace")))
        if not (ROOT / name).exists()
    )
    assert not missing, missing


def test_every_path_in_the_package_map_exists() -> None:
    paths = _package_map_paths((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    # The map covers every package and the modules this test was written against.
    for expected in (
        "mtp_core/_src/engine.py",
        "backends/torch/mtp_torch/training/state.py",
        "backends/torch/mtp_torch/integrations/stopping.py",
        "backends/torch/mtp_torch/cli/bench.py",
    ):
        assert expected in paths, f"the map parser missed {expected}: {paths}"
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_checks_can_fail() -> None:
    paths = _package_map_paths(
        "## The package map\n\n```text\nroot/          what\n  gone.py      nothing\n"
        "  sub/         a folder\n    a.py, b.py   two\n                 a continuation.py\n```\n"
    )
    assert paths == ["root/", "root/gone.py", "root/sub/", "root/sub/a.py", "root/sub/b.py"]
    assert DOCS_PATH.findall("see docs/nowhere.md and shared/docs/other.md") == ["docs/nowhere.md"]
