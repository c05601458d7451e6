"""The seeded ablation's statistics and report (onepeace.demo.ablation), without training."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from onepeace.demo import ablation as A


def test_spread_and_compare():
    s = A.spread([0.7, 0.8, 0.9])
    assert s["mean"] == pytest.approx(0.8) and s["sd"] == pytest.approx(0.1) and (s["min"], s["max"], s["n"]) == (0.7, 0.9, 3)
    clear = A.compare([0.80, 0.81, 0.82], [0.60, 0.61, 0.62])
    assert clear["diff"] == pytest.approx(0.2) and clear["se"] == pytest.approx((2 * 0.01 ** 2 / 3) ** 0.5)
    assert clear["verdict"] == "higher with DCL"
    assert A.compare([0.60, 0.61, 0.62], [0.80, 0.81, 0.82])["verdict"] == "lower with DCL"
    # seed noise of ~0.1 covers a 0.07 difference: the README's old one-run claim
    assert A.compare([0.644, 0.471, 0.568], [0.572, 0.628, 0.467])["verdict"] == "not distinguishable"
    assert A.compare([0.5], [0.4])["verdict"] == "one seed: no spread"


def _runs():
    runs = []
    for seed, (dcl_img, nodcl_img) in enumerate(((0.78, 0.83), (0.69, 0.73), (0.75, 0.80))):
        for arm, img in (("dcl", dcl_img), ("no_dcl", nodcl_img)):
            metrics = {key: 0.5 + 0.01 * seed for key in A.METRICS}
            metrics["image_zero_shot_top1"] = img
            runs.append({"seed": seed, "arm": arm, "metrics": metrics})
    return runs


def test_report_states_mean_spread_and_verdicts(tmp_path):
    result = A.summarise(_runs())
    result.update(minutes=1.0, seeds=[0, 1, 2], quick=True, data="x")
    image = result["metrics"]["image_zero_shot_top1"]
    assert image["dcl"]["n"] == 3 and image["comparison"]["verdict"] == "not distinguishable"
    path = A.write_ablation_report(tmp_path, result)
    text = path.read_text()
    assert "| image zero-shot top-1 | 0.740 +- 0.046 (0.690-0.780) | 0.787 +- 0.051 (0.730-0.830) |" in text
    assert text.count("not distinguishable") == len(A.METRICS)  # equal arms elsewhere
    assert (tmp_path / "figures" / "ablation.png").stat().st_size > 5_000
    json.dumps(result)  # the result is what ablation.json holds


def test_cli_rejects_bad_seeds():
    out = subprocess.run([sys.executable, "-m", "onepeace", "demo", "--seeds", "zero,one"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--seeds takes comma-separated integers" in out.stderr
    assert "Traceback" not in out.stderr
