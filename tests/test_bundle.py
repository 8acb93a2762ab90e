"""Reference bundles: dump the reference in one process, compare in another one without torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import commands as cli
from parity.bundle import BundleMismatch, compare_bundle, dump_reference, weights_fingerprint
from parity.report import load_report
from parity.runner import run_component

_NO_TORCH = 'import sys\nsys.modules["torch"] = None  # `import torch` now raises ImportError\n'


def _without_torch(tmp_path: Path) -> dict:
    shim = tmp_path / "no_torch"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return env


def _run(args, env, cwd):
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _metrics(rows):
    return {r["layer"]: {k: v for k, v in r.items()} for r in rows}


@pytest.fixture(scope="module")
def te_bundle(tmp_path_factory):
    """A bfloat16 time-embedding bundle (its component module imports no torch)."""
    out = tmp_path_factory.mktemp("bundles") / "te-bf16"
    assert cli.main(["dump-ref", "time_embedding", "--dtype", "bfloat16", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_bundle_layout(te_bundle):
    manifest = json.loads((te_bundle / "manifest.json").read_text())
    assert (manifest["component"], manifest["dtype"], manifest["seed"]) == ("time_embedding", "bfloat16", 3)
    assert manifest["weights"]["file"] == "weights.safetensors" and len(manifest["weights"]["sha256"]) == 64
    assert set(manifest["sides"]) == {"ref", "truth"}  # bf16 carries the float64 truth
    assert set(manifest["inputs"]) == {"timesteps", "text", "latents"}
    assert {"torch", "diffusers", "mlx", "numpy"} <= set(manifest["versions"])
    truth = np.load(te_bundle / "truth" / "main" / "time_proj.npy")
    assert truth.dtype == np.float64
    assert not list(te_bundle.parent.glob(".*tmp*"))  # written to a temporary name, then renamed


def test_bundle_compares_in_a_process_without_torch(te_bundle, tmp_path):
    env = _without_torch(tmp_path)
    probe = _run(["-c", "import torch"], env, tmp_path)
    assert probe.returncode != 0 and "import of torch halted" in probe.stderr
    done = _run(["-m", "parity", "compare", "time_embedding", "--ref-bundle", str(te_bundle),
                 "--out", str(tmp_path / "reports")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    (report_dir,) = (tmp_path / "reports").glob("*/time_embedding-bfloat16")
    report = load_report(report_dir)
    assert report["ref_bundle"]["path"] == str(te_bundle) and report["versions"]["torch"] == "unavailable"
    # the same rows as a `parity run` with torch, in this process
    direct = run_component("time_embedding", "bfloat16", seed=3, out_dir=None)
    assert report["verdict"] == direct.verdict == "PASS"
    ours, theirs = _metrics(report["layers"]), _metrics(direct.report["layers"])
    assert list(ours) == list(theirs)
    for layer, row in theirs.items():
        for key, value in row.items():
            assert ours[layer][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), (layer, key)
    # dumps as in a run: reference, truth and MLX tensors in the report folder
    manifest = json.loads((report_dir / "manifest.json").read_text())
    assert set(manifest["sides"]) == {"ref", "mlx", "truth"}
    assert (report_dir / manifest["sides"]["truth"]["files"]["main/time_proj"]).is_file()


def test_float32_rope_bundle_round_trip(tmp_path):
    bundle = dump_reference("rope", tmp_path / "rope")
    result = compare_bundle("rope", bundle, out_dir=tmp_path / "reports")
    direct = run_component("rope", out_dir=None)
    assert result.verdict == "PASS"
    first_call = [row for row in direct.report["layers"] if not row["layer"].startswith("call2/")]
    assert result.report["layers"] == first_call  # a bundle holds the reference's first call only
    assert result.report["second_call"].startswith("not made: a reference bundle")
    assert set(direct.report) - {"seconds"} <= set(result.report)


def test_bundle_of_another_component_is_refused(te_bundle, capsys):
    assert cli.main(["compare", "rope", "--ref-bundle", str(te_bundle), "--out", "unused"]) == 2
    assert "holds the reference of component 'time_embedding', not 'rope'" in capsys.readouterr().err


def test_bundle_with_another_config_is_refused(te_bundle, tmp_path, capsys):
    config = tmp_path / "transformer.json"
    manifest = json.loads((te_bundle / "manifest.json").read_text())
    config.write_text(json.dumps({**manifest["config"]["transformer"], "freq_dim": 16}))
    assert cli.main(["compare", "time_embedding", "--ref-bundle", str(te_bundle), "--config", str(config),
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "was made with another time_embedding config (transformer.freq_dim: ours 16, bundle 32)" in err
    assert not any(tmp_path.glob("2*"))  # refused before anything ran


def test_bundle_with_other_weights_is_refused(te_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for item in te_bundle.iterdir():
        (tampered / item.name).symlink_to(item)
    weights = load_file(str(te_bundle / "weights.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key] + np.float32(1e-3)
    (tampered / "weights.safetensors").unlink()
    save_file(weights, str(tampered / "weights.safetensors"))
    with pytest.raises(BundleMismatch, match="does not match the weights fingerprint"):
        compare_bundle("time_embedding", tampered, out_dir=None)


def test_checkpoint_weights_fingerprint_only(tmp_path, capsys):
    """A large checkpoint stays out of the bundle; compare then needs it, and refuses any other."""
    from safetensors.numpy import save_file

    from parity.components.time_embedding import PREFIX, TimeEmbeddingComponent

    comp = TimeEmbeddingComponent()
    weights = comp.reference_weights(comp.build_reference(comp.load_config(), seed=5))
    checkpoint = tmp_path / "model.safetensors"
    save_file({PREFIX + k: v for k, v in weights.items()}, str(checkpoint))
    bundle = tmp_path / "bundle"
    assert cli.main(["dump-ref", "time_embedding", "--weights", str(checkpoint), "--max-weights-mb", "0",
                     "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["weights"]["file"] is None and manifest["weights"]["sha256"] == weights_fingerprint(weights)
    assert not (bundle / "weights.safetensors").exists()

    args = ["compare", "time_embedding", "--ref-bundle", str(bundle), "--out", str(tmp_path / "r")]
    assert cli.main(args) == 2
    assert "holds only the fingerprint of its weights" in capsys.readouterr().err
    assert cli.main([*args, "--weights", str(checkpoint)]) == 0
    other = tmp_path / "other.safetensors"
    save_file({PREFIX + k: v * np.float32(1.5) for k, v in weights.items()}, str(other))
    assert cli.main([*args, "--weights", str(other)]) == 2
    assert "are not the bundle's" in capsys.readouterr().err


def test_stats_only_bundle(tmp_path):
    bundle = dump_reference("rope", tmp_path / "b", stats_only=["wan/*"])
    assert (bundle / "ref" / "wan" / "cos.stats.json").is_file() and not (bundle / "ref" / "wan" / "cos.npy").exists()
    result = compare_bundle("rope", bundle, out_dir=None)
    assert result.verdict == "PASS"
    rows = {r["layer"]: r for r in result.report["layers"]}
    assert rows["wan/cos"]["stats_only"] and "stats_only" not in rows["helios/cos"]


def test_dump_ref_never_overwrites(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    assert cli.main(["dump-ref", "rope", "--out", str(tmp_path / "b")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


def test_not_a_bundle(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text(json.dumps({"component": "rope"}))
    assert cli.main(["compare", "rope", "--ref-bundle", str(tmp_path)]) == 2
    assert "is not a reference bundle" in capsys.readouterr().err


def test_a_failing_bundle_run_is_explained_from_its_tensors(tmp_path, monkeypatch):
    """No reference to re-run against a bundle: the explanation tests the tensor hypotheses and says so."""
    from mlx_impl import rope

    bundle = dump_reference("rope", tmp_path / "rope")
    correct = rope.apply_rotary_emb
    monkeypatch.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, sin, cos))
    result = compare_bundle("rope", bundle, out_dir=tmp_path / "reports")
    assert result.verdict == "FAIL" and result.first_divergence == "helios/q_rot"
    (entry,) = result.report["explanation"]["layers"]
    assert entry["layer"] == "helios/q_rot" and entry["tested"] > 0
    assert any("no reference to re-run" in note for note in entry["notes"])
