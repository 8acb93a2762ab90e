"""Helios DMD scheduler parity, and proof that it fails, localised, on realistic porting faults."""
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import HeliosDMDScheduler as ReferenceScheduler

from mlx_impl import scheduler as S
from parity.components.scheduler import SCHEDULE as S_SCHEDULE
from parity.runner import run_component

THREE_STAGES = [0, 1 / 3, 2 / 3, 1]
#: diffusers' HeliosDMDScheduler hands torch tensors to np.linspace (its own warning, not ours).
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


def scheduler_config(stages, **kwargs):
    # gamma 0.25: at the shipped 1/3 the reference's block noise cannot be drawn on CPU (see below)
    # overrides are merged into the default config: say everything the default sets differently
    return {"stages": stages, "stage_range": [0, 1] if stages == 1 else THREE_STAGES, "gamma": 0.25,
            "use_dynamic_shifting": False, **kwargs}


def run(dtype="float32", **overrides):
    return run_component("scheduler", dtype, out_dir=None, overrides=overrides)


def schedule_layers(result):
    return [l for l in result.layers if not l.name.split("/")[-1].startswith(("step", "transition", "downsample"))]


# --- parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_float32_parity(seed):
    result = run_component("scheduler", "float32", seed=seed, out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    first = [
        "construction/sigmas", "construction/ori_start_sigmas", "construction/start_sigmas",
        "construction/end_sigmas", "construction/timestep_ratios", "construction/timesteps_per_stage",
        "construction/sigmas_per_stage", "time_shift/linear", "time_shift/exponential",
        "stage0/downsample", "stage0/timesteps", "stage0/sigmas", "stage0/step0", "stage0/step1",
        "stage1/timesteps", "stage1/sigmas", "stage1/transition", "stage1/step0", "stage1/step1",
        "stage2/timesteps", "stage2/sigmas", "stage2/transition", "stage2/step0", "stage2/step1",
    ]
    assert [l.name for l in result.layers] == first + [f"call2/{name}" for name in first]  # and the second call
    assert all(l.metrics["max_abs"] == 0.0 for l in schedule_layers(result))


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_parity(seed):
    result = run_component("scheduler", "bfloat16", seed=seed, out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    # dtypes follow the pipeline: stage 0 re-noises into its float32 start, x0 and later stages are bf16
    assert [l.dtype_mlx for l in result.layers] == [l.dtype_ref for l in result.layers]
    assert result.layer("stage0/step0").dtype_mlx == "float32"
    assert result.layer("stage1/step0").dtype_mlx == "bfloat16"


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_per_stage_schedules(stages, dynamic, kind):
    result = run(scheduler=scheduler_config(stages, use_dynamic_shifting=dynamic, time_shift_type=kind),
                 steps=[3] if stages == 1 else [2, 3, 2])
    assert result.verdict == "PASS", result.first_divergence
    assert all(l.metrics["max_abs"] == 0.0 for l in schedule_layers(result))
    assert result.layer(f"stage{stages - 1}/timesteps").shape_ref == (3 if stages == 1 else 2,)


@pytest.mark.parametrize("stages,shift", [(1, 3.0), (3, 3.0), (3, 1.0)])
def test_amplified_first_chunk_and_static_shift(stages, shift):
    result = run(scheduler=scheduler_config(stages, shift=shift), steps=[2] * stages, is_amplify_first_chunk=True)
    assert result.verdict == "PASS", result.first_divergence
    assert result.layer("stage0/timesteps").shape_ref == (4,)


def test_schedules_match_reference_at_shipped_defaults():
    """gamma = 1/3 as shipped (the trajectory runs use 0.25): every stage, amplified or not, with a mu."""
    for kwargs in ({}, {"use_dynamic_shifting": True}, {"use_dynamic_shifting": True, "time_shift_type": "exponential"}):
        ref, ours = ReferenceScheduler(**kwargs), S.HeliosDMDScheduler(**kwargs)
        assert ours.start_sigmas == [ref.start_sigmas[s] for s in range(3)]
        for stage in range(3):
            for amplify in (False, True):
                ref.set_timesteps(3, stage, mu=0.7, is_amplify_first_chunk=amplify)
                ours.set_timesteps(3, stage, mu=0.7, is_amplify_first_chunk=amplify)
                np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
                np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def test_defaults_match_the_reference():
    ours = S.HeliosDMDScheduler()
    for key, value in ReferenceScheduler().config.items():
        if not key.startswith("_") and key not in ("prediction_type", "use_flow_sigmas"):
            assert getattr(ours, key) == value, key
    ref, ours = ReferenceScheduler(stages=1), S.HeliosDMDScheduler(stages=1)  # extra stage_range entries unused
    ref.set_timesteps(3)
    ours.set_timesteps(3)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def test_diffusers_scheduler_config_file(tmp_path):
    """`--config` takes a diffusers scheduler folder; its scheduler_config.json replaces the scheduler part."""
    ReferenceScheduler(gamma=0.25, use_dynamic_shifting=True, time_shift_type="exponential").save_config(tmp_path)
    result = run_component("scheduler", "float32", out_dir=None, config_path=tmp_path)
    assert result.context.config.scheduler.time_shift_type == "exponential"
    assert result.verdict == "PASS", result.first_divergence


def sections(result):
    return {section.name: section for section in result.sections}


def test_drift_section():
    for dtype, series in (("float32", 2), ("bfloat16", 4)):
        drift = sections(run(dtype))["drift"]
        assert drift.kind == "curves" and drift.passed is None
        assert drift.data["x"][:3] == ["stage0/downsample", "stage0/step0", "stage0/step1"]
        assert drift.data["x"][-1] == "stage2/step1" and len(drift.data["series"]) == series
        assert all(len(v) == len(drift.data["x"]) and all(math.isfinite(x) for x in v) for v in drift.data["series"].values())


def test_schedule_and_solver_sections_of_a_correct_port():
    found = sections(run())
    assert found["schedule"].passed is True and found["schedule"].note.startswith("schedule = convention 'diffusers'")
    assert found["solver"].passed is True and found["solver"].note.startswith("9/9 layers pass")  # downsample, 2 transitions, 6 steps


def test_reference_schedule_port_judges_the_math_only():
    """The reference records and runs the port's own schedule: nothing of the schedule is judged, the
    section says which convention the port's schedule is."""
    result = run(reference_schedule="port")
    assert result.verdict == "PASS", result.first_divergence
    schedule = sections(result)["schedule"]
    assert schedule.passed is None and "The port's schedule is convention 'diffusers'" in schedule.note
    assert all(row[2] == "same" for row in schedule.data["rows"])


def shift_inverted_in_set_timesteps(monkeypatch):
    """A port whose stage schedules differ from diffusers' (another convention, or a bug in set_timesteps)."""
    monkeypatch.setattr(S.HeliosDMDScheduler, "time_shift",
                        lambda self, mu, sigma, t, tensor_order=True: inverse_shift(mu, sigma, t, None))
    return {"scheduler": scheduler_config(3, use_dynamic_shifting=True)}


def test_a_schedule_difference_is_not_a_solver_failure(monkeypatch):
    """Teacher forcing of the schedule (the default): the schedule fails at its first layer, the math passes."""
    result = run(**shift_inverted_in_set_timesteps(monkeypatch))
    assert_first_divergence(result, "stage0/timesteps", ["construction/sigmas_per_stage", "time_shift/linear"])
    found = sections(result)
    assert found["schedule"].passed is False and found["schedule"].failing == "stage0/timesteps"
    assert found["schedule"].note.startswith("schedule differs from convention 'diffusers'")
    assert found["solver"].passed is True
    assert all(layer.verdict == "PASS" for layer in result.layers
               if not S_SCHEDULE.fullmatch(layer.name.removeprefix("call2/")))


def test_without_schedule_forcing_the_schedule_difference_fails_the_steps(monkeypatch):
    result = run(schedule_forcing=False, **shift_inverted_in_set_timesteps(monkeypatch))
    assert_first_divergence(result, "stage0/timesteps")
    solver = sections(result)["solver"]
    assert solver.passed is False and solver.failing == "stage0/step0"


def test_reference_schedule_port_passes_another_schedule_and_says_how_far(monkeypatch):
    result = run(reference_schedule="port", **shift_inverted_in_set_timesteps(monkeypatch))
    assert result.verdict == "PASS", result.first_divergence
    note = sections(result)["schedule"].note
    assert "none of the named conventions" in note and "from 'diffusers': max abs stage0/timesteps" in note


def test_reference_schedule_port_still_fails_a_wrong_solver(monkeypatch):
    monkeypatch.setattr(S.HeliosDMDScheduler, "step", renoise_at_current_timestep)
    result = run(reference_schedule="port")
    assert_first_divergence(result, "stage0/step0", ["stage0/sigmas"])
    assert sections(result)["solver"].failing == "stage0/step0"


# --- fault injection -------------------------------------------------------------------
def assert_first_divergence(result, layer, still_passing=()):
    assert result.verdict == "FAIL"
    assert result.first_divergence == layer
    for name in still_passing:
        assert result.layer(name).verdict == "PASS", name


def brief_formula(mu, sigma, t, kind, tensor_order=True):
    """``mu*t / (mu + (1-mu)*t)``: not the reference's ``mu*t / (1 + (mu-1)*t)`` (t = 1 gives mu, not 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return mu * t / (mu + (1 - mu) * t)


def inverse_shift(mu, sigma, t, kind, tensor_order=True):
    """The inverse of the reference's shift, i.e. shifting by 1/mu: ``t / (mu + (1-mu)*t)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return t / (mu + (1 - mu) * t)


@pytest.mark.parametrize("wrong", [brief_formula, inverse_shift])
def test_fault_dynamic_shift_formula(monkeypatch, wrong):
    monkeypatch.setattr(S, "time_shift", wrong)
    result = run()
    assert_first_divergence(result, "time_shift/linear", ["construction/sigmas_per_stage"])
    assert result.layer("stage0/sigmas").verdict == "FAIL"


def test_fault_dynamic_shift_in_set_timesteps_only(monkeypatch):
    """The curves still pass; the first dependent layer is stage0/timesteps (derived from the shifted sigmas, recorded first)."""
    monkeypatch.setattr(S.HeliosDMDScheduler, "time_shift",
                        lambda self, mu, sigma, t, tensor_order=True: inverse_shift(mu, sigma, t, None))
    result = run(scheduler=scheduler_config(1, use_dynamic_shifting=True), steps=[3])
    assert_first_divergence(result, "stage0/timesteps", ["time_shift/linear", "time_shift/exponential"])
    assert result.layer("stage0/sigmas").verdict == "FAIL"


def test_fault_gamma_correction_skipped(monkeypatch):
    monkeypatch.setattr(S, "corrected_start_sigma", lambda start_sigma, gamma: start_sigma)
    assert_first_divergence(run(), "construction/start_sigmas", ["construction/ori_start_sigmas"])


def test_fault_amplify_first_chunk_ignored(monkeypatch):
    correct = S.HeliosDMDScheduler.set_timesteps
    monkeypatch.setattr(S.HeliosDMDScheduler, "set_timesteps",
                        lambda self, n, stage_index=None, mu=None, is_amplify_first_chunk=False:
                        correct(self, n, stage_index, mu))
    result = run(is_amplify_first_chunk=True)
    assert_first_divergence(result, "stage0/timesteps", ["stage0/downsample"])
    assert "shape mismatch" in result.layer("stage0/timesteps").reasons[0]


def test_fault_sigma_index_off_by_one(monkeypatch):
    correct = S.timestep_index
    monkeypatch.setattr(S, "timestep_index", lambda timesteps, t: correct(timesteps, t) + 1)
    assert_first_divergence(run(), "stage0/step0", ["stage0/sigmas"])


def test_fault_x0_conversion_in_bfloat16(monkeypatch):
    """x0 = xt - sigma * flow rounded through bf16 instead of float32 (the reference: float64)."""
    monkeypatch.setattr(S, "convert_flow_pred_to_x0", lambda flow, xt, sigma: (
        xt.astype(mx.bfloat16) - sigma * flow.astype(mx.bfloat16)).astype(flow.dtype))
    assert_first_divergence(run(), "stage0/step0", ["stage0/downsample", "stage0/sigmas"])


def renoise_at_current_timestep(self, model_output, timestep, sample, step_index, start_point):
    x0 = S.convert_flow_pred_to_x0(model_output, sample, self.sigma_at(timestep))
    if step_index < len(self.timesteps) - 1:
        return S.add_noise(x0, start_point, self.sigma_at(self.timesteps[step_index]))
    return x0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_renoise_at_current_timestep(monkeypatch, dtype):
    monkeypatch.setattr(S.HeliosDMDScheduler, "step", renoise_at_current_timestep)
    assert_first_divergence(run(dtype), "stage0/step0", ["stage0/downsample", "stage0/sigmas"])


def test_fault_block_noise_patch_interleave_dropped(monkeypatch):
    """Block noise reshaped straight from (block row, block column, patch row, patch column) to pixels,
    without the pipeline's permute: each 2x2 block's values land in a 1x4 strip."""
    correct = S.block_noise

    def strips(z, shape, gamma, patch_size):
        b, f, h, w, c = shape
        _, ph, pw = patch_size
        blocks = correct(z, shape, gamma, patch_size).reshape(b, f, h // ph, ph, w // pw, pw, c)
        return blocks.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)

    monkeypatch.setattr(S, "block_noise", strips)
    assert_first_divergence(run(), "stage1/transition", ["stage1/sigmas", "stage0/step1"])


def test_fault_mu_from_upsampled_latents(monkeypatch):
    """Later stages' mu from the upsampled latents (4x the tokens); the pipeline takes the previous stage's.
    calculate_shift is called once per stage and sampling loop (the port's schedule run for the reference's
    teacher forcing is one too), so every third call is a first stage's."""
    correct, calls = S.calculate_shift, []

    def after_upsample(image_seq_len):
        calls.append(image_seq_len)
        return correct(image_seq_len * (4 if (len(calls) - 1) % 3 else 1))

    monkeypatch.setattr(S, "calculate_shift", after_upsample)
    result = run()
    assert_first_divergence(result, "stage1/timesteps", ["stage0/sigmas", "stage0/step1"])  # shifted timesteps come first
    assert result.layer("stage1/sigmas").verdict == "FAIL"


def test_fault_downsample_without_rescale(monkeypatch):
    """Bilinear downsampling without the pipeline's `* 2` (which keeps the noise at unit variance)."""
    def mean_pool(x):
        b, f, h, w, c = x.shape
        return x.reshape(b, f, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5))

    monkeypatch.setattr(S, "downsample", mean_pool)
    assert_first_divergence(run(), "stage0/downsample", ["time_shift/exponential"])


# --- bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("stage_index", [3, -1, None])
def test_stage_index_out_of_range_is_a_key_error_like_the_reference(stage_index):
    with pytest.raises(KeyError):
        ReferenceScheduler().set_timesteps(2, stage_index)
    with pytest.raises(KeyError, match=r"stage_index: expected 0\.\.2 for 3 stages"):
        S.HeliosDMDScheduler().set_timesteps(2, stage_index)


@pytest.mark.parametrize("stages", [1, 3])
def test_zero_steps_give_an_empty_schedule_like_the_reference(stages):
    kwargs = {"stages": stages, "stage_range": [0, 1] if stages == 1 else THREE_STAGES}
    ref, ours = ReferenceScheduler(**kwargs), S.HeliosDMDScheduler(**kwargs)
    ref.set_timesteps(0, 0)
    ours.set_timesteps(0, 0)
    assert ours.timesteps.shape == (0,) == tuple(ref.timesteps.shape)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())  # [0.]
    assert ours.sigmas.dtype == ref.sigmas.numpy().dtype


def test_negative_steps_are_an_error():
    with pytest.raises(ValueError):  # numpy's "Number of samples, -1, must be non-negative"
        ReferenceScheduler().set_timesteps(-2, 0)
    with pytest.raises(ValueError, match="num_inference_steps: expected a count >= 0, got -1"):
        S.HeliosDMDScheduler().set_timesteps(-1, 0)


def test_mu_is_ignored_without_dynamic_shifting_like_the_reference():
    """The pipeline passes mu whatever the config, so this must not be an error."""
    ref, ours = ReferenceScheduler(), S.HeliosDMDScheduler()
    for mu in (None, 0.7):
        ref.set_timesteps(2, 1, mu=mu)
        ours.set_timesteps(2, 1, mu=mu)
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_missing_mu_with_dynamic_shifting_is_a_clear_type_error():
    with pytest.raises(TypeError):  # the reference: "unsupported operand type(s) for +: 'NoneType' and 'Tensor'"
        ReferenceScheduler(use_dynamic_shifting=True).set_timesteps(2, 0)
    with pytest.raises(TypeError, match="use_dynamic_shifting=True: set_timesteps needs mu"):
        S.HeliosDMDScheduler(use_dynamic_shifting=True).set_timesteps(2, 0)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="needs shift=1.0"):  # the reference: a bare assert
        S.HeliosDMDScheduler(shift=3.0, use_dynamic_shifting=True).set_timesteps(2, 0, mu=0.5)
    with pytest.raises(ValueError, match="time_shift_type: expected one of"):
        S.HeliosDMDScheduler(time_shift_type="cosine")
    with pytest.raises(ValueError, match="stage_range: expected 4 boundaries"):
        S.HeliosDMDScheduler(stage_range=[0, 0.5, 1])
    with pytest.raises(ValueError, match=r"latent size 12x16: expected multiples of 8x8"):
        run(height=12)
    with pytest.raises(ValueError, match=r"block noise: expected draws of shape \(64, 4\)"):
        S.block_noise(np.zeros((63, 4), np.float32), (1, 1, 8, 8, 4), 0.25, (1, 2, 2))


# --- the shipped gamma ------------------------------------------------------------------
def test_shipped_gamma_block_noise():
    """At gamma = 1/3 the 2x2-block covariance is singular; diffusers factors it in float32, where its 1e-8 ridge
    rounds away. Whether CPU LAPACK then rejects it ("not positive-definite", known upstream: vllm-omni #4908, #7224)
    or returns a factor whose last pivot is rounding noise depends on the LAPACK build and the CPU (rejected on AMD
    EPYC; on an Intel Xeon with AVX-512 the last pivot came out 4.2e-4). What holds everywhere: ours factors in
    float64 and reproduces the covariance; and when the reference does succeed, its noise equals ours up to what a
    float32 factor of a singular matrix determines: its last pivot is noise of order sqrt(float32 eps)."""
    from reference_runners.scheduler import sample_block_noise

    def blocks_of(channels_last):  # (2, 1, 8, 8, 4) -> one row of 4 values per 2x2 block, in the draws' order
        return channels_last.reshape(2, 1, 4, 2, 4, 2, 4).transpose(0, 6, 1, 2, 4, 3, 5).reshape(-1, 4)

    draws = np.random.default_rng(0).standard_normal((2 * 4 * 4 * 4, 4)).astype(np.float32)
    ours = blocks_of(np.array(S.block_noise(draws, (2, 1, 8, 8, 4), 1 / 3, (1, 2, 2))))
    np.testing.assert_allclose(ours, draws @ np.linalg.cholesky(np.eye(4) * 4 / 3 - 1 / 3 + np.eye(4) * 1e-8).T,
                               rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours.sum(axis=1), 0, atol=1e-3)  # gamma = 1/3: each block sums to ~0
    try:
        reference = sample_block_noise(ReferenceScheduler(), (2, 4, 1, 8, 8), (1, 2, 2), draws)
    except torch.linalg.LinAlgError as err:
        assert "not positive-definite" in str(err)
        return
    theirs = blocks_of(reference.numpy().transpose(0, 2, 3, 4, 1))
    pivot_noise = 4 * math.sqrt(np.finfo(np.float32).eps)  # the undetermined last pivot, with room (x4)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=pivot_noise * float(np.abs(draws).max()))
