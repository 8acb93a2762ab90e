"""``parity mutate``: the kill rate of small numerical mutations of a component's MLX source (see :mod:`parity.mutate`)."""
from __future__ import annotations

import argparse
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity import mutate, registry
from parity.commands import add, load_thresholds, non_negative_int, positive_int, progress, thresholds_option
from parity.dumps import writable_folder
from parity.mutate_ops import OPERATORS
from parity.vocab import DTYPE_CHOICES, EXIT_FAIL, EXIT_INTERRUPTED, EXIT_PASS, UsageError, dtypes


DESCRIPTION = """\
Apply small numerical mutations to the MLX source of each COMPONENT, one at a time, and run the
comparison on each mutant: the share of mutants it catches is its detection power.

Each mutant makes the runs a gate makes: each dtype, the float32 one with a second call of the
same model object (call2/ layers), and each coverage cell in float32 (--no-coverage: none). The
reference runs once per run (a reference bundle); the MLX side is judged as `parity run` judges
it (calibrated limits where calibration/ holds a calibration of the component, dtype and config).
The unmutated MLX side must pass (run twice: traced, to find the source files and the lines that
run, and to prove the run is bit-reproducible). Each mutant runs in a fresh process with the mutated copy shadowing the
original file (your files are never written), --jobs at a time, each for at most --timeout.

A mutant is killed (a run fails; the report gives the first divergence and whether it is the
first layer the mutant changed), survived (its MLX outputs changed, every run passes),
equivalent (every captured MLX tensor bit-identical to the unmutated runs') or crashed (an
exception or a timeout before any layer failed). Kill rate = killed / (killed + survived).
Writes <out>/<component>/mutations.json (kept up to date while running) and mutations.html.
"""


def max_mutants(text: str) -> int | None:
    return None if text == "all" else non_negative_int(text)


def rate(text: str) -> float:
    """A kill rate: 0.9 or 90%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rate such as 0.9 or 90%, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a rate between 0 and 1 (0% and 100%), got {text!r}")
    return value


def seconds(text: str) -> float:
    """A duration: seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    args.components = registry.select(args.components)
    if (args.config or args.source) and len(args.components) != 1:
        raise UsageError("--config/--source apply to one component; name exactly one")
    limits = load_thresholds(args)  # checked here; the workers read the same files
    options = mutate.Options(dtypes=dtypes(args.dtype), coverage=not args.no_coverage, seed=args.seed,
                             config_path=args.config,
                             sources=args.source or (), operators=args.operator, max_mutants=args.max_mutants,
                             timeout=args.timeout, jobs=args.jobs,
                             thresholds=list(limits.paths),
                             component_modules=args.component_module)
    mutate.check(args.components, options)
    out = args.out or Path("reports") / ("mutate-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    writable_folder(out, "--out")
    for name in args.components:
        if (out / name / "mutations.json").exists():
            raise UsageError(f"--out {out}: already holds {name}/mutations.json; results are never overwritten")
    results, failing = [], []
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it as Ctrl-C does
    try:
        for name in args.components:
            try:
                results.append(mutate.mutate_component(name, out, options, progress(args)))
            except mutate.BaselineFails as err:
                print(f"parity: error: {err}", file=sys.stderr)
                failing.append(name)
    except KeyboardInterrupt:
        print(f"parity: interrupted; the finished mutants are in {out}/*/mutations.json and .html (marked interrupted)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, terminate)
    print()
    below = []
    for result in results:
        for line in mutate.summary_lines(result):
            print(line)
        print(f"  {out / result['component'] / 'mutations.json'}, {out / result['component'] / 'mutations.html'}")
        if args.min_kill_rate is not None and (result["kill_rate"] or 0.0) < args.min_kill_rate:
            below.append(result["component"])
    if below:
        print(f"kill rate below --min-kill-rate {args.min_kill_rate:g}: {', '.join(below)}", file=sys.stderr)
    if failing:
        print(f"no mutation score (the unmutated component fails): {', '.join(failing)}", file=sys.stderr)
    return EXIT_FAIL if below or failing else EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    operators = "\n".join(f"  {name:<19} {text}" for name, (text, _) in OPERATORS.items())
    p = add(sub, common, "mutate", "measure detection power: the kill rate of small numerical mutations of the MLX source",
            description=DESCRIPTION + "\noperators:\n" + operators,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="exit codes: 0 the run completed (1 with --min-kill-rate when a kill rate is lower, or when the "
                   "unmutated component fails), 2 usage or input error, 3 internal error, 130 interrupted "
                   "(finished mutants are kept)")
    p.add_argument("components", nargs="+", metavar="COMPONENT", help="components to mutate, or 'all'")
    p.add_argument("--dtype", default="all", choices=DTYPE_CHOICES, help="precision(s) each mutant runs in (default all)")
    p.add_argument("--no-coverage", action="store_true",
                   help="leave out the component's coverage cells (float32 runs of other configs)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--config", type=Path, help="a component config (one component)")
    p.add_argument("--source", action="append", type=Path, metavar="FILE",
                   help="mutate this file (repeatable; default: the component's mutate_sources, else the project "
                        "files its MLX side runs)")
    p.add_argument("--operator", action="append", choices=list(OPERATORS), metavar="NAME",
                   help="only this operator (repeatable; default all, listed above)")
    p.add_argument("--max-mutants", type=max_mutants, default=mutate.DEFAULT_MAX_MUTANTS, metavar="N|all",
                   help=f"run at most N mutants, chosen deterministically (operators take turns, picks spread over the "
                        f"source); 0 runs only the baseline (default {mutate.DEFAULT_MAX_MUTANTS})")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help=f"per mutant (default {mutate.TIMEOUT_FACTOR}x the unmutated run, at least "
                        f"{mutate.MIN_TIMEOUT:g} s); a timeout counts as crashed")
    p.add_argument("--jobs", type=positive_int, metavar="N", help="mutants run at once (default: the available cores)")
    p.add_argument("--min-kill-rate", type=rate, metavar="X", help="exit 1 when a component's kill rate is below X "
                                                                    "(0.9 or 90%%)")
    p.add_argument("--out", type=Path, help="where <component>/mutations.json and .html go "
                                            "(default reports/mutate-<time>)")
    thresholds_option(p)
    p.set_defaults(func=run)
