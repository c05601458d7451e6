"""Compute threads that follow the machine's load, for long CPU jobs on shared machines (the demo).

Why: PyTorch's CPU kernels run OpenMP teams of ``torch.get_num_threads()`` threads that meet at a
barrier after every parallel region. When other jobs hold the cores, one of our threads waits for
its turn at every barrier, and a step slows down by far more than our share of the CPU. Measured on
a 2-core AMD EPYC with three other jobs (load 5-7), one demo stage-1 step: 2 threads 8.8-13.8 s,
1 thread 1.7-2.1 s (medians of 10 steps, interleaved). On the same machine when idle, 2 threads
took 0.58 s per step. So the right thread count depends on the load *now*, and a run of tens of
minutes should follow it.

How: :func:`threads_for_load` gives the threads that fit on the cores the other jobs leave free,
from the 1-minute load average minus our own threads (at least 1, at most the cores this process
may use). :class:`LoadFollowingThreads` applies it every ``every`` training steps or ``seconds`` of
wall time, whichever comes first (an ``on_step`` hook), and says so when it changes. The clock
matters: when a job starts beside ours, a step can slow from 0.6 s to 16 s, and 20 steps would then
be five minutes at the slow pace. The load average lags a minute behind; both directions err
towards fewer threads, which costs at most the idle machine's 2-thread gain while it catches up.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for_load(cores: int, load: float, own_threads: int) -> int:
    """Threads that fit on the `cores` the other jobs leave free: `load` (the 1-minute load average)
    counts our `own_threads` too, so the others hold ``load - own_threads`` cores."""
    others = max(0.0, load - own_threads)
    return max(1, min(cores, int(cores - others + 0.5)))


class LoadFollowingThreads:
    """An ``on_step(step, metrics)`` hook that sets ``torch.set_num_threads`` from the load every
    ``every`` steps or ``seconds`` of wall time (see the module docstring); ``update()`` does it once
    (before evaluation, say)."""

    def __init__(self, every: int = 20, cores: int | None = None, log: Callable[[str], None] | None = print,
                 loadavg: Callable[[], tuple[float, float, float]] | None = None, seconds: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.every, self.cores, self.log, self.seconds, self._clock = every, cores or usable_cores(), log, seconds, clock
        self._last_read = clock()
        self._loadavg = loadavg or getattr(os, "getloadavg", None)
        self.changes: list[tuple[int, int, float]] = []  # (step, threads, load) at each change

    def update(self, step: int = 0) -> int:
        """Set and return the thread count for the current load (unchanged where there is no load average)."""
        current = torch.get_num_threads()
        self._last_read = self._clock()
        if self._loadavg is None:
            return current
        try:
            load = float(self._loadavg()[0])
        except OSError:
            return current
        wanted = threads_for_load(self.cores, load, current)
        if wanted != current:
            torch.set_num_threads(wanted)
            self.changes.append((step, wanted, load))
            if self.log is not None:
                self.log(f"[onepeace] load average {load:.1f} on {self.cores} cores: {wanted} compute "
                         f"thread{'s' if wanted > 1 else ''} (was {current})")
        return wanted

    def __call__(self, step: int, _metrics: dict | None = None) -> None:
        if step == 1 or step % self.every == 0 or self._clock() - self._last_read >= self.seconds:
            self.update(step)
