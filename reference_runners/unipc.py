"""UniPC reference: the real ``diffusers.UniPCMultistepScheduler`` driving the Wan pipelines' denoising loop.

What is real diffusers code and what mirrors it:

- every schedule is the real ``set_timesteps`` and every step the real ``step``: x0 conversion
  (``convert_model_output``), corrector (``multistep_uni_c_bh_update``), order selection, history,
  predictor (``multistep_uni_p_bh_update``). The two updates are recorded by wrapping them on the
  scheduler instance (:func:`recorded_updates`): the wrapper calls the real method and records
  its result, nothing is recomputed;
- the loop is ``WanImageToVideoPipeline.__call__``'s step 6 (also ``WanPipeline``'s), with one
  model and no guidance: ``timestep = t.expand(batch)``, ``noise_pred = model(latents.to(dtype),
  timestep)``, ``latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]``, latents
  float32 as ``prepare_latents(dtype=torch.float32)`` makes them (float64 in the float64 truth run);
- the model is ``reference.denoiser``: any module ``(latents (b, c, f, h, w), timestep (b,)) ->
  flow``; the component gives the stand-in (:mod:`reference_runners.stand_in`).

Schedule conventions (:func:`set_convention`), each run by diffusers' own ``set_timesteps``:

- ``"diffusers"``: ``set_timesteps(N)``: ``linspace(1, 1/n, N + 1)[:-1]``, shifted, first sigma
  nudged by -1e-6 when it is 1;
- ``"original"``: Wan's ``wan/utils/fm_solvers_unipc.py`` ``FlowUniPCMultistepScheduler`` as
  Wan's ``generate`` builds it (``shift=1`` at construction, ``set_timesteps(N, shift=shift)``)
  differs in the unshifted grid only: ``linspace(sigma_max, sigma_min, N + 1)[:-1]`` with
  ``sigma_max = float32(1 - 1/n)`` and ``sigma_min = 0`` from its float32 training sigmas
  (:func:`original_grid`). diffusers' ``set_timesteps(sigmas=grid)`` then does what Wan's does
  after the grid, op for op: the same shift in float64, timesteps ``int64(sigmas * n)``, a final
  sigma 0 (Wan's ``"sigma_min"`` reads ``alphas_cumprod``, which its class never sets: not a
  convention). Its 1e-6 nudge, which Wan lacks, fires only for a shifted first sigma within 1e-6
  of 1 (``flow_shift`` > ~1000): refused (:func:`original_unsupported`).

Teacher forcing:

- of the schedule: with ``schedule`` ``(sigmas, timesteps)`` given (the port's own), the solver
  runs on it after the convention's schedule was recorded. ``set_timesteps(sigmas=...)`` cannot
  take a finished schedule (it shifts the given sigmas again), so :func:`set_schedule` resets the
  solver with ``set_timesteps(N)`` and assigns ``scheduler.sigmas`` (float32, N + 1) and
  ``scheduler.timesteps`` (int64, N): all ``step`` reads is ``sigmas[step_index (+1, -1, -2)]``
  and ``len(timesteps)``, and the first step's index is ``index_for_timestep(timesteps[0])`` = 0;
- per step: ``forced=[(x_0, None), (x_1, last_1), ...]`` replaces the latents entering step k and
  the scheduler's ``last_sample`` (channels-last, e.g. a reference run's ``step{k-1}/sample`` and
  ``step{k-1}/corrector``), so each step's error is local. UniPC carries two samples from step to
  step: the corrector of step k restarts from ``last_sample`` (the corrected sample of step
  k - 1), so forcing only the latents would let an error chain through it.

Recorded, channels-last ``(b, f, h, w, c)``: ``sigmas``, ``timesteps`` (the convention's), then
per step ``step{k}/corrector`` (when it runs), ``step{k}/predictor``, ``step{k}/sample``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from parity.capture import Capture

#: The named schedule conventions (``"port"``, the port's own schedule, is none of them).
CONVENTIONS = ("diffusers", "original")

Schedule = tuple[np.ndarray, np.ndarray]
Forced = Sequence[tuple[np.ndarray, "np.ndarray | None"]]


class Reference(torch.nn.Module):
    """The real scheduler (the config's ``scheduler`` part), the sampling settings and the denoiser (the only weights)."""

    def __init__(self, config, denoiser: torch.nn.Module):
        super().__init__()
        self.scheduler = UniPCMultistepScheduler.from_config(config.scheduler.to_dict())
        self.denoiser = denoiser
        self.steps = config.steps
        self.reference_schedule = config.reference_schedule
        self.schedule_forcing = config.schedule_forcing


def channels_last(latents: torch.Tensor) -> torch.Tensor:
    return latents.permute(0, 2, 3, 4, 1)


def channels_first(latents: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(latents).transpose(0, 4, 1, 2, 3))).to(dtype)


def original_grid(num_inference_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The unshifted sigmas of Wan's ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(N)`` (float64, N values)."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    train = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)  # shift 1 at construction leaves them as they are
    sigma_min, sigma_max = train[-1].item(), train[0].item()
    return np.linspace(sigma_max, sigma_min, num_inference_steps + 1).copy()[:-1]


def original_unsupported(config: Mapping[str, Any]) -> str | None:
    """Why diffusers' ``set_timesteps`` cannot run the ``"original"`` convention for this scheduler config, or None."""
    if config["final_sigmas_type"] != "zero":
        return f"Wan's code has a final sigma 0 only, got final_sigmas_type {config['final_sigmas_type']!r}"
    first, shift = original_grid(1, config["num_train_timesteps"])[0], config["flow_shift"]
    if abs(shift * first / (1 + (shift - 1) * first) - 1) < 1e-6:
        return f"with flow_shift {shift} diffusers would nudge the first sigma by -1e-6, Wan's code does not"
    return None


def set_convention(scheduler: UniPCMultistepScheduler, convention: str, steps: int) -> None:
    """Set (and reset the solver to) ``convention``'s schedule of ``steps`` steps, with diffusers' ``set_timesteps``."""
    if convention == "diffusers":
        scheduler.set_timesteps(steps)
        return
    if convention != "original":
        raise ValueError(f"schedule convention: expected one of {CONVENTIONS}, got {convention!r}")
    why = original_unsupported(scheduler.config)
    if why:
        raise ValueError(f"schedule convention 'original': {why}")
    scheduler.set_timesteps(sigmas=original_grid(steps, scheduler.config.num_train_timesteps))


def set_schedule(scheduler: UniPCMultistepScheduler, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
    """Teacher forcing of the schedule: reset with ``set_timesteps(N)``, then assign the given schedule."""
    sigmas, timesteps = np.asarray(sigmas, np.float32), np.asarray(timesteps, np.int64)
    if sigmas.shape != (len(timesteps) + 1,):
        raise ValueError(f"schedule: expected N + 1 sigmas for N = {len(timesteps)} timesteps, got {sigmas.shape}")
    scheduler.set_timesteps(len(timesteps))
    scheduler.sigmas = torch.from_numpy(sigmas.copy())
    scheduler.timesteps = torch.from_numpy(timesteps.copy())


@contextmanager
def recorded_updates(scheduler: UniPCMultistepScheduler, capture: Capture) -> Iterator[None]:
    """Record every result of the instance's predictor and corrector as ``step{k}/predictor`` / ``step{k}/corrector``."""
    updates = {"predictor": scheduler.multistep_uni_p_bh_update, "corrector": scheduler.multistep_uni_c_bh_update}

    def wrap(kind: str, update):
        def recorded(*args, **kwargs):
            result = update(*args, **kwargs)
            capture.add(f"step{scheduler.step_index}/{kind}", channels_last(result))
            return result
        return recorded

    scheduler.multistep_uni_p_bh_update = wrap("predictor", updates["predictor"])
    scheduler.multistep_uni_c_bh_update = wrap("corrector", updates["corrector"])
    try:
        yield
    finally:
        del scheduler.multistep_uni_p_bh_update, scheduler.multistep_uni_c_bh_update  # the class's methods again


def convention_schedule(reference: Reference, convention: str) -> Schedule:
    """``convention``'s (sigmas, timesteps) for the reference's step count, as numpy."""
    set_convention(reference.scheduler, convention, reference.steps)
    return reference.scheduler.sigmas.numpy().copy(), reference.scheduler.timesteps.numpy().copy()


def run(reference: Reference, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture,
        forced: Forced | None = None) -> None:
    """The denoising loop from ``inputs["latents"]`` ``(b, c, f, h, w)``; ``dtype``: the model's dtype.

    The schedule recorded is ``reference.reference_schedule``'s (``"port"``: the port's own,
    ``inputs["schedule/sigmas"]`` and ``inputs["schedule/timesteps"]``); the solver runs on the
    port's when ``reference.schedule_forcing``. ``forced``: per step ``(x_k, last_k)`` channels-last
    (see the module docstring).
    """
    scheduler, denoiser = reference.scheduler, reference.denoiser
    port = (inputs["schedule/sigmas"], inputs["schedule/timesteps"])
    if reference.reference_schedule == "port":
        set_schedule(scheduler, *port)
    else:
        set_convention(scheduler, reference.reference_schedule, reference.steps)
    capture.add("sigmas", scheduler.sigmas)
    capture.add("timesteps", scheduler.timesteps)
    if reference.schedule_forcing and reference.reference_schedule != "port":
        set_schedule(scheduler, *port)
    latents = torch.from_numpy(np.asarray(inputs["latents"])).to(torch.float64 if dtype == torch.float64 else torch.float32)
    timesteps = scheduler.timesteps
    if forced is not None and len(forced) < len(timesteps):
        raise ValueError(f"forced: expected a state for each of the {len(timesteps)} steps, got {len(forced)}")
    with torch.no_grad(), recorded_updates(scheduler, capture):
        for i, t in enumerate(timesteps):
            if forced is not None:
                x_i, last_i = forced[i]
                latents = channels_first(x_i, latents.dtype)
                if last_i is not None:
                    scheduler.last_sample = channels_first(last_i, latents.dtype)
            noise_pred = denoiser(latents.to(dtype), t.expand(latents.shape[0]))
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            capture.add(f"step{i}/sample", channels_last(latents))
