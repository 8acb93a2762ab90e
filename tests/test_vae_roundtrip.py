"""Wan VAE encode -> decode round trip through the harness: both halves per block and per chunk in both dtypes,
each side's decoded video against the input, and a decoder fault localised inside the round trip."""
import numpy as np
import pytest

from mlx_impl import vae
from parity.runner import run_component
from test_vae_decoder import BLOCKS as DECODER_BLOCKS
from test_vae_decoder import FIRST_UPSAMPLE3D, chunk_layers, sections

ENCODER_BLOCKS = ["conv_in", *[f"down_blocks.{i}" for i in range(11)],
                  "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1", "norm_out", "conv_out"]


def layer_names(chunks):
    encode = [f"encode/chunk{c}/{b}" for c in range(chunks) for b in ENCODER_BLOCKS] + ["encode/quant_conv", "encode/latents"]
    decode = [f"decode/chunk{c}/{b}" for c in range(chunks) for b in DECODER_BLOCKS]
    first = [*encode, "decode/post_quant_conv", *decode, "decode/frames"]
    return first + [f"call2/{name}" for name in first]  # the second call


def vs_input(result):
    """(PSNR ref, PSNR MLX, SSIM ref, SSIM MLX) per frame."""
    return np.array([row[2:] for row in sections(result)["vs_input"].data["rows"]], dtype=float)


@pytest.fixture(scope="module")
def correct():
    return run_component("vae_roundtrip", "float32", out_dir=None)


def test_float32_parity_of_both_halves(correct):
    assert correct.verdict == "PASS", correct.first_divergence
    assert [l.name for l in correct.layers] == layer_names(3)
    assert correct.layer("encode/latents").shape_ref == (1, 4, 3, 4, 4)
    assert correct.layer("decode/frames").shape_ref == (1, 3, 9, 32, 32)
    assert {"encode_block_chunk_error", "decode_block_chunk_error", "decode_frame_error", "decode_seams",
            "vs_input"} <= set(sections(correct))


def test_both_sides_are_equally_far_from_the_input(correct):
    """Random weights: far from the input video, but our decoded video exactly as far as the reference's."""
    psnr_ref, psnr_mlx, ssim_ref, ssim_mlx = vs_input(correct).T
    assert len(psnr_ref) == 9 and (psnr_ref < 20).all()
    np.testing.assert_allclose(psnr_mlx, psnr_ref, atol=1e-3)
    np.testing.assert_allclose(ssim_mlx, ssim_ref, atol=1e-4)


def test_bfloat16_parity():
    result = run_component("vae_roundtrip", "bfloat16", out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    assert all("budget_ratio" in l.metrics for l in result.layers)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_decoder_time_conv_on_the_first_chunk(monkeypatch, dtype):
    """A decoder fault inside the round trip: the encoder passes, the decoder fails where the fault is born, and
    our decoded video moves away from the input differently than the reference's."""
    correct_upsample = vae.Resample.time_upsample

    def time_conv_first(self, x, cache):
        if cache is not None and cache.first_call(self):
            return vae.interleave_frames(self.time_conv(x, cache))[:, -1:]
        return correct_upsample(self, x, cache)

    monkeypatch.setattr(vae.Resample, "time_upsample", time_conv_first)
    result = run_component("vae_roundtrip", dtype, out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == f"decode/chunk0/{FIRST_UPSAMPLE3D}"
    assert all(l.verdict == "PASS" for l in result.layers if l.name.startswith("encode/"))
    before = chunk_layers(result, 0, "decode/")[:DECODER_BLOCKS.index(FIRST_UPSAMPLE3D)]
    assert before and all(l.verdict == "PASS" for l in before)
    psnr_ref, psnr_mlx = vs_input(result).T[:2]
    assert np.abs(psnr_mlx - psnr_ref).max() > 0.1
