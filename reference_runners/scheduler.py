"""Scheduler reference: the real ``diffusers.HeliosDMDScheduler`` driven by the Helios pyramid loop.

What is real diffusers code and what mirrors it:

- every schedule, ``set_timesteps``, ``time_shift``, ``step`` (x0 conversion and DMD re-noise)
  is the real ``HeliosDMDScheduler``, called with the arguments ``HeliosPyramidPipeline.__call__``
  passes (``cur_sampling_step``, ``dmd_noisy_tensor``, ``dmd_sigmas``, ``dmd_timesteps``, ``all_timesteps``);
- ``mu`` is the pipeline module's real ``calculate_shift``, and block noise its real
  ``HeliosPyramidPipeline.sample_block_noise``, called unbound on a minimal object holding only
  the scheduler. Importing the pipeline module needs ``transformers`` (its text encoder), which
  this harness does not install, so both functions are compiled from the installed pipeline's
  source file, unmodified (:func:`pipeline_functions`, via :mod:`reference_runners.pipeline_source`). The one ``torch.randn`` draw of
  ``sample_block_noise`` is replaced, for that call only, by the shared numpy draws
  (:func:`shared_randn`), so both sides get the same noise;
- the rest of the stage transition lives inline in ``HeliosPyramidPipeline.__call__`` and cannot
  be called; :func:`run_pyramid` reproduces it line for line with the same torch ops
  (bilinear ``F.interpolate`` * 2 down to stage 0; per stage: ``calculate_shift`` on the current
  latents, ``set_timesteps``, nearest ``F.interpolate`` up, ``alpha * latents + beta * block noise``).

The transformer is replaced by the stand-in of :mod:`reference_runners.stand_in`, a fixed random
channel map + tanh, identical to the MLX side's. Latents are recorded channels-last
(``b f h w c``), the layout of the MLX port.

The port's schedule (``inputs["schedule/<layer>"]``, see :mod:`parity.components._sampling`)
is used two ways: with ``reference_schedule = "port"`` the schedule layers recorded are the
port's (not judged); with ``schedule_forcing`` (or ``"port"``) the stages run on the port's
per-stage timesteps and sigmas and its ``ori_start_sigmas`` (teacher forcing of the schedule),
assigned after the real ``set_timesteps``: ``step`` reads the schedule only from the
``dmd_sigmas`` / ``dmd_timesteps`` / ``all_timesteps`` the loop passes it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import cache
from types import SimpleNamespace
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import HeliosDMDScheduler

from parity.capture import Capture
from reference_runners.pipeline_source import compile_functions


class Reference(torch.nn.Module):
    """The scheduler under test, the pipeline's sampling settings and the denoiser (the only weights)."""

    def __init__(self, config, denoiser: torch.nn.Module):
        super().__init__()
        self.scheduler = HeliosDMDScheduler(**config.scheduler.to_dict())
        self.denoiser = denoiser
        self.steps = list(config.steps)
        self.patch_size = tuple(config.patch_size)
        self.is_amplify_first_chunk = config.is_amplify_first_chunk
        self.reference_schedule = config.reference_schedule
        self.schedule_forcing = config.schedule_forcing


def channels_last(latents: torch.Tensor) -> torch.Tensor:
    return latents.permute(0, 2, 3, 4, 1)


def schedule_arrays(scheduler: HeliosDMDScheduler) -> dict[str, np.ndarray]:
    """The construction-time schedules: training sigmas, per-stage start/end sigmas, ratios, stage timesteps."""
    stages = range(scheduler.config.stages)
    return {
        "sigmas": scheduler.sigmas.numpy(),  # the global training sigmas until set_timesteps is called
        "ori_start_sigmas": np.array([scheduler.ori_start_sigmas[s] for s in stages]),
        "start_sigmas": np.array([scheduler.start_sigmas[s] for s in stages]),
        "end_sigmas": np.array([scheduler.end_sigmas[s] for s in stages]),
        "timestep_ratios": np.array([scheduler.timestep_ratios[s] for s in stages]),
        "timesteps_per_stage": np.stack([scheduler.timesteps_per_stage[s].numpy() for s in stages]),
        "sigmas_per_stage": np.stack([scheduler.sigmas_per_stage[s].numpy() for s in stages]),
    }


def time_shift_curves(config: dict, mu_grid: Sequence[float], t: np.ndarray) -> dict[str, np.ndarray]:
    """``time_shift(mu, 1, t)`` for every mu of the grid (rows), linear and exponential."""
    t = torch.from_numpy(t)
    curves = {}
    for kind in ("linear", "exponential"):
        scheduler = HeliosDMDScheduler.from_config(config, time_shift_type=kind)
        curves[kind] = torch.stack([scheduler.time_shift(float(mu), 1.0, t) for mu in mu_grid]).numpy()
    return curves


PIPELINE_MODULE = "diffusers.pipelines.helios.pipeline_helios_pyramid"


@cache
def pipeline_functions() -> SimpleNamespace:
    """``calculate_shift`` and ``HeliosPyramidPipeline.sample_block_noise`` from the installed pipeline's source.

    Their definitions are compiled as they are, in a namespace holding what they use (``torch``, ``math``);
    see :mod:`reference_runners.pipeline_source`.
    """
    return compile_functions(PIPELINE_MODULE, ["calculate_shift"], {"HeliosPyramidPipeline": ["sample_block_noise"]},
                             {"torch": torch, "math": math})


@contextmanager
def shared_randn(draws: np.ndarray) -> Iterator[None]:
    """Make the one ``torch.randn`` call inside the block return ``draws`` (float32), checking its shape."""
    original = torch.randn
    calls = []

    def randn(*size, **_kwargs):
        if tuple(size) != draws.shape:
            raise ValueError(f"block noise: the pipeline draws {tuple(size)}, the shared draws are {draws.shape}")
        if calls:
            raise RuntimeError("block noise: torch.randn called more than once")
        calls.append(size)
        return torch.from_numpy(draws.astype(np.float32))

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = original


def sample_block_noise(scheduler: HeliosDMDScheduler, shape: Sequence[int], patch_size: Sequence[int],
                       draws: np.ndarray) -> torch.Tensor:
    """The pipeline's own ``sample_block_noise`` on the shared draws."""
    pipe = SimpleNamespace(scheduler=scheduler)
    with shared_randn(draws):
        return pipeline_functions().sample_block_noise(pipe, *shape, tuple(patch_size), None, torch.Generator())


def run_pyramid(reference: Reference, latents: torch.Tensor, draws: Sequence[np.ndarray], dtype: torch.dtype,
                capture: Capture, forced: Mapping[str, np.ndarray] | None = None,
                record_forced: bool = False) -> torch.Tensor:
    """``HeliosPyramidPipeline.__call__``'s distilled sampling of one chunk (see the module docstring).

    ``draws[s - 1]``: the normal draws of stage s's block noise; ``dtype``: the model's dtype.
    ``forced``: a schedule to run the stages on (``stage{s}/timesteps``, ``stage{s}/sigmas``,
    ``construction/ori_start_sigmas``), recorded instead of the scheduler's own if ``record_forced``.
    """
    scheduler, denoiser = reference.scheduler, reference.denoiser
    if forced is not None:
        scheduler.ori_start_sigmas = {s: float(v) for s, v in enumerate(forced["construction/ori_start_sigmas"])}
    steps, patch_size = reference.steps, reference.patch_size
    batch_size, num_channels, num_frames, height, width = latents.shape
    num_stages = len(steps)

    latents = latents.permute(0, 2, 1, 3, 4).reshape(batch_size * num_frames, num_channels, height, width)
    for _ in range(num_stages - 1):
        height //= 2
        width //= 2
        latents = F.interpolate(latents, size=(height, width), mode="bilinear") * 2
    latents = latents.reshape(batch_size, num_frames, num_channels, height, width).permute(0, 2, 1, 3, 4)
    capture.add("stage0/downsample", channels_last(latents))
    start_point_list = [latents]

    for stage_idx in range(num_stages):
        image_seq_len = (latents.shape[-1] * latents.shape[-2] * latents.shape[-3]) // math.prod(patch_size)
        mu = pipeline_functions().calculate_shift(image_seq_len)  # the scheduler config has no base/max shift keys
        scheduler.set_timesteps(steps[stage_idx], stage_idx, mu=mu,
                                 is_amplify_first_chunk=reference.is_amplify_first_chunk)
        own = scheduler.timesteps, scheduler.sigmas
        if forced is not None:
            scheduler.timesteps = torch.from_numpy(forced[f"stage{stage_idx}/timesteps"].copy())
            scheduler.sigmas = torch.from_numpy(forced[f"stage{stage_idx}/sigmas"].copy())
        timesteps = scheduler.timesteps
        recorded = (timesteps, scheduler.sigmas) if record_forced else own
        capture.add(f"stage{stage_idx}/timesteps", recorded[0])
        capture.add(f"stage{stage_idx}/sigmas", recorded[1])

        if stage_idx > 0:
            height *= 2
            width *= 2
            latents = latents.permute(0, 2, 1, 3, 4).reshape(batch_size * num_frames, num_channels,
                                                             height // 2, width // 2)
            latents = F.interpolate(latents, size=(height, width), mode="nearest")
            latents = latents.reshape(batch_size, num_frames, num_channels, height, width).permute(0, 2, 1, 3, 4)
            ori_sigma = 1 - scheduler.ori_start_sigmas[stage_idx]
            gamma = scheduler.config.gamma
            alpha = 1 / (math.sqrt(1 + (1 / gamma)) * (1 - ori_sigma) + ori_sigma)
            beta = alpha * (1 - ori_sigma) / math.sqrt(gamma)
            noise = sample_block_noise(scheduler, latents.shape, patch_size, draws[stage_idx - 1]).to(dtype=dtype)
            latents = alpha * latents + beta * noise
            start_point_list.append(latents)
            capture.add(f"stage{stage_idx}/transition", channels_last(latents))

        for i, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(torch.int64)
            noise_pred = denoiser(latents.to(dtype), timestep)
            latents = scheduler.step(
                noise_pred, t, latents, return_dict=False, cur_sampling_step=i,
                dmd_noisy_tensor=start_point_list[stage_idx], dmd_sigmas=scheduler.sigmas,
                dmd_timesteps=scheduler.timesteps, all_timesteps=timesteps,
            )[0]
            capture.add(f"stage{stage_idx}/step{i}", channels_last(latents))
    return latents


def run(reference: Reference, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture,
        convention: str | None = None) -> None:
    """Record the construction schedules, the time-shift curves, then the whole pyramid trajectory.

    Latents start in float32 as the pipeline's ``prepare_latents(dtype=torch.float32)`` makes them
    (float64 in the float64 truth run); ``dtype`` is the model's dtype. ``convention`` (``"diffusers"``)
    overrides the reference's ``reference_schedule`` and ``schedule_forcing``: diffusers' own schedule throughout.
    """
    chosen = convention or reference.reference_schedule
    port = {name.removeprefix("schedule/"): v for name, v in inputs.items() if name.startswith("schedule/")}
    arrays = {f"construction/{name}": array for name, array in schedule_arrays(reference.scheduler).items()}
    curves = time_shift_curves(reference.scheduler.config, inputs["mu_grid"], inputs["t_grid"])
    arrays.update({f"time_shift/{kind}": curve for kind, curve in curves.items()})
    for name, array in arrays.items():
        capture.add(name, port[name] if chosen == "port" else array)
    forcing = chosen == "port" or (convention is None and reference.schedule_forcing)
    latents = torch.from_numpy(inputs["latents"]).to(torch.float64 if dtype == torch.float64 else torch.float32)
    draws = [inputs[f"block_noise/stage{s}"] for s in range(1, len(reference.steps))]
    run_pyramid(reference, latents, draws, dtype, capture, port if forcing else None, record_forced=chosen == "port")


def forced_step(reference: Reference, stage: int, step: int, latents: np.ndarray, start_point: np.ndarray,
                seq_shape: Sequence[int], dtype: torch.dtype) -> np.ndarray:
    """Step ``step`` of stage ``stage`` alone on given channels-last latents (teacher forcing): :func:`run_pyramid`'s
    loop body after ``set_timesteps`` for that stage (``seq_shape``: the (frames, height, width) its ``mu`` is
    computed from, the previous stage's). Latents keep the dtype they are given in; ``dtype`` is the model's."""
    scheduler, denoiser = reference.scheduler, reference.denoiser
    image_seq_len = math.prod(seq_shape) // math.prod(reference.patch_size)
    scheduler.set_timesteps(reference.steps[stage], stage, mu=pipeline_functions().calculate_shift(image_seq_len),
                            is_amplify_first_chunk=reference.is_amplify_first_chunk)
    timesteps = scheduler.timesteps
    t = timesteps[step]
    latents, start_point = (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3) for x in (latents, start_point))
    with torch.no_grad():
        noise_pred = denoiser(latents.to(dtype), t.expand(latents.shape[0]).to(torch.int64))
    out = scheduler.step(noise_pred, t, latents, return_dict=False, cur_sampling_step=step, dmd_noisy_tensor=start_point,
                         dmd_sigmas=scheduler.sigmas, dmd_timesteps=scheduler.timesteps, all_timesteps=timesteps)[0]
    return channels_last(out).numpy()
