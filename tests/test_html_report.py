"""HTML run reports and the reports index: escaping, NaN, sections by kind, tensor slices, CLI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from parity import html_report, plots, thresholds
from parity import commands as cli
from parity.capture import Capture
from parity.compare import compare
from parity.component import Section
from parity.dumps import mark_complete, new_run_dir, write_json
from parity.report import build_report, write_report_dir
from parity.vocab import load_json

REPO = Path(__file__).resolve().parent.parent
EVIL = "<script>alert(1)</script>"


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 precision (round to nearest even), kept as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


def make_report(out: Path, dtype: str = "bfloat16", run_id: str | None = None, broken: bool = True) -> Path:
    """A realistic report directory built with the real compare/report/dump code, no model needed.

    ``broken``: a video tensor with a localised error, a NaN on the MLX side, a layer named like
    an XSS payload, and sections of every kind (one malformed).
    """
    rng = np.random.default_rng(0)
    truth, ref, ours = Capture("truth"), Capture("ref"), Capture("mlx")
    video = rng.standard_normal((1, 4, 3, 12, 10)).astype(np.float32)
    tokens = rng.standard_normal((1, 24, 2, 8)).astype(np.float32)
    layers = {
        "patch_embed": video,
        "blocks.0/attn/q_rot": tokens,
        "blocks.0/residual": rng.standard_normal((1, 24, 16)).astype(np.float32),
        EVIL: rng.standard_normal(7).astype(np.float32),
        "blocks.1/out": rng.standard_normal((2, 5)).astype(np.float32),
    }
    for name, value in layers.items():
        truth.add(name, value.astype(np.float64))
        ref.add(name, _bf16(value) if dtype == "bfloat16" else value)
        mine = (_bf16(value) if dtype == "bfloat16" else value).copy()
        if broken and name == "patch_embed":
            mine[0, 2, 1, 3:6, 4:7] += 0.5  # channel 2, frame 1: a blotch
        if broken and name == "blocks.0/residual":
            mine += 0.02 * rng.standard_normal(mine.shape).astype(np.float32)
        if broken and name == "blocks.1/out":
            mine[1, 3] = np.nan
        ours.add(name, mine)
    comparison = compare("demo", dtype, ref, ours, thresholds.load(), truth=truth if dtype == "bfloat16" else None)
    if broken:
        comparison.sections = [
            Section("drift", "Drift over repeated application", "curves",
                    {"x": [1, 2, 3, 4, 5], "series": {"ours": [1e-3, 3e-3, 9e-3, 0.03, float("nan")],
                                                      "reference": [1e-3, 1.1e-3, 1.2e-3, 1.3e-3, 0.0]},
                     "xlabel": "step", "ylabel": "relative RMSE", "log": True},
                    passed=False, failing="step 3", note="drift ratio 23 > 4 at step 3"),
            Section("frames", "Per-frame, per-chunk max abs error", "heatmap",
                    {"rows": ["chunk 0", "chunk 1"], "cols": [f"frame {i}" for i in range(6)],
                     "values": [[0.0, 1e-3, 2e-3, 1e-3, 0.5, float("nan")], [1e-4, 1e-4, 2e-4, 1e-4, 1e-4, 1e-4]],
                     "label": "max abs"}, passed=None, note="seam at frame 4"),
            Section("seams", f"Boundary artifacts {EVIL}", "table",
                    {"columns": ["boundary", "jump ratio", "verdict"],
                     "rows": [["chunk 0|1", 1.02, "PASS"], ["chunk 1|2", 7.5, "FAIL"], ["chunk 2|3", None, "PASS"]]},
                    passed=False, failing="chunk 1|2", note=f"note with {EVIL}"),
            Section("odd", "A malformed section", "curves", {"series": {"a": ["x", None]}}, passed=None),
            Section("new", "A kind this renderer does not know", "sparkles", {"whatever": 1}, passed=None),
        ]
    meta = {"config": {"note": EVIL, "layers": 2}, "seed": 0, "weights": "random init, seed 0",
            "versions": {"python": "3.x", "mlx": "test"}, "git_commit": "0123456789abcdef0123-dirty", "seconds": 0.1}
    report = build_report(comparison, meta)
    run_dir = new_run_dir(out, run_id)
    report_dir = run_dir / f"demo-{dtype}"
    report["run_id"], report["report_dir"] = run_dir.name, str(report_dir)
    write_report_dir(report_dir, report, {"ref": ref, "mlx": ours, "truth": truth if dtype == "bfloat16" else None})
    mark_complete(run_dir)
    return report_dir


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One broken bf16 report rendered once (matplotlib is the slow part)."""
    root = tmp_path_factory.mktemp("reports")
    report_dir = make_report(root, run_id="20250101-000000-aaaaaa")
    pages = html_report.write_html_reports(report_dir)
    return report_dir, pages[0].read_text()


def test_page_is_self_contained(rendered):
    _dir, html = rendered
    assert html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in html
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', html)
    assert "<link" not in html and "@import" not in html


def test_layer_names_and_notes_are_escaped(rendered):
    _dir, html = rendered
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<script>") == 1  # only the page's own sorter


def test_banner_first_divergence_and_failing_rows(rendered):
    report_dir, html = rendered
    report = load_json(report_dir / "report.json")
    assert report["verdict"] == "FAIL" and report["first_divergence"] == "patch_embed"
    assert 'class="banner FAIL"' in html
    assert re.search(r'First divergence: <a href="#layer-1"><code>patch_embed</code>', html)
    assert re.search(r'<tr class="fail first" id="layer-1">', html)
    assert html.count('<tr class="fail') >= 3  # patch_embed, residual, the NaN layer
    assert "0123456789abcdef0123-dirty" in html  # git commit shown


def test_sections_render_by_kind(rendered):
    _dir, html = rendered
    assert "Drift over repeated application" in html and "Per-frame, per-chunk max abs error" in html
    seams = html[html.index("Boundary artifacts"):]
    assert "jump ratio" in seams and ">7.5<" in seams
    assert "A malformed section" in html and "A kind this renderer does not know" in html
    assert "unknown section kind &#39;sparkles&#39;" in html


def test_tensor_views_of_first_divergence_and_worst(rendered):
    _dir, html = rendered
    assert "First divergence" in html and "x[0, 2, 1, :, :] of shape [1, 4, 3, 12, 10]" in html
    assert "Against the float64 truth" in html


def test_nan_metrics_render(tmp_path):
    ref, ours = Capture("ref"), Capture("mlx")
    ref.add("a", np.ones((4, 4), np.float32))
    ours.add("a", np.full((4, 4), np.nan, np.float32))
    ref.add("b", np.zeros(3, np.float32))
    ours.add("b", np.zeros(3, np.float32))
    comparison = compare("nan", "float32", ref, ours, thresholds.load())
    report = build_report(comparison, {"config": {}, "seed": 0, "versions": {}, "git_commit": None})
    report["summary"]["max_abs"] = float("inf")
    report_dir, report["run_id"] = tmp_path / "run" / "nan-float32", "run"
    write_report_dir(report_dir, report, {"ref": ref, "mlx": ours})
    saved = load_json(report_dir / "report.json")  # strict JSON: parses anywhere
    row = saved["layers"][0]
    assert row["nan_mlx"] == 16 and row["mean_abs"] is None and row["cosine"] is None  # not available, not 1.0
    assert saved["nonfinite"]["summary.max_abs"] == "inf"
    html = html_report.render_report(report_dir)
    assert "NaN in 1 layer(s)" in html and "FAIL" in html and "inf" in html
    assert "16/0" not in html or "bad" in html


def test_slices_for_any_rank():
    rng = np.random.default_rng(1)
    for shape in [(), (5,), (1, 1), (3, 7), (2, 9, 2, 2), (1, 4, 3, 12, 10), (2, 600, 3)]:
        a = rng.standard_normal(shape).astype(np.float32)
        b = a.copy()
        b.reshape(-1)[-1] += 1
        x, y, text = plots.slice_pair(a, b)
        assert x.shape == y.shape and x.ndim in (1, 2) and max(x.shape, default=1) <= 16 * plots.MAX_IMAGE_SIDE
        assert np.abs(x - y).max() == pytest.approx(1.0)  # the slice holds the error
        assert f"of shape {list(shape)}" in text
    big = np.zeros((3, 1000, 1000), np.float32)
    other = big.copy()
    other[2, 900, 20] = 1
    x, y, text = plots.slice_pair(big, other)
    assert x.shape == (plots.MAX_IMAGE_SIDE, plots.MAX_IMAGE_SIDE) and np.abs(x - y).max() == 1
    assert text.startswith("x[2, :, :]") and "cropped" in text


def test_cli_latest_writes_html_and_index_newest_first(tmp_path, capsys):
    old = make_report(tmp_path, "float32", run_id="20240101-000000-000000", broken=False)
    new = make_report(tmp_path, "float32", run_id="20250101-000000-000000", broken=False)
    assert cli.main(["report", "--latest", str(tmp_path)]) == 0
    assert (new / "report.html").is_file() and not (old / "report.html").exists()
    index = (tmp_path / "index.html").read_text()
    assert index.index("20250101-000000-000000") < index.index("20240101-000000-000000")
    assert 'href="20250101-000000-000000/demo-float32/report.html"' in index
    assert 'href="20240101-000000-000000/demo-float32/report.json"' in index
    assert 'href="../../index.html"' in (new / "report.html").read_text()
    assert str(tmp_path / "index.html") in capsys.readouterr().out


@pytest.mark.parametrize("depth", ["run", "component"])
def test_cli_report_dot_inside_a_run_puts_the_index_in_the_reports_folder(tmp_path, monkeypatch, depth):
    report_dir = make_report(tmp_path, "float32", run_id="20250101-000000-000000", broken=False)
    monkeypatch.chdir(report_dir.parent if depth == "run" else report_dir)
    assert cli.main(["report", "."]) == 0
    assert (tmp_path / "index.html").is_file() and (report_dir / "report.html").is_file()
    assert not (report_dir.parent / "index.html").exists() and not (report_dir / "index.html").exists()


def test_cli_report_on_missing_path_is_usage_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2


def test_index_lists_unreadable_report(tmp_path):
    bad = tmp_path / "20250101-000000-bbbbbb" / "x-float32"
    bad.mkdir(parents=True)
    (bad / "report.json").write_text("{not json")
    page = html_report.write_index(tmp_path).read_text()
    assert "UNREADABLE" in page and "not valid JSON" in page


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no chromium to take a screenshot with")
def test_screenshot(rendered, tmp_path):
    import matplotlib.image

    report_dir, _html = rendered
    out = tmp_path / "shot.png"
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([str(REPO / "scripts" / "screenshot_report.sh"), str(report_dir / "report.html"), str(out),
                    "1200x1400"], check=True, timeout=600, env=env, capture_output=True)
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == (1400, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 50  # the FAIL banner is drawn


def test_first_divergence_in_a_section_links_to_it(tmp_path):
    report_dir = make_report(tmp_path, "float32", broken=False)
    report = load_json(report_dir / "report.json")
    drift = Section("drift", "Drift", "curves", {"x": [1, 2], "series": {"ours": [1.0, 2.0]}},
                    passed=False, failing="step 2", note="too much")
    report.update(sections=[asdict(drift)], verdict="FAIL", first_divergence="step 2")
    write_json(report_dir / "report.json", report)
    html = html_report.render_report(report_dir)
    assert 'First divergence: <a href="#section-1-drift"><code>step 2</code></a> — Drift: too much' in html
    assert 'id="section-1-drift"' in html


def test_index_lists_bisections(tmp_path):
    write_json(tmp_path / "bisect-1" / "bisect.json", {
        "created": "2026-01-01", "components": ["tiny"], "dtype": "bfloat16", "good": "a" * 40, "bad": "b" * 40,
        "status": "found", "first_bad": {"commit": "c" * 40, "subject": f"fix {EVIL}"}})
    (tmp_path / "bisect-1" / "bisect.html").write_text("")
    page = html_report.write_index(tmp_path).read_text()
    assert "Bisections" in page and 'href="bisect-1/bisect.html"' in page and "cccccccccccc fix &lt;script&gt;" in page
