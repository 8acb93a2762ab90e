"""The HTML pages in a real browser (headless Chromium), as a person reads them after a red gate or a bisect.

The pages are generated here: a passing run, a bf16 run with precision budgets, a fault-injection
run (a wrong frequency base, a NaN, a tap the port forgot), a synthetic report holding every
section kind, a real bisection of the demo repository (``test_bisect.make_demo_repo``), and the
index of them all. Every check has a twin that breaks a page on purpose and shows the check fails.

Needs Playwright and Chromium; without them the module skips with one line saying how to enable
it, unless ``PARITY_REQUIRE_BROWSER=1`` (CI), where that is a failure. One browser per session.
The run also writes screenshots (``PARITY_SCREENSHOTS=DIR`` writes them there: ``make screenshots``).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import chromium
from parity import commands as cli
from parity import html_report, thresholds
from parity.capture import Capture
from parity.compare import compare
from parity.dumps import mark_complete, new_run_dir
from parity.report import build_report, write_report_dir
from parity.runner import run_component
from parity.vocab import load_json
from test_bisect import make_demo_repo
from test_browser_screenshots import MAX_BYTES, SCREENSHOTS, template_hash
from test_html_report import make_report

REASON = chromium.unavailable()
if REASON and not chromium.required():
    pytest.skip(REASON, allow_module_level=True)

REPORT_PAGES = ("pass", "bf16", "fail", "sections", "long")
#: A diffusers-style module path as long as real ones get: the banner must still fit a phone.
LONG_NAME = "transformer.transformer_blocks.39.attn1.processor.to_out.0"
PAGES = ("index", *REPORT_PAGES, "bisect")
SHOT_WIDTH = 1480  # the pages' widest layout: no table is cut


@pytest.fixture(scope="session")
def browser():
    if REASON:
        pytest.fail(REASON)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = chromium.launch(playwright)
        yield browser
        browser.close()


# --- the pages -------------------------------------------------------------------------------------

@contextmanager
def faulty_port():
    """A broken MLX rope: frequency bases 1e-4 too large, a NaN in ``wan/k_rot``, no ``wan/table_sin`` tap."""
    import mlx.core as mx

    from mlx_impl import rope, taps

    real_base, real_recorder = rope.helios_freqs_base, taps.recorder

    @contextmanager
    def recorder(callback):
        def record(name, x):
            if name == "wan/table_sin":
                return
            if name == "wan/k_rot":
                x = np.array(x)
                x.flat[5] = np.nan
                x = mx.array(x)
            callback(name, x)

        with real_recorder(record):
            yield

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rope, "helios_freqs_base", lambda dim, theta: real_base(dim, theta) * (1 + 1e-4))
        patch.setattr(taps, "recorder", recorder)
        yield


def long_name_report(root: Path) -> Path:
    """A failing float32 report whose first diverging layer is ``LONG_NAME``."""
    rng = np.random.default_rng(0)
    ref, ours = Capture("ref"), Capture("mlx")
    for name in ("transformer.patch_embedding", LONG_NAME, "transformer.proj_out"):
        x = rng.standard_normal((4, 8)).astype(np.float32)
        ref.add(name, x)
        ours.add(name, x + 0.1 if name == LONG_NAME else x)
    report = build_report(compare("long_names", "float32", ref, ours, thresholds.load()),
                          {"config": {}, "seed": 0, "versions": {}, "git_commit": None})
    run_dir = new_run_dir(root)
    report["run_id"] = run_dir.name
    write_report_dir(run_dir / "long_names-float32", report, {"ref": ref, "mlx": ours})
    mark_complete(run_dir)
    return run_dir / "long_names-float32"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A reports folder with one run per page kind and a bisection, rendered as ``make parity`` does."""
    tmp = tmp_path_factory.mktemp("site")
    root = tmp / "reports"
    report_dirs = {"pass": run_component("rope", "float32", out_dir=root).report_dir,
                   "bf16": run_component("rope", "bfloat16", out_dir=root).report_dir}
    with faulty_port():
        report_dirs["fail"] = run_component("rope", "float32", out_dir=root).report_dir
    report_dirs["sections"] = make_report(root, "bfloat16", run_id="20250101-000000-aaaaaa")
    report_dirs["long"] = long_name_report(root)

    repo = tmp / "port"
    shas = make_demo_repo(repo)  # c4 good, c5 the bf16 residual add, c6 bad: three runs
    assert cli.main(["bisect", "--good", shas["c4"], "--bad", "main", "--component", "tiny", "--dtype", "bfloat16",
                     "--repo", str(repo), "--out", str(root / "bisect-demo")]) == 0

    html_report.write_html_reports(root, index_link=True)
    html_report.write_index(root)
    pages = {}
    for name, report_dir in report_dirs.items():
        report = load_json(report_dir / "report.json")
        pages[name] = {"path": report_dir / "report.html", "verdict": report["verdict"],
                       "first": report["first_divergence"]}
    pages["bisect"] = {"path": root / "bisect-demo" / "bisect.html", "verdict": "First bad commit",
                       "first": shas["c5"][:12]}
    pages["index"] = {"path": root / "index.html", "verdict": None, "first": None}
    return pages


@pytest.fixture
def open_page(browser):
    """``open_page(path, viewport=WIDE)``: a Visit, closed after the test."""
    opened = []

    def open_(path, viewport=chromium.WIDE):
        opened.append(chromium.visit(browser, path, viewport))
        return opened[-1]

    yield open_
    for seen in opened:
        seen.close()


def broken_copy(page: Path, tmp_path: Path, pattern: str, replacement: str, count: int = 1) -> Path:
    """A copy of ``page`` beside it with ``pattern`` (a regex that must match) replaced: a page broken on purpose."""
    html, n = re.subn(pattern, replacement, page.read_text(), count=count)
    assert n, f"{pattern!r} not in {page}: the twin would break nothing"
    copy = page.with_name(f"broken-{tmp_path.name}.html")
    copy.write_text(html)
    return copy


# --- every page: loads clean, plots drawn, no network --------------------------------------------

@pytest.mark.parametrize("name", PAGES)
def test_page_loads_without_errors_or_network(site, open_page, name):
    seen = open_page(site[name]["path"])
    assert chromium.error_problems(seen) == []
    assert chromium.network_problems(seen) == []
    assert chromium.plot_problems(seen) == []


def test_the_fixture_pages_are_what_they_claim(site):
    assert site["pass"]["verdict"] == "PASS" and site["bf16"]["verdict"] == "PASS"
    assert site["fail"]["verdict"] == "FAIL" and site["fail"]["first"] == "helios/freqs_t"
    assert site["long"]["verdict"] == "FAIL" and site["long"]["first"] == LONG_NAME
    fail = load_json(site["fail"]["path"].with_name("report.json"))
    verdicts = {row["layer"]: (row["verdict"], row.get("nan_mlx"), row.get("reasons")) for row in fail["layers"]}
    assert verdicts["wan/k_rot"][:2] == ("FAIL", 1) and "missing" in str(verdicts["wan/table_sin"][2]).lower()
    bf16 = load_json(site["bf16"]["path"].with_name("report.json"))
    assert all(row.get("budget_ratio") is not None for row in bf16["layers"])


def test_report_pages_show_their_plots(site, open_page):
    for name in REPORT_PAGES:
        alts = [p["alt"] for p in chromium.plots(open_page(site[name]["path"]))]
        assert "errors and cosine per layer" in alts, name
    assert len(chromium.plots(open_page(site["bisect"]["path"]))) >= 2  # metric trends


def test_every_section_kind_is_drawn(site, open_page):
    """Each kind ``render_section`` knows is in the sections page and drawn (a new kind must be added there)."""
    known = set(re.findall(r'kind == "(\w+)"', inspect.getsource(html_report.render_section)))
    report = load_json(site["sections"]["path"].with_name("report.json"))
    assert known <= {s["kind"] for s in report["sections"]}, "add a section of the new kind to make_report"
    seen = open_page(site["sections"]["path"])
    for section in report["sections"]:
        if section["kind"] not in known or section["title"] == "A malformed section":
            continue
        heading = seen.page.locator("h3", has_text=section["title"][:20]).first
        drawn = heading.evaluate("""h => { let n = h.nextElementSibling, found = [];
            while (n && n.tagName !== 'H3' && n.tagName !== 'H2') { found.push(n.tagName,
                ...Array.from(n.querySelectorAll('img, svg, table')).map(e => e.tagName)); n = n.nextElementSibling; }
            return found; }""")
        assert {"IMG", "SVG", "TABLE"} & set(drawn), f"section {section['title']!r} ({section['kind']}) drew nothing"


# --- the banner, its link, sorting, a phone ----------------------------------------------------------

@pytest.mark.parametrize("name", [*REPORT_PAGES, "bisect"])
def test_banner_names_verdict_and_first_divergence(site, open_page, name):
    page = site[name]
    assert chromium.banner_problems(open_page(page["path"]), page["verdict"], page["first"]) == []


@pytest.mark.parametrize("name", ["fail", "sections", "long", "bisect"])
def test_first_divergence_link_lands_on_its_row(site, open_page, name):
    assert chromium.anchor_problems(open_page(site[name]["path"])) == []


@pytest.mark.parametrize("name, table, label", [
    ("fail", "layers", "max abs"), ("bf16", "layers", "budget ratio"), ("sections", "layers", "RMSE"),
    ("index", "runs", "worst cosine"), ("bisect", "commits", "tested")])
def test_sorting_a_column_reorders_the_rows(site, open_page, name, table, label):
    assert chromium.sort_problems(open_page(site[name]["path"]), table, label) == []


@pytest.mark.parametrize("name", ["fail", "sections", "long", "bisect"])
def test_banner_fits_a_phone(site, open_page, name):
    seen = open_page(site[name]["path"], chromium.NARROW)
    assert chromium.fit_problems(seen, [".banner", ".banner .detail"]) == []


# --- twins: each check fails on a page broken on purpose ----------------------------------------------

def test_twin_script_error_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r"</main>", "</main><script>null.x = 1;</script>")
    assert chromium.error_problems(open_page(page))


def test_twin_external_url_is_caught(site, open_page, tmp_path):
    """An external image: the page's CSP refuses it (a console error); without the CSP it is a request (aborted)."""
    img = '<img class="plot" alt="remote" src="http://example.invalid/plot.png">'
    page = broken_copy(site["fail"]["path"], tmp_path, r"<h2>Layers</h2>", img + "<h2>Layers</h2>")
    assert any("Content Security Policy" in p for p in chromium.error_problems(open_page(page)))
    page = broken_copy(page, tmp_path, r'<meta http-equiv="Content-Security-Policy"[^>]*>', "")
    assert chromium.network_problems(open_page(page)) == ["network request to http://example.invalid/plot.png"]


def test_twin_broken_plot_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r'src="data:image/png;base64,[^"]{64}', 'src="data:image/png;base64,AAAA')
    assert any("errors and cosine per layer" in p for p in chromium.plot_problems(open_page(page)))


def test_twin_hidden_plot_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r'<img class="plot"', '<img style="width:0" class="plot"')
    assert chromium.plot_problems(open_page(page))


def test_twin_banner_without_first_divergence_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r'<div class="detail">First divergence:.*?</div>', "")
    problems = chromium.banner_problems(open_page(page), "FAIL", site["fail"]["first"])
    assert problems == ["banner does not name the first divergence 'helios/freqs_t'"]
    assert chromium.banner_problems(open_page(site["fail"]["path"]), "PASS", None)  # wrong verdict


def test_twin_missing_anchor_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r' id="layer-1"', "")
    assert chromium.anchor_problems(open_page(page)) == [
        "the first-divergence link points at #layer-1, which does not exist"]


def test_twin_anchor_out_of_view_is_caught(site, open_page, tmp_path):
    """A target that exists but is not where the click scrolls to (fixed to the top, while the page scrolls away)."""
    page = broken_copy(site["fail"]["path"], tmp_path, r"</main>",
                       '</main><style>#layer-1 { position: fixed; top: -200px; }</style>')
    assert chromium.anchor_problems(open_page(page))


def test_twin_broken_sorter_is_caught(site, open_page, tmp_path):
    page = broken_copy(site["fail"]["path"], tmp_path, r"rows\.sort\(", "rows.slice(")
    assert "clicking 'max abs' did not reorder the rows" in chromium.sort_problems(open_page(page), "layers", "max abs")


def test_twin_banner_that_does_not_wrap_is_caught(site, open_page, tmp_path):
    """Without the banner's ``overflow-wrap`` a long layer name pushes it past a phone's width."""
    page = broken_copy(site["long"]["path"], tmp_path, r"(\.banner \{[^}]*?) overflow-wrap: anywhere;", r"\1")
    assert chromium.fit_problems(open_page(page, chromium.NARROW), [".banner .detail"])


# --- screenshots -----------------------------------------------------------------------------------------

def test_screenshots(site, browser, tmp_path):
    """The README's pictures: a failing page (banner, error over depth, per-layer table) and a bisect page.

    Written to this test's tmp folder, or to ``PARITY_SCREENSHOTS`` (``make screenshots``: docs/screenshots),
    with the hash of the templates each shows.
    """
    from PIL import Image

    out = Path(os.environ.get("PARITY_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    record = {}
    for shot in SCREENSHOTS:
        seen = chromium.visit(browser, site[shot["page"]]["path"], {"width": SHOT_WIDTH, "height": 900})
        try:
            bottom = seen.page.locator(shot["until"]).first.evaluate("e => e.getBoundingClientRect().bottom + scrollY")
            png = out / shot["file"]
            seen.page.screenshot(path=str(png), full_page=True,
                                 clip={"x": 0, "y": 0, "width": SHOT_WIDTH, "height": math.ceil(bottom) + 12})
        finally:
            seen.close()
        Image.open(png).convert("RGB").quantize(colors=128).save(png, optimize=True)  # 128 colours: a fraction of the bytes
        assert png.stat().st_size < MAX_BYTES
        record[shot["file"]] = template_hash(shot["template"])
    (out / "templates.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def test_video_page_of_the_pipelines_frames(browser, tmp_path):
    """``parity video`` on the frames ``helios_pipeline`` writes (the reference's and ours, 3 chunks of 5
    frames): the page loads without errors or requests, draws every plot, lists both seams, and shoots."""
    run_dir = run_component("helios_pipeline", "float32", out_dir=tmp_path, analyses=False).report_dir
    out = tmp_path / "video"
    frames = [str(run_dir / side / "video.npy") for side in ("ref", "mlx")]
    assert cli.main(["video", *frames, "--chunk-frames", "5", "--out", str(out), "--quiet"]) == 0
    seen = chromium.visit(browser, out / "video.html")
    try:
        problems = chromium.error_problems(seen) + chromium.network_problems(seen) + chromium.plot_problems(seen)
        assert not problems, problems
        assert len(chromium.plots(seen)) >= 3  # per-frame curves, filmstrip, seams
        text = seen.page.inner_text("body")
        assert "4 → 5" in text and "9 → 10" in text  # the seams table: the frames either side of each seam
        shot = tmp_path / "video.png"
        seen.page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    finally:
        seen.close()
