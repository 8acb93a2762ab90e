"""``parity gate``: the CI check (see :mod:`parity.gate`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import baseline, gate
from parity.commands import add, html_option, load_thresholds, positive_int, progress, thresholds_option, write_html
from parity.dumps import writable_file, writable_folder
from parity.vocab import DTYPE_CHOICES, dtypes


def run(args: argparse.Namespace) -> int:
    writable_folder(args.out, "--out")
    if args.junit:
        writable_file(args.junit, "--junit")
    result = gate.run_gate(args.component, dtypes(args.dtype), load_thresholds(args), args.baselines, args.junit,
                           args.out, args.require_baselines, max_rows=args.max_rows, progress=progress(args),
                           coverage=not args.no_coverage)
    write_html(args, result.run_dir)
    return result.exit_code


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "gate", "CI check: run components, judge against thresholds and baselines, write JUnit",
            description=(gate.__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--component", action="extend", nargs="+", metavar="C", help="components to gate (default: all registered)")
    p.add_argument("--dtype", default="all", choices=DTYPE_CHOICES, help="precision (default all)")
    thresholds_option(p)
    p.add_argument("--baselines", type=Path, default=baseline.DEFAULT_DIR, help=f"baseline folder (default {baseline.DEFAULT_DIR})")
    p.add_argument("--require-baselines", action="store_true",
                   help="a component without a usable baseline is an error (exit 2) instead of a note")
    p.add_argument("--junit", type=Path, help="write JUnit XML here")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run folders go (default reports/)")
    p.add_argument("--max-rows", type=positive_int, default=gate.MAX_ROWS,
                   help=f"failed checks shown per component run (default {gate.MAX_ROWS})")
    p.add_argument("--no-coverage", action="store_true",
                   help="skip the components' coverage cells (config variants run in float32)")
    html_option(p)
    p.set_defaults(func=run)
