"""``parity attention REPORT_DIR``: the per-head attention table of a finished run."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import attention_report, html_report
from parity.commands import add
from parity.report import load_report
from parity.vocab import EXIT_PASS, InputError


def run(args: argparse.Namespace) -> int:
    report_dirs = html_report.find_report_dirs(args.path)
    if not report_dirs:
        raise InputError(f"no report.json under {args.path}")
    found = []
    for report_dir in report_dirs:
        report = load_report(report_dir)
        rows = attention_report.map_rows(report)
        if rows:
            found.append((report_dir, report, rows))
    if not found:
        raise InputError(f"{args.path}: {attention_report.NO_MAPS}")
    for i, (report_dir, report, rows) in enumerate(found):
        title = f"{report.get('variant') or report.get('component')} {report.get('dtype')}: {report.get('verdict')}"
        print(("\n" if i else "") + f"{title} ({report_dir})")
        print(attention_report.text_table(rows, failing_only=args.failing))
    return EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "attention", "print the per-head attention table of a finished run",
            description="Per attention map layer and head: JS divergence (mean, worst query row), top-k overlap, "
                        "entropy, share of keys holding 90% of the mass, sink key and mass per key group on both "
                        "sides, mass dropped, and the limits each head broke. REPORT_DIR: a component report folder "
                        "or a run folder.")
    p.add_argument("path", type=Path, metavar="REPORT_DIR", help="a component report folder (holding report.json) or a run folder")
    p.add_argument("--failing", action="store_true", help="only heads that break a limit")
    p.set_defaults(func=run)

