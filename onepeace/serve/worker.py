"""The model's own thread: every forward pass of `onepeace serve` runs here, one call at a time, so
the event loop never waits on the model and the model never runs two batches at once.

Requests prepare their inputs in their own threads (decoding, tokenizing: see SearchService) and
submit prepared tensors. The worker takes every job waiting when it wakes up and embeds the ones of
the same modality in ONE model call (`embed_prepared`, which pads texts and audio and masks the
padding), so 16 concurrent text queries cost one batched forward instead of 16. If a batched call
fails, its jobs are run again one by one so that the error is given to the request that caused it.
Other model work (a video's compose path, building a zero-shot classifier) runs as a plain call.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass
class _Job:
    future: Future
    modality: str | None = None  # an embed job: prepared tensors of this modality
    items: list = field(default_factory=list)
    call: Callable[[], Any] | None = None  # a plain call (run alone)


class ModelWorker:
    """One daemon thread that runs `model`; jobs are batched per modality up to `max_batch` items."""

    def __init__(self, model, max_batch: int = 32, torch_threads: int = 0):
        self.model, self.max_batch, self.torch_threads = model, max(1, max_batch), torch_threads
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.calls = 0  # model calls made (a batch counts once): the benchmark reports batching with it
        self.items = 0
        self.seconds_per_call = 0.05  # running mean, for Retry-After estimates
        self._thread = threading.Thread(target=self._run, name="onepeace-model", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ----
    def embed(self, modality: str, items: list) -> Future:
        """Future of the (N, D) float32 numpy embeddings of N prepared tensors of `modality`."""
        return self._submit(_Job(Future(), modality=modality, items=list(items)))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Future of fn() run on the model thread (for model work that is not a prepared batch)."""
        return self._submit(_Job(Future(), call=fn))

    def _submit(self, job: _Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the model worker is closed")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def queued(self) -> int:
        """Jobs waiting for the model (not counting the one it runs)."""
        with self._cond:
            return len(self._jobs)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- the model thread ----
    def _take(self) -> list[_Job]:
        """Block for the first job; then take the jobs queued behind it (at most max_batch items, a
        plain call only alone)."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return []
            taken = [self._jobs.popleft()]
            if taken[0].call is None:
                n = len(taken[0].items)
                while self._jobs and self._jobs[0].call is None and n + len(self._jobs[0].items) <= self.max_batch:
                    taken.append(self._jobs.popleft())
                    n += len(taken[-1].items)
            return taken

    def _run(self) -> None:
        if self.torch_threads > 0:  # OpenMP's thread count is per calling thread: set it on this one
            import torch

            torch.set_num_threads(self.torch_threads)
        while True:
            jobs = self._take()
            if not jobs:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a timed-out request cancelled its job
            if not jobs:
                continue
            t0 = time.perf_counter()
            if jobs[0].call is not None:
                self._settle(jobs[0], jobs[0].call)
            else:
                by_modality: dict[str, list[_Job]] = {}
                for j in jobs:
                    by_modality.setdefault(j.modality, []).append(j)
                for modality, group in by_modality.items():
                    self._embed_group(modality, group)
            self.seconds_per_call = 0.8 * self.seconds_per_call + 0.2 * (time.perf_counter() - t0)

    @staticmethod
    def _settle(job: _Job, fn: Callable[[], Any]) -> None:
        try:
            job.future.set_result(fn())
        except BaseException as e:  # the request's thread re-raises it (and turns it into a 4xx/5xx)
            job.future.set_exception(e)

    def _embed_group(self, modality: str, group: list[_Job]) -> None:
        from ..inference import embed_prepared

        items = [x for j in group for x in j.items]
        self.calls += 1
        self.items += len(items)
        if len(group) > 1:
            try:
                out = embed_prepared(self.model, modality, items).float().cpu().numpy()  # (N, D)
            except Exception:
                out = None  # one bad item: run each job alone so that only its request gets the error
            if out is not None:
                start = 0
                for j in group:
                    j.future.set_result(out[start:start + len(j.items)])
                    start += len(j.items)
                return
        for j in group:
            self._settle(j, lambda j=j: embed_prepared(self.model, modality, j.items).float().cpu().numpy())


def finite_rows(vectors: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of an (N, D) array with no NaN or inf."""
    return np.isfinite(vectors).all(axis=1)
