"""CPU-packed linear weights (oneDNN layout): same numbers, no second copy, and everything that reads,
moves, copies or trains the weights sees the dense ones."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import onepeace
from conftest import TINY_CKPT, fixture_embedding_errors, max_rel_error, random_tiny_model
from onepeace.modeling import layers as layers_module
from onepeace.modeling.packed_linear import PackableLinear, cpu_packing_available

pytestmark = pytest.mark.skipif(not cpu_packing_available(), reason="this torch build has no oneDNN")

TEXT = torch.tensor([[5, 6, 7, 2, 1], [8, 9, 10, 11, 2]])


def packable(model):
    return [m for m in model.modules() if isinstance(m, PackableLinear)]


def test_load_packs_on_cpu_and_the_fixture_still_matches(tiny_expected):
    packed, plain = onepeace.load(TINY_CKPT), onepeace.load(TINY_CKPT, pack=False)
    assert packed.cpu_weights_packed and not plain.cpu_weights_packed
    assert all(m.is_packed for m in packable(packed))
    for m, err in fixture_embedding_errors(packed, tiny_expected).items():
        print(f"packed weights {m}_embed vs fixture: {err:.1e}")
        assert err <= 1e-5


def test_packing_keeps_parameters_state_dict_and_numbers():
    model = random_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    with torch.inference_mode():
        before = model(text=TEXT).hidden_states["text"]
    model.pack_cpu_weights()
    assert dict(model.named_parameters()) == params  # the same Parameter objects (optimisers stay valid)
    q = model.encoder.layers[0].attn.q_proj
    # the dense storage is released: the placeholder is one element expanded to the weight's shape
    assert q.weight.shape == state["encoder.layers.0.attn.q_proj.weight"].shape
    assert q.weight.untyped_storage().nbytes() == q.weight.element_size()
    packed_state = model.state_dict()
    assert packed_state.keys() == state.keys()
    assert all(torch.equal(packed_state[k], v) for k, v in state.items())  # the reorder is lossless
    with torch.inference_mode():
        after = model(text=TEXT).hidden_states["text"]
    err = max_rel_error(after, before)
    print(f"packed vs plain text hidden: {err:.1e}")
    assert 0 < err <= 1e-5  # really another kernel, same numbers


def test_geglu_runs_gelu_and_product_inside_the_packed_products(monkeypatch):
    model = random_tiny_model().pack_cpu_weights()
    calls = []
    real = layers_module.packed_linear_mul
    monkeypatch.setattr(layers_module, "packed_linear_mul", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        model(text=TEXT)
    assert len(calls) == model.config.encoder.layers


def test_train_unpacks_to_the_same_weights_and_an_optimizer_made_before_still_trains():
    model = random_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_cpu_weights()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built while packed
    model.train()
    assert not model.cpu_weights_packed
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    loss = model(text=TEXT).hidden_states["text"].pow(2).mean()
    loss.backward()
    optimizer.step()
    w = model.encoder.layers[0].ffn["text"].wi_0.weight
    assert w.grad is not None and not torch.equal(w.detach(), state["encoder.layers.0.ffn.text.wi_0.weight"])


def test_a_forward_with_gradients_unpacks_with_a_warning_and_gives_plain_gradients():
    plain = random_tiny_model()
    packed = random_tiny_model().pack_cpu_weights()
    with pytest.warns(UserWarning, match="unpacked"):
        out = packed(text=TEXT).embeddings["text"]
    out.sum().backward()
    plain(text=TEXT).embeddings["text"].sum().backward()
    assert not packed.encoder.layers[1].attn.q_proj.is_packed  # the layers that ran are dense again
    assert packed.encoder.layers[1].ffn["image"].wi_0.is_packed  # the others stay packed
    g_packed = packed.encoder.layers[1].attn.q_proj.weight.grad
    g_plain = plain.encoder.layers[1].attn.q_proj.weight.grad
    assert torch.equal(g_packed, g_plain)


def test_deepcopy_pickle_to_and_load_state_dict_see_dense_weights(tmp_path):
    model = random_tiny_model().pack_cpu_weights()
    with torch.inference_mode():
        ref = model(text=TEXT).embeddings["text"]
    torch.save(model, tmp_path / "whole.pt")  # the packed tensor has no storage: pickled dense
    for twin in (copy.deepcopy(model), torch.load(tmp_path / "whole.pt", weights_only=False)):
        assert twin.cpu_weights_packed and model.cpu_weights_packed
        with torch.inference_mode():
            assert torch.equal(twin(text=TEXT).embeddings["text"], ref)
    same = copy.deepcopy(model).to("cpu").float()  # no conversion: stays packed
    assert same.cpu_weights_packed
    with torch.inference_mode():
        assert torch.equal(same(text=TEXT).embeddings["text"], ref)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not half.cpu_weights_packed and not half.encoder.layers[0].attn.k_proj.weight.isnan().any()
    other = random_tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    model.load_state_dict(other.state_dict())
    assert not model.cpu_weights_packed
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model(text=TEXT).embeddings["text"], other(text=TEXT).embeddings["text"])


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
            assert max_rel_error(fast, conv_path()) <= 1e-5
            change(block.conv.weight)
            assert max_rel_error(block.forward_time_major(x), conv_path()) <= 1e-5
            assert max_rel_error(block.forward_time_major(x), fast) > 1e-3
        for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
            assert max_rel_error(twin.forward_time_major(x), block.forward_time_major(x)) == 0


def test_compile_and_packing_do_not_mix():
    """torch.compile cannot trace the packed weights (it packs its own): compile=True loads plain
    weights, asking for both is an error, and compiling a packed model unpacks it first."""
    assert not onepeace.load(TINY_CKPT, compile=True).cpu_weights_packed
    with pytest.raises(ValueError, match="pack=True and compile=True"):
        onepeace.load(TINY_CKPT, compile=True, pack=True)
    model = random_tiny_model().pack_cpu_weights()
    assert not model.compile_encoder().cpu_weights_packed


def test_fusing_a_packed_model_uses_the_dense_weights():
    """fuse_for_inference concatenates q/k/v and the GeGLU inputs: it must see weights, not placeholders."""
    model = random_tiny_model()
    with torch.inference_mode():
        ref = model(text=TEXT).embeddings["text"]
    model.pack_cpu_weights().fuse_for_inference()
    attn = model.encoder.layers[0].attn
    assert not attn.q_proj.is_packed and not attn._qkv_weight.isnan().any()
    with torch.inference_mode():
        assert max_rel_error(model(text=TEXT).embeddings["text"], ref) <= 1e-5
