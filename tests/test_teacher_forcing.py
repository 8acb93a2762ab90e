"""Teacher forcing of the DMD scheduler trajectory (a step run on the reference's x_k), and the culprit in every output."""
import pytest

from mlx_impl import scheduler as sched
from parity.assertions import explain
from parity.compare import FAIL, PASS, LayerResult
from parity.html_report import render_report
from parity.report import terminal_summary
from parity.runner import run_component
from parity.teacher_forcing import sections


def _forcing(result):
    return {s.name: s for s in result.sections}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scheduler_steps_teacher_forced_pass(dtype):
    result = run_component("scheduler", dtype, out_dir=None)
    assert result.verdict == "PASS", explain(result)
    found = _forcing(result)
    assert found["teacher_forcing"].passed and found["teacher_forcing"].culprit is None
    labels = found["teacher_forcing"].data["x"]
    steps = [n for n in (l.name for l in result.layers) if "/step" in n and not n.startswith("call2/")]
    assert labels == steps and len(labels) == 6
    assert [row[2] for row in found["teacher_forcing_steps"].data["rows"]] == [PASS] * 6
    if dtype == "bfloat16":
        assert max(found["teacher_forcing"].data["series"]["local: budget ratio"]) < 2


def test_scheduler_one_wrong_sigma_is_the_culprit_though_every_later_step_diverges(monkeypatch):
    """Stage 1's first step converts x0 with a sigma 2 % off: free-running, it and every later step fail;
    teacher-forced, only it does."""
    set_timesteps, sigma_at = sched.HeliosDMDScheduler.set_timesteps, sched.HeliosDMDScheduler.sigma_at

    def remember_stage(self, steps, stage_index=None, *args, **kwargs):
        self.fault_stage = stage_index
        return set_timesteps(self, steps, stage_index, *args, **kwargs)

    def wrong_first_sigma(self, timestep):
        sigma = sigma_at(self, timestep)
        return sigma * 0.98 if self.fault_stage == 1 and timestep == self.timesteps[0] else sigma

    monkeypatch.setattr(sched.HeliosDMDScheduler, "set_timesteps", remember_stage)
    monkeypatch.setattr(sched.HeliosDMDScheduler, "sigma_at", wrong_first_sigma)
    result = run_component("scheduler", "float32", out_dir=None)
    assert result.verdict == "FAIL" and result.first_divergence == "stage1/step0", explain(result)
    assert result.comparison.culprit == "stage1/step0"
    rows = {row[0]: row for row in _forcing(result)["teacher_forcing_steps"].data["rows"]}
    assert [rows[k][1] for k in ("stage1/step0", "stage1/step1", "stage2/step0", "stage2/step1")] == [FAIL] * 4
    assert [rows[k][2] for k in rows] == [PASS, PASS, FAIL, PASS, PASS, PASS]


def _layer(name, verdict, rmse):
    result = LayerResult(name, name, PASS, [], {"rmse": rmse, "ref_rms": 1.0})
    if verdict == FAIL:
        result.fail("absolute", "max_abs", rmse, 1e-5, f"max abs {rmse} > 1e-05")
    return result


def test_sections_name_the_culprit_apart_from_the_first_crossing():
    local = [_layer("b0", PASS, 1e-7), _layer("b1", FAIL, 1e-3), _layer("b2", PASS, 1e-7)]
    inherited = [_layer("b0", PASS, 1e-7), _layer("b1", PASS, 1e-6), None]
    curves, table = sections(["b0", "b1", "b2"], local, inherited, [False, False, True], "float32", "block")
    assert (curves.passed, curves.culprit, curves.failing) == (False, "b1", "teacher_forcing/b1")
    assert curves.data["first_free_running"] == "b2" and "max abs 0.001 > 1e-05" in curves.note
    assert [row[1:3] for row in table.data["rows"]] == [[PASS, PASS], [PASS, FAIL], [FAIL, PASS]]
    assert table.name == "teacher_forcing_blocks" and table.passed is None


def test_culprit_in_report_summary_explain_and_html(tmp_path, monkeypatch):
    from parity.components.transformer import TransformerComponent

    def swapped(self, weights):
        swap = {"blocks.1.": "blocks.2.", "blocks.2.": "blocks.1."}
        return {next((new + k[len(old):] for old, new in swap.items() if k.startswith(old)), k): v
                for k, v in weights.items()}

    monkeypatch.setattr(TransformerComponent, "convert_weights", swapped)
    result = run_component("wan_transformer", "float32", out_dir=tmp_path)
    assert result.report["culprit"] == "blocks.1"
    assert "culprit (first block whose own, teacher-forced error breaks its limit): blocks.1" in terminal_summary(result.report)
    assert "culprit: blocks.1" in explain(result)
    html = render_report(result.report_dir)
    assert "Culprit: <a href=\"#sections\"><code>blocks.1</code></a>" in html
    assert "Teacher forcing: local vs inherited error per block" in html and "Depth profile" in html
