"""The harness installed normally (a wheel, not editable) works from any folder.

Builds and installs this checkout into a temporary target (no network, no dependencies: the test
environment has them), then gates one component from an unrelated working folder with that copy
alone on the path: thresholds, fixture configs, templates and the baseline must all come with the
package or from the project folder, never from this checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_normal_install_gates_from_an_unrelated_folder(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(REPO)], check=True, capture_output=True, text=True)
    project = tmp_path / "project"
    (project / "baselines").mkdir(parents=True)
    shutil.copy(REPO / "baselines" / "rope-float32.json", project / "baselines")
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}

    where = subprocess.run([sys.executable, "-c", "import parity; print(parity.__file__)"], cwd=project, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)  # not this checkout through the editable install

    gate = subprocess.run([sys.executable, "-m", "parity", "gate", "--component", "rope", "--dtype", "float32",
                           "--require-baselines", "--out", "out", "--quiet"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert gate.returncode == 0, gate.stdout + gate.stderr
    summary = json.loads(next((project / "out").glob("*/gate.json")).read_text())
    (outcome,) = [o for o in summary["outcomes"] if o["component"] == "rope"]  # the others: its coverage cells
    assert all(o["passed"] for o in summary["outcomes"]) and len(summary["outcomes"]) > 1
    assert summary["verdict"] == "PASS" and outcome["baseline_path"] == "baselines/rope-float32.json"
    assert list((project / "out").glob("*/rope-float32/report.html"))
