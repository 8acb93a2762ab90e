"""The harness on bad input: every case is a clear error or a FAIL, never a pass."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from parity import thresholds
from parity import commands as cli
from parity.capture import Capture, CaptureError
from parity.compare import compare
from parity.dumps import new_run_dir, write_npy
from parity.vocab import load_npy
from parity.report import load_report
from parity.runner import run_component
from parity.weights import WeightLoadError, read_checkpoint, strict_load


@pytest.fixture
def limits():
    return thresholds.load()


def _captures(ref_layers, mlx_layers):
    ref, ours = Capture("ref"), Capture("mlx")
    for name, value in ref_layers.items():
        ref.add(name, np.asarray(value, np.float32))
    for name, value in mlx_layers.items():
        ours.add(name, np.asarray(value, np.float32))
    return ref, ours


def test_unknown_component_is_a_usage_error(capsys):
    assert cli.main(["run", "no_such_component"]) == 2
    assert "unknown component 'no_such_component'" in capsys.readouterr().err


def test_list_names_every_component(capsys):
    from parity import registry

    assert cli.main(["list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == registry.available() and {"rope", "vae", "block", "scheduler"} <= set(listed)


def test_identical_captures_pass(limits):
    ref, ours = _captures({"a": [1, 2], "b": [3, 4]}, {"a": [1, 2], "b": [3, 4]})
    result = compare("x", "float32", ref, ours, limits)
    assert result.verdict == "PASS" and result.first_divergence is None


def test_shape_mismatch_fails(limits):
    ref, ours = _captures({"a": [1, 2], "b": [3, 4]}, {"a": [1, 2], "b": [3, 4, 5]})
    result = compare("x", "float32", ref, ours, limits)
    assert result.first_divergence == "b"
    assert "shape mismatch" in result.layers[1].reasons[0]


def test_nan_on_one_side_fails(limits):
    ref, ours = _captures({"a": [1, 2]}, {"a": [1, np.nan]})
    result = compare("x", "float32", ref, ours, limits)
    assert result.verdict == "FAIL" and "NaN" in result.layers[0].reasons[0]


def test_layer_on_one_side_only_fails_both_ways(limits):
    ref, ours = _captures({"a": [1], "b": [2]}, {"a": [1], "c": [2]})
    result = compare("x", "float32", ref, ours, limits)
    assert result.first_divergence == "b"
    assert [l.reasons for l in result.layers[1:]] == [["missing on the MLX side"], ["missing on the reference side"]]


def test_nothing_compared_fails(limits):
    ref, ours = _captures({}, {})
    assert compare("x", "float32", ref, ours, limits).verdict == "FAIL"


def test_alignment_maps_names(limits):
    ref, ours = _captures({"blocks.0": [1.0]}, {"block0": [1.0]})
    result = compare("x", "float32", ref, ours, limits, alignment={"blocks.0": "block0"})
    assert result.verdict == "PASS"


def test_duplicate_capture_is_an_error():
    capture = Capture("mlx")
    capture.add("a", np.zeros(1))
    with pytest.raises(CaptureError, match="captured twice"):
        capture.add("a", np.zeros(1))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)


def test_strict_load_rejects_missing_key():
    with pytest.raises(WeightLoadError, match=r"missing keys \['linear.bias'\]"):
        strict_load(_Tiny(), {"linear.weight": np.zeros((2, 3), np.float32)})


def test_strict_load_rejects_unused_key():
    state = {"linear.weight": np.zeros((2, 3)), "linear.bias": np.zeros(2), "extra.weight": np.zeros(1)}
    with pytest.raises(WeightLoadError, match=r"unused keys \['extra.weight'\]"):
        strict_load(_Tiny(), state)


def test_strict_load_rejects_wrong_shape():
    with pytest.raises(WeightLoadError, match=r"'linear.weight': expected shape \(2, 3\)"):
        strict_load(_Tiny(), {"linear.weight": np.zeros((3, 2)), "linear.bias": np.zeros(2)})


def test_strict_load_loads_and_casts():
    model = _Tiny()
    strict_load(model, {"linear.weight": np.ones((2, 3)), "linear.bias": np.zeros(2)}, dtype=mx.bfloat16)
    assert model.linear.weight.dtype == mx.bfloat16 and model.linear.weight.sum().item() == 6


def test_safetensors_checkpoint_round_trip(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2, 2)}, str(tmp_path / "model.safetensors"))
    assert read_checkpoint(tmp_path)["a.weight"].sum() == 4


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.safetensors could not be read"):
        read_checkpoint(bad)


def test_corrupt_npy_names_the_file(tmp_path):
    bad = tmp_path / "layer.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="layer.npy is not a valid .npy file"):
        load_npy(bad)


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a valid .npy"):
        load_npy(path)


def test_npy_round_trip_is_atomic(tmp_path):
    write_npy(tmp_path / "a/b.npy", np.arange(3))
    assert load_npy(tmp_path / "a/b.npy").tolist() == [0, 1, 2]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.npy"]  # no temp files left


def test_new_run_never_overwrites(tmp_path):
    new_run_dir(tmp_path, "run1")
    with pytest.raises(FileExistsError):
        new_run_dir(tmp_path, "run1")


def test_malformed_thresholds_name_the_key(tmp_path):
    path = tmp_path / "parity.toml"
    path.write_text("[defaults.float32]\natoll = 1e-5\n")
    with pytest.raises(thresholds.ThresholdsError, match="unknown key 'atoll'"):
        thresholds.load(path)
    path.write_text("[components.nope.float32]\natol = 1\n[defaults.float32]\natol = 1\n")
    with pytest.raises(thresholds.ThresholdsError, match="unknown component"):
        thresholds.load(path, known_components=["rope"], base=False)


def test_layer_glob_overrides_component_default(tmp_path):
    path = tmp_path / "parity.toml"
    path.write_text('[defaults.float32]\natol = 1e-5\n[components.c.float32.layers."blk*"]\natol = 0.5\n')
    limits = thresholds.load(path)
    assert limits.for_layer("c", "float32", "blk3").atol == 0.5
    assert limits.for_layer("c", "float32", "head").atol == 1e-5


def test_run_writes_dumps_manifest_and_reports(tmp_path):
    result = run_component("rope", "float32", out_dir=tmp_path)
    directory = result.report_dir
    report = load_report(directory)
    assert report["verdict"] == "PASS" and report["component"] == "rope"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["sides"]["ref"]["layer_order"][0] == "helios/freqs_t"
    for side in ("ref", "mlx"):
        for layer, relative in manifest["sides"][side]["files"].items():
            assert load_npy(directory / relative).shape == tuple(manifest["sides"][side]["shapes"][layer])
    assert (directory / "report.csv").read_text().startswith("layer,verdict,cosine")
    assert {"mlx", "torch", "diffusers"} <= set(manifest["versions"])


def test_bfloat16_run_dumps_the_float64_truth(tmp_path):
    result = run_component("rope", "bfloat16", out_dir=tmp_path)
    truth = load_npy(result.report_dir / "truth" / "helios" / "q_rot.npy")
    ref = load_npy(result.report_dir / "ref" / "helios" / "q_rot.npy")
    assert truth.dtype == np.float64 and np.array_equal(truth, result.context.truth["helios/q_rot"])
    assert result.context.truth.dtypes["helios/q_rot"] == "float64" and not np.array_equal(truth, ref)
    layer = result.layer("helios/q_rot")
    assert layer.metrics["ref_err_vs_truth"] > 0 and layer.metrics["budget_ratio"] <= 2


def test_a_renamed_subclass_finds_its_parents_config_and_thresholds(tmp_path):
    """A port's ``class Wan22Rope(RopeComponent): name = "wan22_rope"`` needs no config file of its own."""
    from parity.components.rope import COMPONENT as rope

    subclass = type("Wan22Rope", (type(rope),), {"name": "wan22_rope", "__module__": __name__})()
    assert subclass.default_config_path() == rope.default_config_path()
    assert subclass.load_config() == rope.load_config()
    assert subclass.lineage() == ["wan22_rope", "rope"]
    path = tmp_path / "parity.toml"
    path.write_text('[components.rope.float32]\natol = 3e-5\n[components."wan22_*".float32]\nrtol = 4e-5\n')
    tol = thresholds.load(path).for_component(subclass.lineage(), "float32")
    assert (tol.atol, tol.rtol) == (3e-5, 4e-5)  # the parent's table, then the glob over the new name
