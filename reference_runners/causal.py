"""Diffusion-forcing reference: diffusers' real ``SkyReelsV2Transformer3DModel``, block-causal, per-frame timesteps.

diffusers defines no key/value cache for it: its diffusion-forcing pipeline calls the whole model at every step on
the frames of ``valid_interval``, finished causal blocks included (see :mod:`parity.components.wan_causal` for the
semantics this gives a cache). One call is a *pass*: :func:`run_pass` records it with the layer names of a
one-pass run (:func:`reference_runners.transformer.wan_capture`). A cache window is no part of diffusers; its
reference is the same model with every block given a mask narrowed to what the window keeps (:func:`masked`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from diffusers import SkyReelsV2Transformer3DModel
from diffusers.models.transformers import transformer_skyreels_v2

from parity.capture import Capture
from reference_runners import block as block_runner
from reference_runners.transformer import wan_capture


def build(config: Mapping[str, Any], seed: int) -> SkyReelsV2Transformer3DModel:
    """The model from its diffusers config, randomly initialised from ``seed`` (norm scales perturbed)."""
    torch.manual_seed(seed)
    return block_runner._perturb(SkyReelsV2Transformer3DModel.from_config(dict(config)))


@contextmanager
def masked(model: torch.nn.Module, mask: np.ndarray | None, tokens_per_frame: int) -> Iterator[None]:
    """Every block gets ``mask`` (frames x frames, bool) as its attention mask instead of the model's own causal
    mask (None: the model's own)."""
    if mask is None:
        yield
        return
    tokens = torch.from_numpy(np.repeat(np.repeat(mask, tokens_per_frame, 0), tokens_per_frame, 1))[None, None]
    handles = [block.register_forward_pre_hook(lambda _m, args: (*args[:4], tokens)) for block in model.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_pass(model: torch.nn.Module, latents: np.ndarray, timesteps: np.ndarray, text: np.ndarray,
             mask: np.ndarray | None, dtype: torch.dtype) -> Capture:
    """One diffusion-forcing call (``latents`` ``(b, c, frames, H, W)``, ``timesteps`` ``(b, frames)``), recorded."""
    record = Capture("ref")
    _, ph, pw = model.config.patch_size
    with wan_capture(model, transformer_skyreels_v2, record), masked(model, mask, (latents.shape[3] // ph) * (latents.shape[4] // pw)):
        model(hidden_states=torch.from_numpy(latents).to(dtype), timestep=torch.from_numpy(timesteps),
              encoder_hidden_states=torch.from_numpy(text).to(dtype), enable_diffusion_forcing=True)
    return record
