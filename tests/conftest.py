"""Shared paths and fixtures. The shared folder (fixtures, assets, BPE) sits beside the project; tests
that need it fail with a clear message when it is missing (CI always has it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("ONEPEACE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FIXTURES = SHARED / "fixtures"
ASSETS = SHARED / "assets"
BPE_DIR = Path(os.environ.get("ONEPEACE_BPE_DIR", SHARED / "official-bpe"))
TINY_CKPT = FIXTURES / "official-tiny" / "checkpoint.pt"


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: these tests need the project's shared folder at {SHARED} "
                                "(or set ONEPEACE_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    import onepeace

    return onepeace.load(require(TINY_CKPT))


def random_tiny_model():
    """The test size with the real vocabulary and seeded random weights (nudged away from the
    initialisation's zeros and ones so that every parameter matters), with the released tokenizer."""
    import onepeace

    torch.manual_seed(0)
    model = onepeace.create_model("one-peace-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.tokenizer = onepeace.get_tokenizer(require(BPE_DIR))
    return model


@pytest.fixture(scope="session")
def tiny_expected():
    return torch.load(require(FIXTURES / "official-tiny" / "expected.pt"), weights_only=True)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor, padding_mask: torch.Tensor | None = None) -> float:
    """max |a - b| / max |b|, over non-padding positions when a mask is given."""
    if padding_mask is not None:
        actual, expected = actual[~padding_mask], expected[~padding_mask]
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
