"""The pytest plugin (entry point ``parity``), exercised in inner pytest sessions via pytester."""
import json
from pathlib import Path

import mlx.core  # noqa: F401
import pytest
import torch  # noqa: F401

import reference_runners.rope  # noqa: F401
from parity import registry
from parity import runner  # noqa: F401

# Import every module the inner sessions use up front: pytester's in-process runs forget modules
# first imported inside them, and a native extension (mlx, torch) cannot be initialised twice --
# without this, running this file alone fails where running it after another file passes.
registry.available()

PASSING = """
import pytest

@pytest.mark.parity_component("rope")
def test_rope(parity_run, assert_parity, parity_report_dir):
    result = parity_run(num_frames=2)
    assert_parity(result)
    assert result.report_dir.parent.parent == parity_report_dir
    assert result.report["config"]["num_frames"] == 2
"""

FAILING = """
import pytest
from mlx_impl import rope

@pytest.mark.parity_component("rope")
def test_rope_with_sin_cos_swapped(parity_run, assert_parity, monkeypatch):
    correct = rope.apply_rotary_emb
    monkeypatch.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, sin, cos))
    assert_parity(parity_run())
"""


def test_passing_run_writes_reports_where_asked(pytester, tmp_path):
    pytester.makepyfile(PASSING)
    reports = tmp_path / "reports"
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest(f"--parity-report-dir={reports}", f"--junitxml={junit}")
    result.assert_outcomes(passed=1)
    assert list(reports.glob("*/rope[[]num_frames=2[]]-float32/report.json"))  # named by its overrides
    assert 'name="parity_report"' in junit.read_text()  # the report folder, in the suite's own JUnit
    result.stdout.fnmatch_lines(["parity: dtype float32; components all; reports *", "*1 parity run(s), 0 not PASS*"])


def test_failing_run_names_first_diverging_layer(pytester):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * parity FAIL: rope float32, 8/26 layers fail",
        "E * first diverging layer: helios/q_rot",
        "E * max abs * > *; cosine * < 0.99999 (1 - cos = *)",
        "E * worst layer: helios/k_rot  cosine *",
        "E * failing layers: helios/q_rot, helios/k_rot, wan/q_rot, wan/k_rot",
        "E * report: *rope-float32",
        "E * assert 'FAIL' == 'PASS'",  # pytest rewrote the plugin's assert
    ])
    assert "def assert_parity" not in result.stdout.str()  # __tracebackhide__: the user's line is shown


def test_assertion_rewriting_in_a_fresh_process(pytester):
    """In a new interpreter the plugin module is first imported by pytest, which must rewrite it."""
    pytester.makepyfile("""
        def test_report_dict(assert_parity):
            assert_parity({"component": "x", "dtype": "float32", "verdict": "FAIL", "layers": [],
                           "first_divergence": None})
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E * parity FAIL: x float32, 0/0 layers fail",
                                 "E * nothing was compared*", "E * assert 'FAIL' == 'PASS'"])


def test_component_marker_selects_tests(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parity_component("rope")
        def test_rope():
            pass

        @pytest.mark.parity_component("vae")
        def test_vae():
            pass

        @pytest.mark.parity_component("vae", "rope")
        def test_both():
            pass

        def test_unmarked():
            pass
    """)
    result = pytester.runpytest("--parity-components=rope", "-v")
    result.assert_outcomes(passed=3, deselected=1)
    for line in ("*test_rope PASSED*", "*test_both PASSED*", "*test_unmarked PASSED*"):  # in any order
        result.stdout.fnmatch_lines([line])
    result = pytester.runpytest("--parity-components=vae,rope")
    result.assert_outcomes(passed=4)


def test_unknown_selected_component_is_a_usage_error(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parity_component("rope")
        def test_rope():
            pass
    """)
    result = pytester.runpytest("--parity-components=rop")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown component(s) ?'rop'?; registered: *"])


def test_parity_dtype_parametrizes_tests_and_runs(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parity_component("rope")
        def test_rope(parity_run, parity_dtype, assert_parity):
            result = parity_run(num_frames=2, height=2, width=2)
            assert result.report["dtype"] == parity_dtype
            assert_parity(result)

        def test_dtype_only(parity_dtype):
            assert parity_dtype in ("float32", "bfloat16")
    """)
    result = pytester.runpytest("--parity-dtype=all", "-v")
    result.assert_outcomes(passed=4)
    for line in ("*test_rope?float32? PASSED*", "*test_rope?bfloat16? PASSED*"):
        result.stdout.fnmatch_lines([line])
    result = pytester.runpytest("--parity-dtype=bfloat16", "-k", "dtype_only")
    result.assert_outcomes(passed=1, deselected=1)
    result = pytester.runpytest("--parity-dtype=float16")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_parity_run_needs_a_component(pytester):
    pytester.makepyfile("""
        def test_no_component(parity_run):
            parity_run()
    """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*TypeError: parity_run: name a component*"])


def test_a_conftest_listing_the_plugin_and_a_thresholds_file_layered_on_the_harness(pytester, tmp_path):
    """The plugin is already installed (entry point): listing it again is harmless. The flag's file
    holds one component table and no defaults: it is layered on the harness's, not replacing them."""
    pytester.makeconftest('pytest_plugins = ["parity.pytest_plugin"]\n')
    pytester.makepyfile(PASSING)
    mine = tmp_path / "mine.toml"
    mine.write_text('[components."rop*".float32.layers."helios/*"]\ncosine_min = 0.5\n')
    reports = tmp_path / "reports"
    result = pytester.runpytest(f"--parity-thresholds={mine}", f"--parity-report-dir={reports}")
    result.assert_outcomes(passed=1)
    report = json.loads(next(reports.glob("*/*/report.json")).read_text())
    assert report["thresholds"] == [str(Path(__file__).resolve().parent.parent / "parity" / "thresholds.toml"), str(mine)]
    limits = {row["layer"]: row["limits"] for row in report["layers"]}
    assert limits["helios/q_rot"]["cosine_min"] == 0.5 and limits["helios/q_rot"]["atol"] == 1e-5  # glob + defaults
    assert limits["wan/q_rot"]["cosine_min"] == 0.99999

    mine.write_text('[components."rop*".float32.layers."nowhere/*"]\ncosine_min = 0.5\n')
    result = pytester.runpytest(f"--parity-thresholds={mine}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*layer glob(s) matching no layer of rope float32: {mine}: *'nowhere/*'*"])


def test_assert_parity_after_a_crash_names_the_missing_layer_not_a_perfect_one(pytester):
    toys = Path(__file__).resolve().parent / "data" / "toy_components.py"
    pytester.makepyfile("""
        def test_crash(parity_run, assert_parity):
            assert_parity(parity_run("toy_crash"))
    """)
    result = pytester.runpytest(f"--parity-component-module={toys}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E * parity FAIL: toy_crash float32, 1/2 layers fail",
        "E * first diverging layer: b",
        "E * missing on the MLX side (MLX crashed after a)",
        "E * crash: the MLX forward raised after a: ValueError: *cannot be broadcast",
    ])
    assert "worst layer: a" not in result.stdout.str()  # "a" matched perfectly
