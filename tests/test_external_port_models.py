"""The example third-party port (``examples/external_port``) against the real diffusers modules.

Each of its four models is run against the diffusers reference (random weights from a fixed
seed, the tiny shapes of ``fixtures/configs``) on the same deterministic inputs, through the
port's own converter and strict loader. Both sides compute in float32, with different kernels
(MLX vs PyTorch/oneDNN matmuls, convolutions, transcendental functions) and summation orders, so
results differ by float32 rounding only: a few units of 1e-7 relative per operation, growing
with depth. The limit ``max|port - ref| <= 1e-5 + 1e-5 * max|ref|`` (the harness's float32
default) leaves an order of magnitude of headroom over that and is far below any porting fault
(those show up at 1e-2 .. 1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from fixtures.inputs import normal
from fixtures.videos import video

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from external_port import ConversionError, dit_block, embedding, rope, wan_vae  # noqa: E402

from parity.registry import get  # noqa: E402

ATOL = RTOL = 1e-5
SEED = 0


def config(name: str) -> dict:
    return json.loads((ROOT / "fixtures" / "configs" / f"{name}.json").read_text())


def assert_close(port, ref, what: str) -> float:
    """``max|port - ref| <= ATOL + RTOL * max|ref|``, shapes equal; returns the max abs error."""
    port = np.asarray(port, dtype=np.float64)
    ref = ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, dtype=np.float64)
    assert port.shape == ref.shape, f"{what}: shape {port.shape} != reference {ref.shape}"
    assert np.isfinite(port).all(), f"{what}: non-finite values"
    err = float(np.max(np.abs(port - ref)))
    limit = ATOL + RTOL * float(np.max(np.abs(ref)))
    assert err <= limit, f"{what}: max abs error {err:.3g} > {limit:.3g}"
    return err


def state_dict(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v.detach().float().numpy().copy()
            for k, v in module.state_dict().items() if k.startswith(prefix)}


def np_(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


# --- RoPE -----------------------------------------------------------------------------------------
def test_rope_matches_helios_rotary_pos_embed_and_rotation():
    from diffusers.models.transformers.transformer_helios import HeliosRotaryPosEmbed, apply_rotary_emb_transposed

    cfg = config("rope")
    head_dim, batch, frames = sum(cfg["rope_dim"]), cfg["batch"], cfg["num_frames"]
    indices = np.broadcast_to(np.arange(cfg["frame_start"], cfg["frame_start"] + frames), (batch, frames)).copy()
    reference = HeliosRotaryPosEmbed(rope_dim=tuple(cfg["rope_dim"]), theta=cfg["theta"])
    emb = reference(frame_indices=torch.from_numpy(indices), height=cfg["height"], width=cfg["width"], device="cpu")
    emb = emb.flatten(2).transpose(1, 2)  # (batch, tokens, 2 * head_dim), as the transformer does

    for axis, dim in zip("tyx", cfg["rope_dim"]):
        assert_close(np_(rope.axis_frequencies(dim, cfg["theta"])), getattr(reference, f"freqs_base_{axis}"), axis)
    table = rope.rotary_table(mx.array(indices), cfg["height"], cfg["width"], cfg["rope_dim"], cfg["theta"])
    assert table.shape == (batch, frames * cfg["height"] * cfg["width"], head_dim // 2, 2)
    assert_close(np_(table[..., 0]), emb[..., 0:head_dim:2], "cos")
    assert_close(np_(table[..., 1]), emb[..., head_dim::2], "sin")

    tokens = frames * cfg["height"] * cfg["width"]
    for name in ("q", "k"):
        x = normal(SEED, f"rope/helios_{name}", (batch, tokens, cfg["heads"], head_dim))
        ref = apply_rotary_emb_transposed(torch.from_numpy(x), emb)
        port = rope.rotate(mx.array(x.transpose(0, 2, 1, 3)), table)  # heads-first
        assert_close(np_(port).transpose(0, 2, 1, 3), ref, f"{name}_rot")


# --- time embedding -----------------------------------------------------------------------------
def test_time_text_embedding_matches_the_condition_embedder_inside_the_transformer():
    from reference_runners import time_embedding as reference_runner

    cfg = config("time_embedding")
    t = cfg["transformer"]
    model = reference_runner.build(t, SEED)
    batch = len(cfg["timesteps"])
    timesteps = np.asarray(cfg["timesteps"], dtype=np.float32)
    text = normal(SEED, "time_embedding/text", (batch, cfg["text_len"], t["text_dim"]))
    latents = normal(SEED, "time_embedding/latents",
                     (batch, t["in_channels"], cfg["latent_frames"], cfg["latent_height"], cfg["latent_width"]))
    calls = []
    handle = model.condition_embedder.register_forward_hook(lambda _m, _a, out: calls.append(out))
    try:
        with torch.no_grad():
            model(hidden_states=torch.from_numpy(latents), timestep=torch.from_numpy(timesteps),
                  encoder_hidden_states=torch.from_numpy(text))
    finally:
        handle.remove()
    assert len(calls) == 2  # the t = 0 history embedding, then the timestep's
    (temb0_ref, proj0_ref, _), (temb_ref, proj_ref, text_ref) = calls

    dim = t["num_attention_heads"] * t["attention_head_dim"]
    port = embedding.TimeTextEmbedder(dim, t["freq_dim"], t["text_dim"])
    embedding.load(port, embedding.convert_state_dict(state_dict(model, "condition_embedder.")))
    temb, modulation, context, temb0, modulation0 = port(mx.array(timesteps), mx.array(text))
    assert modulation.shape == (batch, 6, dim) and modulation0.shape == (1, 6, dim)
    assert_close(np_(temb), temb_ref, "temb")
    assert_close(np_(modulation).reshape(batch, 6 * dim), proj_ref, "timestep_proj")
    assert_close(np_(context), text_ref, "text")
    assert_close(np_(temb0), temb0_ref, "temb t=0")
    assert_close(np_(modulation0).reshape(1, 6 * dim), proj0_ref, "timestep_proj t=0")

    features = embedding.timestep_features(mx.array([0.0]), t["freq_dim"])
    half = t["freq_dim"] // 2
    assert np.array_equal(np_(features), np.concatenate([np.zeros((1, half)), np.ones((1, half))], axis=1))


# --- transformer block ----------------------------------------------------------------------------
def block_case(cfg: dict, batch: int) -> dict[str, np.ndarray]:
    t = cfg["transformer"]
    dim = t["num_attention_heads"] * t["attention_head_dim"]
    hist, frames = cfg["history_frames"], cfg["frames"]
    grid = (cfg["height"], cfg["width"], dim)
    return {
        "hidden": normal(SEED, "block/hidden", (batch, frames, *grid)),
        "history": normal(SEED, "block/history", (batch, hist, *grid)),
        "frame_indices": np.broadcast_to(np.arange(hist, hist + frames), (batch, frames)).copy(),
        "history_indices": np.broadcast_to(np.arange(hist), (batch, hist)).copy(),
        "text": normal(SEED, "block/text", (batch, cfg["text_len"], dim)),
        "timestep_proj": normal(SEED, "block/timestep_proj", (batch, 6 * dim)),
        "timestep_proj_t0": normal(SEED, "block/timestep_proj_t0", (1, 6 * dim)),
    }


def run_port_block(cfg: dict, block: dit_block.HeliosBlock, inputs: dict[str, np.ndarray]) -> mx.array:
    t = cfg["transformer"]
    batch, _, height, width, dim = inputs["hidden"].shape
    table = mx.concatenate([rope.rotary_table(mx.array(inputs[k]), height, width, t["rope_dim"], t["rope_theta"])
                            for k in ("history_indices", "frame_indices")], axis=1)
    x = mx.concatenate([mx.array(inputs[k]).reshape(batch, -1, dim) for k in ("history", "hidden")], axis=1)
    return block(x, mx.array(inputs["text"]), mx.array(inputs["timestep_proj"]).reshape(batch, 6, dim),
                 mx.array(inputs["timestep_proj_t0"]).reshape(1, 6, dim), table,
                 num_history=int(np.prod(inputs["history"].shape[1:4])))


@pytest.mark.parametrize("overrides, batch", [
    ({}, 1),
    ({"is_amplify_history": True}, 2),
    ({"is_amplify_history": True, "history_scale_mode": "scalar", "guidance_cross_attn": False,
      "cross_attn_norm": False}, 1),
])
def test_block_matches_helios_transformer_block(overrides, batch):
    from reference_runners import block as reference_runner

    cfg = config("block")
    cfg["transformer"].update(overrides)
    t = cfg["transformer"]
    typed = get("block").config_model.model_validate(cfg)  # the reference runner reads the validated config
    reference = reference_runner.build_helios(typed.transformer, SEED)
    inputs = block_case(cfg, batch)
    with torch.no_grad():
        ref = reference(**reference_runner.helios_block_inputs(typed, inputs, torch.float32))

    port = dit_block.HeliosBlock(t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"],
                                 t["num_attention_heads"], t["cross_attn_norm"], t["eps"], t["guidance_cross_attn"],
                                 t["is_amplify_history"], t["history_scale_mode"])
    dit_block.load(port, dit_block.convert_state_dict(state_dict(reference)))
    assert_close(np_(run_port_block(cfg, port, inputs)), ref, "block output")


# --- VAE encoder ----------------------------------------------------------------------------------
def test_vae_encoder_matches_autoencoder_kl_wan_chunked_encode():
    from reference_runners import vae as reference_runner

    cfg = config("vae")
    reference = reference_runner.build(cfg["vae"], SEED)
    clip = video(cfg["kind"], cfg["frames"], cfg["height"], cfg["width"], cfg["batch"], 3, SEED)
    with torch.no_grad():
        mode = reference.encode(torch.from_numpy(clip)).latent_dist.mode()
    z = cfg["vae"]["z_dim"]
    mean = torch.tensor(cfg["vae"]["latents_mean"]).view(1, z, 1, 1, 1)
    ref = (mode - mean) * (1.0 / torch.tensor(cfg["vae"]["latents_std"])).view(1, z, 1, 1, 1)

    port = wan_vae.WanVideoEncoder(**cfg["vae"])
    wan_vae.load(port, wan_vae.convert_state_dict(state_dict(reference)))
    latents = port.encode(mx.array(clip))
    assert latents.shape == (1, z, 3, 4, 4)
    assert_close(np_(latents), ref, "latents")


# --- strict conversion and loading ----------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_states() -> dict[str, dict[str, np.ndarray]]:
    from reference_runners import block, time_embedding, vae

    return {
        "block": state_dict(block.build_helios(get("block").load_config().transformer, SEED)),
        "embedding": state_dict(time_embedding.build(config("time_embedding")["transformer"], SEED),
                                "condition_embedder."),
        "vae": state_dict(vae.build(config("vae")["vae"], SEED)),
    }


def port_model(kind: str):
    if kind == "block":
        t = config("block")["transformer"]
        return dit_block, dit_block.HeliosBlock(t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"],
                                                t["num_attention_heads"], t["cross_attn_norm"], t["eps"])
    if kind == "embedding":
        t = config("time_embedding")["transformer"]
        return embedding, embedding.TimeTextEmbedder(t["num_attention_heads"] * t["attention_head_dim"],
                                                     t["freq_dim"], t["text_dim"])
    return wan_vae, wan_vae.WanVideoEncoder(**config("vae")["vae"])


@pytest.mark.parametrize("kind, dropped, named", [
    ("block", "ffn.net.2.weight", "ffn.net.2.weight"),                         # a plain rename
    ("block", "attn1.to_k.bias", "attn1.to_k.bias"),                           # one member of a fused q/k/v
    ("embedding", "time_embedder.linear_1.weight", "time_embedder.linear_1.weight"),
    ("vae", "encoder.down_blocks.2.resample.1.weight", "encoder.down_blocks.2.resample.1.weight"),
    ("vae", "encoder.down_blocks.5.time_conv.bias", "encoder.down_blocks.5.time_conv.bias"),
    ("vae", "quant_conv.bias", "quant_conv.bias"),
])
def test_a_missing_key_fails_naming_it(diffusers_states, kind, dropped, named):
    module, model = port_model(kind)
    state = dict(diffusers_states[kind])
    del state[dropped]
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        module.load(model, module.convert_state_dict(state))


@pytest.mark.parametrize("kind", ["block", "embedding", "vae"])
def test_an_unknown_key_fails_naming_it(diffusers_states, kind):
    module, _ = port_model(kind)
    state = {**diffusers_states[kind], "encoder.surprise.weight": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError, match=r"encoder\.surprise\.weight"):
        module.convert_state_dict(state)


def test_vae_converter_drops_only_the_decoder(diffusers_states):
    converted = wan_vae.convert_state_dict(diffusers_states["vae"])
    assert not [k for k in converted if k.startswith(("decoder", "post_quant"))]
    module, model = port_model("vae")
    module.load(model, converted)  # complete: nothing missing, nothing extra


def test_a_wrong_shape_fails(diffusers_states):
    module, model = port_model("embedding")
    converted = module.convert_state_dict(diffusers_states["embedding"])
    converted["time_proj.layers.1.bias"] = converted["time_proj.layers.1.bias"][:-1]
    with pytest.raises(ValueError, match=r"time_proj\.layers\.1\.bias"):
        module.load(model, converted)


# --- the structure a capture by module path relies on ---------------------------------------------
def test_documented_module_paths_exist():
    _, block = port_model("block")
    _, embedder = port_model("embedding")
    _, vae = port_model("vae")
    paths = {name for name, _ in block.named_modules()}
    assert {"pre_norm", "self_attn", "self_attn.qkv", "self_attn.q_norm", "self_attn.k_norm", "self_attn.o",
            "cross_norm", "cross_attn", "cross_attn.q", "cross_attn.kv", "cross_attn.q_norm", "cross_attn.k_norm",
            "cross_attn.o", "ffn_norm", "ffn", "ffn.layers.0", "ffn.layers.1", "ffn.layers.2"} <= paths
    assert {"time_mlp", "time_mlp.layers.0", "time_mlp.layers.2", "time_proj", "time_proj.layers.1",
            "text_mlp", "text_mlp.layers.1"} <= {name for name, _ in embedder.named_modules()}
    vae_paths = {name for name, _ in vae.named_modules()}
    assert {"encoder", "encoder.stem", "encoder.middle", "encoder.middle.res1", "encoder.middle.attn",
            "encoder.middle.res2", "encoder.head", "encoder.head.norm", "encoder.head.conv", "quant"} <= vae_paths
    assert {f"encoder.stages.{i}" for i in range(11)} <= vae_paths
    for function in (rope.rotate, rope.rotary_table, rope.axis_frequencies, embedding.timestep_features,
                     dit_block.attention, wan_vae.normalize_latents):
        assert callable(function)
