"""Streamed capture, stats-only layers and the one-pass metrics."""
import json
import math

import numpy as np
import pytest

from parity import metrics
from parity.components.rope import RopeComponent
from parity.capture_mlx import record_taps
from parity.metrics import tensor_metrics
from parity.runner import run_component
from parity.stats import sample_indices, take_sample, tensor_stats
from parity.streaming import StreamCapture


class _Scaling:
    """Stands in for a capture and scales one MLX tap: a bug confined to one layer."""

    def __init__(self, inner, layer, scale):
        self.inner, self.layer, self.scale = inner, layer, scale

    def add(self, name, x):
        self.inner.add(name, x * self.scale if name == self.layer else x)


class _FaultyRope(RopeComponent):
    def __init__(self, layer, scale):
        self.layer, self.scale = layer, scale

    def mlx_capture(self, model, capture, hooks=None):
        return record_taps(_Scaling(capture, self.layer, self.scale))


def first_call(result):
    """A run's report rows without the second call's (a streaming run makes none)."""
    return [row for row in result.report["layers"] if not row["layer"].startswith("call2/")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_gives_the_in_memory_rows(tmp_path, dtype):
    memory = run_component("rope", dtype, out_dir=tmp_path / "memory")
    streamed = run_component("rope", dtype, out_dir=tmp_path / "stream", streaming=True)
    no_report = run_component("rope", dtype, out_dir=None, streaming=True)
    assert memory.verdict == streamed.verdict == no_report.verdict == "PASS"
    assert first_call(memory) == streamed.report["layers"] == no_report.report["layers"]
    if dtype == "bfloat16":  # no second call: the same summary
        assert memory.report["summary"] == streamed.report["summary"]
    else:  # the in-memory float32 run's summary also covers its second call's layers
        rows = memory.report["layers"]
        assert memory.report["summary"] == {**streamed.report["summary"], "layers": len(rows),
                                            "worst_cosine": min(r["cosine"] for r in rows),
                                            "max_abs": max(r["max_abs"] for r in rows)}
    # the dumps are the same files, described by the same manifest
    manifest = json.loads((streamed.report_dir / "manifest.json").read_text())
    old = json.loads((memory.report_dir / "manifest.json").read_text())
    for side in old["sides"]:
        files = {k: v for k, v in old["sides"][side]["files"].items() if not k.startswith("call2/")}
        assert manifest["sides"][side]["files"] == files
        assert manifest["sides"][side]["layer_order"] == [k for k in old["sides"][side]["layer_order"] if k in files]
        for layer, relative in files.items():
            assert np.array_equal(np.load(streamed.report_dir / relative), np.load(memory.report_dir / relative))


def test_streaming_keeps_no_tensor_in_memory(tmp_path):
    result = run_component("rope", out_dir=tmp_path, streaming=True)
    ref = result.context.ref
    assert isinstance(ref, StreamCapture) and not isinstance(ref.tensors, dict)
    for capture in (ref, result.context.mlx):  # no array held: every tensor is read back from disk
        assert not [k for k, v in vars(capture).items() if isinstance(v, np.ndarray)]
        assert all(isinstance(capture[name], np.memmap) for name in capture.order)


def test_streaming_finds_the_same_first_divergence(tmp_path):
    faulty = _FaultyRope("wan/cos", 1.001)
    memory = run_component(faulty, out_dir=None)
    streamed = run_component(faulty, out_dir=None, streaming=True)
    assert memory.first_divergence == streamed.first_divergence == "wan/cos"
    assert first_call(memory) == streamed.report["layers"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stats_only_layers_keep_statistics_and_pass(tmp_path, dtype):
    result = run_component("rope", dtype, out_dir=tmp_path, stats_only=["*/q_rot"])
    assert result.verdict == "PASS"
    rows = {r["layer"]: r for r in result.report["layers"]}
    assert len(rows) == 13
    for layer in ("helios/q_rot", "wan/q_rot"):
        row = rows[layer]
        assert row["stats_only"] is True and row["verdict"] == "PASS"
        assert row["shape_ref"] == row["shape_mlx"] and row["sample_size"] == 1024
        assert row["ref_mean"] == pytest.approx(row["mlx_mean"], abs=1e-5) and "cosine" not in row
        assert not (result.report_dir / "ref" / f"{layer}.npy").exists()
        assert (result.report_dir / "ref" / f"{layer}.stats.json").exists()
    assert "cosine" in rows["helios/k_rot"] and "stats_only" not in rows["helios/k_rot"]
    if dtype == "bfloat16":
        assert rows["wan/q_rot"]["sample_budget_ratio"] <= 2
    manifest = json.loads((result.report_dir / "manifest.json").read_text())
    assert manifest["sides"]["mlx"]["stats"]["wan/q_rot"] == "mlx/wan/q_rot.stats.json"


def test_stats_only_layer_catches_a_scaled_tensor(tmp_path):
    result = run_component(_FaultyRope("helios/q_rot", 1.01), out_dir=None, stats_only=["helios/q_rot"])
    assert result.first_divergence == "helios/q_rot"
    reasons = result.layer("helios/q_rot").reasons
    assert any(r.startswith("std differs") for r in reasons) and any(r.startswith("sample max abs") for r in reasons)
    assert [l.name for l in result.layers if l.verdict == "FAIL"] == ["helios/q_rot"]


def test_stats_only_layer_catches_nan(tmp_path):
    result = run_component(_FaultyRope("wan/k_rot", float("nan")), out_dir=None, stats_only=["wan/*"])
    assert result.first_divergence == "wan/k_rot"
    assert "MLX has 6400 NaN / 0 Inf" in result.layer("wan/k_rot").reasons


def test_tensor_stats_known_values():
    x = np.array([[1.0, 2.0], [3.0, np.nan], [np.inf, 4.0]], np.float32)
    s = tensor_stats(x, "bfloat16")
    assert (s["shape"], s["dtype"], s["numel"], s["finite"], s["nan"], s["inf"]) == ([3, 2], "bfloat16", 6, 4, 1, 1)
    assert (s["min"], s["max"], s["mean"]) == (1.0, 4.0, 2.5)
    assert s["std"] == pytest.approx(math.sqrt(1.25)) and s["norm"] == pytest.approx(math.sqrt(30))
    assert len(s["sample"]) == 6 and math.isnan(s["sample"][3])


def test_tensor_stats_chunked_and_strided(monkeypatch):
    x = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32) + 3.0
    whole = tensor_stats(x)
    monkeypatch.setattr(metrics, "CHUNK", 1000)
    for key in ("mean", "std", "norm", "min", "max"):
        assert tensor_stats(x)[key] == pytest.approx(whole[key], rel=1e-12)
    transposed = tensor_stats(x.T)
    assert transposed["sample"] == tensor_stats(np.ascontiguousarray(x.T))["sample"]
    assert transposed["mean"] == pytest.approx(whole["mean"], rel=1e-12)


def test_sample_indices_are_fixed_spread_and_distinct():
    idx = sample_indices(10**9)
    assert len(idx) == 1024 and len(set(idx.tolist())) == 1024 and idx.min() >= 0 and idx.max() < 10**9
    assert idx[:3].tolist() == [0, 733137, 1919378]  # never changes: bundles from other machines rely on it
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    assert len(sample_indices(1500)) > 900  # collisions folded, still spread
    x = np.arange(24.0).reshape(2, 3, 4)
    assert take_sample(x.transpose(2, 0, 1), np.array([0, 5, 23])).tolist() == [0.0, 20.0, 23.0]


# --- the one-pass metrics against the two-pass definition ----------------------------------------

def _max_rel_two_pass(ref, test):
    a, b = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    floor = max(metrics.REL_FLOOR * math.sqrt((a @ a) / a.size), np.finfo(np.float64).tiny)
    return float((np.abs(b - a) / np.maximum(np.abs(a), floor)).max())


def _cases():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 700)).astype(np.float32)
    y = rng.standard_normal((50, 700)).astype(np.float32)
    zeros = x.copy()
    zeros[:, 100:] = 0.0
    near_floor = np.full(5000, 1e-3, np.float32)
    near_floor[::7] = 1.0
    return {
        "independent": (x, y), "close": (x, x + 1e-6 * y), "transposed": (x.T, (x + 1e-6 * y).T),
        "mixed layouts": (x, np.asfortranarray(x + 1e-6 * y)), "mixed layouts 3d": (
            x.reshape(5, 10, 700), np.asfortranarray((x + 1e-6 * y).reshape(5, 10, 700))),
        "mostly zero": (zeros, zeros + 1e-7 * y), "at the floor": (near_floor, near_floor * 1.001),
        "one nan": (x, np.where(np.arange(x.size).reshape(x.shape) == 77, np.nan, x + 1e-6)),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("chunk", [1 << 17, 999, 300])
def test_one_pass_metrics_keep_their_definitions(monkeypatch, case, chunk):
    monkeypatch.setattr(metrics, "CHUNK", chunk)
    ref, test = _cases()[case]
    m = tensor_metrics(ref, test)
    assert m["max_rel"] == pytest.approx(_max_rel_two_pass(ref, test), rel=1e-12)
    a, b = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    assert m["max_abs"] == np.abs(b - a).max() and m["ref_max_abs"] == np.abs(a).max()
    assert m["cosine"] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((b - a) ** 2)), rel=1e-12)
    assert m["mean_abs"] == pytest.approx(np.abs(b - a).mean(), rel=1e-12)


def test_one_pass_max_rel_when_the_floor_estimate_is_off(monkeypatch):
    ref, test = _cases()["independent"]
    expected = _max_rel_two_pass(ref, test)
    monkeypatch.setattr(metrics, "_BAND", 1e-15)  # estimate outside the band: the exact second pass takes over
    assert tensor_metrics(ref, test)["max_rel"] == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(metrics, "_BAND", 0.5)
    monkeypatch.setattr(metrics, "_BAND_CAP", 0)
    assert tensor_metrics(ref, test)["max_rel"] == pytest.approx(expected, rel=1e-12)


def test_metrics_do_not_copy_inputs_or_change_them():
    ref, test = _cases()["transposed"]
    before = (ref.copy(), test.copy())
    tensor_metrics(ref, test)
    assert np.array_equal(ref, before[0]) and np.array_equal(test, before[1])
