"""bench/run_bench.py runs and reports what it says; nothing here reads a timing, a CPU model or a BLAS build."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from parity import threads

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("run_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_contended_neighbour_runs_and_is_stopped(bench):
    with bench.neighbour(True) as pid:
        os.kill(pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with bench.neighbour(False) as none:
        assert none is None


def test_one_component_end_to_end(bench, tmp_path, monkeypatch, capsys):
    """The table, the header's record of threads, BLAS pools and OPENBLAS_*, the policy's count and both calls."""
    monkeypatch.delenv(threads.ENV_THREADS, raising=False)
    monkeypatch.setattr(threads, "_requested", {})
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--components", "time_embedding", "--no-rss", "--no-stack", "--repeat", "1",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "OPENBLAS_*:" in text and "BLAS pools (threadpoolctl):" in text and "MLX BLAS:" in text
    results = json.loads(out.read_text())
    row, = results["components"]
    assert "error" not in row, row
    assert row["threads"] == 1 and row["calls"] == 2  # a fixture-size reference; float32 makes the second call
    assert results["neighbour"] is None and results["metrics"]["numel"] == 8_000_000
    assert results["policy"]["cores"] == threads.available_cores() and "## Thread policy vs the pools' default" in text
    assert "| time_embedding | float32 | 1 | 2 |" in text
