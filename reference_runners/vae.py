"""Wan VAE encoder reference: a real diffusers ``AutoencoderKLWan`` and its own chunked ``encode``.

Forward hooks on every encoder block record each of its calls, one per chunk (``chunk<i>/<block>``;
chunk 0 is the single first frame), then ``quant_conv``. ``latents`` is the pipelines' normalisation
of the posterior mode, ``(mode - latents_mean) * (1 / latents_std)`` (``pipeline_wan_i2v.prepare_latents``).
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from parity.capture import Capture
from parity.capture_torch import hook_modules


def build(vae_config: dict, seed: int) -> AutoencoderKLWan:
    """A randomly initialised VAE; RMS-norm gains are drawn around 1 (diffusers inits them to exactly 1,
    which would hide a misplaced gain)."""
    torch.manual_seed(seed)
    model = AutoencoderKLWan.from_config(vae_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.add_(0.2 * torch.randn_like(param))
    return model


def block_names(model: AutoencoderKLWan) -> list[str]:
    """The encoder's recorded blocks in execution order (names of ``model.encoder``'s submodules)."""
    encoder = model.encoder
    mid = ["mid_block.resnets.0"]
    for i in range(len(encoder.mid_block.attentions)):
        mid += [f"mid_block.attentions.{i}", f"mid_block.resnets.{i + 1}"]
    return ["conv_in", *[f"down_blocks.{i}" for i in range(len(encoder.down_blocks))], *mid, "norm_out", "conv_out"]


def hooks(model: AutoencoderKLWan, frames: int, prefix: str = "") -> dict[str, list[str]]:
    chunks = 1 + (frames - 1) // 4  # as AutoencoderKLWan._encode
    found = {f"encoder.{name}": [f"{prefix}chunk{i}/{name}" for i in range(chunks)] for name in block_names(model)}
    return {**found, "quant_conv": [f"{prefix}quant_conv"]}


def latent_stats(model: AutoencoderKLWan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents_mean`` and ``1 / latents_std`` as the Wan pipelines build them (reciprocal in float32, then cast)."""
    config = model.config
    mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(dtype)
    inv_std = (1.0 / torch.tensor(config.latents_std)).view(1, config.z_dim, 1, 1, 1).to(dtype)
    return mean, inv_std


def encode(model: AutoencoderKLWan, video: torch.Tensor, dtype: torch.dtype, capture: Capture,
           prefix: str = "") -> torch.Tensor:
    """The pipelines' normalised latents of ``video`` (N, C, T, H, W), recording the encoder's blocks."""
    with hook_modules(model, capture, hooks(model, video.shape[2], prefix)):
        mode = model.encode(video).latent_dist.mode()
    mean, inv_std = latent_stats(model, dtype)
    latents = (mode.to(dtype) - mean) * inv_std
    capture.add(f"{prefix}latents", latents)
    return latents


def run(model: AutoencoderKLWan, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    encode(model, torch.from_numpy(inputs["video"]).to(dtype), dtype, capture)
