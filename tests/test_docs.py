"""The documentation's snippets run: each ```python block of docs/migrating.md, against its peer
library when the block's first line names one (``# needs: trl``), skipped with the reason otherwise."""

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def snippets(path: Path):
    for i, code in enumerate(BLOCK.findall(path.read_text())):
        needs = re.match(r"# needs: (\w+)", code)
        yield pytest.param(code, needs.group(1) if needs else None, id=f"{path.stem}-{i}")


@pytest.mark.parametrize("code,needs", list(snippets(DOCS / "migrating.md")))
def test_snippet_runs(code, needs):
    if needs:
        try:
            importlib.import_module(needs)
        except ImportError as exc:  # not installed, or installed without its own dependencies
            pytest.skip(f"{needs} cannot be imported: {exc}")
    exec(compile(code, "docs/migrating.md", "exec"), {})
