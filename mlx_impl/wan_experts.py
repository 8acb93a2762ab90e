"""Wan2.2's two-expert denoising loop with classifier-free guidance, in MLX.

Mirrors the denoising loop of diffusers' ``WanPipeline.__call__`` with ``transformer`` (the
high-noise expert), ``transformer_2`` (the low-noise expert) and ``boundary_ratio``::

    boundary = boundary_ratio * num_train_timesteps
    for each timestep t:
        expert, scale = (high, guidance_scale) if t >= boundary else (low, guidance_scale_2)
        cond = expert(latents.astype(dtype), t, prompt)
        if guidance_scale > 1:                      # CFG on or off for the whole loop
            uncond = expert(latents.astype(dtype), t, negative prompt)
            cond = uncond + scale * (cond - uncond)
        latents = scheduler.step(cond, latents)     # float32 latents

``guidance_scale_2`` defaults to ``guidance_scale``. Each expert embeds the prompts with **its
own** text projection (catalog bug 9: one expert's text embedding reused for the other), once
per call of :func:`sample`, and its blocks compute their cross-attention keys and values from it.
The timestep is compared with the boundary in float32, as torch compares an int64 timestep
with a Python float.

``WanExperts.batch_cfg`` runs cond and uncond as one call of batch 2B (``[prompt; negative]``),
as many ports do; the reference calls the expert twice. The results are the same up to float
rounding; the taps then hold both halves (see below).

Taps: ``expert_high/text_embedding`` and ``expert_high/negative_text_embedding`` (with CFG),
the same for ``expert_low``; ``sigmas``, ``timesteps``; per step ``step{k}/expert``
(:data:`HIGH` or :data:`LOW`, diffusers' ``transformer`` / ``transformer_2``), ``step{k}/cond/temb``
(the expert's time embedding after its cast to the model dtype) and ``step{k}/cond``, the same for
``uncond`` (with CFG), ``step{k}/guided`` (the scheduler's input), then the scheduler's
``step{k}/corrector``, ``step{k}/predictor``, ``step{k}/sample``. With ``batch_cfg`` the text
embeddings are ``{expert}/text_embedding`` of batch 2B and the two predictions one
``step{k}/noise_pred`` (``[cond; uncond]`` along the batch axis; its ``temb`` ``step{k}/noise_pred/temb``).
The experts' other layers are not tapped (the ``wan_transformer`` component compares them).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_impl import unipc as U
from mlx_impl.taps import muted, renamed, requesting, tap, tap_scope
from mlx_impl.transformer import WanTransformer

#: Tap prefixes of the two experts, in diffusers' order (``transformer``, ``transformer_2``).
EXPERTS = ("expert_high", "expert_low")
#: The expert's tap of its condition embedding's ``temb`` (after the cast to the model dtype), kept per call.
TEMB = "condition_embedder/main/temb"
#: ``step{k}/expert`` values: diffusers' ``transformer`` (high-noise) and ``transformer_2`` (low-noise).
HIGH, LOW = 1, 2


@dataclass
class WanExperts:
    """The two experts and the pipeline's guidance settings (``boundary_ratio`` as diffusers' pipeline config)."""

    high: WanTransformer
    low: WanTransformer
    boundary_ratio: float
    guidance_scale: float
    guidance_scale_2: float | None = None
    batch_cfg: bool = False

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: on when ``guidance_scale > 1`` (diffusers reads ``guidance_scale`` only)."""
        return self.guidance_scale > 1.0

    def scale(self, expert: int) -> float:
        return guidance_scale(expert, self.guidance_scale, self.guidance_scale_2)


def guidance_scale(expert: int, high: float, low: float | None) -> float:
    """The scale ``expert`` guides with: ``guidance_scale`` (high), ``guidance_scale_2`` (low; default: the high one)."""
    return high if expert == HIGH or low is None else low


def expert_schedule(timesteps: Sequence[int], boundary: float) -> list[int]:
    """Per step, the expert that runs: :data:`HIGH` at ``t >= boundary``, :data:`LOW` below (compared in float32)."""
    return [HIGH if np.float32(t) >= np.float32(boundary) else LOW for t in timesteps]


def guide(cond: mx.array, uncond: mx.array, scale: float) -> mx.array:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, in the predictions' dtype."""
    return uncond + scale * (cond - uncond)


def text_contexts(experts: Sequence[WanTransformer], text: mx.array, negative: mx.array | None,
                  batch_cfg: bool) -> list[list[mx.array]]:
    """Per expert, its own embedding of each prompt: ``[prompt, negative]`` (``[prompt]`` without CFG;
    one ``[prompt; negative]`` batch with ``batch_cfg``), tapped as ``{expert}/text_embedding``."""
    contexts = []
    for name, model in zip(EXPERTS, experts):
        if batch_cfg and negative is not None:
            with muted():
                both = model.embed_text(mx.concatenate([text, negative]))
            contexts.append([tap(f"{name}/text_embedding", both)])
            continue
        with muted():
            embedded = [model.embed_text(text)] + ([model.embed_text(negative)] if negative is not None else [])
        contexts.append([tap(f"{name}/text_embedding", embedded[0])]
                        + [tap(f"{name}/negative_text_embedding", e) for e in embedded[1:]])
    return contexts


@contextmanager
def expert_call(label: str) -> Iterator[None]:
    """Inside an expert's call only its ``temb`` tap (requested here) is recorded, as ``{label}/temb``."""
    def rename(name: str) -> str | None:
        return name.replace(TEMB, f"{label}/temb") if name.endswith(f"/{TEMB}") else None
    with requesting("temb"), renamed(rename):
        yield


def predict(model: WanTransformer, latents: mx.array, t: int, contexts: list[mx.array]) -> list[mx.array]:
    """The expert's predictions ``[cond]`` or ``[cond, uncond]``, tapped as ``cond`` / ``uncond`` (after each call's
    ``cond/temb`` / ``uncond/temb``); from one call of batch 2B when ``contexts`` is one ``[prompt; negative]`` batch
    (tapped ``noise_pred/temb``, ``noise_pred``)."""
    b = latents.shape[0]
    if contexts[0].shape[0] == b:
        predictions = []
        for name, context in zip(("cond", "uncond"), contexts):
            with expert_call(name):
                predictions.append(model(latents, mx.array(np.full((b,), t)), context=context))
            tap(name, predictions[-1])
        return predictions
    with expert_call("noise_pred"):
        both = model(mx.concatenate([latents, latents]), mx.array(np.full((2 * b,), t)), context=contexts[0])
    tap("noise_pred", both)
    return [both[:b], both[b:]]


def sample(experts: WanExperts, scheduler: U.UniPCMultistepScheduler, latents: mx.array, text: mx.array,
           negative: mx.array, dtype: mx.Dtype, forced: U.Forced | None = None) -> mx.array:
    """The two-expert loop over ``scheduler``'s current schedule (see the module docstring).

    ``latents`` channels-last float32; ``text`` / ``negative`` ``(b, L, text_dim)`` in the model dtype
    ``dtype``; ``forced``: teacher forcing per step, as :func:`mlx_impl.unipc.sample`, whose loop this is.
    """
    models = (experts.high, experts.low)
    contexts = text_contexts(models, text, negative if experts.cfg else None, experts.batch_cfg)
    chosen = expert_schedule(scheduler.timesteps, experts.boundary_ratio * scheduler.num_train_timesteps)

    def denoise(x: mx.array, t: int) -> mx.array:
        k = scheduler.step_index  # the step about to be taken
        expert = chosen[k]
        with tap_scope(f"step{k}"):
            tap("expert", np.array([expert], np.int64))
            predictions = predict(models[expert - 1], x, t, contexts[expert - 1])
            flow = guide(*predictions, experts.scale(expert)) if len(predictions) == 2 else predictions[0]
            return tap("guided", flow)

    return U.sample(scheduler, latents, denoise, dtype, forced)
