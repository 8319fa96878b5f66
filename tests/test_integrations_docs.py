"""The snippets of docs/integrations.md run as written (CPU, seconds)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_a_snippet_per_integration():
    text = "\n".join(BLOCKS)
    assert len(BLOCKS) == 4
    for needle in ("hf_optimizer_cls_and_kwargs", "lightning.Trainer", "accelerator.accumulate", "def tiny_llama"):
        assert needle in text


@pytest.mark.parametrize("index", range(1, len(BLOCKS)), ids=["hf-trainer", "lightning", "accelerate"])
def test_snippet_runs(index, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if "lightning" in BLOCKS[index]:
        pytest.importorskip("lightning")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(BLOCKS[0], f"{DOC}:prelude", "exec"), namespace)
        exec(compile(BLOCKS[index], f"{DOC}:block{index}", "exec"), namespace)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
