"""The modality registry and the bundled video modality: one file adds a branch; training it leaves
every pre-existing parameter bit-identical."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import onepeace
from onepeace.checkpoint import save_converted
from onepeace.config import ModelConfig
from onepeace.modalities.video import VideoAdapter, VideoAdapterConfig, collate_videos, read_frames, video_transform
from onepeace.registry import get_modality, register_modality

from conftest import random_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, frames: np.ndarray) -> str:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return str(path)


def moving_square(direction: str, frames: int = 4, size: int = 64, offset: int = 0) -> np.ndarray:
    """Every frame differs (a GIF writer merges identical consecutive frames)."""
    clip = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        a, b = 8 + offset, 4 + 4 * t
        if direction == "right":
            clip[t, a:a + 20, b:b + 20] = 255
        else:
            clip[t, b:b + 20, a:a + 20] = 255
    return clip


@pytest.fixture
def video_manifest(tmp_path) -> Path:
    """16 GIF clips of a square moving right or down, captioned by direction."""
    lines = []
    for i in range(16):
        direction = ("right", "down")[i % 2]
        clip = write_clip(tmp_path / f"{i}.gif", moving_square(direction, offset=i % 5))
        lines.append({"video": clip, "text": f"a square moving {direction}", "label": direction})
    path = tmp_path / "video.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_list_modalities_has_the_bundled_video():
    assert onepeace.list_modalities() == ["audio", "image", "text", "video"]


def test_register_rejects_a_second_class_under_a_taken_name_and_bad_names():
    class OtherAdapter(VideoAdapter):
        pass

    with pytest.raises(ValueError, match="already registered to VideoAdapter"):
        register_modality("video", VideoAdapterConfig, OtherAdapter)
    with pytest.raises(ValueError, match="identifier"):
        register_modality("my-video", VideoAdapterConfig, VideoAdapter)
    with pytest.raises(TypeError, match="Adapter subclass"):
        register_modality("thing", VideoAdapterConfig, torch.nn.Linear)
    assert get_modality("video").adapter_cls is VideoAdapter


def test_unknown_kind_in_a_config_names_the_modality():
    raw = onepeace.get_config("one-peace-tiny").to_dict()
    raw["adapters"]["smell"] = {"kind": "smell"}
    with pytest.raises(ValueError, match="modality 'smell': unknown modality kind 'smell'"):
        ModelConfig.from_dict(raw)


def test_config_json_round_trip_records_the_module_only_outside_onepeace_modalities():
    config = onepeace.get_config("one-peace-tiny")
    config = ModelConfig(encoder=config.encoder, adapters={**config.adapters, "video": VideoAdapterConfig(num_frames=3)})
    data = config.to_dict()
    assert data["adapters"]["video"]["kind"] == "video"
    # every bundled modality (text, image, audio, video alike) is found by name: no module recorded
    assert [a.get("module") for a in data["adapters"].values()] == [None] * 4
    assert ModelConfig.from_dict(json.loads(json.dumps(data))) == config

    @dataclasses.dataclass(frozen=True)
    class ClipConfig(VideoAdapterConfig):  # a config class defined outside onepeace.modalities
        pass

    assert ClipConfig().to_dict()["module"] == __name__
    with pytest.raises(ValueError, match="use_attn_bias must be False"):
        VideoAdapterConfig(use_attn_bias=True)


def test_add_modality_keeps_existing_outputs_and_a_one_frame_clip_equals_the_image():
    model = random_tiny_model()
    with torch.no_grad():  # video has no relative bias: compare with an image branch without one
        model.adapters["image"].rel_pos_tables[0].weight.zero_()
    tokens = torch.tensor([[0, 100, 200, 2]])
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(text=tokens, image=image).embeddings
    n_before = sum(p.numel() for p in model.parameters())
    model.add_modality("video", VideoAdapterConfig(num_frames=4, image_size=64), init_from="image")
    with torch.no_grad():
        after = model(text=tokens, image=image).embeddings
        video = model(video=image[:, None]).embeddings["video"]
    assert torch.equal(before["text"], after["text"]) and torch.equal(before["image"], after["image"])
    # started from the image branch with zero temporal positions: one frame IS the image
    assert torch.equal(video, after["image"])
    assert sorted(model.encoder.layers[0].ffn) == ["audio", "image", "text", "video"]
    assert "video" in model.encoder.final_norms and "video" in model.projections
    assert sum(p.numel() for p in model.parameters()) > n_before
    with pytest.raises(ValueError, match="already has a 'video' branch"):
        model.add_modality("video", VideoAdapterConfig())
    with pytest.raises(ValueError, match="4 temporal positions"):
        model(video=torch.randn(1, 5, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, T, 3, S, S\)"):
        model(video=torch.randn(1, 3, 64, 64))


def test_video_preprocessing_reads_gifs_folders_and_arrays(tmp_path):
    model = random_tiny_model()
    model.add_modality("video", VideoAdapterConfig(num_frames=4, image_size=64))
    clip = moving_square("right", frames=8)
    gif = write_clip(tmp_path / "c.gif", clip)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(clip):
        from PIL import Image

        Image.fromarray(frame).save(folder / f"{t:02d}.png")
    transform = video_transform(model)
    from_gif, from_folder, from_array = transform(gif), transform(folder), transform(clip)
    assert from_gif.shape == (4, 3, 64, 64)
    assert torch.equal(from_gif, from_folder) and torch.equal(from_gif, from_array)
    assert len(read_frames(gif)) == 8
    assert collate_videos(model, [from_gif, from_array])["video"].shape == (2, 4, 3, 64, 64)
    with pytest.raises(ValueError, match="file not found"):
        transform(tmp_path / "missing.gif")


def test_a_saved_video_model_loads_in_a_fresh_process(tmp_path):
    model = random_tiny_model()
    model.add_modality("video", VideoAdapterConfig(num_frames=2, image_size=64), init_from="image")
    save_converted(model, tmp_path / "m")
    x = torch.randn(1, 2, 3, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(video=x).embeddings["video"]
    code = ("import sys, torch, onepeace; m = onepeace.load(sys.argv[1]); "
            "print('video' in sys.modules.get('onepeace.modalities.video').__name__, m.modalities); "
            "torch.save(m(video=torch.load(sys.argv[2])).embeddings['video'], sys.argv[3])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "x.pt"),
                          str(tmp_path / "y.pt")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "('text', 'image', 'audio', 'video')" in run.stdout
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-6)


def test_eval_reports_video_zero_shot_and_emergent_pairs(video_manifest):
    from onepeace.eval.zero_shot import evaluate

    model = random_tiny_model()
    model.add_modality("video", VideoAdapterConfig(num_frames=4, image_size=64), init_from="image")
    result = evaluate(model, [video_manifest])
    assert result["counts"]["video"] == 16 and 0 <= result["zero_shot"]["video"] <= 1
    assert set(result["retrieval"]) == {"video->text", "text->video"}


def test_video_training_leaves_every_pre_existing_parameter_bit_identical(video_manifest, tmp_path):
    """The acceptance test: only the video adapter, video experts, video LayerNorm and video projection
    change; all other parameters (text, image, audio branches, shared attention, temperature) are
    torch.equal to before."""
    from onepeace.demo.video import VideoDemoSettings, train_video_branch

    model = random_tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = VideoDemoSettings(frames=4, steps=4, batch_size=8, lr=1e-3, warmup_steps=1)
    losses, changed = train_video_branch(model, video_manifest, settings, tmp_path, progress=False)
    params = dict(model.named_parameters())
    assert changed == [] and len(before) > 100
    assert all(torch.equal(params[name], old) for name, old in before.items())
    assert all(not p.requires_grad for name, p in params.items() if name in before)

    # every video parameter moved away from where it started (a copy of the image branch / zeros)
    video = [name for name in params if name not in before]
    assert len(video) == len(params) - len(before) and len(video) > 20
    start = {name: _initial_value(name, before) for name in video}
    unchanged = [name for name in video if torch.equal(params[name], start[name])]
    assert unchanged == [], unchanged
    assert len(losses) == 4 and all(np.isfinite(losses))


def _initial_value(name: str, before: dict[str, torch.Tensor]) -> torch.Tensor:
    """Where a video parameter started when the branch was copied from the image branch."""
    if name == "adapters.video.temporal_pos":
        return torch.zeros_like(before["adapters.image.pos_embed"][:4])
    if name == "adapters.video.spatial_pos":
        return before["adapters.image.pos_embed"]  # same 4 x 4 grid
    return before[name.replace(".video.", ".image.").replace("adapters.video.", "adapters.image.")]


def test_cli_embeds_clips_with_as_video(tmp_path, capsys):
    from onepeace.cli import main

    model = random_tiny_model()
    model.add_modality("video", VideoAdapterConfig(num_frames=4, image_size=64), init_from="image")
    save_converted(model, tmp_path / "m")
    clips = [write_clip(tmp_path / f"{d}.gif", moving_square(d)) for d in ("right", "down")]
    code = main(["embed", "-m", str(tmp_path / "m"), "--as", "video", *clips, str(tmp_path / "missing.gif"),
                 "-o", str(tmp_path / "e.npz"), "-q"])
    assert code == 0
    assert "2 embeddings of dim 64 (2 video); 1 skipped" in capsys.readouterr().out
    saved = np.load(tmp_path / "e.npz")
    expected = model.encode_items("video", clips)
    assert list(saved["modalities"]) == ["video", "video"] and list(saved["failed_files"]) == [str(tmp_path / "missing.gif")]
    assert np.allclose(saved["embeddings"], expected.numpy(), atol=1e-5)


def test_file_suffixes_come_from_the_registry():
    from onepeace.registry import file_modalities, modality_for_path

    assert modality_for_path("a/B.JPG") == "image" and modality_for_path("x.flac") == "audio"
    assert modality_for_path("notes.txt") == "text" and modality_for_path("m.jsonl") == "text"
    assert modality_for_path("clip.xyz") is None and modality_for_path("README") is None
    assert modality_for_path("clip.MP4") == "video" and modality_for_path("c.webm") == "video"
    assert file_modalities() == ("image", "audio", "text", "video")  # registration order
    before = get_modality("video")
    with pytest.raises(ValueError, match=r"\['\.png'\] of 'video' already belong to \['image'\]"):
        register_modality("video", VideoAdapterConfig, VideoAdapter, suffixes=(".png",))
    assert get_modality("video") is before  # the refused registration changed nothing


def test_registry_is_a_leaf_and_the_builtins_have_the_plugin_shape():
    import ast

    import onepeace.registry as registry

    tree = ast.parse(Path(registry.__file__).read_text())
    imported = ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("onepeace") or m.startswith(".")], imported
    for kind in ("text", "image", "audio", "video"):
        spec = get_modality(kind)
        assert spec.config_cls.__module__ == spec.transform.__module__ == f"onepeace.modalities.{kind}"
        assert spec.collate is not None and spec.example is not None and spec.config_cls.kind == kind
