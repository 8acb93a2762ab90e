"""``parity report``: render report.html for finished runs, and the reports index."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import html_report
from parity.commands import add
from parity.vocab import EXIT_PASS


def _reports_root(path: Path, report_dirs: list[Path]) -> Path:
    if (path / "report.json").is_file():
        return path.parent.parent
    if report_dirs and all(d.parent == path for d in report_dirs):
        return path.parent
    return path


def run(args: argparse.Namespace) -> int:
    path: Path = args.path.resolve()  # "." has no parent to find the reports folder by
    if args.latest:
        target, root = html_report.latest_run(path), path
    else:
        target, root = path, _reports_root(path, html_report.find_report_dirs(path))
    whole_folder = not args.latest and target == root and not (root / "report.json").is_file()
    written = html_report.write_html_reports(target, stale_only=whole_folder and not args.force,
                                             index_link=None if args.no_index else True)
    for page in written:
        print(page)
    if not args.no_index:
        print(html_report.write_index(root))
    incomplete = [d for d in html_report.run_dirs(root) if html_report.incomplete_reason(d)]
    for run_dir in incomplete:
        print(f"incomplete run: {run_dir} ({html_report.incomplete_reason(run_dir)})")
    return EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "report", "write self-contained HTML reports and the reports index",
            description="Write report.html next to each report.json under PATH (a component report folder, a run "
                        "folder, or a reports folder) and index.html in the reports folder; list incomplete runs.")
    p.add_argument("path", type=Path, help="a report folder, a run folder, or a reports folder (e.g. reports/)")
    p.add_argument("--latest", action="store_true", help="PATH is a reports folder: only render its newest finished run")
    p.add_argument("--force", action="store_true", help="with a whole reports folder, re-render pages that look up to date")
    p.add_argument("--no-index", action="store_true", help="do not write the reports folder's index.html")
    p.set_defaults(func=run)
