"""``parity calibrate``: per-layer limits from the noise of the correct implementation (see :mod:`parity.calibration`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from parity import calibration, registry
from parity.commands import add, load_thresholds, non_negative_int, positive_int, progress, thresholds_option
from parity.dumps import writable_folder
from parity.runner import run_component
from parity.vocab import DTYPE_CHOICES, EXIT_FAIL, EXIT_PASS, dtypes


def calibrate(args: argparse.Namespace) -> int:
    names = registry.select(args.components)
    writable_folder(args.out, "--out")
    limits, say = load_thresholds(args), progress(args)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    for name in names:
        for dtype in dtypes(args.dtype):
            def run(seed: int, name: str = name, dtype: str = dtype) -> dict[str, Any]:
                return run_component(name, dtype, seed, out_dir=None, thresholds=limits, calibration_dir=None).report
            with say.counter(f"[{name} {dtype}] calibrating", total=len(seeds), unit="seed") as count:
                try:
                    path = calibration.calibrate(name, dtype, seeds, run, args.out,
                                                 on_seed=lambda seed, _report: count(f"seed {seed}"))
                except calibration.CalibrationFailed as err:
                    print(f"parity calibrate: {err}", file=sys.stderr)
                    return EXIT_FAIL
            written = calibration.load(path)
            print(f"{path}: {len(written.layers)} layers over seeds {seeds[0]}..{seeds[-1]}"
                  + _tighter(written, limits, registry.get(name).lineage()))
    return EXIT_PASS


def _tighter(written: calibration.Calibration, limits: Any, lineage: list[str]) -> str:
    """How many bf16 budget limits the calibration tightens (float32 limits scale with each run's tensors)."""
    if written.dtype != "bfloat16":
        return ""
    budgets = [limits.for_layer(lineage, "bfloat16", layer).budget_ratio for layer in written.layers]
    tighter = sum(b is not None and e["limit"] < b for b, e in zip(budgets, written.layers.values()))
    return f"; {tighter} budget limits tighter than the global ones"


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "calibrate", "per-layer limits from the noise of the correct implementation over many seeds",
            description=(calibration.__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("components", nargs="+", metavar="COMPONENT", help="components to calibrate, or 'all'")
    p.add_argument("--seeds", type=positive_int, default=20, help="how many seeds (default 20)")
    p.add_argument("--first-seed", type=non_negative_int, default=1,
                   help="the first seed (default 1: the default run's seed 0 stays held out)")
    p.add_argument("--dtype", default="all", choices=DTYPE_CHOICES, help="precision (default all)")
    p.add_argument("--out", type=Path, default=calibration.DEFAULT_DIR,
                   help=f"where the calibration files go (default {calibration.DEFAULT_DIR}/)")
    thresholds_option(p)
    p.set_defaults(func=calibrate)
