"""A bounded loopback load test: N client threads POST to /api/search for a fixed time.

Each client keeps one HTTP/1.1 connection and sends its next request as soon as the last answer is
read (a closed loop), cycling through the given request bodies. Any non-200 answer or exception is
an error.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    clients: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str = ""

    def line(self) -> str:
        return (f"{self.clients:>7} {self.seconds:>6.1f} {self.requests:>8} {self.rps:>8.1f} {self.p50_ms:>8.1f} "
                f"{self.p99_ms:>8.1f} {self.errors:>6}")

    HEADER = f"{'clients':>7} {'secs':>6} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"


def run_load(url: str, bodies: Sequence[dict[str, Any]], clients: int = 8, seconds: float = 5.0,
             path: str = "/api/search") -> LoadResult:
    """`clients` threads, each POSTing `bodies` round-robin to url+path until `seconds` have passed."""
    target = urlparse(url)
    payloads = [json.dumps(b).encode() for b in bodies]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    first_error: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        n = i  # clients start at different bodies
        while time.perf_counter() < deadline:
            body = payloads[n % len(payloads)]
            n += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            except Exception as e:  # count, remember the first, reconnect
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                continue
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.array([x for per in latencies for x in per]) * 1000
    ok = len(lat)
    return LoadResult(clients, elapsed, ok + sum(errors), sum(errors), ok / elapsed,
                      float(np.percentile(lat, 50)) if ok else float("nan"),
                      float(np.percentile(lat, 99)) if ok else float("nan"), first_error[0] if first_error else "")
