"""docs/adding-a-modality.md: its python blocks run as written, and its excerpts are the real code."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "adding-a-modality.md"
EXCERPT = re.compile(r"^# from (\S+)\n")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)


def test_tutorial_excerpts_are_verbatim_copies_of_the_real_files():
    excerpts = [b for b in python_blocks() if EXCERPT.match(b)]
    assert len(excerpts) >= 4
    for block in excerpts:
        source = (ROOT / EXCERPT.match(block).group(1)).read_text()
        body = EXCERPT.sub("", block, count=1)
        assert body in source, f"this tutorial excerpt is no longer in the file:\n{body}"


@pytest.fixture
def restored_registry():
    """The tutorial registers a toy 'sensor' modality: take it out again afterwards."""
    from onepeace import registry

    saved = dict(registry.MODALITIES)  # the one dict of modalities
    yield
    registry.MODALITIES.clear()
    registry.MODALITIES.update(saved)


def test_tutorial_code_runs_as_written(capsys, monkeypatch, restored_registry):
    module = types.ModuleType("adding_a_modality_tutorial")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    runnable = [b for b in python_blocks() if not EXCERPT.match(b)]
    assert len(runnable) >= 6
    namespace = module.__dict__
    for i, block in enumerate(runnable):
        try:
            exec(compile(block, f"{TUTORIAL.name}[python block {i}]", "exec"), namespace)
        except Exception as e:  # name the failing block
            pytest.fail(f"tutorial block {i} failed: {e!r}\n{block}")
    out = capsys.readouterr().out
    assert "['audio', 'image', 'text', 'video']" in out
    assert "('text', 'image', 'video')" in out and "torch.Size([2, 64])" in out
    losses = namespace["losses"]
    assert losses[-1] < losses[0]  # the video branch learned something in 5 steps
