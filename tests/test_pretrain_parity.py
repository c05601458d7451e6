"""Pretraining parity with the published code: official-pretrain-tiny losses and gradient norm."""
from __future__ import annotations

import pytest
import torch

from conftest import FIXTURES, require
from onepeace.checkpoint import load_pretrain_checkpoint
from onepeace.train.objectives import LossConfig, audio_language_losses, vision_language_losses
from onepeace.train.task import PretrainTask

REFERENCE = LossConfig(contrast_gather="reference")  # other side detached, one process


@pytest.fixture(scope="module")
def pretrain():
    pm, report = load_pretrain_checkpoint(require(FIXTURES / "official-pretrain-tiny" / "checkpoint.pt"))
    expected = torch.load(FIXTURES / "official-pretrain-tiny" / "expected.pt", weights_only=False)
    return pm.train(), expected


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("task", ["vl", "al"])
def test_every_loss_component_matches(pretrain, task):
    pm, expected = pretrain
    batch = expected[f"{task}_sample"]["net_input"]
    losses = (vision_language_losses if task == "vl" else audio_language_losses)(pm, batch, REFERENCE)
    ref = expected["losses"][task]
    assert set(ref) == set(losses)
    for name, value in ref.items():
        err = _rel(float(losses[name]), float(value))
        print(f"{task} {name}: ours {float(losses[name]):.7f} reference {float(value):.7f} rel err {err:.2e}")
        assert err <= 1e-4, name


def test_vl_gradient_norm_matches(pretrain):
    pm, expected = pretrain
    pm.zero_grad(set_to_none=True)
    losses = PretrainTask(pm, "vl", REFERENCE)(expected["vl_sample"]["net_input"])
    losses["loss"].backward()
    norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in pm.parameters() if p.grad is not None)).item()
    err = _rel(norm, float(expected["losses"]["vl_grad_norm"]))
    print(f"vl grad norm: ours {norm:.7f} reference {float(expected['losses']['vl_grad_norm']):.7f} rel err {err:.2e}")
    assert err <= 1e-3
    pm.zero_grad(set_to_none=True)


def test_scalable_gather_has_the_same_value_on_one_process(pretrain):
    pm, expected = pretrain
    with torch.no_grad():
        a = PretrainTask(pm, "vl", REFERENCE)(expected["vl_sample"]["net_input"])
        b = PretrainTask(pm, "vl", LossConfig())(expected["vl_sample"]["net_input"])
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-6)


def test_the_task_owns_the_objective_and_the_model_state(pretrain):
    pm, expected = pretrain
    task = PretrainTask(pm, "al", REFERENCE)
    # what DDP/FSDP wrap holds exactly the model's tensors, under 'model.'
    assert list(task.state_dict()) == [f"model.{k}" for k in pm.state_dict()]
    with torch.no_grad():
        losses = task(expected["al_sample"]["net_input"])
    assert abs(float(losses["atc_loss"]) - float(expected["losses"]["al"]["atc_loss"])) <= 1e-4 * abs(
        float(expected["losses"]["al"]["atc_loss"]))
    with pytest.raises(ValueError, match="unknown pretraining task 'xx'"):
        PretrainTask(pm, "xx")
    with pytest.raises(TypeError, match="PretrainTask"):
        pm(expected["al_sample"]["net_input"])
