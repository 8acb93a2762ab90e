"""Scheduler: Helios DMD schedules per stage, time-shift curves, and a full pyramid trajectory.

Layers, in execution order: ``construction/*`` (training sigmas, per-stage start/end sigmas,
ratios, stage timesteps/sigmas), ``time_shift/linear`` and ``time_shift/exponential`` (rows: the
config's ``mu_grid``), then per stage ``stage{s}/timesteps``, ``stage{s}/sigmas``, the latents
entering the stage (``stage0/downsample``, ``stage{s}/transition``) and after each step
(``stage{s}/step{k}``). The transformer is a stand-in (:class:`StandInDenoiser`) with the same
weights on both sides, so the trajectory isolates the scheduler and the stage transitions.

The default config uses gamma = 0.25, not Helios' 1/3: at 1/3 the 2x2 block-noise covariance is
singular, and the real pipeline's float32 Cholesky raises on CPU, so no reference trajectory
exists there (tests/test_scheduler.py checks our float64 factorisation at 1/3 separately).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from pydantic import Field, model_validator

from fixtures.inputs import normal
from mlx_impl import scheduler as sched
from mlx_impl.taps import tap
from parity import teacher_forcing
from parity.compare import FAIL, Judge, judge_tensors
from parity.component import Component, RunContext, Section
from parity.components._diffusers import HeliosDMDSchedulerConfig
from parity.config import Bool, ComponentConfig, NonNegativeInt, PositiveFloat, PositiveInt, Triple
from parity.metrics import rmse_and_rms, tensor_metrics
from parity.weights import load_torch_strict, strict_load

PREFIX = "denoiser."
CONSTRUCTION = ("sigmas", "ori_start_sigmas", "start_sigmas", "end_sigmas", "timestep_ratios",
                "timesteps_per_stage", "sigmas_per_stage")
#: The latents layers: entering each stage, and after each step.
TRAJECTORY = re.compile(r"stage\d+/(downsample|transition|step\d+)")
STEP = re.compile(r"stage(\d+)/step(\d+)")


class StandInDenoiser(nn.Module):
    """``flow = tanh(W x + b + time * t / 1000)`` over channels (channels-last), as the reference's."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, channels)
        self.time = mx.zeros((channels,))

    def __call__(self, latents: mx.array, timestep: int) -> mx.array:
        t = mx.array(timestep).astype(latents.dtype) / 1000
        return mx.tanh(self.proj(latents) + t * self.time)


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

    @model_validator(mode="after")
    def _pyramid(self) -> "SchedulerConfig":
        stages = self.scheduler.stages
        if len(self.steps) != stages:
            raise ValueError(f"steps {self.steps}: expected one step count per stage ({stages} stages)")
        factor = 2 ** (stages - 1)
        _, ph, pw = self.patch_size
        if self.height % (factor * ph) or self.width % (factor * pw):
            raise ValueError(f"latent size {self.height}x{self.width}: expected multiples of {factor * ph}x"
                             f"{factor * pw} for {stages} stages with patch {tuple(self.patch_size)}")
        return self


@dataclass
class Sampler:
    """Our side: the MLX scheduler, the stand-in denoiser and the pipeline's sampling settings."""

    scheduler: sched.HeliosDMDScheduler
    denoiser: StandInDenoiser
    config: SchedulerConfig


class SchedulerComponent(Component):
    name = "scheduler"
    description = "HeliosDMDScheduler: per-stage schedules, dynamic time shift, DMD steps and pyramid stage transitions"
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
        return inputs

    def build_reference(self, config: dict[str, Any], seed: int) -> Any:
        from reference_runners.scheduler import Reference

        c = config.channels
        reference = Reference(config)
        load_torch_strict(reference.denoiser, {
            "proj.weight": normal(seed, "scheduler/denoiser/proj.weight", (c, c), scale=1 / math.sqrt(c)),
            "proj.bias": normal(seed, "scheduler/denoiser/proj.bias", (c,), scale=0.1),
            "time": normal(seed, "scheduler/denoiser/time", (c,)),
        })
        return reference

    def build_mlx(self, config: dict[str, Any], weights: dict[str, np.ndarray], dtype: str) -> Any:
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
        """The trajectory's drift: error per stage transition and step (information only)."""
        labels = [name for name in run.ref.order if TRAJECTORY.fullmatch(name)]
        series: dict[str, list[float]] = {"max abs (MLX vs ref)": [], "rmse (MLX vs ref)": []}
        if run.truth is not None:
            series.update({"rmse (ref vs float64)": [], "rmse (MLX vs float64)": []})
        for name in labels:
            ok = name in run.mlx and run.mlx.shapes[name] == run.ref.shapes[name]
            metrics = tensor_metrics(run.ref[name], run.mlx[name]) if ok else {}
            series["max abs (MLX vs ref)"].append(metrics.get("max_abs", math.nan))
            series["rmse (MLX vs ref)"].append(metrics.get("rmse", math.nan))
            if run.truth is not None:
                series["rmse (ref vs float64)"].append(rmse_and_rms(run.truth[name], run.ref[name])[0])
                series["rmse (MLX vs float64)"].append(rmse_and_rms(run.truth[name], run.mlx[name])[0] if ok else math.nan)
        return [Section(
            name="drift", title="Trajectory drift per step", kind="curves",
            data={"x": labels, "series": series, "xlabel": "stage/step", "ylabel": "error", "log": True},
            note="Information only: each step is judged as a layer; this shows how the error grows along "
                 "the trajectory (in bf16 next to the reference's own drift from the float64 run).",
        )]

    def extra_runs(self, run: RunContext) -> list[Section]:
        """Teacher forcing: each DMD step of ours (denoiser + ``step``) on the reference's latents x_k and stage start."""
        if run.reference is None or run.thresholds is None:
            return []
        import torch

        from reference_runners import scheduler as ref_runner

        judge = Judge(self.lineage(), run.dtype, run.thresholds)
        truth = self.cast_reference(run.reference, "float64") if run.dtype != "float32" else None
        judged = run.extra.get("layers") or {}
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
