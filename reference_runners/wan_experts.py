"""Two-expert reference: the real ``WanPipeline.__call__`` (Wan2.2 A14B layout) on two real ``WanTransformer3DModel``s.

``pipeline_wan`` imports ``transformers`` at module level, which this harness does not install,
so the ``WanPipeline`` class is compiled from the installed source, unmodified
(:func:`reference_runners.pipeline_source.compile_class`), on diffusers' own ``DiffusionPipeline``
(its LoRA mixin, which needs ``transformers``, is left out: no LoRA is loaded). It is built as
diffusers builds a Wan2.2 pipeline: ``transformer`` (high-noise expert), ``transformer_2``
(low-noise expert), ``boundary_ratio``, a real ``UniPCMultistepScheduler``; no tokenizer, text
encoder or VAE: the prompts come as ``prompt_embeds`` / ``negative_prompt_embeds``, the noise as
``latents``, and ``output_type="latent"`` returns the final latents. Its loop (step 6) does, per
timestep::

    if boundary_timestep is None or t >= boundary_timestep:  current_model, current_guidance_scale = transformer, guidance_scale
    else:                                                     current_model, current_guidance_scale = transformer_2, guidance_scale_2
    with current_model.cache_context("cond", ...):   noise_pred = current_model(latents.to(transformer_dtype), t, prompt_embeds)
    if self.do_classifier_free_guidance:             # guidance_scale > 1.0
        with current_model.cache_context("uncond", ...): noise_uncond = current_model(..., negative_prompt_embeds)
        noise_pred = noise_uncond + current_guidance_scale * (noise_pred - noise_uncond)
    latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

Recorded, read where the pipeline produces them (channels-last): ``expert_high/text_embedding``
and ``expert_high/negative_text_embedding`` (with CFG; the same for ``expert_low``): each expert's
own ``condition_embedder.text_embedder`` on the prompts the pipeline hands it (cast to the
transformer's dtype as ``__call__`` casts them), computed before the loop (the forward computes
the same at every call); ``sigmas`` and ``timesteps`` as ``set_timesteps`` leaves them; per step
``step{k}/expert`` (1: ``transformer``, 2: ``transformer_2``), ``step{k}/cond/temb`` and
``step{k}/cond`` (the same for ``uncond``: the expert's ``condition_embedder``'s ``temb``, which it
casts to the text's dtype, then the expert's output, named by the ``cache_context`` label the
pipeline opens around the call; forward hooks removed after the call), ``step{k}/guided`` (the ``model_output`` the pipeline passes to
``scheduler.step``), the solver's ``step{k}/corrector`` / ``step{k}/predictor``
(:func:`reference_runners.unipc.recorded_updates`) and ``step{k}/sample`` (``step``'s result).

In the float64 truth run the latents are float64 throughout (``__call__`` makes them float32 with
``prepare_latents(..., torch.float32, ...)``; replaced on the instance by one returning them as
given). Teacher forcing: ``forced`` per step ``(x_k, last_k)`` as :func:`reference_runners.unipc.run`
takes it, applied through the pipeline's own ``callback_on_step_end`` (the latents entering the next
step) and the scheduler's ``last_sample``.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from diffusers import DiffusionPipeline, UniPCMultistepScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils import logging
from diffusers.utils.doc_utils import replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor

from parity.capture import Capture
from reference_runners.pipeline_source import compile_class
from reference_runners.unipc import Forced, channels_first, channels_last, recorded_updates

PIPELINE_MODULE = "diffusers.pipelines.wan.pipeline_wan"
#: Layer prefixes of ``transformer`` and ``transformer_2``; ``step{k}/expert`` records their number (1, 2).
EXPERTS = ("expert_high", "expert_low")


@cache
def pipeline_class() -> type:
    """``WanPipeline`` from the installed source, with the globals its methods read."""
    return compile_class(PIPELINE_MODULE, "WanPipeline", {
        "torch": torch, "DiffusionPipeline": DiffusionPipeline, "WanLoraLoaderMixin": object,
        "PipelineCallback": PipelineCallback, "MultiPipelineCallbacks": MultiPipelineCallbacks,
        "replace_example_docstring": replace_example_docstring, "EXAMPLE_DOC_STRING": "",
        "logger": logging.get_logger(PIPELINE_MODULE), "XLA_AVAILABLE": False, "VideoProcessor": VideoProcessor,
        "WanPipelineOutput": WanPipelineOutput, "get_module_execution_device": get_module_execution_device,
        "randn_tensor": randn_tensor})


class Reference(torch.nn.Module):
    """The two experts (the only weights: ``transformer.*``, ``transformer_2.*``) and the run's settings."""

    def __init__(self, config: Any, transformer: torch.nn.Module, transformer_2: torch.nn.Module):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.settings = config


def pipeline(reference: Reference) -> Any:
    """A ``WanPipeline`` on the reference's experts, as a Wan2.2 A14B pipeline is assembled."""
    config = reference.settings
    scheduler = UniPCMultistepScheduler.from_config(config.scheduler.to_dict())
    pipe = pipeline_class()(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                            transformer=reference.transformer, transformer_2=reference.transformer_2,
                            boundary_ratio=config.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def recorded_loop(pipe: Any, capture: Capture) -> Iterator[None]:
    """Record each step's expert, time embeddings, predictions, guided prediction and sample (see the module docstring)."""
    state = {"step": 0, "call": None}
    scheduler, step, set_timesteps = pipe.scheduler, pipe.scheduler.step, pipe.scheduler.set_timesteps
    handles = []

    def recorded_schedule(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        capture.add("sigmas", scheduler.sigmas)
        capture.add("timesteps", scheduler.timesteps)

    def recorded_step(model_output, timestep, sample, *args, **kwargs):
        k = state["step"]
        capture.add(f"step{k}/guided", channels_last(model_output))
        out = step(model_output, timestep, sample, *args, **kwargs)
        capture.add(f"step{k}/sample", channels_last(out[0]))
        state["step"] += 1
        return out

    def labelled(number: int, context):
        def cache_context(name: str, **kwargs):
            if name == "cond":
                capture.add(f"step{state['step']}/expert", np.array([number], np.int64))
            state["call"] = name
            return context(name, **kwargs)
        return cache_context

    def output(_module, _args, out):
        capture.add(f"step{state['step']}/{state['call']}", channels_last(out[0]))

    def embedding(_module, _args, out):  # (temb, timestep_proj, text, image): temb cast to the text's dtype
        capture.add(f"step{state['step']}/{state['call']}/temb", out[0])

    models = (pipe.transformer, pipe.transformer_2)
    scheduler.set_timesteps, scheduler.step = recorded_schedule, recorded_step
    try:
        for number, model in enumerate(models, start=1):
            model.cache_context = labelled(number, model.cache_context)
            handles.append(model.register_forward_hook(output))
            handles.append(model.condition_embedder.register_forward_hook(embedding))
        yield
    finally:
        del scheduler.set_timesteps, scheduler.step
        for model in models:
            model.__dict__.pop("cache_context", None)  # the class's method again
        for handle in handles:
            handle.remove()


def run(reference: Reference, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture,
        forced: Forced | None = None) -> None:
    """The pipeline from ``inputs``: ``latents`` ``(b, c, f, h, w)``, ``text`` and ``negative_text``
    ``(b, L, text_dim)``; ``dtype``: the experts' dtype (the run's)."""
    config = reference.settings
    pipe = pipeline(reference)
    prompt, negative = (torch.from_numpy(np.asarray(inputs[key])) for key in ("text", "negative_text"))
    latents = torch.from_numpy(np.asarray(inputs["latents"]))
    if forced is not None:
        latents = channels_first(forced[0][0], latents.dtype)
    if dtype == torch.float64:
        latents = latents.to(torch.float64)
        pipe.prepare_latents = lambda *args, **kwargs: latents  # the truth's latents stay float64
    cfg = config.guidance_scale > 1.0  # the pipeline's do_classifier_free_guidance
    with torch.no_grad():
        for name, model in zip(EXPERTS, (pipe.transformer, pipe.transformer_2)):
            embed = model.condition_embedder.text_embedder
            capture.add(f"{name}/text_embedding", embed(prompt.to(pipe.transformer.dtype)))
            if cfg:
                capture.add(f"{name}/negative_text_embedding", embed(negative.to(pipe.transformer.dtype)))

    def force(pipe: Any, i: int, _t: Any, _tensors: dict) -> dict:
        if i + 1 >= len(forced):
            return {}
        x, last = forced[i + 1]
        if last is not None:
            pipe.scheduler.last_sample = channels_first(last, latents.dtype)
        return {"latents": channels_first(x, latents.dtype)}

    frames, height, width = latents.shape[2:]
    with recorded_loop(pipe, capture), recorded_updates(pipe.scheduler, capture):
        pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, latents=latents,
             height=height * pipe.vae_scale_factor_spatial, width=width * pipe.vae_scale_factor_spatial,
             num_frames=(frames - 1) * pipe.vae_scale_factor_temporal + 1, num_inference_steps=config.steps,
             guidance_scale=config.guidance_scale, guidance_scale_2=config.guidance_scale_2,
             output_type="latent", return_dict=False, callback_on_step_end=force if forced is not None else None)
