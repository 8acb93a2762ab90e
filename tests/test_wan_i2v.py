"""Wan I2V conditioning parity against the real WanImageToVideoPipeline.prepare_latents, and its faults.

Every comparison goes through the harness (``parity.runner.run_component("wan_i2v_conditioning")``):
the pipeline's own ``prepare_latents`` (compiled from the installed source) on a real
``AutoencoderKLWan`` against ``mlx_impl.wan_i2v.prepare_conditioning`` on our VAE encoder
loaded with its weights; layers ``mask``, ``image_latents``, ``conditioning``.
"""
import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import wan_i2v as W
from mlx_impl.vae import WanVAEEncoder
from parity import registry
from parity.config import ConfigError
from parity.runner import run_component
from reference_runners import wan_i2v as R

LAYERS = ["mask", "image_latents", "conditioning"]


def run(dtype="float32", seed=0, **overrides):
    return run_component("wan_i2v_conditioning", dtype, seed=seed, out_dir=None, overrides=overrides)


def verdicts(result):
    return [layer.verdict for layer in result.layers]


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_conditioning_matches_the_pipeline(seed):
    result = run(seed=seed)
    assert result.verdict == "PASS", result.first_divergence
    assert [layer.name for layer in result.layers] == LAYERS + [f"call2/{name}" for name in LAYERS]
    assert result.layer("mask").metrics["max_abs"] == 0  # 0/1 values, no arithmetic: exact
    # in_dim: z_dim noise + 4 mask + z_dim image latents = 4 + 4 + 4 (Wan2.2 A14B: 16 + 4 + 16 = 36)
    assert result.layer("conditioning").shape_ref == result.layer("conditioning").shape_mlx == (1, 2, 2, 2, 12)
    assert all(l.dtype_ref == l.dtype_mlx == "float32" for l in result.layers)


@pytest.mark.parametrize("num_frames", [1, 5, 13])
def test_frame_counts(num_frames):
    result = run(num_frames=num_frames, height=16, width=24)
    assert result.verdict == "PASS", result.first_divergence
    mask = result.context.ref["mask"]
    assert mask.shape == (1, (num_frames - 1) // 4 + 1, 2, 3, 4)
    assert (mask[:, 0] == 1).all() and (mask[:, 1:] == 0).all()  # the first latent frame, all 4 channels


def test_mask_is_the_pipelines_fold_of_pixel_frames():
    """Channel c of latent frame f is pixel frame 4f + c of [frame 0 x 4, frames 1 .. T-1]."""
    frames = np.zeros(9 + 3)
    frames[:4] = 1  # frame 0 repeated 4 times; frames 1..8 are 0
    mask = np.array(W.first_frame_mask(1, 9, 1, 1))
    np.testing.assert_array_equal(mask[0, :, 0, 0, :], frames.reshape(3, 4))


def test_bfloat16_casts_the_conditioning_only():
    """The run's dtype is the transformer's: the pipeline casts the concatenated input to it; the VAE (float32,
    as the Wan I2V pipelines load it) and the mask stay float32, on both sides."""
    result = run("bfloat16")
    assert result.verdict == "PASS", result.first_divergence
    assert [(l.dtype_ref, l.dtype_mlx) for l in result.layers] == [("float32", "float32")] * 2 + [("bfloat16",) * 2]
    assert result.layer("image_latents").metrics["max_abs"] < 1e-5  # a float32 VAE on both sides


def test_diffusers_vae_config_file(tmp_path):
    """`--config` takes a diffusers VAE folder; its config.json replaces the vae part."""
    from diffusers import AutoencoderKLWan

    tiny = registry.get("wan_i2v_conditioning").load_config().vae.to_dict()
    AutoencoderKLWan.from_config({**tiny, "z_dim": 2, "latents_mean": [0.1, -0.2], "latents_std": [1.5, 2.0]}
                                 ).save_config(tmp_path)
    result = run_component("wan_i2v_conditioning", "float32", out_dir=None, config_path=tmp_path)
    assert result.verdict == "PASS", result.first_divergence
    assert result.layer("conditioning").shape_ref == (1, 2, 2, 2, 2 + 4 + 2)


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
def test_fault_mask_first_temporal_position_cleared(monkeypatch, clear):
    """The first latent frame's mask cleared (no frame conditioned), or only the first of its 4 folded pixel frames."""
    correct = W.first_frame_mask
    monkeypatch.setattr(W, "first_frame_mask", lambda *args, **kwargs: clear(correct(*args, **kwargs)))
    result = run()
    assert result.verdict == "FAIL" and result.first_divergence == "mask"
    assert verdicts(result) == ["FAIL", "PASS", "FAIL"] * 2  # both calls


def test_fault_mask_and_image_latents_concatenated_in_the_wrong_order(monkeypatch):
    """[latents, image latents, mask]: same shape (both 4 channels here), different values."""
    monkeypatch.setattr(W, "conditioning", lambda latents, mask, image_latents, dtype: mx.concatenate(
        [latents, image_latents, mask], axis=-1).astype(dtype))
    result = run()
    assert result.verdict == "FAIL" and result.first_divergence == "conditioning"
    assert verdicts(result) == ["PASS", "PASS", "FAIL"] * 2  # both calls


def test_fault_image_latents_not_normalised(monkeypatch):
    """The raw posterior mode instead of (mode - mean) / std: named at image_latents."""
    monkeypatch.setattr(WanVAEEncoder, "normalise", lambda self, mu: mu)
    result = run()
    assert result.verdict == "FAIL" and result.first_divergence == "image_latents"


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,key", [
    ({"num_frames": 8}, "1 \\+ 4k"), ({"height": 20}, "multiples of 8"),
    ({"vae": {"scale_factor_temporal": 2}}, "scale factors"), ({"image_kind": "noise"}, "image_kind"),
])
def test_bad_configs_are_input_errors_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        run(**bad)


def test_frame_count_must_be_one_plus_a_multiple_of_four():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        W.first_frame_mask(1, 8, 2, 2)


def test_the_port_checks_the_latents_shape_and_refuses_a_bfloat16_vae():
    vae = WanVAEEncoder.from_config(registry.get("wan_i2v_conditioning").load_config().vae.to_dict())
    with pytest.raises(ValueError, match="latents"):
        W.prepare_conditioning(vae, mx.zeros((1, 32, 32, 3)), mx.zeros((1, 2, 4, 4, 4)), 9)
    vae.set_dtype(mx.bfloat16)
    with pytest.raises(NotImplementedError, match="float32"):
        W.image_latents(vae, mx.zeros((1, 32, 32, 3)), 9)
