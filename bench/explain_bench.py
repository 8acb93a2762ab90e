#!/usr/bin/env python
"""Cost of ``parity explain`` at a Wan-14B-size block's first divergence: ``python bench/explain_bench.py``.

Not a test. Runs ``block`` in float32, in memory, at ``fixtures/configs/block_14b.json`` (dim 5120,
40 heads, ffn 13824, 192 tokens) with exact GELU where the reference uses tanh (first divergence
``ffn/hidden``, 192 x 13824 values), and prints the explanation's own time (every applicable
hypothesis, the reference sublayer found and re-run per variant; wall and CPU time) next to the run's
wall time and the load average (on a shared machine, CPU time is the comparable figure).
Sections and the second call are off: they do not change what the explanation does.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

import parity.runner  # noqa: E402
from mlx_impl import block  # noqa: E402
from parity.component import Component  # noqa: E402
from parity.runner import run_component  # noqa: E402


def main() -> None:
    block.gelu_tanh = lambda x: block.nn.gelu(x.astype(mx.float32)).astype(x.dtype)  # the fault
    explanation, cpu = parity.runner.explanation, []

    def timed(*args, **kwargs):
        started = time.process_time()
        try:
            return explanation(*args, **kwargs)
        finally:
            cpu.append(time.process_time() - started)
    parity.runner.explanation = timed
    parity.runner.sections = lambda *args, **kwargs: []
    Component.second_call = False
    started = time.perf_counter()
    result = run_component("block", "float32", out_dir=None, config_path=ROOT / "fixtures" / "configs" / "block_14b.json")
    wall = time.perf_counter() - started
    report = result.report["explanation"]
    (entry,) = report["layers"]
    print(json.dumps({"machine": f"{platform.machine()} {platform.processor()}", "first_divergence": result.first_divergence,
                      "top": entry["top"], "summary": entry["summary"], "explain_wall_seconds": report["seconds"],
                      "explain_cpu_seconds": round(cpu[0], 1), "load_average": os.getloadavg(),
                      "run_wall_seconds": round(wall, 1), "notes": entry["notes"]}, indent=2))


if __name__ == "__main__":
    main()
