"""Who may write an index folder: OS file locks (the `filelock` package, flock on Unix), so a run
killed with SIGKILL releases its locks with its process and leaves nothing stale to clean up.

Two kinds of writer share the folder:

* an **exclusive** run (a plain `onepeace index`, or rank 0 of a torchrun job on behalf of all its
  ranks) holds ``INDEX/.lock`` for its whole run, and every ``INDEX/.lock-rNNN`` that exists;
* a **share** of a job array (``--rank/--world-size`` without torchrun, meant to run side by side)
  takes ``INDEX/.lock`` only long enough to take its own ``INDEX/.lock-rNNN``, then releases
  ``.lock``: ranks of a job array run together, but never beside an exclusive run, and never two
  processes with the same rank (whose start-of-run clean-up would delete each other's shards).

Each lock taken writes ``<lock>.json`` beside it (pid, host, start time, command) so that a run
that has to wait says who it waits for. The holder file is only a description: the OS lock decides.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class IndexLockedError(ValueError):
    """Another run holds the index folder and the wait (`lock_timeout`) ran out."""


def _filelock():
    try:
        import filelock
    except ImportError:
        raise ImportError("locking an index folder needs filelock: pip install 'onepeace[serve]' "
                          "(or filelock)") from None
    return filelock


def describe_holder(lock_path: Path) -> str:
    """'pid 123 on host h since 2026-01-01 12:00:00 UTC (onepeace index ...)' from the holder file."""
    try:
        h = json.loads((lock_path.parent / f"{lock_path.name}.json").read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["started"]))
        return f"pid {h['pid']} on host {h['host']} since {since} ({h['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (no readable holder file)"


def _write_holder(lock_path: Path) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)[:300]}
    tmp = lock_path.parent / f".{lock_path.name}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(holder))
    os.replace(tmp, lock_path.parent / f"{lock_path.name}.json")


@dataclass
class IndexLock:
    """The locks one run holds on `folder` (see the module docstring). `timeout`: seconds to wait
    for another run (None: wait as long as it takes; 0: fail at once). `log` gets one line when the
    run has to wait, naming the holder."""

    folder: Path
    exclusive: bool = True
    rank: int = 0
    timeout: float | None = None
    log: Callable[[str], None] = print
    _held: list = field(default_factory=list)

    def __enter__(self) -> "IndexLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + max(self.timeout, 0)
        try:
            main = self._take(self.folder / ".lock", deadline)
            if self.exclusive:  # every share of a job array that may still be running
                for f in sorted(self.folder.glob(".lock-r[0-9][0-9][0-9]")):
                    self._take(f, deadline)
            else:
                self._take(self.folder / f".lock-r{self.rank:03d}", deadline)
                main.release()  # a share needs .lock only to start: ranks run side by side
                self._held.remove(main)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, path: Path, deadline: float | None):
        filelock = _filelock()
        # one instance per run (FileLock's default, is_singleton=False): two runs in one process
        # (threads, tests) exclude each other as two processes do; not thread-local, so whoever holds
        # this IndexLock can release it from any thread
        lock = filelock.FileLock(str(path), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            wait = "failing now (no wait allowed)" if deadline is not None and deadline <= time.monotonic() else \
                "waiting for it" + ("" if deadline is None else f" (up to {deadline - time.monotonic():.0f} s)")
            message = f"{self.folder} is locked by {describe_holder(path)}"
            self.log(f"{message}: {wait}")
            try:
                lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0),
                             poll_interval=0.05)
            except filelock.Timeout:
                raise IndexLockedError(f"{message}; it still held the lock after the wait. Let that run finish, "
                                       "or pass a longer --lock-timeout (default: wait)") from None
        self._held.append(lock)
        _write_holder(path)
        return lock

    def release(self) -> None:
        while self._held:
            self._held.pop().release()

    def __exit__(self, *exc) -> None:
        self.release()

