"""The alignment documented in ``examples/external_port/README.md`` holds, layer by layer.

Every documented port submodule (captured by its attribute path) and module-level function
(captured by wrapping it in its module) is paired with the diffusers module (forward hook) or
function it mirrors, per call, through the documented layout adapter, and compared in float32
(``max|port - ref| <= 1e-5 + 1e-5 * max|ref|``, the harness's float32 default: two float32
implementations differ by rounding only, ~1e-6 relative here). The sinusoid is the exception:
its angle ``t * f`` at t = 999 is only known to an ulp of 1000 (6.1e-5, as in ``parity.toml``).

The capture here is deliberately minimal (test-side only): a port module's class ``__call__`` is
wrapped for the run and records the instances at the given paths.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import mlx.core as mx
import numpy as np
import torch
from diffusers.models.transformers import transformer_helios

from test_external_port_models import SEED, block_case, config, get, normal, port_model, run_port_block, state_dict, video
from external_port import dit_block, embedding, rope, wan_vae  # noqa: E402  (sys.path set by the import above)

Adapter = Callable[[np.ndarray, tuple], np.ndarray]  # (port output, reference shape) -> reference layout


def same(x: np.ndarray, _shape) -> np.ndarray:
    return x


def heads_last(x: np.ndarray, _shape) -> np.ndarray:
    """``(B, H, L, D)`` -> ``(B, L, H, D)``."""
    return x.transpose(0, 2, 1, 3)


def part(index: int, parts: int) -> Adapter:
    """One of ``parts`` equal slices of the last axis (a fused projection)."""
    return lambda x, _shape: np.split(x, parts, axis=-1)[index]


def swap_halves(x: np.ndarray, _shape) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], x[..., :half]], axis=-1)


@contextmanager
def capture_port(root, paths: list[str], functions: list[tuple[object, str]] = ()):
    """Record the outputs of ``root``'s submodules at ``paths`` and of ``module.function`` calls."""
    modules = dict(root.named_modules())
    records: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    by_id = {id(modules[p]): p for p in paths}
    originals = {}
    for cls in {type(modules[p]) for p in paths}:
        originals[cls] = cls.__call__

        def wrapper(self, *args, _original=cls.__call__, **kwargs):
            out = _original(self, *args, **kwargs)
            if id(self) in by_id:
                records[by_id[id(self)]].append(np.array(out.astype(mx.float32)))
            return out
        cls.__call__ = wrapper
    for module, name in functions:
        originals[(module, name)] = getattr(module, name)
        records[name] = []

        def function(*args, _original=getattr(module, name), _name=name, **kwargs):
            out = _original(*args, **kwargs)
            records[_name].append(np.array(out.astype(mx.float32)))
            return out
        setattr(module, name, function)
    try:
        yield records
    finally:
        for key, original in originals.items():
            if isinstance(key, tuple):
                setattr(*key, original)
            else:
                key.__call__ = original


@contextmanager
def capture_reference(root: torch.nn.Module, paths: list[str], functions: list[tuple[object, str]] = ()):
    modules = dict(root.named_modules())
    records: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    def hook(path):
        def record(_module, _args, out):
            records[path].append((out[0] if isinstance(out, tuple) else out).detach().double().numpy())
        return record

    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    originals = []
    for module, name in functions:
        original = getattr(module, name)
        originals.append((module, name, original))
        records[name] = []

        def function(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            records[_name].append(out.detach().double().numpy())
            return out
        setattr(module, name, function)
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for module, name, original in originals:
            setattr(module, name, original)


def compare(port: dict, ref: dict, table: list[tuple], atol: float = 1e-5) -> int:
    """``table`` rows: (port key, ref key, adapter, port call -> ref call index list or None for same order)."""
    checked = 0
    for port_key, ref_key, adapter, order in table:
        port_calls, ref_calls = port[port_key], ref[ref_key]
        assert len(port_calls) == len(ref_calls), f"{port_key}: {len(port_calls)} calls, {ref_key}: {len(ref_calls)}"
        for i, out in enumerate(port_calls):
            expected = ref_calls[order[i] if order else i]
            got = adapter(out, expected.shape)
            assert got.shape == expected.shape, f"{port_key}#{i}: {got.shape} vs {ref_key} {expected.shape}"
            err = float(np.max(np.abs(got - expected)))
            limit = atol + 1e-5 * float(np.max(np.abs(expected)))
            assert err <= limit, f"{port_key}#{i} vs {ref_key}: max abs {err:.3g} > {limit:.3g}"
            checked += 1
    return checked


def test_block_alignment():
    from reference_runners import block as reference_runner

    cfg = config("block")
    typed = get("block").config_model.model_validate(cfg)  # the reference runner reads the validated config
    reference = reference_runner.build_helios(typed.transformer, SEED)
    inputs = block_case(cfg, 1)
    _, port = port_model("block")
    dit_block.load(port, dit_block.convert_state_dict(state_dict(reference)))
    table = [(p, r, same, None) for p, r in {
        "pre_norm": "norm1", "self_attn": "attn1",
        "self_attn.q_norm": "attn1.norm_q", "self_attn.k_norm": "attn1.norm_k",
        "self_attn.o": "attn1.to_out.0", "cross_norm": "norm2", "cross_attn": "attn2", "cross_attn.q": "attn2.to_q",
        "cross_attn.q_norm": "attn2.norm_q", "cross_attn.k_norm": "attn2.norm_k", "cross_attn.o": "attn2.to_out.0",
        "ffn_norm": "norm3", "ffn": "ffn", "ffn.layers.0": "ffn.net.0.proj", "ffn.layers.1": "ffn.net.0",
        "ffn.layers.2": "ffn.net.2"}.items()]
    table += [("self_attn.qkv", f"attn1.to_{n}", part(i, 3), None) for i, n in enumerate("qkv")]
    table += [("cross_attn.kv", f"attn2.to_{n}", part(i, 2), None) for i, n in enumerate("kv")]
    table += [("rotate", "apply_rotary_emb_transposed", heads_last, None),
              ("attention", "dispatch_attention_fn", heads_last, None)]
    ref_paths = sorted({r for _, r, _, _ in table} - {"apply_rotary_emb_transposed", "dispatch_attention_fn"})
    functions = [(transformer_helios, "apply_rotary_emb_transposed"), (transformer_helios, "dispatch_attention_fn")]
    with capture_reference(reference, ref_paths, functions) as ref, torch.no_grad():
        reference(**reference_runner.helios_block_inputs(typed, inputs, torch.float32))
    port_paths = sorted({p for p, _, _, _ in table} - {"rotate", "attention"})
    with capture_port(port, port_paths, [(rope, "rotate"), (dit_block, "attention")]) as got:
        mx.eval(run_port_block(cfg, port, inputs))
    assert len(got["rotate"]) == 2 and len(got["attention"]) == 2  # q then k; self- then cross-attention
    assert compare(got, ref, table) == len(table) + 2


def test_time_embedding_alignment():
    from reference_runners import time_embedding as reference_runner

    cfg = config("time_embedding")
    t = cfg["transformer"]
    model = reference_runner.build(t, SEED)
    batch = len(cfg["timesteps"])
    timesteps = np.asarray(cfg["timesteps"], dtype=np.float32)
    text = normal(SEED, "time_embedding/text", (batch, cfg["text_len"], t["text_dim"]))
    latents = normal(SEED, "time_embedding/latents",
                     (batch, t["in_channels"], cfg["latent_frames"], cfg["latent_height"], cfg["latent_width"]))
    _, port = port_model("embedding")
    embedding.load(port, embedding.convert_state_dict(state_dict(model, "condition_embedder.")))
    swapped = [1, 0]  # port: main timestep then t = 0; diffusers: t = 0 then main
    table = [(p, r, same, swapped) for p, r in {
        "time_mlp": "time_embedder", "time_mlp.layers.0": "time_embedder.linear_1",
        "time_mlp.layers.1": "time_embedder.act",
        "time_mlp.layers.2": "time_embedder.linear_2", "time_proj": "time_proj", "time_proj.layers.0": "act_fn",
        "time_proj.layers.1": "time_proj"}.items()]
    table += [(p, r, same, None) for p, r in {
        "text_mlp": "text_embedder", "text_mlp.layers.0": "text_embedder.linear_1",
        "text_mlp.layers.1": "text_embedder.act_1", "text_mlp.layers.2": "text_embedder.linear_2"}.items()]
    with capture_reference(model.condition_embedder, sorted({r for _, r, _, _ in table} | {"timesteps_proj"})) as ref, \
            torch.no_grad():
        model(hidden_states=torch.from_numpy(latents), timestep=torch.from_numpy(timesteps),
              encoder_hidden_states=torch.from_numpy(text))
    with capture_port(port, sorted({p for p, _, _, _ in table}), [(embedding, "timestep_features")]) as got:
        mx.eval(port(mx.array(timesteps), mx.array(text)))
    assert compare(got, ref, table) == 2 * 7 + 4
    assert compare(got, ref, [("timestep_features", "timesteps_proj", swap_halves, swapped)], atol=6.1e-5) == 2


def test_vae_alignment():
    from reference_runners import vae as reference_runner

    cfg = config("vae")
    reference = reference_runner.build(cfg["vae"], SEED)
    clip = video(cfg["kind"], cfg["frames"], cfg["height"], cfg["width"], cfg["batch"], 3, SEED)
    _, port = port_model("vae")
    wan_vae.load(port, wan_vae.convert_state_dict(state_dict(reference)))

    pairs = {"encoder": "encoder", "encoder.stem": "encoder.conv_in", "encoder.middle": "encoder.mid_block",
             "encoder.middle.res1": "encoder.mid_block.resnets.0",
             "encoder.middle.attn": "encoder.mid_block.attentions.0",
             "encoder.middle.res2": "encoder.mid_block.resnets.1", "encoder.head": "encoder.conv_out",
             "encoder.head.norm": "encoder.norm_out", "encoder.head.conv": "encoder.conv_out", "quant": "quant_conv"}
    down = {2, 5, 8}  # with num_res_blocks 2 and 4 levels: stages 2, 5, 8 downsample (5 and 8 in time too)
    for i in range(11):
        pairs[f"encoder.stages.{i}"] = f"encoder.down_blocks.{i}"
        if i in down:
            pairs[f"encoder.stages.{i}.temporal"] = f"encoder.down_blocks.{i}.time_conv"
            continue
        for ours, theirs in (("norm_a", "norm1"), ("conv_a", "conv1"), ("norm_b", "norm2"), ("conv_b", "conv2")):
            pairs[f"encoder.stages.{i}.{ours}"] = f"encoder.down_blocks.{i}.{theirs}"
    for i in (3, 6):  # the width changes in the first residual stage of levels 1 and 2
        pairs[f"encoder.stages.{i}.shortcut"] = f"encoder.down_blocks.{i}.conv_shortcut"
    del pairs["encoder.stages.2.temporal"]  # level 0 downsamples in space only (temperal_downsample[0] is False)
    table = [(p, r, same, None) for p, r in pairs.items()]

    def frames_first(x, shape):  # (N, C, T, H, W) -> (N*T, C, H, W)
        return x.transpose(0, 2, 1, 3, 4).reshape(shape)

    def pixels_to_channels_first(x, shape):  # (N*T, 1, H*W, C) -> (N*T, C, H, W)
        return x[:, 0].transpose(0, 2, 1).reshape(shape)

    def channels_first(x, _shape):  # (N*T, H, W, C) -> (N*T, C, H, W)
        return x.transpose(0, 3, 1, 2)

    table += [(f"encoder.stages.{i}.spatial", f"encoder.down_blocks.{i}.resample.1", channels_first, None)
              for i in sorted(down)]
    table += [("encoder.middle.attn.norm", "encoder.mid_block.attentions.0.norm", frames_first, None),
              ("encoder.middle.attn.qkv", "encoder.mid_block.attentions.0.to_qkv", pixels_to_channels_first, None),
              ("encoder.middle.attn.out", "encoder.mid_block.attentions.0.proj", pixels_to_channels_first, None)]
    with capture_reference(reference, sorted({r for _, r, _, _ in table})) as ref, torch.no_grad():
        mode = reference.encode(torch.from_numpy(clip)).latent_dist.mode()
    with capture_port(port, sorted({p for p, _, _, _ in table}), [(wan_vae, "normalize_latents")]) as got:
        mx.eval(port.encode(mx.array(clip)))
    assert [len(got[p]) for p in ("encoder", "encoder.stages.5.temporal", "quant")] == [3, 2, 1]  # per chunk; once
    checked = compare(got, ref, table)
    assert checked == sum(len(got[p]) for p, _, _, _ in table)

    z = cfg["vae"]["z_dim"]
    mean = torch.tensor(cfg["vae"]["latents_mean"]).view(1, z, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(cfg["vae"]["latents_std"])).view(1, z, 1, 1, 1)
    ref["latents"] = [((mode - mean) * inv_std).double().numpy()]
    assert compare(got, ref, [("normalize_latents", "latents", same, None)]) == 1
