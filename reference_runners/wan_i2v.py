"""Wan I2V conditioning reference: the real ``WanImageToVideoPipeline.prepare_latents`` on a real ``AutoencoderKLWan``.

``pipeline_wan_i2v`` imports ``transformers`` at module level (tokenizer, T5 and CLIP), which this
harness does not install, so ``prepare_latents`` and the module's ``retrieve_latents`` are compiled
from the installed source, unmodified (:mod:`reference_runners.pipeline_source`), and called
unbound on a minimal pipeline object holding what they read (:func:`pipeline_stub`: ``vae``,
``config.expand_timesteps = False``, and the scale factors ``__init__`` takes from the VAE config).

Called as ``WanImageToVideoPipeline.__call__`` calls it: the image preprocessed to [-1, 1] and cast
to float32, ``num_channels_latents = vae.config.z_dim``, ``dtype=torch.float32``, the given noise
``latents`` (so no draw), no last image. ``__call__``'s concatenation
``torch.cat([latents, condition], dim=1).to(transformer_dtype)`` is inline there and reproduced.

Recorded, channels-last ``(b, latent frames, h, w, c)``: ``mask`` and ``image_latents`` are the two
parts of the ``condition`` ``prepare_latents`` returns (``torch.concat([mask_lat_size,
latent_condition], dim=1)``; split at the mask's ``vae_scale_factor_temporal`` channels, not
recomputed), then ``conditioning`` (the transformer input).
"""
from __future__ import annotations

from functools import cache
from types import SimpleNamespace
from typing import Mapping

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from parity.capture import Capture
from reference_runners.pipeline_source import compile_functions

PIPELINE_MODULE = "diffusers.pipelines.wan.pipeline_wan_i2v"


class Reference(torch.nn.Module):
    """The VAE (the only weights) and the frame count the pipeline is called with."""

    def __init__(self, vae: AutoencoderKLWan, num_frames: int):
        super().__init__()
        self.vae = vae
        self.num_frames = num_frames


@cache
def pipeline_functions() -> SimpleNamespace:
    """``retrieve_latents`` and ``WanImageToVideoPipeline.prepare_latents`` from the installed pipeline's source."""
    return compile_functions(PIPELINE_MODULE, ["retrieve_latents"], {"WanImageToVideoPipeline": ["prepare_latents"]},
                             {"torch": torch, "randn_tensor": randn_tensor,
                              "get_module_execution_device": get_module_execution_device})


def pipeline_stub(vae: AutoencoderKLWan) -> SimpleNamespace:
    """What ``prepare_latents`` reads from the pipeline, set as ``WanImageToVideoPipeline.__init__`` sets it."""
    return SimpleNamespace(vae=vae, config=SimpleNamespace(expand_timesteps=False),
                           vae_scale_factor_temporal=vae.config.scale_factor_temporal,
                           vae_scale_factor_spatial=vae.config.scale_factor_spatial)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 4, 1)


def run(reference: Reference, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> torch.Tensor:
    """The transformer input for ``inputs["image"]`` ``(b, 3, H, W)`` and noise ``inputs["latents"]``
    ``(b, z_dim, latent frames, H/8, W/8)``; ``dtype``: the transformer's dtype. The latents and the image
    latents are float32 as the pipeline makes them (float64 in the float64 truth run, with a float64 VAE)."""
    vae = reference.vae
    pipe = pipeline_stub(vae)
    latents_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    image = torch.from_numpy(np.asarray(inputs["image"])).to(dtype=torch.float32)
    batch_size, _, height, width = image.shape
    with torch.no_grad():
        latents, condition = pipeline_functions().prepare_latents(
            pipe, image, batch_size, vae.config.z_dim, height, width, reference.num_frames, latents_dtype,
            torch.device("cpu"), None, torch.from_numpy(np.asarray(inputs["latents"])), None,
        )
    masks = pipe.vae_scale_factor_temporal
    if condition.shape[1] != masks + vae.config.z_dim:
        raise RuntimeError(f"prepare_latents returned a condition of {condition.shape[1]} channels; expected the "
                           f"mask's {masks} + z_dim {vae.config.z_dim}")
    capture.add("mask", channels_last(condition[:, :masks]))
    capture.add("image_latents", channels_last(condition[:, masks:]))
    latent_model_input = torch.cat([latents, condition], dim=1).to(dtype)
    capture.add("conditioning", channels_last(latent_model_input))
    return latent_model_input
