"""The CPU inference path chosen by measurement: pack the weights or not, which attention kernel, how
many threads, for the CPU at hand and the model's shapes.

Why: the packed oneDNN weights (`onepeace.modeling.packed`) were tuned on an AVX-512 CPU. On an
AVX2-only AMD EPYC the same packing made a short query 1.5x faster but image batch 8 1.3x SLOWER than
plain weights; which kernel wins depends on the CPU, the torch build and the shapes, so it is measured.

What is measured (`probe`: 0.55-0.85 CPU-seconds at base size and at the 4B shape, read on one thread
of a busy 2-core machine -- about 0.3 s of wall time on a quiet one, estimated; once per key, then cached):
- linear layers, at the model's (D, F): one GeGLU FFN expert on 16 rows (a short query, with the
  GELU / product the packed path fuses), and the FFN's first (with its GELU) and last products on a
  large batch (`large_rows`: 512 at base size, 128 at the 4B shape), plain vs packed, interleaved,
  medians. Packed is kept where it is not slower; where it wins on short queries but loses on the large
  batch, the packed layers use a per-call dense copy of the weight from `large_rows` rows on
  (`PackedLinear.dense_above`: one layer's weight at a time, never a second copy of the model) if that
  measured faster too; where packing wins nowhere, plain weights.
- attention: torch's fused kernel (sdpa) vs the explicit float32-softmax one (eager) with an additive
  mask on (1, H, 13, hd) (a short text), (2, H, 257, hd) (images) and (1, H, 750, hd) (a 15-s clip);
  eager is taken only where it wins by `MARGIN` on BOTH long shapes and does not lose on the short
  one (timed in that order, stopping where eager loses). Why the clip: on an AMD EPYC (Zen 5) one probe
  saw eager win 2 x 257 by 10%, yet the model then ran 15-s audio 1.3x slower than with sdpa (eager's
  (B, H, S, S) float32 scores leave the caches: 1.4x slower at 1 x 750, 2.6x at 4 x 750 there).
- threads: torch's current count vs the physical cores this process may run on, timed on the large
  products where they differ (not where OMP_NUM_THREADS / MKL_NUM_THREADS is set: the user chose).
Every switch away from today's default (packed, sdpa, torch's threads) needs a `MARGIN` (5%) win.

Cache: ``${ONEPEACE_CACHE:-~/.cache/onepeace}/cpu-choice.json``, one entry per `choice_key` (CPU model
name, the ISA flags that select kernels, the ISA-limiting environment variables, torch version, shapes,
dtype, threads), written atomically (and under a file lock where `filelock` is installed). A corrupt file
is ignored with a warning and rewritten. A probe taken while the machine was busier than its CPUs
(1-minute load average) timed other jobs too: it is used for that load, not cached.
``ONEPEACE_CPU_PROBE=0`` disables probing (today's default: packed where the CPU can pack the dtype,
sdpa, torch's threads); ``ONEPEACE_CPU_PROBE=refresh`` measures again. ``onepeace.load(..., pack=True/False)`` skips all of this.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .layers import GeGLUFeedForward
from .packed import PackedLinear, cpu_can_pack, pack_linears, set_dense_above

ENV_PROBE = "ONEPEACE_CPU_PROBE"  # "0": no probe (today's default); "refresh": measure again
CACHE_FILE = "cpu-choice.json"
CACHE_VERSION = 2  # bump when what is measured changes: older entries are then re-measured
MARGIN = 1.05  # a switch away from the default must be this much faster (the probe's noise on a busy machine)
#: (batch, tokens) the attention kernels are timed on: a short text, an image pair at 256 px, a 15-s clip
ATTENTION_SHAPES = ((1, 13), (2, 257), (1, 750))
SMALL_ROWS = 16  # a short query (a caption, one 12-token text)
# the CPU flags that select torch's / oneDNN's / MKL's kernels, and the variables that limit them
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_tile", "amx_bf16", "amx_int8")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
           "MKL_DEBUG_CPU_TYPE")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_threads_changed: tuple[int, int] | None = None  # (before, after) where apply_choice set torch's threads


@dataclass(frozen=True)
class ProbeShape:
    """The model shapes the probe times: embed dim D, FFN dim F, heads H, compute dtype."""

    dim: int
    ffn_dim: int
    heads: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, model: nn.Module) -> "ProbeShape":
        enc = model.config.encoder
        return cls(enc.embed_dim, enc.ffn_embed_dim, enc.attention_heads, model.dtype)

    @property
    def large_rows(self) -> int:
        """Rows of the "large batch" products: 512 (base size), fewer for wider layers so that the
        timed pair stays <= 5 GFLOP (128 at the 4B shape, where K = 1536 already makes it compute-bound)."""
        rows = 512
        while rows > 128 and 4 * rows * self.dim * self.ffn_dim > 5e9:
            rows //= 2
        return rows

    def describe(self) -> str:
        return f"D={self.dim} F={self.ffn_dim} H={self.heads} {str(self.dtype).replace('torch.', '')}"


@dataclass
class CpuChoice:
    """What runs on this CPU (`apply_choice` puts it on a model); `model.load_report.cpu_choice`.

    pack: the encoder's linear layers packed for oneDNN. dense_above: packed layers multiply inputs of
    this many rows or more with a per-call dense copy (None: always packed). attention: "sdpa" or
    "eager". threads: torch's intra-op threads. source: "measured", "cached", "forced", or why
    nothing was measured. timings_ms: the probe's medians; probe_ms: the probe's wall time."""

    pack: bool
    attention: str = "sdpa"
    threads: int = field(default_factory=torch.get_num_threads)
    dense_above: int | None = None
    source: str = "forced"
    key: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    probe_ms: float = 0.0
    load_avg: float | None = None  # the machine's 1-minute load average when measured (see `busy`)

    def describe(self) -> str:
        """e.g. "packed (dense weight from 512 rows), sdpa attention, 2 threads"."""
        linear = "packed" if self.pack else "plain weights"
        if self.pack and self.dense_above is not None:
            linear += f" (dense weight from {self.dense_above} rows)"
        return f"{linear}, {self.attention} attention, {self.threads} threads"

    def summary(self) -> str:
        """describe() + where it came from + the timings (ms, medians)."""
        text = f"{self.describe()} [{self.source}"  # e.g. "[cached; probe 310 ms, load average 0.4]"
        if self.probe_ms:
            text += f"; probe {self.probe_ms:.0f} ms"
        if self.load_avg is not None:
            text += f", load average {self.load_avg:.1f}"
        text += "]"
        if self.timings_ms:
            text += "; ms: " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings_ms.items())
        return text

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CpuChoice":
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not {"pack", "attention", "threads"} <= set(data) or set(data) - names:
            raise ValueError(f"not a CpuChoice record: {data!r:.200}")
        choice = cls(**data)
        if not isinstance(choice.pack, bool) or choice.attention not in ("sdpa", "eager") or \
                not isinstance(choice.threads, int) or choice.threads < 1 or \
                not (choice.dense_above is None or (isinstance(choice.dense_above, int) and choice.dense_above > 0)):
            raise ValueError(f"a CpuChoice record with invalid values: {data!r:.200}")
        return choice


# ---------------------------------------------------------------------------- what the key is made of
def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, its flags) from /proc/cpuinfo; elsewhere platform.processor() and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm
            flags = set(value.split())
    return name or platform.machine(), flags


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, len(allowed))
    cores, cpu, package = set(), None, "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu in allowed:
            cores.add((package, value))
    return len(cores) or max(1, len(allowed))


def choice_key(shape: ProbeShape, threads: int) -> str:
    """The cache key: what decides which kernel is faster."""
    name, flags = _cpuinfo()
    kernel_flags = " ".join(f for f in KERNEL_FLAGS if f in flags) or "no x86 flags"
    capability = torch.backends.cpu.get_cpu_capability()
    limits = " ".join(f"{k}={os.environ[k]}" for k in ISA_ENV if os.environ.get(k))
    return (f"v{CACHE_VERSION}; {name}; {kernel_flags}; aten {capability}{'; ' + limits if limits else ''}; "
            f"torch {torch.__version__}; {shape.describe()}; {threads} threads")


def cache_path() -> Path:
    root = os.environ.get("ONEPEACE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "onepeace") / CACHE_FILE


# ---------------------------------------------------------------------------- cache
def _read_cache(path: Path) -> dict:
    """{key: record}; a missing file is empty, an unreadable one is empty with a warning."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring the CPU choice cache {path}: cannot read it ({type(e).__name__}: {e}); "
                      "measuring again", RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        warnings.warn(f"ignoring the CPU choice cache {path}: not a JSON object of records; measuring again",
                      RuntimeWarning, stacklevel=3)
        return {}
    return data


def _write_cache(path: Path, key: str, choice: CpuChoice) -> None:
    """Add one entry: read, merge, write a temporary file, rename (atomic), under a lock if possible.
    A cache that cannot be written (read-only home) is a warning, not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from filelock import FileLock

            lock = FileLock(str(path) + ".lock", timeout=10)
        except ImportError:  # the serve extra brings filelock; without it the rename alone keeps the file whole
            lock = None
        if lock is not None:
            with lock:
                _merge_and_replace(path, key, choice)
        else:
            _merge_and_replace(path, key, choice)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation: never fail a load over it
        warnings.warn(f"could not write the CPU choice cache {path}: {type(e).__name__}: {e}", RuntimeWarning,
                      stacklevel=3)


def _merge_and_replace(path: Path, key: str, choice: CpuChoice) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a corrupt file was reported when read; it is replaced now
        data = _read_cache(path)
    record = choice.to_json()
    record["source"] = "measured"
    data[key] = record
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------- measuring
def _medians(fns: dict[str, Callable[[], object]], reps: int, warmup: bool = True) -> dict[str, float]:
    """Median ms of each function, calls interleaved (a load spike hits every choice alike), after one
    warm-up call each (warmup=False for the large products: a slow first call is one of three, which
    the median drops)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in (fns.values() if warmup else ()):
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def _large_products(ffn: GeGLUFeedForward, x: torch.Tensor, h: torch.Tensor) -> Callable[[], object]:
    """The FFN's first product with its GELU, (M, D) -> (M, F), and its last, (M, F) -> (M, D), as the
    model runs them (packed: the GELU inside the product); 4 M D F FLOPs."""
    if isinstance(ffn.wi_0, PackedLinear):
        return lambda: (ffn.wi_0.forward_gelu(x), ffn.fc_out(h))
    return lambda: (F.gelu(ffn.wi_0(x)), ffn.fc_out(h))


def _probe_linear(shape: ProbeShape, gen: torch.Generator, timings: dict) -> tuple[bool, int | None, Callable]:
    """(pack, dense_above, the large-batch products of that choice) -- see the module docstring."""
    D, F_, M = shape.dim, shape.ffn_dim, shape.large_rows
    with torch.device("meta"):  # no random init of 3 D F weights (0.3 s at the 4B shape): a constant fill
        dense = GeGLUFeedForward(D, F_).to(shape.dtype).eval()  # (the products' speed does not depend on values)
    dense = dense.to_empty(device="cpu").requires_grad_(False)
    for p in dense.parameters():
        p.fill_(0.01)
    small = torch.randn(SMALL_ROWS, D, generator=gen).to(shape.dtype)
    x, h = (torch.randn(M, n, generator=gen).to(shape.dtype) for n in (D, F_))
    if not cpu_can_pack(shape.dtype):
        return False, None, _large_products(dense, x, h)
    packed = copy.deepcopy(dense)
    pack_linears(packed)
    t = _medians({"ffn16 packed": lambda: packed(small), "ffn16 plain": lambda: dense(small)}, reps=3)
    t.update(_medians({f"x{M} packed": _large_products(packed, x, h), f"x{M} plain": _large_products(dense, x, h)},
                      reps=3, warmup=False))
    timings.update(t)
    s_packed, s_plain, l_packed, l_plain = t["ffn16 packed"], t["ffn16 plain"], t[f"x{M} packed"], t[f"x{M} plain"]
    if s_packed * MARGIN >= s_plain and l_packed > l_plain * MARGIN:  # packing loses on both: plain weights
        return False, None, _large_products(dense, x, h)
    if l_packed <= l_plain * MARGIN:  # packed wins or ties on the large batch too
        return True, None, _large_products(packed, x, h)

    def fallback():  # the per-call dense copy of each weight (PackedLinear.dense_above)
        set_dense_above(packed, 1)
        try:
            return _large_products(packed, x, h)()
        finally:
            set_dense_above(packed, None)
    t = _medians({f"x{M} packed": _large_products(packed, x, h), f"x{M} packed+dense copy": fallback}, reps=3,
                 warmup=False)
    timings.update(t)
    if t[f"x{M} packed+dense copy"] * MARGIN < t[f"x{M} packed"]:
        return True, M, fallback
    return True, None, _large_products(packed, x, h)


def _probe_attention(shape: ProbeShape, gen: torch.Generator, timings: dict) -> str:
    """"sdpa" or "eager", timed with an additive (1, H, S, S) mask on (B, H, S, hd) for the shapes of
    `ATTENTION_SHAPES`: eager only where it wins by MARGIN on every long one and does not lose on the
    short one (measured in that order, so where eager loses early the long clip is never timed)."""
    H, hd = shape.heads, max(1, shape.dim // shape.heads)
    for B, S in ATTENTION_SHAPES:  # cheapest first; stop at the first shape eager does not win
        q, k, v = (torch.randn(B, H, S, hd, generator=gen).to(shape.dtype) for _ in range(3))
        mask = torch.randn(1, H, S, S, generator=gen).to(shape.dtype)
        short = S < 64
        t = _medians({f"attn{B}x{S} sdpa": lambda: attend(q, k, v, mask, eager=False),
                      f"attn{B}x{S} eager": lambda: attend(q, k, v, mask, eager=True)}, reps=5 if short else 3,
                     warmup=short)
        timings.update(t)
        sdpa, eager = t[f"attn{B}x{S} sdpa"], t[f"attn{B}x{S} eager"]
        if not (eager <= sdpa * MARGIN if short else eager * MARGIN < sdpa):
            return "sdpa"
    return "eager"


def _probe_threads(current: int, large_call: Callable, timings: dict, fixed: bool = False) -> int:
    """torch's current thread count vs the physical cores, on the large FFN (where they differ)."""
    if fixed or any(os.environ.get(k) for k in THREAD_ENV):
        return current  # the user set the thread count
    cores = physical_cores()
    if cores == current:
        return current
    t = _medians({f"ffn {current} threads": _with_threads(current, large_call),
                  f"ffn {cores} threads": _with_threads(cores, large_call)}, reps=3)
    timings.update(t)
    return cores if t[f"ffn {cores} threads"] * MARGIN < t[f"ffn {current} threads"] else current


def probe(shape: ProbeShape, threads: int | None = None, fixed_threads: bool = False) -> CpuChoice:
    """Measure the choice for these shapes on this CPU now (no cache; see the module docstring).
    threads: the count to measure at (torch's current one); fixed_threads: keep it (no thread probe)."""
    threads = threads or torch.get_num_threads()
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    timings: dict[str, float] = {}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pack, dense_above, large_call = _probe_linear(shape, gen, timings)
        attention = _probe_attention(shape, gen, timings)
        chosen_threads = _probe_threads(threads, large_call, timings, fixed_threads)
    finally:
        torch.set_num_threads(before)
    return CpuChoice(pack=pack, dense_above=dense_above, attention=attention, threads=chosen_threads,
                     source="measured", timings_ms={k: round(v, 3) for k, v in timings.items()},
                     probe_ms=round(1000 * (time.perf_counter() - start), 1), load_avg=_load_average())


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def busy(load_avg: float | None) -> bool:
    """Was the machine busier than its CPUs when measured (1-minute load average > CPUs)? Such a
    probe times other jobs too: its choice is used for this load but not cached."""
    return load_avg is not None and load_avg > (os.cpu_count() or 1)


def default_choice(shape: ProbeShape, why: str, threads: int | None = None) -> CpuChoice:
    """Today's default without measuring: packed where the CPU can pack the dtype, sdpa, torch's threads."""
    return CpuChoice(pack=cpu_can_pack(shape.dtype), threads=threads or torch.get_num_threads(), source=why)


def choose(shape: ProbeShape, fixed_threads: bool = False) -> CpuChoice:
    """The cached choice for this key, else `probe` and cache it; `ENV_PROBE` as in the module docstring.
    fixed_threads: the caller set torch's thread count (e.g. a benchmark's --threads): keep it."""
    threads = torch.get_num_threads()
    if _threads_changed is not None and threads == _threads_changed[1]:
        threads = _threads_changed[0]  # we set it: the key (and the probe) use the count we found
    setting = os.environ.get(ENV_PROBE, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return default_choice(shape, f"not measured: {ENV_PROBE}={os.environ[ENV_PROBE]}", threads)
    if setting not in ("1", "true", "yes", "on", "refresh"):
        raise ValueError(f"{ENV_PROBE}={os.environ[ENV_PROBE]!r}: use 0 (no probe), 1 (default) or refresh")
    key, path = choice_key(shape, threads), cache_path()
    if setting != "refresh":
        record = _read_cache(path).get(key)
        if record is not None:
            try:
                cached = dataclasses.replace(CpuChoice.from_json(record), source="cached", key=key)
                return dataclasses.replace(cached, threads=threads) if fixed_threads else cached
            except (TypeError, ValueError) as e:
                warnings.warn(f"ignoring a bad entry of the CPU choice cache {path}: {e}; measuring again",
                              RuntimeWarning, stacklevel=2)
    choice = dataclasses.replace(probe(shape, threads, fixed_threads), key=key)
    if busy(choice.load_avg):
        return dataclasses.replace(choice, source="measured on a busy machine, not cached")
    if not fixed_threads:  # a record whose thread count was not measured is not cached
        _write_cache(path, key, choice)
    return choice


def apply_choice(model: nn.Module, choice: CpuChoice) -> nn.Module:
    """Put `choice` on an OnePeaceModel on CPU: packing (with its threshold), attention kernel, and
    torch's thread count (process-wide: torch has one intra-op pool)."""
    if choice.pack:
        model.to_packed(dense_above=choice.dense_above)
    else:
        model.to_dense()
    model.attention_kernel = choice.attention
    if choice.threads != torch.get_num_threads():
        global _threads_changed
        _threads_changed = (torch.get_num_threads(), choice.threads)
        torch.set_num_threads(choice.threads)
    return model


def choose_for(model: nn.Module, fixed_threads: bool = False) -> CpuChoice:
    """`choose` for this model's shapes and dtype, applied to it (what ``onepeace.load`` does on CPU)."""
    choice = choose(ProbeShape.of(model), fixed_threads)
    apply_choice(model, choice)
    return choice
