"""Scheduler: Helios DMD schedules per stage, time-shift curves, and a full pyramid trajectory.

Layers, in execution order: ``construction/*`` (training sigmas, per-stage start/end sigmas,
ratios, stage timesteps/sigmas), ``time_shift/linear`` and ``time_shift/exponential`` (rows: the
config's ``mu_grid``), then per stage ``stage{s}/timesteps``, ``stage{s}/sigmas``, the latents
entering the stage (``stage0/downsample``, ``stage{s}/transition``) and after each step
(``stage{s}/step{k}``). The transformer is a stand-in (``mlx_impl.stand_in``) with the same
weights on both sides, so the trajectory isolates the scheduler and the stage transitions.

Schedule vs solver math (:mod:`parity.components._sampling`): the schedule layers (construction,
time shift, per-stage timesteps and sigmas) are judged against ``reference_schedule``:
``"diffusers"``, or ``"port"`` (the reference records the port's own: only the math is judged).
There is no ``"original"`` convention here: diffusers' ``HeliosDMDScheduler`` carries the Helios
team's copyright, and we know of no documented difference between it and the original Helios
code. With ``schedule_forcing`` the reference's stages run on the port's per-stage timesteps and
sigmas and its start sigmas (the re-noise of each stage transition reads them).

The default config uses gamma = 0.25, not Helios' 1/3: at 1/3 the 2x2 block-noise covariance is
singular, and the real pipeline's float32 Cholesky raises on CPU, so no reference trajectory
exists there (tests/test_scheduler.py checks our float64 factorisation at 1/3 separately).
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

import mlx.core as mx
import numpy as np
from pydantic import Field, model_validator

from fixtures.inputs import normal
from mlx_impl import scheduler as sched
from mlx_impl.stand_in import StandInDenoiser
from mlx_impl.taps import tap
from parity import teacher_forcing
from parity.capture import Capture
from parity.capture_mlx import record_taps
from parity.compare import FAIL, Judge, judge_tensors
from parity.component import Component, RunContext, Section
from parity.components._diffusers import HeliosDMDSchedulerConfig
from parity.components._sampling import (Sampler, port_inputs, schedule_section, solver_section, trajectory_section,
                                         zero_flow)
from parity.config import Bool, ComponentConfig, NonNegativeInt, PositiveFloat, PositiveInt, Triple
from parity.weights import strict_load

PREFIX = "denoiser."
CONSTRUCTION = ("sigmas", "ori_start_sigmas", "start_sigmas", "end_sigmas", "timestep_ratios",
                "timesteps_per_stage", "sigmas_per_stage")
#: The latents layers: entering each stage, and after each step.
TRAJECTORY = re.compile(r"stage\d+/(downsample|transition|step\d+)")
#: The schedule layers (everything else is the solver math: latents).
SCHEDULE = re.compile(r"(construction|time_shift)/.+|stage\d+/(timesteps|sigmas)")
STEP = re.compile(r"stage(\d+)/step(\d+)")


class SchedulerConfig(ComponentConfig):
    scheduler: HeliosDMDSchedulerConfig
    steps: list[NonNegativeInt] = Field(min_length=1)
    is_amplify_first_chunk: Bool = False
    batch: PositiveInt = 1
    channels: PositiveInt
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    patch_size: Triple = (1, 2, 2)
    mu_grid: list[PositiveFloat]
    t_grid_points: int = Field(strict=True, ge=2)
    reference_schedule: Literal["diffusers", "port"] = "diffusers"
    schedule_forcing: Bool = True

    @model_validator(mode="after")
    def _pyramid(self) -> "SchedulerConfig":
        check_pyramid(self.steps, self.scheduler.stages, self.height, self.width, self.patch_size)
        return self


def check_pyramid(steps: list[int], stages: int, height: int, width: int, patch_size: tuple[int, int, int]) -> None:
    """A pyramid run's shape: one step count per stage, and a latent size every stage halves into whole patches."""
    if len(steps) != stages:
        raise ValueError(f"steps {steps}: expected one step count per stage ({stages} stages)")
    factor = 2 ** (stages - 1)
    _, ph, pw = patch_size
    if height % (factor * ph) or width % (factor * pw):
        raise ValueError(f"latent size {height}x{width}: expected multiples of {factor * ph}x"
                         f"{factor * pw} for {stages} stages with patch {tuple(patch_size)}")


class SchedulerComponent(Component):
    name = "scheduler"
    description = "HeliosDMDScheduler: per-stage schedules, dynamic time shift, DMD steps and pyramid stage transitions"
    #: one and four steps per stage; the amplified first chunk; a single stage
    coverage = ({"steps": [1, 1, 1]}, {"steps": [4, 3, 1]}, {"is_amplify_first_chunk": True},
                {"scheduler": {"stages": 1, "stage_range": [0, 1]}, "steps": [3]})
    config_model = SchedulerConfig
    reference_runner = "scheduler"
    diffusers_config_key = "scheduler"
    diffusers_config_file = "scheduler_config.json"
    reference_submodule = "denoiser"
    weights_prefix = PREFIX

    def make_inputs(self, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
        b, c, f = config.batch, config.channels, config.frames
        _, ph, pw = config.patch_size
        num_stages = len(config.steps)
        inputs = {
            "latents": normal(seed, "scheduler/latents", (b, c, f, config.height, config.width)),
            "mu_grid": np.asarray(config.mu_grid, dtype=np.float64),
            "t_grid": np.linspace(0.0, 1.0, config.t_grid_points),
        }
        for s in range(1, num_stages):
            scale = 2 ** (num_stages - 1 - s)  # stage s runs at 1/scale of the full resolution
            blocks = b * c * f * (config.height // scale // ph) * (config.width // scale // pw)
            inputs[f"block_noise/stage{s}"] = normal(seed, f"scheduler/block_noise/stage{s}", (blocks, ph * pw))
        return {**inputs, **port_inputs(self.port_schedule(config, inputs))}

    def port_schedule(self, config: SchedulerConfig, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The port's own schedule layers (the reference's input for teacher forcing of the schedule): its
        sampling loop run once with a denoiser predicting no flow (schedules do not depend on the latents)."""
        capture = Capture("port")
        with record_taps(capture):
            self.run_mlx(Sampler(sched.HeliosDMDScheduler(**config.scheduler.to_dict()), zero_flow, config),
                         inputs, "float32")
        return {name: capture[name] for name in capture.order if SCHEDULE.fullmatch(name)}

    def build_reference(self, config: SchedulerConfig, seed: int) -> Any:
        from reference_runners import stand_in
        from reference_runners.scheduler import Reference

        return Reference(config, stand_in.build(config.channels, seed, "scheduler"))

    def build_mlx(self, config: SchedulerConfig, weights: dict[str, np.ndarray], dtype: str) -> Any:
        denoiser = StandInDenoiser(config.channels)
        strict_load(denoiser, weights, dtype=getattr(mx, dtype))
        return Sampler(sched.HeliosDMDScheduler(**config.scheduler.to_dict()), denoiser, config)

    def run_mlx(self, model: Sampler, inputs: dict, dtype: str) -> None:
        scheduler, config = model.scheduler, model.config
        construction = {
            "sigmas": scheduler.train_sigmas,
            **{name: np.array(getattr(scheduler, name)) for name in CONSTRUCTION[1:]},
        }
        num_stages = len(config.steps)
        for name in CONSTRUCTION:
            tap(f"construction/{name}", construction[name])
        for kind in sched.TIME_SHIFT_TYPES:
            tap(f"time_shift/{kind}", np.stack([sched.time_shift(float(mu), 1.0, inputs["t_grid"], kind)
                                                for mu in inputs["mu_grid"]]))
        sched.pyramid_sample(
            scheduler, mx.array(inputs["latents"].transpose(0, 2, 3, 4, 1)), model.denoiser, config.steps,
            [inputs[f"block_noise/stage{s}"] for s in range(1, num_stages)], config.patch_size,
            getattr(mx, dtype), config.is_amplify_first_chunk,
        )

    def views(self, run: RunContext) -> list[Section]:
        """The solver-math verdict, and the trajectory's drift per stage transition and step (information)."""
        config = run.config
        schedule = [name for name in run.ref.order if SCHEDULE.fullmatch(name)]
        return [solver_section(run, schedule, config.schedule_forcing, config.reference_schedule),
                trajectory_section(run, [n for n in run.ref.order if TRAJECTORY.fullmatch(n)], "stage/step")]

    def extra_runs(self, run: RunContext) -> list[Section]:
        """The port's schedule against diffusers' (run again without the port's schedule when that is the judged one),
        and teacher forcing per step."""
        import torch

        from reference_runners import scheduler as runner

        schedule = [name for name in run.ref.order if SCHEDULE.fullmatch(name)]
        others = {}
        if run.config.reference_schedule != "diffusers":
            capture = Capture("reference")
            with torch.no_grad():
                runner.run(self.cast_reference(run.reference, "float32"), run.inputs, torch.float32, capture,
                           convention="diffusers")
            others["diffusers"] = capture
        return [schedule_section(run, schedule, run.config.reference_schedule, others), *self.teacher_forcing(run)]

    def teacher_forcing(self, run: RunContext) -> list[Section]:
        """Each DMD step of ours (denoiser + ``step``) on the reference's latents x_k and stage start."""
        if run.thresholds is None:
            return []
        import torch

        from reference_runners import scheduler as ref_runner

        judge = Judge(self.lineage(), run.dtype, run.thresholds)
        truth = self.cast_reference(run.reference, "float64") if run.dtype != "float32" else None
        judged = {layer.name: layer for layer in run.comparison.layers}
        labels, local, inherited, diverged = [], [], [], []
        for name in run.ref.order:
            found = STEP.fullmatch(name)
            if not found:
                continue
            stage, step = int(found.group(1)), int(found.group(2))
            start = "stage0/downsample" if stage == 0 else f"stage{stage}/transition"
            before = start if step == 0 else f"stage{stage}/step{step - 1}"
            # mu comes from the latents set_timesteps sees: the previous stage's (the stage's own at stage 0)
            previous = [k for k in run.ref.order if k.startswith(f"stage{stage - 1}/step")] if stage else [start]
            seq = run.ref.shapes[previous[-1]][1:4]
            x, x0 = (np.asarray(run.ref[k]) for k in (before, start))
            ours = self.forced_step(run.mlx_model, stage, step, x, x0, run.ref.dtypes[before], run.ref.dtypes[start],
                                    seq, run.dtype)
            truth_out = None
            if truth is not None:
                truth_out = ref_runner.forced_step(truth, stage, step, x.astype(np.float64), x0.astype(np.float64), seq,
                                                   torch.float64)
            tol, exact = judge.tolerances(name)
            ours_dtype = str(ours.dtype).removeprefix("mlx.core.")
            local.append(judge_tensors(name, name, np.asarray(run.ref[name]), np.array(ours.astype(mx.float32)), truth_out,
                                       tol, exact, run.ref.dtypes[name], ours_dtype))
            inherited.append(judged.get(name))
            diverged.append(name not in judged or judged[name].verdict == FAIL)
            labels.append(name)
        return teacher_forcing.sections(labels, local, inherited, diverged, run.dtype, "step")

    @staticmethod
    def forced_step(model: Sampler, stage: int, step: int, x: np.ndarray, start: np.ndarray, x_dtype: str,
                    start_dtype: str, seq_shape: tuple[int, ...], dtype: str) -> mx.array:
        """Our step ``step`` of ``stage`` alone on given latents (as :func:`mlx_impl.scheduler.pyramid_sample`'s loop body)."""
        scheduler, config = model.scheduler, model.config
        mu = sched.calculate_shift(math.prod(seq_shape) // math.prod(config.patch_size))
        scheduler.set_timesteps(config.steps[stage], stage, mu=mu, is_amplify_first_chunk=config.is_amplify_first_chunk)
        t = scheduler.timesteps[step]
        latents = mx.array(x).astype(getattr(mx, x_dtype))
        flow = model.denoiser(latents.astype(getattr(mx, dtype)), int(t))
        out = scheduler.step(flow, t, latents, step, mx.array(start).astype(getattr(mx, start_dtype)))
        mx.eval(out)
        return out


COMPONENT = SchedulerComponent()
