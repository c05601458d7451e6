"""`onepeace demo --seeds 0,1,2`: the denoising-contrast ablation over several training seeds.

One run per arm cannot carry a claim at this scale: training seeds alone move every metric by about
0.1. Each seed trains both arms (ITC/ATC + DCL, and the aligning contrast only) on the same data
(split seed 0) with the same steps; the report gives each metric's mean, standard deviation and
range per arm, and calls a difference "not distinguishable" unless it exceeds twice its standard
error (Welch: sqrt(sd_a^2/n_a + sd_b^2/n_b)).
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

from .run import DemoSettings, Eta, _prepare, compute_threads, evaluate_arm, train_arm

ARMS = {"dcl": "ITC/ATC + DCL", "no_dcl": "contrast only"}
#: The metrics the ablation compares, in report order, with their labels.
METRICS = {
    "image_zero_shot_top1": "image zero-shot top-1",
    "audio_zero_shot_top1_heldout_voices": "audio zero-shot top-1, held-out voices",
    "audio_zero_shot_top1_heldout_engine": "audio zero-shot top-1, held-out engine (festival)",
    "audio_to_image_r1": "audio -> image R@1 (emergent), held-out voices",
    "audio_to_image_r1_heldout_engine": "audio -> image R@1 (emergent), held-out engine",
    "audio_zero_shot_top1_word_heldout_voices": "spoken word alone: audio zero-shot top-1, held-out voices",
    "audio_zero_shot_top1_word_heldout_engine": "spoken word alone: audio zero-shot top-1, held-out engine",
    "image_to_text_r1": "image -> text R@1",
    "audio_to_text_r1": "audio -> text R@1",
}


def spread(values: Sequence[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min, max and n of ``values``."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def compare(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Arm a vs arm b: the difference of means, its standard error and a verdict."""
    sa, sb = spread(a), spread(b)
    diff = sa["mean"] - sb["mean"]
    se = math.sqrt(sa["sd"] ** 2 / sa["n"] + sb["sd"] ** 2 / sb["n"])
    if sa["n"] < 2 or sb["n"] < 2:
        verdict = "one seed: no spread"
    elif abs(diff) > 2 * se:
        verdict = "higher with DCL" if diff > 0 else "lower with DCL"
    else:
        verdict = "not distinguishable"
    return {"diff": diff, "se": se, "verdict": verdict}


def run_ablation(out_dir: str | Path = "runs/demo-ablation", seeds: Sequence[int] = (0, 1, 2), quick: bool = False,
                 bpe_dir: str | None = None, data_root: str | Path | None = None,
                 settings: DemoSettings | None = None, threads: int | None = None) -> dict[str, Any]:
    """Train and evaluate both arms for every seed; write ablation.json, ablation.md and a figure.
    ``threads``: the compute threads (None: follow the machine's load, `run.compute_threads`)."""
    import onepeace

    from .data import build_demo_data

    started = time.time()
    bpe_dir, settings, out = _prepare(out_dir, quick, False, bpe_dir, settings)
    data = Path(build_demo_data(data_root, quick=quick, seed=0))
    concepts = json.loads((data / "concepts.json").read_text())
    tokenizer = onepeace.get_tokenizer(bpe_dir)
    eta = Eta(settings, arms=2 * len(seeds))
    follow = compute_threads(threads)
    runs: list[dict[str, Any]] = []
    done = out / "runs.jsonl"  # one line per finished (seed, arm): a rerun skips those
    finished = {(r["seed"], r["arm"]): r for r in map(json.loads, done.read_text().splitlines())} \
        if done.exists() else {}
    settings_dict = dataclasses.asdict(settings)  # a finished run counts only with the same settings
    for seed in seeds:
        for arm in ARMS:
            if (seed, arm) in finished and finished[(seed, arm)]["settings"] == settings_dict:
                runs.append(finished[(seed, arm)])
                eta.arm += 1
                continue
            t = time.time()
            shutil.rmtree(out / f"seed{seed}" / arm, ignore_errors=True)  # an interrupted run's leftovers
            model = onepeace.load(train_arm(out / f"seed{seed}" / arm, data, settings, arm == "dcl", bpe_dir, seed, eta,
                                           follow))
            model.tokenizer = tokenizer
            summary, _ = evaluate_arm(model, data, concepts)
            row = {"seed": seed, "arm": arm, "metrics": summary, "seconds": time.time() - t,
                   "settings": settings_dict}
            runs.append(row)
            with open(done, "a") as f:
                f.write(json.dumps(row) + "\n")
    result = summarise(runs)
    result.update(minutes=(time.time() - started) / 60, seeds=list(seeds), quick=quick, data=str(data))
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    write_ablation_report(out, result)
    return result


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: each arm's spread and the comparison (DCL minus contrast only)."""
    table: dict[str, Any] = {}
    for key in METRICS:
        values = {arm: [r["metrics"][key] for r in runs if r["arm"] == arm and key in r["metrics"]] for arm in ARMS}
        if not all(values.values()):
            continue
        table[key] = {arm: spread(v) for arm, v in values.items()}
        table[key]["values"] = values
        table[key]["comparison"] = compare(values["dcl"], values["no_dcl"])
    return {"metrics": table, "runs": list(runs)}


def _cell(s: dict[str, float]) -> str:
    return f"{s['mean']:.3f} +- {s['sd']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def write_ablation_report(out: Path, result: dict[str, Any]) -> Path:
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = ["# onepeace demo: the denoising-contrast ablation over seeds", "",
             f"Training seeds {seeds} (data split seed 0), both arms with the same steps and data; "
             f"{result['minutes']:.1f} minutes. Cells: mean +- sample standard deviation (min-max) over the seeds. "
             "A difference is called only when it exceeds twice its standard error.", "",
             "| metric | ITC/ATC + DCL | contrast only | DCL minus contrast only | verdict |", "|---|---|---|---|---|"]
    for key, label in METRICS.items():
        row = result["metrics"].get(key)
        if row is None:
            continue
        c = row["comparison"]
        lines.append(f"| {label} | {_cell(row['dcl'])} | {_cell(row['no_dcl'])} | {c['diff']:+.3f} +- {c['se']:.3f} "
                     f"| {c['verdict']} |")
    figure = plot_ablation(out, result)
    if figure is not None:
        lines += ["", f"![per-seed values]({figure.relative_to(out)})"]
    path = out / "ablation.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_ablation(out: Path, result: dict[str, Any]) -> Path | None:
    """One column per metric: every seed's value for both arms, with the means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in METRICS if k in result["metrics"]]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 4))
    for i, key in enumerate(keys):
        for offset, (arm, color) in zip((-0.15, 0.15), (("dcl", "tab:blue"), ("no_dcl", "tab:orange"))):
            values = result["metrics"][key]["values"][arm]
            ax.scatter([i + offset] * len(values), values, color=color, alpha=0.7, s=18,
                       label=ARMS[arm] if i == 0 else None)
            ax.hlines(sum(values) / len(values), i + offset - 0.1, i + offset + 0.1, color=color, lw=2)
    ax.set_xticks(range(len(keys)), [METRICS[k].replace(", ", ",\n") for k in keys], fontsize=7)
    ax.set_ylabel("score (per seed; bar = mean)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    path = out / "figures" / "ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
