"""Loopback load test of `onepeace serve`: this tree's server against an OLD one (a git ref) in the
same run, each in its own process on a free port, with the same index and model.

    python benchmarks/serve_load.py                       # a small index built now (seeded tiny model)
    python benchmarks/serve_load.py INDEX --old-ref d57491c --clients 1 4 16 --seconds 10
    python benchmarks/serve_load.py INDEX --no-old        # this tree only
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # load only, an already running server

Per server it measures:
- requests/s and p50/p99 latency of /api/search for 1, 4 and 16 concurrent clients, each a closed
  loop over text queries (every query is embedded by the model and searched; nothing is cached);
- idle connections: N silent connections are opened; how many the server still holds after
  --idle-wait seconds (and when the last one was closed), and whether a query is answered meanwhile;
- a normal query's latency alone and while a large audio upload (a FLAC of silence at 192 kHz, 8
  channels: a small file that decodes to hundreds of MB) is being processed;
- N concurrent bodies of the largest size the default limits allow (~112 MB each): their statuses
  and the growth of the server's peak RSS;
- the server's peak RSS (VmHWM) after each phase.
The old server is `git archive REF onepeace` unpacked in a temp folder and run with PYTHONPATH there.
Errors in the load rows must be 0.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONEPEACE_SHARED", REPO.parent / "shared"))
TEXTS = ["a silhouette of a cow", "the number seven", "a picture of a bird", "an elephant", "the digit zero",
         "a drawing of a horse", "a giraffe", "the number three"]


# ---- the index (when none is given) ----
def make_index(folder: Path) -> Path:
    """A seeded one-peace-tiny model (random weights, the packaged tokenizer) and an index of the
    shared assets plus a captions file -> the index folder."""
    import shutil

    import torch

    import onepeace
    from onepeace.checkpoint import save_converted
    from onepeace.index import IndexConfig, build_index

    torch.manual_seed(0)
    model = onepeace.create_model("one-peace-tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model_dir = save_converted(model, folder / "model")
    model = onepeace.load(model_dir)
    data = folder / "data"
    data.mkdir(parents=True)
    for f in sorted((SHARED / "assets").glob("*")):
        shutil.copy(f, data / f.name)
    (data / "captions.txt").write_text("\n".join(TEXTS) + "\n")
    build_index(data, folder / "index", model, model_dir, IndexConfig(), progress=False, log=lambda m: None)
    return folder / "index"


def audio_bomb(path: Path, seconds: float, rate: int = 192_000, channels: int = 8) -> Path:
    """A FLAC of silence: tiny on disk, `seconds * rate * channels` samples once decoded."""
    import numpy as np
    import soundfile as sf

    block = np.zeros((rate, channels), dtype=np.int16)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return path


# ---- servers in subprocesses ----
class ServerProcess:
    """`python -m onepeace serve INDEX --port 0` with PYTHONPATH=`tree`; url from its first line."""

    def __init__(self, label: str, tree: Path, index: Path, extra: list[str]):
        self.label = label
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, "-m", "onepeace", "serve", str(index), "--port", "0", "--torch-threads", "1", *extra]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=tree)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.log.seek(0)
            raise RuntimeError(f"{label} server did not start: {line}{self.log.read().decode()[-2000:]}")
        self.url = line.split(" on ")[1].split("/ ")[0]
        self.host, self.port = self.url.removeprefix("http://").split(":")
        self.port = int(self.port)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tracebacks(self) -> int:
        self.log.seek(0)
        return self.log.read().decode(errors="replace").count("Traceback")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def old_tree(ref: str, into: Path) -> Path:
    """onepeace/ as it was at `ref` (git archive), unpacked under `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "onepeace"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


# ---- measurements ----
def query(server, body: dict, timeout: float = 120) -> tuple[int, float]:
    """(status, seconds) of one POST /api/search on a fresh connection."""
    import http.client

    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.request("POST", "/api/search", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.perf_counter() - t0


def idle_connections(server, n: int, wait: float) -> str:
    """Open n silent connections; a query meanwhile; how many are still open after `wait` s."""
    socks = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(n)]
    status, took = query(server, {"text": TEXTS[0], "k": 5})
    t0, open_ = time.perf_counter(), set(socks)
    last_close = None
    while open_ and time.perf_counter() - t0 < wait:
        ready, _, _ = select.select(list(open_), [], [], 0.2)
        for s in ready:
            try:
                data = s.recv(1024)
            except OSError:
                data = b""
            if not data:
                open_.discard(s)
                last_close = time.perf_counter() - t0
    for s in socks:
        s.close()
    closed = n - len(open_)
    when = f"all closed after {last_close:.1f} s" if not open_ else f"{len(open_)} still open after {wait:.0f} s"
    return f"{n} idle: {when} ({closed} closed); a query meanwhile: HTTP {status} in {took * 1000:.0f} ms"


def query_during_upload(server, bomb: Path) -> str:
    """Median latency of 5 text queries alone; then queries every 0.25 s for as long as the audio bomb's
    upload is being answered: their median and worst latency."""
    body = {"text": TEXTS[1], "modality": None, "k": 5}
    alone = sorted(query(server, body)[1] for _ in range(5))[2]
    upload = {"parts": [{"modality": "audio", "data": base64.b64encode(bomb.read_bytes()).decode(),
                         "filename": bomb.name}], "k": 5}
    result: list = []
    thread = threading.Thread(target=lambda: result.append(query(server, upload, timeout=600)))
    thread.start()
    time.sleep(0.3)  # the upload is read and being decoded
    during = []
    while thread.is_alive() or not during:
        during.append(query(server, body))
        time.sleep(0.25)
    thread.join()
    status, took = result[0] if result else ("no answer", float("nan"))
    lat = sorted(t for _, t in during)
    return (f"query alone {alone * 1000:.0f} ms; during a {bomb.stat().st_size // 1024} KB FLAC upload: "
            f"{len(during)} queries, median {lat[len(lat) // 2] * 1000:.0f} ms, worst {lat[-1] * 1000:.0f} ms "
            f"(statuses {sorted({s for s, _ in during})}); the upload: HTTP {status} in {took:.1f} s")


def heavy_bodies(server, n: int, upload_mb: int = 10, parts: int = 8) -> str:
    """n concurrent bodies of the largest size the default limits take (8 parts of 10 MiB, base64:
    ~112 MB each; garbage behind a PNG signature, so each is refused after decoding): statuses, and
    how much the server's peak RSS grew."""
    blob = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(upload_mb * 1024 * 1024 - 8)).decode()
    body = json.dumps({"parts": [{"modality": "image", "data": blob, "filename": f"big{i}.png"}
                                 for i in range(parts)]}).encode()
    del blob
    before = server.peak_rss_mb()

    def send() -> int:
        import http.client

        conn = http.client.HTTPConnection(server.host, server.port, timeout=300)
        try:
            conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except OSError as e:  # refused before the body was read: the server closed the connection
            return f"{type(e).__name__}"
        finally:
            conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        statuses = list(pool.map(lambda _: send(), range(n)))
    return (f"{n} concurrent {len(body) / 1e6:.0f} MB bodies: statuses {sorted(map(str, statuses))} in "
            f"{time.perf_counter() - t0:.1f} s; peak RSS {before:.0f} -> {server.peak_rss_mb():.0f} MB")


def run_server(server, args, bomb: Path, rows: dict) -> list[str]:
    """Every measurement of one server -> report lines; its load rows go to rows[clients][label]."""
    from onepeace.serve.loadtest import LoadResult, run_load

    lines = [f"== {server.label}: {server.url}"]
    bodies = [{"text": t, "modality": args.modality or None, "k": 10} for t in TEXTS]
    run_load(server.url, bodies[:2], clients=1, seconds=1.0)  # warm-up (tokenizer, first allocations)
    lines.append(f"   {LoadResult.HEADER}")
    for n in args.clients:
        result = run_load(server.url, bodies, clients=n, seconds=args.seconds)
        rows.setdefault(n, {})[server.label] = result
        lines.append(f"   {result.line()}" + (f"   first error: {result.first_error}" if result.errors else ""))
        print(lines[-1], flush=True)
    lines.append(f"   peak RSS after load: {server.peak_rss_mb():.0f} MB")
    if args.idle:
        lines.append("   " + idle_connections(server, args.idle, args.idle_wait))
        print(lines[-1], flush=True)
    if args.heavy:
        lines.append("   " + heavy_bodies(server, args.heavy))
        print(lines[-1], flush=True)
    lines.append("   " + query_during_upload(server, bomb))
    lines.append(f"   peak RSS after the upload: {server.peak_rss_mb():.0f} MB; tracebacks in its log: {server.tracebacks()}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", help="index folder (default: a small one built now)")
    ap.add_argument("--url", help="only the load rows, against an already running server")
    ap.add_argument("--old-ref", default="d57491c", help="git ref of the old server (default d57491c)")
    ap.add_argument("--no-old", action="store_true", help="this tree's server only")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--modality", default="image", help="target modality of the queries ('' for all)")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections to open (0: skip)")
    ap.add_argument("--idle-wait", type=float, default=15.0, help="seconds to wait for the server to close them")
    ap.add_argument("--heavy", type=int, default=4, help="concurrent largest-size bodies to send (0: skip)")
    ap.add_argument("--bomb-seconds", type=float, default=60.0, help="length of the audio upload (192 kHz, 8 ch)")
    args = ap.parse_args()
    if args.url:
        from onepeace.serve.loadtest import LoadResult, run_load

        print(LoadResult.HEADER)
        for n in args.clients:
            print(run_load(args.url, [{"text": t, "k": 10} for t in TEXTS], clients=n, seconds=args.seconds).line())
        return 0
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        index = Path(args.index) if args.index else make_index(tmp / "fixture")
        bomb = audio_bomb(tmp / "bomb.flac", args.bomb_seconds)
        # both get the same limits; the new one also its idle timeout (the old one has none)
        trees = [("new (this tree)", REPO, ["--idle-timeout", "5"])]
        if not args.no_old:
            old = tmp / "old"
            old.mkdir()
            trees.append((f"old ({args.old_ref})", old_tree(args.old_ref, old), []))
        report, rows = [], {}
        for label, tree, extra in trees:
            server = ServerProcess(label, tree, index, extra)
            try:
                report += run_server(server, args, bomb, rows)
            finally:
                server.stop()
        print("\n".join(report + [""] + side_by_side(rows, [t[0] for t in trees])))
    return 1 if any(r.errors for per in rows.values() for r in per.values()) else 0


def side_by_side(rows: dict, labels: list[str]) -> list[str]:
    """The load rows as one table: per number of clients, req/s and p50/p99 of each server."""
    names = [label.split(" ")[0] for label in labels]  # "new", "old"
    out = [f"{'clients':>7}" + "".join(f" {n + ' req/s':>10} {n + ' p50':>8} {n + ' p99':>8}" for n in names)]
    for n, per in rows.items():
        cells = [per.get(label) for label in labels]
        out.append(f"{n:>7}" + "".join(f" {r.rps:>10.1f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f}" if r else f" {'-':>28}"
                                       for r in cells))
    return out + ["(" + "; ".join(labels) + "; latencies in ms)"]


if __name__ == "__main__":
    sys.exit(main())
