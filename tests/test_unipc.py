"""UniPC (Wan2.2's scheduler) parity against the real diffusers UniPCMultistepScheduler, and its faults.

Both sides run directly: the reference runner (reference_runners/unipc.py) and our MLX loop
(mlx_impl.unipc.sample), with the same stand-in denoiser weights and the same numpy noise; every
recorded layer is compared in execution order (tests/layer_compare.py) and the first differing
one is named.
"""
import copy
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler as ReferenceScheduler

from fixtures.inputs import normal
from layer_compare import assert_match, compare, first_difference, precision_budget
from mlx_impl import unipc as U
from mlx_impl.stand_in import StandInDenoiser
from parity.capture import Capture
from parity.capture_mlx import record_taps
from reference_runners import unipc as R

CONFIG = json.loads((Path(__file__).parents[1] / "fixtures/configs/unipc_scheduler.json").read_text())
MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def config(steps=None, **scheduler):
    out = copy.deepcopy(CONFIG)
    out["scheduler"].update(scheduler)
    if steps is not None:
        out["steps"] = steps
    return out


def weights(cfg, seed=0):
    c = cfg["channels"]
    return {"proj.weight": normal(seed, "unipc/denoiser/proj.weight", (c, c), scale=1 / math.sqrt(c)),
            "proj.bias": normal(seed, "unipc/denoiser/proj.bias", (c,), scale=0.1),
            "time": normal(seed, "unipc/denoiser/time", (c,))}


def latents(cfg, seed=0):
    return normal(seed, "unipc/latents", (cfg["batch"], cfg["channels"], cfg["frames"], cfg["height"], cfg["width"]))


def run_reference(cfg, dtype="float32", seed=0, schedule=None, forced=None):
    capture = Capture("reference")
    orders = R.run(R.build(cfg, weights(cfg, seed)), {"latents": latents(cfg, seed)}, TORCH_DTYPES[dtype], capture,
                   schedule=schedule, forced=forced)
    return capture, orders


def ours(cfg, schedule=None):
    scheduler = U.UniPCMultistepScheduler.from_config(cfg["scheduler"], schedule=schedule or cfg["schedule"])
    scheduler.set_timesteps(cfg["steps"])
    return scheduler


def run_ours(cfg, dtype="float32", seed=0, scheduler=None, forced=None):
    scheduler = scheduler or ours(cfg)
    capture = Capture("mlx")
    denoiser = StandInDenoiser.from_weights(weights(cfg, seed), MX_DTYPES[dtype])
    with record_taps(capture):
        mx.eval(U.sample(scheduler, mx.array(latents(cfg, seed).transpose(0, 2, 3, 4, 1)), denoiser,
                         MX_DTYPES[dtype], forced))
    return capture, scheduler


def layer_names(steps, corrector_steps=None):
    corrector_steps = range(1, steps) if corrector_steps is None else corrector_steps
    names = ["sigmas", "timesteps"]
    for k in range(steps):
        names += [f"step{k}/corrector"] * (k in corrector_steps) + [f"step{k}/predictor", f"step{k}/sample"]
    return names


def teacher(capture, cfg, seed=0):
    """Per step the reference's (latents entering it, scheduler.last_sample): its step{k-1}/sample and the
    corrected sample of step k - 1 (its step{k-1}/corrector, or the latents entering step k - 1 if none ran)."""
    x = [latents(cfg, seed).transpose(0, 2, 3, 4, 1)] + [capture[f"step{k}/sample"] for k in range(cfg["steps"] - 1)]
    last = [None] + [capture[f"step{k}/corrector"] if f"step{k}/corrector" in capture else x[k]
                     for k in range(cfg["steps"] - 1)]
    return list(zip(x, last))


def max_abs(ref, mine, name):
    return float(np.abs(ref[name].astype(np.float64) - mine[name]).max())


# --- float32 parity ------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 8, 20])
def test_float32_trajectory_matches_diffusers(steps):
    cfg = config(steps)
    ref, ref_orders = run_reference(cfg)
    mine, scheduler = run_ours(cfg)
    layers = assert_match(ref, mine)
    assert [layer.name for layer in layers] == layer_names(steps)
    # warm-up order 1, then solver_order 2, lower_order_final drops to 1 at the last step
    assert ref_orders["predictor"] == scheduler.orders["predictor"] == [1] + [2] * (steps - 2) + [1]
    assert ref_orders["corrector"] == scheduler.orders["corrector"] == [1] + [2] * (steps - 2)
    # Schedules: the same float64 NumPy ops on both sides, then float32 / int64 casts: exact.
    np.testing.assert_array_equal(mine["sigmas"], ref["sigmas"])
    np.testing.assert_array_equal(mine["timesteps"], ref["timesteps"])
    assert mine.dtypes["timesteps"] == ref.dtypes["timesteps"] == "int64"
    assert mine.dtypes["sigmas"] == ref.dtypes["sigmas"] == "float32"
    assert all(mine.dtypes[n] == ref.dtypes[n] == "float32" for n in ref.order if n.startswith("step"))


def test_layer_names_in_execution_order():
    ref, _ = run_reference(config(5))
    assert ref.order == [
        "sigmas", "timesteps",
        "step0/predictor", "step0/sample",
        "step1/corrector", "step1/predictor", "step1/sample",
        "step2/corrector", "step2/predictor", "step2/sample",
        "step3/corrector", "step3/predictor", "step3/sample",
        "step4/corrector", "step4/predictor", "step4/sample",
    ]


def test_final_step_lands_on_the_x0_prediction():
    """Final sigma 0, order 1: the last predictor returns the x0 of the corrected last sample (h = inf handled)."""
    cfg = config(5)
    mine, scheduler = run_ours(cfg)
    assert scheduler.sigmas[-1] == 0 and np.isfinite(mine["step4/sample"]).all()
    np.testing.assert_allclose(mine["step4/sample"], np.array(scheduler.model_outputs[-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [
    {"solver_order": 3}, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min", "flow_shift": 3.0},
    {"disable_corrector": [0, 2]}, {"final_sigmas_type": "sigma_min"}, {"flow_shift": 1.0},
])
def test_float32_variants(variant):
    """Orders 3 (the rho solves of predictor and corrector), bh1, no lower-order final, disabled correctors,
    sigma_min (bh1 and order 2 at the end only with it: with a final sigma 0 the reference's last step is NaN)."""
    cfg = config(8, **variant)
    ref, ref_orders = run_reference(cfg)
    mine, scheduler = run_ours(cfg)
    assert_match(ref, mine)
    assert ref_orders == scheduler.orders
    if "disable_corrector" in variant:
        assert "step1/corrector" not in ref and "step3/corrector" not in ref and "step2/corrector" in ref
    if variant.get("solver_order") == 3:
        assert max(ref_orders["predictor"]) == max(ref_orders["corrector"]) == 3


@pytest.mark.parametrize("variant", [{"solver_type": "bh1"}, {"lower_order_final": False}])
def test_reference_nan_at_a_final_sigma_of_zero_is_reproduced(variant):
    """diffusers' last step with sigma 0 is NaN for bh1 (alpha_t * B_h * 0 with B_h = -inf) and for an order-2
    last step (r_1 = 0, D1 = inf: +-inf): we mirror both, so the sides agree up to it and break at the same layer."""
    cfg = config(8, **variant)
    ref, mine = run_reference(cfg)[0], run_ours(cfg)[0]
    first = first_difference(compare(ref, mine))
    assert (first.name, first.reason) == ("step7/predictor", "NaN/Inf")
    assert not np.isfinite(ref["step7/sample"]).any() and not np.isfinite(mine["step7/sample"]).any()
    np.testing.assert_array_equal(np.isnan(ref["step7/sample"]), np.isnan(mine["step7/sample"]))


@pytest.mark.parametrize("seed", [1, 2])
def test_float32_other_seeds(seed):
    cfg = config(8)
    assert_match(run_reference(cfg, seed=seed)[0], run_ours(cfg, seed=seed)[0])


# --- bf16 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [8, 20])
def test_bfloat16_denoiser_within_precision_budget(steps):
    """Denoiser in bf16, latents float32 (as the pipeline): finite, and per layer our error against a
    float64 reference run at most 2x the reference's own bf16 error (or agreeing with its bf16 run)."""
    cfg = config(steps)
    ref, _ = run_reference(cfg, "bfloat16")
    truth, _ = run_reference(cfg, "float64")
    mine, _ = run_ours(cfg, "bfloat16")
    assert mine.order == ref.order == truth.order
    assert all(np.isfinite(mine[n]).all() for n in mine.order)
    # x0 = sample - sigma * flow: the product in bf16, the rest float32, on both sides
    assert all(mine.dtypes[n] == ref.dtypes[n] == "float32" for n in ref.order if n.startswith("step"))
    rows = precision_budget(ref, mine, truth)
    bad = [(r.name, r.ours, r.ref) for r in rows if not r.ok]
    assert not bad, bad
    last = rows[-1]
    print(f"\nbf16 {steps} steps, {last.name}: rmse vs float64 ours {last.ours:.3g} ref {last.ref:.3g} "
          f"(max abs {last.max_abs_ours:.3g} / {last.max_abs_ref:.3g}); worst ratio "
          f"{max(r.ratio for r in rows if r.ref):.3g}")


def test_bfloat16_x0_conversion_is_the_references():
    """On the same bf16 flow, x0 = sample - sigma * flow equals diffusers' convert_model_output exactly: sigma is
    rounded to bf16 and the product is bf16 (a 0-d float32 tensor does not promote a bf16 tensor), the difference
    float32. Two IEEE-rounded elementwise ops, no reduction or BLAS, so exact equality is the right check.
    (The bf16 trajectories still differ by ~1 bf16 ulp: the stand-in's bf16 Linear rounds differently per side.)"""
    cfg = config(8)
    reference = R.build(cfg, weights(cfg)).scheduler
    reference.set_timesteps(8)
    flow = normal(0, "unipc/flow", (1, 4, 3, 8, 8))
    sample = latents(cfg)
    for k in range(8):
        reference._step_index = k
        expected = reference.convert_model_output(torch.from_numpy(flow).to(torch.bfloat16),
                                                  sample=torch.from_numpy(sample)).numpy()
        got = U.convert_model_output(mx.array(flow).astype(mx.bfloat16), mx.array(sample), reference.sigmas[k].numpy())
        assert got.dtype == mx.float32
        np.testing.assert_array_equal(np.array(got), expected)


def test_bfloat16_teacher_forced_local_error():
    """Teacher forced on the float64 trajectory: per-step local bf16 errors, ours within 2x the reference's."""
    cfg = config(8)
    truth, _ = run_reference(cfg, "float64")
    forced = teacher(truth, cfg)
    ref, _ = run_reference(cfg, "bfloat16", forced=forced)
    truth_forced, _ = run_reference(cfg, "float64", forced=forced)
    mine, _ = run_ours(cfg, "bfloat16", forced=forced)
    rows = precision_budget(ref, mine, truth_forced)
    assert all(r.ok for r in rows), [(r.name, r.ratio) for r in rows if not r.ok]
    free, _ = run_reference(cfg, "bfloat16")
    # local errors do not compound: the last step's error is below the free-running one
    assert rows[-1].max_abs_ref < max_abs(truth, free, "step7/sample")


# --- teacher forcing -------------------------------------------------------------------------
def test_teacher_forced_trajectory_matches():
    cfg = config(8)
    free, _ = run_reference(cfg)
    forced = teacher(free, cfg)
    ref, _ = run_reference(cfg, forced=forced)
    mine, _ = run_ours(cfg, forced=forced)
    assert_match(ref, mine)
    assert_match(free, ref)  # forcing the reference with its own states reproduces its free run


def corrector_at_order_one_at_step(step):
    correct = U.UniPCMultistepScheduler.corrector

    def corrector(self, model_t, last_sample, this_sample, order):
        return correct(self, model_t, last_sample, this_sample, 1 if self.step_index == step else order)

    return corrector


def test_teacher_forcing_localises_a_one_step_fault(monkeypatch):
    """A corrector run at the wrong order at step 3 only: free running, every later layer differs;
    teacher forced, only step 3's layers do."""
    monkeypatch.setattr(U.UniPCMultistepScheduler, "corrector", corrector_at_order_one_at_step(3))
    cfg = config(8)
    free, _ = run_reference(cfg)
    layers = compare(free, run_ours(cfg)[0])
    assert first_difference(layers).name == "step3/corrector"
    assert all(not layer.ok for layer in layers if layer.name.startswith(("step4/", "step7/")))
    forced = teacher(free, cfg)
    ref, _ = run_reference(cfg, forced=forced)
    failing = [layer.name for layer in compare(ref, run_ours(cfg, forced=forced)[0]) if not layer.ok]
    assert failing == ["step3/corrector", "step3/predictor", "step3/sample"]


# --- schedule conventions --------------------------------------------------------------------
def test_original_wan_schedule_differs_from_diffusers():
    """Wan's FlowUniPCMultistepScheduler grid is diffusers' minus 0.001 before the shift (0.999 ... 0 vs
    1 ... 1/1000, same spacing). After shift 5 its sigmas are lower by 2.0e-4 at the first step (0.99980 vs
    1 - 1e-6) growing to the last: 2.2e-3 at 8 steps, 4.1e-3 at 40; timesteps by 0-2 (8 steps) / 0-4 (40)."""
    for steps in (8, 40):
        cfg = config(steps)
        ref, _ = run_reference(cfg)
        mine, _ = run_ours(cfg, scheduler=ours(cfg, "original"))
        assert first_difference(compare(ref, mine)).name == "sigmas"
        d_sigma = ref["sigmas"].astype(np.float64) - mine["sigmas"]
        d_t = ref["timesteps"] - mine["timesteps"]
        assert d_sigma.min() >= 0 and 1.9e-4 < d_sigma[0] < 2.1e-4 and d_sigma.max() < 5e-3, d_sigma
        assert d_t.min() >= 0 and 1 <= d_t.max() <= 4 and d_t[0] == 0, d_t
        print(f"\n{steps} steps, shift 5: sigmas differ by up to {d_sigma.max():.3g}, timesteps by up to {d_t.max()}")


def test_original_schedule_values():
    """Spot values of Wan's convention: sigma_max = float32(0.999), sigma_min = 0, shifted by 5, no nudge."""
    sigmas, timesteps = U.original_flow_sigmas(4, 1000, 5.0)
    s = np.linspace(float(np.float32(0.999)), 0.0, 5)[:-1]
    np.testing.assert_array_equal(sigmas, np.append(5 * s / (1 + 4 * s), 0).astype(np.float32))
    np.testing.assert_array_equal(timesteps, (5 * s / (1 + 4 * s) * 1000).astype(np.int64))
    assert timesteps[0] == 999 and sigmas[0] < 1 - 1e-6


def test_original_schedule_matches_when_the_reference_runs_on_its_sigmas():
    """Teacher forcing of the schedule: the real diffusers solver on our 'original' sigmas/timesteps."""
    for steps in (8, 20):
        cfg = config(steps)
        scheduler = ours(cfg, "original")
        ref, ref_orders = run_reference(cfg, schedule=(scheduler.sigmas, scheduler.timesteps))
        mine, scheduler = run_ours(cfg, scheduler=scheduler)
        assert_match(ref, mine)
        np.testing.assert_array_equal(ref["sigmas"], mine["sigmas"])
        assert ref_orders == scheduler.orders


def test_set_timesteps_sigmas_shifts_the_given_sigmas_again():
    """Why the runner assigns sigmas instead of set_timesteps(sigmas=...): diffusers 0.42.1 shifts them."""
    reference = ReferenceScheduler.from_config({k: v for k, v in CONFIG["scheduler"].items() if k[0] != "_"})
    sigmas, _ = U.original_flow_sigmas(8, 1000, 5.0)
    reference.set_timesteps(sigmas=sigmas[:-1].astype(np.float64))  # a list (as annotated) fails: flow_shift * list
    twice = U.shift_sigmas(sigmas[:-1].astype(np.float64), 5.0).astype(np.float32)
    np.testing.assert_allclose(reference.sigmas.numpy()[:-1], twice, rtol=1e-6)
    # ... and given the unshifted grid, it reproduces set_timesteps(N)
    reference.set_timesteps(sigmas=np.linspace(1, 1 / 1000, 9)[:-1])
    np.testing.assert_array_equal(reference.sigmas.numpy(), U.diffusers_flow_sigmas(8, 1000, 5.0)[0])


# --- faults ----------------------------------------------------------------------------------
def test_fault_flow_shift_applied_twice(monkeypatch):
    once = U.shift_sigmas
    monkeypatch.setattr(U, "shift_sigmas", lambda sigmas, shift: once(once(sigmas, shift), shift))
    cfg = config(8)
    layers = compare(run_reference(cfg)[0], run_ours(cfg)[0])
    assert first_difference(layers).name == "sigmas"
    assert not [layer for layer in layers if layer.name == "timesteps"][0].ok


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_fault_corrector_skipped_at_the_last_step(monkeypatch, final):
    """Named at step7/corrector (missing on our side). With Wan's final sigma 0 the final latents still match:
    the last predictor (order 1, sigma_t = 0) returns 0 * x + m0, the x0 of the *uncorrected* sample, so the
    last corrector never reaches the output; with a final "sigma_min" it does."""
    correct = U.UniPCMultistepScheduler.uses_corrector
    monkeypatch.setattr(U.UniPCMultistepScheduler, "uses_corrector",
                        lambda self, k: correct(self, k) and k < len(self.timesteps) - 1)
    cfg = config(8, final_sigmas_type=final)
    layers = compare(run_reference(cfg)[0], run_ours(cfg)[0])
    first = first_difference(layers)
    assert (first.name, first.reason) == ("step7/corrector", "missing on the MLX side")
    assert all(layer.ok for layer in layers[: layers.index(first)])
    assert [layer for layer in layers if layer.name == "step7/sample"][0].ok == (final == "zero")


def test_fault_corrector_at_the_wrong_order_is_named(monkeypatch):
    monkeypatch.setattr(U.UniPCMultistepScheduler, "corrector", corrector_at_order_one_at_step(5))
    cfg = config(8)
    assert first_difference(compare(run_reference(cfg)[0], run_ours(cfg)[0])).name == "step5/corrector"


# --- configuration ---------------------------------------------------------------------------
def test_fixture_config_is_a_valid_diffusers_config():
    """Every key of the Wan2.2 scheduler config is one diffusers 0.42.1 knows, with the value we wrote."""
    scheduler = {k: v for k, v in CONFIG["scheduler"].items() if not k.startswith("_")}
    reference = ReferenceScheduler.from_config(scheduler)
    assert {k: reference.config[k] for k in scheduler} == scheduler


@pytest.mark.parametrize("bad,error", [
    ({"use_karras_sigmas": True}, ValueError), ({"thresholding": True}, ValueError),
    ({"prediction_type": "epsilon"}, ValueError), ({"solver_type": "midpoint"}, ValueError),
    ({"no_such_key": 1}, TypeError),
])
def test_unported_options_are_refused(bad, error):
    with pytest.raises(error):
        U.UniPCMultistepScheduler(**{**CONFIG["scheduler"], **bad})


def test_use_flow_sigmas_must_be_set():
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        U.UniPCMultistepScheduler(prediction_type="flow_prediction")


def test_explicit_schedule_checks_its_length():
    scheduler = ours(config(5))
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.set_schedule(np.linspace(1, 0, 6), np.arange(3))
    scheduler.set_schedule(np.array([0.75, 0.5, 0.0]))
    np.testing.assert_array_equal(scheduler.timesteps, [750, 500])
    scheduler.set_schedule(np.array([0.9, 0.0]))  # float32(0.9) * 1000 = 899.99997: truncated, as the reference
    np.testing.assert_array_equal(scheduler.timesteps, [899])
