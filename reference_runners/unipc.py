"""UniPC reference: the real ``diffusers.UniPCMultistepScheduler`` driving the Wan pipelines' denoising loop.

What is real diffusers code and what mirrors it:

- the schedule is the real ``set_timesteps`` and every step the real ``step``: x0 conversion
  (``convert_model_output``), corrector (``multistep_uni_c_bh_update``), order selection, history,
  predictor (``multistep_uni_p_bh_update``). The two updates are recorded by wrapping them on the
  scheduler instance (:func:`recorded_updates`): the wrapper calls the real method and records
  its result, nothing is recomputed;
- the loop is ``WanImageToVideoPipeline.__call__``'s step 6 (also ``WanPipeline``'s), with one
  model and no guidance: ``timestep = t.expand(batch)``, ``noise_pred = model(latents.to(dtype),
  timestep)``, ``latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]``, latents
  float32 as ``prepare_latents(dtype=torch.float32)`` makes them (float64 in the float64 truth run);
- the transformer is :class:`reference_runners.scheduler.StandInDenoiser` (the same stand-in as
  the Helios scheduler component; MLX twin ``mlx_impl.stand_in.StandInDenoiser``).

Two teacher-forced modes:

- ``schedule=(sigmas, timesteps)``: the scheduler runs on a given schedule (e.g. our port's
  "original" Wan sigmas), so the solver math is checked on it. diffusers 0.42.1's
  ``set_timesteps(sigmas=...)`` cannot do this: with ``use_flow_sigmas`` it treats the given
  sigmas as *unshifted* (it applies ``flow_shift``, or the dynamic time shift, and the 1e-6 nudge
  of a first sigma of 1 to them; ``num_inference_steps = len(sigmas)`` and a final sigma is
  appended). So :func:`run` calls ``set_timesteps(N)`` (which also resets the solver state) and
  then assigns ``scheduler.sigmas`` (float32, N + 1) and ``scheduler.timesteps`` (int64, N): all
  ``step`` reads is ``sigmas[step_index (+1, -1, -2)]`` and ``len(timesteps)``, and the first
  step's index comes from ``index_for_timestep(timesteps[0])`` = 0;
- ``forced=[(x_0, None), (x_1, last_1), ...]``: the latents entering step k and the scheduler's
  ``last_sample`` are replaced by ``forced[k]`` (channels-last, e.g. a reference run's
  ``step{k-1}/sample`` and ``step{k-1}/corrector``), so each step's error is local. UniPC carries
  two samples from step to step: the corrector of step k restarts from ``last_sample`` (the
  corrected sample of step k - 1), so forcing only the latents would let an error chain through it.

Recorded, channels-last ``(b, f, h, w, c)``: ``sigmas``, ``timesteps``, then per step
``step{k}/corrector`` (when it runs), ``step{k}/predictor``, ``step{k}/sample``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from parity.capture import Capture
from reference_runners.scheduler import StandInDenoiser


class Reference(torch.nn.Module):
    """The real scheduler (from the config's ``scheduler`` part), the step count and the stand-in denoiser."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.scheduler = UniPCMultistepScheduler.from_config(
            {k: v for k, v in config["scheduler"].items() if not k.startswith("_")})
        self.denoiser = StandInDenoiser(config["channels"])
        self.steps = int(config["steps"])


def build(config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> Reference:
    """The reference with the stand-in's weights (numpy; every key used, none missing)."""
    reference = Reference(config)
    reference.denoiser.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)
    return reference


def channels_last(latents: torch.Tensor) -> torch.Tensor:
    return latents.permute(0, 2, 3, 4, 1)


def channels_first(latents: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(latents).transpose(0, 4, 1, 2, 3))).to(dtype)


@contextmanager
def recorded_updates(scheduler: UniPCMultistepScheduler, capture: Capture,
                     orders: dict[str, list[int]]) -> Iterator[None]:
    """Record every result of the instance's predictor and corrector (and the order each ran at)."""
    updates = {"predictor": scheduler.multistep_uni_p_bh_update, "corrector": scheduler.multistep_uni_c_bh_update}

    def wrap(kind: str, update):
        def recorded(*args, **kwargs):
            result = update(*args, **kwargs)
            orders[kind].append(int(kwargs["order"]))  # step() passes every argument by keyword
            capture.add(f"step{scheduler.step_index}/{kind}", channels_last(result))
            return result
        return recorded

    scheduler.multistep_uni_p_bh_update = wrap("predictor", updates["predictor"])
    scheduler.multistep_uni_c_bh_update = wrap("corrector", updates["corrector"])
    try:
        yield
    finally:
        del scheduler.multistep_uni_p_bh_update, scheduler.multistep_uni_c_bh_update  # the class's methods again


def set_schedule(scheduler: UniPCMultistepScheduler, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
    """Teacher forcing of the schedule: reset with ``set_timesteps(N)``, then assign the given schedule."""
    sigmas, timesteps = np.asarray(sigmas, np.float32), np.asarray(timesteps, np.int64)
    if sigmas.shape != (len(timesteps) + 1,):
        raise ValueError(f"schedule: expected N + 1 sigmas for N = {len(timesteps)} timesteps, got {sigmas.shape}")
    scheduler.set_timesteps(len(timesteps))
    scheduler.sigmas = torch.from_numpy(sigmas.copy())
    scheduler.timesteps = torch.from_numpy(timesteps.copy())


def run(reference: Reference, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture,
        schedule: tuple[np.ndarray, np.ndarray] | None = None,
        forced: Sequence[tuple[np.ndarray, np.ndarray | None]] | None = None) -> dict[str, list[int]]:
    """The denoising loop from ``inputs["latents"]`` ``(b, c, f, h, w)``; ``dtype``: the model's dtype.

    ``schedule``: run on these ``(sigmas, timesteps)``; ``forced``: per step ``(x_k, last_k)``
    channels-last, the latents entering step k and the scheduler's ``last_sample`` (see the module docstring).

    Returns the orders the predictor and the corrector ran at, per call.
    """
    scheduler, denoiser = reference.scheduler, reference.denoiser.to(dtype)
    if schedule is None:
        scheduler.set_timesteps(reference.steps)
    else:
        set_schedule(scheduler, *schedule)
    latents = torch.from_numpy(np.asarray(inputs["latents"])).to(torch.float64 if dtype == torch.float64 else torch.float32)
    timesteps = scheduler.timesteps
    if forced is not None and len(forced) < len(timesteps):
        raise ValueError(f"forced: expected a state for each of the {len(timesteps)} steps, got {len(forced)}")
    capture.add("sigmas", scheduler.sigmas)
    capture.add("timesteps", timesteps)
    orders: dict[str, list[int]] = {"predictor": [], "corrector": []}
    with torch.no_grad(), recorded_updates(scheduler, capture, orders):
        for i, t in enumerate(timesteps):
            if forced is not None:
                x_i, last_i = forced[i]
                latents = channels_first(x_i, latents.dtype)
                if last_i is not None:
                    scheduler.last_sample = channels_first(last_i, latents.dtype)
            timestep = t.expand(latents.shape[0])
            noise_pred = denoiser(latents.to(dtype), timestep)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            capture.add(f"step{i}/sample", channels_last(latents))
    return orders
