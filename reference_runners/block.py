"""Transformer-block references: diffusers' real ``HeliosTransformerBlock`` and ``WanTransformerBlock``.

Block inputs are built as ``HeliosTransformer3DModel`` / ``WanTransformer3DModel`` build them
(rotary embedding from the real ``HeliosRotaryPosEmbed`` / ``WanRotaryPosEmbed``, per-token
timestep projections with the t = 0 projection for history tokens; ``tests/test_block.py``
checks this against the real models). Nothing captured is recomputed here:

- module outputs (norms, q/k/v projections, q/k norms, attention outputs, FFN) via forward hooks;
- values that are no module's output are recorded as the real code produces them: the
  module-level functions the processors call (``apply_rotary_emb_transposed``,
  ``dispatch_attention_fn``) are wrapped to record their arguments / results, and the block's
  own local variables (modulation vectors, modulated norms, residual sums) are read by a
  tracer as ``forward`` assigns them (the tools of :mod:`parity.capture_torch`, which also serve
  a model of N blocks: every spec here is per block call).

With ``maps``, each attention call's probability map is recomputed from the arguments its
``dispatch_attention_fn`` was given (:mod:`reference_runners.attention`) and recorded as
``<attention>/probs`` after its output. A restricted history (config ``history_attention:
"restricted"``) has no switch in diffusers' block; its ``HeliosAttention`` takes an
``attention_mask`` that it hands to the attention kernel, so the mask (:func:`history_mask`)
is passed there, in place of the ``None`` the block passes.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from diffusers.models.transformers import transformer_helios, transformer_wan

from parity.capture import Capture, to_numpy
from parity.capture_torch import hook_modules, record_calls, trace_locals
from reference_runners.attention import dispatch_probs
from reference_runners.layers import BLOCK_LAYERS

#: Norm / scale parameters diffusers initialises to ones or zeros; randomised so that a port
#: ignoring one of them cannot pass (a checkpoint's values are never exactly 1).
_PERTURBED = ("norm_q", "norm_k", "norm2", "history_key_scale")


@dataclass
class Reference:
    """A real diffusers block, the config its inputs are laid out by, and its compute precision.

    ``autocast`` (a torch dtype name) runs the block under ``torch.autocast("cpu", autocast)``:
    mixed precision with the block's own (float32) dtype for the residual stream.
    """

    block: torch.nn.Module
    config: Any
    autocast: str | None = None

    def precision(self) -> AbstractContextManager:
        return nullcontext() if self.autocast is None else torch.autocast("cpu", dtype=getattr(torch, self.autocast))


HOOKS = BLOCK_LAYERS
_MODULATION = ("shift_msa", "scale_msa", "gate_msa", "c_shift_msa", "c_scale_msa", "c_gate_msa")


def _locals_spec(modulation_assignment: int, residual2: int) -> dict[tuple[str, int], str]:
    """``(local variable, n-th assignment) -> layer name`` for a block's ``forward``.

    The modulation vectors are final at their 2nd assignment with a per-token temb (chunk, then
    squeeze), their 1st otherwise; Helios' guidance cross-attention assigns ``hidden_states``
    twice more (split, add) before the concatenated residual.
    """
    spec = {(name, modulation_assignment): f"modulation/{name}" for name in _MODULATION}
    spec.update({("norm_hidden_states", 1): "norm1/modulated", ("hidden_states", 1): "residual1",
                 ("hidden_states", residual2): "residual2", ("norm_hidden_states", 3): "norm3/modulated",
                 ("hidden_states", residual2 + 1): "residual3"})
    return spec


# --- construction ------------------------------------------------------------------------------
def _perturb(block: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, param in block.named_parameters():
            if any(part in _PERTURBED for part in name.split(".")):
                param.add_(0.1 * torch.randn_like(param))
    return block.eval()


def build_helios(transformer: Any, seed: int) -> transformer_helios.HeliosTransformerBlock:
    torch.manual_seed(seed)
    dim = transformer.num_attention_heads * transformer.attention_head_dim
    return _perturb(transformer_helios.HeliosTransformerBlock(
        dim, transformer.ffn_dim, transformer.num_attention_heads, transformer.qk_norm,
        transformer.cross_attn_norm, transformer.eps, transformer.added_kv_proj_dim,
        guidance_cross_attn=transformer.guidance_cross_attn, is_amplify_history=transformer.is_amplify_history,
        history_scale_mode=transformer.history_scale_mode))


def build_wan(transformer: Any, seed: int) -> transformer_wan.WanTransformerBlock:
    torch.manual_seed(seed)
    dim = transformer.num_attention_heads * transformer.attention_head_dim
    return _perturb(transformer_wan.WanTransformerBlock(
        dim, transformer.ffn_dim, transformer.num_attention_heads, transformer.qk_norm,
        transformer.cross_attn_norm, transformer.eps, transformer.added_kv_proj_dim))


# --- inputs, laid out as the transformer models lay them out ------------------------------------
def _tokens(grid: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, frames, height, width, dim)`` -> ``(batch, tokens, dim)`` (the models' ``flatten(2).transpose(1, 2)``)."""
    return torch.from_numpy(grid).to(dtype).flatten(1, 3)


def helios_rotary_emb(transformer: Any, frame_indices: np.ndarray, height: int, width: int) -> torch.Tensor:
    rope = transformer_helios.HeliosRotaryPosEmbed(tuple(transformer.rope_dim), transformer.rope_theta)
    emb = rope(frame_indices=torch.from_numpy(frame_indices), height=height, width=width, device="cpu")
    return emb.flatten(2).transpose(1, 2)


def helios_block_inputs(config: Any, inputs: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """The arguments ``HeliosTransformer3DModel.forward`` passes its blocks (history first, then main tokens)."""
    transformer = config.transformer
    batch, _, height, width, _ = inputs["hidden"].shape
    history_len = int(np.prod(inputs["history"].shape[1:4]))
    main_len = int(np.prod(inputs["hidden"].shape[1:4]))
    rotary = torch.cat([helios_rotary_emb(transformer, inputs["history_indices"], height, width),
                        helios_rotary_emb(transformer, inputs["frame_indices"], height, width)], dim=1)
    # transformer_helios.py, "zero_history_timestep": history tokens get the projection of t = 0.
    proj_t0 = torch.from_numpy(inputs["timestep_proj_t0"]).to(dtype)
    proj_t0 = proj_t0.unflatten(-1, (6, -1)).view(1, 6, 1, -1).expand(batch, -1, history_len, -1)
    proj = torch.from_numpy(inputs["timestep_proj"]).to(dtype).unflatten(-1, (6, -1))
    proj = proj.view(batch, 6, 1, -1).expand(batch, 6, main_len, -1)
    temb = torch.cat([proj_t0, proj], dim=2).permute(0, 2, 1, 3)
    hidden = torch.cat([_tokens(inputs["history"], dtype), _tokens(inputs["hidden"], dtype)], dim=1)
    return {"hidden_states": hidden.contiguous(), "encoder_hidden_states": torch.from_numpy(inputs["text"]).to(dtype),
            "temb": temb, "rotary_emb": rotary.contiguous(), "original_context_length": main_len}


def wan_block_inputs(config: Any, inputs: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """The arguments ``WanTransformer3DModel.forward`` passes its blocks (Wan 2.1: one temb per sample)."""
    transformer = config.transformer
    batch, frames, height, width, _ = inputs["hidden"].shape
    pt, ph, pw = transformer.patch_size
    head_dim = transformer.attention_head_dim
    rope = transformer_wan.WanRotaryPosEmbed(head_dim, tuple(transformer.patch_size), transformer.rope_max_seq_len)
    rotary = rope(torch.zeros(batch, 1, frames * pt, height * ph, width * pw))  # only the latent's shape is used
    temb = torch.from_numpy(inputs["timestep_proj"]).to(dtype).unflatten(1, (6, -1))
    return {"hidden_states": _tokens(inputs["hidden"], dtype), "encoder_hidden_states": torch.from_numpy(inputs["text"]).to(dtype),
            "temb": temb, "rotary_emb": rotary}


# --- capture -------------------------------------------------------------------------------------
_ATTENTION_ARGS = ("query", "key", "value")


def history_mask(history_len: int, tokens: int) -> torch.Tensor:
    """``(tokens, tokens)`` boolean mask (True: attend): history queries see history keys only, main queries all."""
    index = torch.arange(tokens)
    return ~((index[:, None] < history_len) & (index[None, :] >= history_len))


@contextmanager
def restricted_history(block: torch.nn.Module, history_len: int, tokens: int) -> Iterator[None]:
    """``block.attn1`` called with :func:`history_mask` as its ``attention_mask`` (its 3rd argument) instead of None."""
    mask = history_mask(history_len, tokens)
    handle = block.attn1.register_forward_pre_hook(lambda _module, args: (*args[:2], mask, *args[3:]))
    try:
        yield
    finally:
        handle.remove()


def _attention_calls(calls: list[dict[str, str]], maps: bool) -> list[dict[str, str]]:
    """``dispatch_attention_fn`` record specs, with each call's map ``<attention>/probs`` when ``maps``."""
    return [{**call, "probs": call["out"].replace("/attention", "/probs")} if maps else call for call in calls]


def run_helios(reference: Reference, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture,
               maps: bool = False) -> None:
    block = reference.block
    args = helios_block_inputs(reference.config, inputs, dtype)
    history_len = args["hidden_states"].shape[1] - args["original_context_length"]
    amplified = block.attn1.is_amplify_history and history_len > 0
    attn1 = {"key": "attn1/k_history_scaled", "out": "attn1/attention"} if amplified else {"out": "attn1/attention"}
    residual2 = 4 if block.guidance_cross_attn else 2
    with ExitStack() as stack:
        stack.enter_context(hook_modules(block, capture, HOOKS))
        stack.enter_context(record_calls(transformer_helios, "apply_rotary_emb_transposed",
                                         [{"out": "attn1/q_rope"}, {"out": "attn1/k_rope"}], capture, ()))
        stack.enter_context(record_calls(transformer_helios, "dispatch_attention_fn",
                                         _attention_calls([attn1, {"out": "attn2/attention"}], maps), capture,
                                         _ATTENTION_ARGS, {"probs": dispatch_probs}))
        stack.enter_context(trace_locals({type(block).forward.__code__: _locals_spec(2, residual2)}, capture))
        if reference.config.history_attention == "restricted" and history_len:
            stack.enter_context(restricted_history(block, history_len, args["hidden_states"].shape[1]))
        stack.enter_context(reference.precision())
        block(**args)


def run_wan(reference: Reference, inputs: dict[str, np.ndarray], dtype: torch.dtype, capture: Capture,
            maps: bool = False) -> None:
    block = reference.block
    args = wan_block_inputs(reference.config, inputs, dtype)
    attn1 = {"query": "attn1/q_rope", "key": "attn1/k_rope", "out": "attn1/attention"}  # RoPE is nested in the processor
    with ExitStack() as stack:
        stack.enter_context(hook_modules(block, capture, HOOKS))
        stack.enter_context(record_calls(transformer_wan, "dispatch_attention_fn",
                                         _attention_calls([attn1, {"out": "attn2/attention"}], maps), capture,
                                         _ATTENTION_ARGS, {"probs": dispatch_probs}))
        stack.enter_context(trace_locals({type(block).forward.__code__: _locals_spec(args["temb"].ndim - 2, 2)}, capture))
        stack.enter_context(reference.precision())
        block(**args)


def run_recurrent(reference: Reference, args: dict[str, Any], steps: int) -> list[np.ndarray]:
    """The block applied ``steps`` times with shared weights, each output fed back as input."""
    outputs = []
    hidden = args["hidden_states"]
    history_len = hidden.shape[1] - args.get("original_context_length", hidden.shape[1])
    restricted = getattr(reference.config, "history_attention", "full") == "restricted" and history_len
    with torch.no_grad(), reference.precision(), \
            (restricted_history(reference.block, history_len, hidden.shape[1]) if restricted else nullcontext()):
        for _ in range(steps):
            hidden = reference.block(**{**args, "hidden_states": hidden})
            outputs.append(to_numpy(hidden)[0])
    return outputs
