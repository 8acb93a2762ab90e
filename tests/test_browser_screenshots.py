"""The README's screenshots (docs/screenshots): shown on its first screen, small, and not older than their templates.

Each screenshot is recorded in ``docs/screenshots/templates.json`` with a hash of the page template
it shows and every template that one extends or imports. A change to any of them makes this test
fail until ``make screenshots`` (a browser run of ``test_browser.py::test_screenshots``) redraws them.
No browser is needed here.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from jinja2 import meta

from parity import html_report

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "screenshots"
#: What each screenshot shows: a page of test_browser's site, its template, and the element its picture ends with.
SCREENSHOTS = [
    {"file": "failing-report.png", "page": "fail", "template": "report.html.j2", "until": "#layers"},
    {"file": "bisect.png", "page": "bisect", "template": "bisect.html.j2", "until": "table"},
]
MAX_BYTES = 300_000


def templates_of(name: str) -> list[str]:
    """``name`` and every template it extends, includes or imports, transitively, sorted."""
    env, seen, todo = html_report._env(), set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            source = env.loader.get_source(env, current)[0]
            todo += [t for t in meta.find_referenced_templates(env.parse(source)) if t]
    return sorted(seen)


def template_hash(name: str) -> str:
    digest = hashlib.sha256()
    for template in templates_of(name):
        digest.update(template.encode() + b"\0" + (html_report.TEMPLATES / template).read_bytes() + b"\0")
    return digest.hexdigest()


def test_screenshots_are_not_older_than_their_templates():
    recorded = json.loads((DOCS / "templates.json").read_text())
    for shot in SCREENSHOTS:
        assert recorded.get(shot["file"]) == template_hash(shot["template"]), (
            f"docs/screenshots/{shot['file']} shows an older {', '.join(templates_of(shot['template']))}: "
            "run `make screenshots` and commit the result")


def test_screenshots_are_small_and_on_the_readmes_first_screen():
    readme = (REPO / "README.md").read_text()
    first_screen = readme[:readme.index("\n## ")]
    for shot in SCREENSHOTS:
        png = DOCS / shot["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < MAX_BYTES
        assert re.search(rf"\(docs/screenshots/{re.escape(shot['file'])}\)|src=\"docs/screenshots/"
                         rf"{re.escape(shot['file'])}\"", first_screen), f"README's first screen lacks {shot['file']}"


def test_hash_follows_the_templates_a_page_uses():
    assert templates_of("report.html.j2") == ["base.html.j2", "macros.html.j2", "report.html.j2"]
    assert template_hash("report.html.j2") != template_hash("bisect.html.j2")
