"""Wan I2V conditioning parity against the real WanImageToVideoPipeline.prepare_latents, and its faults.

Both sides run directly: the pipeline's own ``prepare_latents`` (compiled from the installed source)
on a real ``AutoencoderKLWan``, and ``mlx_impl.wan_i2v.prepare_conditioning`` on our VAE encoder
loaded with the same weights; layers ``mask``, ``image_latents``, ``conditioning`` in execution order.
"""
import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from fixtures.inputs import normal
from fixtures.videos import video
from layer_compare import assert_match, compare, first_difference
from mlx_impl import wan_i2v as W
from mlx_impl.vae import WanVAEEncoder, convert
from parity.capture import Capture
from parity.capture_mlx import record_taps
from reference_runners import wan_i2v as R

CONFIG = json.loads((Path(__file__).parents[1] / "fixtures/configs/wan_i2v_conditioning.json").read_text())


def config(**overrides):
    return {**copy.deepcopy(CONFIG), **overrides}


@pytest.fixture(scope="module")
def vaes():
    """The reference VAE and our encoder with its weights (strict: every parameter filled, no key left over)."""
    reference = R.build_vae(CONFIG["vae"], 0)
    ours = WanVAEEncoder.from_config(CONFIG["vae"])
    ours.load_weights([(k, mx.array(v)) for k, v in (convert(k, v) for k, v in R.encoder_state(reference).items())],
                      strict=True)
    return reference, ours


def inputs(cfg, seed=0):
    b, t = cfg["batch"], cfg["vae"]["scale_factor_temporal"]
    s, z = cfg["vae"]["scale_factor_spatial"], cfg["vae"]["z_dim"]
    frames = (cfg["num_frames"] - 1) // t + 1
    return {"image": video(cfg["image_kind"], 1, cfg["height"], cfg["width"], b, seed=seed)[:, :, 0],
            "latents": normal(seed, "wan_i2v/latents", (b, z, frames, cfg["height"] // s, cfg["width"] // s))}


def run_both(vaes, cfg=None, dtype="float32", seed=0):
    cfg = cfg or CONFIG
    reference, ours = vaes
    data = inputs(cfg, seed)
    ref = Capture("reference")
    R.run(reference, data, cfg["num_frames"], {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype], ref)
    mine = Capture("mlx")
    with record_taps(mine):
        mx.eval(W.prepare_conditioning(
            ours, mx.array(data["image"].transpose(0, 2, 3, 1)), mx.array(data["latents"].transpose(0, 2, 3, 4, 1)),
            cfg["num_frames"], getattr(mx, dtype), cfg["vae"]["scale_factor_temporal"],
            cfg["vae"]["scale_factor_spatial"]))
    return ref, mine


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_conditioning_matches_the_pipeline(vaes, seed):
    ref, mine = run_both(vaes, seed=seed)
    layers = assert_match(ref, mine)
    assert [layer.name for layer in layers] == ["mask", "image_latents", "conditioning"]
    np.testing.assert_array_equal(mine["mask"], ref["mask"])  # 0/1 values, no arithmetic: exact
    # in_dim: z_dim noise + 4 mask + z_dim image latents = 4 + 4 + 4 (Wan2.2 A14B: 16 + 4 + 16 = 36)
    assert ref.shapes["conditioning"] == mine.shapes["conditioning"] == (1, 3, 4, 4, 12)
    assert all(mine.dtypes[n] == ref.dtypes[n] == "float32" for n in ref.order)


@pytest.mark.parametrize("num_frames", [1, 5, 13])
def test_frame_counts(vaes, num_frames):
    cfg = config(num_frames=num_frames, height=16, width=24)
    ref, mine = run_both(vaes, cfg)
    assert_match(ref, mine)
    mask = ref["mask"]
    assert mask.shape == (1, (num_frames - 1) // 4 + 1, 2, 3, 4)
    assert (mask[:, 0] == 1).all() and (mask[:, 1:] == 0).all()  # the first latent frame, all 4 channels


def test_mask_is_the_pipelines_fold_of_pixel_frames():
    """Channel c of latent frame f is pixel frame 4f + c of [frame 0 x 4, frames 1 .. T-1]."""
    frames = np.zeros(9 + 3)
    frames[:4] = 1  # frame 0 repeated 4 times; frames 1..8 are 0
    mask = np.array(W.first_frame_mask(1, 9, 1, 1))
    np.testing.assert_array_equal(mask[0, :, 0, 0, :], frames.reshape(3, 4))


def test_bfloat16_transformer_dtype_casts_the_conditioning_only(vaes):
    """The pipeline casts the concatenated input to the transformer's dtype; the VAE and mask stay float32."""
    ref, mine = run_both(vaes, dtype="bfloat16")
    assert ref.dtypes["conditioning"] == mine.dtypes["conditioning"] == "bfloat16"
    assert ref.dtypes["image_latents"] == mine.dtypes["image_latents"] == "float32"
    # bf16 keeps 8 significant bits: a float32 difference of a few ulps can flip the rounding of a value
    # near a tie, by one bf16 ulp = 2^-8 relative
    assert_match(ref, mine, atol=0, rtol=2.0**-8)


def test_reference_is_the_installed_pipeline_source():
    fn = R.pipeline_functions().prepare_latents
    assert fn.__code__.co_filename.endswith("pipelines/wan/pipeline_wan_i2v.py")
    assert fn.__qualname__ == "prepare_latents"


def test_compiling_a_missing_definition_names_it():
    from reference_runners.pipeline_source import compile_functions

    with pytest.raises(RuntimeError, match=r"WanImageToVideoPipeline\.no_such_method"):
        compile_functions(R.PIPELINE_MODULE, ["retrieve_latents"], {"WanImageToVideoPipeline": ["no_such_method"]})


# --- faults ----------------------------------------------------------------------------------
def clear_latent_frame_0(mask):
    return mx.concatenate([mx.zeros_like(mask[:, :1]), mask[:, 1:]], axis=1)


def clear_first_folded_frame(mask):
    return mx.concatenate([mx.zeros_like(mask[..., :1]), mask[..., 1:]], axis=-1)


@pytest.mark.parametrize("clear", [clear_latent_frame_0, clear_first_folded_frame])
def test_fault_mask_first_temporal_position_cleared(vaes, monkeypatch, clear):
    """The first latent frame's mask cleared (no frame conditioned), or only the first of its 4 folded pixel frames."""
    correct = W.first_frame_mask
    monkeypatch.setattr(W, "first_frame_mask", lambda *args, **kwargs: clear(correct(*args, **kwargs)))
    layers = compare(*run_both(vaes))
    assert first_difference(layers).name == "mask"
    assert [layer.ok for layer in layers] == [False, True, False]


def test_fault_mask_and_image_latents_concatenated_in_the_wrong_order(vaes, monkeypatch):
    """[latents, image latents, mask]: same shape (both 4 channels here), different values."""
    monkeypatch.setattr(W, "conditioning", lambda latents, mask, image_latents, dtype: mx.concatenate(
        [latents, image_latents, mask], axis=-1).astype(dtype))
    layers = compare(*run_both(vaes))
    assert first_difference(layers).name == "conditioning"
    assert [layer.ok for layer in layers] == [True, True, False]


def test_fault_image_latents_not_normalised(vaes, monkeypatch):
    """The raw posterior mode instead of (mode - mean) / std: named at image_latents."""
    monkeypatch.setattr(WanVAEEncoder, "normalise", lambda self, mu: mu)
    assert first_difference(compare(*run_both(vaes))).name == "image_latents"


# --- bad input -------------------------------------------------------------------------------
def test_frame_count_must_be_one_plus_a_multiple_of_four():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        W.first_frame_mask(1, 8, 2, 2)


def test_latents_shape_is_checked(vaes):
    _, ours = vaes
    with pytest.raises(ValueError, match="latents"):
        W.prepare_conditioning(ours, mx.zeros((1, 32, 32, 3)), mx.zeros((1, 2, 4, 4, 4)), 9)


def test_a_bfloat16_vae_is_refused(vaes):
    _, ours = vaes
    bf16 = WanVAEEncoder.from_config(CONFIG["vae"])
    bf16.update(ours.parameters())
    bf16.set_dtype(mx.bfloat16)
    with pytest.raises(NotImplementedError, match="float32"):
        W.image_latents(bf16, mx.zeros((1, 32, 32, 3)), 9)
