"""Rules of the judging core that the mutation check (scripts/mutation_check.sh) found untested.

Each test pins one rule of a judging module exactly: a changed comparison, constant, message or
branch of that rule fails it. Fast unit tests on synthetic data (no component run), as in
tests/test_judging.py; docs/mutation.md lists the mutants no test can kill and why.
"""
from __future__ import annotations

import json
import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from parity import dumps
from parity.capture import Capture
from parity.metrics import rmse_and_rms, tensor_metrics
from parity.streaming import StreamCapture, stats_predicate
from parity.vocab import InputError
from parity.weights import (WeightLoadError, check_state, keeps_float32, load_torch_strict, read_checkpoint,
                            read_config, select_prefix, strict_load)


# --- weights: the strict loader ---------------------------------------------------------------------

def test_strict_load_message_names_each_missing_and_unused_key_by_its_checkpoint_name():
    with pytest.raises(WeightLoadError) as err:
        check_state("M", {"a": (1,), "b": (2,)}, {"b": (2,), "c": (3,), "d": (1,)}, {"c": "orig.c", "d": "d"})
    assert str(err.value) == "strict load failed for M: missing keys ['a']; unused keys ['d', 'orig.c (as c)']"
    with pytest.raises(WeightLoadError) as err:
        check_state("M", {"a": (1,)}, {"a": (1,), "x": (1,)})
    assert str(err.value) == "strict load failed for M: missing keys none; unused keys ['x']"
    with pytest.raises(WeightLoadError) as err:
        check_state("M", {"a": (1,), "b": (1,)}, {})
    assert str(err.value) == "strict load failed for M: missing keys ['a', 'b']; unused keys none"


def test_strict_load_names_the_first_wrong_shape_by_its_checkpoint_name_and_counts_the_rest():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    with pytest.raises(WeightLoadError) as err:
        check_state("M", expected, {"a": (3, 2), "b": (5,), "c": (1,)}, {"a": "src.a"})
    assert str(err.value) == "strict load failed for M: weight 'src.a' (as 'a'): expected shape (2, 3), got (3, 2) (and 1 more)"
    with pytest.raises(WeightLoadError) as err:
        check_state("M", expected, {"a": (2, 3), "b": (4,), "c": (2,)})
    assert str(err.value) == "strict load failed for M: weight 'c': expected shape (1,), got (2,)"
    check_state("M", expected, {"a": [2, 3], "b": [4], "c": [1]})  # a list shape is the same shape


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.LayerNorm(2)
        self.norm2 = nn.LayerNorm(2)


def _normed_state():
    return {"linear.weight": np.ones((2, 3)), "linear.bias": np.zeros(2), "norm.weight": np.ones(2),
            "norm.bias": np.zeros(2), "norm2.weight": np.ones(2), "norm2.bias": np.zeros(2)}


def test_strict_load_keeps_the_modules_diffusers_keeps_in_float32():
    model = strict_load(_Normed(), _normed_state(), dtype=mx.bfloat16, keep_float32=("norm",))
    assert (model.norm.weight.dtype, model.norm.bias.dtype) == (mx.float32, mx.float32)
    assert (model.norm2.weight.dtype, model.linear.weight.dtype) == (mx.bfloat16, mx.bfloat16)
    assert keeps_float32("blocks.0.norm.weight", ["norm"]) and not keeps_float32("blocks.0.norm2.weight", ["norm"])
    assert not keeps_float32("blocks.0.norm.weight", [])
    plain = strict_load(_Normed(), _normed_state())
    assert plain.linear.weight.dtype == mx.float32 and plain.linear.weight.sum().item() == 6


def test_strict_load_refuses_two_keys_converted_to_one_parameter():
    state = {"a": np.ones((2, 3)), "b": np.ones((2, 3))}
    with pytest.raises(WeightLoadError) as err:
        strict_load(_Normed(), state, convert=lambda key, array: ("linear.weight", array))
    assert str(err.value) == "strict load failed for _Normed: 'a' and 'b' both convert to 'linear.weight'"


def test_strict_load_reports_converted_keys_by_their_checkpoint_names():
    state = {f"model.{k}": v for k, v in _normed_state().items()}
    state["model.extra"] = np.ones(1)
    with pytest.raises(WeightLoadError, match=r"unused keys \['model.extra \(as extra\)'\]"):
        strict_load(_Normed(), state, convert=lambda key, array: (key.removeprefix("model."), array))


def test_a_reference_module_is_loaded_strictly_too():
    import torch

    linear = torch.nn.Linear(3, 2)
    load_torch_strict(linear, {"weight": np.full((2, 3), 2.0, np.float32), "bias": np.ones(2, np.float32)})
    assert linear.weight.sum().item() == 12 and linear.bias.sum().item() == 2
    with pytest.raises(WeightLoadError) as err:
        load_torch_strict(linear, {"weight": np.zeros((2, 3), np.float32)})
    assert str(err.value) == "strict load failed for reference Linear: missing keys ['bias']; unused keys none"


def test_select_prefix_strips_it_and_refuses_a_prefix_that_selects_nothing():
    state = {"a.x": np.ones(1), "a.y": np.zeros(1), "b.z": np.ones(2), "ab.w": np.ones(3)}
    assert sorted(select_prefix(state, "a.")) == ["x", "y"] and select_prefix(state, "a.")["y"] is state["a.y"]
    whole = select_prefix(state, "")
    assert whole == state and whole is not state
    with pytest.raises(WeightLoadError) as err:
        select_prefix(state, "c.")
    assert str(err.value) == "checkpoint has no keys under prefix 'c.'"


def test_read_config_from_a_file_or_the_folder_holding_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dim": 8}))
    assert read_config(tmp_path) == read_config(tmp_path / "config.json") == {"dim": 8}


# --- weights: reading checkpoints -------------------------------------------------------------------

def test_checkpoints_are_widened_to_float32_never_narrowed(tmp_path):
    from safetensors.numpy import save_file

    save_file({"h": np.ones(2, np.float16), "d": np.ones(2, np.float64), "i": np.arange(2, dtype=np.int32),
               "f": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    state = read_checkpoint(tmp_path / "a.safetensors")
    assert {k: v.dtype.name for k, v in state.items()} == {"h": "float32", "d": "float64", "i": "int32", "f": "float32"}


def test_a_bfloat16_safetensors_file_is_read_through_mlx(tmp_path):
    mx.save_safetensors(str(tmp_path / "b.safetensors"), {"w": mx.array([1.5, -2.0], dtype=mx.bfloat16),
                                                           "i": mx.array([3], dtype=mx.int32)})
    state = read_checkpoint(tmp_path / "b.safetensors")
    assert state["w"].dtype == np.float32 and state["w"].tolist() == [1.5, -2.0]
    assert state["i"].dtype == np.int32 and state["i"].tolist() == [3]


def test_a_sharded_model_folder_is_one_state_dict(tmp_path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones(1, np.float32)}, str(tmp_path / "m-00001.safetensors"))
    save_file({"b": np.zeros(2, np.float32)}, str(tmp_path / "m-00002.safetensors"))
    (tmp_path / "notes.bin").write_bytes(b"ignored: a folder is read for its safetensors files")
    assert sorted(read_checkpoint(tmp_path)) == ["a", "b"]


def test_pytorch_checkpoints_are_read_without_unpickling_and_widened(tmp_path):
    import torch

    torch.save({"w": torch.ones(2, dtype=torch.bfloat16), "d": torch.ones(1, dtype=torch.float64),
                "i": torch.arange(3)}, tmp_path / "m.pt")
    state = read_checkpoint(tmp_path / "m.pt")
    assert {k: v.dtype.name for k, v in state.items()} == {"w": "float32", "d": "float64", "i": "int64"}
    torch.save([torch.ones(1)], tmp_path / "list.bin")
    with pytest.raises(WeightLoadError) as err:
        read_checkpoint(tmp_path / "list.bin")
    assert str(err.value) == f"checkpoint {tmp_path / 'list.bin'}: expected a state dict, got list"
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightLoadError, match=r"bad.pth could not be read: "):
        read_checkpoint(tmp_path / "bad.pth")


@pytest.mark.parametrize("name, message", [
    ("missing.safetensors", "checkpoint {path} does not exist"),
    ("model.ckpt", "checkpoint {path}: expected .safetensors, .bin, .pt or a diffusers model folder"),
    ("empty", "checkpoint {path}: folder holds no *.safetensors file"),
])
def test_unreadable_checkpoints_are_named(tmp_path, name, message):
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    elif name.endswith(".ckpt"):
        path.write_bytes(b"x")
    with pytest.raises(WeightLoadError) as err:
        read_checkpoint(path)
    assert str(err.value) == message.format(path=path)


# --- dumps: run folders and files -------------------------------------------------------------------

def test_a_run_folder_without_any_report_is_discarded_and_one_with_a_report_kept(tmp_path):
    empty = dumps.new_run_dir(tmp_path, "empty")
    kept = dumps.new_run_dir(tmp_path, "kept")
    (kept / "rope-float32").mkdir()
    (kept / "rope-float32" / "report.json").write_text("{}")
    assert dumps.discard_if_empty(empty) is True and not empty.exists()
    assert dumps.discard_if_empty(kept) is False and kept.is_dir()
    assert dumps.discard_if_empty(tmp_path / "never-made") is False


def test_a_run_is_incomplete_until_marked_complete_and_says_why(tmp_path):
    run = dumps.new_run_dir(tmp_path, "r")
    assert dumps.incomplete_reason(run).startswith("running (")
    dumps.mark_incomplete(run, "interrupted")
    assert dumps.incomplete_reason(run).startswith("interrupted (20")
    (run / dumps.INCOMPLETE).write_text("  \n")
    assert dumps.incomplete_reason(run) == "incomplete"
    dumps.mark_complete(run)
    assert dumps.incomplete_reason(run) is None and list(run.iterdir()) == []
    generated = dumps.new_run_dir(tmp_path)
    assert generated.parent == tmp_path and len(generated.name) == len("20260101-000000-abcdef")


def test_output_folders_and_files_are_probed_before_anything_runs(tmp_path):
    assert dumps.writable_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []  # nothing created, the probe file removed
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError) as err:
        dumps.writable_folder(tmp_path / "f", "--out")
    assert str(err.value) == f"--out {tmp_path / 'f'}: is a file, expected a folder"
    with pytest.raises(InputError) as err:
        dumps.writable_folder(tmp_path / "f" / "sub", "--out")
    assert str(err.value) == f"--out {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a file, expected a folder"
    (tmp_path / "a").mkdir()
    with pytest.raises(InputError) as err:
        dumps.writable_file(tmp_path / "a", "--junit")
    assert str(err.value) == f"--junit {tmp_path / 'a'}: is a folder, expected a file"
    assert dumps.writable_file(tmp_path / "new" / "j.xml", "--junit") == tmp_path / "new" / "j.xml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "f"]


def test_files_are_written_with_the_permissions_of_ordinary_files(tmp_path):
    mask = os.umask(0o027)
    try:
        dumps.write_text(tmp_path / "r.txt", "x")
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(mask)
    assert (tmp_path / "r.txt").stat().st_mode & 0o777 == 0o640  # 0o666 under the umask


def test_layer_files_replace_unsafe_characters_and_keep_nesting():
    assert dumps.layer_file("blocks.0/attn:q k") == "blocks.0/attn_q_k.npy"
    assert dumps.layer_file("a//b/./c") == "a/_/b/_/c.npy"


def test_manifest_files_must_map_layers_to_files():
    manifest = {"sides": {"ref": {"files": {"a": "ref/a.npy"}}, "mlx": {"files": ["a.npy"]}}}
    assert dumps.manifest_files(manifest, "ref", "report r") == {"a": "ref/a.npy"}
    assert dumps.manifest_files(manifest, "truth", "report r") == {}
    with pytest.raises(InputError) as err:
        dumps.manifest_files(manifest, "mlx", "report r")
    assert str(err.value) == "report r: manifest 'sides.mlx.files' must be an object of layer -> file, got list"


def test_write_json_records_which_values_were_not_finite(tmp_path):
    dumps.write_json(tmp_path / "a.json", {"x": [1.0, math.nan], "nonfinite": {"old": "inf"}})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1.0, None], "nonfinite": {"old": "inf", "x[1]": "nan"}}
    dumps.write_json(tmp_path / "b.json", [math.inf])  # not an object: nowhere to record it
    assert json.loads((tmp_path / "b.json").read_text()) == [None]


def test_dumps_write_only_the_kept_tensors_but_describe_every_layer(tmp_path):
    ref = Capture("ref")
    ref.add("a", np.ones(2, np.float32))
    ref.add("b/c", np.zeros((1, 3), np.float32))
    dumps.write_dumps(tmp_path, {"component": "x"}, {"ref": ref, "truth": None},
                      keep=lambda side, layer: layer != "a")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == {"component": "x", "sides": {"ref": {
        "layer_order": ["a", "b/c"], "files": {"b/c": "ref/b/c.npy"}, "shapes": {"a": [2], "b/c": [1, 3]},
        "dtypes": {"a": "float32", "b/c": "float32"}}}}
    assert np.load(tmp_path / "ref" / "b" / "c.npy").shape == (1, 3) and not (tmp_path / "ref" / "a.npy").exists()


# --- streaming: the spooled capture -----------------------------------------------------------------

def test_a_streamed_capture_lists_its_tensors_not_its_statistics(tmp_path):
    capture = StreamCapture("ref", tmp_path, stats_predicate(["s*"]))
    capture.add("a", np.ones(3, np.float32))
    capture.add("s1", np.arange(4, dtype=np.float32))
    capture.add("b", np.zeros(2, np.float32))
    assert list(capture.tensors) == ["a", "b"] and len(capture.tensors) == 2
    assert "a" in capture.tensors and "s1" not in capture.tensors and "z" not in capture.tensors
    assert capture.tensors["a"].tolist() == [1, 1, 1] and capture.stats_of("a") is None
    assert capture.stats_of("s1")["numel"] == 4 and (tmp_path / "s1.stats.json").is_file()
    with pytest.raises(KeyError, match="ref: layer 's1' was captured as statistics only"):
        capture.tensors["s1"]
    with pytest.raises(KeyError):
        capture.tensors["z"]
    plain = StreamCapture("mlx", tmp_path / "plain")
    plain.add("s1", np.ones(1, np.float32))  # no stats-only predicate: every layer is a tensor
    assert plain.files == {"s1": "s1.npy"} and plain.stats == {}


def test_a_streamed_tensor_is_in_memory_only_while_its_sink_judges_it():
    seen = []

    def sink(name, array, dtype):
        seen.append((name in capture.tensors, capture.tensors[name] is array, dtype, len(capture.tensors)))

    capture = StreamCapture("mlx", None, sink=sink)
    capture.add("a", np.ones(2, np.float32))
    assert seen == [(True, True, "float32", 1)]
    assert "a" not in capture.tensors and capture.files == {} and capture.shapes == {"a": (2,)}


def test_a_spooled_tensor_whose_file_changed_shape_is_refused(tmp_path):
    capture = StreamCapture("ref", tmp_path)
    capture.add("a", np.ones((2, 3), np.float32))
    np.save(tmp_path / "a.npy", np.ones(6, np.float32))
    with pytest.raises(InputError) as err:
        capture.tensors["a"]
    assert str(err.value) == f"{tmp_path / 'a.npy'}: holds shape (6,), its manifest says (2, 3) for ref layer 'a'"


def test_rmse_and_rms_over_the_finite_elements():
    truth = np.array([3.0, 4.0, np.nan, 1.0])
    test = np.array([3.0, 2.0, 1.0, np.inf])
    rmse, rms = rmse_and_rms(truth, test)
    assert rmse == pytest.approx(math.sqrt(2.0), rel=1e-15) and rms == pytest.approx(math.sqrt(12.5), rel=1e-15)
    assert all(math.isnan(v) for v in rmse_and_rms(np.array([np.nan]), np.array([1.0])))


def test_rmse_of_an_overflowing_difference_is_inf_without_a_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rmse_and_rms(np.array([-1e308]), np.array([1e308])) == (math.inf, math.inf)


# --- gate: what a recorded verdict and a baseline make of a report -----------------------------------

GATE_LIMITS = "[defaults.float32]\natol = 1e-5\nbaseline_factor = 2.0\n"


def _rules(tmp_path, text=GATE_LIMITS):
    from parity import thresholds

    path = tmp_path / "gate.toml"
    path.write_text(text)
    return thresholds.load(path, base=False)


def _row(layer, verdict="PASS", failures=(), **metrics):
    return {"layer": layer, "verdict": verdict, "failures": list(failures), "dtype_ref": "float32",
            "dtype_mlx": "float32", "ref_max_abs": 1.0, "ref_rms": 1.0, **metrics}


def _report(*rows, verdict="PASS", **extra):
    return {"component": "c", "dtype": "float32", "verdict": verdict, "seed": 0, "config": {}, "layers": list(rows),
            **extra}


def test_a_recorded_failure_reads_its_limit_with_the_comparison_it_broke():
    from parity.gate import _threshold

    at_least = {m: _threshold({"metric": m, "limit": 0.5}) for m in ("cosine", "sample_cosine", "numel")}
    equal = {m: _threshold({"metric": m, "limit": 4}) for m in ("presence", "shape", "truth", "sample")}
    assert set(at_least.values()) == {">= 0.5"} and set(equal.values()) == {"== 4"}
    assert _threshold({"metric": "max_abs", "limit": 2e-5}) == "<= 2e-05"
    assert _threshold({"metric": "rounding_excess", "limit": 0.25}) == "<= 0.25"
    assert _threshold({}) == "<= -"


def test_the_gate_takes_the_run_s_failures_as_they_were_recorded():
    from parity.gate import recorded
    from parity.outcome import Finding

    failure = {"kind": "absolute", "metric": "max_abs", "value": 1e-3, "limit": 2e-5, "message": "max abs 0.001 > 2e-05"}
    assert recorded("c", "float32", _row("l", "FAIL", [failure]), {"max_abs": 1e-6}) == [
        Finding("c", "float32", "l", "max_abs", 1e-3, "<= 2e-05", 1e-6, "absolute", "max abs 0.001 > 2e-05")]
    assert recorded("c", "float32", _row("l", "FAIL", [{}]), None) == [
        Finding("c", "float32", "l", "verdict", None, "<= -", None, "absolute", "")]
    # a FAIL without failure records (an older report): the verdict itself is the finding
    assert recorded("c", "float32", {**_row("l", "FAIL"), "reasons": "why"}, None) == [
        Finding("c", "float32", "l", "verdict", "FAIL", "== PASS", None, "absolute", "why")]
    assert recorded("c", "float32", _row("l", "FAIL"), None)[0].message == "the run judged this layer FAIL"
    assert recorded("c", "float32", {"layer": "l", "verdict": "PASS", "failures": None}, None) == []


def test_a_crash_and_an_empty_run_fail_the_gate_with_what_happened(tmp_path):
    from parity import gate
    from parity.outcome import Finding

    crash = {"side": "mlx", "after": None, "error": "ValueError: bad"}
    outcome = gate.evaluate(_report(verdict="FAIL", crash=crash), _rules(tmp_path), no_baseline="b.json does not exist")
    assert outcome.failures == [
        Finding("c", "float32", "(run)", "crash", "ValueError: bad", "completes", None, "error",
                "the mlx forward raised after no layer: ValueError: bad"),
        Finding("c", "float32", "(none)", "layers", 0, ">= 1", None, "structure",
                "nothing compared: the component captured no layers")]
    assert outcome.notes == ["no baseline (b.json does not exist): gated on absolute thresholds only"]
    after = gate.evaluate(_report(_row("a"), verdict="FAIL", crash={**crash, "after": "a"}), _rules(tmp_path))
    assert after.failures[0].message == "the mlx forward raised after a: ValueError: bad"
    assert after.notes == ["no baseline (none given): gated on absolute thresholds only"]
    crashed = gate.crashed("vae", "bfloat16", RuntimeError("boom"))
    assert crashed.error == "RuntimeError: boom" and not crashed.passed and crashed.layers == []
    assert crashed.failures == [Finding("vae", "bfloat16", "(run)", "run", "crashed", "completes", None, "error",
                                        "RuntimeError: boom")]


def test_excluded_layers_are_not_gated_and_a_run_verdict_without_findings_still_fails(tmp_path):
    from parity import gate
    from parity.outcome import Finding

    rows = [_row("a"), {"layer": "x", "verdict": "EXCLUDED"}]
    outcome = gate.evaluate(_report(*rows, verdict="FAIL", first_divergence="a"), _rules(tmp_path))
    assert outcome.layers == ["a"]
    assert outcome.failures == [Finding("c", "float32", "a", "verdict", "FAIL", "PASS", None, "absolute",
                                        "the run's verdict is not PASS")]
    unnamed = gate.evaluate(_report(_row("a"), verdict="FAIL"), _rules(tmp_path))
    assert unnamed.failures[0].layer == "(run)"
    assert gate.evaluate(_report(_row("a")), _rules(tmp_path)).passed


def test_a_failed_section_fails_the_gate_at_its_failing_step(tmp_path):
    from parity import gate
    from parity.outcome import Finding

    sections = [{"name": "drift", "title": "Drift", "passed": False, "failing": None, "note": "grew 3x"},
                {"name": "hf", "passed": False, "failing": "step/2"},
                {"name": "ok", "passed": True}, {"name": "info", "passed": None}]
    outcome = gate.evaluate(_report(_row("a"), verdict="FAIL", sections=sections), _rules(tmp_path))
    assert outcome.failures == [
        Finding("c", "float32", "section:drift", "section", "drift", "passed", None, "absolute", "Drift failed grew 3x"),
        Finding("c", "float32", "step/2", "section", "hf", "passed", None, "absolute", "hf failed")]


def _baseline(tmp_path, *rows, seed=0):
    from parity import baseline

    return baseline.load(baseline.save(_report(*rows, seed=seed), tmp_path / "baselines", device="cpu"))


def test_a_regression_and_an_improvement_against_the_baseline_are_spelled_out(tmp_path):
    from parity import gate
    from parity.outcome import Finding

    known = _baseline(tmp_path, _row("a", max_abs=1e-6, rmse=1e-6))
    outcome = gate.evaluate(_report(_row("a", max_abs=3e-6, rmse=1e-7)), _rules(tmp_path), known, device="cpu")
    assert outcome.failures == [Finding("c", "float32", "a", "max_abs", 3e-6, "<= 2e-06 (2x baseline)", 1e-6,
                                        "baseline", "max_abs 3e-06 regressed past 2x baseline 2e-06 "
                                                    "(baseline 1e-06), within absolute thresholds")]
    assert outcome.improvements == [Finding("c", "float32", "a", "rmse", 1e-7, "< 5e-07", 1e-6, "baseline",
                                            "rmse improved 1e-06 -> 1e-07")]
    assert outcome.baseline_path == str(known.path) and outcome.notes == []


def test_layers_new_to_the_baseline_are_noted_and_only_with_a_baseline_factor(tmp_path):
    from parity import gate

    known = _baseline(tmp_path, _row("a"))
    rows = [_row("a")] + [_row(f"n{i}") for i in range(7)]
    outcome = gate.evaluate(_report(*rows), _rules(tmp_path), known, device="cpu")
    assert outcome.passed and outcome.notes == [
        "7 layer(s) not in the baseline (absolute thresholds only): n0, n1, n2, n3, n4 ..."]
    five = gate.evaluate(_report(*rows[:6]), _rules(tmp_path), known, device="cpu")
    assert five.notes == ["5 layer(s) not in the baseline (absolute thresholds only): n0, n1, n2, n3, n4"]
    unfactored = gate.evaluate(_report(_row("a", max_abs=9e-6), *rows[1:]), _rules(tmp_path, "[defaults.float32]\natol = 1e-5\n"),
                               known, device="cpu")
    assert unfactored.passed and unfactored.notes == []  # no baseline_factor: absolute thresholds only


def test_a_baseline_of_another_run_is_named_in_the_note_and_not_used(tmp_path):
    from parity import baseline, gate

    known = _baseline(tmp_path, _row("a", max_abs=1e-7), seed=3)
    outcome = gate.evaluate(_report(_row("a", max_abs=9e-6)), _rules(tmp_path), known, device="cpu")
    assert outcome.passed and outcome.baseline_path is None
    assert outcome.notes == [f"no baseline ({baseline.shown(known.path)} recorded with seed 3, this run used seed 0): "
                             "gated on absolute thresholds only"]


def test_the_gate_summary_reads_as_documented(tmp_path):
    from parity import gate
    from parity.outcome import Finding, GateResult, Outcome

    failing = Outcome("c", "float32", ["a", "b"], report_dir="reports/r1/c-float32", failures=[
        Finding("c", "float32", "a", "max_abs", 1e-3, "<= 2e-05", None, "absolute", "max abs 0.001 > 2e-05"),
        Finding("c", "float32", "b", "cosine", 0.5, ">= 0.99", 0.9, "absolute", "cosine low")],
        improvements=[Finding("c", "float32", "b", "rmse", 1e-7, "< 5e-07", 1e-6, "baseline", "improved")],
        notes=["no baseline (none given): gated on absolute thresholds only"])
    passing = Outcome("d", "bfloat16", ["x"], baseline_path="baselines/d-bfloat16.json")
    text = gate.summary(GateResult([failing, passing], None, 1.25), max_rows=1)
    assert text.splitlines() == [
        "", "FAILED CHECKS",
        "component  dtype    layer  metric   value  threshold  baseline",
        "c          float32  a      max_abs  0.001  <= 2e-05   -",
        "  ... 1 more failed checks in c float32 (see reports/r1/c-float32)",
        "", "improvements (information only; `parity baseline save` to lock them in)",
        "component  dtype    layer  metric  value  baseline",
        "c          float32  b      rmse    1e-07  1e-06",
        "", "notes", "  c float32: no baseline (none given): gated on absolute thresholds only",
        "", "gate FAIL: 1/2 component runs fail", "  FAIL c float32: first divergence a (max abs 0.001 > 2e-05)",
        "gate wall time 1.2s"]
    passed = gate.summary(GateResult([passing], tmp_path, 2.0))
    assert passed.splitlines() == ["", "gate PASS: 1/1 component runs pass (1 layers; baselines for 1/1)",
                                   f"gate wall time 2.0s; reports in {tmp_path}"]
    assert gate.summary(GateResult([], None, 0.0)).splitlines() == ["", "gate FAIL: nothing was compared",
                                                                   "gate wall time 0.0s"]
    assert gate.failure_table([passing]) == []
    table = gate.failure_table([Outcome("c", "float32", failures=failing.failures * 2)], max_rows=3)
    assert table[-1] == "  ... 1 more failed checks in c float32 (see gate.json)"


def test_gate_json_records_each_outcome_and_the_verdict():
    from parity import gate
    from parity.outcome import GateResult, Outcome

    data = gate.to_json(GateResult([Outcome("c", "float32", ["a"])], None, 1.23456))
    assert data["verdict"] == "PASS" and data["seconds"] == 1.235
    assert data["outcomes"][0]["passed"] is True and data["outcomes"][0]["first_divergence"] is None
    assert data["outcomes"][0]["layers"] == ["a"] and data["outcomes"][0]["component"] == "c"
    assert gate.to_json(GateResult([], None, 0.0))["verdict"] == "FAIL"


# --- baseline: what is recorded, what is read, how a change is judged --------------------------------

def test_a_baseline_records_the_gated_metrics_their_scales_and_the_coarser_dtype():
    from parity import baseline

    rows = [{"layer": "a", "max_abs": 1e-6, "rmse": 2, "cosine": 0.99, "budget_ratio": 1.5, "err_vs_truth": math.nan,
             "ref_max_abs": 4.0, "ref_rms": 1, "dtype_ref": "float32", "dtype_mlx": "bfloat16", "snr_db": 40.0},
            {"layer": "b", "budget_ratio": 9.0, "budget_excused": True, "max_abs": math.inf, "ref_rms": None,
             "dtype_ref": "int32"}]
    report = {"component": "c", "dtype": "bfloat16", "verdict": "PASS", "seed": 5, "config": {"n": 1},
              "git_commit": "abc", "versions": {"mlx": "1", "torch": "2", "pandas": "3"}, "layers": rows}
    data = baseline.from_report(report, "gpu")
    assert data["layers"] == {
        "a": {"max_abs": 1e-6, "rmse": 2.0, "budget_ratio": 1.5, "cosine": 0.99, "ref_max_abs": 4.0, "ref_rms": 1.0,
              "dtype": "bfloat16"},
        "b": {"dtype": "bfloat16"}}  # excused ratio, inf and null scale left out; the run's dtype when none is known
    assert isinstance(data["layers"]["a"]["rmse"], float)
    assert {k: data[k] for k in ("schema", "component", "dtype", "seed", "device", "config", "git_commit", "versions")} == {
        "schema": 1, "component": "c", "dtype": "bfloat16", "seed": 5, "device": "gpu", "config": {"n": 1},
        "git_commit": "abc", "versions": {"mlx": "1", "torch": "2"}}
    assert data["created"].endswith("+00:00")
    bare = baseline.from_report({"component": "c", "dtype": "float32", "verdict": "PASS", "layers": []}, "cpu")
    assert (bare["seed"], bare["config"], bare["git_commit"], bare["versions"]) == (0, {}, None, {})


def test_only_a_passing_run_is_a_baseline_and_the_refusal_names_it():
    from parity import baseline

    with pytest.raises(baseline.BaselineError) as err:
        baseline.from_report({"component": "c", "dtype": "float32", "verdict": "FAIL", "first_divergence": "x"}, "cpu")
    assert str(err.value) == "c float32: only a passing run can be a baseline (first divergence: x)"


def _baseline_file(tmp_path, name="c-float32.json", **changes):
    data = {"schema": 1, "component": "c", "dtype": "float32", "seed": 0, "device": "cpu", "config": {},
            "layers": {"a": {"max_abs": 0.0, "dtype": "float32"}}, **changes}
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"schema": "1"}, "key 'schema' missing or not a int"),
    ({"seed": True}, "key 'seed' missing or not a int"),
    ({"component": None}, "key 'component' missing or not a str"),
    ({"dtype": 32}, "key 'dtype' missing or not a str"),
    ({"device": []}, "key 'device' missing or not a str"),
    ({"config": []}, "key 'config' missing or not a dict"),
    ({"layers": []}, "key 'layers' missing or not a dict"),
    ({"schema": 2}, "schema 2, this harness reads schema 1"),
    ({"component": "d"}, "holds d float32; expected file name d-float32.json"),
    ({"layers": {"a": [1]}}, "layers['a'] is not an object"),
    ({"layers": {"a": {"max_abs": -1}}}, "layers['a'].max_abs = -1; expected a finite non-negative number"),
    ({"layers": {"a": {"rmse": "0"}}}, "layers['a'].rmse = '0'; expected a finite non-negative number"),
    ({"layers": {"a": {"rmse": False}}}, "layers['a'].rmse = False; expected a finite non-negative number"),
    ({"layers": {"a": {"rmse": 1e999}}}, "layers['a'].rmse = inf; expected a finite non-negative number"),
])
def test_a_malformed_baseline_names_its_file_and_key(tmp_path, changes, message):
    from parity import baseline

    path = _baseline_file(tmp_path, **changes)
    with pytest.raises(baseline.BaselineError) as err:
        baseline.load(path)
    assert str(err.value) == f"baseline {path}: {message}"


def test_a_baseline_file_that_is_not_an_object_or_not_json_is_refused(tmp_path):
    from parity import baseline

    path = tmp_path / "c-float32.json"
    path.write_text("[1]")
    with pytest.raises(baseline.BaselineError) as err:
        baseline.load(path)
    assert str(err.value) == f"baseline {path}: expected a JSON object"
    path.write_text("{")
    with pytest.raises(baseline.BaselineError, match=r"^baseline .*c-float32.json is not valid JSON"):
        baseline.load(path)


def test_a_baseline_is_found_by_component_and_dtype(tmp_path):
    from parity import baseline

    path = _baseline_file(tmp_path, seed=4, git_commit="abc")
    found = baseline.find(tmp_path, "c", "float32")
    assert (found.component, found.dtype, found.seed, found.device, found.path) == ("c", "float32", 4, "cpu", path)
    assert found.layers == {"a": {"max_abs": 0.0, "dtype": "float32"}} and found.meta["git_commit"] == "abc"
    assert "layers" not in found.meta and "config" not in found.meta
    assert baseline.find(tmp_path, "c", "bfloat16") is None
    assert baseline.path_for("dir", "c", "bfloat16") == baseline.Path("dir") / "c-bfloat16.json"


def test_a_baseline_describes_only_its_own_config_seed_and_device():
    from parity.baseline import Baseline

    known = Baseline("c", "float32", 2, {"n": 1, "m": [1, 2]}, "cpu", {})
    assert known.mismatch({"m": [1, 2], "n": 1}, 2, "cpu") is None and known.mismatch({"n": 1, "m": [1, 2]}, 2, None) is None
    assert known.mismatch({"n": 1}, 2, "cpu") == "recorded for a different config (re-save it with `parity baseline save`)"
    assert known.mismatch({"n": 1, "m": [1, 2]}, 0, "cpu") == "recorded with seed 2, this run used seed 0"
    assert known.mismatch({"n": 1, "m": [1, 2]}, 2, "gpu") == "recorded on the MLX cpu device, this run is on gpu"


def test_paths_in_messages_are_shown_relative_to_the_current_folder(tmp_path, monkeypatch):
    from parity.baseline import shown

    monkeypatch.chdir(tmp_path)
    assert shown(tmp_path / "baselines" / "c.json") == os.path.join("baselines", "c.json")
    assert shown("/elsewhere/c.json") == "/elsewhere/c.json" and shown(None) == "-"


def test_the_regression_floor_uses_the_run_s_scale_or_else_the_baseline_s():
    from parity import baseline

    row = {"dtype_ref": "float32", "dtype_mlx": "float32", "ref_max_abs": math.nan, "ref_rms": "?"}
    base = {"ref_max_abs": 8.0, "ref_rms": 2.0, "dtype": "float16"}
    assert baseline.floor("max_abs", row, base) == 4 * 2.0**-10 * 8.0  # coarser of the run's and the baseline's dtype
    assert baseline.floor("rmse", row, base) == 4 * 2.0**-10 * 2.0
    assert baseline.floor("max_abs", {**row, "ref_max_abs": 0.5}, base) == 4 * 2.0**-10 * 0.5
    assert baseline.floor("max_abs", row) == 0.0  # no scale anywhere: no floor
    assert baseline.floor("max_abs", {"dtype_ref": "int8", "ref_max_abs": 1.0}) == 4 * 2.0**-23
    assert baseline._coarser("float64", "bfloat16", None) == "bfloat16" and baseline._coarser(None, "x") == "float32"


def test_a_baseline_change_is_judged_against_the_larger_of_baseline_and_floor():
    from parity.baseline import Change, check_layer

    row = {"dtype_ref": "float32", "dtype_mlx": "float32", "ref_max_abs": 1.0, "ref_rms": 1.0,
           "max_abs": 5e-6, "rmse": math.nan, "budget_ratio": 0.5, "err_vs_truth": "n/a", "cosine": 0.5}
    base = {"max_abs": 2e-6, "rmse": 1e-7, "budget_ratio": 0.2}
    floor = 4 * 2.0**-23
    changes = check_layer(row, base, 2.0)
    assert [c.metric for c in changes] == ["max_abs", "rmse", "budget_ratio"]  # err_vs_truth is no number: skipped
    assert changes[0] == Change("max_abs", 5e-6, 2e-6, 4e-6, True, False, False)
    rmse = changes[1]
    assert (rmse.baseline, rmse.limit, rmse.regressed, rmse.improved, rmse.floored) == (1e-7, 2 * floor, True, False, True)
    assert math.isnan(rmse.value)  # NaN regresses
    assert changes[2] == Change("budget_ratio", 0.5, 0.2, 2.0, False, False, True)
    at_limit = check_layer({**row, "max_abs": 4e-6}, {"max_abs": 2e-6}, 2.0)
    assert at_limit == [Change("max_abs", 4e-6, 2e-6, 4e-6, False, False, False)]  # exactly the limit passes
    better = check_layer({**row, "max_abs": 0.9e-6}, {"max_abs": 2e-6}, 2.0)
    assert better[0].improved and not check_layer({**row, "max_abs": 1e-6}, {"max_abs": 2e-6}, 2.0)[0].improved
    below_floor = check_layer({**row, "max_abs": 0.0}, {"max_abs": floor / 2}, 2.0)
    assert not below_floor[0].improved and below_floor[0].floored  # a baseline under the floor cannot improve
    assert check_layer({**row, "budget_excused": True}, {"budget_ratio": 0.1}, 2.0) == []


# --- thresholds: reading, layering, validation -------------------------------------------------------

def _toml(tmp_path, text, name="parity.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_tolerance_merges_key_by_key_and_reports_only_what_is_set():
    from parity.thresholds import Tolerance

    base = Tolerance(atol=1.0, rtol=2.0)
    merged = base.merged(Tolerance(rtol=0.0, cosine_min=0.5))
    assert merged == Tolerance(atol=1.0, rtol=0.0, cosine_min=0.5)  # an explicit 0 overrides too
    assert merged.applied() == {"atol": 1.0, "rtol": 0.0, "cosine_min": 0.5}
    assert Tolerance(atol=1e-5, rtol=1e-3).abs_limit(10.0) == pytest.approx(1e-5 + 1e-2, rel=1e-15)
    assert Tolerance(rtol=0.5).abs_limit(4.0) == 2.0 and Tolerance(atol=0.25).abs_limit(4.0) == 0.25
    assert Tolerance(cosine_min=0.9).abs_limit(4.0) is None and Tolerance().applied() == {}


@pytest.mark.parametrize("text, message", [
    ("[defaults.float32]\natol = true\n", "{path}: [defaults.float32].atol: expected a non-negative number, got True"),
    ("[defaults.float32]\natol = -1\n", "{path}: [defaults.float32].atol: expected a non-negative number, got -1"),
    ("[defaults.float32]\natol = nan\n", "{path}: [defaults.float32].atol: expected a non-negative number, got nan"),
    ("[defaults.float32]\natol = '1'\n", "{path}: [defaults.float32].atol: expected a non-negative number, got '1'"),
    ("[defaults.float32]\nbaseline_factor = 0.5\n", "{path}: [defaults.float32].baseline_factor: must be at least 1, got 0.5"),
    ("[defaults.float32]\nbogus = 1\n", "{path}: [defaults.float32]: unknown key 'bogus'; expected one of "
     "['allow_wider_dtype', 'atol', 'attn_dropped', 'attn_entropy_diff', 'attn_js_max', 'attn_js_mean', 'attn_mass_diff', "
     "'attn_sparsity_diff', 'attn_topk_min', 'baseline_factor', 'budget_ratio', 'cosine_min', 'drift_ratio', "
     "'max_rel', 'rounding_excess', 'rtol']"),
    ("[defaults]\nfloat32 = 1\n", "{path}: [defaults.float32]: expected a table, got 1"),
    ("defaults = 1\n", "{path}: [defaults]: expected a table, got 1"),
    ("[defaults.float16]\natol = 1\n", "{path}: [defaults.float16]: unknown dtype 'float16'; expected one of ('float32', 'bfloat16')"),
    ("[components.c.int8]\natol = 1\n", "{path}: [components.c.int8]: unknown dtype 'int8'; expected one of ('float32', 'bfloat16')"),
    ("[components]\nc = 1\n", "{path}: [components.c]: expected a table, got 1"),
    ("[components.c.float32]\nlayers = 1\n", "{path}: [components.c.float32].layers: expected a table of glob = {...}"),
    ("[components.c.float32.layers]\n'a*' = {atol = -2}\n",
     "{path}: [components.c.float32].layers.'a*'.atol: expected a non-negative number, got -2"),
    ("[components.c.bfloat16.layers]\n'a*' = {allow_wider_dtype = 1}\n",
     "{path}: [components.c.bfloat16].layers.'a*'.allow_wider_dtype: expected true or false, got 1"),
    ("[other]\nx = 1\n", "{path}: unknown top-level table [other]; expected defaults or components"),
])
def test_a_malformed_thresholds_file_names_the_file_table_and_key(tmp_path, text, message):
    from parity import thresholds

    path = _toml(tmp_path, text)
    with pytest.raises(thresholds.ThresholdsError) as err:
        thresholds.load(path, base=False)
    assert str(err.value) == message.replace("{path}", str(path.resolve()))


def test_an_unreadable_thresholds_file_is_named(tmp_path):
    from parity import thresholds

    with pytest.raises(thresholds.ThresholdsError) as err:
        thresholds.load(tmp_path / "none.toml", base=False)
    assert str(err.value) == f"thresholds file {(tmp_path / 'none.toml').resolve()} does not exist"
    with pytest.raises(thresholds.ThresholdsError, match=r"^thresholds file .* cannot be read: "):
        thresholds.load(tmp_path, base=False)
    (tmp_path / "bad.toml").write_text("x = [\n")
    with pytest.raises(thresholds.ThresholdsError, match=r"^/.*bad.toml: not valid TOML: "):
        thresholds.load(tmp_path / "bad.toml", base=False)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(thresholds.ThresholdsError, match=r"^thresholds file .*bin.toml cannot be read: "):
        thresholds.load(tmp_path / "bin.toml", base=False)


def test_thresholds_from_a_pyproject_are_its_tool_parity_table(tmp_path):
    from parity import thresholds

    path = _toml(tmp_path, "[project]\nname = 'x'\n[tool.parity.defaults.float32]\natol = 0.5\n", "pyproject.toml")
    assert thresholds.load(str(path), base=False).for_component("c", "float32").atol == 0.5
    (tmp_path / "sub").mkdir()
    empty = _toml(tmp_path / "sub", "[tool.other]\nx = 1\n", "pyproject.toml")
    assert thresholds.load(empty, base=False).defaults == {}


def test_files_are_layered_in_order_and_read_once(tmp_path):
    from parity import thresholds

    first = _toml(tmp_path, "[defaults.float32]\natol = 1\nrtol = 1\n", "a.toml")
    second = _toml(tmp_path, "[defaults.float32]\natol = 2\n", "b.toml")
    rules = thresholds.load([first, second, str(first)], base=False)
    assert rules.paths == [first.resolve(), second.resolve()] and rules.path == second.resolve()
    assert rules.for_component("c", "float32") == thresholds.Tolerance(atol=2.0, rtol=1.0)
    assert thresholds.load(None).paths == [thresholds.DEFAULT_PATH] and thresholds.load([], base=False).paths == []
    assert thresholds.load(first).paths == [thresholds.DEFAULT_PATH, first.resolve()]
    with pytest.raises(thresholds.ThresholdsError) as err:
        rules.for_component("c", "bfloat16")
    assert str(err.value) == f"{second.resolve()}: no [defaults.bfloat16] table"


def test_component_tables_apply_parents_first_globs_before_names_later_files_over_earlier(tmp_path):
    from parity import thresholds

    base = _toml(tmp_path, '[defaults.float32]\natol = 1\n[components."c*".float32]\natol = 2\nrtol = 2\n'
                           '[components.child.float32]\natol = 3\ncosine_min = 0.3\n', "a.toml")
    user = _toml(tmp_path, '[components.child.float32]\ncosine_min = 0.4\n[components.parent.float32]\n'
                           'rtol = 5\nmax_rel = 5\n[components."ch*".float32]\nmax_rel = 6\n', "b.toml")
    rules = thresholds.load([base, user], base=False)
    tol = rules.for_component(["child", "parent"], "float32")
    # parent (rtol 5, max_rel 5), then the child's globs (c*: atol 2, rtol 2; ch*: max_rel 6), then its name (a then b)
    assert (tol.atol, tol.rtol, tol.cosine_min, tol.max_rel) == (3.0, 2.0, 0.4, 6.0)
    assert rules.for_component("parent", "float32") == thresholds.Tolerance(atol=1.0, rtol=5.0, max_rel=5.0)
    assert rules.for_component("other", "float32") == thresholds.Tolerance(atol=1.0)


def test_layer_globs_of_the_child_and_of_later_files_are_tried_first(tmp_path):
    from parity import thresholds

    base = _toml(tmp_path, '[defaults.float32]\natol = 1\n[components.parent.float32.layers."x*"]\natol = 2\n'
                           '[components.child.float32.layers."x*"]\natol = 3\n', "a.toml")
    user = _toml(tmp_path, '[components.child.float32.layers."xy*"]\natol = 4\n', "b.toml")
    rules = thresholds.load([base, user], base=False)
    assert rules.for_layer(["child", "parent"], "float32", "xyz").atol == 4
    assert rules.for_layer(["child", "parent"], "float32", "xa").atol == 3
    assert rules.for_layer("parent", "float32", "xyz").atol == 2
    assert rules.for_layer("parent", "float32", "y").atol == 1
    assert rules.unmatched_globs(["child", "parent"], "float32", ["xa"]) == [f"{user.resolve()}: [components.child.float32].layers.'xy*'"]
    assert rules.unmatched_globs("parent", "float32", ["y"]) == [f"{base.resolve()}: [components.parent.float32].layers.'x*'"]


def test_a_component_table_must_name_a_registered_component(tmp_path):
    from parity import thresholds

    path = _toml(tmp_path, '[defaults.float32]\natol = 1\n[components."wan*".float32]\natol = 2\n')
    assert thresholds.load(path, known_components=["wan_block"], base=False).components
    with pytest.raises(thresholds.ThresholdsError) as err:
        thresholds.load(path, known_components=["rope", "block"], base=False)
    assert str(err.value) == f"{path.resolve()}: [components.wan*] names an unknown component; registered: ['block', 'rope']"


def test_the_project_thresholds_file_is_the_nearest_one_up_the_folders(tmp_path):
    from parity.thresholds import project_file

    def found_here(start):
        found = project_file(start)
        return found if found is not None and tmp_path in found.parents else None  # not one above tmp_path

    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert found_here(nested) is None
    (tmp_path / "a" / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # no [tool.parity]: not ours
    assert found_here(nested) is None
    (tmp_path / "pyproject.toml").write_text("[tool.parity.defaults.float32]\natol = 1\n")
    assert project_file(nested) == tmp_path / "pyproject.toml"
    (tmp_path / "a" / "parity.toml").write_text("")
    assert project_file(nested) == tmp_path / "a" / "parity.toml" and project_file(str(tmp_path)) == tmp_path / "pyproject.toml"


# --- compare: every rule of one layer, and of a run ---------------------------------------------------

def _layer(metrics, shape=(4,), dtype_mlx="float32", adapter=None):
    from parity.compare import PASS, LayerResult

    base = {"numel": 4, "cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "rmse": 0.0, "snr_db": math.inf,
            "ref_max_abs": 2.0, "ref_rms": 1.0, "nan_ref": 0, "inf_ref": 0, "nan_mlx": 0, "inf_mlx": 0}
    return LayerResult("x", "x", PASS, [], {**base, **metrics}, shape, shape, "float32", dtype_mlx, adapter=adapter)


def _failures(result):
    return [(f.kind, f.metric, f.value, f.limit, f.message) for f in result.failures]


def test_float32_limits_fail_with_their_values_limits_and_messages():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    tol = Tolerance(atol=1e-5, rtol=1e-5, cosine_min=0.999, max_rel=0.01, baseline_factor=2.0)
    result = apply_rules(_layer({"max_abs": 1e-3, "cosine": 0.99, "max_rel": 0.5}), tol)
    limit = 1e-5 + 1e-5 * 2.0
    assert result.verdict == "FAIL" and _failures(result) == [
        ("absolute", "max_abs", 1e-3, limit, "max abs 0.001 > 3e-05 (atol + rtol * max|ref|)"),
        ("absolute", "cosine", 0.99, 0.999, "cosine 0.9900000 < 0.999 (1 - cos = 0.01)"),
        ("absolute", "max_rel", 0.5, 0.01, "max rel 0.5 > 0.01")]
    assert result.limits == {"atol": 1e-5, "rtol": 1e-5, "cosine_min": 0.999, "max_rel": 0.01, "abs_limit": limit}
    at_limits = apply_rules(_layer({"max_abs": limit, "cosine": 0.999, "max_rel": 0.01}), tol)
    assert at_limits.verdict == "PASS" and at_limits.failures == []  # a value at its limit passes
    unlimited = apply_rules(_layer({"max_abs": 1.0, "cosine": -1.0, "max_rel": 9.0}), Tolerance())
    assert unlimited.verdict == "PASS" and unlimited.limits == {}


def test_a_nonfinite_tensor_fails_once_and_its_error_metrics_become_unavailable():
    from parity.compare import FINITE_ONLY, apply_rules
    from parity.thresholds import Tolerance

    counts = {"nan_ref": 1, "inf_ref": 0, "nan_mlx": 0, "inf_mlx": 2, "budget_ratio": 3.0, "err_vs_truth": 1.0}
    result = apply_rules(_layer({**counts, "max_abs": 5.0}), Tolerance(atol=1e-5, budget_ratio=2.0))
    assert _failures(result) == [("absolute", "nan/inf", 3, 0, "reference has 1 NaN / 0 Inf; MLX has 0 NaN / 2 Inf")]
    assert all(result.metrics[k] is None for k in FINITE_ONLY if k in result.metrics)
    assert result.metrics["ref_max_abs"] == 2.0 and result.metrics["numel"] == 4 and "abs_limit" not in result.limits
    one_side = apply_rules(_layer({"inf_ref": 1}), Tolerance(atol=1e-5))
    assert _failures(one_side) == [("absolute", "nan/inf", 1, 0, "reference has 0 NaN / 1 Inf")]


def test_a_nan_metric_fails_even_where_no_limit_reads_it():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    result = apply_rules(_layer({"cosine": math.nan, "max_abs": math.nan}), Tolerance())
    assert [(k, m, str(v), lim, msg) for k, m, v, lim, msg in _failures(result)] == [
        ("absolute", "max_abs", "nan", "finite", "max_abs is NaN"), ("absolute", "cosine", "nan", "finite", "cosine is NaN")]


def test_the_precision_budget_fails_with_both_errors_and_the_rounding_floor():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    m = {"budget_ratio": 3.0, "err_vs_truth": 0.03, "ref_err_vs_truth": 0.01, "rounding_err": 0.004, "max_abs": 1.0}
    result = apply_rules(_layer(m, dtype_mlx="bfloat16"), Tolerance(budget_ratio=2.0), Tolerance(atol=1e-5))
    assert _failures(result) == [("absolute", "budget_ratio", 3.0, 2.0,
                                  "precision budget 3 > 2 (ours bfloat16, reference float32): our error vs float64 "
                                  "0.03, the reference's 0.01, floored at one bfloat16 rounding 0.004")]
    assert result.limits["budget_ratio"] == 2.0 and "budget_excused" not in result.metrics
    same = apply_rules(_layer({**m, "rounding_err": None}), Tolerance(budget_ratio=2.0))
    assert _failures(same)[0][4] == "precision budget 3 > 2: our error vs float64 0.03, the reference's 0.01"
    assert apply_rules(_layer({**m, "budget_ratio": 2.0}), Tolerance(budget_ratio=2.0)).verdict == "PASS"
    assert apply_rules(_layer(m), Tolerance()).verdict == "PASS"  # no budget set: not judged


def test_an_error_within_the_float32_limits_excuses_the_budget():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    m = {"budget_ratio": 50.0, "err_vs_truth": 1e-6, "ref_err_vs_truth": 0.0, "max_abs": 4e-5}
    exact = Tolerance(atol=0.0, rtol=2e-5)  # limit 2e-5 * max|ref| (2) = 4e-5
    excused = apply_rules(_layer(m), Tolerance(budget_ratio=2.0), exact)
    assert excused.verdict == "PASS" and excused.metrics["budget_excused"] is True
    over = apply_rules(_layer({**m, "max_abs": 4.1e-5}), Tolerance(budget_ratio=2.0), exact)
    assert [f.metric for f in over.failures] == ["budget_ratio"] and "budget_excused" not in over.metrics
    assert apply_rules(_layer(m), Tolerance(budget_ratio=2.0)).verdict == "FAIL"  # no float32 tolerance: no excuse
    assert apply_rules(_layer(m), Tolerance(budget_ratio=2.0), Tolerance(cosine_min=0.5)).verdict == "FAIL"


def test_more_than_one_rounding_of_an_exact_reference_tap_fails():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    m = {"budget_ratio": 1.0, "rounding_excess": 0.5}
    result = apply_rules(_layer(m, dtype_mlx="bfloat16"), Tolerance(budget_ratio=2.0, rounding_excess=0.25))
    assert _failures(result) == [("absolute", "rounding_excess", 0.5, 0.25,
                                  "more than one bfloat16 rounding of a value the reference computes exactly "
                                  "(ours bfloat16, reference float32): rmse(ours - round(reference)) is 0.5 x one "
                                  "rounding > 0.25 (computed in bfloat16, or rounded twice?)")]
    assert result.limits == {"budget_ratio": 2.0, "rounding_excess": 0.25}
    assert apply_rules(_layer({**m, "rounding_excess": 0.25}), Tolerance(rounding_excess=0.25)).verdict == "PASS"
    assert apply_rules(_layer(m), Tolerance(budget_ratio=2.0)).verdict == "PASS"  # no limit set: not judged


def test_structure_is_judged_first_and_names_the_adapter():
    from parity.compare import LayerResult, apply_rules
    from parity.thresholds import Tolerance

    result = LayerResult("x", "y", "PASS", [], {"max_abs": 9.0}, (2, 3), (3, 2), adapter="swap_halves")
    apply_rules(result, Tolerance(atol=0.0))
    assert _failures(result) == [("structure", "shape", [3, 2], [2, 3],
                                  "shape mismatch: reference (2, 3) vs MLX (3, 2) after adapter 'swap_halves'")]
    assert result.limits == {}  # nothing else is judged on a structural failure
    empty = apply_rules(LayerResult("x", "x", "PASS", [], {}, (0, 3), (0, 3)), Tolerance(atol=0.0))
    assert _failures(empty) == [("structure", "numel", 0, 1, "empty tensor: nothing compared")]
    plain = LayerResult("x", "x", "PASS", [], {}, (2,), (3,))
    apply_rules(plain, Tolerance())
    assert plain.failures[0].message == "shape mismatch: reference (2,) vs MLX (3,)"


def test_a_layer_row_carries_its_failures_limits_and_only_the_notes_it_has():
    from parity.compare import LayerResult

    result = _layer({"cosine": 0.5}, adapter="swap_halves")
    result.fail("absolute", "cosine", 0.5, 0.9, "low")
    result.fail("absolute", "max_rel", 1.0, 0.1, "high")
    row = result.row()
    assert row["verdict"] == "FAIL" and row["reasons"] == "low; high" and row["adapter"] == "swap_halves"
    assert row["failures"][1] == {"kind": "absolute", "metric": "max_rel", "value": 1.0, "limit": 0.1, "message": "high"}
    assert (row["layer"], row["mlx_layer"], row["shape_ref"], row["dtype_mlx"], row["cosine"]) == ("x", "x", [4], "float32", 0.5)
    assert "excluded" not in row
    bare = LayerResult("r", "m", "EXCLUDED", [], {}, None, None, excluded="fused").row()
    assert (bare["shape_ref"], bare["shape_mlx"], bare["excluded"], bare["reasons"]) == (None, None, "fused", "")
    assert "adapter" not in bare


def test_the_first_divergence_is_a_layer_then_a_section_then_a_crash():
    from parity.compare import EXCLUDED, FAIL, PASS, Comparison, Crash, LayerResult
    from parity.component import Section

    ok = LayerResult("a", "a", PASS, [], {"cosine": 1.0})
    bad = LayerResult("b", "b", FAIL, [], {"cosine": 0.5})
    drift = Section("drift", "Drift", "table", {}, False, None, "")
    step = Section("hf", "HF", "table", {}, False, "step/3", "")
    assert Comparison("c", "float32", [ok, bad], [drift]).first_divergence == "b"
    assert Comparison("c", "float32", [ok], [Section("i", "I", "table", {}, None, None, ""), drift]).first_divergence == "section:drift"
    assert Comparison("c", "float32", [ok], [step]).first_divergence == "step/3"
    crash = Crash("mlx", "ValueError: x", "tb", "a")
    assert Comparison("c", "float32", [ok], crash=crash).first_divergence == "mlx crashed after a"
    assert Crash("ref", "e", "tb", None).label == "ref crashed after no layer"
    assert Comparison("c", "float32", [ok]).verdict == PASS and Comparison("c", "float32", [ok], crash=crash).verdict == FAIL
    only_excluded = Comparison("c", "float32", [LayerResult("e", "e", EXCLUDED, [], {}, excluded="why")])
    assert only_excluded.verdict == FAIL and only_excluded.worst is None


def test_the_worst_layer_is_a_failing_one_with_the_lowest_cosine():
    from parity.compare import EXCLUDED, FAIL, PASS, Comparison, LayerResult

    layers = [LayerResult("p", "p", PASS, [], {"cosine": 0.1}), LayerResult("f9", "f9", FAIL, [], {"cosine": 0.9}),
              LayerResult("f5", "f5", FAIL, [], {"cosine": 0.5}), LayerResult("m", "m", FAIL, [], {}),
              LayerResult("n", "n", FAIL, [], {"cosine": math.nan}), LayerResult("e", "e", EXCLUDED, [], {"cosine": -1.0})]
    assert Comparison("c", "float32", layers).worst.name == "f5"
    assert Comparison("c", "float32", [layers[0], layers[3], layers[4]]).worst.name == "m"  # failing, without metrics
    assert Comparison("c", "float32", [layers[0], LayerResult("q", "q", PASS, [], {"cosine": 0.05})]).worst.name == "q"


def test_a_stats_only_layer_judges_its_statistics_and_its_sample():
    from parity.compare import judge_stats
    from parity.stats import tensor_stats
    from parity.thresholds import Tolerance

    ref = np.linspace(-1.0, 3.0, 64).astype(np.float32)
    ours = ref + np.float32(1e-3)
    result = judge_stats("x", "y", tensor_stats(ref), tensor_stats(ours), None, Tolerance(atol=5e-4, cosine_min=0.9),
                         None, "float32", "float32")
    m = result.metrics
    assert m["stats_only"] is True and m["numel"] == 64 and m["ref_max_abs"] == 3.0 and m["sample_size"] == 64
    assert m["ref_rms"] == pytest.approx(np.sqrt(np.mean(ref.astype(np.float64) ** 2)), rel=1e-12)
    assert m["diff_mean"] == pytest.approx(1e-3, rel=1e-3) and m["diff_std"] < 1e-6
    assert (m["ref_min"], m["mlx_min"], m["ref_norm"] > 0) == (-1.0, pytest.approx(-0.999, rel=1e-6), True)
    failed = {f.metric: f.message for f in result.failures}
    assert set(failed) == {"min", "max", "mean", "rms", "sample_max_abs"}  # std agrees; cosine passes
    assert failed["mean"].startswith("mean differs by 0.001 > 0.0005")
    assert failed["sample_max_abs"].startswith("sample max abs 0.001 > 0.0005 (atol")
    cosine = judge_stats("x", "y", tensor_stats(ref), tensor_stats(-ref), None, Tolerance(cosine_min=0.9), None,
                         "float32", "float32")
    assert [f.message for f in cosine.failures] == ["sample cosine -1.0000000 < 0.9 (1 - cos = 2)"]


def test_stats_only_samples_of_different_methods_are_not_compared():
    from parity.compare import judge_stats
    from parity.stats import tensor_stats
    from parity.thresholds import Tolerance

    ref = tensor_stats(np.ones(8, np.float32))
    other = {**ref, "sample_method": "other"}
    result = judge_stats("x", "x", ref, other, None, Tolerance(atol=1.0), None, "float32", "float32")
    assert _failures(result) == [("structure", "sample", sorted([ref["sample_method"], "other"]), "one method",
                                  f"samples not comparable (methods {sorted([ref['sample_method'], 'other'])})")]
    short = judge_stats("x", "x", ref, {**ref, "sample": ref["sample"][:3]}, None, Tolerance(), None, "float32", "float32")
    assert [f.metric for f in short.failures] == ["sample"]
    shaped = judge_stats("x", "x", ref, {**ref, "shape": [2, 4]}, None, Tolerance(), None, "float32", "float32")
    assert [f.metric for f in shaped.failures] == ["shape"]


def test_a_stats_only_layer_of_nothing_finite_has_no_extent_and_no_rms():
    from parity.compare import judge_stats
    from parity.stats import tensor_stats
    from parity.thresholds import Tolerance

    stats = tensor_stats(np.full(4, np.nan, np.float32))
    result = judge_stats("x", "x", stats, stats, None, Tolerance(atol=1.0), None, "float32", "float32")
    assert result.metrics["ref_max_abs"] == 0.0 and result.metrics["ref_rms"] == 0.0
    assert not any(k.startswith("diff_") for k in result.metrics)
    assert [f.metric for f in result.failures] == ["nan/inf"]


def test_a_stats_only_layer_in_bfloat16_checks_the_budget_on_its_sample():
    from parity.compare import judge_stats
    from parity.metrics import round_to
    from parity.stats import tensor_stats
    from parity.thresholds import Tolerance

    truth = np.random.default_rng(0).standard_normal(512)
    ref = round_to(truth, "bfloat16")
    noisy = (truth + 3 * (ref - truth)).astype(np.float32)
    args = (tensor_stats(ref), tensor_stats(noisy), tensor_stats(truth))
    result = judge_stats("x", "x", *args, Tolerance(budget_ratio=2.0), Tolerance(atol=1e-9), "bfloat16", "bfloat16")
    assert result.metrics["sample_budget_ratio"] == pytest.approx(3.0, rel=1e-6)
    assert _failures(result)[0][:4] == ("absolute", "sample_budget_ratio", result.metrics["sample_budget_ratio"], 2.0)
    assert _failures(result)[0][4].startswith("precision budget on the sample 3 > 2: our error vs float64 ")
    missing = judge_stats("x", "x", *args[:2], None, Tolerance(), None, "bfloat16", "bfloat16", truth_missing=True)
    assert _failures(missing) == [("structure", "truth", "missing", "present", "missing in the float64 truth run")]


def test_a_full_layer_in_bfloat16_checks_the_budget_unless_a_side_is_not_finite():
    from parity.compare import judge_tensors
    from parity.thresholds import Tolerance

    truth = np.linspace(-1, 1, 32)
    ref = truth.astype(np.float32)
    ours = ref.copy()
    ours[0] = np.nan
    result = judge_tensors("x", "x", ref, ours, truth, Tolerance(budget_ratio=2.0), None, "float32", "bfloat16")
    assert "budget_ratio" not in result.metrics and [f.metric for f in result.failures] == ["nan/inf"]
    missing = judge_tensors("x", "x", ref, ref, None, Tolerance(), None, "float32", "float32", truth_missing=True)
    assert _failures(missing) == [("structure", "truth", "missing", "present", "missing in the float64 truth run")]
    shaped = judge_tensors("x", "x", ref, ref[:4], truth, Tolerance(), None, "float32", "float32", adapter="take(0)")
    assert shaped.metrics == {} and shaped.adapter == "take(0)" and [f.metric for f in shaped.failures] == ["shape"]


def test_a_reduced_precision_run_knows_each_layer_s_float32_tolerance(tmp_path):
    from parity.compare import Judge

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1\n[defaults.bfloat16]\nbudget_ratio = 2\n"
                             '[components.c.float32.layers."a*"]\natol = 3\n')
    tol, exact = Judge(["c"], "bfloat16", rules).tolerances("ab")
    assert tol.budget_ratio == 2.0 and exact.atol == 3.0
    tol, exact = Judge(["c"], "float32", rules).tolerances("ab")
    assert tol.atol == 3.0 and exact is None


def test_a_stats_only_reference_layer_is_judged_against_the_statistics_of_a_full_mlx_tensor(tmp_path):
    from parity.compare import Judge

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1e-3\n")
    ref = StreamCapture("ref", tmp_path / "ref", stats_predicate(["*"]))
    ref.add("a", np.arange(6, dtype=np.float32))
    ours = Capture("mlx")
    ours.add("b", np.arange(6, dtype=np.float32) + np.float32(0.01))
    result = Judge(["c"], "float32", rules).layer("a", "b", ref, ours, None)
    assert result.metrics["stats_only"] is True and result.metrics["mlx_mean"] == pytest.approx(2.51, rel=1e-6)
    assert {f.metric for f in result.failures} == {"min", "max", "mean", "rms", "sample_max_abs"}
    truth = Capture("truth")
    assert [f.metric for f in Judge(["c"], "bfloat16", _rules(tmp_path, "[defaults.bfloat16]\n[defaults.float32]\n")
                                    ).layer("a", "b", ref, ours, truth).failures] == ["truth"]


def test_layers_on_one_side_and_exclusions_are_listed_with_what_happened(tmp_path):
    from parity.alignment import Alignment
    from parity.compare import Crash, compare

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1\n")
    ref, ours = Capture("ref"), Capture("mlx")
    for name in ("a", "gone", "skip"):
        ref.add(name, np.ones(2, np.float32))
    for name in ("a", "extra", "fused"):
        ours.add(name, np.ones(3 if name == "fused" else 2, np.float32))
    alignment = Alignment.of(exclude={"skip": "not materialised", "mlx:fused": "fused op"})
    crash = Crash("mlx", "ValueError: x", "tb", "a")
    result = compare("c", "float32", ref, ours, rules, alignment, crash=crash)
    rows = {l.name: l for l in result.layers}
    assert [l.name for l in result.layers] == ["a", "gone", "skip", "extra", "fused"]
    assert rows["gone"].reasons == ["missing on the MLX side (mlx crashed after a)"] and rows["gone"].shape_ref == (2,)
    assert rows["extra"].reasons == ["missing on the reference side"] and rows["extra"].shape_mlx == (2,)
    assert (rows["skip"].verdict, rows["skip"].excluded, rows["skip"].shape_ref, rows["skip"].dtype_ref) == (
        "EXCLUDED", "not materialised", (2,), "float32")
    assert (rows["fused"].verdict, rows["fused"].excluded, rows["fused"].shape_mlx, rows["fused"].dtype_mlx) == (
        "EXCLUDED", "fused op", (3,), "float32")
    ref_crash = compare("c", "float32", ref, ours, rules, alignment, crash=Crash("ref", "e", "tb", None))
    assert {l.name: l.reasons for l in ref_crash.layers}["extra"] == ["missing on the reference side (ref crashed after no layer)"]
    assert {l.name: l.reasons for l in ref_crash.layers}["gone"] == ["missing on the MLX side (ref crashed after no layer)"]


def test_layers_judged_while_streaming_are_taken_as_they_are(tmp_path):
    from parity.compare import FAIL, LayerResult, compare

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1\n")
    ref, ours = Capture("ref"), Capture("mlx")
    ref.add("a", np.ones(2, np.float32))
    ours.add("a", np.ones(2, np.float32))
    judged = LayerResult("a", "a", FAIL, [], {})
    assert compare("c", "float32", ref, ours, rules, judged={"a": judged}).layers == [judged]
    assert compare("c", "float32", ref, ours, rules, lineage=["c", "parent"]).verdict == "PASS"


def test_a_layer_glob_matching_no_layer_names_the_layers_there_are(tmp_path):
    from parity.compare import Crash, compare
    from parity.thresholds import ThresholdsError

    rules = _rules(tmp_path, '[defaults.float32]\natol = 1\n[components.c.float32.layers."zz*"]\natol = 2\n')
    ref, ours = Capture("ref"), Capture("mlx")
    for i in range(9):
        ref.add(f"l{i}", np.ones(1, np.float32))
        ours.add(f"l{i}", np.ones(1, np.float32))
    with pytest.raises(ThresholdsError) as err:
        compare("c", "float32", ref, ours, rules)
    assert str(err.value) == (f"layer glob(s) matching no layer of c float32: {(tmp_path / 'gate.toml').resolve()}: "
                              "[components.c.float32].layers.'zz*' (layers: l0, l1, l2, l3, l4, l5, l6, l7 ...)")
    assert compare("c", "float32", ref, ours, rules, crash=Crash("mlx", "e", "tb", "l8")).verdict == "FAIL"


# --- bundles: fingerprints and the refusals before anything runs ------------------------------------

def test_fingerprints_cover_keys_dtypes_shapes_and_bytes_in_any_layout():
    from parity.bundle import arrays_fingerprint, config_fingerprint

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = arrays_fingerprint({"a": x, "b": np.zeros(0)})
    assert len(base) == 64 and base == arrays_fingerprint({"b": np.zeros(0), "a": np.asfortranarray(x)})
    changed = [{"a": x, "c": np.zeros(0)}, {"a": x.reshape(3, 2), "b": np.zeros(0)},
               {"a": x.astype(np.float64), "b": np.zeros(0)}, {"a": x + 1, "b": np.zeros(0)},
               {"a": x, "b": np.zeros((0, 2))}, {"a": x}]
    assert len({arrays_fingerprint(c) for c in changed} | {base}) == len(changed) + 1
    assert arrays_fingerprint({"ab": np.zeros(1, np.uint8)}) != arrays_fingerprint({"a": np.frombuffer(b"b\0", np.uint8)})
    assert config_fingerprint({"a": 1, "b": [1, 2]}) == config_fingerprint({"b": [1, 2], "a": 1}) != config_fingerprint({"a": 1})


def test_input_file_names_keep_only_safe_characters():
    from parity.bundle import _safe_input

    assert _safe_input("a/b c.d-e_f:1") == "a_b_c.d-e_f_1"


def test_config_differences_are_listed_by_dotted_key():
    from parity.bundle import _config_difference

    ours = {"a": 1, "n": {"x": 1, "y": 2}, "o": 3, "same": [1, 2]}
    theirs = {"a": 1, "n": {"x": 2}, "p": [1], "same": [1, 2]}
    assert _config_difference(ours, theirs) == [
        "n.x: ours 1, bundle 2", "n.y: ours 2, bundle '<absent>'", "o: ours 3, bundle '<absent>'",
        "p: ours '<absent>', bundle [1]"]
    assert _config_difference({"a": 1}, {"a": 1.0}) == ["a: ours 1, bundle 1.0"]  # not the same JSON


def _bundle(tmp_path, dtype="float32", **changes):
    from parity import registry
    from parity.bundle import FORMAT, FORMAT_VERSION, arrays_fingerprint, config_fingerprint

    config = registry.get("rope").load_config().to_dict()
    inputs = {"x": np.arange(3, dtype=np.float32)}
    (tmp_path / "inputs").mkdir(exist_ok=True)
    np.save(tmp_path / "inputs" / "x.npy", inputs["x"])
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "component": "rope", "dtype": dtype, "seed": 0,
                "config": config, "config_sha256": config_fingerprint(config),
                "weights": {"source": "random init", "sha256": arrays_fingerprint({}), "file": None, "count": 0},
                "inputs": {"x": {"file": "inputs/x.npy", "dtype": "float32", "shape": [3]}},
                "inputs_sha256": arrays_fingerprint(inputs), "sides": {}, **changes}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _refusal(tmp_path, **kwargs):
    from parity.bundle import BundleMismatch, compare_bundle

    with pytest.raises(BundleMismatch) as err:
        compare_bundle("rope", tmp_path, out_dir=None, **kwargs)
    return str(err.value)


def test_a_bundle_without_the_tensors_a_comparison_needs_is_refused(tmp_path):
    assert _refusal(_bundle(tmp_path)) == f"bundle {tmp_path} holds no reference tensors"
    entry = {"layer_order": [], "shapes": {}, "dtypes": {}, "files": {}}
    assert _refusal(_bundle(tmp_path, "bfloat16", sides={"ref": entry})) == f"bundle {tmp_path} is bfloat16 but lacks the float64 truth"
    assert _refusal(_bundle(tmp_path, component="time_embedding")) == (
        f"bundle {tmp_path} holds the reference of component 'time_embedding', not 'rope'")


def test_a_bundle_of_another_config_names_the_differences(tmp_path):
    from parity import registry
    from parity.bundle import config_fingerprint

    config = {**registry.get("rope").load_config().to_dict(), "theta": 500.0}
    bundle = _bundle(tmp_path, config=config, config_sha256=config_fingerprint(config))
    assert _refusal(bundle) == (f"bundle {bundle} was made with another rope config (theta: ours 10000.0, bundle 500.0); "
                                "pass the matching --config, --use-bundle-config, or make a new bundle with `parity dump-ref`")
    many = {**config, **{f"k{i}": i for i in range(7)}}
    bundle = _bundle(tmp_path, config=many, config_sha256=config_fingerprint(many))
    message = _refusal(bundle)
    assert message.count("ours '<absent>'") == 6 and "k5: ours '<absent>', bundle 5; ...); pass" in message
    assert _refusal(_bundle(tmp_path, config=config)).endswith(": its config does not match its own fingerprint (edited or corrupt)")
    assert _refusal(_bundle(tmp_path, config=config, config_sha256=config_fingerprint(config)),
                    use_bundle_config=True) == f"bundle {tmp_path} holds no reference tensors"  # its config is used


def test_bundle_inputs_must_match_their_manifest_and_fingerprint(tmp_path):
    from parity.bundle import _bundle_inputs

    bundle = _bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert _bundle_inputs(bundle, manifest)["x"].tolist() == [0.0, 1.0, 2.0]
    undeclared = {**manifest, "inputs": {"x": {"file": "inputs/x.npy", "shape": [3]}}}
    assert _bundle_inputs(bundle, undeclared)["x"].dtype == np.float32  # no dtype in the manifest: not checked
    for entry, says in (({"dtype": "float64"}, "float64 [3]"), ({"shape": [1, 3]}, "float32 [1, 3]")):
        wrong = {**manifest, "inputs": {"x": {**manifest["inputs"]["x"], **entry}}}
        with pytest.raises(InputError) as err:
            _bundle_inputs(bundle, wrong)
        assert str(err.value) == f"bundle {bundle}: input file inputs/x.npy holds float32 [3], the manifest says {says}"
    with pytest.raises(InputError) as err:
        _bundle_inputs(bundle, {**manifest, "inputs_sha256": "0" * 64})
    assert str(err.value) == f"bundle {bundle}: its inputs do not match their fingerprint (edited or corrupt)"


def test_bundle_weights_are_its_own_file_or_a_checkpoint_with_its_fingerprint(tmp_path):
    from types import SimpleNamespace

    from safetensors.numpy import save_file

    from parity.bundle import BundleMismatch, _bundle_weights, arrays_fingerprint

    weights = {"w": np.ones(2, np.float32)}
    save_file(weights, str(tmp_path / "weights.safetensors"))
    comp = SimpleNamespace(weights_prefix="")
    info = {"source": "ckpt.safetensors", "sha256": arrays_fingerprint(weights), "file": "weights.safetensors", "count": 1}
    assert _bundle_weights(tmp_path, {"weights": info}, comp, None)["w"].tolist() == [1.0, 1.0]
    assert list(_bundle_weights(tmp_path, {"weights": {**info, "file": None}}, comp, tmp_path / "weights.safetensors")) == ["w"]
    cases = [
        ({**info, "sha256": "ab" * 32}, None, "bundle {b}: weights.safetensors does not match the weights fingerprint (corrupt?)"),
        ({**info, "sha256": "ab" * 32, "file": None}, tmp_path / "weights.safetensors",
         "weights {w} are not the bundle's (fingerprint " + arrays_fingerprint(weights)[:12] + " vs bundle abababababab, "
         "made from ckpt.safetensors)"),
        ({**info, "file": None}, None, "bundle {b} holds only the fingerprint of its weights (ckpt.safetensors); pass them with --weights"),
        ({**info, "file": None, "count": 0}, None, "bundle {b}: weights fingerprint does not match an empty state dict"),
    ]
    for weights_info, path, message in cases:
        with pytest.raises(BundleMismatch) as err:
            _bundle_weights(tmp_path, {"weights": weights_info}, comp, path)
        assert str(err.value) == message.format(b=tmp_path, w=tmp_path / "weights.safetensors")
    empty = {"source": "none", "sha256": arrays_fingerprint({}), "file": None, "count": 0}
    assert _bundle_weights(tmp_path, {"weights": empty}, comp, None) == {}


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "{b} is not a reference bundle (made by `parity dump-ref`)"),
    ({"format_version": 1}, "bundle {b} has bundle format version 1; this harness reads version 2 (make it again with `parity dump-ref`)"),
    ({"seed": "0"}, "bundle {b}: manifest key 'seed' missing or not a int"),
    ({"config": []}, "bundle {b}: manifest key 'config' missing or not a dict"),
    ({"inputs_sha256": None}, "bundle {b}: manifest key 'inputs_sha256' missing or not a str"),
    ({"sides": []}, "bundle {b}: manifest key 'sides' missing or not a dict"),
    ({"inputs": {"x": {"file": 1, "shape": [3]}}}, "bundle {b}: manifest inputs['x'] must be an object with 'file' and 'shape'"),
    ({"inputs": {"x": {"file": "x.npy", "shape": 3}}}, "bundle {b}: manifest inputs['x'] must be an object with 'file' and 'shape'"),
    ({"inputs": {"x": ["x.npy"]}}, "bundle {b}: manifest inputs['x'] must be an object with 'file' and 'shape'"),
])
def test_a_malformed_bundle_manifest_is_refused_naming_the_key(tmp_path, change, message):
    from parity.bundle import BundleMismatch, read_manifest

    bundle = _bundle(tmp_path, **change)
    with pytest.raises(BundleMismatch) as err:
        read_manifest(bundle)
    assert str(err.value) == message.format(b=bundle)


def test_a_bundle_is_a_folder_and_is_never_overwritten(tmp_path):
    from parity.bundle import BundleMismatch, dump_reference, read_manifest

    with pytest.raises(BundleMismatch) as err:
        read_manifest(tmp_path / "none")
    assert str(err.value) == f"--ref-bundle {tmp_path / 'none'}: not a folder"
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(BundleMismatch, match="is not a reference bundle"):
        read_manifest(tmp_path)
    for out in (tmp_path, tmp_path / "manifest.json"):
        with pytest.raises(InputError) as err:
            dump_reference("rope", out)
        assert str(err.value) == f"--out {out}: exists and is not an empty folder; a bundle is never overwritten"


# --- streaming: manifests, dumps and the judge's sink -----------------------------------------------

def _entry(**changes):
    return {"layer_order": ["a", "s"], "shapes": {"a": [2], "s": [3]}, "dtypes": {"a": "float32", "s": "float32"},
            "files": {"a": "a.npy"}, "stats": {"s": "s.stats.json"}, **changes}


def test_a_finished_capture_is_read_back_from_its_manifest_entry(tmp_path):
    source = StreamCapture("ref", tmp_path, stats_predicate(["s"]))
    source.add("a", np.ones(2, np.float32))
    source.add("s", np.arange(3, dtype=np.float32))
    entry = source.manifest_entry()
    assert entry == _entry(shapes={"a": [2], "s": [3]})
    opened = StreamCapture.open("ref", tmp_path, json.loads(json.dumps(entry)), "bundle b")
    assert (opened.order, opened.shapes, opened.dtypes, opened.files) == (["a", "s"], {"a": (2,), "s": (3,)},
                                                                          {"a": "float32", "s": "float32"}, {"a": "a.npy"})
    assert opened.stats_of("s") == source.stats["s"] and opened["a"].tolist() == [1.0, 1.0]
    bare = StreamCapture.open("ref", tmp_path, _entry(files=None, stats={"a": "s.stats.json", "s": "s.stats.json"}), "w")
    assert bare.files == {} and sorted(bare.stats) == ["a", "s"]


@pytest.mark.parametrize("entry, message", [
    ([1], "w: manifest 'sides.ref' must be an object, got list"),
    (_entry(layer_order={}), "w: manifest 'sides.ref.layer_order' must be a JSON array, got dict"),
    (_entry(shapes=[]), "w: manifest 'sides.ref.shapes' must be a JSON object, got list"),
    (_entry(dtypes=None), "w: manifest 'sides.ref.dtypes' must be a JSON object, got NoneType"),
    (_entry(files=["a.npy"]), "w: manifest 'sides.ref.files' must be a JSON object, got list"),
    (_entry(stats="s"), "w: manifest 'sides.ref.stats' must be a JSON object, got str"),
    (_entry(stats={}), "w: ref: manifest lists layers with neither a tensor nor statistics: ['s']"),
])
def test_a_malformed_manifest_entry_is_refused_naming_the_key(tmp_path, entry, message):
    with pytest.raises(InputError) as err:
        StreamCapture.open("ref", tmp_path, entry, "w")
    assert str(err.value) == message


def test_a_streamed_side_is_dumped_in_place_or_linked_into_the_report(tmp_path):
    spool = tmp_path / "run" / "mlx"
    capture = StreamCapture("mlx", spool, stats_predicate(["s"]))
    for name in ("a", "b", "s"):
        capture.add(name, np.full(2, 1.0, np.float32))
    entry = capture.dump_entry(tmp_path / "run", "mlx", keep=lambda side, name: name != "b")
    assert entry["files"] == {"a": "mlx/a.npy"} and entry["stats"] == {"s": "mlx/s.stats.json"}
    assert (spool / "a.npy").is_file() and not (spool / "b.npy").exists()  # dropped where it was written
    bundle = StreamCapture("ref", tmp_path / "bundle" / "ref", stats_predicate(["s"]))
    for name in ("a", "b", "s"):
        bundle.add(name, np.full(2, 2.0, np.float32))
    entry = bundle.dump_entry(tmp_path / "report", "ref", keep=lambda side, name: name != "b")
    assert entry["files"] == {"a": "ref/a.npy"} and np.load(tmp_path / "report" / "ref" / "a.npy").tolist() == [2.0, 2.0]
    assert (tmp_path / "bundle" / "ref" / "b.npy").is_file() and not (tmp_path / "report" / "ref" / "b.npy").exists()
    assert json.loads((tmp_path / "report" / "ref" / "s.stats.json").read_text())["numel"] == 2
    assert entry["layer_order"] == ["a", "b", "s"] and entry["shapes"]["b"] == [2]
    everything = bundle.dump_entry(tmp_path / "all", "ref")
    assert everything["files"] == {"a": "ref/a.npy", "b": "ref/b.npy"}


def test_a_file_that_cannot_be_hard_linked_is_copied(tmp_path, monkeypatch):
    from parity import streaming

    (tmp_path / "a.npy").write_bytes(b"x")

    def refuse(source, target):
        raise OSError("cross-device link")

    monkeypatch.setattr(streaming.os, "link", refuse)
    streaming._link_or_copy(tmp_path / "a.npy", tmp_path / "deep" / "b.npy")
    assert (tmp_path / "deep" / "b.npy").read_bytes() == b"x"


def test_the_stream_judge_judges_each_mlx_tensor_against_its_reference_layers(tmp_path):
    from parity.alignment import Alignment
    from parity.compare import Judge
    from parity.streaming import StreamJudge

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1e-3\n")
    ref = StreamCapture("ref", tmp_path / "ref", stats_predicate(["s"]))
    for name in ("q", "k", "s", "skip"):
        ref.add(name, np.ones(2, np.float32))
    alignment = Alignment.of({"q": "qk", "k": "qk"}, exclude={"skip": "not ported"})
    judge = StreamJudge(Judge(["c"], "float32", rules, alignment), ref, None, stats_predicate(["u*"]))
    assert judge.by_mlx == {"qk": [("q", None), ("k", None)], "s": [("s", None)]}
    assert judge.stats_only("s") and not judge.stats_only("qk")  # as its reference layer
    assert judge.stats_only("u1") and not judge.stats_only("v")  # unmatched: the user's globs
    mlx = judge.capture(tmp_path / "mlx")
    mlx.add("qk", np.ones(2, np.float32))
    mlx.add("s", np.full(2, 2.0, np.float32))
    mlx.add("u1", np.ones(2, np.float32))
    assert sorted(judge.judged) == ["k", "q", "s"] and judge.mlx is mlx
    assert judge.judged["q"].verdict == "PASS" and judge.judged["s"].verdict == "FAIL"
    assert "s" in mlx.stats and "u1" in mlx.stats and mlx.files == {"qk": "qk.npy"}
    plain = StreamJudge(Judge(["c"], "float32", rules), ref, None)
    assert not plain.stats_only("other")


def test_a_streaming_run_spools_to_its_report_folder_or_a_temporary_one(tmp_path):
    from parity.streaming import spool_dir

    folder, keep = spool_dir(tmp_path / "r" / "c-float32")
    assert folder == tmp_path / "r" / "c-float32" and folder.is_dir() and keep is None
    folder, keep = spool_dir(None)
    assert folder.is_dir() and folder.name.startswith("parity-stream-") and keep.name == str(folder)
    keep.cleanup()
    assert not folder.exists()


# --- metrics: one chunked pass with the definitions of the two-pass metrics --------------------------

def test_blocks_cut_by_shape_only_and_never_split_part_of_a_row():
    from parity.metrics import blocks

    pieces = lambda x, n: [b.tolist() for b in blocks(x, n)]  # noqa: E731
    assert pieces(np.arange(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    grid = np.arange(15).reshape(5, 3)
    assert pieces(grid, 7) == [list(range(6)), list(range(6, 12)), [12, 13, 14]]  # two whole rows at a time
    assert pieces(np.asfortranarray(grid), 7) == pieces(grid, 7)
    assert pieces(np.arange(10).reshape(2, 5), 3) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]  # a long row cut alone
    assert pieces(grid, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    assert pieces(np.float32(2.0), 4) == [[2.0]] and pieces(np.zeros((0, 3)), 4) == []
    assert all(b.flags.c_contiguous for b in blocks(np.asfortranarray(grid), 7))
    assert pieces(np.arange(5), None) == [[0, 1, 2, 3, 4]]  # default: CHUNK elements


def test_the_relative_floor_is_estimated_only_where_it_can_be_trusted():
    from parity.metrics import REL_FLOOR, _floor_estimate

    x = np.array([3.0, -4.0], np.float32)
    assert _floor_estimate(x) == pytest.approx(REL_FLOOR * math.sqrt(12.5), rel=1e-7)
    assert _floor_estimate(x.astype(np.float64)) == pytest.approx(REL_FLOOR * math.sqrt(12.5), rel=1e-15)
    for untrusted in (np.zeros(0, np.float32), x.astype(np.float16), np.array([1, 2]), np.zeros(3, np.float32),
                      np.array([np.inf, 1.0], np.float32), np.array([np.nan, 1.0])):
        assert math.isnan(_floor_estimate(untrusted)), untrusted


def test_max_rel_is_exact_for_references_whose_floor_cannot_be_estimated():
    ref = np.array([1.0, 0.0, -2.0, 0.5], np.float16)
    test = np.array([1.5, 0.01, -2.0, 0.5], np.float16)
    m = tensor_metrics(ref, test)
    a, b = ref.astype(np.float64), test.astype(np.float64)
    floor = 1e-3 * math.sqrt(float(a @ a) / 4)
    assert m["max_rel"] == float((np.abs(b - a) / np.maximum(np.abs(a), floor)).max())
    ints = tensor_metrics(np.array([0, 4]), np.array([1, 4]))
    assert ints["max_rel"] == 1 / (1e-3 * math.sqrt(8)) and ints["max_abs"] == 1.0


def test_max_rel_near_the_floor_is_settled_element_by_element(monkeypatch):
    from parity import metrics

    rng = np.random.default_rng(5)
    ref = rng.standard_normal(4000).astype(np.float32)
    estimate = metrics.REL_FLOOR * math.sqrt(float(ref.astype(np.float64) @ ref.astype(np.float64)) / ref.size)
    ref[:40] = np.float32(estimate) * np.linspace(0.5, 1.5, 40, dtype=np.float32)  # around the floor, inside the band
    test = ref + np.float32(1e-6) * rng.standard_normal(4000).astype(np.float32)
    test[:40] = ref[:40] + np.float32(estimate) * np.linspace(1.0, 0.0, 40, dtype=np.float32)
    a, b = ref.astype(np.float64), test.astype(np.float64)
    floor = metrics.REL_FLOOR * math.sqrt(float(a @ a) / a.size)
    expected = float((np.abs(b - a) / np.maximum(np.abs(a), floor)).max())
    for chunk in (1 << 17, 1000):
        monkeypatch.setattr(metrics, "CHUNK", chunk)
        assert metrics.tensor_metrics(ref, test)["max_rel"] == pytest.approx(expected, rel=1e-12)


def test_metrics_of_empty_or_entirely_nonfinite_tensors_are_not_numbers():
    empty = tensor_metrics(np.zeros(0, np.float32), np.zeros(0, np.float32))
    assert empty["numel"] == 0 and math.isnan(empty["mean_abs"]) and math.isnan(empty["rmse"])
    assert (empty["max_abs"], empty["max_rel"], empty["ref_rms"], empty["cosine"]) == (0.0, 0.0, 0.0, 1.0)
    nan = tensor_metrics(np.full(3, np.nan, np.float32), np.ones(3, np.float32))
    assert (nan["nan_ref"], nan["inf_ref"], nan["nan_mlx"], nan["inf_mlx"]) == (3, 0, 0, 0) and math.isnan(nan["rmse"])
    mixed = tensor_metrics(np.array([1.0, -np.inf, 2.0], np.float32), np.array([np.nan, 1.0, 2.5], np.float32))
    assert (mixed["nan_ref"], mixed["inf_ref"], mixed["nan_mlx"], mixed["inf_mlx"]) == (0, 1, 1, 0)
    assert mixed["max_abs"] == 0.5 and mixed["rmse"] == 0.5 and mixed["ref_max_abs"] == 2.0 and mixed["max_rel"] == 0.25


def test_snr_and_cosine_of_one_zero_side():
    zeros, ones = np.zeros(4, np.float32), np.ones(4, np.float32)
    assert tensor_metrics(ones, zeros)["cosine"] == 0.0 and tensor_metrics(ones, zeros)["snr_db"] == 0.0
    assert tensor_metrics(zeros, ones)["snr_db"] == -math.inf
    m = tensor_metrics(ones, 2 * ones)
    assert m["snr_db"] == 0.0 and m["cosine"] == 1.0 and m["mean_abs"] == 1.0 and m["ref_rms"] == 1.0


def test_round_to_rounds_to_the_named_dtype_and_leaves_others_float32():
    from parity.metrics import round_to

    x = np.array([1 + 2**-12, 65519.0, 1e-8], np.float64)
    assert round_to(x, "float16").tolist() == np.float16(x).astype(np.float32).tolist()
    assert round_to(x, "float32").tolist() == x.astype(np.float32).tolist() and round_to(x, "float32").dtype == np.float32
    assert round_to(np.array([1 + 2**-9, 3 * 2**-9 + 1], np.float32), "bfloat16").tolist() == [1.0, 1 + 2**-7]
    assert round_to(np.array([-(1 + 3 * 2**-9)]), "bfloat16").tolist() == [-(1 + 2**-7)]


def test_the_budget_floors_an_exact_reference_at_one_rounding_of_the_coarse_dtype():
    from parity.metrics import EXACT_ROUNDOFFS, FLOAT32_ROUNDOFF, precision_budget, round_to

    truth = np.random.default_rng(3).standard_normal(4096)
    ref = truth.astype(np.float32)  # exact to float32
    once = round_to(ref, "bfloat16")
    budget = precision_budget(truth, ref, once, "bfloat16")
    rounding = math.sqrt(np.mean((once.astype(np.float64) - truth) ** 2))
    assert budget["rounding_err"] == pytest.approx(rounding, rel=1e-12)
    assert budget["budget_ratio"] == pytest.approx(1.0, rel=1e-9) and budget["rounding_excess"] == 0.0
    twice = round_to(round_to(ref, "float16"), "bfloat16")
    excess = math.sqrt(np.mean((twice.astype(np.float64) - once) ** 2)) / rounding
    assert precision_budget(truth, ref, twice, "bfloat16")["rounding_excess"] == pytest.approx(excess, rel=1e-9)
    assert "rounding_err" not in precision_budget(truth, ref, once, "float32")  # not a coarser dtype
    assert "rounding_err" not in precision_budget(truth, ref, once)
    rms = math.sqrt(np.mean(truth**2))
    inexact = ref + np.float32(2 * EXACT_ROUNDOFFS * FLOAT32_ROUNDOFF * rms)  # the reference is not exact: no floor
    plain = precision_budget(truth, inexact, once, "bfloat16")
    assert "rounding_err" not in plain
    ref_err = math.sqrt(np.mean((inexact.astype(np.float64) - truth) ** 2))
    assert plain["budget_ratio"] == pytest.approx(rounding / ref_err, rel=1e-9)


def test_the_budget_leaves_nonfinite_elements_out_and_is_nan_without_any():
    from parity.metrics import precision_budget

    truth = np.array([1.0, 2.0, np.nan, 4.0])
    ref = np.array([1.5, 2.0, 3.0, np.inf], np.float32)
    test = np.array([2.0, 2.0, 3.0, 4.0], np.float32)
    budget = precision_budget(truth, ref, test, "bfloat16")
    assert budget["err_vs_truth"] == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert budget["ref_err_vs_truth"] == pytest.approx(0.5 / math.sqrt(2), rel=1e-15) and budget["budget_ratio"] == 2.0
    assert all(math.isnan(v) for v in precision_budget(np.array([np.nan]), np.ones(1), np.ones(1)).values())
    assert sorted(precision_budget(np.array([np.nan]), np.ones(1), np.ones(1))) == ["budget_ratio", "err_vs_truth",
                                                                                    "ref_err_vs_truth"]


# --- drift ------------------------------------------------------------------------------------------

def test_high_frequency_energy_above_a_cutoff_by_parseval():
    from parity import drift

    y, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    wave = np.cos(2 * np.pi * 2 * x / 8)[None, :, :, None]  # radius 0.5 of Nyquist, energy 0.5 per element
    assert drift.high_frequency_energy(wave, 0.49) == pytest.approx(0.5, rel=1e-12)
    assert drift.high_frequency_energy(wave, 0.5) == pytest.approx(0.0, abs=1e-25)  # strictly above the cutoff
    assert drift.high_frequency_energy(wave[..., 0], 0.49, axes=(-2, -1)) == pytest.approx(0.5, rel=1e-12)
    assert drift.high_frequency_energy(np.ones((1, 4, 4, 2)), 0.0) == 0.0  # DC only
    with pytest.raises(ValueError) as err:
        drift.high_frequency_energy(wave, math.sqrt(2))
    assert str(err.value) == "cutoff is a fraction of Nyquist in [0, 1.41), got 1.4142135623730951"
    with pytest.raises(ValueError, match=r"in \[0, 1\), got -0.1"):
        drift.high_frequency_energy(wave, -0.1, axes=(-2,))
    assert drift.high_frequency_energy(wave, 1.4) == 0.0


def test_mean_gradient_is_the_mean_absolute_difference_over_the_spatial_axes():
    from parity import drift

    y, x = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    grid = (3 * y + x)[None, :, :, None].astype(np.float32)  # steps of 3 along height, 1 along width
    assert drift.mean_gradient(grid) == 2.0
    assert drift.mean_gradient(grid, axes=(-3,)) == 3.0


def test_error_growth_is_relative_to_the_floored_first_step():
    from parity import drift

    assert drift.error_growth([0.5, 2.0], floor=1.0) == [0.5, 2.0]
    assert drift.error_growth([4.0, 2.0], floor=1.0) == [1.0, 0.5]
    assert all(math.isnan(v) for v in drift.error_growth([0.0, 1.0]))
    assert drift.error_growth([]) == []


def test_cosine_of_arrays_and_of_zero_arrays():
    from parity import drift

    assert drift.cosine(np.array([[1.0, 0.0]]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2), rel=1e-15)
    assert drift.cosine(np.zeros(2), np.zeros(2)) == 1.0 and drift.cosine(np.zeros(2), np.ones(2)) == 0.0


def test_a_step_whose_high_frequencies_vanish_fails():
    from parity import drift

    series = {"error_growth": [1.0, 1.0], "error_ratio": [1.0, 1.0], "hf_ratio": [1.0, 0.0]}
    assert drift.first_failing_step(series, 2.0) == 1
    assert drift.first_failing_step({**series, "hf_ratio": [1.0, 0.5]}, 2.0) is None  # 1/bound is still within
    assert drift.first_failing_step({**series, "hf_ratio": [2.0, 1.0]}, 2.0) is None  # bound itself is within
    within = {**series, "hf_ratio": [1.0, 1.0], "error_ratio": [1.0, 2.0]}
    assert drift.first_failing_step(within, 2.0, level_bound=2.0) is None
    assert drift.first_failing_step({**series, "error_growth": [1.0, 2.5], "hf_ratio": [3.0, 1.0]}, 2.0) == 0


def test_drift_series_measures_each_step_against_the_truth():
    from parity import drift

    truth = [np.full((1, 2, 2, 1), 2.0), np.zeros((1, 2, 2, 1))]
    ref = [t + 0.02 for t in truth]
    test = [t + 0.06 for t in truth]
    series = drift.drift_series(truth, ref, test, to_grid=lambda x: x + np.arange(4).reshape(1, 2, 2, 1), cutoff=0.0)
    assert series["err_mlx"] == pytest.approx([0.03, 0.06], rel=1e-9)  # relative to rms(truth), or 1 for zeros
    assert series["err_ref"] == pytest.approx([0.01, 0.02], rel=1e-9)
    assert series["error_ratio"] == pytest.approx([3.0, 3.0], rel=1e-9)
    assert series["error_growth"] == pytest.approx([1.0, 1.0], rel=1e-9)
    assert series["cosine"] == pytest.approx([1.0, 1.0], rel=1e-9)
    assert series["hf_ratio"] == pytest.approx([1.0, 1.0], rel=1e-9)  # to_grid adds the same pattern to every side
    assert series["hf_ratio_ref"] == pytest.approx([1.0, 1.0], rel=1e-9)
    with pytest.raises(ValueError) as err:
        drift.drift_series(truth, ref[:1], test, to_grid=lambda x: x, cutoff=0.0)
    assert str(err.value) == "step counts differ: truth 2, reference 1, test 2"


# --- artifacts ----------------------------------------------------------------------------------------

def _video(frames=6, size=8, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 2, frames, size, size))


def test_chunk_boundaries_and_video_shapes_are_checked():
    from parity import artifacts

    video = _video()
    for bad in ([], [1, 3], [0, 3, 3], [0, 4, 2], [0, 6]):
        with pytest.raises(ValueError) as err:
            artifacts.chunk_errors(video, video, bad)
        assert str(err.value) == f"boundaries: expected ascending chunk starts from 0 below 6 frames, got {bad}"
    assert artifacts.chunk_errors(video, video, [0, 5])["rmse"] == [0.0, 0.0]
    with pytest.raises(ValueError) as err:
        artifacts.frame_errors(video, video[:, :1])
    assert str(err.value) == "reference and test shapes differ: (1, 2, 6, 8, 8) vs (1, 1, 6, 8, 8)"
    with pytest.raises(ValueError, match=r"^test: expected a video-like array"):
        artifacts.frame_errors(video, video[0])


def test_frame_and_chunk_errors_have_their_definitions():
    from parity import artifacts

    ref = np.zeros((2, 2, 3, 2, 2))
    test = ref.copy()
    test[0, 1, 1] = 2.0  # frame 1, channel 1, batch 0: 4 of 16 values of frame 1
    test[1, 0, 2, 0, 0] = -4.0
    errors = artifacts.frame_errors(ref, test)
    assert errors["rmse"].tolist() == [0.0, 1.0, 1.0] and errors["max_abs"].tolist() == [0.0, 2.0, 4.0]
    assert errors["rmse_channel"].tolist() == [[0.0, 0.0, math.sqrt(2.0)], [0.0, math.sqrt(2.0), 0.0]]
    chunks = artifacts.chunk_errors(ref, test, [0, 1])
    assert chunks["rmse"] == [0.0, 1.0] and chunks["max_abs"] == [0.0, 4.0] and chunks["growth"] == math.inf
    assert artifacts._ratio(0.0, 0.0) == 1.0 and artifacts._ratio(2.0, 0.0) == math.inf and artifacts._ratio(1.0, 4.0) == 0.25


def test_transition_jumps_and_seam_ratios_have_their_definitions():
    from parity import artifacts

    video = np.zeros((1, 2, 4, 2, 2))
    video[:, 0, 2:] = 1.0  # channel 0 steps up entering frame 2
    video[:, 1, 3, 0] = 2.0  # channel 1: half the pixels of frame 3 at 2
    jumps = artifacts.transition_jumps(video)
    assert jumps["mean_jump"].tolist() == [0.0, 0.5, 0.5]
    assert jumps["std_jump"].tolist() == [0.0, 0.0, 0.5]
    assert jumps["frame_diff"].tolist() == pytest.approx([0.0, math.sqrt(0.5), 1.0], rel=1e-12)
    stats = artifacts.frame_stats(video)
    assert stats["mean"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]] and stats["std"][1].tolist() == [0, 0, 0, 1]
    ratios = artifacts.seam_ratios(video, [0, 2])  # the seam is transition 1 -> 2
    assert ratios["mean_jump"] == pytest.approx(2.0) and ratios["std_jump"] == 0.0
    assert ratios["frame_diff"] == pytest.approx(math.sqrt(0.5) / 0.5, rel=1e-12)
    assert all(math.isnan(v) for v in artifacts.seam_ratios(video, [0]).values())  # no seam


def test_error_at_chunk_starts_over_error_inside_chunks():
    from parity import artifacts

    ref = np.zeros((1, 1, 5, 2, 2))
    test = ref.copy()
    test[:, :, 2] = 3.0  # the start of the second chunk
    test[:, :, 4] = 1.0
    assert artifacts.error_seam_ratio(ref, test, [0, 2]) == 3.0 / (1.0 / 3)  # frames 1, 3, 4 are inside
    assert math.isnan(artifacts.error_seam_ratio(ref, test, [0]))  # no chunk start after the first
    assert math.isnan(artifacts.error_seam_ratio(ref[:, :, :2], test[:, :, :2], [0, 1]))  # nothing inside


def test_seam_report_compares_each_kind_of_jump_of_test_and_reference():
    from parity import artifacts

    ref = _video(frames=6)
    test = ref.copy()
    test[:, :, 3:] += 1.0
    report = artifacts.seam_report(ref, test, [0, 3])
    r, t = artifacts.seam_ratios(ref, [0, 3]), artifacts.seam_ratios(test, [0, 3])
    assert report["ref"] == r and report["test"] == t
    assert report["test_vs_ref"] == {k: t[k] / r[k] for k in r}
    assert report["error_seam_ratio"] == artifacts.error_seam_ratio(ref, test, [0, 3])
    flat = artifacts.seam_report(ref[:, :, :2], test[:, :, :2], [0, 1])  # no inside transition: NaN, not a ratio
    assert all(math.isnan(v) for v in flat["test_vs_ref"].values())


def test_frequency_masks_pick_the_pattern_s_frequencies():
    from parity import artifacts

    periodic = artifacts._periodic_mask(8, 8, 4)
    assert sorted(zip(*np.nonzero(periodic))) == [(a, b) for a in (0, 2, 4, 6) for b in (0, 2, 4, 6) if (a, b) != (0, 0)]
    assert sorted(zip(*np.nonzero(artifacts._checkerboard_mask(8, 8, 4)))) == [(2, 2), (2, 6), (6, 2), (6, 6)]
    assert not artifacts._checkerboard_mask(8, 3, 8).any()  # rounds to DC along the width: none
    assert sorted(zip(*np.nonzero(artifacts._checkerboard_mask(6, 6, 2)))) == [(3, 3)]


def test_a_ramp_is_removed_before_the_spectrum():
    from parity import artifacts

    y, x = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij")
    ramp = (2 * y - x + 5.0)[None, None, None]
    assert np.abs(artifacts._spectrum(ramp)).max() < 1e-18  # mean and both slopes fitted away
    single = artifacts._spectrum(np.ones((1, 1, 1, 1, 4)))  # one row: no height slope to fit
    assert np.abs(single).max() < 1e-20


def test_periodicity_report_has_both_sides_and_their_ratios():
    from parity import artifacts

    clean = _video(frames=2, size=8)
    y, x = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    dirty = clean + 2.0 * np.where((x + y) % 2, 1.0, -1.0)
    report = artifacts.periodicity_report(clean, dirty, 2)
    assert set(report) == {f"{m}_{s}" for m in ("checkerboard", "periodic_power") for s in ("ref", "test", "ratio")}
    assert report["checkerboard_ref"] == float(artifacts.checkerboard(clean, 2).mean())
    assert report["checkerboard_ratio"] == report["checkerboard_test"] / report["checkerboard_ref"]
    assert report["periodic_power_test"] == float(artifacts.periodic_power(dirty, 2).mean())
    assert report["periodic_power_test"] > 3 * report["periodic_power_ref"]
    shares = artifacts.pattern_power(dirty, 2)
    power = artifacts._spectrum(artifacts._check_video("v", dirty))
    assert shares["spatial"] == pytest.approx(power.sum(axis=(0, 1, 3, 4)) / 64.0**2 / 2, rel=1e-12)
    assert artifacts.checkerboard(np.zeros((1, 1, 2, 4, 4)), 2).tolist() == [0.0, 0.0]  # no power: no share


# --- found by later mutation runs --------------------------------------------------------------------

def test_the_regression_floor_takes_the_coarser_of_both_sides_and_the_baseline_s_scale():
    from parity import baseline

    assert baseline.floor("max_abs", {"dtype_ref": "bfloat16", "dtype_mlx": "float32", "ref_max_abs": 1.0}) == 4 * 2.0**-7
    assert baseline.floor("max_abs", {"dtype_ref": "float32", "dtype_mlx": "float16", "ref_max_abs": 1.0}) == 4 * 2.0**-10
    row = {"dtype_ref": "float32", "dtype_mlx": "float32", "max_abs": 3e-7}
    (change,) = baseline.check_layer(row, {"max_abs": 1e-7, "ref_max_abs": 1.0}, 2.0)  # the run has no scale column
    assert change.limit == 2 * 4 * 2.0**-23 and change.floored and not change.regressed


def test_each_gated_metric_is_checked_whatever_comes_before_it():
    from parity.baseline import check_layer

    row = {"dtype_ref": "float32", "dtype_mlx": "float32", "ref_max_abs": 1.0, "ref_rms": 1.0,
           "max_abs": None, "rmse": 1.0, "budget_ratio": 9.0, "budget_excused": True, "err_vs_truth": 1.0}
    base = {"max_abs": 1e-6, "rmse": 1e-3, "budget_ratio": 1.0, "err_vs_truth": 1e-3}
    assert [(c.metric, c.regressed) for c in check_layer(row, base, 2.0)] == [("rmse", True), ("err_vs_truth", True)]


def test_a_baseline_exactly_at_its_floor_is_floored_only_below_it_and_cannot_improve():
    from parity.baseline import check_layer

    floor = 4 * 2.0**-23  # 4 float32 ulps at scale 1
    row = {"dtype_ref": "float32", "dtype_mlx": "float32", "ref_max_abs": 1.0, "max_abs": 0.0}
    (at,) = check_layer(row, {"max_abs": floor}, 2.0)
    assert (at.floored, at.improved, at.limit) == (False, False, 2 * floor)
    (above,) = check_layer(row, {"max_abs": 2 * floor}, 2.0)
    assert (above.floored, above.improved) == (False, True)


def test_error_at_chunk_starts_is_nan_without_a_start_even_when_nothing_differs():
    from parity import artifacts

    video = _video(frames=4)
    assert math.isnan(artifacts.error_seam_ratio(video, video, [0]))


def test_a_seam_ratio_that_is_nan_on_either_side_compares_as_nan():
    from parity import artifacts

    ref = np.zeros((1, 1, 4, 2, 2))
    ref[:, :, 1:] = 1.0  # a jump inside the first chunk (0 -> 1), none across the seam (1 -> 2) or after it
    test = ref.copy()
    test[:, :, 2, 0, 0] = np.nan
    report = artifacts.seam_report(ref, test, [0, 2])
    assert report["ref"]["mean_jump"] == 0.0 and math.isnan(report["test"]["mean_jump"])
    assert math.isnan(report["test_vs_ref"]["mean_jump"])  # not inf: nothing to compare


def test_pattern_power_names_a_bad_video_shape():
    from parity import artifacts

    with pytest.raises(ValueError) as err:
        artifacts.pattern_power(np.zeros((2, 3)), 2)
    assert str(err.value) == "video: expected a video-like array (N, C, T, H, W), got shape (2, 3)"


def test_mean_gradient_of_a_float32_grid_is_computed_in_float64():
    from parity import drift

    grid = np.random.default_rng(2).standard_normal((1, 2, 64, 64, 3)).astype(np.float32) * np.float32(1e4)
    wide = grid.astype(np.float64)
    expected = float(np.mean([np.abs(np.diff(wide, axis=a)).mean() for a in drift.SPATIAL_AXES]))
    assert drift.mean_gradient(grid) == expected


def test_an_unreadable_safetensors_file_is_named_with_the_reader_s_error(tmp_path):
    from safetensors.numpy import load_file

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    try:
        load_file(str(bad))
    except Exception as err:  # noqa: BLE001 - whatever safetensors says is what the message must carry
        reason = str(err)
    with pytest.raises(WeightLoadError) as err:
        read_checkpoint(bad)
    assert str(err.value) == f"checkpoint {bad} could not be read: {reason}"


# --- calibration: per-layer limits from the noise of the correct implementation ---------------------

def test_a_row_s_noise_is_its_relative_max_abs_in_float32_and_its_budget_ratio_in_bf16():
    from parity.calibration import noise

    assert noise({"verdict": "PASS", "max_abs": 3.0, "ref_max_abs": 4.0}, "float32") == 0.75
    assert noise({"verdict": "PASS", "max_abs": 1, "ref_max_abs": 4}, "float32") == 0.25
    assert noise({"verdict": "PASS", "max_abs": 0.25, "ref_max_abs": 0.5}, "float32") == 0.5
    assert noise({"verdict": "FAIL", "max_abs": 1.0, "ref_max_abs": 4.0}, "float32") is None
    assert noise({"max_abs": 1.0, "ref_max_abs": 4.0}, "float32") is None
    for scale in (0.0, -1.0, None, "4"):
        assert noise({"verdict": "PASS", "max_abs": 1.0, "ref_max_abs": scale}, "float32") is None
    assert noise({"verdict": "PASS", "max_abs": None, "ref_max_abs": 1.0}, "float32") is None
    assert noise({"verdict": "PASS", "max_abs": math.inf, "ref_max_abs": 1.0}, "float32") is None
    assert noise({"verdict": "PASS", "budget_ratio": 2, "max_abs": 1.0, "ref_max_abs": 4.0}, "bfloat16") == 2.0
    assert isinstance(noise({"verdict": "PASS", "budget_ratio": 2}, "bfloat16"), float)
    for ratio in (math.nan, math.inf, None, "1"):
        assert noise({"verdict": "PASS", "budget_ratio": ratio}, "bfloat16") is None


def test_the_calibrated_limit_takes_the_larger_of_the_worst_seed_and_four_sigmas():
    from parity import calibration

    outlier = [0.0] * 19 + [1.0]  # mean + 4 std = 0.92 < max 1
    assert calibration.limit(outlier, "float32") == 2.0
    assert calibration.limit([1.0] * 19 + [3.0], "bfloat16") == 3.0 + 0.1
    values = [1.0, 1.5]  # mean + 4 std = 1.25 + 1 = 2.25 > max
    assert calibration.limit(values, "bfloat16") == 2.25 + 0.1
    assert calibration.limit(values, "float32") == 4.5
    assert calibration.limit([0.5, 0.5], "bfloat16") == 1.0 + 0.1  # never below the reference's own error
    assert calibration.limit([1e-7, 1e-7], "float32") == 4 * 2.0**-23  # never below 4 float32 ulps
    assert calibration.limit([3e-7, 3e-7], "float32") == 6e-7
    single = np.array([0.1, 0.2, 0.7, 1e-3, 0.33], np.float32)  # statistics in float64 whatever the values' type
    assert calibration.limit(single, "bfloat16") == calibration.limit([float(v) for v in single], "bfloat16")
    assert calibration.RULE == {"bfloat16": "max(max, mean + 4 std, 1) + 0.1",
                                "float32": "2 * max(max, mean + 4 std), at least 4.77e-07"}


def test_a_calibration_summary_keeps_the_layers_measured_in_every_seed_with_their_statistics():
    from parity.calibration import limit, summarise

    seeds = ([{"layer": "a", "verdict": "PASS", "budget_ratio": 1.0}, {"layer": "b", "verdict": "PASS", "budget_ratio": 1.5}],
             [{"layer": "b", "verdict": "PASS", "budget_ratio": 2.0}, {"layer": "a", "verdict": "FAIL", "budget_ratio": 1.0},
              {"layer": "c", "verdict": "PASS", "budget_ratio": 1.0}])
    assert summarise(iter(seeds), "bfloat16") == {
        "b": {"n": 2, "mean": 1.75, "std": 0.25, "max": 2.0, "limit": limit([1.5, 2.0], "bfloat16")}}
    assert summarise([], "bfloat16") == {}
    f32 = summarise([[{"layer": "x", "verdict": "PASS", "max_abs": 2e-7, "ref_max_abs": 4.0, "budget_ratio": 3.0}]],
                    "float32")
    assert f32 == {"x": {"n": 1, "mean": 5e-8, "std": 0.0, "max": 5e-8, "limit": 4 * 2.0**-23}}


def test_calibrate_writes_what_the_passing_seeds_measured_and_refuses_a_failing_seed(tmp_path):
    import re
    from datetime import datetime, timezone

    from parity import calibration

    def run(seed):
        return {"verdict": "PASS", "config": {"dim": 4}, "layers": [{"layer": "a", "verdict": "PASS", "budget_ratio": seed}],
                "versions": {"mlx": "1", "torch": "2", "diffusers": "3", "numpy": "4", "platform": "p", "mlx_blas": "b",
                             "python": "x"}}

    seen = []
    path = calibration.calibrate("c", "bfloat16", [1, 2], run, tmp_path / "cal", on_seed=lambda s, r: seen.append(s))
    assert path == tmp_path / "cal" / "c-bfloat16.json" == calibration.path_for(tmp_path / "cal", "c", "bfloat16")
    assert seen == [1, 2]
    data = json.loads(path.read_text())
    created = data.pop("created")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", created)
    assert abs((datetime.now(timezone.utc) - datetime.fromisoformat(created)).total_seconds()) < 600
    assert data == {"schema": 1, "component": "c", "dtype": "bfloat16", "config": {"dim": 4}, "seeds": [1, 2],
                    "metric": "budget_ratio", "rule": "max(max, mean + 4 std, 1) + 0.1",
                    "versions": {"mlx": "1", "torch": "2", "diffusers": "3", "numpy": "4", "platform": "p", "mlx_blas": "b"},
                    "layers": calibration.summarise([run(1)["layers"], run(2)["layers"]], "bfloat16")}
    assert json.loads(calibration.calibrate("c", "float32", [1], lambda s: {"verdict": "PASS", "layers": []},
                                            tmp_path).read_text())["metric"] == "max_abs_rel"

    with pytest.raises(calibration.CalibrationFailed) as err:
        calibration.calibrate("c", "bfloat16", [1, 2], lambda s: {**run(s), "verdict": "FAIL" if s == 2 else "PASS",
                                                                  "first_divergence": "x"}, tmp_path / "no",
                              on_seed=lambda s, r: seen.append(s))
    assert str(err.value) == "c bfloat16 seed 2: FAIL (first divergence x); calibrate the correct implementation only"
    assert seen == [1, 2, 1, 2] and not (tmp_path / "no").exists()
    with pytest.raises(InputError) as err:
        calibration.calibrate("c", "float16", [1], run, tmp_path)
    assert str(err.value) == "calibrate: dtype 'float16' has no noise metric; expected one of ['bfloat16', 'float32']"


def _calibration_file(tmp_path, **changes):
    data = {"schema": 1, "component": "c", "dtype": "float32", "config": {"a": 1, "b": 2}, "seeds": [1],
            "layers": {"x": {"limit": 2e-6}, "y": {"limit": 1}}, **changes}
    path = tmp_path / "c-float32.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"schema": "1"}, "key 'schema': expected int"),
    ({"component": None}, "key 'component': expected str"),
    ({"dtype": 1}, "key 'dtype': expected str"),
    ({"config": []}, "key 'config': expected dict"),
    ({"seeds": 1}, "key 'seeds': expected list"),
    ({"layers": []}, "key 'layers': expected dict"),
    ({"schema": 2}, "schema 2, this harness reads schema 1"),
    ({"dtype": "float16"}, "dtype 'float16': expected one of ['bfloat16', 'float32']"),
    ({"layers": {"x": {"limit": 0}}}, "layers.x.limit: expected a positive number"),
    ({"layers": {"x": {"limit": -1.0}}}, "layers.x.limit: expected a positive number"),
    ({"layers": {"x": {"limit": True}}}, "layers.x.limit: expected a positive number"),
    ({"layers": {"x": {"limit": "1"}}}, "layers.x.limit: expected a positive number"),
    ({"layers": {"x": {}}}, "layers.x.limit: expected a positive number"),
    ({"layers": {"x": 1.0}}, "layers.x.limit: expected a positive number"),
])
def test_a_malformed_calibration_file_names_the_file_and_key(tmp_path, changes, message):
    from parity.calibration import CalibrationError, load

    with pytest.raises(CalibrationError) as err:
        load(_calibration_file(tmp_path, **changes))
    assert str(err.value) == f"{tmp_path / 'c-float32.json'}: {message}"


def test_a_calibration_file_that_is_not_an_object_or_has_an_infinite_limit_is_refused(tmp_path):
    from parity.calibration import CalibrationError, load

    path = tmp_path / "c.json"
    path.write_text("[1]")
    with pytest.raises(CalibrationError) as err:
        load(path)
    assert str(err.value) == f"{path}: expected a JSON object"
    path.write_text('{"schema": 1, "component": "c", "dtype": "float32", "config": {}, "seeds": [], '
                    '"layers": {"x": {"limit": Infinity}}}')
    with pytest.raises(CalibrationError, match="layers.x.limit: expected a positive number"):
        load(path)


def test_a_calibration_is_used_only_for_its_own_config_and_dtype(tmp_path):
    from parity import calibration

    path = _calibration_file(tmp_path)
    cal = calibration.load(path)
    assert (cal.component, cal.dtype, cal.config, cal.seeds, cal.path) == ("c", "float32", {"a": 1, "b": 2}, [1], path)
    assert cal.limits() == {"x": {"calibrated_rel": 2e-6}, "y": {"calibrated_rel": 1}}
    assert calibration.Calibration("c", "bfloat16", {}, [], {"x": {"limit": 1.2}}, path).limits() == {
        "x": {"calibrated_budget": 1.2}}
    assert cal.mismatch({"b": 2, "a": 1}) is None
    assert cal.mismatch({"a": 1}) == f"{path}: recorded for a different config (run `parity calibrate c` again)"
    used, note = calibration.for_run("c", "float32", {"a": 1, "b": 2}, tmp_path)
    assert (used.path, used.layers, note) == (path, {"x": {"limit": 2e-6}, "y": {"limit": 1}}, None)
    assert calibration.for_run("c", "float32", {"a": 2, "b": 2}, tmp_path) == (None, cal.mismatch({}))
    assert calibration.for_run("c", "float32", {"a": 1, "b": 2}, None) == (None, None)
    assert calibration.for_run("c", "bfloat16", {"a": 1, "b": 2}, tmp_path) == (None, None)  # no file
    (tmp_path / "c-float16.json").write_text("not json")
    assert calibration.for_run("c", "float16", {}, tmp_path) == (None, None)  # no noise metric: not even read
    (tmp_path / "c-bfloat16.json").mkdir()
    assert calibration.for_run("c", "bfloat16", {"a": 1, "b": 2}, tmp_path) == (None, None)  # not a file


def test_a_calibrated_limit_is_the_tighter_one_and_is_named_in_the_failure():
    from parity.compare import Judge, apply_rules
    from parity.thresholds import Thresholds, Tolerance

    tol = Tolerance(atol=1e-5, rtol=0.0)
    assert Tolerance().abs_limit(2.0) is None and Tolerance(calibrated_rel=0.5).abs_limit(2.0) == 1.0
    assert replace_tol(tol, calibrated_rel=1e-6).abs_limit(2.0) == 2e-6
    assert replace_tol(tol, calibrated_rel=1e-5).abs_limit(2.0) == 1e-5
    assert replace_tol(tol, calibrated_rel=1e-6).global_abs_limit(2.0) == 1e-5
    assert Tolerance().budget_limit() is None and Tolerance(calibrated_budget=1.2).budget_limit() == 1.2
    assert Tolerance(budget_ratio=1.1, calibrated_budget=1.2).budget_limit() == 1.1

    result = apply_rules(_layer({"max_abs": 3e-6}), replace_tol(tol, calibrated_rel=1e-6))
    assert (result.limits["abs_limit"], result.limits["calibrated"]) == (2e-6, ["abs_limit"])
    assert _failures(result) == [("absolute", "max_abs", 3e-6, 2e-6, "max abs 3e-06 > 2e-06 (calibrated on this layer's noise)")]
    assert "calibrated" not in apply_rules(_layer({"max_abs": 3e-6}), replace_tol(tol, calibrated_rel=1.0)).limits

    bf16 = {"max_abs": 0.1, "budget_ratio": 1.5, "err_vs_truth": 0.3, "ref_err_vs_truth": 0.2}
    result = apply_rules(_layer(bf16, dtype_mlx="bfloat16"),
                         Tolerance(atol=1.0, calibrated_rel=0.01, budget_ratio=2.0, calibrated_budget=1.2),
                         Tolerance(atol=0.05))
    assert [result.limits[k] for k in ("abs_limit", "calibrated", "budget_ratio")] == [0.02, ["abs_limit", "budget_ratio"], 1.2]
    assert [f.message for f in result.failures][1] == (
        "precision budget 1.5 > 1.2 (calibrated) (ours bfloat16, reference float32): our error vs float64 0.3, "
        "the reference's 0.2")
    excused = apply_rules(_layer(bf16, dtype_mlx="bfloat16"), Tolerance(budget_ratio=2.0, calibrated_budget=1.2),
                          Tolerance(atol=0.1, calibrated_rel=0.001))  # excused on the float32 limit, not a calibrated one
    assert excused.verdict == "PASS" and excused.metrics["budget_excused"] is True
    assert "calibrated" not in apply_rules(_layer(bf16, dtype_mlx="bfloat16"), Tolerance(budget_ratio=2.0)).limits

    judge = Judge(["c"], "float32", Thresholds(Tolerance(), {"float32": tol}), calibrated={"x": {"calibrated_rel": 1e-6}})
    assert judge.tolerances("x") == (replace_tol(tol, calibrated_rel=1e-6), None)
    assert judge.tolerances("y") == (tol, None)


def replace_tol(tol, **changes):
    from dataclasses import replace

    return replace(tol, **changes)


def test_calibrated_limits_are_not_keys_of_a_thresholds_file_and_a_top_k_share_is_at_most_one(tmp_path):
    from parity import thresholds

    with pytest.raises(thresholds.ThresholdsError, match=r"unknown key 'calibrated_rel'"):
        thresholds.load(_toml(tmp_path, "[defaults.float32]\ncalibrated_rel = 1\n"), base=False)
    assert "calibrated_budget" not in thresholds.KEYS and "attn_topk_min" in thresholds.KEYS
    with pytest.raises(thresholds.ThresholdsError) as err:
        thresholds.load(_toml(tmp_path, "[defaults.float32]\nattn_topk_min = 1.5\n"), base=False)
    assert str(err.value).endswith("[defaults.float32].attn_topk_min: must be at most 1, got 1.5")
    loaded = thresholds.load(_toml(tmp_path, "[defaults.float32]\nattn_topk_min = 1\nattn_js_max = 2\n"), base=False)
    assert loaded.for_layer(["c"], "float32", "x").attn_topk_min == 1.0


def test_harness_tables_may_name_unregistered_components_a_user_s_may_not(tmp_path):
    from parity import thresholds

    harness = thresholds.load()
    harness.check_components([])  # a trimmed install: the harness's own tables name components it lacks
    user = _toml(tmp_path, "[components.nope.float32]\natol = 1\n")
    with pytest.raises(thresholds.ThresholdsError) as err:
        thresholds.load(user).check_components(["rope"])
    assert str(err.value) == f"{user.resolve()}: [components.nope] names an unknown component; registered: ['rope']"
    thresholds.load(user).check_components(["nope"])


# --- attention maps: per-head metrics and their limits -----------------------------------------------

def test_attention_maps_are_named_probs_and_computed_when_asked_or_small():
    from parity import attention

    assert attention.is_map("probs") and attention.is_map("blocks.0/attn1/probs")
    assert not attention.is_map("attn1/probs_x") and not attention.is_map("xprobs") and not attention.is_map("probs/x")
    assert attention.enabled("auto", 1 << 24) and not attention.enabled("auto", (1 << 24) + 1)
    assert attention.enabled(True, 1 << 40) and not attention.enabled(False, 0)
    assert [attention.topk_count(k) for k in (0, 4, 7, 8, 63, 64, 65, 1000)] == [1, 1, 1, 2, 15, 16, 16, 16]
    groups = {"a/*": {"history": (0, 2)}, "a/attn1/*": {"other": (1, 2)}, "*": {"x": (0, 1)}}
    assert attention.groups_for("a/attn1/probs", groups) == {"history": (0, 2)}  # the first matching glob
    assert attention.groups_for("b/probs", groups) == {"x": (0, 1)}
    assert attention.groups_for("b/probs", {"a/*": {"h": (0, 1)}}) == {}
    assert attention.mass_groups({"attn_groups": {"first": [0, 1], "history": [1, 3]}}) == ["sink", "first", "history"]
    assert attention.mass_groups({}) == ["sink"]


def _expected_head_metrics(ref, ours, groups, k):
    """The module docstring's definitions, row by row in plain Python (natural logs, then bits)."""
    out = {}
    for h in range(ref.shape[1]):
        rows = [(list(ref[b, h, i]), list(ours[b, h, i])) for b in range(ref.shape[0]) for i in range(ref.shape[2])]
        keys = len(rows[0][0])

        def kl(p, m):
            return sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0)

        def entropy(p):
            return -sum(a * math.log(a) for a in p if a > 0) / math.log(keys)

        def sparsity(p):
            ordered, total, n = sorted(p, reverse=True), sum(p), 0
            while sum(ordered[:n]) < 0.9 * total:
                n += 1
            return n / keys

        def top(p):
            return set(sorted(range(keys), key=lambda j: -p[j])[:k])

        js = [0.5 * (kl(p, [(a + b) / 2 for a, b in zip(p, q)]) + kl(q, [(a + b) / 2 for a, b in zip(p, q)])) / math.log(2)
              for p, q in rows]
        columns = [[sum(r[side][j] for r in rows) for j in range(keys)] for side in (0, 1)]
        sink = max(range(keys), key=lambda j: columns[0][j])
        values = {"attn_js_mean": sum(js) / len(rows), "attn_js_max": max(js),
                  "attn_topk_overlap": sum(len(top(p) & top(q)) / k for p, q in rows) / len(rows)}
        for i, side in enumerate(("ref", "mlx")):
            values[f"attn_entropy_{side}"] = sum(entropy(r[i]) for r in rows) / len(rows)
            values[f"attn_sparsity_{side}"] = sum(sparsity(r[i]) for r in rows) / len(rows)
        values["attn_sink_key_ref"] = sink
        values["attn_sink_key_mlx"] = max(range(keys), key=lambda j: columns[1][j])
        for group, (start, stop) in {"sink": (sink, sink + 1), **groups}.items():
            for i, side in enumerate(("ref", "mlx")):
                values[f"attn_mass_{group}_{side}"] = sum(sum(r[i][start:stop]) for r in rows) / len(rows)
        values["attn_dropped"] = sum(sum(a for a, b in zip(p, q) if b == 0) for p, q in rows) / len(rows)
        for name, value in values.items():
            out.setdefault(name, []).append(value)
    return out


def _maps():
    ref = np.array([[[[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5], [0.0625, 0.0625, 0.375, 0.5]],
                     [[0.125, 0.5, 0.25, 0.125], [0.25, 0.375, 0.25, 0.125], [0.0, 0.0, 0.625, 0.375]]]])
    ours = np.array([[[[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5], [0.0625, 0.0625, 0.375, 0.5]],
                      [[0.5, 0.125, 0.25, 0.125], [0.0, 0.25, 0.25, 0.5], [0.0, 0.0, 0.875, 0.125]]]])
    ref = np.concatenate([ref, ref[:, :, ::-1]])  # batch 2
    ours = np.concatenate([ours, ours[:, :, ::-1]])
    return ref.astype(np.float32), ours.astype(np.float32)


@pytest.mark.parametrize("chunk", [1 << 18, 4, 8])
def test_head_metrics_follow_their_definitions_per_head_in_any_chunking(monkeypatch, chunk):
    from parity import attention

    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", chunk)
    ref, ours = _maps()
    groups = {"history": (1, 3)}
    got = attention.head_metrics(ref, ours, groups, "a/probs")
    expected = _expected_head_metrics(ref.astype(np.float64), ours.astype(np.float64), {"first": (0, 1), **groups}, 1)
    assert list(got) == ["attn_heads", "attn_topk", "attn_groups", "attn_js_mean", "attn_js_max", "attn_topk_overlap",
                         "attn_entropy_ref", "attn_entropy_mlx", "attn_sparsity_ref", "attn_sparsity_mlx",
                         "attn_sink_key_ref", "attn_sink_key_mlx", "attn_mass_sink_ref", "attn_mass_sink_mlx",
                         "attn_mass_first_ref", "attn_mass_first_mlx", "attn_mass_history_ref",
                         "attn_mass_history_mlx", "attn_dropped"]
    assert (got["attn_heads"], got["attn_topk"], got["attn_groups"]) == (2, 1, {"first": [0, 1], "history": [1, 3]})
    for name, values in expected.items():
        assert got[name] == pytest.approx(values, rel=1e-12, abs=1e-15), name
    assert got["attn_js_mean"][0] == got["attn_js_max"][0] == 0.0 and got["attn_dropped"][1] > 0
    assert got["attn_sink_key_ref"] == [3, 2] and got["attn_sink_key_mlx"] == [3, 2]


def test_head_metrics_top_k_keys_and_a_map_of_one_key():
    from parity import attention

    ref = np.array([[[[0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0]]]])
    ours = np.array([[[[0.4, 0.0, 0.3, 0.1, 0.2, 0.0, 0.0, 0.0]]]])  # top 2: {0, 1} against {0, 2}
    got = attention.head_metrics(ref, ours)
    assert got["attn_topk"] == 2 and got["attn_topk_overlap"] == [0.5] and got["attn_dropped"] == [pytest.approx(0.3)]
    assert got["attn_groups"] == {"first": [0, 1]}
    single = attention.head_metrics(np.ones((1, 1, 2, 1)), np.ones((1, 1, 2, 1)))
    assert single["attn_entropy_ref"] == [0.0] and single["attn_sparsity_ref"] == [1.0] and single["attn_js_max"] == [0.0]


def test_a_key_group_outside_its_map_names_the_layer():
    from parity import attention

    ref = np.full((1, 1, 1, 4), 0.25)
    attention.head_metrics(ref, ref, {"all": (0, 4), "last": (3, 4)})
    for bounds in ((0, 0), (-1, 2), (2, 5), (3, 2)):
        with pytest.raises(InputError) as err:
            attention.head_metrics(ref, ref, {"g": bounds}, "b/probs")
        assert str(err.value) == (f"b/probs: key group 'g' {bounds} is outside the map's 4 keys "
                                  "(the component's attention_groups)")


def _attention_layer(**metrics):
    base = {"attn_js_mean": [0.0, 0.0, 0.0], "attn_js_max": [0.0, 0.0, 0.0], "attn_topk_overlap": [1.0, 1.0, 1.0],
            "attn_entropy_ref": [0.5, 0.5, 0.5], "attn_entropy_mlx": [0.5, 0.5, 0.5],
            "attn_sparsity_ref": [0.5, 0.5, 0.5], "attn_sparsity_mlx": [0.5, 0.5, 0.5],
            "attn_mass_sink_ref": [0.5, 0.5, 0.5], "attn_mass_sink_mlx": [0.5, 0.5, 0.5],
            "attn_mass_first_ref": [0.5, 0.5, 0.5], "attn_mass_first_mlx": [0.5, 0.5, 0.5],
            "attn_dropped": [0.0, 0.0, 0.0], "attn_groups": {"first": [0, 1]}}
    return _layer({**base, **metrics})


def test_each_attention_limit_fails_the_heads_that_break_it_naming_the_worst():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    limits = dict(attn_js_mean=0.1, attn_js_max=0.2, attn_topk_min=0.5, attn_entropy_diff=0.125,
                  attn_sparsity_diff=0.125, attn_mass_diff=0.125, attn_dropped=0.05)
    at_limit = apply_rules(_attention_layer(
        attn_js_mean=[0.1, 0.0, 0.0], attn_js_max=[0.2, 0.0, 0.0], attn_topk_overlap=[0.5, 1.0, 1.0],
        attn_entropy_mlx=[0.625, 0.375, 0.5], attn_sparsity_mlx=[0.625, 0.5, 0.5], attn_mass_sink_mlx=[0.375, 0.5, 0.5],
        attn_mass_first_mlx=[0.5, 0.625, 0.5], attn_dropped=[0.05, 0.0, 0.0]), Tolerance(**limits))
    assert at_limit.verdict == "PASS" and {k: at_limit.limits[k] for k in limits} == limits
    result = apply_rules(_attention_layer(
        attn_js_mean=[0.3, 0.0, 0.2], attn_js_max=[0.0, 0.5, 0.0], attn_topk_overlap=[0.25, 1.0, 0.0],
        attn_entropy_mlx=[0.5, 0.75, 0.25], attn_sparsity_mlx=[0.5, 0.5, 0.75], attn_mass_sink_ref=[1.0, 0.5, 0.5],
        attn_mass_first_mlx=[0.5, 0.25, 0.5], attn_dropped=[0.0, 0.0, 0.125]), Tolerance(**limits))
    assert [(f.kind, f.metric, f.value, f.limit, f.heads) for f in result.failures] == [
        ("attention", "attn_js_mean", 0.3, 0.1, [0, 2]), ("attention", "attn_js_max", 0.5, 0.2, [1]),
        ("attention", "attn_topk_overlap", 0.0, 0.5, [0, 2]), ("attention", "attn_entropy", 0.25, 0.125, [1, 2]),
        ("attention", "attn_sparsity", 0.25, 0.125, [2]), ("attention", "attn_mass_sink", 0.5, 0.125, [0]),
        ("attention", "attn_mass_first", 0.25, 0.125, [1]), ("attention", "attn_dropped", 0.125, 0.05, [2])]
    assert result.reasons == [
        "attention JS divergence (bits), mean query row 0.3 > 0.1 in head(s) 0, 2 (worst: head 0)",
        "attention JS divergence (bits), worst query row 0.5 > 0.2 in head(s) 1 (worst: head 1)",
        "attention top-k key overlap 0 < 0.5 in head(s) 0, 2 (worst: head 2)",
        "attention |entropy difference| (normalised) 0.25 > 0.125 in head(s) 1, 2 (worst: head 1)",
        "attention |difference of the share of keys holding 90% of the mass| 0.25 > 0.125 in head(s) 2 (worst: head 2)",
        "attention |mass difference| on sink keys 0.5 > 0.125 in head(s) 0 (worst: head 0)",
        "attention |mass difference| on first keys 0.25 > 0.125 in head(s) 1 (worst: head 1)",
        "attention reference mass on keys we give zero 0.125 > 0.05 in head(s) 2 (worst: head 2)"]
    row = result.row()
    assert row["failures"][0]["heads"] == [0, 2]
    assert "heads" not in apply_rules(_layer({"max_abs": 1.0}), Tolerance(atol=0.0)).row()["failures"][0]
    unlimited = apply_rules(_attention_layer(attn_js_mean=[1.0, 1.0, 1.0]), Tolerance(attn_js_max=0.2))
    assert unlimited.verdict == "PASS" and "attn_js_mean" not in unlimited.limits
    assert unlimited.limits["attn_js_max"] == 0.2  # a limit not set skips its rule only, not the ones after it
    first_only = apply_rules(_attention_layer(attn_mass_first_mlx=[0.5, 0.0, 0.5]), Tolerance(attn_mass_diff=0.125))
    assert [(f.metric, f.heads) for f in first_only.failures] == [("attn_mass_first", [1])]  # after a passing sink


def test_only_finite_four_dimensional_maps_get_head_metrics_with_their_layer_s_key_groups(tmp_path):
    from parity.compare import compare, judge_tensors
    from parity.thresholds import Tolerance

    ref, ours = _maps()
    tol = Tolerance(atol=1.0)
    judged = judge_tensors("a/probs", "a/probs", ref, ours, None, tol, None, "float32", "float32",
                           key_groups={"history": (1, 3)})
    assert judged.metrics["attn_heads"] == 2 and "attn_mass_history_ref" in judged.metrics
    assert "attn_heads" not in judge_tensors("a/out", "a/out", ref, ours, None, tol, None, "float32", "float32").metrics
    assert "attn_heads" not in judge_tensors("a/probs", "a/probs", ref[0], ours[0], None, tol, None, "float32",
                                             "float32").metrics
    for bad in ("nan", "inf"):
        broken = ref.copy()
        broken[0, 0, 0, 0] = float(bad)
        for a, b in ((broken, ours), (ref, broken)):
            assert "attn_heads" not in judge_tensors("a/probs", "a/probs", a, b, None, tol, None, "float32",
                                                     "float32").metrics
    rules = _rules(tmp_path, "[defaults.float32]\natol = 1\n")
    refs, mine = Capture("ref"), Capture("mlx")
    for capture, value in ((refs, ref), (mine, ours)):
        capture.add("a/probs", value)
        capture.add("b/probs", value)
    result = compare("c", "float32", refs, mine, rules, key_groups={"a/*": {"history": (1, 3)}})
    metrics = {l.name: l.metrics for l in result.layers}
    assert metrics["a/probs"]["attn_groups"] == {"first": [0, 1], "history": [1, 3]}
    assert metrics["b/probs"]["attn_groups"] == {"first": [0, 1]}


def test_a_partial_run_need_not_match_every_layer_glob(tmp_path):
    from parity.compare import compare
    from parity.thresholds import ThresholdsError

    rules = _rules(tmp_path, "[defaults.float32]\natol = 1\n[components.c.float32.layers]\n'zz*' = {atol = 2}\n")
    ref, ours = Capture("ref"), Capture("mlx")
    ref.add("a", np.ones(2, np.float32))
    ours.add("a", np.ones(2, np.float32))
    assert compare("c", "float32", ref, ours, rules, partial=True).verdict == "PASS"
    with pytest.raises(ThresholdsError):
        compare("c", "float32", ref, ours, rules)


def test_a_coverage_cell_is_gated_without_a_baseline_and_counted_apart(tmp_path):
    from parity import gate
    from parity.outcome import GateResult, Outcome

    report = _report(_row("a", max_abs=1e-6), variant="c[dim=8]", lineage=None)
    cell = gate.evaluate(report, _rules(tmp_path), None, no_baseline=gate.COVERAGE_NOTE)
    assert (cell.component, cell.notes, cell.passed) == ("c[dim=8]", [gate.COVERAGE_NOTE], True)
    other = gate.evaluate(_report(_row("a", max_abs=1e-6)), _rules(tmp_path), None, no_baseline="why")
    assert (other.component, other.notes) == ("c", ["no baseline (why): gated on absolute thresholds only"])
    known = _baseline(tmp_path, _row("a", max_abs=1e-6))
    inherited = gate.evaluate(_report(_row("a", max_abs=1.5e-6), variant="c[x=1]"),
                              _rules(tmp_path, GATE_LIMITS + "[components.c.float32]\nbaseline_factor = 1.0\n"), known)
    assert [f.metric for f in inherited.failures] == ["max_abs"]  # a variant's limits are its component's
    passing = Outcome("d", "float32", ["x"], baseline_path="baselines/d-float32.json")
    text = gate.summary(GateResult([passing, cell, Outcome("e", "float32", ["y"])], None, 1.0))
    assert text.splitlines()[-2] == "gate PASS: 3/3 component runs pass (3 layers; baselines for 1/2; 1 coverage cells)"


def test_the_sample_s_budget_is_excused_on_the_sample_s_own_error():
    from parity.compare import _check_budget
    from parity.thresholds import Tolerance

    def judged(**metrics):
        result = _layer({"max_abs": 1.0, "sample_budget_ratio": 3.0, **metrics}, dtype_mlx="bfloat16")
        _check_budget(result, Tolerance(budget_ratio=2.0), Tolerance(atol=0.01), prefix="sample_")
        return result

    small = judged(sample_max_abs=0.001)  # the whole tensor's error is large, the sample's within float32 limits
    assert small.verdict == "PASS" and small.metrics["sample_budget_excused"] is True
    assert judged(sample_max_abs=0.5).verdict == "FAIL"
    assert judged(max_abs=0.001).verdict == "PASS"  # no sample error recorded: the tensor's
    for scale in (0.0, None):  # no reference extent: the float32 limit is atol alone
        zero = _layer({"max_abs": 0.05, "budget_ratio": 3.0, "ref_max_abs": scale}, dtype_mlx="bfloat16")
        _check_budget(zero, Tolerance(budget_ratio=2.0), Tolerance(atol=0.01, rtol=0.1))
        assert zero.verdict == "FAIL"


def test_each_statistic_of_a_stats_only_layer_fails_past_the_abs_limit_only():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    limit = 0.5 + 0.25 * 2.0  # atol + rtol * max|ref|
    stats = {"stats_only": True, "sample_max_abs": 0.0, "sample_cosine": 1.0, "sample_max_rel": 0.0,
             "diff_mean": limit, "diff_std": 0.0, "diff_max": 2.0, "diff_rms": None}
    result = apply_rules(_layer(stats), Tolerance(atol=0.5, rtol=0.25))
    assert _failures(result) == [("absolute", "max", 2.0, limit, "max differs by 2 > 1")]  # mean at the limit passes


def test_a_stats_only_sample_is_judged_on_its_own_max_rel_and_budget_and_a_zero_extent_on_atol():
    from parity.compare import apply_rules
    from parity.thresholds import Tolerance

    sample = {"stats_only": True, "sample_max_abs": 0.001, "sample_cosine": 1.0, "sample_max_rel": 0.5}
    result = apply_rules(_layer(sample), Tolerance(max_rel=0.01))
    assert result.reasons == ["sample max rel 0.5 > 0.01"]
    bf16 = apply_rules(_layer({**sample, "sample_max_rel": 0.0, "sample_budget_ratio": 3.0}, dtype_mlx="bfloat16"),
                       Tolerance(budget_ratio=2.0), Tolerance(atol=0.01))
    assert bf16.verdict == "PASS" and bf16.metrics["sample_budget_excused"] is True  # within the float32 limits
    for scale in (0.0, None):  # no reference extent: the abs limit is atol alone
        assert apply_rules(_layer({"max_abs": 0.05, "ref_max_abs": scale}), Tolerance(atol=0.01, rtol=0.1)).verdict == "FAIL"
