"""Headless Chromium for the browser tests, the screenshots and the page benchmark.

One browser (Playwright driving the system Chromium, never a downloaded build) opens report pages
from ``file:`` URLs. Each check returns the problems it sees (an empty list is a pass), so a test
can assert a clean page and its twin can assert that a page broken on purpose is caught.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Set by CI: a missing browser fails the browser tests instead of skipping them.
REQUIRE_ENV = "PARITY_REQUIRE_BROWSER"
#: A Chromium binary to use instead of the first of CANDIDATES on PATH.
CHROMIUM_ENV = "PARITY_CHROMIUM"
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
#: Without the background-networking flags Chromium keeps calling home, and the closed network refuses it.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
#: Widths the pages are read at: a desktop window, and a phone.
WIDE = {"width": 1280, "height": 900}
NARROW = {"width": 390, "height": 844}
LOCAL_SCHEMES = ("file:", "data:")


def chromium_path() -> str | None:
    return os.environ.get(CHROMIUM_ENV) or next(filter(None, map(shutil.which, CANDIDATES)), None)


def unavailable() -> str | None:
    """Why the browser tests cannot run here (one line saying how to enable them), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser tests need Playwright: make setup (pip install -e '.[test]')"
    if chromium_path() is None:
        return (f"browser tests need Chromium: apt-get install -y chromium (or set {CHROMIUM_ENV}=/path/to/chrome); "
                f"{REQUIRE_ENV}=1 makes this a failure")
    return None


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"


def launch(playwright: Any) -> Any:
    """The system Chromium, headless, with an empty temporary profile (Playwright makes one)."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=FLAGS)


@dataclass
class Visit:
    """An open page and what it did while loading: console errors, uncaught exceptions, requests."""

    page: Any
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def close(self) -> None:
        self.page.context.close()


def visit(browser: Any, path: Path, viewport: dict[str, int] = WIDE) -> Visit:
    """Open ``path`` in a fresh context; anything but file: and data: is recorded and aborted, never fetched."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    seen = Visit(page)
    page.on("console", lambda m: seen.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.errors.append(f"page error: {e}"))
    page.on("request", lambda r: seen.requests.append(r.url))
    context.route(lambda url: not url.startswith(LOCAL_SCHEMES), lambda route: route.abort())
    page.goto(Path(path).resolve().as_uri(), wait_until="load")
    return seen


# --- checks: each returns a list of problems ---------------------------------------------------------

def error_problems(seen: Visit) -> list[str]:
    return list(seen.errors)


def network_problems(seen: Visit) -> list[str]:
    return [f"network request to {url[:120]}" for url in seen.requests if not url.startswith(LOCAL_SCHEMES)]


_PLOTS_JS = """() => Array.from(document.querySelectorAll('img, svg:not(svg svg)')).map(el => {
  const r = el.getBoundingClientRect();
  return {tag: el.tagName.toLowerCase(), alt: el.getAttribute('alt') || '',
          natural: el.tagName === 'IMG' ? [el.naturalWidth, el.naturalHeight] : [r.width, r.height],
          shown: [el.clientWidth, el.clientHeight], folded: !!el.closest('details:not([open])')};
})"""


def plots(seen: Visit) -> list[dict[str, Any]]:
    """Every ``<img>`` and outermost ``<svg>``: decoded size, drawn size (inside its border), and whether a closed <details> hides it."""
    return seen.page.evaluate(_PLOTS_JS)


def plot_problems(seen: Visit) -> list[str]:
    problems = []
    for p in plots(seen):
        if 0 in p["natural"] or (not p["folded"] and 0 in p["shown"]):
            problems.append(f"{p['tag']} {p['alt']!r} has no size (decoded {p['natural']}, drawn {p['shown']})")
    return problems


def banner_problems(seen: Visit, verdict: str, first: str | None) -> list[str]:
    """The verdict banner names the verdict and, when there is one, the first diverging layer (or commit)."""
    banner = seen.page.locator(".banner").first
    if banner.count() == 0:
        return ["no verdict banner"]
    problems = []
    said = banner.locator(".verdict").inner_text().strip()
    if said != verdict:
        problems.append(f"banner says {said!r}, the report says {verdict!r}")
    if first and first not in banner.inner_text():
        problems.append(f"banner does not name the first divergence {first!r}")
    return problems


_IN_VIEW_JS = """(id) => {
  const el = document.getElementById(id);
  if (!el) return null;
  const r = el.getBoundingClientRect();
  return {top: r.top, bottom: r.bottom, height: innerHeight, hash: location.hash};
}"""


def anchor_problems(seen: Visit) -> list[str]:
    """Clicking the banner's first-divergence link lands on its target: it exists and is in view."""
    link = seen.page.locator(".banner a[href^='#']").first
    if link.count() == 0:
        return ["the banner has no first-divergence link"]
    target = link.get_attribute("href")[1:]
    link.click()
    spot = seen.page.evaluate(_IN_VIEW_JS, target)
    if spot is None:
        return [f"the first-divergence link points at #{target}, which does not exist"]
    problems = []
    if spot["hash"] != f"#{target}":
        problems.append(f"after the click the page is at {spot['hash']!r}, not #{target}")
    if not (-1 <= spot["top"] < spot["height"] and spot["bottom"] > 0):  # scrolling lands on fractions of a pixel
        problems.append(f"#{target} is not in view after the click (top {spot['top']:.0f} of {spot['height']})")
    return problems


_COLUMN_JS = """([table, col]) => {
  const t = document.getElementById(table);
  return Array.from(t.tBodies[0].rows).map(r => [r.id || r.cells[0].textContent,
      r.cells[col].getAttribute('data-sort')]);
}"""


def _sorted(keys: list[float], descending: bool) -> bool:
    present = [k for k in keys if k == k]  # NaN (missing) sorts last in both directions
    if keys[:len(present)] != present:
        return False
    return present == sorted(present, reverse=descending)


def sort_problems(seen: Visit, table: str, label: str) -> list[str]:
    """Clicking column ``label`` of table ``#table`` sorts its rows ascending, a second click descending."""
    head = seen.page.locator(f"#{table} thead th", has_text=label).first
    if head.count() == 0:
        return [f"table #{table} has no column {label!r}"]
    col = head.evaluate("th => th.cellIndex")

    def rows() -> tuple[list[str], list[float]]:
        pairs = seen.page.evaluate(_COLUMN_JS, [table, col])
        return [p[0] for p in pairs], [float(p[1]) if p[1] not in (None, "") else float("nan") for p in pairs]

    before, _ = rows()
    problems = []
    for descending in (False, True):
        head.click()
        order, keys = rows()
        way = "descending" if descending else "ascending"
        if not _sorted(keys, descending):
            problems.append(f"after clicking {label!r} the rows are not {way}: {keys[:8]}")
        if order == before and not descending:
            problems.append(f"clicking {label!r} did not reorder the rows")
    return problems


_FITS_JS = """(selector) => {
  const el = document.querySelector(selector);
  if (!el) return null;
  const width = document.documentElement.clientWidth;
  const boxes = [el, ...el.querySelectorAll('*')].map(e => e.getBoundingClientRect());
  return {left: Math.min(...boxes.map(b => b.left)), right: Math.max(...boxes.map(b => b.right)),
          top: el.getBoundingClientRect().top, width: width, height: innerHeight,
          overflow: el.scrollWidth - el.clientWidth};
}"""


def fit_problems(seen: Visit, selectors: list[str]) -> list[str]:
    """Each element and everything in it lies inside the viewport's width, and starts on the first screen."""
    problems = []
    for selector in selectors:
        box = seen.page.evaluate(_FITS_JS, selector)
        if box is None:
            problems.append(f"no {selector}")
        elif box["left"] < 0 or box["right"] > box["width"] + 0.5 or box["overflow"] > 0:
            problems.append(f"{selector} spans x {box['left']:.0f}..{box['right']:.0f} "
                            f"(overflows by {box['overflow']}) in a {box['width']} px wide window")
        elif box["top"] >= box["height"]:
            problems.append(f"{selector} starts below the first screen (y {box['top']:.0f})")
    return problems
