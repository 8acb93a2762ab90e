"""Every judging rule and guard of the harness, pinned: a bug in the harness's own judging must fail here.

Fast unit tests on synthetic tensors (no model), so the mutation check (scripts/mutation_check.sh)
can run them for every mutant of the judging core.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from parity import baseline, drift, gate, report, thresholds
from parity.alignment import Alignment, AlignmentError, apply_adapter
from parity.capture import Capture
from parity.compare import EXCLUDED, FAIL, PASS, LayerResult, apply_rules, compare, judge_tensors
from parity.dumps import atomic_write, layer_file, write_json
from parity.metrics import precision_budget, round_to, tensor_metrics
from parity.stats import tensor_stats
from parity.streaming import StreamCapture
from parity.thresholds import Tolerance
from parity.vocab import InputError, fmt, inside, strict_json

RNG = np.random.default_rng(7)
F32 = Tolerance(atol=1e-5, rtol=1e-5, cosine_min=0.99999)
BF16 = Tolerance(budget_ratio=2.0, rounding_excess=0.25)


def captures(layers_ref, layers_mlx, truth=None):
    sides = [Capture("ref"), Capture("mlx")] + ([Capture("truth")] if truth is not None else [])
    for capture, layers in zip(sides, [layers_ref, layers_mlx] + ([truth] if truth is not None else [])):
        for name, value in layers.items():
            capture.add(name, np.asarray(value))
    return sides


def limits(text: str, tmp_path: Path):
    path = tmp_path / "parity.toml"
    path.write_text(text)
    return thresholds.load(path, base=False)


# --- float32 limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("error, fails", [(9e-6, False), (2.1e-5, True)])
def test_abs_limit_is_atol_plus_rtol_times_the_reference_extent(error, fails):
    ref = np.ones(16, np.float32)  # max|ref| = 1: limit 2e-5
    result = judge_tensors("x", "x", ref, ref + np.float32(error), None, F32, None, "float32", "float32")
    assert (result.verdict == FAIL) is fails and result.limits["abs_limit"] == pytest.approx(2e-5)
    assert [f.metric for f in result.failures] == (["max_abs"] if fails else [])


def test_max_rel_limit_in_compare_and_the_gate(tmp_path):
    ref = np.array([1.0, 1e-2, 3.0], np.float32)
    ours = ref * np.array([1, 1.01, 1], np.float32)  # 1 % off on one element
    loose = judge_tensors("x", "x", ref, ours, None, Tolerance(max_rel=0.02), None, "float32", "float32")
    tight = judge_tensors("x", "x", ref, ours, None, Tolerance(max_rel=0.005), None, "float32", "float32")
    assert loose.verdict == PASS and tight.verdict == FAIL
    assert [(f.metric, f.limit) for f in tight.failures] == [("max_rel", 0.005)]
    rows = {"schema": 2, "component": "c", "dtype": "float32", "verdict": "FAIL", "layers": [tight.row()], "sections": []}
    outcome = gate.evaluate(rows, limits("[defaults.float32]\nmax_rel = 0.005\n", tmp_path))
    assert [(f.layer, f.metric, f.threshold) for f in outcome.failures] == [("x", "max_rel", "<= 0.005")]


def test_cosine_limit_and_its_digits():
    ref = RNG.standard_normal(64).astype(np.float32)
    ours = ref + np.float32(8e-4) * RNG.standard_normal(64).astype(np.float32)
    result = judge_tensors("x", "x", ref, ours, None, Tolerance(cosine_min=0.9999999), None, "float32", "float32")
    cosine = result.metrics["cosine"]
    assert cosine < 0.9999999 and [f.metric for f in result.failures] == ["cosine"]
    shown = fmt(cosine, "cos")
    assert float(shown) != 1.0 and shown != "1.000000"  # a failing cosine never reads like a pass
    assert "1 - cos = " in result.failures[0].message


def test_nonfinite_values_fail_and_their_metrics_are_not_shown():
    ref = np.ones(8, np.float32)
    ours = ref.copy()
    ours[3] = np.nan
    result = judge_tensors("x", "x", ref, ours, None, F32, None, "float32", "float32")
    assert [f.metric for f in result.failures] == ["nan/inf"] and "MLX has 1 NaN / 0 Inf" in result.reasons[0]
    assert result.metrics["cosine"] is None and result.metrics["max_abs"] is None  # not 1.0 / 0 over the finite part
    assert result.metrics["nan_mlx"] == 1


def test_shapes_emptiness_and_missing_layers_are_structural_failures(tmp_path):
    rules = limits("[defaults.float32]\natol = 1e-5\n", tmp_path)
    ref, ours = captures({"a": np.zeros(3), "b": np.zeros(0), "c": np.ones(2)}, {"a": np.zeros(4), "b": np.zeros(0), "d": 1})
    result = compare("c", "float32", ref, ours, rules)
    failed = {l.name: [(f.kind, f.metric) for f in l.failures] for l in result.layers}
    assert failed == {"a": [("structure", "shape")], "b": [("structure", "numel")], "c": [("structure", "presence")],
                      "d": [("structure", "presence")]}
    assert result.first_divergence == "a"
    assert compare("c", "float32", *captures({}, {}), rules).verdict == FAIL  # nothing compared never passes


def test_a_layer_missing_from_the_float64_truth_fails(tmp_path):
    rules = limits("[defaults.float32]\natol = 1e-5\n[defaults.bfloat16]\nbudget_ratio = 2\n", tmp_path)
    value = np.ones(4, np.float32)
    ref, ours, truth = captures({"a": value, "b": value}, {"a": value, "b": value}, {"a": value.astype(np.float64)})
    result = compare("c", "bfloat16", ref, ours, rules, truth=truth)
    assert result.layers[0].verdict == PASS
    assert [(f.kind, f.metric) for f in result.layers[1].failures] == [("structure", "truth")]


# --- the bf16 precision budget and the one-rounding floor -------------------------------------------

def _layernorm(x: np.ndarray, dtype=np.float64, rounding: str | None = None) -> np.ndarray:
    """LayerNorm over the last axis; with ``rounding`` every intermediate is rounded to it (computed in bf16)."""
    r = (lambda v: round_to(v, rounding).astype(np.float64)) if rounding else (lambda v: v)
    x = r(x.astype(dtype))
    mean = r(x.mean(-1, keepdims=True))
    centred = r(x - mean)
    var = r((centred * centred).mean(-1, keepdims=True))
    return r(centred / r(np.sqrt(var + 1e-6)))


def _tap(ours: np.ndarray, truth: np.ndarray, ref: np.ndarray):
    return judge_tensors("norm1", "norm1", ref.astype(np.float32), ours.astype(np.float32), truth, BF16, F32,
                         "float32", "bfloat16")


def test_a_tap_the_reference_keeps_float32_may_be_rounded_once():
    """diffusers keeps norm1(x.float()) in float32; a port (like the original Wan code) rounds it to bf16 once."""
    x = round_to(RNG.standard_normal((64, 128)), "bfloat16").astype(np.float64)  # the block input: bf16 in both
    truth, ref = _layernorm(x), _layernorm(x, np.float32)
    once = _tap(round_to(_layernorm(x, np.float32), "bfloat16"), truth, ref)
    assert once.verdict == PASS, once.reasons
    assert once.metrics["rounding_excess"] < 0.05 and once.metrics["budget_ratio"] == pytest.approx(1, abs=0.05)


def test_a_tap_computed_in_bf16_or_rounded_twice_still_fails():
    x = round_to(RNG.standard_normal((64, 128)), "bfloat16").astype(np.float64)
    truth, ref = _layernorm(x), _layernorm(x, np.float32)
    computed = _tap(_layernorm(x, rounding="bfloat16"), truth, ref)
    twice = _tap(round_to(round_to(_layernorm(x, np.float32), "float16"), "bfloat16"), truth, ref)
    for result in (computed, twice):
        assert result.verdict == FAIL
        assert "rounding_excess" in [f.metric for f in result.failures]
        assert "(ours bfloat16, reference float32)" in result.failures[-1].message


def test_budget_ratio_and_its_excusal():
    truth = RNG.standard_normal(4096)
    ref = round_to(truth, "bfloat16").astype(np.float32)
    noisy = (truth + 3 * (ref - truth)).astype(np.float32)  # three times the reference's own error
    over = judge_tensors("x", "x", ref, noisy, truth, Tolerance(budget_ratio=2.0), F32, "bfloat16", "bfloat16")
    assert over.verdict == FAIL and over.metrics["budget_ratio"] == pytest.approx(3, rel=1e-6)
    # a reference that is itself exact: agreeing with it to float32 limits excuses any ratio
    exact = judge_tensors("x", "x", truth.astype(np.float32), truth.astype(np.float32) + np.float32(5e-6), truth,
                          Tolerance(budget_ratio=2.0), F32, "float32", "float32")
    assert exact.verdict == PASS and exact.metrics.get("budget_excused") is True


@pytest.mark.parametrize("ref_dtype", ["bfloat16", "float16"])
def test_a_layer_wider_than_the_reference_fails_however_precise(ref_dtype):
    """A port that skips a cast back (float32 where the reference rounds to bf16) is more precise than the
    reference: no error budget can flag it, the dtype rule does."""
    truth = RNG.standard_normal(4096)
    ref = round_to(truth, ref_dtype).astype(np.float32)
    result = judge_tensors("x", "x", ref, truth.astype(np.float32), truth, BF16, F32, ref_dtype, "float32")
    assert result.metrics["budget_ratio"] < 0.01  # within the budget: far more precise than the reference
    assert [(f.kind, f.metric, f.value, f.limit) for f in result.failures] == [("structure", "dtype", "float32", ref_dtype)]
    assert result.reasons == [f"dtype float32 where the reference holds {ref_dtype} "
                              "(a rounding the reference makes is skipped)"]
    assert result.row()["failures"][0]["metric"] == "dtype"  # what the gate and the HTML read


@pytest.mark.parametrize("ref_dtype, mlx_dtype", [("float32", "bfloat16"), ("float32", "float32"), ("bfloat16", "float16"),
                                                  ("float16", "bfloat16"), ("int32", "int64"), ("bool", "float32"),
                                                  ("float64", "float32")])
def test_a_narrower_equal_or_non_float_dtype_is_judged_on_its_values(ref_dtype, mlx_dtype):
    ref = RNG.standard_normal(64).astype(np.float32)
    result = judge_tensors("x", "x", ref, ref.copy(), None, F32, None, ref_dtype, mlx_dtype)
    assert result.verdict == PASS, result.reasons


def test_a_layer_glob_may_allow_a_wider_dtype(tmp_path):
    rules = limits('[defaults.float32]\natol = 1e-5\n[defaults.bfloat16]\nbudget_ratio = 2\n[components.c.bfloat16.layers."mod*"]\n'
                   'allow_wider_dtype = true\n', tmp_path)
    ref_values = np.linspace(-2, 2, 64)
    ref, ours = captures({"mod/out": ref_values.astype(np.float16), "out": ref_values.astype(np.float16)},
                         {"mod/out": ref_values.astype(np.float32), "out": ref_values.astype(np.float32)})
    layers = {layer.name: layer for layer in compare("c", "bfloat16", ref, ours, rules).layers}
    assert layers["mod/out"].verdict == PASS and layers["mod/out"].limits["allow_wider_dtype"] is True
    assert [f.metric for f in layers["out"].failures] == ["dtype"]
    assert rules.for_layer("c", "bfloat16", "mod/out").allow_wider_dtype is True
    assert rules.for_layer("c", "bfloat16", "out").allow_wider_dtype is None


@pytest.mark.parametrize("value", ["1", "0.5", '"yes"'])
def test_allow_wider_dtype_takes_true_or_false(tmp_path, value):
    with pytest.raises(thresholds.ThresholdsError, match=r"layers\.'x\*'\.allow_wider_dtype: expected true or false"):
        limits(f'[components.c.bfloat16.layers."x*"]\nallow_wider_dtype = {value}\n', tmp_path)


def test_round_to_bfloat16_is_round_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -1 - 2**-9, 1 + 2**-7 + 2**-9], np.float32)
    assert round_to(x, "bfloat16").tolist() == [1.0, 1.0, 1 + 2**-6, -1.0, 1 + 2**-7]  # ties to even


# --- thresholds ---------------------------------------------------------------------------------------

def test_overlapping_layer_globs_first_match_wins(tmp_path):
    text = '[defaults.float32]\natol = 1\n[components.c.float32.layers."blk*"]\natol = 2\n[components.c.float32.layers."blk1*"]\natol = 3\n'
    assert limits(text, tmp_path).for_layer("c", "float32", "blk12").atol == 2
    swapped = text.replace('"blk*"]\natol = 2', '"TMP"]').replace('"blk1*"]\natol = 3', '"blk*"]\natol = 2')
    swapped = swapped.replace('"TMP"]', '"blk1*"]\natol = 3')
    assert limits(swapped, tmp_path).for_layer("c", "float32", "blk12").atol == 3


def test_layers_of_later_files_and_subclasses_win(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[defaults.float32]\natol = 1\n[components.parent.float32]\natol = 2\n')
    user = tmp_path / "user.toml"
    user.write_text('[components.child.float32]\ncosine_min = 0.5\n[components."par*".float32]\nrtol = 7\n')
    rules = thresholds.load([base, user], base=False)
    tol = rules.for_component(["child", "parent"], "float32")  # the child inherits its parent's table
    assert (tol.atol, tol.rtol, tol.cosine_min) == (2, 7, 0.5)
    assert rules.for_component("other", "float32").atol == 1


def test_a_glob_matching_no_layer_is_an_error(tmp_path):
    rules = limits('[defaults.float32]\natol = 1\n[components.c.float32.layers."gone*"]\natol = 2\n', tmp_path)
    with pytest.raises(thresholds.ThresholdsError, match="matching no layer.*gone"):
        compare("c", "float32", *captures({"a": [1.0]}, {"a": [1.0]}), rules)


# --- the gate's baselines --------------------------------------------------------------------------------

def _row(**metrics):
    result = LayerResult("x", "x", PASS, [], {"numel": 4, "cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0, "rmse": 0.0,
                                                  "ref_max_abs": 4.0, "ref_rms": 1.0, "nan_ref": 0, "inf_ref": 0,
                                                  "nan_mlx": 0, "inf_mlx": 0, **metrics}, (4,), (4,), "float32", "bfloat16")
    return result.row()


def test_baseline_floor_is_in_the_coarser_dtype():
    row = _row()
    assert baseline.floor("max_abs", row) == 4 * 2.0**-7 * 4.0  # bf16 ulps, not float32's
    assert baseline.floor("rmse", row) == 4 * 2.0**-7 * 1.0
    assert baseline.floor("err_vs_truth", row) == 4 * 2.0**-23 * 1.0  # against float64: float32 resolution
    assert baseline.floor("budget_ratio", row) == 1.0


def test_a_baseline_recorded_for_another_seed_config_or_device_is_not_used(tmp_path):
    rep = {"schema": 2, "component": "c", "dtype": "float32", "verdict": "PASS", "seed": 0, "config": {"n": 1},
           "layers": [_row()], "sections": []}
    known = baseline.load(baseline.save(rep, tmp_path, device="cpu"))
    assert known.mismatch({"n": 1}, 0, "cpu") is None
    assert "seed 0" in known.mismatch({"n": 1}, 3, "cpu")
    assert "different config" in known.mismatch({"n": 2}, 0, "cpu")
    assert "gpu" in known.mismatch({"n": 1}, 0, "gpu")


def test_excused_budget_ratios_are_not_counted_in_the_summary():
    a = LayerResult("a", "a", PASS, [], {"cosine": 1.0, "max_abs": 0.0, "budget_ratio": 9.0, "budget_excused": True})
    b = LayerResult("b", "b", PASS, [], {"cosine": 1.0, "max_abs": 0.0, "budget_ratio": 1.5})
    c = LayerResult("c", "c", EXCLUDED, [], {}, excluded="not materialised")
    from parity.compare import Comparison

    summary = report.summary_numbers(Comparison("x", "bfloat16", [a, b, c]))
    assert summary["max_budget_ratio"] == 1.5 and summary["layers"] == 2 and summary["excluded"] == 1


# --- files: atomic writes, names, paths -------------------------------------------------------------------

def test_atomic_write_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")

    def interrupted(handle):
        handle.write("new, half")
        assert path.read_text() == "old"  # the target is untouched while the new file is written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_layer_names_never_leave_their_folder(tmp_path):
    for name in ("../evil", "a/../../b", "/abs", "x\\..\\y", ".."):
        relative = layer_file(name)
        assert ".." not in relative.split("/") and not relative.startswith("/")
        assert inside(tmp_path, relative, "layer") .is_relative_to(tmp_path.resolve())


@pytest.mark.parametrize("where", ["bundle", "stream", "report"])
def test_manifest_paths_that_escape_their_folder_are_refused(tmp_path, where):
    entry = {"layer_order": ["a"], "shapes": {"a": [2]}, "dtypes": {"a": "float32"}, "files": {"a": "../../outside.npy"}}
    with pytest.raises(InputError, match="points outside"):
        if where == "stream":
            StreamCapture.open("ref", tmp_path, entry, "bundle x")
        elif where == "bundle":
            from parity.bundle import _bundle_inputs

            _bundle_inputs(tmp_path, {"inputs": {"x": {"file": "../x.npy", "shape": [1]}}, "inputs_sha256": ""})
        else:
            from parity.dumps import dump_path

            dump_path(tmp_path, {"sides": {"ref": entry}}, "ref", "a")


def test_a_bundle_whose_config_no_longer_matches_its_fingerprint_is_refused(tmp_path):
    from parity.bundle import BundleMismatch, compare_bundle, dump_reference

    bundle = dump_reference("rope", tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["config"]["theta"] = 500.0
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleMismatch, match="does not match its own fingerprint"):
        compare_bundle("rope", bundle, out_dir=None, use_bundle_config=True)


def test_strict_json_replaces_and_names_nonfinite_numbers(tmp_path):
    data, found = strict_json({"a": [1.0, math.inf], "b": {"c": math.nan}})
    assert data == {"a": [1.0, None], "b": {"c": None}} and found == {"a[1]": "inf", "b.c": "nan"}
    write_json(tmp_path / "r.json", {"x": -math.inf})
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "nonfinite": {"x": "-inf"}}
    assert report.restore_nonfinite({"x": None}, {"x": "-inf"}) == {"x": -math.inf}


# --- alignment ---------------------------------------------------------------------------------------------

def test_adapters_bring_a_port_tensor_into_the_reference_layout():
    x = np.arange(24).reshape(1, 2, 3, 4)
    assert apply_adapter("transpose(0, 2, 1, 3)", x, ()).shape == (1, 3, 2, 4)
    assert apply_adapter("split(2, 1)", x, ()).tolist() == x[..., 2:].tolist()
    assert apply_adapter("swap_halves", np.arange(4), ()).tolist() == [2, 3, 0, 1]
    assert apply_adapter("interleave_halves", np.arange(4), ()).tolist() == [0, 2, 1, 3]
    assert apply_adapter("take(-1, 0) | repeat(2)", np.arange(6).reshape(3, 2), ()).tolist() == [0, 0, 2, 2, 4, 4]
    with pytest.raises(AlignmentError, match="unknown step 'tranpose'"):
        apply_adapter("tranpose(0, 1)", x, ())


def test_alignment_rules_and_exclusions(tmp_path):
    rules = limits("[defaults.float32]\natol = 1e-5\n", tmp_path)
    alignment = Alignment.of({"blocks.*/q": ("blk{0}.qkv", "split(2, 0)")}, exclude={"res*": "port sums no module output"})
    ref, ours = captures({"blocks.3/q": np.ones((2, 2)), "res1": np.ones(2)}, {"blk3.qkv": np.ones((2, 4))})
    result = compare("c", "float32", ref, ours, rules, alignment)
    rows = {l.name: l for l in result.layers}
    assert rows["blocks.3/q"].mlx_name == "blk3.qkv" and rows["blocks.3/q"].verdict == PASS
    assert rows["res1"].verdict == EXCLUDED and result.verdict == PASS
    stale = Alignment.of(exclude={"gone*": "renamed"})
    with pytest.raises(AlignmentError, match="matching no layer"):
        compare("c", "float32", *captures({"a": [1.0]}, {"a": [1.0]}), rules, stale)


# --- statistics-only layers -----------------------------------------------------------------------------

def test_stats_only_layers_judge_what_their_statistics_can_tell():
    from parity.compare import judge_stats

    ref = RNG.standard_normal(5000).astype(np.float32)
    same = judge_stats("x", "x", tensor_stats(ref), tensor_stats(ref.copy()), None, F32, None, "float32", "float32")
    shifted = judge_stats("x", "x", tensor_stats(ref), tensor_stats(ref + np.float32(1e-3)), None, F32, None,
                          "float32", "float32")
    assert same.verdict == PASS and shifted.verdict == FAIL
    assert {"mean", "min", "max", "sample_max_abs"} <= {f.metric for f in shifted.failures}


def test_metrics_definitions():
    ref = np.array([3.0, -4.0], np.float32)
    m = tensor_metrics(ref, np.array([3.0, -3.0], np.float32))
    assert m["max_abs"] == 1.0 and m["rmse"] == pytest.approx(math.sqrt(0.5)) and m["mean_abs"] == 0.5
    assert m["cosine"] == pytest.approx(21 / (5 * math.sqrt(18))) and m["max_rel"] == pytest.approx(0.25)
    budget = precision_budget(ref.astype(np.float64), ref + np.float32(0.5), ref + np.float32(1.0))
    assert budget["budget_ratio"] == pytest.approx(2.0)


def test_apply_rules_on_a_metrics_row_is_the_verdict_the_gate_reads():
    result = LayerResult("x", "x", PASS, [], {"numel": 4, "cosine": 1.0, "max_abs": 1.0, "max_rel": 0.0, "rmse": math.nan,
                                             "ref_max_abs": 1.0, "nan_ref": 0, "inf_ref": 0, "nan_mlx": 0, "inf_mlx": 0},
                         (4,), (4,), "float32", "float32")
    apply_rules(result, F32)
    assert [f.metric for f in result.failures] == ["rmse", "max_abs"]


def test_drift_checks_growth_level_and_high_frequency():
    flat = {"error_growth": [1.0] * 4, "error_ratio": [1.0] * 4, "hf_ratio": [1.0] * 4}
    assert drift.first_failing_step(flat, 2.0, 2.0) is None
    assert drift.first_failing_step({**flat, "error_growth": [1, 1.5, 2.5, 3]}, 2.0) == 2
    assert drift.first_failing_step({**flat, "error_ratio": [1, 1, 1, 2.5]}, 2.0, level_bound=2.0) == 3
    assert drift.first_failing_step({**flat, "hf_ratio": [1, 1, 0.4, 0.4]}, 2.0) == 2
