"""Packed CPU inference (oneDNN-packed linear weights) is an explicit conversion: `to_packed` swaps the
encoder's nn.Linear layers for inference-only PackedLinear layers, `to_dense` swaps them back. Same
numbers; every reachable Parameter holds real values; training, gradients and dtype changes are
refused with a clear error; state dict, deepcopy and pickle see dense weights; and on a CPU that
cannot pack a dtype the layers stay plain."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector

import onepeace
from conftest import TINY_CKPT, fixture_embedding_errors, max_rel_error, random_tiny_model
from onepeace.modeling import packed as packed_module
from onepeace.modeling.packed import PackedLinear, cpu_can_pack

pytestmark = pytest.mark.skipif(not cpu_can_pack(torch.float32), reason="this torch build has no oneDNN")

TEXT = torch.tensor([[5, 6, 7, 2, 1], [8, 9, 10, 11, 2]])


def text_embedding(model, **parameters):
    with torch.inference_mode():
        if parameters:
            return functional_call(model, parameters, (), {"text": TEXT}).embeddings["text"]
        return model(text=TEXT).embeddings["text"]


def linears(module):
    """(packed, plain) linear layers under `module`."""
    mods = list(module.modules())
    return ([m for m in mods if isinstance(m, PackedLinear)], [m for m in mods if isinstance(m, nn.Linear)])


@pytest.fixture(scope="module")
def loaded():
    return onepeace.load(TINY_CKPT)


def test_capability_is_asked_per_dtype_once(monkeypatch):
    real = torch.ops.mkldnn._is_mkldnn_bf16_supported
    asked = []
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: asked.append(1) or real())
    cpu_can_pack.cache_clear()
    assert cpu_can_pack(torch.float32)
    assert all(cpu_can_pack(torch.bfloat16) == real() for _ in range(3))
    assert asked == [1]  # oneDNN asked once, then the answer is cached
    assert not cpu_can_pack(torch.float16)  # never packed (untested oneDNN path)


def test_load_packs_on_cpu_and_the_fixture_still_matches(loaded, tiny_expected):
    plain = onepeace.load(TINY_CKPT, pack=False)
    assert loaded.is_packed and not plain.is_packed and not loaded.training
    packed, dense = linears(loaded.encoder)
    assert len(packed) == 3 * 4 + 3 * 3 * 3 and not dense  # 3 layers: q/k/v/out + 3 experts x (wi_0, wi_1, fc_out)
    for m, err in fixture_embedding_errors(loaded, tiny_expected).items():
        print(f"packed weights {m}_embed vs fixture: {err:.1e}")
        assert err <= 1e-5


def test_packed_and_dense_give_the_same_numbers_and_to_dense_is_bit_identical():
    model = random_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = text_embedding(model)
    for name, p in model.named_parameters():
        p.requires_grad_(".audio." not in name)
    model.to_packed()
    assert model.is_packed and not hasattr(model.encoder.layers[0].attn.q_proj, "weight")
    packed_state = model.state_dict()
    assert list(packed_state) == list(state)  # the same keys, in the same order
    assert all(torch.equal(packed_state[k], v) for k, v in state.items())  # the reorder is lossless
    err = max_rel_error(text_embedding(model), before)
    print(f"packed vs dense text embedding: {err:.1e}")
    assert 0 < err <= 1e-5  # really another kernel, same numbers
    assert not any(p.requires_grad for p in model.parameters())  # an inference model: frozen
    model.to_dense()
    assert not model.is_packed and not linears(model)[0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the requires_grad flags of before packing come back (the audio branch was frozen then)
    assert all(p.requires_grad == (".audio." not in n) for n, p in model.named_parameters())
    assert torch.equal(text_embedding(model), before)


def test_every_reachable_parameter_holds_real_values(loaded):
    params = dict(loaded.named_parameters())
    assert "encoder.layers.0.attn.q_proj.bias" in params  # the bias stays a real Parameter
    assert "encoder.layers.0.attn.q_proj.weight" not in params  # no weight Parameter pretending
    for name, p in params.items():
        assert torch.isfinite(p.sum()), name
    assert torch.isfinite(parameters_to_vector(loaded.parameters()).norm())
    with torch.no_grad():
        twin = copy.deepcopy(loaded)
        for p in twin.parameters():
            p.mul_(2.0)  # in place, as an optimiser or a weight average does
    assert all(torch.equal(a * 2, b) for a, b in zip(loaded.parameters(), twin.parameters()))


def test_functional_call_with_substituted_parameters_changes_the_output(loaded):
    ref = text_embedding(loaded)
    q_bias = "encoder.layers.0.attn.q_proj.bias"
    for name in (q_bias, "projections.text.weight", "encoder.layers.1.ffn.text.fc_out.bias"):
        value = dict(loaded.named_parameters())[name].detach()
        out = text_embedding(loaded, **{name: value + torch.randn_like(value)})
        assert max_rel_error(out, ref) > 1e-3, name
    assert torch.equal(text_embedding(loaded), ref)  # the model itself is untouched
    # a packed weight is no parameter: substituting it is an error, never silently ignored
    with pytest.raises(RuntimeError, match="substituted into a packed layer.*to_dense"):
        text_embedding(loaded, **{"encoder.layers.0.attn.q_proj.weight": torch.zeros(64, 64)})


def test_ema_style_copy_of_parameters_into_another_model(loaded):
    ema = onepeace.load(TINY_CKPT, pack=False)  # a dense twin, moved to other weights
    targets = dict(ema.named_parameters())
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
        for name, p in loaded.named_parameters():
            targets[name].mul_(0.0).add_(p, alpha=1.0)  # EMA step with decay 0: a copy
        for name, w in loaded.state_dict().items():  # the packed weights come through the state dict
            if name not in dict(loaded.named_parameters()):
                targets[name].copy_(w)
    assert all(torch.isfinite(p).all() for p in ema.parameters())
    err = max_rel_error(text_embedding(ema), text_embedding(loaded))
    print(f"EMA copy (dense) vs packed model: {err:.1e}")
    assert err <= 1e-5
    twin = copy.deepcopy(loaded)  # and between two packed models, parameter by parameter
    with torch.no_grad():
        for e, p in zip(twin.parameters(), loaded.parameters()):
            e.lerp_(p + 1.0, 0.5)
    assert torch.isfinite(parameters_to_vector(twin.parameters())).all()


def test_training_and_gradient_forwards_are_refused_until_to_dense():
    model = random_tiny_model().to_packed()
    with pytest.raises(RuntimeError, match="cannot train.*to_dense"):
        model.train()
    assert not any(m.training for m in model.modules())  # refused before anything changed mode
    # packing froze the parameters: a plain call (grad mode on) builds no graph and gives the numbers
    out = model(text=TEXT).embeddings["text"]
    assert not out.requires_grad and torch.equal(out, text_embedding(model))
    model.adapters["text"].requires_grad_(True)  # now the encoder's inputs require gradients
    with pytest.raises(RuntimeError, match="packed for inference.*to_dense"):
        model(text=TEXT)
    assert model.is_packed  # never unpacked behind the user's back
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_dense().train()
    assert all(p.requires_grad for p in model.parameters())  # the flags from before packing
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(text=TEXT).hidden_states["text"].pow(2).mean().backward()  # (embeddings have unit norm)
    optimizer.step()
    w = model.encoder.layers[0].ffn["text"].wi_0.weight
    assert w.grad is not None and not torch.equal(w.detach(), state["encoder.layers.0.ffn.text.wi_0.weight"])


def test_geglu_runs_gelu_and_product_inside_the_packed_products(monkeypatch):
    model = random_tiny_model().to_packed()
    calls = []
    real_mul, real_gelu = PackedLinear.forward_mul, PackedLinear.forward_gelu
    monkeypatch.setattr(PackedLinear, "forward_mul", lambda *a: calls.append("mul") or real_mul(*a))
    monkeypatch.setattr(PackedLinear, "forward_gelu", lambda *a: calls.append("gelu") or real_gelu(*a))
    text_embedding(model)
    assert calls == ["gelu", "mul"] * model.config.encoder.layers


def test_state_dict_deepcopy_pickle_and_no_op_conversions_keep_the_packing(tmp_path):
    model = random_tiny_model().to_packed()
    ref = text_embedding(model)
    torch.save(model, tmp_path / "whole.pt")  # the packed tensor has no storage: pickled dense
    restored = (copy.deepcopy(model), torch.load(tmp_path / "whole.pt", weights_only=False),
                pickle.loads(pickle.dumps(model)))
    for twin in restored:
        assert twin.is_packed and torch.equal(text_embedding(twin), ref)
    assert model.to("cpu").float() is model and model.is_packed  # no conversion: a no-op
    assert torch.equal(text_embedding(model), ref)
    other = random_tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    model.load_state_dict(other.state_dict())  # repacks the loaded weights
    assert model.is_packed
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    assert max_rel_error(text_embedding(model), text_embedding(other)) <= 1e-5


def test_dtype_or_device_changes_are_refused_before_anything_converts():
    model = random_tiny_model().to_packed()
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("meta")):
        with pytest.raises(RuntimeError, match="cannot convert a packed.*to_dense"):
            convert(model)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # nothing half-converted
    half = copy.deepcopy(model).to_dense().to(torch.bfloat16).to_packed()
    assert half.dtype == torch.bfloat16 and half.is_packed == cpu_can_pack(torch.bfloat16)


def test_audio_front_end_window_weights_follow_weight_updates():
    """The front end's (C_out, k C_in) window weight is cached (packed); an in-place update or a new
    tensor must not leave a stale copy."""
    block = random_tiny_model().adapters["audio"].feature_extractor[1]
    x = torch.randn(2, 50, block.conv.in_channels)

    def conv_path():
        return block(x.transpose(1, 2)).transpose(1, 2)

    with torch.no_grad():
        for change in (lambda w: w.add_(torch.randn_like(w)),  # (a scale alone the LayerNorm would undo)
                       lambda w: setattr(block.conv, "weight", torch.nn.Parameter(w.flip(-1)))):
            fast = block.forward_time_major(x)
            assert block._window_cache[1].is_mkldnn
            assert max_rel_error(fast, conv_path()) <= 1e-5
            change(block.conv.weight)
            assert max_rel_error(block.forward_time_major(x), conv_path()) <= 1e-5
            assert max_rel_error(block.forward_time_major(x), fast) > 1e-3
        for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
            assert max_rel_error(twin.forward_time_major(x), block.forward_time_major(x)) == 0


def test_compile_and_fuse_do_not_mix_with_packing():
    """torch.compile cannot trace the packed weights and fusing concatenates dense ones: compile=True and
    fuse=True load plain weights, asking for packing too is an error, compiling a packed model makes it
    dense first, fusing one is refused (to_dense first), and packing a fused model drops the fusion."""
    assert not onepeace.load(TINY_CKPT, compile=True).is_packed
    for other in ("compile", "fuse"):
        with pytest.raises(ValueError, match=f"pack=True and {other}=True"):
            onepeace.load(TINY_CKPT, pack=True, **{other: True})
    assert not random_tiny_model().to_packed().compile_encoder().is_packed
    model = random_tiny_model()
    ref = text_embedding(model)
    with pytest.raises(RuntimeError, match="cannot fuse q/k/v.*to_dense"):
        model.to_packed().fuse_for_inference()
    model.to_dense().fuse_for_inference()
    assert max_rel_error(text_embedding(model), ref) <= 1e-5
    model.to_packed()
    assert model.encoder.layers[0].attn._qkv_weight is None and model.is_packed
    assert max_rel_error(text_embedding(model), ref) <= 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_a_cpu_that_cannot_pack_keeps_plain_weights_with_the_right_numbers(monkeypatch, tiny_expected,
                                                                           dtype, tolerance):
    """As on an AVX2-only CPU (oneDNN packs float32 only): load(dtype=bfloat16 / float16) keeps every
    layer plain, the audio front end's cache dense, and embeds as the float32 fixture within the
    dtype's rounding."""
    monkeypatch.setattr(packed_module, "cpu_can_pack", lambda d: d == torch.float32)
    model = onepeace.load(TINY_CKPT, dtype=dtype)
    assert model.dtype == dtype and not model.is_packed and not linears(model)[0]
    for m, err in fixture_embedding_errors(model, tiny_expected).items():
        print(f"{dtype} (cannot pack) {m}_embed vs float32 fixture: {err:.1e}")
        assert err <= tolerance
    caches = [b._window_cache[1] for b in model.adapters["audio"].feature_extractor if hasattr(b, "_window_cache")]
    assert caches and not any(c.is_mkldnn for c in caches)
    assert onepeace.load(TINY_CKPT, dtype=torch.float32).is_packed  # float32 still packs there
