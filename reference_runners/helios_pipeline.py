"""Helios pipeline reference: diffusers' own ``HeliosPyramidPipeline.__call__`` on a tiny real transformer, DMD
scheduler and VAE.

Nothing of the loop is reproduced. ``pipeline_helios_pyramid`` imports ``transformers`` at module level
(its text encoder), which this harness does not install, so the pipeline's methods are compiled from the
installed source, unmodified (:mod:`reference_runners.pipeline_source`), and set on a minimal class
(:func:`pipeline`): ``__call__``, ``check_inputs``, ``encode_prompt``, ``prepare_latents``,
``sample_block_noise``, the properties, and the module's ``calculate_shift``. What ``DiffusionPipeline``
would provide the shell provides: the attributes ``__init__`` sets (``vae_scale_factor_*`` read from the
VAE config as ``__init__`` reads them, ``config.is_distilled``), the CPU as ``_execution_device``, a silent
``progress_bar``, no model hooks to free, and a ``video_processor`` that hands back the video it is given
(recorded as ``video``: the decoded chunks concatenated and trimmed, before post-processing). There is no
text encoder: ``prompt_embeds`` are given, ``guidance_scale`` 1 (the distilled model runs without CFG).

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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, HeliosDMDScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging, replace_example_docstring

from parity.capture import Capture
from reference_runners import transformer as transformer_runner
from reference_runners.pipeline_source import compile_functions

PIPELINE_MODULE = "diffusers.pipelines.helios.pipeline_helios_pyramid"
METHODS = ("__call__", "check_inputs", "encode_prompt", "prepare_latents", "sample_block_noise", "guidance_scale",
           "do_classifier_free_guidance", "num_timesteps", "current_timestep", "interrupt", "attention_kwargs")
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
    """``torch`` for the compiled pipeline: ``randn`` hands out the shared draws, everything else is torch's."""

    def __init__(self, draws: Draws):
        self.randn = draws.randn

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


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


class _Transformer:
    """The transformer as the pipeline calls it: in its precision (autocast in mixed precision); records the history."""

    def __init__(self, reference: transformer_runner.Reference, recorder: Recorder):
        self.reference, self.recorder = reference, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reference.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        if not self.recorder.history_seen:
            for term in HISTORY_TERMS:
                self.recorder.add(f"history/{term}", channels_last(kwargs[f"latents_history_{term}"]))
            self.recorder.history_seen = True
        with self.reference.precision():
            return self.reference.model(**kwargs)


class _Scheduler:
    """The real ``HeliosDMDScheduler``; records each stage's schedule, start point and steps."""

    def __init__(self, scheduler: HeliosDMDScheduler, recorder: Recorder):
        self.scheduler, self.recorder = scheduler, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)

    def set_timesteps(self, num_inference_steps: int, stage_index: int, *args: Any, **kwargs: Any) -> None:
        self.scheduler.set_timesteps(num_inference_steps, stage_index, *args, **kwargs)
        self.recorder.stage = stage_index
        self.recorder.add(f"stage{stage_index}/timesteps", self.scheduler.timesteps)
        self.recorder.add(f"stage{stage_index}/sigmas", self.scheduler.sigmas)

    def step(self, *args: Any, cur_sampling_step: int, dmd_noisy_tensor: torch.Tensor, **kwargs: Any) -> Any:
        stage = self.recorder.stage
        if cur_sampling_step == 0:
            self.recorder.add("stage0/downsample" if stage == 0 else f"stage{stage}/transition",
                              channels_last(dmd_noisy_tensor))
        out = self.scheduler.step(*args, cur_sampling_step=cur_sampling_step, dmd_noisy_tensor=dmd_noisy_tensor,
                                  **kwargs)
        self.recorder.last = out[0]
        self.recorder.add(f"stage{stage}/step{cur_sampling_step}", channels_last(out[0]))
        return out


class _Vae:
    """The real VAE; each ``decode`` ends a chunk: records its latents and frames."""

    def __init__(self, vae: AutoencoderKLWan, recorder: Recorder):
        self.vae, self.recorder = vae, recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.vae, name)

    def decode(self, latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.recorder.add("latents", channels_last(self.recorder.last))
        out = self.vae.decode(latents, *args, **kwargs)
        self.recorder.add("frames", out[0])
        self.recorder.chunk += 1
        self.recorder.stage, self.recorder.history_seen = 0, False
        return out


class _VideoProcessor:
    """Hands back the video it is given, recording it as ``video`` (post-processing to [0, 1] is not compared)."""

    def __init__(self, capture: Capture):
        self.capture = capture

    def postprocess_video(self, video: torch.Tensor, output_type: str = "np") -> torch.Tensor:
        self.capture.add("video", video)
        return video


class _ProgressBar:
    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


# --- the pipeline ------------------------------------------------------------------------------------
def pipeline(side: Side, scheduler: HeliosDMDScheduler, draws: Draws, capture: Capture, recorder: Recorder) -> Any:
    """A ``HeliosPyramidPipeline`` made of its own methods (compiled from the installed source) and ``side``'s models."""
    namespace = {"torch": _Torch(draws), "F": F, "math": math, "randn_tensor": draws.randn_tensor,
                 "logger": logging.get_logger(PIPELINE_MODULE), "XLA_AVAILABLE": False,
                 "PipelineCallback": PipelineCallback, "MultiPipelineCallbacks": MultiPipelineCallbacks,
                 "replace_example_docstring": replace_example_docstring, "EXAMPLE_DOC_STRING": "    Examples:"}
    functions = compile_functions(PIPELINE_MODULE, ["calculate_shift", "optimized_scale"],
                                  {"HeliosPyramidPipeline": list(METHODS)}, namespace)
    shell = type("HeliosPyramidPipeline", (), {
        **{name: getattr(functions, name) for name in METHODS},
        "_execution_device": torch.device("cpu"),
        "progress_bar": lambda self, total=None: _ProgressBar(),
        "maybe_free_model_hooks": lambda self: None,
    })()
    vae = side.vae
    shell.transformer = _Transformer(side.transformer, recorder)
    shell.scheduler = _Scheduler(scheduler, recorder)
    shell.vae = _Vae(vae, recorder)
    shell.config = SimpleNamespace(is_distilled=True, is_cfg_zero_star=False)
    # HeliosPyramidPipeline.__init__:
    #   self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
    #   self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
    shell.vae_scale_factor_temporal = vae.config.scale_factor_temporal
    shell.vae_scale_factor_spatial = vae.config.scale_factor_spatial
    shell.video_processor = _VideoProcessor(capture)
    return shell


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
    scheduler = HeliosDMDScheduler(**config.scheduler.to_dict())
    pipe = pipeline(side, scheduler, shared, capture, recorder)
    spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
    window = (config.latent_frames - 1) * temporal + 1  # the pipeline's window_num_frames
    state = {}
    if start is not None:  # the pipeline's own latents: float32 (float64 in the truth)
        latents_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        state = {"video_latents": channels_first(start.history, latents_dtype),
                 "image_latents": None if start.prefix is None else channels_first(start.prefix, latents_dtype)}
    pipe(prompt_embeds=torch.from_numpy(inputs["text"]).to(dtype), height=config.height * spatial,
         width=config.width * spatial, num_frames=len(chunks) * window, guidance_scale=1.0, output_type="pt",
         return_dict=False, callback_on_step_end_tensor_inputs=None, history_sizes=list(config.history_sizes),
         num_latent_frames_per_chunk=config.latent_frames, keep_first_frame=True,
         pyramid_num_inference_steps_list=list(config.steps),
         is_amplify_first_chunk=config.is_amplify_first_chunk and chunks[0] == 0,
         add_noise_to_image_latents=False, add_noise_to_video_latents=False, **state)
    shared.check_used()

