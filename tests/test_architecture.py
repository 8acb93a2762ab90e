"""The structure ARCHITECTURE.md promises: no import cycles, commands apart from the library, and a
component added from a folder of its own without touching any file of this repository."""
from __future__ import annotations

import ast
import graphlib
import json
import subprocess
from pathlib import Path

from parity import commands as cli

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("parity", "mlx_impl", "reference_runners", "fixtures")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ours ``path`` imports anywhere (also inside functions: a lazy import is an edge too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & known


def test_no_import_cycles_and_no_library_module_imports_the_commands():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    for name, imported in graph.items():
        if not name.startswith("parity.commands") and name != "parity.__main__":
            assert not any(m.startswith("parity.commands") for m in imported), f"{name} imports the CLI"
            assert "argparse" not in modules[name].read_text(), f"{name} uses argparse outside parity/commands"


# --- a component from a folder of its own -----------------------------------------------------------

PORT = '''"""A user's MLX port of diffusers' FeedForward (GELU, tanh approximation)."""
import mlx.core as mx
import mlx.nn as nn

from mlx_impl.taps import tap


class FeedForward(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj_in = nn.Linear(dim, inner)
        self.proj_out = nn.Linear(inner, dim)

    def __call__(self, x):
        h = tap("hidden", nn.gelu_approx(self.proj_in(x)))
        return tap("out", self.proj_out(h))
'''

COMPONENT = '''"""diffusers FeedForward vs a port of it: the component file of a throw-away component."""
import mlx.core as mx
import numpy as np

import ffn_port
from parity.api import Component, ComponentConfig, strict_load


class FfnConfig(ComponentConfig):
    dim: int
    mult: int
    tokens: int


class FfnComponent(Component):
    name = "throwaway_ffn"
    description = "diffusers FeedForward (gelu-approximate) vs ffn_port.FeedForward"
    config_model = FfnConfig

    def make_inputs(self, config, seed):
        return {"x": np.random.default_rng(seed).standard_normal((config.tokens, config.dim)).astype(np.float32)}

    def build_reference(self, config, seed):
        import torch
        from diffusers.models.attention import FeedForward

        torch.manual_seed(seed)
        return FeedForward(config.dim, mult=config.mult, activation_fn="gelu-approximate")

    def run_reference(self, reference, inputs, dtype, capture):
        import torch

        from parity.capture_torch import hook_modules

        with hook_modules(reference, capture, {"net.0": "hidden", "": "out"}):
            reference(torch.from_numpy(inputs["x"]).to(getattr(torch, dtype)))

    def convert_weights(self, weights):
        names = {"net.0.proj": "proj_in", "net.2": "proj_out"}
        return {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in weights.items()}

    def build_mlx(self, config, weights, dtype):
        port = ffn_port.FeedForward(config.dim, config.dim * config.mult)
        return strict_load(port, weights, dtype=getattr(mx, dtype))

    def run_mlx(self, model, inputs, dtype):
        model(mx.array(inputs["x"]).astype(getattr(mx, dtype)))


COMPONENT = FfnComponent()
'''


def _tree_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout


def _run(folder: Path, out: Path, capsys) -> tuple[int, dict[str, dict]]:
    code = cli.main(["run", "throwaway_ffn", "--component-module", str(folder / "ffn_component.py"),
                     "--dtype", "all", "--out", str(out), "--no-html", "--quiet"])
    capsys.readouterr()
    reports = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/*/report.json")}
    return code, reports


def test_a_component_from_a_folder_of_its_own_changes_no_file_here(tmp_path, capsys, monkeypatch):
    """One MLX file, one component file with a typed config, one default config; the diffusers
    module is driven directly (no reference runner). It passes as written and fails at the right
    layer with the exact-erf GELU of bug-catalog fame."""
    before = _tree_state()
    folder = tmp_path / "my_port"
    folder.mkdir()
    (folder / "ffn_port.py").write_text(PORT)
    (folder / "ffn_component.py").write_text(COMPONENT)
    (folder / "throwaway_ffn.json").write_text(json.dumps({"dim": 16, "mult": 2, "tokens": 8}))
    monkeypatch.syspath_prepend(str(folder))

    code, reports = _run(folder, tmp_path / "good", capsys)
    assert code == 0
    assert sorted(reports) == ["throwaway_ffn-bfloat16", "throwaway_ffn-float32"]
    for name, report in reports.items():
        second = ["call2/hidden", "call2/out"] if name.endswith("float32") else []  # the second call
        assert report["verdict"] == "PASS" and [r["layer"] for r in report["layers"]] == ["hidden", "out", *second]

    import mlx.nn

    monkeypatch.setattr(mlx.nn, "gelu_approx", mlx.nn.gelu)  # the port calls exact GELU now
    code, reports = _run(folder, tmp_path / "bad", capsys)
    assert code == 1
    assert reports["throwaway_ffn-float32"]["verdict"] == "FAIL"
    assert reports["throwaway_ffn-float32"]["first_divergence"] == "hidden"
    assert _tree_state() == before
