"""Helios pipeline reference: diffusers' own ``HeliosPyramidPipeline.__call__`` on a tiny real transformer, DMD
scheduler and VAE.

Nothing of the loop is reproduced. ``pipeline_helios_pyramid`` imports ``transformers`` at module level
(its text encoder), which this harness does not install, so the ``HeliosPyramidPipeline`` class is
compiled from the installed source, unmodified (:func:`reference_runners.pipeline_source.compile_class`),
on diffusers' own ``DiffusionPipeline`` (the LoRA mixin, which needs ``transformers``, left out: no LoRA is
loaded), and built by its own ``__init__`` with the distilled model's ``is_distilled=True``, no tokenizer
or text encoder: ``prompt_embeds`` are given, ``guidance_scale`` 1 (the distilled model runs without CFG).
What it computes is recorded through instance attributes on its models (:func:`recorded`); ``video``
is what it hands ``video_processor.postprocess_video``: the decoded chunks concatenated and trimmed.

So the chunks, the history and the DMD stages are driven by the pipeline itself: per chunk ``k`` it
splits the last ``sum(history_sizes)`` latent frames of ``history_latents`` into long / mid / 1x history
(the short history is the first chunk's first latent frame, zeros for chunk 0, then the 1x frames),
draws the chunk's noise, runs the pyramid stages (downsample, per stage ``calculate_shift`` and
``set_timesteps``, upsample and block-noise re-noise, DMD steps from the stage's start point), appends
the chunk's latents to ``history_latents`` and decodes them with ``vae.decode``.

Random draws: ``prepare_latents``' ``randn_tensor`` and ``sample_block_noise``'s ``torch.randn`` return
the shared draws (:class:`Draws`), in the order the pipeline makes them, shapes checked.

Recorded, per chunk ``chunk{c}/`` (latents channels-last as the MLX port lays them out, frames
channels-first as the VAE returns them): ``history/{long,mid,short}`` (what the transformer receives,
at the chunk's first call), per stage ``stage{s}/timesteps`` and ``stage{s}/sigmas`` (after
``set_timesteps``), the DMD start point (``dmd_noisy_tensor`` of the stage's first step:
``stage0/downsample``, ``stage{s}/transition``), ``stage{s}/step{k}`` (each ``scheduler.step``),
``latents`` (the chunk's output, appended to the history) and ``frames`` (``vae.decode``); then ``video``.
The chunk index is the number of ``vae.decode`` calls so far; the stage is ``set_timesteps``' argument.

Teacher forcing (:func:`run`'s ``start``): a chunk run alone from a given state, through the pipeline's
video-to-video entry: ``video_latents`` (the history window) and ``image_latents`` (the short history's
first frame), neither re-noised. That call's first chunk is then the original chunk ``c``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline, HeliosDMDScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.helios.pipeline_output import HeliosPipelineOutput
from diffusers.utils import logging, replace_example_docstring
from diffusers.video_processor import VideoProcessor

from parity.capture import Capture
from reference_runners import transformer as transformer_runner
from reference_runners.pipeline_source import compile_class, compile_functions

PIPELINE_MODULE = "diffusers.pipelines.helios.pipeline_helios_pyramid"
HISTORY_TERMS = ("long", "mid", "short")


class Reference(torch.nn.Module):
    """The pipeline's models (the weights): ``transformer`` (``HeliosTransformer3DModel``) and ``vae``."""

    def __init__(self, transformer: torch.nn.Module, vae: AutoencoderKLWan):
        super().__init__()
        self.transformer = transformer
        self.vae = vae


@dataclass
class Side:
    """One run's models: the transformer as it runs (:class:`reference_runners.transformer.Reference`:
    autocast in mixed precision), the VAE, and the component's config (steps, history, sizes)."""

    transformer: transformer_runner.Reference
    vae: AutoencoderKLWan
    config: Any


@dataclass
class Start:
    """The state a chunk starts from (teacher forcing): its index, the history window (channels-last
    ``(b, sum(history_sizes), h, w, c)``) and the short history's first frame (None: the pipeline's zeros)."""

    chunk: int
    history: np.ndarray
    prefix: np.ndarray | None


# --- shared draws ------------------------------------------------------------------------------------
class Draws:
    """The pipeline's random draws, handed out in order: ``(name, array)``; each draw's shape is checked."""

    def __init__(self, draws: Sequence[tuple[str, np.ndarray]]):
        self.queue = list(draws)

    def take(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        if not self.queue:
            raise RuntimeError(f"the pipeline drew {tuple(shape)}: more draws than the inputs hold")
        name, array = self.queue.pop(0)
        if tuple(shape) != array.shape:
            raise ValueError(f"the pipeline draws {tuple(shape)} where the shared draw {name} is {array.shape}")
        return torch.from_numpy(np.ascontiguousarray(array)).to(dtype or torch.float32)

    def randn_tensor(self, shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
        return self.take(shape, dtype)

    def randn(self, *size, generator=None, device=None, **_kwargs) -> torch.Tensor:
        return self.take(size)

    def check_used(self) -> None:
        if self.queue:
            raise RuntimeError(f"the pipeline left draws unused: {[name for name, _ in self.queue]}")


class _Torch:
    """``torch`` for the compiled pipeline: ``randn`` hands out the run's shared draws, everything else is torch's."""

    draws: Draws | None = None

    def randn(self, *size: Any, **kwargs: Any) -> torch.Tensor:
        return self.draws.randn(*size, **kwargs)

    def randn_tensor(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.draws.randn_tensor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


#: The compiled pipeline's ``torch`` and ``randn_tensor``; :func:`run` sets its draws for the call.
TORCH = _Torch()


# --- what the pipeline calls, recorded --------------------------------------------------------------
def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)


def channels_first(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 4, 1, 2, 3).to(dtype)


class Recorder:
    """Names what the pipeline computes (see the module docstring)."""

    def __init__(self, capture: Capture, first_chunk: int = 0):
        self.capture, self.chunk, self.stage = capture, first_chunk, 0
        self.history_seen = False
        self.last: torch.Tensor | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        self.capture.add(f"chunk{self.chunk}/{name}", x)


@cache
def pipeline_class() -> type:
    """``HeliosPyramidPipeline`` from the installed source, with the globals its methods read (its own
    ``calculate_shift`` and ``optimized_scale`` compiled from the same file)."""
    helpers = compile_functions(PIPELINE_MODULE, ["calculate_shift", "optimized_scale"], namespace={"torch": torch})
    return compile_class(PIPELINE_MODULE, "HeliosPyramidPipeline", {
        "torch": TORCH, "F": F, "math": math, "DiffusionPipeline": DiffusionPipeline, "HeliosLoraLoaderMixin": object,
        "PipelineCallback": PipelineCallback, "MultiPipelineCallbacks": MultiPipelineCallbacks,
        "replace_example_docstring": replace_example_docstring, "EXAMPLE_DOC_STRING": "",
        "logger": logging.get_logger(PIPELINE_MODULE), "XLA_AVAILABLE": False, "VideoProcessor": VideoProcessor,
        "HeliosPipelineOutput": HeliosPipelineOutput, "randn_tensor": TORCH.randn_tensor,
        "calculate_shift": helpers.calculate_shift, "optimized_scale": helpers.optimized_scale})


def pipeline(side: Side) -> Any:
    """A distilled ``HeliosPyramidPipeline`` on ``side``'s transformer and VAE and a real ``HeliosDMDScheduler``."""
    scheduler = HeliosDMDScheduler(**side.config.scheduler.to_dict())
    pipe = pipeline_class()(tokenizer=None, text_encoder=None, vae=side.vae, scheduler=scheduler,
                            transformer=side.transformer.model, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def recorded(pipe: Any, side: Side, recorder: Recorder) -> Iterator[None]:
    """Record what the pipeline computes (the module docstring); the transformer runs in its precision
    (autocast in mixed precision). Instance attributes, removed on exit: the models are the run's to reuse."""
    model, vae, scheduler, processor = pipe.transformer, pipe.vae, pipe.scheduler, pipe.video_processor
    forward, decode, set_timesteps, step = model.forward, vae.decode, scheduler.set_timesteps, scheduler.step

    def transformer(*args: Any, **kwargs: Any) -> Any:
        if not recorder.history_seen:
            for term in HISTORY_TERMS:
                recorder.add(f"history/{term}", channels_last(kwargs[f"latents_history_{term}"]))
            recorder.history_seen = True
        with side.transformer.precision():
            return forward(*args, **kwargs)

    def recorded_schedule(num_inference_steps: int, stage_index: int, *args: Any, **kwargs: Any) -> None:
        set_timesteps(num_inference_steps, stage_index, *args, **kwargs)
        recorder.stage = stage_index
        recorder.add(f"stage{stage_index}/timesteps", scheduler.timesteps)
        recorder.add(f"stage{stage_index}/sigmas", scheduler.sigmas)

    def recorded_step(*args: Any, cur_sampling_step: int, dmd_noisy_tensor: torch.Tensor, **kwargs: Any) -> Any:
        stage = recorder.stage
        if cur_sampling_step == 0:
            recorder.add("stage0/downsample" if stage == 0 else f"stage{stage}/transition", channels_last(dmd_noisy_tensor))
        out = step(*args, cur_sampling_step=cur_sampling_step, dmd_noisy_tensor=dmd_noisy_tensor, **kwargs)
        recorder.last = out[0]
        recorder.add(f"stage{stage}/step{cur_sampling_step}", channels_last(out[0]))
        return out

    def recorded_decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        recorder.add("latents", channels_last(recorder.last))
        out = decode(latents, *args, **kwargs)
        recorder.add("frames", out[0])
        recorder.chunk += 1
        recorder.stage, recorder.history_seen = 0, False
        return out

    def recorded_video(video: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        recorder.capture.add("video", video)
        return VideoProcessor.postprocess_video(processor, video, *args, **kwargs)

    patched = ((model, "forward", transformer), (vae, "decode", recorded_decode),
               (scheduler, "set_timesteps", recorded_schedule), (scheduler, "step", recorded_step),
               (processor, "postprocess_video", recorded_video))
    try:
        for owner, name, method in patched:
            setattr(owner, name, method)
        yield
    finally:
        for owner, name, _ in patched:
            owner.__dict__.pop(name, None)  # the class's method again


def draws(inputs: Mapping[str, np.ndarray], chunks: Sequence[int], stages: int) -> list[tuple[str, np.ndarray]]:
    """The shared draws of ``chunks`` in the pipeline's order: per chunk its noise, then each stage transition's."""
    names = [name for c in chunks for name in
             [f"noise/chunk{c}", *[f"block_noise/chunk{c}/stage{s}" for s in range(1, stages)]]]
    return [(name, inputs[name]) for name in names]


def run(side: Side, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture,
        start: Start | None = None) -> None:
    """Generate ``config.chunks`` chunks (or, from ``start``, that one chunk) with the pipeline, recording them.

    ``dtype`` is the transformer's; the pipeline's own latents are float32 (float64 in the float64 truth,
    whose models are float64), the text is handed over in ``dtype`` as ``encode_prompt`` would.
    """
    config = side.config
    chunks = [start.chunk] if start is not None else list(range(config.chunks))
    shared = Draws(draws(inputs, chunks, config.scheduler.stages))
    recorder = Recorder(capture, chunks[0])
    pipe = pipeline(side)
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    window = (config.latent_frames - 1) * temporal + 1  # the pipeline's window_num_frames
    state = {}
    if start is not None:  # the pipeline's own latents: float32 (float64 in the truth)
        latents_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = {"video_latents": channels_first(start.history, latents_dtype),
                 "image_latents": None if start.prefix is None else channels_first(start.prefix, latents_dtype)}
    TORCH.draws = shared
    try:
        with recorded(pipe, side, recorder):
            pipe(prompt_embeds=torch.from_numpy(inputs["text"]).to(dtype), height=config.height * spatial,
                 width=config.width * spatial, num_frames=len(chunks) * window, guidance_scale=1.0, output_type="pt",
                 return_dict=False, callback_on_step_end_tensor_inputs=None, history_sizes=list(config.history_sizes),
                 num_latent_frames_per_chunk=config.latent_frames, keep_first_frame=True,
                 pyramid_num_inference_steps_list=list(config.steps),
                 is_amplify_first_chunk=config.is_amplify_first_chunk and chunks[0] == 0,
                 add_noise_to_image_latents=False, add_noise_to_video_latents=False, **state)
    finally:
        TORCH.draws = None
    shared.check_used()

