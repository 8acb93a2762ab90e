"""UniPC (Wan2.2's scheduler) parity against the real diffusers UniPCMultistepScheduler, and its faults.

Every comparison goes through the harness (``parity.runner.run_component("unipc_scheduler")``):
the real scheduler driving the Wan denoising loop against our MLX port, with the same stand-in
denoiser and noise. A few tests check the port's own functions directly (schedule values, the
bf16 x0 conversion, refused options).
"""
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler as ReferenceScheduler

from fixtures.inputs import normal
from mlx_impl import unipc as U
from parity.components._diffusers import UniPCSchedulerConfig
from parity.config import ConfigError
from parity.runner import run_component
from reference_runners import unipc as R

CONFIG = json.loads((Path(__file__).parents[1] / "fixtures/configs/unipc_scheduler.json").read_text())
DIFFUSERS = {k: v for k, v in CONFIG["scheduler"].items() if not k.startswith("_")}


def run(dtype="float32", seed=0, **overrides):
    return run_component("unipc_scheduler", dtype, seed=seed, out_dir=None, overrides=overrides)


def sections(result):
    return {section.name: section for section in result.sections}


def layer_names(steps, corrector_steps=None):
    """A float32 run's layers: the trajectory, then the same again from the second call (``call2/``)."""
    corrector_steps = range(1, steps) if corrector_steps is None else corrector_steps
    names = ["sigmas", "timesteps"]
    for k in range(steps):
        names += [f"step{k}/corrector"] * (k in corrector_steps) + [f"step{k}/predictor", f"step{k}/sample"]
    return names + [f"call2/{name}" for name in names]


def assert_first_divergence(result, layer, still_passing=()):
    assert result.verdict == "FAIL"
    assert result.first_divergence == layer
    for name in still_passing:
        assert result.layer(name).verdict == "PASS", name


# --- float32 parity ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 8, 20, 40])
def test_float32_trajectory_matches_diffusers(steps):
    result = run(steps=steps)
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in result.layers] == layer_names(steps)
    # Schedules: the same float64 NumPy ops on both sides, then float32 / int64 casts: exact.
    assert result.layer("sigmas").metrics["max_abs"] == 0 == result.layer("timesteps").metrics["max_abs"]
    assert result.layer("timesteps").dtype_ref == result.layer("timesteps").dtype_mlx == "int64"
    assert result.layer("sigmas").dtype_ref == result.layer("sigmas").dtype_mlx == "float32"
    assert all(l.dtype_ref == l.dtype_mlx == "float32" for l in result.layers if l.name.startswith("step"))
    found = sections(result)
    assert found["solver"].passed and found["schedule"].passed and found["teacher_forcing"].passed
    assert found["schedule"].note.startswith("schedule = convention 'diffusers'")


@pytest.mark.parametrize("variant", [
    {"solver_order": 3}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "flow_shift": 3.0},
    {"disable_corrector": [0, 2]}, {"final_sigmas_type": "sigma_min"}, {"flow_shift": 1.0},
])
def test_float32_variants(variant):
    """Order 3 (the rho solves of predictor and corrector), bh1, no lower-order final, disabled correctors,
    sigma_min (bh1 and order 2 at the end only with it: with a final sigma 0 the reference's last step is NaN)."""
    result = run(scheduler=variant)
    assert result.verdict == "PASS", result.first_divergence
    names = [layer.name for layer in result.layers]
    if "disable_corrector" in variant:
        assert names == layer_names(8, corrector_steps=[2, 4, 5, 6, 7])
    else:
        assert names == layer_names(8)


@pytest.mark.parametrize("variant", [{"solver_type": "bh1"}, {"lower_order_final": False}])
def test_reference_nan_at_a_final_sigma_of_zero_is_reproduced(variant):
    """diffusers' last step with sigma 0 is NaN for bh1 (alpha_t * B_h * 0 with B_h = -inf) and for an order-2
    last step (r_1 = 0, D1 = inf: +-inf): we mirror both, so the sides agree up to it and break at the same
    layer, non-finite where the reference is (such a layer always fails: the harness excuses no NaN/Inf)."""
    result = run(scheduler=variant)
    assert_first_divergence(result, "step7/predictor", ["step7/corrector"])
    for name in ("step7/predictor", "step7/sample"):
        m = result.layer(name).metrics
        assert (m["nan_ref"], m["inf_ref"]) == (m["nan_mlx"], m["inf_mlx"]) and m["nan_ref"] + m["inf_ref"] > 0, name
        ref, ours = result.context.ref[name], result.context.mlx[name]
        np.testing.assert_array_equal(np.isnan(ref), np.isnan(ours))
        np.testing.assert_array_equal(ref[np.isinf(ref)], ours[np.isinf(ref)])


@pytest.mark.parametrize("seed", [1, 2])
def test_float32_other_seeds(seed):
    result = run(seed=seed)
    assert result.verdict == "PASS", result.first_divergence


def test_final_step_lands_on_the_x0_prediction():
    """Final sigma 0, order 1: the last predictor returns the x0 of the corrected last sample (h = inf handled).
    The scheduler object holds the state of the run's last trajectory: the second call's."""
    result = run(steps=5)
    scheduler = result.context.mlx_model.scheduler
    assert scheduler.sigmas[-1] == 0 and np.isfinite(result.context.mlx["call2/step4/sample"]).all()
    np.testing.assert_allclose(result.context.mlx["call2/step4/sample"], np.array(scheduler.model_outputs[-1]),
                               rtol=0, atol=1e-6)


# --- bf16 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [8, 20])
def test_bfloat16_denoiser_within_precision_budget(steps):
    """Denoiser in bf16, latents float32 (as the pipeline): per layer our error against a float64 reference
    run at most 2x the reference's own bf16 error (parity.toml), the x0 products in bf16 on both sides."""
    result = run("bfloat16", steps=steps)
    assert result.verdict == "PASS", result.first_divergence
    assert all(l.dtype_mlx == l.dtype_ref == "float32" for l in result.layers if l.name.startswith("step"))
    ratios = [l.metrics["budget_ratio"] for l in result.layers if l.name.startswith("step")]
    assert max(ratios) <= 2 and all(np.isfinite(ratios))
    drift = sections(result)["drift"]
    assert len(drift.data["series"]) == 4 and drift.data["x"] == [f"step{k}/sample" for k in range(steps)]


def test_bfloat16_x0_conversion_is_the_references():
    """On the same bf16 flow, x0 = sample - sigma * flow equals diffusers' convert_model_output exactly: sigma is
    rounded to bf16 and the product is bf16 (a 0-d float32 tensor does not promote a bf16 tensor), the difference
    float32. Two IEEE-rounded elementwise ops, no reduction or BLAS, so exact equality is the right check.
    (The bf16 trajectories still differ by ~1 bf16 ulp: the stand-in's bf16 Linear rounds differently per side.)"""
    reference = ReferenceScheduler.from_config(DIFFUSERS)
    reference.set_timesteps(8)
    flow = normal(0, "unipc/flow", (1, 4, 3, 8, 8))
    sample = normal(0, "unipc/latents", (1, 4, 3, 8, 8))
    for k in range(8):
        reference._step_index = k
        expected = reference.convert_model_output(torch.from_numpy(flow).to(torch.bfloat16),
                                                  sample=torch.from_numpy(sample)).numpy()
        got = U.convert_model_output(mx.array(flow).astype(mx.bfloat16), mx.array(sample), reference.sigmas[k].numpy())
        assert got.dtype == mx.float32
        np.testing.assert_array_equal(np.array(got), expected)


# --- teacher forcing per step ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_teacher_forcing_section(dtype):
    """Each step from the reference's own state: judged as layers are, and in bf16 the local error of the last
    step below the free-running one (local errors do not compound)."""
    found = sections(run(dtype))
    forcing = found["teacher_forcing"]
    assert forcing.passed is True and forcing.kind == "curves" and forcing.data["culprit"] is None
    assert forcing.data["x"] == [f"step{k}" for k in range(8)]
    series = forcing.data["series"]
    free, local = series["inherited: relative error (free-running)"], series["local: relative error (teacher-forced)"]
    assert len(free) == len(local) == 8 and free[0] == local[0]  # step 0 starts from the same noise either way
    if dtype == "bfloat16":
        assert local[-1] < free[-1]
    assert [row[2] for row in found["teacher_forcing_steps"].data["rows"]] == ["PASS"] * 8


def corrector_at_order_one_at_step(step):
    correct = U.UniPCMultistepScheduler.corrector

    def corrector(self, model_t, last_sample, this_sample, order):
        return correct(self, model_t, last_sample, this_sample, 1 if self.step_index == step else order)

    return corrector


def test_fault_corrector_at_the_wrong_order_is_local_under_teacher_forcing(monkeypatch):
    """A corrector run at the wrong order at step 3 only: free running every later step differs; teacher forced
    only step 3's layers do."""
    monkeypatch.setattr(U.UniPCMultistepScheduler, "corrector", corrector_at_order_one_at_step(3))
    result = run()
    assert_first_divergence(result, "step3/corrector", ["step2/sample"])
    assert all(result.layer(f"step{k}/sample").verdict == "FAIL" for k in range(3, 8))
    found = sections(result)
    forcing = found["teacher_forcing"]
    assert forcing.passed is False and forcing.failing == "teacher_forcing/step3" and forcing.culprit == "step3"
    assert "step3/corrector" in forcing.note  # the culprit's own first failing layer, with its reasons
    local = {row[0]: row[2] for row in found["teacher_forcing_steps"].data["rows"]}
    assert [step for step, verdict in local.items() if verdict == "FAIL"] == ["step3"]


# --- schedule conventions: schedule vs solver math (issue 23.3) --------------------------------
@pytest.mark.parametrize("steps", [8, 40])
def test_original_schedule_against_diffusers_differs_but_the_math_passes(steps):
    """A port on Wan's original schedule, judged against diffusers': the schedule layers fail ("schedule differs:
    convention 'original'"), the solver math passes, run by teacher forcing of the schedule. Wan's grid is
    diffusers' minus 0.001 before the shift (0.999 ... 0 vs 1 ... 1/1000): after shift 5 its sigmas are lower
    by 2.0e-4 at the first step, growing to 2.2e-3 (8 steps) / 4.1e-3 (40); timesteps by 0-2 / 0-4."""
    result = run(steps=steps, mlx_schedule="original")
    assert_first_divergence(result, "sigmas")
    assert result.layer("timesteps").verdict == "FAIL"
    d_sigma = result.context.ref["sigmas"].astype(np.float64) - result.context.mlx["sigmas"]
    d_t = result.context.ref["timesteps"] - result.context.mlx["timesteps"]
    assert d_sigma.min() >= 0 and 1.9e-4 < d_sigma[0] < 2.1e-4 and d_sigma.max() < 5e-3, d_sigma
    assert d_t.min() >= 0 and 1 <= d_t.max() <= 4 and d_t[0] == 0, d_t
    assert all(l.verdict == "PASS" for l in result.layers if l.name.startswith("step"))
    found = sections(result)
    assert found["schedule"].passed is False and found["schedule"].failing == "sigmas"
    assert found["schedule"].note.startswith("schedule differs: convention 'original', not 'diffusers'")
    assert "from 'original': identical" in found["schedule"].note
    assert found["solver"].passed is True and found["teacher_forcing"].passed is True


def test_original_schedule_without_schedule_forcing_fails_the_math():
    result = run(mlx_schedule="original", schedule_forcing=False)
    assert_first_divergence(result, "sigmas")
    solver = sections(result)["solver"]
    assert solver.passed is False and solver.failing.startswith("step")
    assert "schedule_forcing off" in solver.note


def test_original_schedule_against_the_original_convention_passes():
    """The reference's 'original' convention (diffusers' set_timesteps on Wan's grid) is our port's, exactly."""
    result = run(mlx_schedule="original", reference_schedule="original", steps=20)
    assert result.verdict == "PASS", result.first_divergence
    assert result.layer("sigmas").metrics["max_abs"] == 0 == result.layer("timesteps").metrics["max_abs"]
    assert sections(result)["schedule"].note.startswith("schedule = convention 'original'. Other conventions "
                                                        "differ from 'diffusers': max abs sigmas")


def test_reference_schedule_port_judges_the_math_only():
    result = run(mlx_schedule="original", reference_schedule="port")
    assert result.verdict == "PASS", result.first_divergence
    schedule = sections(result)["schedule"]
    assert schedule.passed is None and "The port's schedule is convention 'original'" in schedule.note


def test_reference_schedule_port_still_fails_a_wrong_solver(monkeypatch):
    monkeypatch.setattr(U.UniPCMultistepScheduler, "corrector", corrector_at_order_one_at_step(5))
    assert_first_divergence(run(reference_schedule="port"), "step5/corrector", ["sigmas", "timesteps"])


def test_original_schedule_values():
    """Spot values of Wan's convention: sigma_max = float32(0.999), sigma_min = 0, shifted by 5, no nudge."""
    sigmas, timesteps = U.original_flow_sigmas(4, 1000, 5.0)
    s = np.linspace(float(np.float32(0.999)), 0.0, 5)[:-1]
    np.testing.assert_array_equal(sigmas, np.append(5 * s / (1 + 4 * s), 0).astype(np.float32))
    np.testing.assert_array_equal(timesteps, (5 * s / (1 + 4 * s) * 1000).astype(np.int64))
    assert timesteps[0] == 999 and sigmas[0] < 1 - 1e-6
    np.testing.assert_array_equal(R.original_grid(4, 1000), s)


def test_set_timesteps_sigmas_shifts_the_given_sigmas_again():
    """Why teacher forcing of the schedule assigns sigmas instead of set_timesteps(sigmas=...): diffusers 0.42.1
    shifts them, which is also why the 'original' convention hands it Wan's unshifted grid."""
    reference = ReferenceScheduler.from_config(DIFFUSERS)
    sigmas, _ = U.original_flow_sigmas(8, 1000, 5.0)
    reference.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))  # a list (as annotated) fails: flow_shift * list
    twice = U.shift_sigmas(sigmas[:-1].astype(np.float64), 5.0).astype(np.float32)
    np.testing.assert_allclose(reference.sigmas.numpy()[:-1], twice, rtol=1e-6)
    # ... and given the unshifted grid, it reproduces set_timesteps(N)
    reference.set_timesteps(sigmas=np.linspace(1, 1 / 1000, 9)[:-1])
    np.testing.assert_array_equal(reference.sigmas.numpy(), U.diffusers_flow_sigmas(8, 1000, 5.0)[0])


def test_original_convention_refuses_a_shift_where_diffusers_would_nudge():
    """Beyond flow_shift ~1000 diffusers' -1e-6 nudge would fire on Wan's grid: not the original convention."""
    assert R.original_unsupported({**DIFFUSERS, "flow_shift": 1000.0}) is None
    assert "nudge" in R.original_unsupported({**DIFFUSERS, "flow_shift": 5000.0})
    with pytest.raises(ConfigError, match="reference_schedule 'original': with flow_shift 5000.0 diffusers would nudge"):
        run(reference_schedule="original", scheduler={"flow_shift": 5000.0})


# --- faults ----------------------------------------------------------------------------------
def test_fault_flow_shift_applied_twice(monkeypatch):
    """Named at sigmas; the solver math on that schedule still passes (teacher forcing of the schedule)."""
    once = U.shift_sigmas
    monkeypatch.setattr(U, "shift_sigmas", lambda sigmas, shift: once(once(sigmas, shift), shift))
    result = run()
    assert_first_divergence(result, "sigmas")
    assert result.layer("timesteps").verdict == "FAIL"
    found = sections(result)
    assert found["schedule"].note.startswith("schedule differs: none of the named conventions (original)")
    assert found["solver"].passed is True


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_fault_corrector_skipped_at_the_last_step(monkeypatch, final):
    """Named at step7/corrector (missing on our side). With Wan's final sigma 0 the final latents still match:
    the last predictor (order 1, sigma_t = 0) returns 0 * x + m0, the x0 of the *uncorrected* sample, so the
    last corrector never reaches the output; with a final "sigma_min" it does."""
    correct = U.UniPCMultistepScheduler.uses_corrector
    monkeypatch.setattr(U.UniPCMultistepScheduler, "uses_corrector",
                        lambda self, k: correct(self, k) and k < len(self.timesteps) - 1)
    result = run(scheduler={"final_sigmas_type": final})
    assert_first_divergence(result, "step7/corrector", ["step6/sample"])
    assert result.layer("step7/corrector").reasons == ["missing on the MLX side"]
    assert (result.layer("step7/sample").verdict == "PASS") == (final == "zero")


def test_fault_corrector_at_the_wrong_order_is_named(monkeypatch):
    monkeypatch.setattr(U.UniPCMultistepScheduler, "corrector", corrector_at_order_one_at_step(5))
    assert_first_divergence(run(), "step5/corrector", ["step4/sample"])


# --- configuration ---------------------------------------------------------------------------
def test_fixture_config_is_a_valid_diffusers_config():
    """Every key of the Wan2.2 scheduler config is one diffusers 0.42.1 knows, with the value we wrote."""
    reference = ReferenceScheduler.from_config(DIFFUSERS)
    assert {k: reference.config[k] for k in DIFFUSERS} == DIFFUSERS


def test_typed_config_defaults_are_diffusers():
    import inspect

    params = inspect.signature(ReferenceScheduler.__init__).parameters
    for key, field in UniPCSchedulerConfig.model_fields.items():
        if not field.is_required():
            assert field.default == params[key].default, key
    assert {k for k, f in UniPCSchedulerConfig.model_fields.items() if f.is_required()} == {"prediction_type",
                                                                                           "use_flow_sigmas"}


def test_diffusers_scheduler_config_file(tmp_path):
    """`--config` takes a diffusers scheduler folder; its scheduler_config.json replaces the scheduler part."""
    ReferenceScheduler.from_config({**DIFFUSERS, "flow_shift": 12.0, "solver_order": 3}).save_config(tmp_path)
    result = run_component("unipc_scheduler", "float32", out_dir=None, config_path=tmp_path)
    assert result.context.config.scheduler.flow_shift == 12.0 and result.context.config.scheduler.solver_order == 3
    assert result.verdict == "PASS", result.first_divergence


@pytest.mark.parametrize("bad,key", [
    ({"scheduler": {"use_karras_sigmas": True}}, "scheduler.use_karras_sigmas"),
    ({"scheduler": {"thresholding": True}}, "scheduler.thresholding"),
    ({"scheduler": {"prediction_type": "epsilon"}}, "scheduler.prediction_type"),
    ({"scheduler": {"solver_type": "midpoint"}}, "scheduler.solver_type"),
    ({"scheduler": {"no_such_key": 1}}, "no_such_key"),
    ({"reference_schedule": "karras"}, "reference_schedule"),
    ({"mlx_schedule": "original", "scheduler": {"final_sigmas_type": "sigma_min"}}, "final sigma 0"),
])
def test_bad_configs_are_input_errors_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        run(**bad)


def test_use_flow_sigmas_must_be_said(tmp_path):
    """diffusers' default False is the VP schedule, not ported: a config without the key is refused."""
    ReferenceScheduler(prediction_type="flow_prediction", flow_shift=5.0).save_config(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((tmp_path / "scheduler_config.json").read_text()).items() if k != "use_flow_sigmas"}))
    with pytest.raises(ConfigError, match="use_flow_sigmas"):
        run_component("unipc_scheduler", "float32", out_dir=None, config_path=tmp_path)


@pytest.mark.parametrize("bad,error", [
    ({"use_karras_sigmas": True}, ValueError), ({"prediction_type": "epsilon"}, ValueError),
    ({"solver_type": "midpoint"}, ValueError), ({"no_such_key": 1}, TypeError),
])
def test_the_port_refuses_unported_options(bad, error):
    with pytest.raises(error):
        U.UniPCMultistepScheduler(**{**DIFFUSERS, **bad})


def test_explicit_schedule_checks_its_length():
    scheduler = U.UniPCMultistepScheduler(**DIFFUSERS)
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_schedule(np.linspace(1, 0, 6), np.arange(3))
    scheduler.set_schedule(np.array([0.75, 0.5, 0.0]))
    np.testing.assert_array_equal(scheduler.timesteps, [750, 500])
    scheduler.set_schedule(np.array([0.9, 0.0]))  # float32(0.9) * 1000 = 899.99997: truncated, as the reference
    np.testing.assert_array_equal(scheduler.timesteps, [899])
