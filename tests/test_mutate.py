"""``parity mutate``: operators, shadowing a file with its mutant, classifying mutants, the page, and real runs.

The two real runs (through the CLI, in subprocesses) are kept small: float32 only, two
operators, a few mutants. What they assert holds on every machine: which mutants are killed
or equivalent follows from the arithmetic (bf16 cannot count past 256; small positions are
exact in bf16), not from timing, BLAS or thread counts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from parity.mutate import BaselineFails, first_changed, judge, judge_run, run_baseline
from parity.mutate_ops import OPERATORS, mutants, select
from parity.mutate_page import render
from parity.vocab import InputError

ROOT = Path(__file__).resolve().parent.parent
GLUE = ROOT / "examples" / "external_port_parity.py"
HEADER = "import mlx.core as mx\nimport mlx.nn as nn\nimport numpy as np\n\n\ndef f(x, y, a, b, n, s, t, v, d, u, g):\n"


def cli(*args, **kwargs):
    done = subprocess.run([sys.executable, "-m", "parity", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, **kwargs)
    return done.returncode, done.stdout, done.stderr


def changed_lines(body: str, operator: str) -> list[set[str]]:
    """Per mutant of ``body`` (statements inside a function) by ``operator``: the lines it changed, stripped."""
    text = HEADER + "".join(f"    {line}\n" for line in body.splitlines())
    found = []
    for mutant in mutants("snippet.py", [operator], text=text):
        before, after = text.splitlines(), mutant.source.splitlines()
        assert len(before) == len(after)
        found.append({b.strip() for a, b in zip(before, after) if a != b})
    return found


# --- operators ---------------------------------------------------------------------------------------

CASES = [  # operator, statement(s), the changed line
    ("drop_upcast", "y = x.astype(mx.float32) + 1", "y = x + 1"),
    ("upcast_to_bf16", "y = mx.zeros(3, dtype=mx.float32)", "y = mx.zeros(3, dtype=mx.bfloat16)"),
    ("cast_bf16", "y = mx.exp(a) * 2", "y = (mx.exp(a) * 2).astype(mx.bfloat16)"),
    ("cast_fp16", "return nn.silu(x)", "return nn.silu(x).astype(mx.float16)"),
    ("drop_cast_back", "z = (x * y).astype(x.dtype)", "z = (x * y)"),
    ("float64_to_float32", "t = np.arange(4, dtype=np.float64)", "t = np.arange(4, dtype=np.float32)"),
    ("softmax_imprecise", "p = mx.softmax(s, axis=-1, precise=True)", "p = mx.softmax(s, axis=-1, precise=False)"),
    ("eps_x10", "r = nn.RMSNorm(8, eps=1e-6)", "r = nn.RMSNorm(8, eps=1e-05)"),
    ("constant_x2", "s = x * 0.5", "s = x * 1.0"),
    ("constant_x2", "h = d // 6", "h = d // 12"),
    ("power_halved", "scale = d ** -0.5", "scale = d ** (-0.25)"),
    ("sqrt_dropped", "r = mx.sqrt(v + a)", "r = (v + a)"),
    ("permute_swap", "y = x.transpose(0, 2, 1, 3)", "y = x.transpose(0, 2, 3, 1)"),
    ("permute_swap", "y = mx.transpose(x, (0, 4, 1, 2, 3))", "y = mx.transpose(x, (0, 4, 1, 3, 2))"),
    ("permute_swap", "y = x.swapaxes(1, 2)", "y = x.swapaxes(1, 3)"),
    ("reshape_swap", "y = x.reshape(b, n, a, -1)", "y = x.reshape(b, n, -1, a)"),
    ("concat_swap", "y = mx.concatenate([a, b], axis=-1)", "y = mx.concatenate([b, a], axis=-1)"),
    ("axis_shift", "m = x.mean(axis=-1)", "m = x.mean(axis=-2)"),
    ("axis_shift", "c = mx.concatenate([a, b], axis=1)", "c = mx.concatenate([a, b], axis=0)"),
    ("slice_off_by_one", "y = x[:, 1:]", "y = x[:, 2:]"),
    ("slice_off_by_one", "y = x[:-1]", "y = x[:-2]"),
    ("slice_off_by_one", "y = x[:n]", "y = x[:n + 1]"),
    ("index_off_by_one", "y = x[..., 0]", "y = x[..., 1]"),
    ("pad_swap", "y = mx.pad(x, [(0, 0), (2, 0)])", "y = mx.pad(x, [(0, 0), (0, 2)])"),
    ("int_off_by_one", "k = n - 1", "k = n - 2"),
    ("trunc_round", "i = int(t)", "i = round(t)"),
    ("drop_operand", "y = x + u * g", "y = x"),
    ("drop_factor", "y = u * g", "y = u"),
    ("sub_swap", "y = a - b", "y = b - a"),
    ("sign_dropped", "y = -x", "y = x"),
    ("compare_boundary", "k = a if n < s else b", "k = a if n <= s else b"),
    ("min_max_swap", "m = min(a, b)", "m = max(a, b)"),
    ("min_max_swap", "m = mx.maximum(a, b)", "m = mx.minimum(a, b)"),
    ("gelu_swap", "y = nn.gelu_approx(x)", "y = nn.gelu(x)"),
    ("gelu_swap", "g = nn.GELU(approx='precise')", "g = nn.GELU(approx='tanh')"),
    ("silu_gelu_swap", "y = nn.silu(x)", "y = nn.gelu(x)"),
    ("sin_cos_swap", "y = mx.sin(x)", "y = mx.cos(x)"),
]


@pytest.mark.parametrize("operator, body, expected", CASES)
def test_each_operator_makes_its_change(operator, body, expected):
    assert {expected} in changed_lines(body, operator), changed_lines(body, operator)


def test_every_operator_is_tested():
    assert {case[0] for case in CASES} == set(OPERATORS)


def test_nothing_numerical_is_mutated_in_docstrings_guards_messages_or_annotations():
    body = ('"""Scale by 0.5 and add 1."""\n'
            "if n < 0:\n    raise ValueError(f'n {n - 1} < 0')\n"
            "assert n >= 2\n"
            "z: mx.float32 = x\n"
            "return x * 0.5\n")
    assert changed_lines(body, "compare_boundary") == []
    assert changed_lines(body, "int_off_by_one") == [] and changed_lines(body, "sub_swap") == []
    assert changed_lines(body, "constant_x2") == [{"return x * 1.0"}]
    assert changed_lines(body, "upcast_to_bf16") == []


def test_mutants_of_our_sources_parse_keep_their_lines_and_have_unique_ids():
    for path in (ROOT / "mlx_impl" / "rope.py", ROOT / "mlx_impl" / "vae.py"):
        text = path.read_text()
        found = mutants(path, label=f"mlx_impl/{path.name}")
        assert len({m.id for m in found}) == len(found)
        for m in found:  # each parses: mutants() drops those that do not
            assert m.source.count("\n") == text.count("\n"), m.id
            assert m.diff.startswith(f"--- mlx_impl/{path.name}")


def test_selection_is_bounded_deterministic_and_gives_every_operator_a_turn():
    found = mutants(ROOT / "mlx_impl" / "block.py")
    operators = {m.operator for m in found}
    limit = len(operators) + 3  # more than the operators here, fewer than the mutants
    assert limit < len(found)
    chosen = select(found, limit)
    assert len(chosen) == limit and chosen == select(found, limit)
    assert {m.operator for m in chosen} == operators
    assert chosen == sorted(chosen, key=found.index)
    assert select(found, None) == found and select(found, 0) == []


# --- the mutant in place of the original ---------------------------------------------------------------

def test_a_mutant_shadows_its_file_for_every_import_and_leaves_it_untouched(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "mod.py"
    module.write_text("X = 1\n")
    code = f"""
import importlib.util, sys
from parity.mutate_worker import substitute
state = substitute({str(module)!r}, "X = 2\\n")
sys.path.insert(0, {str(tmp_path)!r})
import pkg.mod
spec = importlib.util.spec_from_file_location("as_a_component_module", {str(module)!r})
other = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other)
print(pkg.mod.X, other.X, state["loaded"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.split() == ["2", "2", "True"], done.stderr
    assert module.read_text() == "X = 1\n"
    assert not list(tmp_path.rglob("mod.*.pyc")), "a mutant wrote bytecode next to the original"


# --- classifying a mutant ----------------------------------------------------------------------------

BASE = [["a", "1"], ["b", "2"], ["c", "3"]]


def entry(digests, verdict="PASS", first=None, crash=None, metric=None):
    return {"digests": digests, "verdict": verdict, "first_divergence": first, "first_divergence_mlx": first,
            "failure": f"{first} broke" if first else None, "failure_metric": metric, "crash": crash,
            "margins": [{"layer": n, "mlx_layer": n, "metric": "max_abs", "ratio": r}
                        for (n, _), r in zip(digests, (0.9, 0.2, 0.1))], "seconds": 0.1}


def test_mutants_are_classified_from_their_bits_and_verdicts():
    changed = [["a", "1"], ["b", "9"], ["c", "8"]]
    assert first_changed(BASE, changed) == "b" and first_changed(BASE, BASE) is None
    assert judge_run(entry(BASE), BASE, True, "")["status"] == "equivalent"
    assert judge_run(entry(BASE), BASE, False, "")["status"] == "survived"  # not reproducible: never equivalent
    survived = judge_run(entry(changed), BASE, True, "")
    assert survived["status"] == "survived" and survived["first_changed"] == "b"
    assert survived["closest"]["layer"] == "b"  # the nearest to its limit among the layers it changed (not a)
    killed = judge_run(entry(changed, "FAIL", "b", metric="max_abs"), BASE, True, "")
    assert killed["status"] == "killed" and killed["localised"] is True
    downstream = judge_run(entry(changed, "FAIL", "c", metric="max_abs"), BASE, True, "")
    assert downstream["status"] == "killed" and downstream["localised"] is False
    crash = {"side": "MLX", "error": "ValueError: shapes", "after": "a"}
    crashed = judge_run(entry(BASE[:1], "FAIL", "b", crash, "presence"), BASE, True, "")
    assert crashed["status"] == "crashed" and "ValueError" in crashed["reason"]
    caught_first = judge_run(entry([["a", "7"]], "FAIL", "a", crash, "max_abs"), BASE, True, "")
    assert caught_first["status"] == "killed"  # a layer before the crash failed: the comparison caught it
    assert judge_run(None, BASE, True, "timeout after 9 s") == {"status": "crashed", "reason": "timeout after 9 s"}
    killed_in_bf16 = entry(changed, "FAIL", "b", metric="budget_ratio")
    both = judge({"loaded": True, "wall": 1.0, "runs": {"float32": entry(BASE), "bfloat16": killed_in_bf16}},
                 {"digests": {"float32": BASE, "bfloat16": BASE}, "reproducible": True}, ["float32", "bfloat16"], 60)
    assert both["status"] == "killed" and both["runs"]["float32"]["status"] == "equivalent"
    timed_out = judge({"loaded": True, "timed_out": True, "runs": {}},
                      {"digests": {"float32": BASE}, "reproducible": True}, ["float32"], 60)
    assert timed_out["status"] == "crashed" and timed_out["timed_out"] and "timeout" in timed_out["reason"]


class StubWorkers:
    """Stands in for the worker processes: hands out prepared results."""

    def __init__(self, *results):
        self.results = list(results)

    def submit(self, spec, timeout):
        future = Future()
        future.set_result(self.results.pop(0))
        return future


def run_result(verdict="PASS", digests=BASE, **extra):
    return {"wall": 1.0, "coverage": {}, "ran": [], "runs": {"float32": {
        **entry(digests, verdict, None if verdict == "PASS" else "b", metric="max_abs"), "layers": 3, **extra}}}


def test_no_score_unless_the_unmutated_run_passes_and_reproducibility_decides_equivalence():
    with pytest.raises(BaselineFails, match="the unmutated toy fails in float32 .first divergence b: b broke"):
        run_baseline(StubWorkers(run_result("FAIL"), run_result("FAIL")), {}, ["float32"], "toy")
    with pytest.raises(InputError, match="bad config"):
        run_baseline(StubWorkers({"setup_error": {"error": "bad config", "input_error": True}}, run_result()), {},
                  ["float32"], "toy")
    assert run_baseline(StubWorkers(run_result(), run_result()), {}, ["float32"], "toy")["reproducible"]
    assert not run_baseline(StubWorkers(run_result(), run_result(digests=BASE[:2])), {}, ["float32"], "toy")["reproducible"]


def test_the_page_escapes_everything():
    evil = "<script>alert(1)</script>"
    mutant = {"id": f"m{evil}", "operator": "sub_swap", "file": f"x{evil}.py", "line": 3, "function": evil,
              "original": "a - b", "replacement": "b - a", "change": evil, "summary": evil,
              "diff": f"--- x\n+++ x (mutant)\n-{evil}\n+a & b\n", "first_changed": evil}
    result = {"component": evil, "dtypes": ["float32"], "runs": ["float32", evil], "mutants": [
        {**mutant, "status": "survived", "runs": {evil: {"closest": {"layer": evil, "metric": "max_abs", "ratio": 0.5}}}},
        {**mutant, "id": "k", "status": "killed", "first_divergence": evil, "failure": evil, "localised": False,
         "runs": {evil: {"status": "killed"}}},
        {**mutant, "id": "c", "status": "crashed", "reason": evil, "runs": {}}],
        "baseline": {"runs": {evil: {"verdict": "PASS", "calibration": {"note": evil}}}},
        "counts": {"killed": 1, "survived": 1, "equivalent": 0, "crashed": 1}, "kill_rate": 0.5,
        "by_operator": {"sub_swap": {"killed": 1, "survived": 1, "equivalent": 0, "crashed": 1}},
        "operators": {"sub_swap": evil}, "sources": [{"file": evil, "mutants": 3, "executed": 3}]}
    html = render(result)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "a &amp; b" in html and "50%" in html


# --- the command -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, names", [
    (["nope"], ["unknown component 'nope'"]),
    (["rope", "--source", "missing.py"], ["--source missing.py"]),
    (["rope", "--source", "parity/vocab.py"], ["parity/vocab.py", "harness"]),
    (["rope", "--min-kill-rate", "1.5"], ["--min-kill-rate"]),
    (["rope", "--operator", "nope"], ["--operator"]),
    (["rope", "time_embedding", "--source", "mlx_impl/rope.py"], ["exactly one"]),
])
def test_bad_input_is_exit_2_with_one_line(args, names, tmp_path):
    code, out, err = cli("mutate", *args, "--out", tmp_path / "m")
    assert code == 2, (code, out, err)
    errors = [line for line in err.splitlines() if "error:" in line]  # argparse adds its usage lines above
    assert "Traceback" not in out + err and len(errors) == 1, err
    for name in names:
        assert name in errors[0]
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


EXPECTED_ROPE = {  # float32, operators upcast_to_bf16 and sin_cos_swap: what each mutant is, by arithmetic
    "mlx_impl/rope.20.upcast_to_bf16": "killed",      # frequency exponents i/dim rounded to bf16
    "mlx_impl/rope.31.upcast_to_bf16": "killed",      # frame positions 250..259 in bf16: 257, 259 are not representable
    "mlx_impl/rope.32.upcast_to_bf16": "equivalent",  # row positions 0..3 are exact in bf16
    "mlx_impl/rope.33.upcast_to_bf16": "equivalent",  # column positions 0..4 too
    "mlx_impl/rope.41.sin_cos_swap": "killed", "mlx_impl/rope.41.sin_cos_swap.2": "killed",
    "mlx_impl/rope.62.sin_cos_swap": "killed", "mlx_impl/rope.63.sin_cos_swap": "killed",
}


def _alive(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in text and "mutate_worker" in text:
            found.append(text)
    return found


def test_rope_mutants_killed_and_equivalent_then_ctrl_c_keeps_them(tmp_path):
    """A real run on rope: killed mutants name their first divergence (the layer the mutated line produces),
    equivalent ones are detected; Ctrl-C then stops it with exit 130 and keeps the finished mutants."""
    out, scratch = tmp_path / "m", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "parity", "mutate", "rope", "--dtype", "float32", "--operator",
                             "upcast_to_bf16", "--operator", "sin_cos_swap", "--max-mutants", "8", "--jobs", "2",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ours ignores it
    results = out / "rope" / "mutations.json"
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:  # until a killed and an equivalent mutant are in
        if results.is_file() and {"killed", "equivalent"} <= {m["status"] for m in json.loads(results.read_text())["mutants"]}:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr and "interrupted" in stderr
    data = json.loads(results.read_text())
    assert data["interrupted"] and not data["complete"] and data["counts"]["pending"] > 0
    assert data["sources"] == [{"file": "mlx_impl/rope.py", "mutants": 8, "executed": 8}]
    assert data["baseline"]["reproducible"] and data["baseline"]["runs"]["float32"]["verdict"] == "PASS"
    finished = {m["id"]: m for m in data["mutants"]}
    assert {k: m["status"] for k, m in finished.items()} == {k: EXPECTED_ROPE[k] for k in finished}
    killed = [m for m in finished.values() if m["status"] == "killed"]
    for m in killed:
        assert m["first_divergence"] and m["failure"] and m["localised"] is True, m
        assert m["first_divergence"] == m["first_changed"]
    if "mlx_impl/rope.41.sin_cos_swap" in finished:
        assert finished["mlx_impl/rope.41.sin_cos_swap"]["first_divergence"] == "helios/cos"
    assert data["kill_rate"] == 1.0 and data["counts"]["equivalent"] >= 1
    html = (out / "rope" / "mutations.html").read_text()
    assert "Interrupted" in html and all(ident in html for ident in finished)
    assert not _alive(str(scratch)), "worker processes outlived the interrupted run"
    assert not list(scratch.glob("parity-mutate-*")), "the scratch folder was left behind"


def test_an_external_ports_own_files_are_found_and_mutated(tmp_path):
    code, out, err = cli("mutate", "port_rope", "--component-module", GLUE, "--dtype", "float32",
                         "--operator", "sin_cos_swap", "--max-mutants", "2", "--out", tmp_path, "--quiet")
    assert code == 0, (out, err)
    data = json.loads((tmp_path / "port_rope" / "mutations.json").read_text())
    assert data["sources_found_by"].startswith("project files")
    assert [s["file"] for s in data["sources"]] == ["examples/external_port/rope.py"]  # not the glue, not the harness
    assert data["complete"] and data["counts"]["killed"] == 2 and data["kill_rate"] == 1.0
    for m in data["mutants"]:
        assert m["first_divergence"].startswith("helios/") and m["first_changed"] == "table" and m["localised"]
    assert "port_rope: kill rate 100% (2 killed / 2 non-equivalent" in out
    assert (tmp_path / "port_rope" / "mutations.html").is_file()


TOY_PORT = '''"""A toy port: x * 3, recomputed at every call; then + 1, for every row count."""
from mlx_impl.taps import tap


class Toy:
    def __init__(self):
        self.calls = 0
        self.cached = None

    def __call__(self, x):
        if self.cached is None or self.calls >= 1:
            self.cached = x * 3.0
        self.calls += 1
        tap("tripled", self.cached)
        return tap("out", self.cached + 1.0 if x.shape[0] >= 1 else self.cached)
'''

TOY_COMPONENT = '''"""x * 3 + 1 in torch vs toy_port.Toy: a throw-away component with a coverage cell of one row."""
import mlx.core as mx
import numpy as np

import toy_port
from parity.api import Component, ComponentConfig


class ToyConfig(ComponentConfig):
    rows: int


class ToyComponent(Component):
    name = "toy_state"
    description = "x * 3 + 1"
    config_model = ToyConfig
    coverage = ({"rows": 1},)

    def make_inputs(self, config, seed):
        return {"x": np.random.default_rng(seed).standard_normal((config.rows, 4)).astype(np.float32)}

    def build_reference(self, config, seed):
        import torch

        return torch.nn.Module()

    def run_reference(self, reference, inputs, dtype, capture):
        import torch

        tripled = torch.from_numpy(inputs["x"]).to(getattr(torch, dtype)) * 3
        capture.add("tripled", tripled)
        capture.add("out", tripled + 1)

    def convert_weights(self, weights):
        return weights

    def build_mlx(self, config, weights, dtype):
        return toy_port.Toy()

    def run_mlx(self, model, inputs, dtype):
        model(mx.array(inputs["x"]).astype(getattr(mx, dtype)))


COMPONENT = ToyComponent()
'''


def test_the_second_call_and_the_coverage_cells_kill_what_the_default_run_cannot_see(tmp_path):
    """Each mutant makes the gate's runs: ``>= 1`` -> ``> 1`` in the cache check leaves every first call
    bit-identical and is killed at call2/tripled; in the row check it changes only one-row inputs and is
    killed in the coverage cell only (equivalent in the default run)."""
    folder = tmp_path / "port"
    folder.mkdir()
    (folder / "toy_port.py").write_text(TOY_PORT)
    (folder / "toy_state.py").write_text(TOY_COMPONENT)
    (folder / "toy_state.json").write_text(json.dumps({"rows": 5}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    code, out, err = cli("mutate", "toy_state", "--component-module", folder / "toy_state.py", "--dtype", "float32",
                         "--operator", "compare_boundary", "--jobs", "2", "--quiet", "--out", tmp_path, env=env)
    assert code == 0, (out, err)
    data = json.loads((tmp_path / "toy_state" / "mutations.json").read_text())
    assert data["runs"] == ["float32", "toy_state[rows=1]"]
    for run in data["runs"]:
        assert data["baseline"]["runs"][run]["layers"] == 4  # tripled, out, call2/tripled, call2/out
    by_line = {m["line"]: m for m in data["mutants"]}
    cache, rows = by_line[11], by_line[15]
    assert cache["status"] == "killed" and cache["first_divergence"] == "call2/tripled" and cache["localised"]
    assert {k: v["status"] for k, v in cache["runs"].items()} == {"float32": "killed", "toy_state[rows=1]": "killed"}
    assert rows["status"] == "killed" and rows["first_divergence"] == "out"
    assert {k: v["status"] for k, v in rows["runs"].items()} == {"float32": "equivalent", "toy_state[rows=1]": "killed"}
