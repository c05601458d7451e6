"""`onepeace index` / `onepeace search`: resumable, incremental indexing, FAISS choice, composed queries."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import onepeace
from conftest import ASSETS, BPE_DIR, CAPTIONS, make_collection, require_module
from onepeace.index import IndexConfig, IndexStore, QueryPart, SearchIndex, build_index, embed_query
from onepeace.index.build import rank_of
from onepeace.index.search import parse_weights
from onepeace.index.store import choose_faiss

N_FILES, N_ITEMS = 15, 17  # make_collection: 9 images (1 corrupt) + 4 audio + 2 text files; 8 + 4 + 5 items


@pytest.fixture(autouse=True, scope="module")
def _faiss():
    require_module("faiss", "serve")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = onepeace.load(tiny_model_dir)
    m.tokenizer = onepeace.get_tokenizer(BPE_DIR)
    return m


@pytest.fixture()
def collection(tmp_path):
    return make_collection(tmp_path / "data")


def build(collection, out, model, model_dir, **kw):
    cfg = IndexConfig(**{"chunk_files": 4, **kw.pop("config", {})})
    return build_index(collection, out, model, model_dir, cfg, progress=False, log=lambda m: None, **kw)


def test_index_everything_report_corrupt_file_and_search(collection, tmp_path, model, tiny_model_dir):
    report = build(collection, tmp_path / "idx", model, tiny_model_dir)
    assert report.scanned == N_FILES and report.embedded_items == N_ITEMS
    assert report.embedded_files == N_FILES - 1 and report.chunks == 4  # ceil(15 / 4)
    [(path, why)] = report.failed
    assert path.endswith("broken.jpg") and "broken.jpg" in why and "image" in why

    store = IndexStore(tmp_path / "idx")
    rows = store.query("SELECT path, modality, size, mtime_ns, model_id, status FROM files ORDER BY path")
    assert len(rows) == N_FILES
    for path, modality, size, mtime_ns, mid, status in rows:
        assert (size, mtime_ns) == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
        assert mid == onepeace.index.model_id(tiny_model_dir) and status == ("failed" if "broken" in path else "ok")
    assert store.counts()["items"] == {"image": 8, "audio": 4, "text": 5}
    assert store.info()["faiss"]["image"]["kind"] == "flat-ip"
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved-model")
    assert onepeace.index.model_id(moved) == onepeace.index.model_id(tiny_model_dir)  # moving keeps the id

    index = SearchIndex(tmp_path / "idx")
    # an indexed file as the query finds itself first, with cosine ~1; modality filter holds
    photo = str(collection / "photos" / "elephant.JPEG")
    hits = index.search(embed_query(model, [QueryPart("image", photo)]), k=3, modality="image")
    assert hits[0]["path"] == str((collection / "photos" / "elephant.JPEG").resolve()) and hits[0]["score"] > 0.999
    assert [h["modality"] for h in hits] == ["image"] * 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    hits = index.search(embed_query(model, [QueryPart("text", CAPTIONS[4])]), k=2, modality="text")
    assert hits[0]["text"] == CAPTIONS[4] and hits[0]["name"].endswith("manifest.jsonl:3")
    hits = index.search(embed_query(model, [QueryPart("audio", str(ASSETS / "cow.flac"))]), k=N_ITEMS)
    assert hits[0]["name"].endswith("cow.flac") and len(hits) == N_ITEMS  # all modalities searched


def _committed_files(db) -> int:
    """Files the indexing process has committed so far (0 while its database is not there yet)."""
    import sqlite3

    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    except sqlite3.OperationalError:  # created but its tables not yet
        return 0


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_done_files(collection, tmp_path, tiny_model_dir):
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "onepeace", "index", str(collection), "--model", str(tiny_model_dir), "--out", str(out),
           "--chunk-files", "2", "--bpe-dir", str(BPE_DIR), "-q"]
    # kill the run for real (SIGKILL, no cleanup) once it has committed two chunks of its eight
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _committed_files(out / "meta.sqlite") < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    stderr = proc.communicate()[1].decode(errors="replace")
    assert proc.returncode == -9, f"the run ended before the kill (rc {proc.returncode}): {stderr[-2000:]}"
    store = IndexStore(out)
    done = store.files()
    ok = sum(v[3] == "ok" for v in done.values())
    print(f"killed with {len(done)} of {N_FILES} files committed ({ok} ok)")
    assert 4 <= len(done) < N_FILES and len(done) % 2 == 0  # whole chunks only
    assert not (out / "faiss").exists()  # killed before the merge
    # what the kill can lose: the shard of the chunk in flight, written but not committed
    referenced = {s for (s,) in store.query("SELECT DISTINCT shard FROM items")}
    assert len({p.name for p in (out / "shards").glob("*.npy")} - referenced) <= 1
    (out / "shards" / "r000-leftover.npy").write_bytes(b"half-written shard of the killed run")

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    embedded = N_FILES - ok - 1  # everything but the unchanged files and broken.jpg (failed again)
    assert f"{N_FILES} files: {ok} unchanged (skipped), {embedded} embedded" in rerun.stdout, rerun.stdout
    assert "broken.jpg" in rerun.stdout  # reported again in the summary
    assert not (out / "shards" / "r000-leftover.npy").exists()
    # the files of the killed run kept their rows (not re-embedded) and everything is searchable
    after = store.files()
    assert all(after[p] == v for p, v in done.items() if v[3] == "ok")
    assert sum(SearchIndex(out).stats()["searchable"].values()) == N_ITEMS


def test_reindex_updates_only_what_changed(collection, tmp_path, model, tiny_model_dir):
    out = tmp_path / "idx"
    build(collection, out, model, tiny_model_dir)
    changed = collection / "captions.txt"
    changed.write_text("a brand new caption\n")
    (collection / "sounds" / "tone660.wav").unlink()
    shutil.copy(ASSETS / "dog.JPEG", collection / "photos" / "dog2.jpg")
    time.sleep(0.01)
    report = build(collection, out, model, tiny_model_dir)
    assert (report.scanned, report.unchanged, report.removed, report.changed) == (N_FILES, N_FILES - 3, 1, 1)
    assert report.embedded_files == 2 and report.embedded_items == 2  # the new caption, dog2.jpg
    # broken.jpg is tried again (it may have been fixed) and reported again
    assert [p for p, _ in report.failed] == [str((collection / "photos" / "broken.jpg").resolve())]
    index = SearchIndex(out)
    texts = {h["text"] for h in index.search(embed_query(model, [QueryPart("text", "caption")]), k=50, modality="text")}
    assert "a brand new caption" in texts and CAPTIONS[0] not in texts and CAPTIONS[3] in texts
    audio = index.search(embed_query(model, [QueryPart("text", "tone")]), k=50, modality="audio")
    assert len(audio) == 3 and not any(h["name"].endswith("tone660.wav") for h in audio)
    # nothing changed: nothing embedded, the FAISS files are not rebuilt
    before = (out / "faiss" / "image.faiss").stat().st_mtime_ns
    again = build(collection, out, model, tiny_model_dir)
    assert again.embedded_files == 0 and again.unchanged == N_FILES - 1
    assert (out / "faiss" / "image.faiss").stat().st_mtime_ns == before


def test_ivf_above_threshold_is_recorded_and_finds_exact_items(tmp_path, model, tiny_model_dir):
    data = tmp_path / "texts"
    data.mkdir()
    lines = [f"caption number {i} about {w}" for i, w in enumerate(["dogs", "cats", "birds", "cows"] * 50)]
    (data / "many.txt").write_text("\n".join(lines))
    build(data, tmp_path / "idx", model, tiny_model_dir, config={"ivf_threshold": 100})
    faiss_info = IndexStore(tmp_path / "idx").info()["faiss"]["text"]
    assert faiss_info["kind"] == "ivf-flat-ip" and faiss_info["n"] == 200 and faiss_info["nlist"] >= 2
    # the same files with the default threshold: nothing re-embedded, FAISS rebuilt exact
    again = build(data, tmp_path / "idx", model, tiny_model_dir)
    assert again.embedded_files == 0 and again.faiss["text"].kind == "flat-ip"
    build(data, tmp_path / "idx", model, tiny_model_dir, config={"ivf_threshold": 100})
    index = SearchIndex(tmp_path / "idx")
    for i in (0, 77, 199):
        assert index.search(embed_query(model, [QueryPart("text", lines[i])]), k=1)[0]["text"] == lines[i]
    assert choose_faiss(1000, 50_000).kind == "flat-ip" and choose_faiss(100_000, 50_000).kind == "ivf-flat-ip"


def test_two_ranks_write_their_own_shards_and_rank0_merges(collection, tmp_path, model, tiny_model_dir):
    out = tmp_path / "idx"
    r1 = build(collection, out, model, tiny_model_dir, rank=1, world_size=2)
    assert not (out / "faiss").exists()  # only rank 0 merges
    r0 = build(collection, out, model, tiny_model_dir, rank=0, world_size=2)
    assert r0.scanned + r1.scanned == N_FILES and r0.embedded_items + r1.embedded_items == N_ITEMS
    store = IndexStore(out)
    for path, rank in store.query("SELECT path, rank FROM files"):
        assert rank == rank_of(path, 2)
    shards = {s for (s,) in store.query("SELECT DISTINCT shard FROM items")}
    assert {s[:4] for s in shards} == {"r000", "r001"}
    single = tmp_path / "single"
    build(collection, single, model, tiny_model_dir)
    assert SearchIndex(out).stats()["searchable"] == SearchIndex(single).stats()["searchable"]


@pytest.mark.slow
def test_torchrun_two_processes_one_shard_set_per_rank_merged(collection, tmp_path, tiny_model_dir):
    out = tmp_path / "idx"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "onepeace", "index", str(collection), "--model", str(tiny_model_dir), "--out", str(out),
                        "--chunk-files", "4", "--bpe-dir", str(BPE_DIR), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    store = IndexStore(out)
    assert {rank for (rank,) in store.query("SELECT DISTINCT rank FROM files")} == {0, 1}
    assert {s[:4] for (s,) in store.query("SELECT DISTINCT shard FROM items")} == {"r000", "r001"}
    assert sum(SearchIndex(out).stats()["searchable"].values()) == N_ITEMS  # rank 0 merged both


def test_composed_query_is_the_renormalised_weighted_sum(model):
    a = model.encode_text(["a dog"])[0].numpy()
    b = model.encode_image([str(ASSETS / "dog.JPEG")])[0].numpy()
    q = embed_query(model, [QueryPart("text", "a dog", 0.3), QueryPart("image", str(ASSETS / "dog.JPEG"), 1.5)])
    expected = (0.3 * a + 1.5 * b) / np.linalg.norm(0.3 * a + 1.5 * b)
    assert np.allclose(q, expected, atol=1e-5) and abs(np.linalg.norm(q) - 1) < 1e-5
    with pytest.raises(ValueError, match="cancel out"):
        embed_query(model, [QueryPart("text", "a dog", 1.0), QueryPart("text", "a dog", -1.0)])
    with pytest.raises(ValueError, match="missing.png"):
        embed_query(model, [QueryPart("image", "missing.png")])
    parts = [("text", "x"), ("image", "y"), ("audio", "z")]
    assert parse_weights(["0.5", "1", "2"], parts) == [0.5, 1.0, 2.0]
    assert parse_weights(["audio=3"], parts) == [1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="2 weights for 3"):
        parse_weights(["1", "2"], parts)
    with pytest.raises(ValueError, match="no query part has modality 'video'"):
        parse_weights(["video=1"], parts)


def test_search_command_json_and_table(collection, tmp_path, model, tiny_model_dir, capsys):
    from onepeace.cli import main

    build(collection, tmp_path / "idx", model, tiny_model_dir)
    cow = str(ASSETS / "cow.flac")
    assert main(["search", str(tmp_path / "idx"), "--audio", cow, "--text", "a cow", "--weights", "text=0.2",
                 "--modality", "audio", "-k", "3", "--json", "--bpe-dir", str(BPE_DIR)]) == 0
    out = json.loads(capsys.readouterr().out)
    # parts in command-line order (audio, then text), text=0.2 applies to the text part
    assert [(p["modality"], p["weight"]) for p in out["query"]] == [("audio", 1.0), ("text", 0.2)]
    assert len(out["results"]) == 3
    assert out["results"][0]["name"].endswith("cow.flac") and {r["modality"] for r in out["results"]} == {"audio"}
    assert main(["search", str(tmp_path / "idx"), "--text", CAPTIONS[1], "-k", "2", "--bpe-dir", str(BPE_DIR)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "modality", "item"]
    assert table[1].split()[:3] == ["1", "1.000", "text"] and CAPTIONS[1] in table[1] and "captions.txt:2" in table[1]
    assert main(["search", str(tmp_path / "idx"), "--image", "nowhere.png"]) == 2
    assert "nowhere.png" in capsys.readouterr().err
    # a model with other weights is refused: its queries are not comparable with the indexed vectors
    other = onepeace.checkpoint.save_converted(onepeace.create_model("one-peace-tiny"), tmp_path / "other-model")
    assert main(["search", str(tmp_path / "idx"), "--model", str(other), "--text", "a cow"]) == 2
    err = capsys.readouterr().err
    assert "other-model" in err and onepeace.index.model_id(tiny_model_dir) in err and "re-index" in err


def test_library_imports_without_the_serve_extra():
    code = ("import sys; sys.modules['faiss'] = None\n"
            "import onepeace, onepeace.index, onepeace.serve\n"
            "try:\n    onepeace.index.SearchIndex('x')\nexcept ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install 'onepeace[serve]'" in r.stdout
