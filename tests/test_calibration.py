"""Per-layer limits calibrated on the noise of the correct implementation (``parity calibrate``)."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import block
from parity import calibration
from parity import commands as cli
from parity.compare import Judge, judge_tensors
from parity.runner import run_component
from parity.thresholds import Tolerance, load

#: The block with a short drift section: the calibration and its held-out runs share this config.
FAST = {"drift_steps": 2}


def _run(seed: int, directory=None):
    return run_component("block", "bfloat16", seed, out_dir=None, overrides=FAST, calibration_dir=directory)


def shift_added_in_bf16(self, name, x, shift, scale):
    """A port that adds the modulation shift after rounding to bf16 (the reference adds it in float32)."""
    normed = block.tap(name, getattr(self, name)(x.astype(mx.float32)))
    return block.tap(f"{name}/modulated", (normed * (1 + scale)).astype(x.dtype) + shift.astype(x.dtype))


def test_calibrated_limits_catch_a_bf16_fault_the_global_budget_misses(tmp_path, monkeypatch):
    """Calibrated on seeds 1-4; seeds 5-6 (held out) raise no false alarm; a shift added in bf16
    (budget ratio ~1.5 where the correct port's is exactly 1) passes the global limit of 2 and
    fails the calibrated one, at its layer."""
    calibration.calibrate("block", "bfloat16", range(1, 5), lambda seed: _run(seed).report, tmp_path)
    for seed in (5, 6):
        held_out = _run(seed, tmp_path)
        assert held_out.verdict == "PASS", (seed, held_out.first_divergence)
        assert held_out.report["calibration"]["seeds"] == 4

    monkeypatch.setattr(block.TransformerBlock, "modulated_norm", shift_added_in_bf16)
    assert _run(0).verdict == "PASS"  # the global budget misses it
    caught = _run(0, tmp_path)
    assert caught.verdict == "FAIL" and caught.first_divergence == "norm1/modulated"
    layer = caught.layer("norm1/modulated")
    assert "(calibrated)" in layer.reasons[0] and layer.limits["calibrated"] == ["budget_ratio"]
    assert 1.0 < layer.metrics["budget_ratio"] < 2.0


def test_the_rule_and_its_floors():
    assert calibration.limit([1.0, 1.0, 1.0], "bfloat16") == pytest.approx(1.1)  # exact like the reference
    assert calibration.limit([0.3, 0.4], "bfloat16") == pytest.approx(1.1)  # never below 1 + headroom
    values = [1.0, 1.1, 1.2, 1.1]
    spread = np.mean(values) + 4 * np.std(values)
    assert calibration.limit(values, "bfloat16") == pytest.approx(spread + 0.1)
    assert calibration.limit([0.0, 0.0], "float32") == calibration.FLOAT32_FLOOR  # bit-exact layers
    assert calibration.limit([1e-6, 3e-6], "float32") == pytest.approx(2 * max(3e-6, 2e-6 + 4 * 1e-6))


def test_summary_keeps_layers_measured_in_every_seed():
    rows = [[{"layer": "a", "verdict": "PASS", "budget_ratio": 1.0}, {"layer": "b", "verdict": "PASS", "budget_ratio": 1.2}],
            [{"layer": "a", "verdict": "PASS", "budget_ratio": 1.1}, {"layer": "b", "verdict": "EXCLUDED"}]]
    summary = calibration.summarise(rows, "bfloat16")
    assert list(summary) == ["a"] and summary["a"]["n"] == 2 and summary["a"]["max"] == 1.1
    f32 = calibration.summarise([[{"layer": "x", "verdict": "PASS", "max_abs": 2e-7, "ref_max_abs": 4.0}]], "float32")
    assert f32["x"]["max"] == pytest.approx(5e-8)  # max abs relative to the tensor's extent


def test_a_calibrated_limit_only_tightens():
    limits = load()
    ref = np.linspace(-1, 1, 64, dtype=np.float32)
    ours = ref + np.float32(4e-6)
    loose = Judge(["block"], "float32", limits, calibrated={"x": {"calibrated_rel": 1.0}})
    tight = Judge(["block"], "float32", limits, calibrated={"x": {"calibrated_rel": 1e-6}})
    for judge, verdict, limit in ((loose, "PASS", 2e-5), (tight, "FAIL", 1e-6)):
        tol, exact = judge.tolerances("x")
        result = judge_tensors("x", "x", ref, ours, None, tol, exact, "float32", "float32")
        assert result.verdict == verdict and result.limits["abs_limit"] == pytest.approx(limit)
    assert "calibrated on this layer's noise" in result.reasons[0]
    assert Tolerance(budget_ratio=2.0, calibrated_budget=3.0).budget_limit() == 2.0


def test_a_calibration_of_another_config_is_not_used_and_the_report_says_so(tmp_path):
    path = calibration.calibrate("time_embedding", "float32", [1], lambda seed: run_component(
        "time_embedding", "float32", seed, out_dir=None, calibration_dir=None).report, tmp_path)
    used = run_component("time_embedding", "float32", out_dir=None, calibration_dir=tmp_path)
    assert used.report["calibration"]["path"] == str(path)
    other = run_component("time_embedding", "float32", out_dir=None, calibration_dir=tmp_path,
                          overrides={"text_len": 5})
    assert other.report["calibration"] == {"note": f"{path}: recorded for a different config "
                                                   "(run `parity calibrate time_embedding` again)"}


def test_parity_calibrate_writes_a_file_per_dtype_and_refuses_bad_files(tmp_path, capsys, monkeypatch):
    out = tmp_path / "calibration"
    assert cli.main(["calibrate", "time_embedding", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["time_embedding-bfloat16.json", "time_embedding-float32.json"]
    data = json.loads((out / "time_embedding-bfloat16.json").read_text())
    assert data["seeds"] == [1, 2] and data["metric"] == "budget_ratio" and data["layers"]
    assert "budget limits tighter than the global ones" in capsys.readouterr().out

    broken = out / "time_embedding-float32.json"
    broken.write_text(json.dumps({**data, "dtype": "float32", "layers": {"main/time_proj": {"limit": -1}}}))
    monkeypatch.chdir(tmp_path)  # runs use ./calibration
    assert cli.main(["run", "time_embedding", "--dtype", "float32", "--out", "r", "--quiet"]) == 2
    assert "time_embedding-float32.json: layers.main/time_proj.limit: expected a positive number" in capsys.readouterr().err
    assert cli.main(["calibrate", "nope", "--out", str(out)]) == 2
