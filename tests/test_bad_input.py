"""Bad input never crashes or silently passes: every case through the real CLI (a subprocess) and the plugin.

Each case asserts the exit code (2 for bad input, 1 for a parity failure, 3 for a bug, 130 for
Ctrl-C), one line naming the offending file / key / layer, no traceback, and that the reports
written before it are byte-identical afterwards.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import baseline, gate, registry, thresholds
from parity.runner import run_component

ROOT = Path(__file__).resolve().parent.parent
TOYS = Path(__file__).resolve().parent / "data" / "toy_components.py"


def cli(*args, cwd=None, env=None):
    """``python -m parity ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "parity", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)
    return done.returncode, done.stdout, done.stderr


def assert_input_error(result, *names):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    line = [l for l in err.splitlines() if l.startswith("parity: error:") or ": error:" in l]
    assert line, err
    for name in names:
        assert name in err, (name, err)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "index.html"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A reports folder with one earlier run; its files must never change."""
    out = tmp_path_factory.mktemp("reports")
    assert cli("run", "rope", "--dtype", "float32", "--out", out, "--quiet", "--no-html")[0] == 0
    before = _digest(out)
    yield out
    assert _digest(out) == before, "an earlier report changed"
    leftovers = [p for p in out.iterdir() if p.is_dir() and not any(p.glob("*/report.json"))]
    assert not leftovers, f"input errors left run folders behind: {leftovers}"


def config_file(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# --- configs: unknown keys, wrong types and ranges ------------------------------------------------

@pytest.mark.parametrize("data, names", [
    ({"num_framez": 3}, ["num_framez", "unknown config key"]),
    ({"num_frames": "x"}, ["num_frames", "'x'"]),
    ({"num_frames": 0}, ["num_frames", "greater than or equal to 1"]),
    ({"num_frames": 3.5}, ["num_frames", "3.5"]),
    ({"num_frames": -2}, ["num_frames", "-2"]),
    ([1, 2], ["expected a JSON object"]),
    ({"rope_dimm": [8, 4, 4]}, ["rope_dimm"]),
])
def test_bad_rope_config(tmp_path, reports, data, names):
    path = config_file(tmp_path, data)
    assert_input_error(cli("run", "rope", "--config", path, "--out", reports, "--quiet"), str(path), *names)


def test_bad_vae_frames(tmp_path, reports):
    path = config_file(tmp_path, {"frames": "x"})
    assert_input_error(cli("run", "vae", "--config", path, "--out", reports), str(path), "frames")


def test_unknown_key_as_a_plugin_keyword(pytester):
    pytester.makepyfile("""
        def test_typo(parity_run):
            parity_run("rope", num_framez=3)
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*parity_run: overrides: unknown config key 'num_framez'*"])
    assert "Traceback" not in result.stdout.str() and "parity/runner.py" not in result.stdout.str()


# --- arguments and outputs ------------------------------------------------------------------------

def test_negative_seed_names_the_option(reports):
    assert_input_error(cli("run", "rope", "--seed", "-1", "--out", reports), "--seed", "-1")


@pytest.mark.parametrize("command", [["run", "rope", "--no-html"], ["gate", "--component", "rope"],
                                     ["dump-ref", "rope"], ["report"]])
def test_out_that_is_a_file_or_unwritable(tmp_path, command):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for target in (a_file, a_file / "below", Path("/proc/parity-cannot-write-here")):
        if command == ["report"]:
            args = ["report", target]
        else:
            args = [*command, "--out", target]
        code, out, err = cli(*args, "--quiet")
        assert code == 2 and "Traceback" not in out + err, (args, code, err)
        assert str(target) in err or "does not exist" in err, err


def test_junit_that_is_a_folder(tmp_path, reports):
    assert_input_error(cli("gate", "--component", "rope", "--junit", tmp_path, "--out", reports), "--junit", str(tmp_path))


def test_typo_in_a_component_table(tmp_path, reports):
    toml = tmp_path / "parity.toml"
    toml.write_text("[components.rop.float32]\natol = 1e-5\n")
    for command in (["run", "rope", "--no-html"], ["gate", "--component", "rope"]):
        assert_input_error(cli(*command, "--thresholds", toml, "--out", reports), str(toml), "components.rop")


def test_layer_glob_that_matches_no_layer(tmp_path, reports):
    toml = tmp_path / "parity.toml"
    toml.write_text('[components.rope.float32.layers."helios/q_rott"]\natol = 1e-3\n')
    assert_input_error(cli("run", "rope", "--dtype", "float32", "--thresholds", toml, "--out", reports, "--no-html"),
                       str(toml), "helios/q_rott", "matching no layer")


def test_checkpoint_tensor_with_the_wrong_shape(tmp_path, reports):
    from safetensors.numpy import save_file

    component = registry.get("time_embedding")
    weights = {f"condition_embedder.{k}": v for k, v in
               component.reference_weights(component.build_reference(component.load_config(), 0)).items()}
    weights["condition_embedder.time_proj.weight"] = weights["condition_embedder.time_proj.weight"][:, :-1].copy()
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert_input_error(cli("run", "time_embedding", "--weights", tmp_path / "model.safetensors", "--out", reports),
                       "time_proj.weight", "expected shape (192, 32)", "got (192, 31)")


# --- reference bundles -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "rope"
    assert cli("dump-ref", "rope", "--out", path, "--quiet")[0] == 0
    return path


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    import shutil

    shutil.copytree(bundle, copy)
    return copy


def test_bundle_tensor_reshaped_to_the_same_size(bundle, tmp_path, reports):
    copy = _tampered(bundle, tmp_path)
    path = copy / "ref" / "helios" / "cos.npy"
    np.save(path, np.load(path).reshape(-1), allow_pickle=False)
    assert_input_error(cli("compare", "rope", "--ref-bundle", copy, "--out", reports), str(path), "manifest says")


def test_bundle_tensor_of_half_the_size(bundle, tmp_path, reports):
    copy = _tampered(bundle, tmp_path)
    path = copy / "ref" / "wan" / "q_rot.npy"
    np.save(path, np.load(path)[:, : np.load(path).shape[1] // 2], allow_pickle=False)
    assert_input_error(cli("compare", "rope", "--ref-bundle", copy, "--out", reports), str(path))


def test_bundle_inputs_are_fingerprinted(bundle, tmp_path, reports):
    copy = _tampered(bundle, tmp_path)
    path = copy / "inputs" / "helios_q.npy"
    np.save(path, np.load(path) * np.float32(1.001), allow_pickle=False)
    assert_input_error(cli("compare", "rope", "--ref-bundle", copy, "--out", reports), "inputs do not match")


def test_bundle_manifest_with_files_as_a_list(bundle, tmp_path, reports):
    copy = _tampered(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sides"]["ref"]["files"] = list(manifest["sides"]["ref"]["files"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_input_error(cli("compare", "rope", "--ref-bundle", copy, "--out", reports), "sides.ref.files")


# --- failures, bugs and interruptions --------------------------------------------------------------

def test_a_crash_inside_a_forward_is_a_parity_failure_with_a_report(tmp_path):
    code, out, err = cli("run", "toy_crash", "--component-module", TOYS, "--dtype", "float32", "--out", tmp_path)
    assert code == 1 and "Traceback" not in out
    (report_dir,) = tmp_path.glob("*/toy_crash-float32")
    report = json.loads((report_dir / "report.json").read_text())
    assert report["first_divergence"] == "b" and report["crash"]["after"] == "a"
    assert "cannot be broadcast" in report["crash"]["error"] and "Traceback" in report["crash"]["traceback"]
    assert "crashed after a" in (report_dir / "report.html").read_text()


def test_a_bug_is_an_internal_error_with_its_traceback(tmp_path):
    code, out, err = cli("run", "toy_bug", "--component-module", TOYS, "--dtype", "float32", "--out", tmp_path)
    assert code == 3 and "Traceback" in err and "internal error" in err.splitlines()[-1]


def test_ctrl_c_exits_130_and_marks_the_run_incomplete(tmp_path):
    # SIGINT back to its default in the child: a shell running these tests in the background ignores it
    process = subprocess.Popen([sys.executable, "-m", "parity", "run", "toy", "toy_sleep", "--component-module", TOYS,
                                "--dtype", "float32", "--out", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stderr:
        if "toy_sleep: ready" in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run_dir / "INCOMPLETE").read_text().startswith("interrupted")
    assert (run_dir / "toy-float32" / "report.json").is_file()  # the finished component stays
    code, out, _ = cli("report", tmp_path)
    assert code == 0 and f"incomplete run: {run_dir}" in out
    assert "INCOMPLETE" in (tmp_path / "index.html").read_text()
    assert cli("report", "--latest", tmp_path)[0] == 2  # an interrupted run is never read as a finished one


# --- reports and the gate ----------------------------------------------------------------------------

def test_report_json_is_strict(tmp_path):
    registry.use_files([TOYS])
    result = run_component("toy", "float32", out_dir=tmp_path)
    text = (result.report_dir / "report.json").read_text()

    def no_constants(name):
        raise AssertionError(f"report.json holds {name}")

    data = json.loads(text, parse_constant=no_constants)
    identical = [i for i, row in enumerate(data["layers"]) if row["max_abs"] == 0]
    for i in identical:
        assert data["layers"][i]["snr_db"] is None and data["nonfinite"][f"layers[{i}].snr_db"] == "inf"


def test_a_bf16_error_that_doubles_inside_the_tolerance_fails_the_gate(tmp_path):
    """In bf16 the max_abs / rmse floors (4 bf16 ulps) would let it pass; the error against float64 does not."""
    report = run_component("block", "bfloat16", out_dir=None).report
    known = baseline.load(baseline.save(report, tmp_path, device="cpu"))
    layer = "ffn/out"
    known.layers[layer]["err_vs_truth"] /= 2.2  # as if the error had more than doubled since the baseline
    outcome = gate.evaluate(report, thresholds.load(), known, device="cpu")
    assert [(f.layer, f.metric, f.kind) for f in outcome.failures] == [(layer, "err_vs_truth", "baseline")]
    assert report["verdict"] == "PASS"  # inside the absolute tolerance (the precision budget)
    known.layers[layer]["err_vs_truth"] *= 2.2
    known.layers[layer]["max_abs"] /= 2.2
    known.layers[layer]["rmse"] /= 2.2
    assert gate.evaluate(report, thresholds.load(), known, device="cpu").passed  # the bf16 floors alone: inert


def test_help_documents_the_exit_codes():
    code, out, _ = cli("--help")
    assert code == 0 and "1 parity failure, 2 usage or input error, 3 internal error" in out and "130 interrupted" in out
    assert "130 interrupted" in cli("run", "--help")[1]


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    monkeypatch.delenv("PARITY_COMPONENT_MODULES", raising=False)
    os.environ.pop("PARITY_THREADS", None)
