"""The code blocks of README.md and docs/*.md run, so documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_doc_code_blocks_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python code blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"doc_{path.stem}"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path.name} block {i} failed:\n{block}") from exc


def test_docstring_examples_run():
    import doctest

    import attnkit
    import attnkit.integrations.transformers
    import attnkit.masks
    import attnkit.nn.kv_cache
    import attnkit.score_mods

    for mod in (
        attnkit,
        attnkit.masks,
        attnkit.score_mods,
        attnkit.nn.kv_cache,
        attnkit.integrations.transformers,
    ):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"doctest failures in {mod.__name__}"
        assert result.attempted > 0
