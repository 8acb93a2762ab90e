"""Checking a port the harness did not write: examples/external_port through examples/external_port_parity.py.

The port has other module and weight names, a fused q/k/v, heads-first attention, channels-first
video, its own converter and no tap(); the glue captures it by module path and function, lines
its layers up with the reference's (rules, adapters, exclusions, some derived from its converter)
and goes through the same CLI, pytest plugin, bundles and bisect a user has.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest

from parity import registry
from parity.alignment import Alignment, AlignmentError, derive
from parity.commands import main
from parity.runner import run_component

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "examples" / "external_port_parity.py"
PORT_COMPONENTS = ["port_rope", "port_time_embedding", "port_block", "port_vae"]

sys.path.insert(0, str(ROOT / "examples"))  # where the port lives (the glue's folder, as --component-module does)
from external_port import dit_block, embedding, rope, wan_vae  # noqa: E402


@pytest.fixture(autouse=True)
def glue():
    """The glue's components, registered for each test (the registry is reset after every test)."""
    registry.use_files([GLUE])


def run(name, dtype="float32"):
    return run_component(name, dtype, out_dir=None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_port_passes_in_both_dtypes(dtype):
    for name in PORT_COMPONENTS:
        result = run(name, dtype)
        assert result.verdict == "PASS", (name, result.first_divergence)
        assert all(l.verdict in ("PASS", "EXCLUDED") for l in result.layers)


def test_adapters_and_exclusions_are_in_the_report():
    rows = {r["layer"]: r for r in run("port_block").report["layers"]}
    assert rows["attn1/k"]["mlx_layer"] == "self_attn.qkv" and rows["attn1/k"]["adapter"] == "split(3, 1)"  # derived
    assert rows["attn1/q_rope"]["adapter"] == "transpose(0, 2, 1, 3)"  # declared
    assert rows["residual1"]["verdict"] == "EXCLUDED" and "no module output" in rows["residual1"]["excluded"]
    assert rows["attn1/out"]["mlx_layer"] == "attn1/out" and rows["attn1/out"]["verdict"] == "PASS"  # self_attn, derived


def test_derived_correspondence_of_the_converters():
    block = registry.get("port_block")
    weights = block.reference_weights(block.build_reference(block.load_config(), 0))
    outputs, rules = derive(dit_block.convert_state_dict, weights, block.reference_layers)
    assert outputs["self_attn"] == "attn1/out" and outputs["cross_norm"] == "norm2" and outputs["cross_attn.q"] == "attn2/q"
    assert [(r.ref, r.adapter) for r in rules if r.mlx == "self_attn.qkv"] == [
        ("attn1/q", "split(3, 0)"), ("attn1/k", "split(3, 1)"), ("attn1/v", "split(3, 2)")]
    assert "ffn.layers.0" not in outputs  # a Linear is not diffusers' GELU module (ffn.net.0), though it holds its weights


# --- faults in the port, localised after alignment and adapters -----------------------------------

def test_fault_rotary_pairs_taken_as_halves(monkeypatch):
    correct = rope.rotate

    def halves(x, table):  # pairs (i, i + D/2) instead of (2i, 2i + 1)
        d = x.shape[-1] // 2
        interleaved = mx.stack([x[..., :d], x[..., d:]], axis=-1).reshape(x.shape)
        out = correct(interleaved, table).reshape(*x.shape[:-1], d, 2)
        return mx.concatenate([out[..., 0], out[..., 1]], axis=-1)

    monkeypatch.setattr(rope, "rotate", halves)
    result = run("port_rope")
    assert result.verdict == "FAIL" and result.first_divergence == "helios/q_rot"
    assert result.layer("helios/cos").verdict == "PASS"


def test_fault_t0_embedding_taken_as_zeros(monkeypatch):
    correct = embedding.timestep_features
    monkeypatch.setattr(embedding, "timestep_features",
                        lambda t, dim: mx.zeros((t.shape[0], dim)) if t.shape[0] == 1 else correct(t, dim))
    result = run("port_time_embedding")
    assert result.first_divergence == "t0/timesteps_proj"
    assert result.layer("main/timesteps_proj").verdict == "PASS"


def test_fault_exact_gelu_where_the_reference_uses_tanh(monkeypatch):
    exact = nn.GELU
    monkeypatch.setattr(dit_block.nn, "GELU", lambda approx="none": exact())
    result = run("port_block")
    assert result.first_divergence == "ffn/hidden"


def test_fault_converter_swaps_k_and_v_in_the_fused_projection(monkeypatch):
    """The strict loader cannot see it (every key lands somewhere); the projections follow the converter
    (attn1/k is read where the converter put to_k), and the first divergence is where the port uses its
    second third as k."""
    rules = [dit_block._weights.Rule(("attn1.to_q.{p}", "attn1.to_v.{p}", "attn1.to_k.{p}"), "self_attn.qkv.{p}")
             if r.target == "self_attn.qkv.{p}" else r for r in dit_block.RULES]
    monkeypatch.setattr(dit_block, "RULES", rules)
    result = run("port_block")
    assert result.layer("attn1/k").verdict == "PASS"
    assert result.first_divergence == "attn1/k_norm"


def test_fault_vae_cache_dropped_between_chunks(monkeypatch):
    monkeypatch.setattr(wan_vae.ChunkState, "carry", lambda self, x: (self._slot(), None)[1])
    result = run("port_vae")
    assert result.first_divergence == "chunk1/conv_in"
    assert all(l.verdict == "PASS" for l in result.layers if l.name.startswith("chunk0/"))


def test_an_exclusion_that_matches_nothing_is_an_error(monkeypatch):
    component = registry.get("port_rope")
    stale = Alignment(component.aligned().rules, (*component.aligned().exclusions,
                                                  *Alignment.of(exclude={"helios/gone*": "renamed"}).exclusions))
    monkeypatch.setattr(type(component), "alignment", stale)
    with pytest.raises(AlignmentError, match=r"exclusion\(s\) matching no layer: 'helios/gone\*' \(ref: renamed\)"):
        run("port_rope")


# --- the user's tools: CLI, pytest plugin, bundles, bisect ------------------------------------------

def test_cli_runs_the_port_from_its_component_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "parity", "run", "port_rope", "port_time_embedding", "--no-html",
                           "--component-module", str(GLUE), "--out", str(tmp_path), "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4/4 component runs pass" in done.stdout  # two components, both dtypes
    assert {p.parent.name for p in tmp_path.glob("*/*/report.json")} == {
        f"{n}-{d}" for n in ("port_rope", "port_time_embedding") for d in ("float32", "bfloat16")}


def test_pytest_plugin_with_the_component_module(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parity_component("port_rope")
        def test_rope(parity_run, assert_parity):
            assert_parity(parity_run())
    """)
    result = pytester.runpytest_subprocess(f"--parity-component-module={GLUE}")
    result.assert_outcomes(passed=1)


def test_reference_bundle_for_the_port(tmp_path):
    assert main(["dump-ref", "port_rope", "--out", str(tmp_path / "bundle"), "--component-module", str(GLUE),
                 "--quiet"]) == 0
    assert main(["compare", "port_rope", "--ref-bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "runs"),
                 "--component-module", str(GLUE), "--quiet"]) == 0


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def test_bisect_find_fix_on_a_repository_of_the_port(tmp_path):
    """A user's repository: the port and its glue, the harness installed (not in the repository).
    A commit breaks the port's RoPE pairing, a later one fixes it: --find-fix names the fix."""
    repo = tmp_path / "my-port"
    shutil.copytree(ROOT / "examples" / "external_port", repo / "external_port",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(GLUE, repo / "parity_glue.py")
    _git(repo, "init", "-q", "-b", "main")
    _commit(repo, "port and glue")
    source = (repo / "external_port" / "rope.py").read_text()
    broken = source.replace("out = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)",
                            "out = mx.stack([even * cos + odd * sin, even * sin + odd * cos], axis=-1)")
    assert broken != source
    (repo / "external_port" / "rope.py").write_text(broken)
    bad = _commit(repo, "rope: simplify the rotation")
    (repo / "README.md").write_text("my port\n")
    _commit(repo, "readme")
    (repo / "external_port" / "rope.py").write_text(source)
    fix = _commit(repo, "rope: restore the rotation sign")
    (repo / "NOTES.md").write_text("notes\n")
    _commit(repo, "notes")
    out = tmp_path / "bisect"
    code = main(["bisect", "--find-fix", "--bad", bad, "--good", "main", "--component", "port_rope", "--dtype", "float32",
                 "--component-module", "parity_glue.py", "--repo", str(repo), "--out", str(out), "--quiet"])
    result = json.loads((out / "bisect.json").read_text())
    assert code == 0, result["message"]
    assert result["target"] == "fix" and result["first_changed"]["commit"] == fix
    assert "First good commit (the fix)" in (out / "bisect.html").read_text()
