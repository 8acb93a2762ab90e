"""Attention probabilities of a diffusers attention call, from the arguments ``dispatch_attention_fn`` was given.

diffusers' processors call ``dispatch_attention_fn(query, key, value, attn_mask=..., is_causal=...,
scale=...)`` with ``(batch, tokens, heads, head_dim)`` tensors. Wrapped by
:func:`parity.capture_torch.record_calls` (``derived={"probs": dispatch_probs}``), each call's map
``softmax(Q K^T * scale + mask)`` is recomputed from the very q/k it attends with and the mask,
causality and scale it was passed (scale None: ``head_dim ** -0.5``, as SDPA), so a block or a
whole transformer records what its attention kernel was asked to compute.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

#: The computation holds about this many logits at once (query rows per chunk), whatever the token count.
CHUNK_ELEMENTS = 1 << 20


def dispatch_probs(args: Mapping[str, Any]) -> torch.Tensor:
    """``(batch, heads, queries, keys)`` probabilities of one ``dispatch_attention_fn`` call's arguments.

    float64 q/k (the truth run) give float64 maps, anything else float32; a boolean mask keeps
    where True, a float mask is added to the logits, ``is_causal`` keeps keys up to the query's
    position (top-left aligned, as torch's SDPA).
    """
    query, key = args["query"], args["key"]
    mask, causal, scale = args.get("attn_mask"), bool(args.get("is_causal", False)), args.get("scale")
    if args.get("enable_gqa"):
        raise NotImplementedError("attention maps of grouped-query attention (enable_gqa) are not implemented")
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    batch, queries, heads, head_dim = query.shape
    keys = key.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    keys_t = key.to(dtype).permute(0, 2, 3, 1).contiguous()  # (batch, heads, head_dim, keys), once
    out = torch.empty(batch, heads, queries, keys, dtype=dtype)
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * keys))
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        logits = (query[:, start:stop].to(dtype).transpose(1, 2) * scale) @ keys_t
        if causal:
            index = torch.arange(start, stop)[:, None]
            logits = logits.masked_fill(torch.arange(keys)[None, :] > index, float("-inf"))
        if mask is not None:
            part = mask[..., start:stop, :] if mask.shape[-2] == queries else mask
            logits = logits.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else logits + part.to(dtype)
        out[:, :, start:stop] = torch.softmax(logits, dim=-1)
    return out
