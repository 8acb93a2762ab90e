"""``parity clean``: retention for the reports folder (keep the newest runs, drop the rest)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from parity import html_report
from parity.commands import add, non_negative_int
from parity.vocab import EXIT_PASS, InputError


def run(args: argparse.Namespace) -> int:
    root: Path = args.path
    if not root.is_dir():
        raise InputError(f"{root}: not a reports folder")
    runs = html_report.run_dirs(root)
    doomed = runs[args.keep:]
    for run_dir in doomed:
        print(f"{'would remove' if args.dry_run else 'removing'} {run_dir}")
        if not args.dry_run:
            shutil.rmtree(run_dir)
    if doomed and not args.dry_run and (root / html_report.INDEX_NAME).is_file():
        html_report.write_index(root)
    print(f"{len(runs) - len(doomed)} run(s) kept, {len(doomed)} {'to remove' if args.dry_run else 'removed'}")
    return EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "clean", "delete all but the newest run folders of a reports folder",
            description="Retention: keep the newest N run folders (finished or incomplete) of PATH and delete the "
                        "others; bisection folders are left alone. `parity run --keep-tensors failing` keeps a run's "
                        ".npy dumps for failing layers only.")
    p.add_argument("path", type=Path, nargs="?", default=Path("reports"), help="the reports folder (default reports/)")
    p.add_argument("--keep", type=non_negative_int, required=True, metavar="N", help="how many of the newest runs to keep")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=run)
