"""``parity bisect``: the search itself, and a real bisection of a throw-away repository.

The throw-away repository is a miniature of this one: the harness (``parity/``, ``mlx_impl/taps.py``,
``fixtures/inputs.py``, copied from this checkout), a minimal ``parity.toml``, and one tiny
component: a residual MLP stack with a PyTorch reference and an MLX port (``mlx_impl/tiny.py``).
Each tested revision runs with its own copy of everything, as a real bisection of this repository
does. Its history (first parent, oldest first):

    c1  good      tiny component and MLX port
    c2  good      unrelated README change
    c3  skip      config file broken: ``parity run`` exits 2 (cannot test)
    c4  good      config fixed
    c5  BAD       "simplify the residual add": the residual add done in bf16 (bug-catalog row 8)
    c6  bad       unrelated README change; adds a top-level package ``leaky``

The bisection runs under an interpreter on which the user's checkout is installed in editable mode
(a setuptools-style finder whose ``MAPPING`` points ``leaky`` into the checkout): the component
refuses to run if ``leaky`` resolves outside the revision under test, so a leak fails the good end.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parity import commands as cli
from parity.bisect import BAD, GOOD, SKIP, BisectError, search

HARNESS = Path(__file__).resolve().parent.parent

# --- the search, without git ---------------------------------------------------------------------


def _oracle(statuses: dict[str, str], calls: list[str]):
    def status_of(commit: str) -> str:
        calls.append(commit)
        return statuses[commit]
    return status_of


@pytest.mark.parametrize("first_bad", range(1, 9))
def test_search_finds_every_position(first_bad):
    commits = [f"c{i}" for i in range(1, 9)]  # c8 is the known bad end
    statuses = {c: GOOD if i + 1 < first_bad else BAD for i, c in enumerate(commits)}
    calls: list[str] = []
    assert search(commits, _oracle(statuses, calls)) == [f"c{first_bad}"]
    assert len(calls) <= 3 and "c8" not in calls  # log2(8) steps, the known bad end never retested


def test_search_steps_around_an_untestable_commit():
    commits = ["c2", "c3", "c4", "c5", "c6"]
    statuses = {"c2": GOOD, "c3": SKIP, "c4": GOOD, "c5": BAD, "c6": BAD}
    calls: list[str] = []
    assert search(commits, _oracle(statuses, calls)) == ["c5"]
    assert calls == ["c3", "c4", "c5"]


def test_search_reports_suspects_when_skips_hide_the_answer():
    commits = ["a", "b", "c", "d"]
    statuses = {"a": GOOD, "b": SKIP, "c": SKIP, "d": BAD}
    assert search(commits, _oracle(statuses, [])) == ["b", "c", "d"]
    with pytest.raises(BisectError):
        search([], _oracle({}, []))


# --- a real bisection --------------------------------------------------------------------------------

TINY_COMPONENT = '''"""A tiny residual MLP stack: PyTorch reference vs MLX port (the bisect demo's component)."""
from __future__ import annotations

import importlib.util
import os

import mlx.core as mx
import numpy as np

from fixtures.inputs import normal
from parity.capture import Capture
from parity.component import Component
from parity.config import ComponentConfig


class TinyConfig(ComponentConfig):
    dim: int
    tokens: int
    depth: int
    gate: float


class TinyComponent(Component):
    name = "tiny"
    description = "residual MLP stack whose residual stream is float32"
    config_model = TinyConfig

    def make_inputs(self, config, seed):
        x = normal(seed, "tiny/x", (config.tokens, config.dim))
        return {"x": (x.view(np.uint32) & 0xFFFF0000).view(np.float32)}  # exact in bf16

    def build_reference(self, config, seed):
        import torch

        torch.manual_seed(seed)
        return torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
            torch.nn.Linear(config.dim, config.dim) for _ in range(config.depth))})

    def run_reference(self, reference, inputs, dtype, capture: Capture):
        import torch

        config = self.load_config()
        stream = torch.float64 if dtype == "float64" else torch.float32
        h = torch.from_numpy(inputs["x"]).to(stream)
        for i, layer in enumerate(reference["layers"]):
            y = config.gate * torch.tanh(layer(h.to(getattr(torch, dtype))))
            capture.add(f"block{i}/update", y)
            h = h + y.to(stream)
            capture.add(f"block{i}/out", h)

    def build_mlx(self, config, weights, dtype):
        expected = {f"layers.{i}.{p}" for i in range(config.depth) for p in ("weight", "bias")}
        if set(weights) != expected:
            raise KeyError(f"tiny: keys {sorted(set(weights) ^ expected)} missing or unused")
        dt = getattr(mx, dtype)
        return [(mx.array(weights[f"layers.{i}.weight"]).astype(dt), mx.array(weights[f"layers.{i}.bias"]).astype(dt))
                for i in range(config.depth)]

    def run_mlx(self, model, inputs, dtype):
        from mlx_impl.tiny import forward

        leaky = importlib.util.find_spec("leaky")
        if leaky is not None and not os.path.realpath(leaky.origin).startswith(os.path.realpath(os.getcwd())):
            raise RuntimeError(f"leaky comes from outside the revision under test: {leaky.origin}")

        forward(model, mx.array(inputs["x"]), getattr(mx, dtype), self.load_config().gate)


COMPONENT = TinyComponent()
'''

TINY_PORT = '''"""A tiny residual MLP stack in MLX; the residual stream stays float32 whatever the model dtype."""
import mlx.core as mx

from mlx_impl.taps import tap


def residual_add(h, y):
    return h + y.astype(mx.float32)


def forward(layers, x, dtype, gate):
    h = x.astype(mx.float32)
    for i, (w, b) in enumerate(layers):
        y = tap(f"block{i}/update", gate * mx.tanh(h.astype(dtype) @ w.T + b))
        h = tap(f"block{i}/out", residual_add(h, y))
    return h
'''

BF16_RESIDUAL = '''def residual_add(h, y):
    return h.astype(y.dtype) + y
'''

CONFIG = {"dim": 16, "depth": 3, "tokens": 8, "gate": 0.1}
THRESHOLDS = """[defaults.float32]
atol = 1e-5
rtol = 1e-5
cosine_min = 0.99999

[defaults.bfloat16]
budget_ratio = 2.0
"""


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=Test", "-c", "user.email=test@example.com", "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _copy_harness(repo: Path) -> None:
    """The harness (its library and commands, templates, not the real components)."""
    shutil.copytree(HARNESS / "parity", repo / "parity", ignore=shutil.ignore_patterns("__pycache__", "components"))
    (repo / "parity" / "components").mkdir()
    shutil.copy(HARNESS / "parity" / "components" / "__init__.py", repo / "parity" / "components" / "__init__.py")
    for package, modules in (("mlx_impl", ("__init__.py", "taps.py")), ("fixtures", ("__init__.py", "inputs.py"))):
        (repo / package).mkdir()
        for module in modules:
            shutil.copy(HARNESS / package / module, repo / package / module)
    (repo / "fixtures" / "configs").mkdir()


def make_demo_repo(repo: Path) -> dict[str, str]:
    """Create the throw-away repository described at the top of this file; returns {"c1": sha, ...}.

    Also a demo: ``python -c "import sys; sys.path.insert(0, 'tests'); import test_bisect, pathlib;
    test_bisect.make_demo_repo(pathlib.Path('/tmp/bisect-demo'))"``, then in /tmp/bisect-demo
    ``parity bisect --good HEAD~5 --bad HEAD --component tiny --dtype bfloat16 --out /tmp/bisect-demo-out``.
    """
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _copy_harness(repo)
    (repo / "parity.toml").write_text(THRESHOLDS)
    (repo / "parity" / "components" / "tiny.py").write_text(TINY_COMPONENT)
    (repo / "mlx_impl" / "tiny.py").write_text(TINY_PORT)
    config = repo / "fixtures" / "configs" / "tiny.json"
    config.write_text(json.dumps(CONFIG))
    readme = repo / "README.md"
    readme.write_text("# tiny port\n")
    shas = {"c1": _commit(repo, "tiny component and MLX port")}
    readme.write_text("# tiny port\n\nA residual MLP stack.\n")
    shas["c2"] = _commit(repo, "README: describe the model")
    config.write_text('{"dim": 16,')
    shas["c3"] = _commit(repo, "config: start adding options (broken)")
    config.write_text(json.dumps(CONFIG))
    shas["c4"] = _commit(repo, "config: fix")
    port = repo / "mlx_impl" / "tiny.py"
    port.write_text(port.read_text().replace(
        "def residual_add(h, y):\n    return h + y.astype(mx.float32)\n", BF16_RESIDUAL))
    shas["c5"] = _commit(repo, "tiny: simplify the residual add")
    readme.write_text("# tiny port\n\nA residual MLP stack, in MLX.\n")
    (repo / "leaky").mkdir()
    (repo / "leaky" / "__init__.py").write_text('"""Exists from c6 on."""\n')
    shas["c6"] = _commit(repo, "README: mention MLX")
    return shas


EDITABLE_FINDER = '''"""An editable install of the user's checkout, as setuptools writes it (a MAPPING-driven finder)."""
import importlib.util
import sys

MAPPING = {"leaky": %r}


class EditableFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MAPPING:
            return importlib.util.spec_from_file_location(fullname, MAPPING[fullname] + "/__init__.py")
        return None


sys.meta_path.append(EditableFinder)
'''


def python_with_editable_install(folder: Path, repo: Path) -> Path:
    """An interpreter wrapper on which ``repo`` is installed in editable mode (via ``sitecustomize``)."""
    site = folder / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(EDITABLE_FINDER % str(repo / "leaky"))
    wrapper = folder / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_bisect_names_the_bf16_residual_commit(tmp_path, capsys):
    repo = tmp_path / "port"
    shas = make_demo_repo(repo)
    (repo / "scratch.txt").write_text("uncommitted work\n")  # the user's working tree: must survive untouched
    out = tmp_path / "bisect"
    python = python_with_editable_install(tmp_path / "interpreter", repo)
    code = cli.main(["bisect", "--good", shas["c1"], "--bad", "main", "--component", "tiny", "--python", str(python),
                     "--dtype", "bfloat16", "--repo", str(repo), "--out", str(out), "--timeout", "120"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert shas["c5"] in captured.out and "simplify the residual add" in captured.out

    result = json.loads((out / "bisect.json").read_text())
    assert result["status"] == "found" and result["first_bad"]["commit"] == shas["c5"]
    assert result["last_good"] == shas["c4"]
    assert "mlx_impl/tiny.py" in result["first_bad"]["diffstat"]
    status = {c["commit"]: c["status"] for c in result["commits"]}
    assert status == {shas["c1"]: GOOD, shas["c6"]: BAD, shas["c3"]: SKIP, shas["c4"]: GOOD, shas["c5"]: BAD}
    bad_run = next(c for c in result["commits"] if c["commit"] == shas["c5"])["reports"][0]
    assert bad_run["verdict"] == "FAIL" and bad_run["first_divergence"] == "block0/out"
    assert bad_run["max_budget_ratio"] > 2

    page = (out / "bisect.html").read_text()
    assert "First bad commit" in page and shas["c5"][:12] in page and "tiny: simplify the residual add" in page
    assert "block0/out" in page and "Last good" in page and page.count("data:image/png;base64,") >= 2
    assert (out / bad_run["report_dir"] / "report.html").is_file()  # the first bad run, rendered
    assert not list((out / "commits" / shas["c6"][:12]).glob("*/*/mlx"))  # other runs' dumps pruned

    # the user's checkout is as it was: same branch and commit, uncommitted file kept, no worktree left
    assert _git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert _git(repo, "rev-parse", "HEAD") == shas["c6"]
    assert (repo / "scratch.txt").read_text() == "uncommitted work\n"
    assert len(_git(repo, "worktree", "list").splitlines()) == 1


def test_bisect_rejects_a_range_whose_good_end_fails(tmp_path, capsys):
    repo = tmp_path / "port"
    shas = make_demo_repo(repo)
    out = tmp_path / "bisect"
    code = cli.main(["bisect", "--good", shas["c5"], "--bad", shas["c6"], "--component", "tiny",
                     "--dtype", "bfloat16", "--repo", str(repo), "--out", str(out)])
    assert code == 2
    result = json.loads((out / "bisect.json").read_text())
    assert result["status"] == "error" and "good revision" in result["message"]
    assert "No result" in (out / "bisect.html").read_text()
    assert cli.main(["bisect", "--good", shas["c6"], "--bad", shas["c1"], "--repo", str(repo)]) == 2
    assert "not an ancestor" in capsys.readouterr().err
