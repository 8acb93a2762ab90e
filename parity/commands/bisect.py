"""``parity bisect``: the first commit that broke parity, or (``--find-fix``) that fixed it (see :mod:`parity.bisect`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from parity import bisect
from parity.commands import add
from parity.vocab import DTYPE_CHOICES, EXIT_PASS, EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    check = bisect.Check(tuple(args.component or ()), args.dtype, args.python or sys.executable, args.timeout,
                         args.on_crash, tuple(str(p) for p in args.component_module),
                         str(args.thresholds) if args.thresholds else None)
    say = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = bisect.bisect(args.repo, args.good, args.bad, check, args.out, args.keep_dumps,
                           bisect.FIX if args.find_fix else bisect.REGRESSION, progress=say)
    print(result["message"])
    if result["status"] == "found":
        info = result["first_changed"]
        print(f"{info['commit']}\n  {info['subject']}\n{info['diffstat']}")
    return EXIT_PASS if result["status"] == "found" else EXIT_USAGE


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "bisect", "find the first commit that broke parity (or --find-fix: fixed it)",
            description=(bisect.__doc__ or "").replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="Exit codes: 0 the commit was found, 2 usage error or no single commit found, 130 interrupted. "
                   "--component-module and --thresholds, when relative, are taken inside each tested revision.")
    p.add_argument("--good", required=True, help="a revision that passes (e.g. a tag or sha)")
    p.add_argument("--bad", required=True, help="a revision that fails (e.g. HEAD)")
    p.add_argument("--find-fix", action="store_true",
                   help="--bad is the older end: find the first commit that passes (a fix)")
    p.add_argument("--component", action="extend", nargs="+", metavar="C", help="components to check (default: all)")
    p.add_argument("--dtype", default="all", choices=DTYPE_CHOICES, help="precision to check in (default all)")
    p.add_argument("--thresholds", type=Path, metavar="FILE", help="thresholds file for each tested revision")
    p.add_argument("--repo", type=Path, default=Path("."), help="the git repository (default: the current folder)")
    p.add_argument("--out", type=Path, help="where bisect.html, bisect.json and the runs go (default reports/bisect-<time>)")
    p.add_argument("--python", help="interpreter to run each revision with (default: this one)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds one revision may take before it counts as untestable (default 3600)")
    p.add_argument("--keep-dumps", action="store_true",
                   help="keep the .npy dumps of every tested commit (default: only the two either side of the change)")
    p.add_argument("--on-crash", choices=[bisect.BAD, bisect.SKIP], default=bisect.BAD,
                   help="how to count a revision whose check fails without writing a report (default bad)")
    p.set_defaults(func=run, worktree_component_modules=True)
