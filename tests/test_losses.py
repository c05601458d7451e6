"""Loss options beyond the reference: same-caption positives, aligning-contrast-only ablation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import FIXTURES, require
from onepeace.checkpoint import load_pretrain_checkpoint
from onepeace.losses import contrastive_loss, denoising_contrast_loss
from onepeace.train.objectives import LossConfig
from onepeace.train.task import PretrainTask


def test_group_ids_all_distinct_equal_one_hot_targets():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(2.0)
    assert torch.allclose(contrastive_loss(a, b, scale), contrastive_loss(a, b, scale, group_ids=torch.arange(6)))


def test_same_caption_rows_are_positives():
    torch.manual_seed(0)
    b = F.normalize(torch.randn(4, 8), dim=-1)
    b[1] = b[0]  # two images with the same caption embedding
    a = b.clone()
    scale = torch.tensor(4.0)
    ids = torch.tensor([7, 7, 3, 5])
    a = a + 0.1 * torch.randn_like(a)  # same captions (near-identical embeddings), different images
    b = b + 0.05 * torch.randn_like(b)
    soft = contrastive_loss(a, b, scale, group_ids=ids)
    assert not torch.allclose(soft, contrastive_loss(a, b, scale))
    logits = torch.exp(scale) * a @ b.T
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(soft, expected)


def test_denoising_loss_is_a_mean_over_masked_units():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    pad = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    loss = denoising_contrast_loss(student, teacher, mask, pad, scale=2.5, label_smoothing=0.0)
    cand = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    t = F.normalize(torch.stack([teacher[i, j] for i, j in cand]), dim=-1)
    rows = [(0, 1), (0, 3), (1, 2)]
    s = F.normalize(torch.stack([student[i, j] for i, j in rows]), dim=-1)
    expected = F.cross_entropy(2.5 * s @ t.T, torch.tensor([0, 2, 5]))
    assert torch.allclose(loss, expected)


def test_contrast_only_ablation_skips_the_denoising_passes(monkeypatch):
    pm, _ = load_pretrain_checkpoint(require(FIXTURES / "official-pretrain-tiny" / "checkpoint.pt"))
    expected = torch.load(FIXTURES / "official-pretrain-tiny" / "expected.pt", weights_only=False)
    calls = []
    original = pm.decode
    monkeypatch.setattr(pm, "decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    weights = {"itc_loss": 1.0, "dcl_text_loss": 0.0, "dcl_image_loss": 0.0, "dcl_vl_text_loss": 0.0,
               "dcl_vl_image_loss": 0.0}
    losses = PretrainTask(pm, "vl", LossConfig(weights=weights))(expected["vl_sample"]["net_input"])
    assert calls == [] and set(losses) == {"itc_loss", "loss"}
    assert abs(float(losses["loss"]) - float(expected["losses"]["vl"]["itc_loss"])) < 1e-5
