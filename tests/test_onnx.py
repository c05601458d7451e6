"""ONNX export + the ONNX Runtime path (onepeace.onnx): parity with PyTorch on the official-tiny fixture,
dynamic batch and length through one graph, padding masks, embed / index / serve from an exported
folder, ONNX Runtime's int8, and the errors (a missing graph, onnxruntime not installed)."""
from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch

import onepeace
from conftest import BPE_DIR, CAPTIONS, TINY_CKPT, make_collection, random_tiny_model, require, require_module

TOLERANCE = 1e-4  # max |onnx - torch| on L2-normalised embeddings (float32 graphs)


@pytest.fixture(autouse=True, scope="module")
def _onnxruntime():
    require_module("onnxruntime", "onnx")


@pytest.fixture(scope="module")
def fixture_export(tmp_path_factory):
    """official-tiny exported with the CLI -> (PyTorch model (the default packed path), OnnxModel)."""
    from onepeace.cli import main

    out = tmp_path_factory.mktemp("onnx") / "official-tiny"
    assert main(["export", str(require(TINY_CKPT)), "--format", "onnx", "--out", str(out)]) == 0
    return onepeace.load(TINY_CKPT), onepeace.load(out)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_fixture_parity_per_modality(fixture_export, tiny_expected):
    model, onnx_model = fixture_export
    assert type(onnx_model).__name__ == "OnnxModel" and onnx_model.modalities == ("text", "image", "audio")
    i = tiny_expected["inputs"]
    inputs = dict(text=i["src_tokens"], image=i["src_images"], audio=i["src_audios"],
                  audio_padding_mask=i["audio_padding_masks"])
    with torch.inference_mode():
        ours = model(**inputs).embeddings
    got = onnx_model(**inputs).embeddings
    for m in ("text", "image", "audio"):
        vs_torch = _max_err(got[m], ours[m])
        vs_published = _max_err(got[m], tiny_expected["outputs"][f"{m}_embed"])
        print(f"official-tiny {m}: max |onnx - pytorch| {vs_torch:.2e}, max |onnx - published| {vs_published:.2e}")
        assert got[m].shape == ours[m].shape
        assert vs_torch <= TOLERANCE and vs_published <= TOLERANCE


def test_dynamic_batch_and_length_through_one_graph(fixture_export):
    """Two batch sizes and two lengths per graph (the export traced batch 2): each equals PyTorch."""
    model, onnx_model = fixture_export
    torch.manual_seed(1)
    vocab = model.config.adapters["text"].vocab_size
    side = model.config.adapters["image"].image_size
    cases = [dict(text=torch.randint(4, vocab, (1, 5))), dict(text=torch.randint(4, vocab, (5, 31))),
             dict(image=torch.randn(1, 3, side, side)), dict(image=torch.randn(5, 3, side, side)),
             dict(audio=torch.randn(1, 16000)), dict(audio=torch.randn(3, 40000))]
    for case in cases:
        (m, value), = case.items()
        with torch.inference_mode():
            expected = model(**case).embeddings[m]
        err = _max_err(onnx_model(**case).embeddings[m], expected)
        print(f"{m} {tuple(value.shape)}: max |onnx - pytorch| {err:.2e}")
        assert err <= TOLERANCE


def test_padding_masks(fixture_export):
    """Text: a padded item's embedding is the one it gets alone (padding is masked out exactly).
    Audio: the padding mask input is honoured (without it the result changes) and a mixed-length batch
    equals PyTorch's. (Audio is not padding-invariant in the model itself: the conv feature extractor
    and conv positions see the zero-padding near a clip's end, as in the published code.)"""
    from onepeace.modalities.audio import collate_audios
    from onepeace.modalities.text import pad_token_ids

    model, onnx_model = fixture_export
    torch.manual_seed(2)
    ids = [torch.randint(4, 100, (n,)) for n in (3, 17, 9)]
    batch = onnx_model(text=pad_token_ids(ids)).embeddings["text"]
    alone = torch.cat([onnx_model(text=t[None]).embeddings["text"] for t in ids])
    audio = collate_audios(onnx_model, [torch.randn(n) for n in (16000, 24000, 7000)])
    with torch.inference_mode():
        expected = model(**audio).embeddings["audio"]
    got = onnx_model(**audio).embeddings["audio"]
    unmasked = onnx_model(audio=audio["audio"], audio_padding_mask=torch.zeros_like(audio["audio_padding_mask"]))
    text_err, audio_err = _max_err(batch, alone), _max_err(got, expected)
    mask_effect = _max_err(unmasked.embeddings["audio"], got)
    print(f"text padded vs alone {text_err:.2e}; audio padded batch vs PyTorch {audio_err:.2e} "
          f"(the mask moves it by {mask_effect:.2e})")
    assert text_err <= TOLERANCE and audio_err <= TOLERANCE
    assert mask_effect > 0.01 and _max_err(batch[0], batch[1]) > 0.01  # the checks can fail


def test_index_search_serve_and_embed_from_the_onnx_folder(tmp_path):
    """`onepeace export`, `onepeace index --model EXPORTED`, a server query and `onepeace embed`, all
    on ONNX Runtime; the embeddings (and zero-shot probabilities) are the PyTorch model's (<= 1e-4)."""
    require_module("faiss", "serve")
    from onepeace.checkpoint import save_converted
    from onepeace.cli import main
    from onepeace.embeddings_file import read_embeddings
    from onepeace.index import SearchIndex
    from onepeace.serve import ServeConfig, make_server
    from test_serve import call

    model_dir = save_converted(random_tiny_model(), tmp_path / "model")
    exported, data, idx = tmp_path / "exported", make_collection(tmp_path / "data"), tmp_path / "idx"
    assert main(["export", str(model_dir), "--out", str(exported)]) == 0
    assert main(["index", str(data), "--model", str(exported), "--out", str(idx), "--bpe-dir", str(BPE_DIR), "-q"]) == 0
    onnx_model = onepeace.load(exported)
    onnx_model.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    torch_model = onepeace.load(model_dir)
    torch_model.tokenizer = onnx_model.tokenizer
    srv = make_server(SearchIndex(idx), onnx_model, ServeConfig(port=0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        host, port = srv.server_address[:2]
        status, body, _ = call(f"http://{host}:{port}", "POST", "/api/search", {"text": CAPTIONS[2], "k": 3})
    finally:
        srv.shutdown()
        srv.server_close()
    assert status == 200 and body["results"][0]["text"] == CAPTIONS[2], body
    assert main(["embed", "--model", str(exported), "--bpe-dir", str(BPE_DIR), "-q", "-t", CAPTIONS[0], "-t", CAPTIONS[1],
                 "--out", str(tmp_path / "e.npz")]) == 0
    npz = read_embeddings(tmp_path / "e.npz")
    err = float(np.abs(npz.embeddings - torch_model.encode_text(CAPTIONS[:2]).numpy()).max())
    print(f"onepeace embed from the ONNX folder vs PyTorch: max error {err:.2e}")
    assert err <= TOLERANCE
    image = sorted((data / "drawings").glob("*.png"))[0]
    zero_shot_err = _max_err(onnx_model.zero_shot([image], CAPTIONS)[0], torch_model.zero_shot([image], CAPTIONS)[0])
    print(f"zero-shot probabilities from the ONNX folder vs PyTorch: max error {zero_shot_err:.2e}")
    assert zero_shot_err <= TOLERANCE


def test_int8_export_keeps_the_embeddings(fixture_export, tmp_path):
    """ONNX Runtime's dynamic int8 (--quantize int8): int8 graphs, cosine to float32 >= 0.99."""
    from onepeace.onnx import export_onnx

    model, onnx_model = fixture_export
    out = export_onnx(onepeace.load(TINY_CKPT, pack=False), tmp_path / "int8", quantize="int8")
    manifest = json.loads((out / "onnx.json").read_text())
    int8 = onepeace.load(out)
    torch.manual_seed(3)
    side = model.config.adapters["image"].image_size
    inputs = dict(text=torch.randint(4, 100, (4, 12)), image=torch.randn(4, 3, side, side), audio=torch.randn(4, 16000))
    fp32, q = onnx_model(**inputs).embeddings, int8(**inputs).embeddings
    cos = {m: torch.nn.functional.cosine_similarity(fp32[m], q[m]).min().item() for m in fp32}
    print(f"ORT int8 vs float32 (official-tiny), min cosine: {cos}")
    assert manifest["weights"] == "int8" and all(c >= 0.99 for c in cos.values())
    assert any(n.op_type.startswith(("MatMulInteger", "DynamicQuantize")) for n in
               require_module("onnx", "onnx").load(str(out / "text.onnx")).graph.node)


def test_missing_graph_and_missing_onnxruntime_are_clear_errors(fixture_export, tmp_path, monkeypatch):
    import shutil

    _, onnx_model = fixture_export
    broken = shutil.copytree(onnx_model.folder, tmp_path / "broken")
    (broken / "audio.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"audio\.onnx is missing: the manifest lists the audio graph"):
        onepeace.load(broken)
    with pytest.raises(ValueError, match="do not apply"):
        onepeace.load(onnx_model.folder, pack=True)
    with pytest.raises(ValueError, match="no \\['audio'\\] branch"):
        onepeace.load(onnx_model.folder, modalities=["text"])(audio=torch.randn(1, 16000))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r"onepeace\[onnx\]"):
        onepeace.load(onnx_model.folder)


def test_library_imports_without_the_extra():
    """`import onepeace` (and the converted-folder path) never imports onnx or onnxruntime."""
    import subprocess

    code = ("import sys; sys.modules['onnx'] = sys.modules['onnxruntime'] = None; import onepeace, onepeace.cli; "
            "import onepeace.onnx; print('ok')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_info_on_an_exported_folder_names_it(fixture_export, capsys):
    """`onepeace info` on an ONNX folder says what it is (it has no PyTorch load report to print)."""
    from onepeace.cli import main

    _, onnx_model = fixture_export
    folder = onnx_model.folder
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "an ONNX export" in out and "text" in out and "onnx.json" in out
