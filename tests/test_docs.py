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


def readme_blocks() -> list[str]:
    return BLOCK.findall((DOCS.parent / "README.md").read_text())


def test_readme_snippets_run_as_printed(tmp_path, monkeypatch):
    """The README's Python blocks, in order, in one namespace that holds what they leave to the
    reader (models, a loader, an optimizer, token ids). The Hugging Face Trainer block needs a
    dataset and TrainingArguments (tests/integrations/test_hf.py covers it), the vocabulary-parallel
    block a process group (tests/loss/test_vocab_parallel.py covers it)."""
    import torch

    from kdfast.train.models import GPT, GPTConfig

    monkeypatch.chdir(tmp_path)  # the trainer block writes runs/x
    torch.manual_seed(0)
    vocab = 96
    teacher = GPT(GPTConfig(vocab, n_layer=1, n_head=2, d_model=32)).eval()
    student = GPT(GPTConfig(vocab, n_layer=1, n_head=2, d_model=16))
    input_ids = torch.randint(0, vocab, (2, 12))
    namespace = {
        "torch": torch, "teacher": teacher, "student": student,
        "loader": [{"input_ids": input_ids, "labels": input_ids}],
        "optimizer": torch.optim.SGD(student.parameters(), lr=1e-2),
        "student_hidden": torch.randn(24, 16, requires_grad=True), "teacher_hidden": torch.randn(24, 32),
        "labels": torch.randint(0, vocab, (24,)),
        "train_token_ids": torch.randint(0, vocab, (4000,)), "eval_token_ids": torch.randint(0, vocab, (1000,)),
    }
    blocks = [b for b in readme_blocks() if "TrainingArguments(...)" not in b and "group=tp_group" not in b]
    assert len(blocks) >= 4
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["summary"]["steps"] == 60
