"""The CPU path chosen by measurement (onepeace.modeling.cpu_choice): every choice it can make gives the
reference numbers; the probe's decisions follow its timings (packed / plain / packed with a dense copy
for large batches; sdpa / eager); the cache is written, read back and keyed; pack=... and
ONEPEACE_CPU_PROBE=0 skip the probe; load_report carries the choice; a corrupt cache is a warning."""
from __future__ import annotations

import json

import pytest
import torch

import onepeace
from conftest import max_rel_error
from onepeace.checkpoint import save_converted
from onepeace.modeling import cpu_choice
from onepeace.modeling.cpu_choice import CpuChoice, ProbeShape, apply_choice, choose
from onepeace.modeling.packed import PackedLinear, cpu_can_pack

pytestmark = pytest.mark.skipif(not cpu_can_pack(torch.float32), reason="this torch build has no oneDNN")

TINY_SHAPE = ProbeShape(64, 128, 4)  # a probe that takes milliseconds


def tiny_model():
    torch.manual_seed(0)
    model = onepeace.create_model("one-peace-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def inputs():
    """A padded text batch (rows of 5 and 3 real tokens), 2 images, 2 padded audio clips."""
    gen = torch.Generator().manual_seed(1)
    cfg = onepeace.get_config("one-peace-tiny").adapters["image"]
    audio = torch.randn(2, 16000, generator=gen)
    audio_mask = torch.zeros(2, 50, dtype=torch.bool)  # (B, frames + 1) for 1 s at the tiny size
    audio_mask[1, 30:] = True
    return {"text": torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 1, 1]]),
            "image": torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen),
            "audio": audio, "audio_padding_mask": audio_mask}


def embeddings(model, inputs) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return dict(model(**inputs).embeddings)


@pytest.fixture(scope="module")
def reference(inputs):
    model = tiny_model()
    model.reference_mode = True  # plain weights, eager attention, padded batches
    return embeddings(model, inputs)


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """apply_choice may set torch's (process-wide) thread count, e.g. to 1 where a busy machine made 2
    threads measure slower, and remembers it in cpu_choice._threads_changed: undo both after each test,
    so the next test's key uses the count it starts with."""
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_choice, "_threads_changed", None)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The probe on, with a temporary cache folder; returns the cache file's path."""
    monkeypatch.setenv("ONEPEACE_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_choice.ENV_PROBE, "1")
    monkeypatch.setattr(cpu_choice, "_load_average", lambda: 0.5)  # a quiet machine, whatever this one is doing
    return tmp_path / cpu_choice.CACHE_FILE


@pytest.fixture
def probes(monkeypatch):
    """Counts the real probe's runs."""
    calls = []
    real = cpu_choice.probe

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(cpu_choice, "probe", counted)
    return calls


# ------------------------------------------------------------------ every choice gives the reference numbers
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack, dense_above", [(True, None), (True, 1), (True, 12), (False, None)],
                         ids=["packed", "packed-dense-copy-always", "packed-dense-copy-from-12-rows", "plain"])
def test_each_choice_matches_the_reference(inputs, reference, monkeypatch, attention, pack, dense_above):
    dense_copies = []
    real = PackedLinear.dense_weight
    monkeypatch.setattr(PackedLinear, "dense_weight", lambda self: dense_copies.append(1) or real(self))
    model = apply_choice(tiny_model(), CpuChoice(pack=pack, dense_above=dense_above, attention=attention))
    assert model.is_packed == pack and model.attention_kernel == attention
    out = embeddings(model, inputs)
    for m, ref in reference.items():
        err = max_rel_error(out[m], ref)
        print(f"pack={pack} dense_above={dense_above} {attention}: {m} max rel error vs reference {err:.1e}")
        assert err <= 1e-5
    # the dense copy is used exactly where asked: always (1 row), for the larger inputs only (12 rows:
    # the 8 text rows stay packed), never (packed / plain)
    if dense_above is None:
        assert not dense_copies
    else:
        assert dense_copies
        if dense_above == 12:
            dense_copies.clear()
            embeddings(model, {"text": inputs["text"]})  # 8 real rows < 12: packed products only
            assert not dense_copies


def test_thread_choice_is_applied_and_gives_the_same_numbers(inputs, reference):
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, cpu_choice.physical_cores()}):
            model = apply_choice(tiny_model(), CpuChoice(pack=True, threads=threads))
            assert torch.get_num_threads() == threads
            out = embeddings(model, inputs)
            err = max(max_rel_error(out[m], ref) for m, ref in reference.items())
            print(f"{threads} threads: max rel error vs reference {err:.1e}")
            assert err <= 1e-5
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ the decisions follow the timings
def fake_timings(monkeypatch, table: dict[str, float]):
    """Replace the clock: every name the probe times gets its time from `table` (by suffix)."""
    def medians(fns, reps, warmup=True):
        return {name: next(v for k, v in table.items() if name.endswith(k)) for name in fns}
    monkeypatch.setattr(cpu_choice, "_medians", medians)


@pytest.mark.parametrize("table, pack, dense_above", [
    ({"16 packed": 1, "16 plain": 2, "packed": 10, "plain": 11}, True, None),  # packed wins everywhere
    ({"16 packed": 1, "16 plain": 2, "packed": 13, "plain": 10, "dense copy": 10.5}, True, "large"),  # AVX2 EPYC
    ({"16 packed": 1, "16 plain": 2, "packed": 13, "plain": 10, "dense copy": 12.9}, True, None),  # copy too slow
    ({"16 packed": 2, "16 plain": 2, "packed": 13, "plain": 10}, False, None),  # packing never helps
])
def test_linear_decision(monkeypatch, table, pack, dense_above):
    fake_timings(monkeypatch, {**table, "sdpa": 1, "eager": 2, "threads": 1})
    choice = cpu_choice.probe(TINY_SHAPE)
    print(choice.summary())
    expected = TINY_SHAPE.large_rows if dense_above == "large" else None
    assert (choice.pack, choice.dense_above, choice.attention) == (pack, expected, "sdpa")
    assert choice.source == "measured" and choice.timings_ms


@pytest.mark.parametrize("eager_257, eager_750, eager_13, kernel", [
    (1.0, 4.0, 0.01, "eager"),   # eager wins both long shapes, ties the short one
    (1.95, 4.0, 0.01, "sdpa"),   # a 2.5% win on images is inside the margin
    (1.0, 4.0, 0.02, "sdpa"),    # eager loses the short text
    (1.0, 5.5, 0.01, "sdpa"),    # wins images but loses the 15-s clip (what an AMD EPYC Zen 5 measured)
])
def test_attention_decision(monkeypatch, eager_257, eager_750, eager_13, kernel):
    """eager only where it wins by the margin on every long shape and does not lose on the short one."""
    fake_timings(monkeypatch, {"packed": 1, "plain": 2, "x13 sdpa": 0.01, "x13 eager": eager_13,
                               "257 sdpa": 2.0, "257 eager": eager_257, "750 sdpa": 5.0, "750 eager": eager_750})
    choice = cpu_choice.probe(TINY_SHAPE)
    assert choice.attention == kernel
    if kernel == "eager":  # every shape was timed before eager was taken
        assert {"attn1x13 eager", "attn2x257 eager", "attn1x750 eager"} <= set(choice.timings_ms)


def test_thread_decision(monkeypatch):
    monkeypatch.setattr(cpu_choice, "physical_cores", lambda: 7)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    fake_timings(monkeypatch, {"packed": 1, "plain": 2, "sdpa": 1, "eager": 2, " 7 threads": 1, " 3 threads": 2})
    assert cpu_choice.probe(TINY_SHAPE, threads=3).threads == 7
    fake_timings(monkeypatch, {"packed": 1, "plain": 2, "sdpa": 1, "eager": 2, " 7 threads": 2, " 3 threads": 1})
    assert cpu_choice.probe(TINY_SHAPE, threads=3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting: not measured, kept
    assert cpu_choice.probe(TINY_SHAPE, threads=3).threads == 3


# ------------------------------------------------------------------ cache
def test_cache_is_written_read_back_and_keyed(cache, probes, monkeypatch):
    first = choose(TINY_SHAPE)
    assert first.source == "measured" and len(probes) == 1 and first.timings_ms
    stored = json.loads(cache.read_text())
    assert list(stored) == [first.key] and stored[first.key]["pack"] == first.pack
    assert "D=64 F=128 H=4 float32" in first.key and torch.__version__ in first.key

    again = choose(TINY_SHAPE)
    assert again.source == "cached" and len(probes) == 1
    assert (again.pack, again.dense_above, again.attention, again.threads, again.timings_ms) == \
        (first.pack, first.dense_above, first.attention, first.threads, first.timings_ms)

    other = choose(ProbeShape(64, 256, 4))  # another shape: another key, measured
    assert other.source == "measured" and len(probes) == 2 and other.key != first.key
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a limited ISA selects other kernels: another key
    limited = choose(TINY_SHAPE)
    assert limited.source == "measured" and len(probes) == 3 and "ONEDNN_MAX_CPU_ISA=AVX2" in limited.key
    assert len(json.loads(cache.read_text())) == 3
    monkeypatch.setenv(cpu_choice.ENV_PROBE, "refresh")
    assert choose(TINY_SHAPE).source == "measured" and len(probes) == 4


def test_a_probe_on_a_busy_machine_is_not_cached(cache, probes, monkeypatch):
    monkeypatch.setattr(cpu_choice, "_load_average", lambda: 4.0 * (cpu_choice.os.cpu_count() or 1))
    choice = choose(TINY_SHAPE)
    assert choice.source == "measured on a busy machine, not cached" and not cache.exists()
    assert "load average" in choice.summary()
    assert choose(TINY_SHAPE).source.startswith("measured") and len(probes) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"pack": "yes", "attention": "sdpa", "threads": 2}}'])
def test_a_corrupt_cache_is_a_warning_and_is_replaced(cache, probes, content):
    key = cpu_choice.choice_key(TINY_SHAPE, torch.get_num_threads())
    cache.write_text(content.replace("KEY", key.replace('"', '\\"')))
    with pytest.warns(RuntimeWarning, match="ignoring .*CPU choice cache"):
        choice = choose(TINY_SHAPE)
    assert choice.source == "measured" and len(probes) == 1
    assert CpuChoice.from_json(json.loads(cache.read_text())[key]).pack == choice.pack  # rewritten, valid


def test_an_unwritable_cache_is_a_warning(tmp_path, monkeypatch, probes):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ONEPEACE_CACHE", str(blocker / "sub"))  # a folder under a file: cannot be made
    monkeypatch.setenv(cpu_choice.ENV_PROBE, "1")
    monkeypatch.setattr(cpu_choice, "_load_average", lambda: 0.5)
    with pytest.warns(RuntimeWarning, match="could not write the CPU choice cache"):
        assert choose(TINY_SHAPE).source == "measured"


def test_a_bad_probe_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_PROBE, "maybe")
    with pytest.raises(ValueError, match="ONEPEACE_CPU_PROBE='maybe'"):
        choose(TINY_SHAPE)


# ------------------------------------------------------------------ onepeace.load
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_converted(tiny_model(), tmp_path_factory.mktemp("tiny"))


def test_load_reports_the_measured_then_cached_choice(folder, cache, probes, inputs, reference):
    model = onepeace.load(folder)
    choice = model.load_report.cpu_choice
    assert choice.source == "measured" and len(probes) == 1 and cache.exists()
    assert model.is_packed == choice.pack and model.attention_kernel == choice.attention
    summary = model.load_report.summary()
    print(summary)
    assert "CPU path: " + choice.describe() in summary and "[measured; probe" in summary and "ffn16 packed" in summary
    err = max(max_rel_error(embeddings(model, inputs)[m], ref) for m, ref in reference.items())
    print(f"load() default ({choice.describe()}): max rel error vs reference {err:.1e}")
    assert err <= 1e-5
    second = onepeace.load(folder)
    assert second.load_report.cpu_choice.source == "cached" and len(probes) == 1
    assert "[cached; probe" in second.load_report.summary()


@pytest.mark.parametrize("kwargs, packed", [({"pack": True}, True), ({"pack": False}, False), ({"fuse": True}, False)])
def test_an_explicit_setting_skips_the_probe(folder, cache, probes, kwargs, packed):
    model = onepeace.load(folder, **kwargs)
    assert not probes and not cache.exists() and model.load_report.cpu_choice is None
    assert model.is_packed == packed and model.attention_kernel == "sdpa"


def test_probe_off_is_todays_default(folder, cache, probes, monkeypatch):
    monkeypatch.setenv(cpu_choice.ENV_PROBE, "0")
    model = onepeace.load(folder)
    choice = model.load_report.cpu_choice
    assert not probes and not cache.exists()
    assert choice.pack and model.is_packed and choice.dense_above is None and model.attention_kernel == "sdpa"
    assert "not measured: ONEPEACE_CPU_PROBE=0" in model.load_report.summary()
