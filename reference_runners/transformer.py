"""Whole-transformer references: diffusers' real ``HeliosTransformer3DModel`` / ``WanTransformer3DModel``.

The real ``forward`` runs unchanged; nothing captured is recomputed:

- module outputs by forward hooks (``patch_embedding``, ``patch_short|mid|long``, the condition
  embedder's parts, ``norm_out``, ``proj_out``) and the input of ``blocks.0`` (``tokens``) and
  of ``proj_out`` (``norm_out/modulated``) by pre-hooks;
- per block, the block component's specs (:mod:`reference_runners.block`) under the scope
  ``blocks.{i}`` that each call of ``blocks.*`` opens (hooks by glob, ``record_calls`` and
  ``trace_locals`` counted per block call);
- the RoPE tables and the output, locals of the model's ``forward`` (``rotary_emb``,
  ``rotary_emb_history_*``, ``output``), read as it assigns them.

Mixed precision (``stream: float32``): the float32 model runs under ``torch.autocast(bfloat16)``
and the patch embeddings' outputs are carried in float32 (a forward hook casts them), so the
residual stream is float32 as in the official inference, where the first residual add
promotes it.

Streamed blocks (a model too large for memory): the blocks are built on the ``meta`` device and
:class:`StreamedBlocks` gives each its weights in a forward pre-hook and takes them away after
its forward; everything else in the model is resident.
"""
from __future__ import annotations

import inspect
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import HeliosTransformer3DModel, WanTransformer3DModel
from diffusers.models.transformers import transformer_helios, transformer_wan

from parity.capture import Capture
from parity.capture_torch import hook_modules, record_calls, scoped_modules, trace_locals
from parity.weights import load_torch_strict
from reference_runners import block as block_runner

HISTORY_TERMS = ("short", "mid", "long")
#: The condition embedder's parts; Helios with history calls it twice (t = 0 first, then the timestep).
_EMBEDDER_PARTS = ("timesteps_proj", "time_embedder", "time_proj")


@dataclass
class Reference:
    """A real diffusers transformer, and how to run it (``autocast``: a torch dtype name for mixed precision)."""

    model: torch.nn.Module
    autocast: str | None = None

    def precision(self):
        return nullcontext() if self.autocast is None else torch.autocast("cpu", dtype=getattr(torch, self.autocast))


# --- construction ------------------------------------------------------------------------------
def build(kind: str, config: Mapping[str, Any], seed: int, streamed: bool = False) -> torch.nn.Module:
    """The model from its diffusers config, randomly initialised from ``seed`` (norm scales perturbed).

    ``streamed``: the blocks are built on the ``meta`` device (no memory); everything else is real.
    """
    cls = {"helios": HeliosTransformer3DModel, "wan": WanTransformer3DModel}[kind]
    torch.manual_seed(seed)
    if not streamed:
        return block_runner._perturb(cls.from_config(dict(config)))
    model = block_runner._perturb(cls.from_config({**config, "num_layers": 1}))
    with torch.device("meta"):
        blocks = cls.from_config({**config, "num_layers": config["num_layers"]}).blocks
    model.blocks = blocks
    model.register_to_config(num_layers=config["num_layers"])
    return model


class StreamedBlocks:
    """Forward hooks giving each meta block its weights (``source(i)``, diffusers keys) for its forward only."""

    def __init__(self, source: Callable[[int], dict[str, np.ndarray]], dtype: torch.dtype, keep_fp32: tuple[str, ...]):
        self.source, self.dtype, self.keep_fp32 = source, dtype, keep_fp32

    def attach(self, model: torch.nn.Module) -> None:
        for index, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda module, _args, i=index: self.load(module, i))
            block.register_forward_hook(self.release)

    @staticmethod
    def release(module: torch.nn.Module, _args: Any, _output: Any) -> None:
        module.to("meta")  # (returns None: a forward hook's return value would replace the output)

    def load(self, module: torch.nn.Module, index: int) -> None:
        module.to_empty(device="cpu")
        load_torch_strict(module, self.source(index))
        for name, param in module.named_parameters():
            if not any(k in name.split(".") for k in self.keep_fp32):
                param.data = param.data.to(self.dtype)


def patch_modules(model: torch.nn.Module) -> list[str]:
    return [name for name in ("patch_embedding", "patch_short", "patch_mid", "patch_long") if hasattr(model, name)]


def carry_patches_in_float32(model: torch.nn.Module) -> None:
    """Mixed precision: the patch embeddings' (autocast bf16) outputs continue as float32, as the official stream."""
    for name in patch_modules(model):
        getattr(model, name).register_forward_hook(lambda _m, _a, out: out.float())


# --- inputs ------------------------------------------------------------------------------------
def helios_inputs(inputs: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    """``HeliosTransformer3DModel.forward`` arguments: latents and history in ``dtype``, indices as int64."""
    args = {"hidden_states": torch.from_numpy(inputs["latents"]).to(dtype), "timestep": torch.from_numpy(inputs["timestep"]),
            "encoder_hidden_states": torch.from_numpy(inputs["text"]).to(dtype),
            "indices_hidden_states": torch.from_numpy(inputs["frame_indices"])}
    for term in HISTORY_TERMS:
        if f"history_{term}" in inputs:
            args[f"latents_history_{term}"] = torch.from_numpy(inputs[f"history_{term}"]).to(dtype)
            args[f"indices_latents_history_{term}"] = torch.from_numpy(inputs[f"history_{term}_indices"])
    return args


def wan_inputs(inputs: Mapping[str, np.ndarray], dtype: torch.dtype) -> dict[str, Any]:
    return {"hidden_states": torch.from_numpy(inputs["latents"]).to(dtype), "timestep": torch.from_numpy(inputs["timestep"]),
            "encoder_hidden_states": torch.from_numpy(inputs["text"]).to(dtype)}


# --- capture -----------------------------------------------------------------------------------
def _block_hooks() -> dict[str, str]:
    return {f"blocks.*.{path}": name for path, name in block_runner.HOOKS.items()}


def _embedder_hooks(calls: tuple[str, ...]) -> dict[str, list[str]]:
    hooks = {f"condition_embedder.{part}": [f"condition_embedder/{call}/{part}" for call in calls] for part in _EMBEDDER_PARTS}
    hooks["condition_embedder.text_embedder"] = ["condition_embedder/main/text_embedder"]
    return hooks


def _forward_code(model: torch.nn.Module):
    return inspect.unwrap(type(model).forward).__code__


def run_helios(reference: Reference, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    model = reference.model
    args = helios_inputs(inputs, dtype)
    terms = [t for t in HISTORY_TERMS if f"latents_history_{t}" in args]
    t0 = model.config.zero_history_timestep  # computed whenever indices_hidden_states is given (always here)
    hooks = {"patch_embedding": "patch_embedding", **{f"patch_{t}": f"history/{t}" for t in terms},
             **_embedder_hooks(("t0", "main") if t0 else ("main",)), "norm_out.norm": "norm_out", "proj_out": "proj_out"}
    model_locals = {("rotary_emb", 2): "rope", ("output", 1): "unpatchify"}
    model_locals.update({(f"rotary_emb_history_{t}", 2 if t == "short" else 4): f"history/{t}/rope" for t in terms})
    block = model.blocks[0]
    amplified = model.config.is_amplify_history and bool(terms)
    attn1 = {"key": "attn1/k_history_scaled", "out": "attn1/attention"} if amplified else {"out": "attn1/attention"}
    residual2 = 4 if model.config.guidance_cross_attn else 2
    with ExitStack() as stack:
        stack.enter_context(hook_modules(model, capture, hooks, inputs={"blocks.0": "tokens", "proj_out": "norm_out/modulated"}))
        stack.enter_context(scoped_modules(model, capture, {"blocks.*": "blocks.{0}"}))
        stack.enter_context(hook_modules(model, capture, _block_hooks()))
        stack.enter_context(record_calls(transformer_helios, "apply_rotary_emb_transposed",
                                         [{"out": "attn1/q_rope"}, {"out": "attn1/k_rope"}], capture, ()))
        stack.enter_context(record_calls(transformer_helios, "dispatch_attention_fn",
                                         [attn1, {"out": "attn2/attention"}], capture, block_runner._ATTENTION_ARGS))
        stack.enter_context(trace_locals({_forward_code(model): model_locals,
                                          type(block).forward.__code__: block_runner._locals_spec(2, residual2)}, capture))
        stack.enter_context(reference.precision())
        model(**args)


def run_wan(reference: Reference, inputs: Mapping[str, np.ndarray], dtype: torch.dtype, capture: Capture) -> None:
    model = reference.model
    hooks = {"rope": "rope", "patch_embedding": "patch_embedding", **_embedder_hooks(("main",)),
             "norm_out": "norm_out", "proj_out": "proj_out"}
    attn1 = {"query": "attn1/q_rope", "key": "attn1/k_rope", "out": "attn1/attention"}
    block = model.blocks[0]
    with ExitStack() as stack:
        stack.enter_context(hook_modules(model, capture, hooks, inputs={"blocks.0": "tokens", "proj_out": "norm_out/modulated"}))
        stack.enter_context(scoped_modules(model, capture, {"blocks.*": "blocks.{0}"}))
        stack.enter_context(hook_modules(model, capture, _block_hooks()))
        stack.enter_context(record_calls(transformer_wan, "dispatch_attention_fn",
                                         [attn1, {"out": "attn2/attention"}], capture, block_runner._ATTENTION_ARGS))
        stack.enter_context(trace_locals({_forward_code(model): {("output", 1): "unpatchify"},
                                          type(block).forward.__code__: block_runner._locals_spec(1, 2)}, capture))
        stack.enter_context(reference.precision())
        model(**wan_inputs(inputs, dtype))


def run_block(reference: Reference, index: int, args: Mapping[str, Any]) -> np.ndarray:
    """Block ``index`` of the reference alone on ``args`` (teacher forcing): its output as float64 numpy."""
    with torch.no_grad(), reference.precision():
        out = reference.model.blocks[index](**args)
    return out.detach().to(torch.float64).numpy()


def block_shapes(kind: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of one block (diffusers keys), read off a block built on the ``meta`` device."""
    cls = {"helios": HeliosTransformer3DModel, "wan": WanTransformer3DModel}[kind]
    with torch.device("meta"):
        block = cls.from_config({**config, "num_layers": 1}).blocks[0]
    return {key: tuple(value.shape) for key, value in block.state_dict().items()}
