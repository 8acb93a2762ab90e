"""How soon a 1,000-layer report page is usable in headless Chromium. A measurement, not a test.

    python bench/browser_bench.py [--layers 1000] [--repeat 5]

Builds a float32 report of ``--layers`` layers with the real compare / report / dump code (small
tensors; the last 40 % of the layers fail, one holds a NaN), renders its ``report.html``, then
opens it ``--repeat`` times, each in a fresh browser context, and measures in the page:

- HTML parsed: navigation start to the DOM built (``domInteractive``);
- load: navigation start to the end of the load event (sorter attached, plots decoded, first layout);
- sort: one click on the "max abs" header of the 1,000-row table, the handler plus the layout it forces;
- interactive: load + sort (goal: under 2 s).

Prints one Markdown table (medians, and the slowest run). Uses the browser tests' launcher
(``tests/chromium.py``: the system Chromium driven by Playwright).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import chromium  # noqa: E402
from parity import html_report, thresholds  # noqa: E402
from parity.capture import Capture  # noqa: E402
from parity.compare import compare  # noqa: E402
from parity.dumps import mark_complete, new_run_dir  # noqa: E402
from parity.report import build_report, write_report_dir  # noqa: E402

_TIMES_JS = """() => {
  const n = performance.getEntriesByType('navigation')[0];
  const th = Array.from(document.querySelectorAll('#layers thead th')).find(h => h.textContent.startsWith('max abs'));
  const t0 = performance.now();
  th.click();
  void document.body.offsetHeight;
  return {parsed: n.domInteractive, load: n.loadEventEnd || n.loadEventStart, sort: performance.now() - t0,
          rows: document.querySelectorAll('#layers tbody tr').length};
}"""


def deep_report(out: Path, layers: int) -> Path:
    """A report directory of ``layers`` compared layers, the last 40 % failing, one NaN."""
    rng = np.random.default_rng(0)
    ref, ours = Capture("ref"), Capture("mlx")
    for i in range(layers):
        name = f"blocks.{i // 8}/sub{i % 8}"
        x = rng.standard_normal(64).astype(np.float32)
        y = x + (1e-3 * i / layers * rng.standard_normal(64).astype(np.float32) if i >= 0.6 * layers else 0)
        if i == int(0.8 * layers):
            y[3] = np.nan
        ref.add(name, x)
        ours.add(name, y.astype(np.float32))
    report = build_report(compare("deep", "float32", ref, ours, thresholds.load()),
                          {"config": {"layers": layers}, "seed": 0, "versions": {}, "git_commit": None})
    run_dir = new_run_dir(out)
    report["run_id"] = run_dir.name
    write_report_dir(run_dir / "deep-float32", report, {"ref": ref, "mlx": ours})
    mark_complete(run_dir)
    return run_dir / "deep-float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if chromium.unavailable():
        sys.exit(chromium.unavailable())
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        report_dir = deep_report(Path(tmp), args.layers)
        start = time.perf_counter()
        page = html_report.write_html_report(report_dir)
        render = time.perf_counter() - start
        runs = []
        with sync_playwright() as playwright:
            browser = chromium.launch(playwright)
            for _ in range(args.repeat):
                seen = chromium.visit(browser, page)
                runs.append(seen.page.evaluate(_TIMES_JS))
                problems = chromium.error_problems(seen) + chromium.network_problems(seen)
                seen.close()
                if problems or runs[-1]["rows"] != args.layers:
                    sys.exit(f"the page is broken: {problems or runs[-1]}")
            version = browser.version
            browser.close()
        size = page.stat().st_size / 2**20
    for run in runs:
        run["interactive"] = run["load"] + run["sort"]
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.layers}-layer report, {size:.1f} MB of HTML, rendered by `parity report` in {render:.2f} s; "
          f"Chromium {version}, {os.cpu_count()} cores, load average {load_avg:.1f}, {platform.machine()}; "
          f"{args.repeat} page loads\n")
    print("| ms | HTML parsed | load | sort 1,000 rows | interactive (goal < 2000) |\n|---|---|---|---|---|")
    for label, pick in (("median", statistics.median), ("slowest", max)):
        print(f"| {label} | " + " | ".join(f"{pick(r[k] for r in runs):.0f}" for k in ("parsed", "load", "sort", "interactive"))
              + " |")


if __name__ == "__main__":
    main()
