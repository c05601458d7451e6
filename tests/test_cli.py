"""The onepeace command line, run as a user would (subprocess for embed, in-process for the rest)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import onepeace
from conftest import ASSETS, TINY_CKPT, require


@pytest.fixture()
def assets_with_corrupt_file(tmp_path):
    """The shared sample files (linked, not copied) plus a corrupt image and an empty audio file."""
    folder = tmp_path / "assets"
    folder.mkdir()
    for f in sorted(require(ASSETS).iterdir()):
        (folder / f.name).symlink_to(f)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    (folder / "empty.flac").write_bytes(b"")
    (folder / "notes.md").write_text("ignored: unknown type inside a folder")
    return folder


@pytest.mark.slow  # a subprocess loading torch
def test_embed_folder_reports_and_skips_bad_files(tmp_path, assets_with_corrupt_file):
    out = tmp_path / "emb.npz"
    result = subprocess.run(  # no ONEPEACE_BPE_DIR: the packaged tokenizer
        [sys.executable, "-m", "onepeace", "embed", "--model", str(require(TINY_CKPT)), str(assets_with_corrupt_file),
         "-o", str(out)], capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, result.stderr
    assert "corrupt.jpg" in result.stderr and "empty.flac" in result.stderr
    data = np.load(out)
    files = [os.path.basename(f) for f in data["files"]]
    assert sorted(files) == ["cow.flac", "dog.JPEG", "dog.flac", "elephant.JPEG", "pokemons.jpg"]
    assert data["embeddings"].shape == (5, 64)
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1, atol=1e-5)
    assert sorted(os.path.basename(f) for f in data["failed_files"]) == ["corrupt.jpg", "empty.flac"]
    assert all(os.path.basename(f) in e for f, e in zip(data["failed_files"], data["failed_errors"]))
    # the embeddings are the model's own
    model = onepeace.load(TINY_CKPT)
    dog = [i for i, f in enumerate(files) if f == "dog.JPEG"][0]
    expected = model.encode_image([str(ASSETS / "dog.JPEG")])[0].numpy()
    assert np.allclose(data["embeddings"][dog], expected, atol=1e-5)
    assert list(data["modalities"]).count("audio") == 2


def test_embed_text_needs_the_models_vocabulary(tmp_path, capsys):
    from onepeace.cli import main

    out = tmp_path / "t.npz"
    rc = main(["embed", "--model", str(require(TINY_CKPT)), "--text", "a dog", "-o", str(out), "-q"])
    assert rc == 1  # nothing embedded (the packaged tokenizer's ids are outside the tiny vocabulary)
    err = capsys.readouterr().err
    assert "vocabulary of 120" in err


def test_embed_texts_with_a_real_vocabulary(tmp_path):
    from onepeace.checkpoint import save_converted
    from onepeace.cli import main

    torch.manual_seed(0)
    save_converted(onepeace.create_model("one-peace-tiny"), tmp_path / "model")
    (tmp_path / "captions.txt").write_text("a dog\n\na cow\n")
    out = tmp_path / "t.npz"
    rc = main(["embed", "-m", str(tmp_path / "model"), str(tmp_path / "captions.txt"), "-t", "an elephant",
               "-o", str(out), "-q"])  # the packaged tokenizer: no --bpe-dir needed
    assert rc == 0
    data = np.load(out)
    assert list(data["files"]) == ["--text[0]", f"{tmp_path / 'captions.txt'}:1", f"{tmp_path / 'captions.txt'}:3"]
    assert data["embeddings"].shape == (3, 64)
    # the library's reader gives the same file back
    from onepeace.embeddings_file import EmbeddingsFile, read_embeddings, write_embeddings

    back = read_embeddings(out)
    assert back.files == list(data["files"]) and back.counts() == {"text": 3} and back.failed == []
    assert np.array_equal(back.embeddings, data["embeddings"])
    write_embeddings(tmp_path / "again.npz", back)
    assert read_embeddings(tmp_path / "again.npz").files == back.files
    with pytest.raises(ValueError, match="one file name and one modality per row"):
        EmbeddingsFile(back.embeddings, back.files[:2], back.modalities)


def test_info_shows_partial_loading(capsys):
    from onepeace.cli import main

    assert main(["info", str(TINY_CKPT), "--modalities", "text,image"]) == 0
    text = capsys.readouterr().out
    assert "modalities   text, image" in text
    assert "audio" in text and "not loaded (61 tensors" in text
    assert main(["info", str(TINY_CKPT), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["total"] == sum(v for k, v in info["parameters"].items() if k != "total")
    # the CLI's model is packed for CPU inference; its packed weights still count
    dense = onepeace.load(TINY_CKPT, pack=False)
    assert info["parameters"]["total"] == sum(p.numel() for p in dense.parameters())
    assert info["dtype"] == "float32" and info["modalities"] == ["text", "image", "audio"]


def test_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    from onepeace.cli import main

    assert main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["embed", "-m", str(TINY_CKPT), str(tmp_path / "nothing-here")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_search_has_one_query_flag_per_registered_modality_in_command_line_order():
    from onepeace.cli import build_parser
    from onepeace.registry import list_modalities

    kinds = list_modalities()
    assert {"text", "image", "audio", "video"} <= set(kinds)
    argv = ["search", "idx"] + [x for m in reversed(kinds) for x in (f"--{m}", f"{m}-query")] + ["-t", "again"]
    args = build_parser().parse_args(argv)
    assert args.parts == [(m, f"{m}-query") for m in reversed(kinds)] + [("text", "again")]
    # the shared flags reach every command that takes them
    for argv in (["eval", "m.jsonl", "-m", "x"], ["serve"], ["finetune"], ["demo"], ["index", "d", "-m", "x", "-o", "o"]):
        assert build_parser().parse_args([*argv, "--bpe-dir", "B"]).bpe_dir == "B", argv
