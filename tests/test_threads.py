"""The thread policy is applied where the work runs, and MLX's GEMM binds to the BLAS the harness chose.

Nothing here times anything or depends on the machine's cores or BLAS build: counts are forced
(``PARITY_THREADS``, a monkeypatched core count) and read back where the work happens.
"""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from parity import commands as cli
from parity import metrics, registry, threads
from parity.runner import run_component
from parity.vocab import InputError

REPO = Path(__file__).resolve().parent.parent


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def fresh_policy(monkeypatch):
    """No ``--threads`` left over from an earlier command; no PARITY_THREADS from the environment."""
    monkeypatch.setattr(threads, "_requested", {})
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)


@pytest.mark.parametrize("argv, env", [(["--threads", "0"], None), (["--threads", "two"], None), ([], "0"), ([], "x")])
def test_a_bad_thread_count_is_one_line_and_exit_2(argv, env, monkeypatch, capsys, fresh_policy):
    if env is not None:
        monkeypatch.setenv(threads.ENV_THREADS, env)
    assert cli.main(["list", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected a positive integer" in err
    with pytest.raises(InputError):
        threads.configure(*(argv[1:] or [None]))


def test_the_policy(monkeypatch, fresh_policy):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    assert threads.decide(parameters=13_000) == (1, f"small reference (13,000 < {threads.SMALL_REFERENCE:,} parameters)")
    assert threads.decide(parameters=threads.SMALL_REFERENCE) == (4, "available cores")
    assert threads.decide() == (4, "available cores")
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    assert threads.decide(parameters=13_000) == (3, threads.ENV_THREADS)
    threads.configure("2")
    assert threads.decide(parameters=13_000) == (2, "--threads")


def test_metric_passes_run_on_one_blas_thread(monkeypatch, fresh_policy):
    monkeypatch.setenv(threads.ENV_THREADS, "3")
    threads.apply()
    assert set(_blas_threads()) == {3}
    seen = []
    blocks = metrics.blocks

    def watched(x, n=None):
        seen.append(_blas_threads())
        yield from blocks(x, n)

    monkeypatch.setattr(metrics, "blocks", watched)
    x = np.random.default_rng(0).standard_normal(3 * metrics.CHUNK).astype(np.float32)
    metrics.tensor_metrics(x, x + 1e-3)
    metrics.precision_budget(x.astype(np.float64), x, x + 1e-3)
    metrics.rmse_and_rms(x.astype(np.float64), x)
    assert seen and all(set(counts) == {1} for counts in seen)
    assert set(_blas_threads()) == {3}  # restored after each pass


@pytest.mark.parametrize("env, expected", [("3", 3), (None, 1)])
def test_forwards_run_with_the_chosen_count(env, expected, monkeypatch, tmp_path, fresh_policy):
    """Forced to 3, or the policy's 1 thread for a fixture-size reference: torch and every BLAS pool run with it."""
    if env:
        monkeypatch.setenv(threads.ENV_THREADS, env)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    comp = registry.get("time_embedding")
    seen = {}

    def watch(side, run):
        def forward(*args, **kwargs):
            seen[side] = (torch.get_num_threads(), set(_blas_threads()))
            return run(*args, **kwargs)
        return forward

    monkeypatch.setattr(comp, "run_reference", watch("ref", comp.run_reference))
    monkeypatch.setattr(comp, "run_mlx", watch("mlx", comp.run_mlx))
    result = run_component(comp, out_dir=tmp_path)
    assert seen == {"ref": (expected, {expected}), "mlx": (expected, {expected})}
    recorded = json.loads((result.report_dir / "report.json").read_text())["threads"]
    assert recorded["threads"] == recorded["torch"] == expected
    assert recorded["source"] == threads.ENV_THREADS if env else recorded["source"].startswith("small reference")
    assert {pool["num_threads"] for pool in recorded["blas"] if pool["internal_api"] != "openmp"} == {expected}


# --- MLX's BLAS ---------------------------------------------------------------------------------

def _system_openblas() -> bool:
    try:
        ctypes.CDLL(threads.SYSTEM_OPENBLAS)
    except OSError:
        return False
    return True


_GEMM = """
import sys
import parity
from parity import threads
import mlx.core as mx
import numpy as np
import torch  # after MLX: the worst order for it
rng = np.random.default_rng(0)
a, b = (rng.standard_normal(s).astype(np.float32) for s in ((96, 80), (80, 64)))
np.save(sys.argv[1], np.array(mx.array(a) @ mx.array(b)))
np.save(sys.argv[2], (torch.from_numpy(a) @ torch.from_numpy(b)).numpy())
print(threads.mlx_blas())
"""


def _gemm(tmp_path: Path, name: str, mlx_blas: str | None) -> dict:
    """Float32 matmuls in a fresh process: MLX's and torch's results, ``mlx_blas()``, and where
    ``cblas_sgemm`` (MLX) and ``sgemm_`` (torch) were bound."""
    env = {k: v for k, v in os.environ.items() if k not in (threads.ENV_MLX_BLAS, "LD_PRELOAD")}
    env.update(LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / f"{name}.ld"), PYTHONPATH=str(REPO))
    if mlx_blas:
        env[threads.ENV_MLX_BLAS] = mlx_blas
    outs = [tmp_path / f"{name}-{side}.npy" for side in ("mlx", "torch")]
    done = subprocess.run([sys.executable, "-c", _GEMM, *map(str, outs)], env=env, capture_output=True, text=True,
                          check=True)
    lines = [line for log in tmp_path.glob(f"{name}.ld*") for line in log.read_text(errors="replace").splitlines()]

    def bound(library: str, symbol: str) -> str:
        found = [line.split(" to ", 1)[1].split(" [", 1)[0] for line in lines
                 if f"/{library}" in line.split(" to ", 1)[0] and f"`{symbol}'" in line]
        return found[0] if found else ""
    return {"mlx": np.load(outs[0]), "torch": np.load(outs[1]), "mlx_blas": done.stdout.strip(),
            "mlx_gemm": bound("libmlx.so", "cblas_sgemm"), "torch_gemm": bound("libtorch_cpu.so", "sgemm_")}


@pytest.mark.skipif(sys.platform != "linux", reason="the mlx[cpu] wheel's BLAS: Linux")
def test_mlx_gemm_binds_to_the_system_openblas_when_present_and_torch_keeps_its_own(tmp_path):
    auto, bundled = _gemm(tmp_path, "auto", None), _gemm(tmp_path, "bundled", "bundled")
    if not bundled["mlx_gemm"]:
        pytest.skip("the dynamic linker does not report bindings (LD_DEBUG)")
    assert "mlx_cpu.libs/libblas" in bundled["mlx_gemm"] and "bundled netlib" in bundled["mlx_blas"]
    if _system_openblas():
        assert "libopenblas" in auto["mlx_gemm"] and "mlx_cpu.libs" not in auto["mlx_gemm"]
        assert auto["mlx_blas"].startswith(threads.SYSTEM_OPENBLAS) and "loaded by parity before MLX" in auto["mlx_blas"]
    else:
        assert auto["mlx_gemm"] == bundled["mlx_gemm"] and "bundled netlib" in auto["mlx_blas"]
    for run in (auto, bundled):  # torch's own BLAS either way (its symbols stay in libtorch_cpu)
        assert "libopenblas" not in run["torch_gemm"]
    np.testing.assert_array_equal(auto["torch"], bundled["torch"])  # the reference is untouched
    np.testing.assert_allclose(auto["mlx"], bundled["mlx"], rtol=1e-5, atol=1e-5)  # another summation order


@pytest.fixture
def mlx_not_loaded_yet(monkeypatch):
    """As if MLX were not imported yet, with no BLAS decided (all restored afterwards)."""
    monkeypatch.setattr(threads, "_mlx_blas", {})
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, "mlx.core")


def test_without_a_system_openblas_one_line_says_how_to_get_it(monkeypatch, mlx_not_loaded_yet):
    monkeypatch.setattr(threads, "SYSTEM_OPENBLAS", "libparity-test-no-such-blas.so.0")
    monkeypatch.delenv(threads.ENV_MLX_BLAS, raising=False)
    threads.load_mlx_blas()
    threads._give_mlx_openblas()  # what the import hook runs when MLX is imported
    advice = threads.mlx_blas_advice()
    assert advice and "\n" not in advice and threads.INSTALL_HINT in advice
    assert "bundled netlib" in threads.mlx_blas()
    monkeypatch.setattr(threads, "_said", set())
    lines = []
    threads.advise_once(lines.append)
    threads.advise_once(lines.append)
    assert lines == [advice]


def test_an_unusable_parity_mlx_blas_is_an_input_error(monkeypatch, mlx_not_loaded_yet, capsys):
    monkeypatch.setenv(threads.ENV_MLX_BLAS, "libparity-test-no-such-blas.so.0")
    with pytest.raises(InputError, match=threads.ENV_MLX_BLAS):
        threads.configure()
    assert cli.main(["list"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
