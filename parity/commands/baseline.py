"""``parity baseline save``: record per-layer metrics of known-good runs (see :mod:`parity.baseline`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from parity import baseline, registry
from parity.commands import add, load_thresholds, progress, thresholds_option
from parity.dumps import writable_folder
from parity.runner import run_many
from parity.vocab import DTYPE_CHOICES, EXIT_FAIL, EXIT_PASS, dtypes


def save(args: argparse.Namespace) -> int:
    names = registry.select(args.component or [])
    writable_folder(args.baselines, "--baselines")
    writable_folder(args.out, "--out")
    errors: list[str] = []
    results = run_many(names, dtypes(args.dtype), out_dir=args.out, thresholds=load_thresholds(args),
                       progress=progress(args),
                       on_error=lambda n, d, e: errors.append(f"{n} {d}: crashed: {type(e).__name__}: {e}"))
    device = baseline.mlx_device()
    saved, failed = [], list(errors)
    for result in results:
        try:
            saved.append(baseline.save(result.report, args.baselines, device))
        except baseline.BaselineError as err:
            failed.append(str(err))
    print()
    for path in saved:
        print(f"saved {path}")
    for line in failed:
        print(f"NOT saved: {line}", file=sys.stderr)
    return EXIT_FAIL if failed or not saved else EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "baseline", "record per-layer metrics of a known-good run (for `parity gate`)",
            description=(baseline.__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="baseline_command", required=True)
    s = add(actions, common, "save", "run components and write baselines/<component>-<dtype>.json for each passing run")
    s.add_argument("--component", action="extend", nargs="+", metavar="C", help="components (default: all)")
    s.add_argument("--dtype", default="all", choices=DTYPE_CHOICES, help="precision (default all)")
    s.add_argument("--baselines", type=Path, default=baseline.DEFAULT_DIR, help=f"where to write (default {baseline.DEFAULT_DIR})")
    thresholds_option(s)
    s.add_argument("--out", type=Path, default=Path("reports"), help="where the run folders go (default reports/)")
    s.set_defaults(func=save)
