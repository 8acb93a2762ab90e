"""UniPC scheduler (Wan2.1/2.2): schedule, predictor and corrector of every step, on a fixed denoiser.

Layers, in execution order: ``sigmas``, ``timesteps`` (the schedule, judged against the
``reference_schedule`` convention), then per step ``step{k}/corrector`` (from the second step
on, unless disabled), ``step{k}/predictor``, ``step{k}/sample`` (the solver math, run on the
port's own schedule with ``schedule_forcing``: see :mod:`parity.components._sampling`). Both
sides start from the same noise and call the same denoiser, so the trajectory isolates the
scheduler.

Sections: the solver-math verdict and the schedule against every named convention
(:mod:`parity.components._sampling`), the trajectory's drift per step, and **teacher forcing**:
every step run again on both sides from the reference's own state (its latents and
``last_sample``), judged as layers are, so each step's local error shows next to the
free-running one.

The denoiser is a seam: :meth:`UniPCSchedulerComponent.reference_denoiser` and
:meth:`~UniPCSchedulerComponent.mlx_denoiser` build the two sides' ``(latents, timestep) -> flow``
(torch channels-first with a timestep per batch row; MLX channels-last with an int). The stand-in
here; a subclass may return a transformer wrapper instead (the weights are the reference's
``denoiser`` submodule, ``denoiser.*`` in a checkpoint).
"""
from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import model_validator

from fixtures.inputs import normal
from mlx_impl import unipc as U
from mlx_impl.stand_in import StandInDenoiser
from parity.capture import Capture
from parity.component import Component, RunContext, Section
from parity.components._diffusers import UniPCSchedulerConfig
from parity.components._sampling import (Sampler, port_inputs, schedule_section, solver_section, teacher_forced_steps,
                                         teacher_states, trajectory_section)
from parity.config import Bool, ComponentConfig, PositiveInt
from parity.weights import strict_load

SCHEDULE = ("sigmas", "timesteps")


class UniPCConfig(ComponentConfig):
    scheduler: UniPCSchedulerConfig
    steps: PositiveInt
    #: Our port's schedule convention (what a port under test would have built in).
    mlx_schedule: Literal["diffusers", "original"] = "diffusers"
    reference_schedule: Literal["diffusers", "original", "port"] = "diffusers"
    schedule_forcing: Bool = True
    batch: PositiveInt = 1
    channels: PositiveInt
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt

    @model_validator(mode="after")
    def _conventions(self) -> "UniPCConfig":
        from reference_runners.unipc import original_unsupported

        why = original_unsupported(self.scheduler.to_dict())
        for key in ("mlx_schedule", "reference_schedule"):
            if getattr(self, key) == "original" and why:
                raise ValueError(f"{key} 'original': {why}")
        return self


class UniPCSchedulerComponent(Component):
    name = "unipc_scheduler"
    description = ("UniPCMultistepScheduler (Wan2.1/2.2, flow matching): schedule vs a named convention, predictor "
                   "and corrector per step on the port's schedule, teacher-forced local errors")
    #: one, two and three steps (first-order start, lower-order final); third order
    coverage = ({"steps": 1}, {"steps": 2}, {"steps": 3}, {"scheduler": {"solver_order": 3}})
    config_model = UniPCConfig
    reference_runner = "unipc"
    diffusers_config_key = "scheduler"
    diffusers_config_file = "scheduler_config.json"
    reference_submodule = "denoiser"
    weights_prefix = "denoiser."

    # --- the denoiser seam --------------------------------------------------------------------
    def reference_denoiser(self, config: UniPCConfig, seed: int) -> Any:
        from reference_runners import stand_in

        return stand_in.build(config.channels, seed, "unipc")

    def mlx_denoiser(self, config: UniPCConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        denoiser = StandInDenoiser(config.channels)
        strict_load(denoiser, weights, dtype=getattr(mx, dtype))
        return denoiser

    # --- the two sides ----------------------------------------------------------------------
    def mlx_scheduler(self, config: UniPCConfig) -> U.UniPCMultistepScheduler:
        return U.UniPCMultistepScheduler(**config.scheduler.to_dict(), schedule=config.mlx_schedule)

    def port_schedule(self, config: UniPCConfig) -> dict[str, np.ndarray]:
        """The port's own sigmas and timesteps (the reference's input for teacher forcing of the schedule)."""
        scheduler = self.mlx_scheduler(config)
        scheduler.set_timesteps(config.steps)
        return {"sigmas": scheduler.sigmas, "timesteps": scheduler.timesteps}

    def make_inputs(self, config: UniPCConfig, seed: int) -> dict[str, np.ndarray]:
        shape = (config.batch, config.channels, config.frames, config.height, config.width)
        return {"latents": normal(seed, "unipc/latents", shape), **port_inputs(self.port_schedule(config))}

    def build_reference(self, config: UniPCConfig, seed: int) -> Any:
        from reference_runners.unipc import Reference

        return Reference(config, self.reference_denoiser(config, seed))

    def build_mlx(self, config: UniPCConfig, weights: dict[str, np.ndarray], dtype: str) -> Sampler:
        return Sampler(self.mlx_scheduler(config), self.mlx_denoiser(config, weights, dtype), config)

    def run_mlx(self, model: Sampler, inputs: dict, dtype: str, forced: U.Forced | None = None) -> None:
        """The Wan denoising loop on our scheduler (``set_timesteps`` resets it); ``forced``: per-step teacher forcing."""
        model.scheduler.set_timesteps(model.config.steps)
        latents = mx.array(np.ascontiguousarray(inputs["latents"].transpose(0, 2, 3, 4, 1)))
        mx.eval(U.sample(model.scheduler, latents, model.denoiser, getattr(mx, dtype), forced))

    # --- sections -----------------------------------------------------------------------------
    def views(self, run: RunContext) -> list[Section]:
        config = run.config
        return [solver_section(run, SCHEDULE, config.schedule_forcing, config.reference_schedule),
                trajectory_section(run, [n for n in run.ref.order if n.endswith("/sample")], "step")]

    def extra_runs(self, run: RunContext) -> list[Section]:
        return [self.schedule(run), *self.teacher_forcing(run)]

    def schedule(self, run: RunContext) -> Section:
        """The port's schedule against every named convention, each built by diffusers' own set_timesteps."""
        from reference_runners import unipc as runner

        reference = self.cast_reference(run.reference, "float32")
        others = {}
        for convention in runner.CONVENTIONS:
            applies = convention != "original" or not runner.original_unsupported(run.config.scheduler.to_dict())
            if convention != run.config.reference_schedule and applies:
                sigmas, timesteps = runner.convention_schedule(reference, convention)
                others[convention] = capture = Capture("reference")
                capture.add("sigmas", sigmas)
                capture.add("timesteps", timesteps)
        return schedule_section(run, SCHEDULE, run.config.reference_schedule, others)

    def teacher_forcing(self, run: RunContext) -> list[Section]:
        """Each step run on both sides from the reference's state entering it (its latents and last_sample,
        the corrector's restart point), judged as layers are (:mod:`parity.teacher_forcing`)."""
        import torch

        from reference_runners import unipc as runner

        states = teacher_states(run.ref, run.inputs["latents"], len(run.inputs["schedule/timesteps"]))

        def reference(dtype: str, capture: Capture) -> None:
            with torch.no_grad():
                runner.run(self.cast_reference(run.reference, dtype), run.inputs, getattr(torch, dtype), capture,
                           forced=states)

        def mlx(capture: Capture) -> None:
            with self.mlx_capture(run.mlx_model, capture):
                self.run_mlx(run.mlx_model, run.inputs, run.dtype, forced=states)

        return teacher_forced_steps(run, reference, mlx, lambda name: name not in SCHEDULE)


COMPONENT = UniPCSchedulerComponent()
