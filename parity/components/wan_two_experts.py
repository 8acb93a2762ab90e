"""Wan2.2 two experts with classifier-free guidance: the denoising loop of ``WanPipeline`` on two transformers.

The reference is diffusers' real ``WanPipeline.__call__`` (:mod:`reference_runners.wan_experts`)
with ``transformer`` (the high-noise expert, at ``t >= boundary_ratio * num_train_timesteps``),
``transformer_2`` (the low-noise expert, below), a ``UniPCMultistepScheduler`` with flow shift
and guidance ``guidance_scale`` / ``guidance_scale_2``; ours is :func:`mlx_impl.wan_experts.sample`
on two of our ``WanTransformer``s and our UniPC. The two experts have the same config and
different random weights (seeds ``2 * seed`` and ``2 * seed + 1``; ``transformer.*`` and
``transformer_2.*`` in a checkpoint, as a Wan2.2 model folder's two subfolders).

Layers, in execution order: ``expert_high/text_embedding`` (and ``negative_text_embedding`` with
CFG), the same for ``expert_low`` (each expert's own text projection: catalog bug 9), ``sigmas``,
``timesteps``, then per step ``step{k}/expert`` (1 high, 2 low: a switch one step off fails there),
``step{k}/cond/temb`` (the expert's time embedding after its cast to the model dtype: one kept in
float32 fails the dtype rule there), ``step{k}/cond``, the same for ``uncond`` (with CFG:
``guidance_scale > 1``), ``step{k}/guided`` (the scheduler's input) and the scheduler's ``step{k}/corrector``, ``step{k}/predictor``,
``step{k}/sample``. The experts' inner layers are the ``wan_transformer`` component's.

A port that runs cond and uncond as one call of batch 2B is compared per half: taps
``{expert}/text_embedding``, ``step{k}/noise_pred/temb`` and ``step{k}/noise_pred`` holding
``[cond; uncond]`` along the batch axis, and ``alignment = BATCHED_CFG`` (each reference layer is one half: ``split(2, i, 0)``).

The second call (float32 runs) gets the next seed's noise and prompts (the default
``second_inputs``): text embeddings kept from the first call, or a scheduler's history not reset,
fail at ``call2/...``. Coverage cells: one expert only (each), guidance off, the low-noise expert
at scale 1, two steps.

Sections: the trajectory's drift per step, the expert switch (per step each side's expert and
the layer's verdict; the switch step in the title), the guidance (per step ``rms(cond - uncond) /
rms(cond)`` on each side: a port whose guidance collapses shows it), teacher forcing per step.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import Field, model_validator

from fixtures.inputs import normal
from mlx_impl import transformer as mlx_transformer
from mlx_impl import unipc as U
from mlx_impl import wan_experts as W
from parity.alignment import apply_adapter
from parity.capture import Capture
from parity.compare import FAIL
from parity.component import Component, RunContext, Section
from parity.components._diffusers import UniPCSchedulerConfig, WanTransformerConfig
from parity.components.block import bf16_exact
from parity.components._sampling import Sampler, teacher_forced_steps, teacher_states, trajectory_section
from parity.config import ComponentConfig, NonNegativeFloat, PositiveInt
from parity.weights import WeightLoadError, strict_load

#: The alignment for a port that batches cond and uncond (``[cond; uncond]`` along the batch axis).
BATCHED_CFG = {
    "*/text_embedding": ("{0}/text_embedding", "split(2, 0, 0)"),
    "*/negative_text_embedding": ("{0}/text_embedding", "split(2, 1, 0)"),
    "step*/cond": ("step{0}/noise_pred", "split(2, 0, 0)"),
    "step*/uncond": ("step{0}/noise_pred", "split(2, 1, 0)"),
    "step*/cond/temb": ("step{0}/noise_pred/temb", "split(2, 0, 0)"),
    "step*/uncond/temb": ("step{0}/noise_pred/temb", "split(2, 1, 0)"),
}
#: Checkpoint prefixes of the experts (diffusers' pipeline attributes), in the order of ``W.EXPERTS``.
PREFIXES = ("transformer.", "transformer_2.")
LABELS = {W.HIGH: "high", W.LOW: "low"}


class WanTwoExpertsConfig(ComponentConfig):
    """Both experts' diffusers config, the scheduler, the pipeline's guidance settings and the latent grid."""

    transformer: WanTransformerConfig
    scheduler: UniPCSchedulerConfig
    steps: PositiveInt
    boundary_ratio: float = Field(strict=True, ge=0, le=1)
    guidance_scale: NonNegativeFloat
    guidance_scale_2: NonNegativeFloat | None = None
    batch: PositiveInt = 1
    frames: PositiveInt
    height: PositiveInt
    width: PositiveInt
    text_len: PositiveInt

    @model_validator(mode="after")
    def _layout(self) -> "WanTwoExpertsConfig":
        t = self.transformer
        if t.in_channels != t.out_channels:
            raise ValueError(f"in_channels {t.in_channels}: WanPipeline (text-to-video) needs out_channels "
                             f"({t.out_channels}); image-to-video conditioning is wan_i2v_conditioning's")
        pt, ph, pw = t.patch_size
        if self.frames % pt or self.height % ph or self.width % pw:
            raise ValueError(f"latent grid {self.frames}x{self.height}x{self.width}: expected multiples of the patch "
                             f"size {tuple(t.patch_size)}")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"latent grid {self.height}x{self.width}: WanPipeline needs pixel sizes (8x) that are "
                             "multiples of 16")
        return self


class WanTwoExpertsComponent(Component):
    name = "wan_two_experts"
    description = ("Wan2.2 two-expert denoising loop (WanPipeline: transformer / transformer_2 at boundary_ratio, "
                   "UniPC, classifier-free guidance): text embedding per expert, expert per step, cond / uncond / "
                   "guided, scheduler steps; teacher forcing per step")
    #: only the high-noise expert; only the low-noise one; guidance off (guidance_scale 1: no uncond, also for the
    #: low-noise expert whose guidance_scale_2 is 3); the low-noise expert at scale 1 (uncond still run); two steps
    coverage = ({"boundary_ratio": 0.0}, {"boundary_ratio": 1.0}, {"guidance_scale": 1.0},
                {"guidance_scale_2": 1.0}, {"steps": 2})
    config_model = WanTwoExpertsConfig
    keep_fp32 = mlx_transformer.WAN_KEEP_FP32

    # --- inputs and the two sides ---------------------------------------------------------------------
    def make_inputs(self, config: WanTwoExpertsConfig, seed: int) -> dict[str, np.ndarray]:
        """Noise latents (float32, as the pipeline's), prompt and negative prompt embeddings (bf16-exact)."""
        t = config.transformer
        text = (config.batch, config.text_len, t.text_dim)
        return {"latents": normal(seed, "wan_two_experts/latents",
                                  (config.batch, t.in_channels, config.frames, config.height, config.width)),
                "text": bf16_exact(normal(seed, "wan_two_experts/text", text)),
                "negative_text": bf16_exact(normal(seed, "wan_two_experts/negative_text", text))}

    def build_reference(self, config: WanTwoExpertsConfig, seed: int) -> Any:
        from reference_runners import transformer, wan_experts

        experts = (transformer.build("wan", config.transformer.to_dict(), 2 * seed + i) for i in range(2))
        return wan_experts.Reference(config, *experts)

    def run_reference(self, reference: Any, inputs: dict, dtype: str, capture: Capture,
                      forced: U.Forced | None = None) -> None:
        import torch

        from reference_runners import wan_experts

        wan_experts.run(reference, inputs, getattr(torch, dtype), capture, forced)

    def build_mlx(self, config: WanTwoExpertsConfig, weights: dict[str, np.ndarray], dtype: str) -> Sampler:
        experts = []
        for prefix in PREFIXES:
            model = mlx_transformer.WanTransformer(mlx_transformer.WanDims.of(config.transformer.to_dict()))
            state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            strict_load(model, state, convert=mlx_transformer.convert_key, dtype=getattr(mx, dtype),
                        keep_float32=self.keep_fp32)
            experts.append(model)
        unused = [k for k in weights if not k.startswith(PREFIXES)]
        if unused:
            raise WeightLoadError(f"{self.name}: keys of neither expert ({', '.join(PREFIXES)}): {unused[:5]}")
        two = W.WanExperts(*experts, config.boundary_ratio, config.guidance_scale, config.guidance_scale_2)
        return Sampler(U.UniPCMultistepScheduler(**config.scheduler.to_dict()), two, config)

    def run_mlx(self, model: Sampler, inputs: dict, dtype: str, forced: U.Forced | None = None) -> None:
        """The two-expert loop (``set_timesteps`` resets the scheduler); ``forced``: per-step teacher forcing."""
        model.scheduler.set_timesteps(model.config.steps)
        latents = mx.array(np.ascontiguousarray(inputs["latents"].transpose(0, 2, 3, 4, 1)))
        text, negative = (mx.array(inputs[key]).astype(getattr(mx, dtype)) for key in ("text", "negative_text"))
        mx.eval(W.sample(model.denoiser, model.scheduler, latents, text, negative, getattr(mx, dtype), forced))

    # --- sections ------------------------------------------------------------------------------------
    def views(self, run: RunContext) -> list[Section]:
        samples = [n for n in run.ref.order if n.startswith("step") and n.endswith("/sample")]
        return [trajectory_section(run, samples, "step"), expert_section(run), guidance_section(run)]

    def extra_runs(self, run: RunContext) -> list[Section]:
        """Teacher forcing: each step from the reference's state entering it (latents and UniPC's last_sample)."""
        states = teacher_states(run.ref, run.inputs["latents"], run.config.steps)

        def reference(dtype: str, capture: Capture) -> None:
            self.run_reference(self.cast_reference(run.reference, dtype), run.inputs, dtype, capture, states)

        def mlx(capture: Capture) -> None:
            with self.mlx_capture(run.mlx_model, capture):
                self.run_mlx(run.mlx_model, run.inputs, run.dtype, states)

        return teacher_forced_steps(run, reference, mlx, lambda name: name.startswith("step"))


# --- sections --------------------------------------------------------------------------------------------
def steps_of(run: RunContext) -> list[int]:
    return [int(n.split("/")[0].removeprefix("step")) for n in run.ref.order if n.endswith("/expert")]


def ours(run: RunContext, name: str) -> np.ndarray | None:
    """Our tensor of reference layer ``name`` in the reference's layout (as judged: the layer's MLX name and
    adapter), or None when we have none."""
    layer = next((l for l in run.comparison.layers if l.name == name), None)
    if layer is None or layer.mlx_name not in run.mlx:
        return None
    x = np.asarray(run.mlx[layer.mlx_name])
    return apply_adapter(layer.adapter, x, tuple(run.ref.shapes[name])) if layer.adapter else x


def expert_section(run: RunContext) -> Section:
    """Per step each side's expert, the scale it guides with and the verdict of ``step{k}/expert`` (read from
    the comparison); the switch step in the title."""
    config, judged = run.config, {l.name: l for l in run.comparison.layers}
    boundary = config.boundary_ratio * config.scheduler.num_train_timesteps
    timesteps = np.asarray(run.ref["timesteps"])
    steps = steps_of(run)
    theirs = [int(run.ref[f"step{k}/expert"][0]) for k in steps]
    mine = [None if (x := ours(run, f"step{k}/expert")) is None else int(x[0]) for k in steps]
    rows = [[f"step{k}", int(timesteps[k]), LABELS[a], "missing" if b is None else LABELS.get(b, str(b)),
             W.guidance_scale(a, config.guidance_scale, config.guidance_scale_2) if config.guidance_scale > 1 else None,
             judged[f"step{k}/expert"].verdict] for k, a, b in zip(steps, theirs, mine)]

    def switch(experts: list[int | None]) -> int | None:
        return next((k for k, expert in zip(steps, experts) if expert == W.LOW), None)

    ref_switch = switch(theirs)
    if ref_switch is None:
        title = f"No expert switch: the high-noise expert runs every step (boundary {boundary:g} <= every timestep)"
    elif ref_switch == steps[0]:
        title = f"No expert switch: the low-noise expert runs every step (every timestep < boundary {boundary:g})"
    else:
        title = (f"Expert switch: high-noise -> low-noise expert at step {ref_switch} "
                 f"(t = {int(timesteps[ref_switch])} < boundary {boundary:g})")
    failed = [row[0] for row in rows if row[-1] == FAIL]
    note = "MLX runs the reference's expert at every step."
    if failed:
        when = ["never" if k is None else f"at step {k}" for k in (ref_switch, switch(mine))]
        note = f"the reference switches {when[0]}, MLX {when[1]} (first failing: {failed[0]}/expert)"
    return Section("experts", title, "table",
                   {"columns": ["step", "timestep", "reference expert", "MLX expert", "guidance scale", "verdict"],
                    "rows": rows},
                   passed=not failed, failing=f"{failed[0]}/expert" if failed else None, note=note)


def relative_difference(cond: np.ndarray | None, uncond: np.ndarray | None) -> float:
    """``rms(cond - uncond) / rms(cond)``: how far the negative prompt moves the prediction."""
    if cond is None or uncond is None or cond.shape != uncond.shape:
        return math.nan
    cond, uncond = np.asarray(cond, np.float64), np.asarray(uncond, np.float64)
    return float(np.sqrt(np.mean((cond - uncond) ** 2)) / (np.sqrt(np.mean(cond ** 2)) or math.nan))


def guidance_section(run: RunContext) -> Section:
    """Per step, each side's cond-vs-uncond difference (information: cond and uncond are judged as layers)."""
    steps = [k for k in steps_of(run) if f"step{k}/uncond" in run.ref]
    if not steps:
        return Section("guidance", "Classifier-free guidance: off", "table", {"columns": ["note"], "rows": [[
            f"guidance_scale {run.config.guidance_scale:g} <= 1: the pipeline runs the conditional prediction only"]]},
            note="no unconditional prediction (diffusers' do_classifier_free_guidance is guidance_scale > 1)")
    series = {"reference": [], "MLX": []}
    if run.truth is not None:
        series["float64 reference"] = []
    for k in steps:
        cond, uncond = f"step{k}/cond", f"step{k}/uncond"
        series["reference"].append(relative_difference(run.ref[cond], run.ref[uncond]))
        series["MLX"].append(relative_difference(ours(run, cond), ours(run, uncond)))
        if run.truth is not None:
            series["float64 reference"].append(relative_difference(run.truth[cond], run.truth[uncond]))
    ratios = [m / r for m, r in zip(series["MLX"], series["reference"]) if r]
    spread = f"{min(ratios):.3g} - {max(ratios):.3g}" if ratios and not any(map(math.isnan, ratios)) else "n/a"
    note = (f"rms(cond - uncond) / rms(cond) per step: reference {min(series['reference']):.3g} - "
            f"{max(series['reference']):.3g}; MLX / reference {spread} (about 1 when the guidance matches; "
            "near 0 on our side: our guidance collapsed). Information only: cond, uncond and guided are judged as layers.")
    return Section("guidance", "Classifier-free guidance: cond - uncond per step", "curves",
                   {"x": [f"step{k}" for k in steps], "series": series, "xlabel": "step",
                    "ylabel": "rms(cond - uncond) / rms(cond)", "log": False}, note=note)


COMPONENT = WanTwoExpertsComponent()
