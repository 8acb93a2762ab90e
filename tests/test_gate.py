"""`parity gate` and baselines: semantics on synthetic reports, and end to end on the rope component."""
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from mlx_impl import rope
from parity import baseline, compare, gate, junit
from parity import commands as cli
from parity import registry
from parity import thresholds
from parity.components.rope import COMPONENT as rope_component
from parity.component import Component
from parity.config import ComponentConfig
from parity.vocab import fmt

LIMITS = """
[defaults.float32]
atol = 1e-5
rtol = 1e-5
cosine_min = 0.99999
baseline_factor = 2.0

[defaults.bfloat16]
budget_ratio = 2.0
baseline_factor = 2.0

[components.c.bfloat16.layers."loose/*"]
budget_ratio = 4.0
"""
EPS32 = 2.0**-23


LIMITS_FILE = None


@pytest.fixture
def limits(tmp_path):
    global LIMITS_FILE
    LIMITS_FILE = tmp_path / "parity.toml"
    LIMITS_FILE.write_text(LIMITS)
    return thresholds.load(LIMITS_FILE, base=False)


def row(layer, verdict=None, reasons="", shape_ref=(4,), shape_mlx=(4,), dtype_ref="float32", dtype_mlx="float32",
        **metrics):
    """A report row judged by the run's one verdict (compare.apply_rules) on these metrics, as the runner writes it.

    ``verdict``/``reasons`` given: a row whose verdict the run recorded without metrics to show for it."""
    values = {"numel": 4, "cosine": 1.0, "max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "rmse": 0.0,
              "ref_max_abs": 1.0, "ref_rms": 1.0, "nan_ref": 0, "inf_ref": 0, "nan_mlx": 0, "inf_mlx": 0, **metrics}
    result = compare.LayerResult(layer, layer, "PASS", [], values, tuple(shape_ref), tuple(shape_mlx), dtype_ref, dtype_mlx)
    dtype = "bfloat16" if "budget_ratio" in metrics else "float32"
    rules = thresholds.load(LIMITS_FILE, base=False)
    compare.apply_rules(result, rules.for_layer("c", dtype, layer),
                        rules.for_layer("c", "float32", layer) if dtype != "float32" else None)
    data = result.row()
    if verdict is not None:
        data.update(verdict=verdict, reasons=reasons, failures=[])
    return data


def missing(layer, side):
    """A layer captured on one side only, as compare records it."""
    result = compare.LayerResult(layer, layer, "PASS", [], {}, (4,), None, "float32", None)
    result.fail("structure", "presence", "missing", "present", f"missing on the {side} side")
    return result.row()


def report(*rows, dtype="float32", verdict="PASS", component="c", sections=()):
    return {"schema": 2, "component": component, "dtype": dtype, "verdict": verdict, "seed": 0,
            "config": {"size": 4}, "first_divergence": None, "layers": list(rows), "sections": list(sections)}


def saved(tmp_path, rep):
    """The report as a baseline, through the real save/load round trip."""
    return baseline.load(baseline.save(rep, tmp_path / "baselines", device="cpu"))


def metrics_of(outcome):
    return [(f.layer, f.metric, f.kind) for f in outcome.failures]


# --- semantics on synthetic reports ------------------------------------------------------------

def test_clean_report_passes(limits, tmp_path):
    rep = report(row("blk/a", max_abs=1e-7, rmse=5e-8), row("blk/b"))
    outcome = gate.evaluate(rep, limits, saved(tmp_path, rep), device="cpu")
    assert outcome.passed and outcome.failures == [] and outcome.notes == []
    assert outcome.baseline_path.endswith("c-float32.json")


def test_absolute_failure(limits):
    outcome = gate.evaluate(report(row("blk/a"), row("blk/b", max_abs=1e-3, cosine=0.9)), limits)
    assert not outcome.passed
    assert metrics_of(outcome) == [("blk/b", "max_abs", "absolute"), ("blk/b", "cosine", "absolute")]
    assert outcome.failures[0].threshold == "<= 2e-05" and outcome.first_divergence == "blk/b"
    assert any("no baseline" in note for note in outcome.notes)


def test_baseline_regression_within_absolute_tolerance_fails(limits, tmp_path):
    known = saved(tmp_path, report(row("blk/a", max_abs=2e-6, rmse=1e-6)))
    grown = row("blk/a", max_abs=5e-6, rmse=1e-6)
    assert grown["verdict"] == "PASS" and grown["limits"]["abs_limit"] == pytest.approx(2e-5)  # within the tolerance
    outcome = gate.evaluate(report(grown), limits, known, device="cpu")
    assert metrics_of(outcome) == [("blk/a", "max_abs", "baseline")]
    failure = outcome.failures[0]
    assert failure.baseline == 2e-6 and failure.threshold == "<= 4e-06 (2x baseline)"


def test_improvement_is_reported_not_failed(limits, tmp_path):
    known = saved(tmp_path, report(row("blk/a", max_abs=8e-6, rmse=4e-6)))
    outcome = gate.evaluate(report(row("blk/a", max_abs=1e-6, rmse=4e-6)), limits, known, device="cpu")
    assert outcome.passed
    assert [(f.layer, f.metric) for f in outcome.improvements] == [("blk/a", "max_abs")]


def test_zero_baseline_is_floored_at_a_few_ulps(limits, tmp_path):
    known = saved(tmp_path, report(row("blk/a", ref_max_abs=4.0, ref_rms=1.0)))
    noise = gate.evaluate(report(row("blk/a", max_abs=2 * EPS32 * 4.0, rmse=EPS32, ref_max_abs=4.0)), limits,
                          known, device="cpu")
    assert noise.passed  # a couple of ulps off a bit-exact baseline is rounding, not a regression
    drift = gate.evaluate(report(row("blk/a", max_abs=9 * EPS32 * 4.0, rmse=EPS32, ref_max_abs=4.0)), limits,
                          known, device="cpu")
    assert [(f.metric, f.threshold) for f in drift.failures] == [("max_abs", f"<= {fmt(8 * EPS32 * 4.0)} (2x floor)")]


def test_budget_ratio_floor_and_regression(limits, tmp_path):
    rows = [row("loose/a", dtype_mlx="bfloat16", budget_ratio=0.3), row("loose/b", dtype_mlx="bfloat16", budget_ratio=1.2)]
    known = saved(tmp_path, report(*rows, dtype="bfloat16"))
    now = [row("loose/a", dtype_mlx="bfloat16", budget_ratio=0.9), row("loose/b", dtype_mlx="bfloat16", budget_ratio=3.0)]
    outcome = gate.evaluate(report(*now, dtype="bfloat16"), limits, known, device="cpu")
    # 0.3 -> 0.9 stays under the floor of 1; 1.2 -> 3.0 (absolute limit 4 here) is a regression.
    assert metrics_of(outcome) == [("loose/b", "budget_ratio", "baseline")]


def test_excused_budget_ratio_is_not_gated(limits, tmp_path):
    known = saved(tmp_path, report(row("x", budget_ratio=1.0), dtype="bfloat16"))
    outcome = gate.evaluate(report(row("x", budget_ratio=50.0, budget_excused=True), dtype="bfloat16"),
                            limits, known, device="cpu")
    assert outcome.passed


@pytest.mark.parametrize("side", ["MLX", "reference"])
def test_layer_missing_on_one_side_fails(limits, side):
    outcome = gate.evaluate(report(row("blk/a"), missing("blk/b", side), verdict="FAIL"), limits)
    assert metrics_of(outcome) == [("blk/b", "presence", "structure")]


def test_layer_in_baseline_but_no_longer_compared_fails(limits, tmp_path):
    known = saved(tmp_path, report(row("blk/a"), row("blk/gone")))
    outcome = gate.evaluate(report(row("blk/a"), row("blk/new")), limits, known, device="cpu")
    assert metrics_of(outcome) == [("blk/gone", "presence", "baseline")]
    assert any("not in the baseline" in note and "blk/new" in note for note in outcome.notes)


def test_shape_mismatch_fails(limits):
    outcome = gate.evaluate(report(row("a", shape_mlx=[5])), limits)
    assert metrics_of(outcome) == [("a", "shape", "structure")]


def test_nan_fails(limits, tmp_path):
    known = saved(tmp_path, report(row("a")))
    outcome = gate.evaluate(report(row("a", nan_mlx=3, max_abs=0.0)), limits, known, device="cpu")
    assert metrics_of(outcome) == [("a", "nan/inf", "absolute")]
    assert "MLX has 3 NaN" in outcome.failures[0].message
    outcome = gate.evaluate(report(row("a", rmse=math.nan)), limits)  # a NaN metric, however it got there
    assert metrics_of(outcome) == [("a", "rmse", "absolute")]


def test_zero_comparisons_fail(limits):
    outcome = gate.evaluate(report(), limits)
    assert not outcome.passed and outcome.first_divergence == "(none)"
    assert gate.GateResult([]).exit_code == 1  # a gate that ran nothing
    assert gate.GateResult([outcome]).exit_code == 1


def test_empty_tensor_fails(limits):
    outcome = gate.evaluate(report(row("a", numel=0, shape_ref=[0], shape_mlx=[0], rmse=math.nan)), limits)
    assert metrics_of(outcome) == [("a", "numel", "structure")]


def test_report_verdict_is_honoured(limits):
    outcome = gate.evaluate(report(row("a", verdict="FAIL", reasons="something only the run knew"), verdict="FAIL"), limits)
    assert metrics_of(outcome) == [("a", "verdict", "absolute")]
    section = {"name": "drift", "title": "drift", "passed": False, "failing": "step/3", "note": ""}
    outcome = gate.evaluate(report(row("a"), sections=[section], verdict="FAIL"), limits)
    assert metrics_of(outcome) == [("step/3", "section", "absolute")]


def test_baseline_for_other_config_or_device_is_not_used(limits, tmp_path):
    known = saved(tmp_path, report(row("a", max_abs=1e-7)))
    grown = report(row("a", max_abs=9e-6))
    other_device = gate.evaluate(grown, limits, known, device="gpu")
    assert other_device.passed and other_device.baseline_path is None
    assert "gpu" in other_device.notes[0]
    grown["config"] = {"size": 5}
    assert gate.evaluate(grown, limits, known, device="cpu").passed


def test_failing_run_is_never_a_baseline(tmp_path):
    with pytest.raises(baseline.BaselineError, match="only a passing run"):
        baseline.save(report(row("a"), verdict="FAIL"), tmp_path, device="cpu")


def test_failure_table_is_compact(limits):
    outcome = gate.evaluate(report(*[row(f"blk/{i}", max_abs=1.0) for i in range(15)]), limits)
    text = gate.summary(gate.GateResult([outcome]), max_rows=3)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("component"))
    assert lines[header].split() == list(gate.COLUMNS)
    assert lines[header + 1].split()[:5] == ["c", "float32", "blk/0", "max_abs", "1"]
    assert "12 more failed checks" in text and "gate FAIL: 1/1" in text


def test_junit_groups_and_first_divergence(limits, tmp_path):
    outcome = gate.evaluate(report(row("enc/a"), row("enc/b", max_abs=1.0), row("dec/a", max_abs=1.0), row("head")), limits)
    crash = gate.crashed("vae", "bfloat16", RuntimeError("boom"))
    path = tmp_path / "junit.xml"
    junit.write(path, [outcome, crash])
    root = ET.parse(path).getroot()
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("4", "2", "1")
    cases = {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}
    assert set(cases) == {("parity.c.float32", "enc"), ("parity.c.float32", "dec"), ("parity.c.float32", "head"),
                          ("parity.vae.bfloat16", "(run)")}
    enc = cases["parity.c.float32", "enc"].find("failure").get("message")
    assert enc.startswith("c float32: first diverging layer enc/b: max abs 1")
    dec = cases["parity.c.float32", "dec"].find("failure").get("message")
    assert "dec/a" in dec and "component's first divergence: enc/b" in dec
    assert cases["parity.c.float32", "head"].find("failure") is None
    assert "RuntimeError: boom" in cases["parity.vae.bfloat16", "(run)"].find("error").get("message")
    junit.write(path, [])  # nothing compared: a failure in JUnit too
    assert ET.parse(path).getroot().get("failures") == "1"


# --- input errors: exit 2, before anything runs ------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[defaults.float32]\natol = \n", "line 2"),
    ("[defaults.float32]\natoll = 1e-5\n", "unknown key 'atoll'"),
    ("[defaults.float32]\nbaseline_factor = 0.5\n", "[defaults.float32].baseline_factor: must be at least 1"),
    ("[defaults]\nfloat32 = 3\n", "[defaults.float32]: expected a table, got 3"),
    ("[defaults.float32]\natol = 1\n[components.rope.float32.layers]\n'q*' = 2\n",
     "[components.rope.float32].layers.'q*': expected a table"),
    ("[defaults.float32]\natol = 1\n[components.no_such_thing.float32]\natol = 1\n", "unknown component"),
])
def test_malformed_thresholds_file_is_a_usage_error(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert cli.main(["gate", "--component", "rope", "--thresholds", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err


def test_malformed_baseline_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "rope-float32.json").write_text(json.dumps({"schema": 1, "component": "rope", "dtype": "float32",
                                                            "seed": 0, "device": "cpu", "config": {},
                                                            "layers": {"helios/cos": {"max_abs": "big"}}}))
    assert cli.main(["gate", "--component", "rope", "--baselines", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "layers['helios/cos'].max_abs = 'big'" in capsys.readouterr().err


def test_require_baselines(tmp_path, capsys):
    assert cli.main(["gate", "--component", "rope", "--baselines", str(tmp_path), "--require-baselines",
                      "--out", str(tmp_path)]) == 2
    assert "rope-float32.json does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_unknown_component_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["gate", "--component", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown component 'nope'" in capsys.readouterr().err


# --- end to end --------------------------------------------------------------------------------

def test_fault_in_rope_fails_gate_and_junit_names_layer(tmp_path, capsys, monkeypatch):
    correct = rope.apply_rotary_emb
    monkeypatch.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, sin, cos))  # sin/cos swapped
    xml = tmp_path / "junit.xml"
    assert cli.main(["gate", "--component", "rope", "--dtype", "float32", "--junit", str(xml),
                     "--out", str(tmp_path), "--no-coverage"]) == 1
    out = capsys.readouterr().out
    assert any(line.split()[:4] == ["rope", "float32", "helios/q_rot", "max_abs"] for line in out.splitlines())
    assert "FAIL rope float32: first divergence helios/q_rot" in out
    root = ET.parse(xml).getroot()
    failures = {c.get("name"): c.find("failure") for c in root.iter("testcase")}
    assert root.find("testsuite").get("name") == "parity.rope.float32"
    assert failures["helios"].get("message").startswith("rope float32: first diverging layer helios/q_rot: max abs")
    assert "first diverging layer wan/q_rot" in failures["wan"].get("message")


def test_drift_within_tolerance_fails_on_baseline(tmp_path, capsys, monkeypatch):
    correct = rope.apply_rotary_emb
    monkeypatch.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, cos, sin) * (1 + 3e-6))
    assert cli.main(["gate", "--component", "rope", "--out", str(tmp_path), "--no-coverage"]) == 1
    out = capsys.readouterr().out
    assert any(line.split()[2:4] == ["helios/q_rot", "max_abs"] for line in out.splitlines()) and "(2x floor)" in out
    assert "within absolute thresholds" in out


def test_crash_fails_gate_and_others_still_run(tmp_path, capsys, monkeypatch):
    def broken(x, cos, sin):
        raise RuntimeError("port exploded")

    monkeypatch.setattr(rope, "apply_rotary_emb", broken)
    xml = tmp_path / "junit.xml"
    assert cli.main(["gate", "--component", "rope", "--dtype", "all", "--junit", str(xml), "--out", str(tmp_path)]) == 1
    assert "RuntimeError: port exploded" in capsys.readouterr().out
    cells = len(rope_component.coverage)
    assert ET.parse(xml).getroot().get("errors") == str(2 + cells)  # both dtypes and every coverage cell ran


class NothingCaptured(Component):
    """A component whose both sides run but record nothing (an empty capture)."""

    name = "nothing_captured"

    def load_config(self, path=None, overrides=None):
        return ComponentConfig()

    def make_inputs(self, config, seed):
        return {"x": np.zeros(2, np.float32)}

    def build_reference(self, config, seed):
        return None

    def reference_weights(self, reference):
        return {}

    def cast_reference(self, reference, dtype):
        return reference

    def run_reference(self, reference, inputs, dtype, capture):
        pass

    def build_mlx(self, config, weights, dtype):
        return None

    def run_mlx(self, model, inputs, dtype):
        pass


def test_component_with_empty_capture_fails_gate(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(registry._registry(), NothingCaptured.name, NothingCaptured())
    xml = tmp_path / "junit.xml"
    assert cli.main(["gate", "--component", "nothing_captured", "--junit", str(xml), "--out", str(tmp_path)]) == 1
    assert "nothing compared" in capsys.readouterr().out
    case = next(ET.parse(xml).getroot().iter("testcase"))
    assert case.get("name") == "(none)" and case.find("failure") is not None


def test_gate_over_no_components_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(registry, "_components", {})
    path = tmp_path / "parity.toml"
    path.write_text("[defaults.float32]\natol = 1e-5\n[defaults.bfloat16]\nbudget_ratio = 2\n")
    monkeypatch.setattr(thresholds, "DEFAULT_PATH", path)  # the harness's own tables name its components
    monkeypatch.chdir(tmp_path)
    assert cli.main(["gate", "--thresholds", str(path), "--out", str(tmp_path)]) == 1
    assert "gate FAIL: nothing was compared" in capsys.readouterr().out


def test_baseline_save_round_trip(tmp_path, capsys):
    assert cli.main(["baseline", "save", "--component", "rope", "--dtype", "float32",
                     "--baselines", str(tmp_path / "b"), "--out", str(tmp_path)]) == 0
    saved_file = tmp_path / "b" / "rope-float32.json"
    assert str(saved_file) in capsys.readouterr().out
    data = json.loads(saved_file.read_text())
    assert data["device"] == baseline.mlx_device() and data["seed"] == 0
    first = ["helios/freqs_t", "helios/freqs_y", "helios/freqs_x", "helios/cos", "helios/sin", "helios/q_rot",
             "helios/k_rot", "wan/table_cos", "wan/table_sin", "wan/cos", "wan/sin", "wan/q_rot", "wan/k_rot"]
    assert list(data["layers"]) == first + [f"call2/{layer}" for layer in first]
    assert set(data["layers"]["helios/q_rot"]) >= {"max_abs", "rmse", "cosine"}
