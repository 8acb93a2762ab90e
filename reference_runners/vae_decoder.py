"""Wan VAE decoder reference: a real diffusers ``AutoencoderKLWan`` and its own chunked ``decode``.

Input: the pipelines' normalised latents ``(N, z_dim, T, h, w)``. They are denormalised exactly as the Wan
pipelines do before ``vae.decode`` (``pipeline_wan.py``: ``latents / (1 / latents_std) + latents_mean``),
then decoded by ``AutoencoderKLWan.decode``, which runs ``post_quant_conv`` once over all latents and the
decoder once per latent frame (``_decode``), carrying its feature cache across those chunks.

Forward hooks record ``post_quant_conv`` and every call of every decoder block, one per chunk
(``chunk<c>/<block>``): ``conv_in``, ``mid_block.*``, ``up_blocks.<i>.resnets.<j>``,
``up_blocks.<i>.upsamplers.0``, ``up_blocks.<i>``, ``norm_out``, ``conv_out``; then ``frames``, the
decoded video after ``_decode``'s clamp. :func:`run_roundtrip` records encode -> decode under ``encode/``
and ``decode/``.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from parity.capture import Capture
from parity.capture_torch import hook_modules
from reference_runners.vae import build, encode, latent_stats

__all__ = ["build", "block_names", "hooks", "denormalise", "decode", "run", "run_roundtrip"]


def block_names(model: AutoencoderKLWan) -> list[str]:
    """The decoder's recorded blocks in the order their hooks fire (a block's after its sub-blocks')."""
    decoder = model.decoder
    names = ["conv_in", "mid_block.resnets.0"]
    for i in range(len(decoder.mid_block.attentions)):
        names += [f"mid_block.attentions.{i}", f"mid_block.resnets.{i + 1}"]
    for i, block in enumerate(decoder.up_blocks):
        names += [f"up_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
        if block.upsamplers is not None:
            names.append(f"up_blocks.{i}.upsamplers.0")
        names.append(f"up_blocks.{i}")
    return [*names, "norm_out", "conv_out"]


def hooks(model: AutoencoderKLWan, latent_frames: int, prefix: str = "") -> dict[str, list[str]]:
    """Hook paths -> layer names: ``post_quant_conv`` once, each decoder block once per latent frame."""
    found = {f"decoder.{name}": [f"{prefix}chunk{c}/{name}" for c in range(latent_frames)] for name in block_names(model)}
    return {"post_quant_conv": [f"{prefix}post_quant_conv"], **found}


def denormalise(model: AutoencoderKLWan, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the Wan pipelines hand ``vae.decode``: ``latents / latents_std + latents_mean`` with their
    ``latents_std = 1.0 / torch.tensor(config.latents_std)`` (pipeline_wan.py, pipeline_helios.py)."""
    mean, inv_std = latent_stats(model, dtype)
    return latents.to(dtype) / inv_std + mean


def decode(model: AutoencoderKLWan, latents: torch.Tensor, dtype: torch.dtype, capture: Capture,
           prefix: str = "") -> torch.Tensor:
    """The clamped video of normalised ``latents`` (N, z_dim, T, h, w), recording the decoder's blocks."""
    with hook_modules(model, capture, hooks(model, latents.shape[2], prefix)):
        frames = model.decode(denormalise(model, latents, dtype)).sample
    capture.add(f"{prefix}frames", frames)
    return frames


def run(model: AutoencoderKLWan, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    decode(model, torch.from_numpy(inputs["latents"]), dtype, capture)


def run_roundtrip(model: AutoencoderKLWan, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    """``inputs["video"]`` (N, C, T, H, W) -> normalised latents (``encode/...``) -> video (``decode/...``)."""
    latents = encode(model, torch.from_numpy(inputs["video"]).to(dtype), dtype, capture, prefix="encode/")
    decode(model, latents, dtype, capture, prefix="decode/")
