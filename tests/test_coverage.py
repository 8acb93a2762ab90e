"""Coverage cells: config variants the gate runs in float32 beside each component's default run.

Each fault below lives on a code path the default config never takes (a flag left unwired, an
order the default never reaches): the default run passes, and the gate names the cell that fails.
"""
from __future__ import annotations

from mlx_impl import scheduler, unipc
from parity import gate, registry, thresholds
from parity.runner import variant


def _gate(tmp_path, name):
    result = gate.run_gate([name], ["float32"], thresholds.load(), tmp_path / "no-baselines", out=tmp_path)
    return {o.component: o for o in result.outcomes}


def test_every_component_declares_cells_that_run_as_named_variants():
    """A cell is a config override the component accepts (validated like any config)."""
    for name in registry.available():
        component = registry.get(name)
        for cell in component.coverage:
            component.load_config(overrides=cell)
            assert variant(component, cell).startswith(f"{name}[")


def test_an_unwired_amplified_first_chunk_fails_its_cell(tmp_path, monkeypatch):
    set_timesteps = scheduler.HeliosDMDScheduler.set_timesteps

    def ignores_the_flag(self, num_inference_steps, stage_index=None, mu=None, is_amplify_first_chunk=False):
        set_timesteps(self, num_inference_steps, stage_index, mu)
    monkeypatch.setattr(scheduler.HeliosDMDScheduler, "set_timesteps", ignores_the_flag)

    outcomes = _gate(tmp_path, "scheduler")
    assert outcomes["scheduler"].passed  # the default config never amplifies
    cell = outcomes["scheduler[is_amplify_first_chunk=True]"]
    assert not cell.passed and cell.first_divergence.startswith("stage0/")
    assert gate.COVERAGE_NOTE in cell.notes
    assert all(o.passed for name, o in outcomes.items() if "amplify" not in name)


def test_a_solver_capped_at_second_order_fails_the_third_order_cell(tmp_path, monkeypatch):
    step_order = unipc.UniPCMultistepScheduler.step_order
    monkeypatch.setattr(unipc.UniPCMultistepScheduler, "step_order", lambda self, k: min(step_order(self, k), 2))

    outcomes = _gate(tmp_path, "unipc_scheduler")
    assert outcomes["unipc_scheduler"].passed  # Wan's default is second order
    (cell,) = [o for name, o in outcomes.items() if "solver_order" in name]
    assert not cell.passed and cell.first_divergence == "step2/predictor"
    assert sum(not o.passed for o in outcomes.values()) == 1
