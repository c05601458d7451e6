"""The index folder as a transaction log that heals (issue 17, item 2; and item 3's index side):
the folder lock (a second run waits or says who holds it), the forced clean-up race, shards and FAISS
files deleted or corrupted and healed by the next run (search equal to a reference index's), a
corrupt meta.sqlite as a clear error, and non-finite embeddings never indexed."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import onepeace
from conftest import ASSETS, BPE_DIR, require
from onepeace.index import IndexConfig, IndexStore, QueryPart, SearchIndex, build_index, embed_query
from onepeace.index import store as store_module
from onepeace.index.lock import IndexLock, IndexLockedError
from onepeace.index.store import IndexCorruptError
from test_index import _faiss, model  # noqa: F401  (the same fixtures: faiss required, the tiny model)

TEXTS = ["a photo of a dog", "an elephant in the grass", "a cow says moo"]
N_FILES, N_ITEMS = 5, 7  # 2 photos, 2 sounds, captions.txt (3 lines)
QUERIES = [("image", "dog.JPEG"), ("audio", "cow.flac"), ("text", TEXTS[1])]


def make_data(root: Path) -> Path:
    (root / "photos").mkdir(parents=True)
    (root / "sounds").mkdir()
    for name in ("dog.JPEG", "elephant.JPEG"):
        shutil.copy(require(ASSETS / name), root / "photos" / name)
    for name in ("cow.flac", "dog.flac"):
        shutil.copy(require(ASSETS / name), root / "sounds" / name)
    (root / "captions.txt").write_text("\n".join(TEXTS) + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("hostile-index") / "data")


@pytest.fixture(scope="module")
def reference(data, model, tiny_model_dir, tmp_path_factory):
    """An index built once, undisturbed: what every healed index must answer."""
    out = tmp_path_factory.mktemp("reference") / "idx"
    build(data, out, model, tiny_model_dir)
    return out


def build(data, out, model, model_dir, log=None, **kw):
    return build_index(data, out, model, model_dir, IndexConfig(chunk_files=2), progress=False,
                       log=log or (lambda m: None), **kw)


def assert_consistent(out: Path, model_dir, n_items: int = N_ITEMS) -> None:
    """Every file recorded ok, every item's shard there with its recorded size and sha256 and the
    item's row, no shard or temporary file that no item names, and every FAISS file sound and
    holding exactly the items of its modality."""
    store = IndexStore(out)
    try:
        assert store.query("SELECT COUNT(*), SUM(status = 'ok') FROM files")[0] == (N_FILES, N_FILES)
        assert store.query("SELECT COUNT(*) FROM items")[0][0] == n_items
        records = {n: (r, z, h) for n, r, z, h in store.query("SELECT name, rows, size, sha256 FROM shards")}
        used = {s: m for s, m in store.query("SELECT shard, MAX(row) FROM items GROUP BY shard")}
        assert set(records) == set(used)
        assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(used)  # no orphan, no tmp file
        for shard, max_row in used.items():
            assert store.check_shard(shard, max_row, records[shard]) is None, shard
        mid = onepeace.index.model_id(model_dir)
        assert store.check_faiss(mid) == {}
        assert {m: c["n"] for m, c in store.info()["faiss_files"].items()} == store.item_counts(mid)
    finally:
        store.close()


def hits(out: Path, model, warnings: list | None = None) -> list[list[tuple[str, float]]]:
    """(item name relative to the data folder, score) of the top hits of each query in QUERIES."""
    index = SearchIndex(out, log=(warnings.append if warnings is not None else None))
    root = index.info["root"]
    try:
        result = []
        for modality, value in QUERIES:
            if modality != "text":
                value = str(Path(root) / ("photos" if modality == "image" else "sounds") / value)
            found = index.search(embed_query(model, [QueryPart(modality, value)]), k=N_ITEMS)
            result.append([(h["name"][len(root) + 1:], round(h["score"], 4)) for h in found])
        return result
    finally:
        index.close()


def assert_same_hits(a, b) -> None:
    assert [[n for n, _ in q] for q in a] == [[n for n, _ in q] for q in b]
    assert np.allclose([s for q in a for _, s in q], [s for q in b for _, s in q], atol=2e-3)


# ---- the lock ----

def test_a_second_run_fails_fast_or_waits_naming_the_holder(data, tmp_path, model, tiny_model_dir, capsys):
    out = tmp_path / "idx"
    with IndexLock(out, log=lambda m: None):  # another run holds the folder
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError) as e:
            build(data, out, model, tiny_model_dir, lock_timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert f"pid {os.getpid()} on host {socket.gethostname()} since" in str(e.value) and "--lock-timeout" in str(e.value)
        from onepeace.cli import main

        rc = main(["index", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--lock-timeout", "0",
                   "--bpe-dir", str(BPE_DIR), "-q"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is locked by pid {os.getpid()}" in err and "Traceback" not in err
    assert not (out / "shards").exists() or not any((out / "shards").iterdir())  # nothing was written

    # waiting (the default): the run says who it waits for, then runs when the holder is done
    hold_in_thread(out, seconds=1.0)  # another thread: filelock refuses an endless wait in the holder's thread
    said = []
    report = build(data, out, model, tiny_model_dir, log=said.append)
    assert any("is locked by pid" in m and "waiting for it" in m for m in said), said
    assert report.embedded_items == N_ITEMS
    assert_consistent(out, tiny_model_dir)


def test_job_array_shares_run_side_by_side_but_not_beside_a_plain_run(data, tmp_path, model, tiny_model_dir):
    out = tmp_path / "idx"
    with IndexLock(out, exclusive=False, rank=1, log=lambda m: None):  # rank 1 of a job array is running
        r0 = build(data, out, model, tiny_model_dir, rank=0, world_size=2)  # rank 0 runs beside it
        assert r0.scanned < N_FILES
        with pytest.raises(IndexLockedError, match="is locked by pid"):  # a plain run does not
            build(data, out, model, tiny_model_dir, lock_timeout=0.2)
        with pytest.raises(IndexLockedError):  # nor a second rank 1
            build(data, out, model, tiny_model_dir, rank=1, world_size=2, lock_timeout=0.2)
    build(data, out, model, tiny_model_dir, rank=1, world_size=2)
    final = build(data, out, model, tiny_model_dir)
    assert final.embedded_files == 0 and final.unchanged == N_FILES
    assert_consistent(out, tiny_model_dir)


def test_forced_cleanup_race_leaves_a_consistent_index_every_time(data, tmp_path, model, tiny_model_dir,
                                                                   monkeypatch):
    """Run A pauses between writing its first shard and committing it; meanwhile run B starts (its
    start-of-run clean-up deletes shards no row names), or, every other time, a clean-up that
    bypasses the lock (a second machine on a file system without flock) runs. 20 times."""
    real_write = store_module.atomic_write
    for attempt in range(20):
        out = tmp_path / f"idx{attempt}"
        written, cleaned = threading.Event(), threading.Event()
        runner = threading.current_thread()

        def paused_write(path, payload, _out=out, _w=written, _c=cleaned):
            real_write(path, payload)
            if path.parent == _out / "shards" and threading.current_thread() is not runner and not _w.is_set():
                _w.set()
                assert _c.wait(30), "the other run never started"

        monkeypatch.setattr(store_module, "atomic_write", paused_write)
        errors, said_b = [], []
        run_a = threading.Thread(target=lambda: _capture(errors, build, data, out, model, tiny_model_dir))
        run_a.start()
        assert written.wait(60), errors
        if attempt % 2 == 0:  # a second `onepeace index`: it must wait for A, then find all done
            def log_b(msg):
                said_b.append(msg)
                cleaned.set()

            report_b = build(data, out, model, tiny_model_dir, log=log_b)
            assert any("is locked by pid" in m for m in said_b) and report_b.embedded_files == 0
        else:  # a clean-up that ignores the lock: A's commit must notice and write its shard again
            store = IndexStore(out)
            assert store.collect_garbage() >= 1  # it did delete A's uncommitted shard
            store.close()
            cleaned.set()
        run_a.join(60)
        assert not errors, errors
        monkeypatch.setattr(store_module, "atomic_write", real_write)
        assert_consistent(out, tiny_model_dir)
        again = build(data, out, model, tiny_model_dir)  # and every later run is clean
        assert again.unchanged == N_FILES and not again.healed and not again.faiss_rebuilt


def hold_in_thread(out: Path, seconds: float) -> None:
    """Hold the folder's lock from another thread for `seconds` (returns once it is held)."""
    held = threading.Event()

    def hold():
        with IndexLock(out, log=lambda m: None):
            held.set()
            time.sleep(seconds)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)


def _capture(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # surfaced by the test thread
        errors.append(repr(e))


@pytest.mark.slow
def test_two_concurrent_index_commands_on_one_folder(data, tmp_path, tiny_model_dir):
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "onepeace", "index", str(data), "--model", str(tiny_model_dir), "--out", str(out),
           "--chunk-files", "1", "--bpe-dir", str(BPE_DIR), "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    wall = time.monotonic() - t0
    print(f"two concurrent runs: {wall:.1f} s wall; " + " | ".join(o.strip().splitlines()[-1] for o, _ in outs))
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert all("Traceback" not in e for _, e in outs)
    # one embedded everything, the other waited for it (saying so) and found everything done
    summaries = sorted(o for o, _ in outs)
    assert f"{N_FILES} files: 0 unchanged (skipped), {N_FILES} embedded" in "".join(summaries)
    assert f"{N_FILES} files: {N_FILES} unchanged (skipped), 0 embedded" in "".join(summaries)
    assert sum("is locked by pid" in e for _, e in outs) == 1
    assert_consistent(out, tiny_model_dir)


# ---- healing ----

def test_deleted_or_truncated_shard_and_bad_faiss_files_are_healed(data, reference, tmp_path, model, tiny_model_dir):
    out = tmp_path / "idx"
    build(data, out, model, tiny_model_dir)
    expected = hits(reference, model)
    store = IndexStore(out)
    by_shard = dict(store.query("SELECT shard, COUNT(DISTINCT file) FROM items GROUP BY shard"))
    store.close()
    deleted, truncated = sorted(by_shard)[:2]
    (out / "shards" / deleted).unlink()
    path = out / "shards" / truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    said = []
    report = build(data, out, model, tiny_model_dir, log=said.append)
    whys = {s: w for s, w, _ in report.healed}
    assert set(whys) == {deleted, truncated} and whys[deleted] == "missing" and "truncated" in whys[truncated]
    assert report.embedded_files == by_shard[deleted] + by_shard[truncated]  # exactly what they held
    assert any(deleted in m and "re-embedding" in m for m in said) and "healed 2 bad shard(s)" in report.summary()
    assert_consistent(out, tiny_model_dir)
    assert_same_hits(hits(out, model), expected)

    # a deleted FAISS file: search falls back to the shards (with a warning), the next run rebuilds it
    (out / "faiss" / "image.faiss").unlink()
    warned = []
    assert_same_hits(hits(out, model, warned), expected)
    assert warned and "image.faiss is missing" in warned[0] and "exactly" in warned[0]
    # a corrupted one (same size, bytes flipped in the middle) and a truncated one
    f = out / "faiss" / "audio.faiss"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    f.write_bytes(bytes(raw))
    t = out / "faiss" / "text.faiss"
    t.write_bytes(t.read_bytes()[:100])
    warned = []
    assert_same_hits(hits(out, model, warned), expected)
    assert sorted(re.search(r"(\w+)\.faiss", w).group(1) for w in warned) == ["audio", "image", "text"]
    report = build(data, out, model, tiny_model_dir)
    assert sorted(report.faiss_rebuilt) == ["audio", "image", "text"] and report.embedded_files == 0
    assert "corrupt" in report.faiss_rebuilt["audio"] and "missing" in report.faiss_rebuilt["image"]
    assert_consistent(out, tiny_model_dir)
    warned = []
    assert_same_hits(hits(out, model, warned), expected)
    assert warned == []  # rebuilt: FAISS again, no fallback


def test_an_index_from_before_the_records_is_checked_and_recorded(data, tmp_path, model, tiny_model_dir):
    out = tmp_path / "idx"
    build(data, out, model, tiny_model_dir)
    store = IndexStore(out)
    with store.transaction() as db:  # what an index written by the previous version looks like
        db.execute("DELETE FROM shards")
        db.execute("DELETE FROM info WHERE key = 'faiss_files'")
    store.close()
    report = build(data, out, model, tiny_model_dir)
    assert report.embedded_files == 0 and not report.healed  # sound shards: nothing re-embedded
    assert all("no recorded checksum" in why for why in report.faiss_rebuilt.values()) and report.faiss_rebuilt
    assert_consistent(out, tiny_model_dir)


def test_garbage_meta_sqlite_header_is_a_clear_error(data, tmp_path, model, tiny_model_dir, capsys):
    from onepeace.cli import main

    out = tmp_path / "idx"
    build(data, out, model, tiny_model_dir)
    db = out / "meta.sqlite"
    raw = bytearray(db.read_bytes())
    raw[:16] = b"garbage garbage!"
    db.write_bytes(bytes(raw))
    for wal in out.glob("meta.sqlite-*"):
        wal.unlink()
    with pytest.raises(IndexCorruptError, match="meta.sqlite is corrupt") as e:
        build(data, out, model, tiny_model_dir)
    assert str(db) in str(e.value) and "onepeace index" in str(e.value)
    with pytest.raises(IndexCorruptError, match=re.escape(str(db))):
        SearchIndex(out)
    assert main(["search", str(out), "--text", "a dog", "--bpe-dir", str(BPE_DIR)]) == 2
    err = capsys.readouterr().err
    assert f"{db} is corrupt" in err and "Rebuild the index" in err and "Traceback" not in err


# ---- numbers that are not numbers ----

def test_a_non_finite_embedding_is_reported_and_never_indexed(data, tmp_path, model, tiny_model_dir, monkeypatch):
    import onepeace.inference as inference

    real = inference.embed_entries

    def nan_for_cow(model, modality, group, on_error, batch_size=None):
        names, emb = real(model, modality, group, on_error, batch_size)
        bad = [i for i, n in enumerate(names) if n.endswith("cow.flac")]
        emb = emb.clone()
        emb[bad] = float("nan")
        return names, emb

    monkeypatch.setattr(inference, "embed_entries", nan_for_cow)
    out = tmp_path / "idx"
    said = []
    report = build(data, out, model, tiny_model_dir, log=said.append)
    [(path, why)] = report.failed
    assert path.endswith("cow.flac") and "not finite" in why and any("cow.flac" in m for m in said)
    assert report.embedded_items == N_ITEMS - 1
    store = IndexStore(out)
    for (shard,) in store.query("SELECT DISTINCT shard FROM items"):
        assert np.isfinite(np.load(out / "shards" / shard)).all()
    assert store.item_counts(onepeace.index.model_id(tiny_model_dir))["audio"] == 1
    store.close()


def test_a_real_overflowing_audio_file_is_never_indexed(tmp_path, model, tiny_model_dir):
    """An audio file of finite 1e38 samples (float32 max ~3.4e38): whatever the library does with
    it (a clear error, or an embedding that is not finite), no NaN reaches a shard."""
    data = make_data(tmp_path / "data")
    sf.write(data / "sounds" / "loud.wav", np.full(16000, 1e38, np.float32), 16000, subtype="FLOAT")
    out = tmp_path / "idx"
    report = build(data, out, model, tiny_model_dir)
    store = IndexStore(out)
    for (shard,) in store.query("SELECT DISTINCT shard FROM items"):
        assert np.isfinite(np.load(out / "shards" / shard)).all()
    indexed = [n for (n,) in store.query("SELECT name FROM items WHERE modality = 'audio'")]
    store.close()
    loud_failed = [why for p, why in report.failed if p.endswith("loud.wav")]
    print(f"loud.wav: {'failed: ' + loud_failed[0] if loud_failed else 'indexed (finite embedding)'}")
    assert loud_failed or any(n.endswith("loud.wav") for n in indexed)  # reported, or finite and indexed


def test_query_weights_that_overflow_still_give_the_query(model, reference):
    parts = lambda w: [QueryPart("text", "a cow", w), QueryPart("image", str(ASSETS / "dog.JPEG"), w)]
    huge, plain = embed_query(model, parts(1e308)), embed_query(model, parts(1.0))
    assert np.isfinite(huge).all() and np.allclose(huge, plain, atol=1e-6)
    index = SearchIndex(reference)
    assert len(index.search(huge, k=3)) == 3
    with pytest.raises(ValueError, match="not finite"):
        index.search(np.full(index.dim, np.nan, np.float32))
    with pytest.raises(ValueError, match="finite"):
        embed_query(model, [QueryPart("text", "a cow", float("inf"))])
    index.close()
