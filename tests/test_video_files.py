"""Video files with the released weights, no training: PyAV decoding (uniform frames, the audio track),
model.encode_video (frame average + audio track + fused), and video files in embed / index / search /
serve. The clips are made here with PyAV: a dark square moving left to right and a red disc moving
down on a light background, a 440 Hz tone as the audio track."""
from __future__ import annotations

import fractions
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import onepeace
from conftest import ASSETS, BPE_DIR, random_tiny_model, require_module
from onepeace.modalities.video import sample_frame_indices

av = require_module("av", "video")
from onepeace.data.video_file import VideoFileOptions, read_video  # noqa: E402

SIDE, FPS, SECONDS, TONE = 64, 24, 2.0, 440.0
N_FRAMES = int(FPS * SECONDS)


def square_x(k: int, n: int = N_FRAMES) -> int:
    """Left edge of the moving square in frame k (16 px wide, rows 24-40)."""
    return int(k * (SIDE - 16) / (n - 1))


def write_clip(path: Path, audio: bool = True, video: bool = True, seconds: float = SECONDS, fps: int = FPS) -> Path:
    """A `seconds`-long clip at `fps` (yuv420p, SIDE x SIDE) and/or a mono sine tone; the codec follows
    the suffix (.webm: VP8 + Opus; .mp4 .mkv .mov: MPEG-4 part 2 + AAC)."""
    webm = path.suffix == ".webm"
    out = av.open(str(path), mode="w")
    if video:
        vs = out.add_stream("libvpx" if webm else "mpeg4", rate=fps)
        vs.width = vs.height = SIDE
        vs.pix_fmt = "yuv420p"
    if audio:
        rate = 48000 if webm else 44100
        aus = out.add_stream("libopus" if webm else "aac", rate=rate)
        aus.layout = "mono"
    if video:
        yy, xx = np.mgrid[:SIDE, :SIDE]
        n = int(seconds * fps)
        for k in range(n):
            img = np.full((SIDE, SIDE, 3), 230, np.uint8)
            img[24:40, square_x(k, n):square_x(k, n) + 16] = 20
            cy = int(k * (SIDE - 12) / (n - 1)) + 6
            img[(yy - cy) ** 2 + (xx - SIDE // 2) ** 2 < 25] = (200, 30, 30)
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
    if audio:
        wave = (0.3 * np.sin(2 * np.pi * TONE * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
        step = aus.codec_context.frame_size or 1024
        for s in range(0, wave.shape[0], step):
            f = av.AudioFrame.from_ndarray(wave[None, s:s + step], format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = rate, s, fractions.Fraction(1, rate)
            out.mux(aus.encode(f))
        out.mux(aus.encode(None))
    out.close()
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    made = {ext: write_clip(root / f"clip.{ext}") for ext in ("mp4", "webm", "mkv", "mov")}
    made["silent"] = write_clip(root / "silent.mp4", audio=False)
    made["audio_only"] = write_clip(root / "tone_only.mp4", video=False)
    return made


@pytest.fixture(scope="module")
def model():
    return random_tiny_model()


def make_bad_files(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    bad = {"truncated": folder / "truncated.mp4", "empty": folder / "empty.mp4",
           "audio_only": folder / "audio_only.mp4", "text": folder / "notes.mp4"}
    bad["truncated"].write_bytes(data[: len(data) // 2])  # the mp4 index (moov) is at the end: cut off
    bad["empty"].write_bytes(b"")
    write_clip(bad["audio_only"], video=False)
    bad["text"].write_text("this is not a video, only text named .mp4\n")
    return bad


# ---- decoding ----
@pytest.mark.parametrize("ext", ["mp4", "webm", "mkv", "mov"])
@pytest.mark.parametrize("seek", [False, True])
def test_frames_are_sampled_uniformly_and_are_the_right_frames(clips, ext, seek):
    clip = read_video(clips[ext], VideoFileOptions(num_frames=8, seek=seek))
    assert clip.fps == FPS and abs(clip.duration - SECONDS) < 0.05
    assert len(clip.frames) == 8 and clip.indices == sample_frame_indices(N_FRAMES, 8) == [3, 9, 15, 21, 27, 33, 39, 45]
    assert clip.times == pytest.approx([k / FPS for k in clip.indices], abs=1e-3)
    for k, frame in zip(clip.indices, clip.frames):  # the decoded picture is frame k: the square is where k drew it
        dark = np.asarray(frame.convert("L"))[26:38] < 100  # rows inside the square, (12, SIDE)
        left = int(np.argmax(dark.mean(0) > 0.5))
        assert frame.size == (SIDE, SIDE) and abs(left - square_x(k)) <= 1, (k, left, square_x(k))


def test_a_long_file_is_read_by_seeking_not_by_decoding_it_all(tmp_path, monkeypatch):
    import onepeace.data.video_file as video_file

    path = write_clip(tmp_path / "long.mp4", audio=False, seconds=60.0, fps=4)  # 240 frames, over seek_after_s
    monkeypatch.setattr(video_file, "_scan_frames", lambda *a: pytest.fail("a long file was scanned frame by frame"))
    clip = read_video(path, VideoFileOptions(num_frames=5))
    assert clip.duration == pytest.approx(60.0, abs=0.5) and clip.indices == sample_frame_indices(240, 5)
    for k, frame in zip(clip.indices, clip.frames):
        dark = np.asarray(frame.convert("L"))[26:38] < 100
        assert abs(int(np.argmax(dark.mean(0) > 0.5)) - square_x(k, 240)) <= 1


def test_frame_count_by_rate_and_the_cap(clips):
    assert read_video(clips["mp4"], VideoFileOptions(fps=1.0)).indices == sample_frame_indices(N_FRAMES, 2)
    capped = read_video(clips["mp4"], VideoFileOptions(fps=100.0, max_frames=5))
    assert capped.indices == sample_frame_indices(N_FRAMES, 5)
    assert len(read_video(clips["mp4"], VideoFileOptions(num_frames=1)).frames) == 1
    with pytest.raises(ValueError, match="fps"):
        VideoFileOptions(fps=0)


@pytest.mark.parametrize("ext", ["mp4", "webm"])
def test_the_audio_track_is_decoded_mono_at_the_requested_rate(clips, ext):
    clip = read_video(clips[ext], audio_rate=16000)
    wave, rate = clip.audio
    assert rate == 16000 and wave.dtype == np.float32 and wave.ndim == 1
    assert abs(wave.shape[0] / rate - SECONDS) < 0.1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * rate / wave.shape[0] - TONE) < 5  # the tone we wrote
    short = read_video(clips[ext], VideoFileOptions(max_audio_seconds=0.5), audio_rate=8000)
    assert short.audio[1] == 8000 and short.audio[0].shape[0] == 4000
    assert read_video(clips["silent"]).audio is None
    assert read_video(clips[ext], VideoFileOptions(audio=False)).audio is None


def test_bad_files_raise_input_errors_naming_them(tmp_path, clips):
    from onepeace.data.image import InputError

    bad = make_bad_files(tmp_path, clips["mp4"])
    expected = {"truncated": "Invalid data", "empty": "empty (0 bytes)", "audio_only": "no video stream",
                "text": "Invalid data"}
    for kind, path in bad.items():
        with pytest.raises(InputError, match="cannot read video") as e:
            read_video(path)
        assert str(path) in str(e.value) and expected[kind] in str(e.value)
    with pytest.raises(InputError, match="file not found"):
        read_video(tmp_path / "missing.mp4")


# ---- encode_video ----
def test_encode_video_is_the_frame_average_the_audio_track_and_their_fusion(model, clips):
    out = model.encode_video([clips["mp4"], clips["silent"]], num_frames=6)
    assert out.frames.shape == out.audio.shape == out.fused.shape == (2, 64)
    assert out.has_audio.tolist() == [True, False]
    for name in ("frames", "fused"):
        assert torch.allclose(getattr(out, name).norm(dim=-1), torch.ones(2), atol=1e-5)
    # by hand: the sampled frames through the image branch, averaged, normalised
    clip = read_video(clips["mp4"], VideoFileOptions(num_frames=6))
    by_hand = torch.nn.functional.normalize(model.encode_image(clip.frames).mean(0), dim=-1)
    assert torch.allclose(out.frames[0], by_hand, atol=1e-5)
    assert torch.allclose(out.audio[0], model.encode_audio([clip.audio])[0], atol=1e-5)
    assert torch.allclose(out.fused[0], torch.nn.functional.normalize(by_hand + out.audio[0], dim=-1), atol=1e-5)
    # no audio track: a NaN row, masked, and the fused embedding is the frame average
    assert torch.isnan(out.audio[1]).all() and torch.equal(out.fused[1], out.frames[1])
    assert out.times[0] == pytest.approx([(i + 0.5) * SECONDS / 6 for i in range(6)], abs=1 / FPS)
    # audio=False: frames only; the registry path (encode_items) gives the fused embedding
    assert not model.encode_video([clips["mp4"]], num_frames=6, audio=False).has_audio.any()
    assert torch.allclose(model.encode_items("video", [str(clips["mp4"])])[0],
                          model.encode_video([clips["mp4"]]).fused[0], atol=1e-6)


def test_a_model_with_a_trained_video_branch_reads_video_files_with_it(clips):
    from onepeace.modalities.video import VideoAdapterConfig, read_frames, video_transform

    model = random_tiny_model()
    model.add_modality("video", VideoAdapterConfig(num_frames=4, image_size=64), init_from="image")
    model.eval()
    frames = read_frames(str(clips["mp4"]), 4)
    assert [np.asarray(f).tolist() for f in frames] == [
        np.asarray(f).tolist() for f in read_video(clips["mp4"], VideoFileOptions(num_frames=4)).frames]
    with torch.no_grad():
        branch = model(video=video_transform(model)(str(clips["mp4"]))[None]).embeddings["video"][0]
    got = model.encode_items("video", [str(clips["mp4"])])[0]
    assert torch.allclose(got, branch, atol=1e-5)
    assert not torch.allclose(got, model.encode_video([clips["mp4"]]).fused[0], atol=1e-3)  # not the frame average


def test_the_library_imports_without_pyav_and_says_which_extra(tmp_path, clips):
    code = ("import sys; sys.modules['av'] = None\n"
            "import onepeace\n"
            "from onepeace.data.video_file import read_video\n"
            f"read_video({str(clips['mp4'])!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "pip install 'onepeace[video]'" in r.stderr, r.stderr[-2000:]


# ---- embed / index / search / serve ----
def test_embed_keeps_good_videos_and_reports_each_bad_one(tmp_path, clips, tiny_model_dir, capsys):
    from onepeace.cli import main
    from onepeace.embeddings_file import read_embeddings

    folder = tmp_path / "videos"
    bad = make_bad_files(folder, clips["mp4"])
    for key in ("mp4", "webm", "silent"):
        shutil.copy(clips[key], folder / clips[key].name)
    shutil.copy(ASSETS / "dog.JPEG", folder / "dog.JPEG")
    out = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(tiny_model_dir), str(folder), "-o", str(out), "-q"]) == 0
    err = capsys.readouterr().err
    data = read_embeddings(out)
    names = {Path(f).name: m for f, m in zip(data.files, data.modalities)}
    assert names == {"clip.mp4": "video", "clip.webm": "video", "silent.mp4": "video", "dog.JPEG": "image"}
    assert sorted(data.failed_files if hasattr(data, "failed_files") else [p for p, _ in data.failed]) == \
        sorted(str(p) for p in bad.values())
    for path in bad.values():
        assert f"skipped {path}: cannot read video" in err
    loaded = onepeace.load(tiny_model_dir)
    row = data.files.index(str(folder / "clip.mp4"))
    assert np.allclose(data.embeddings[row], loaded.encode_video([folder / "clip.mp4"]).fused[0].numpy(), atol=1e-5)


def test_index_and_search_find_videos_with_text_image_audio_and_video_queries(tmp_path, clips, tiny_model_dir, capsys):
    require_module("faiss", "serve")
    from onepeace.cli import main
    from onepeace.index import QueryPart, SearchIndex, embed_query

    folder = tmp_path / "collection"
    bad = make_bad_files(folder / "bad", clips["mp4"])
    for key in ("mp4", "mkv", "silent"):
        shutil.copy(clips[key], folder / clips[key].name)
    shutil.copy(ASSETS / "dog.JPEG", folder / "dog.JPEG")
    idx = tmp_path / "idx"
    assert main(["index", str(folder), "--model", str(tiny_model_dir), "--out", str(idx), "-q"]) == 0
    printed = capsys.readouterr().out
    for path in bad.values():
        assert f"failed {path}: cannot read video" in printed
    index = SearchIndex(idx)
    assert index.stats()["searchable"] == {"image": 1, "video": 3}
    model = onepeace.load(tiny_model_dir)
    model.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    videos = {str(folder / n) for n in ("clip.mp4", "clip.mkv", "silent.mp4")}
    for part in (QueryPart("text", "a square moving right"), QueryPart("image", str(ASSETS / "dog.JPEG")),
                 QueryPart("audio", str(ASSETS / "cow.flac"))):
        hits = index.search(embed_query(model, [part]), k=10, modality="video")
        assert {h["path"] for h in hits} == videos and all(h["modality"] == "video" for h in hits)
    # a clip as the query finds itself first (its own indexed vector; the other two share its picture
    # but also have the tone)
    assert main(["search", str(idx), "--video", str(folder / "silent.mp4"), "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"]
    assert result[0]["path"] == str(folder / "silent.mp4") and result[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert result[1]["score"] < 0.9999


def test_serve_sniffs_uploaded_video_containers(clips):
    from onepeace.serve.server import accepted, sniff

    assert sniff(clips["mp4"].read_bytes()[:64]) == ("video", ".mp4")
    assert sniff(clips["mov"].read_bytes()[:64]) == ("video", ".mov")
    assert sniff(clips["webm"].read_bytes()[:64]) == ("video", ".webm")
    assert sniff(clips["mkv"].read_bytes()[:64]) == ("video", ".mkv")
    assert set(accepted("video").split(", ")) == {"MP4", "MOV", "WEBM", "MKV"}


def test_serve_finds_videos_serves_them_and_takes_a_video_upload_as_query(tmp_path, clips, tiny_model_dir):
    import base64
    import threading

    require_module("faiss", "serve")
    from onepeace.index import IndexConfig, SearchIndex, build_index
    from onepeace.serve import ServeConfig, make_server
    from test_serve import call

    folder = tmp_path / "served"
    make_bad_files(folder / "bad", clips["mp4"])
    for key in ("mp4", "silent"):
        shutil.copy(clips[key], folder / clips[key].name)
    model = onepeace.load(tiny_model_dir)
    model.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    build_index(folder, tmp_path / "idx", model, tiny_model_dir, IndexConfig(), progress=False, log=lambda m: None)
    srv = make_server(SearchIndex(tmp_path / "idx"), model, ServeConfig(port=0, max_upload_bytes=200_000))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = "http://{}:{}".format(*srv.server_address[:2])
    try:
        query = {"text": "a square moving right", "modality": "video", "k": 5}
        status, out, _ = call(url, "POST", "/api/search", query)
        assert status == 200 and {Path(h["path"]).name for h in out["results"]} == {"clip.mp4", "silent.mp4"}
        hit = next(h for h in out["results"] if h["path"].endswith("clip.mp4"))
        status, body, ctype = call(url, "GET", hit["file_url"])
        assert status == 200 and body == (folder / "clip.mp4").read_bytes() and ctype == "video/mp4"
        upload = {"modality": "video", "data": base64.b64encode((folder / "silent.mp4").read_bytes()).decode(),
                  "filename": "query.mp4"}
        status, out, _ = call(url, "POST", "/api/search", {"parts": [upload], "k": 1})
        assert status == 200 and out["results"][0]["path"].endswith("silent.mp4")
        assert out["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        bad = {"modality": "video", "data": base64.b64encode(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64).decode(),
               "filename": "cut.mp4"}
        status, out, _ = call(url, "POST", "/api/search", {"parts": [bad]})
        assert status == 422 and "cut.mp4" in out["error"] and "cannot read video" in out["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_zero_shot_takes_video_files_without_a_video_branch(tmp_path, clips, tiny_model_dir, capsys):
    """The released weights have no video branch: zero-shot embeds a clip as encode_video's fused
    embedding (frames + track), in the library and the CLI; a bad clip is reported and skipped."""
    import json

    from onepeace.cli import main

    model = onepeace.load(tiny_model_dir)
    assert "video" not in model.adapters
    labels = ["a square", "a tone", "rain"]
    probs, classifier = model.zero_shot([clips["mp4"], clips["silent"]], labels)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    by_hand = classifier(model.encode_video([clips["mp4"], clips["silent"]]).fused)
    assert torch.allclose(probs, by_hand, atol=1e-6)
    bad = make_bad_files(tmp_path / "bad", clips["mp4"])["empty"]
    assert main(["zero-shot", str(clips["mp4"]), str(bad), "--labels", ",".join(labels), "--json",
                 "-m", str(tiny_model_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in out["results"]] == [str(clips["mp4"])]
    assert [s["file"] for s in out["skipped"]] == [str(bad)]
    assert [out["results"][0]["probs"][label] for label in labels] == pytest.approx(probs[0].tolist(), abs=1e-5)
