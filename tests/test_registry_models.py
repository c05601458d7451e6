"""Every named model x every registered modality (like timm's test_models): the same checks for each
pair, so a new size or a new modality file is tested without writing a test for it.

Numbers (finite outputs, gradients, save/load) run for the sizes small enough for a CPU test
(counted on the meta device, under SMALL_PARAMS); the bigger ones (one-peace-base, one-peace-4b) are
built on the meta device, where only their structure can be checked.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import onepeace
from onepeace.checkpoint import load_converted, released_key_map, save_converted
from onepeace.config import ModelConfig
from onepeace.registry import get_modality

SMALL_PARAMS = 30_000_000  # one-peace-small with every branch is ~13M; base ~290M
BATCH = 2  # two items: the audio and text examples then differ in length (padding is exercised)


def branch_config(model_name: str, kind: str) -> ModelConfig:
    """The named size with only the `kind` branch: its own adapter config if the size lists the
    kind, else the kind's default config on this encoder (e.g. video on any size)."""
    config = onepeace.get_config(model_name)
    adapter = config.adapters.get(kind) or get_modality(kind).config_cls()
    return dataclasses.replace(config, adapters={kind: adapter}, name=f"{model_name}-{kind}")


def n_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in onepeace.create_model(config, device="meta").parameters())


SMALL = [m for m in onepeace.list_models() if n_params(onepeace.get_config(m)) < SMALL_PARAMS]
CASES = [(m, k) for m in onepeace.list_models() for k in onepeace.list_modalities()]
SMALL_CASES = [(m, k) for m, k in CASES if m in SMALL]


def test_the_numeric_cases_cover_every_modality_and_at_least_two_sizes():
    assert {"one-peace-tiny", "one-peace-small"} <= set(SMALL) and "one-peace-4b" not in SMALL
    assert {k for _, k in SMALL_CASES} == set(onepeace.list_modalities()) >= {"text", "image", "audio", "video"}


def built(model_name: str, kind: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = onepeace.create_model(branch_config(model_name, kind))
    spec = get_modality(kind)
    assert spec.example is not None, f"modality {kind!r} registered no example inputs"
    return model, spec.example(model, BATCH)


@pytest.mark.parametrize("model_name,kind", CASES)
def test_builds_on_meta_with_a_released_name_for_every_parameter(model_name, kind):
    config = branch_config(model_name, kind)
    model = onepeace.create_model(config, device="meta")
    names = list(model.state_dict())
    assert any(n.startswith(f"adapters.{kind}.") for n in names) and f"projections.{kind}.weight" in names
    assert sum(f".ffn.{kind}." in n for n in names) > 0
    key_map = released_key_map(model)
    assert set(key_map) == set(names) and len(set(key_map.values())) == len(names)  # one-to-one
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("model_name,kind", SMALL_CASES)
def test_forward_is_finite_and_a_gradient_reaches_every_trainable_parameter(model_name, kind):
    model, inputs = built(model_name, kind)
    model.train()
    out = model(**inputs)
    emb, hidden = out.embeddings[kind], out.hidden_states[kind]
    assert emb.shape == (BATCH, model.config.encoder.embed_dim) and hidden.shape[0] == BATCH
    assert torch.isfinite(emb).all() and torch.isfinite(hidden).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
    # a contrastive-style loss (uses the temperature) plus every hidden state
    loss = (emb @ emb.T * model.temperature).logsumexp(-1).mean() + hidden.pow(2).mean()
    loss.backward()
    adapter = model.adapters[kind]
    unused = {f"adapters.{kind}.{n}" for n in type(adapter).UNUSED_IN_FORWARD}
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and n not in unused and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"{model_name}/{kind}: no gradient reaches {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"{model_name}/{kind}: non-finite gradients in {bad}"
    wrongly_declared = [n for n, p in model.named_parameters() if n in unused and p.grad is not None]
    assert not wrongly_declared, f"declared unused in forward but got a gradient: {wrongly_declared}"


@pytest.mark.parametrize("model_name,kind", SMALL_CASES)
def test_converted_folder_round_trip_is_bit_identical(model_name, kind, tmp_path):
    model, inputs = built(model_name, kind, seed=1)
    model.eval()
    save_converted(model, tmp_path / "m")
    loaded, report = load_converted(tmp_path / "m")
    assert loaded.config == model.config and not report.skipped_modalities
    before, after = model.state_dict(), loaded.state_dict()
    assert list(before) == list(after)
    differ = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not differ, f"changed by save/load: {differ}"
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    assert torch.equal(a.embeddings[kind], b.embeddings[kind])
    assert torch.equal(a.hidden_states[kind], b.hidden_states[kind])
