"""``parity explain``: which known porting mistake would explain a run's divergence (advice; see :mod:`parity.explain`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from parity.commands import add
from parity.vocab import EXIT_FAIL, EXIT_PASS, InputError, strict_json

EPILOG = ("exit codes: 0 every divergence asked about is explained by a known mistake, or there is none; 1 a "
          "divergence no known mistake explains; 2 usage or input error; 3 internal error (a bug: please report "
          "it with the traceback), 130 interrupted. Explaining changes no verdict and no stored tensor.")


def _print(report_dir: Path, explanation: dict[str, Any], report: dict[str, Any]) -> None:
    name = report.get("variant") or report.get("component")
    print(f"[{name} {report.get('dtype')}] {report.get('verdict')}, first divergence: "
          f"{report.get('first_divergence') or 'none'}  ({report_dir})")
    if not explanation["layers"]:
        print("  nothing to explain")
    for entry in explanation["layers"]:
        print(f"  {entry['summary']}")
        for hypothesis in entry["hypotheses"][1:]:
            print(f"    also: {hypothesis['line']}")
        for note in [*entry["notes"], *(f"{s['name']} raised and was skipped: {s['error']}" for s in entry["skipped"])]:
            print(f"    note: {note}")
    for note in explanation.get("notes") or []:
        print(f"  note: {note}")


def run(args: argparse.Namespace) -> int:
    from parity.explain.run import ADVICE, explain_folder
    from parity.html_report import find_report_dirs
    from parity.report import load_report
    from parity.runner import rebuild, run_reference

    dirs = find_report_dirs(args.path)
    if not dirs:
        raise InputError(f"{args.path}: no report.json in it, or in its sub-folders")
    if args.layer and len(dirs) > 1:
        raise InputError(f"--layer names a layer of one report; {args.path} holds {len(dirs)}: give a report folder")
    unexplained, found = False, []
    for report_dir in dirs:
        explanation = explain_folder(report_dir, args.layer, args.all, *(() if args.no_rerun else (rebuild, run_reference)))
        unexplained |= any(not e["explained"] and e["verdict"] != "PASS" for e in explanation["layers"])
        found.append(explanation)
        if not args.json:
            _print(report_dir, explanation, load_report(report_dir))
    if args.json:
        print(json.dumps(strict_json(found if len(found) > 1 else found[0])[0], indent=2, allow_nan=False))
    else:
        print(f"({ADVICE})")
    return EXIT_FAIL if unexplained else EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "explain", "name the likely porting mistake at a run's divergence (advice)",
            description="Test the catalog of known porting mistakes (README: parity explain) on the first diverging "
                        "layer of each report under PATH: on the dumped tensors, and by re-running the reference "
                        "sublayer on the port's own inputs with one change. Prints each mistake that explains the "
                        "divergence, ranked, with the error before and after.", epilog=EPILOG)
    p.add_argument("path", type=Path, metavar="RUN_DIR", help="a component report folder, a run folder, or a reports folder")
    p.add_argument("--layer", action="append", default=[], metavar="NAME",
                   help="explain this layer instead of the first divergence (repeatable)")
    p.add_argument("--all", action="store_true", help="explain every failing layer")
    p.add_argument("--no-rerun", action="store_true",
                   help="tensor hypotheses only: do not rebuild and re-run the reference")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.set_defaults(func=run)
