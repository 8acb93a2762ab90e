"""Wan VAE decoder (and encode -> decode round trip) parity per block and per chunk against the real diffusers
``AutoencoderKLWan``, and proof that the per-layer comparison localises realistic decoder porting faults.

Direct: reference runner + MLX model + captures, no harness runner. Tiny config (fixtures/configs/vae_decoder.json):
base_dim 8, z_dim 4, 3 latent frames 4x4 -> 9 frames 32x32, random weights with RMS-norm gains perturbed.

float32 tolerance per layer: ``max|mlx - ref| <= 1e-5 + 1e-5 * max|ref|`` (float32 rounding, ~1e-7 relative per
op, accumulated over ~30 convs; measured <= 0.3 of it on every layer but ``norm_out``). ``norm_out`` gets 4x that:
the RMS norm divides each pixel by its channel RMS, and pixels whose RMS is ~1/15 of the input's maximum amplify
the input's rounding error; measured output / input error gain 3-5x, both MLX and torch float32 equally far
(~2e-5) from a float64 run, i.e. <= 0.6 of the default limit. Real faults differ by 1e-1 or more.
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
from mlx_impl import vae
from mlx_impl.vae_decoder import WanVAEDecoder, convert, decoder_weights, roundtrip
from parity.capture import Capture
from parity.capture_mlx import record_taps
from parity.weights import WeightLoadError, strict_load
from reference_runners import vae_decoder as reference

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
ATOL = RTOL = 1e-5
NORM_FACTOR = 4  # see the module docstring

#: Decoder blocks of the tiny config in execution order (a block's tap after its sub-blocks').
BLOCKS = ["conv_in", "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
          *[name for i in range(4) for name in (
              *[f"up_blocks.{i}.resnets.{j}" for j in range(3)],
              *([f"up_blocks.{i}.upsamplers.0"] if i < 3 else []),
              f"up_blocks.{i}")],
          "norm_out", "conv_out"]


def layer_names(latent_frames, prefix=""):
    chunks = [f"{prefix}chunk{c}/{b}" for c in range(latent_frames) for b in BLOCKS]
    return [f"{prefix}post_quant_conv", *chunks, f"{prefix}frames"]


# --- helpers -----------------------------------------------------------------------------------

def limit(name, ref):
    base = ATOL + RTOL * float(np.abs(ref).max())
    return NORM_FACTOR * base if name.endswith("norm_out") else base


def differs(ref, ours, name):
    """True when layer ``name`` is missing on our side, has another shape, holds NaN/Inf or is out of tolerance."""
    if name not in ours or ours.shapes[name] != ref.shapes[name]:
        return True
    a, b = ref[name], ours[name]
    return not np.isfinite(b).all() or float(np.abs(a - b).max()) > limit(name, a)


def first_difference(ref, ours):
    """The first layer, in the reference's execution order, where we differ; then any layer only we have; else None."""
    for name in ref.order:
        if differs(ref, ours, name):
            return name
    return next((name for name in ours.order if name not in ref), None)


def chunk_layers(capture, chunk):
    return [n for n in capture.order if n.startswith(f"chunk{chunk}/")]


def frame_rmse(ref, ours):
    """RMSE per frame of two (N, C, T, H, W) videos."""
    return np.sqrt(np.mean((ours.astype(np.float64) - ref) ** 2, axis=(0, 1, 3, 4)))


@pytest.fixture(scope="module")
def config():
    return json.loads((CONFIGS / "vae_decoder.json").read_text())


@pytest.fixture(scope="module")
def model(config):
    return reference.build(config["vae"], seed=0)


@pytest.fixture(scope="module")
def weights(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def make_latents(config, seed=0, **overrides):
    c = {**config, **overrides}
    return normal(seed, "vae_decoder/latents", (c["batch"], config["vae"]["z_dim"], c["latent_frames"],
                                                c["latent_height"], c["latent_width"]))


def run_reference(model, latents, dtype=torch.float32):
    capture = Capture("ref")
    with torch.no_grad():
        reference.run(model, {"latents": latents}, dtype, capture)
    return capture


def build_mlx(config, weights, dtype="float32"):
    decoder = WanVAEDecoder.from_config(config["vae"])
    strict_load(decoder, decoder_weights(weights), convert=convert, dtype=getattr(mx, dtype))
    return decoder


def run_mlx(decoder, latents, dtype="float32", chunked=None):
    """Our decode of channels-first ``latents``; the capture of every tap."""
    capture = Capture("mlx")
    x = mx.array(np.ascontiguousarray(latents.transpose(0, 2, 3, 4, 1))).astype(getattr(mx, dtype))
    with record_taps(capture):
        mx.eval(decoder.decode(x, chunked=chunked))
    return capture


@pytest.fixture(scope="module")
def latents(config):
    return make_latents(config)


@pytest.fixture(scope="module")
def ref_capture(model, latents):
    return run_reference(model, latents)


@pytest.fixture(scope="module")
def mlx_float32(config, weights):
    return build_mlx(config, weights)


# --- parity ------------------------------------------------------------------------------------

def test_float32_parity_every_layer(ref_capture, mlx_float32, latents):
    ours = run_mlx(mlx_float32, latents)
    assert ref_capture.order == layer_names(3)
    assert ours.order == ref_capture.order
    assert first_difference(ref_capture, ours) is None
    assert ours.shapes["frames"] == (1, 3, 9, 32, 32)
    # first latent frame -> 1 frame, every later one -> 4 (two upsample3d)
    assert [ours.shapes[f"chunk{c}/conv_out"][2] for c in range(3)] == [1, 4, 4]


@pytest.mark.parametrize("overrides, frames_shape", [
    ({"latent_frames": 1}, (1, 3, 1, 32, 32)),
    ({"latent_frames": 2, "latent_height": 3, "latent_width": 5}, (1, 3, 5, 24, 40)),
    ({"latent_frames": 4, "batch": 2, "latent_height": 2, "latent_width": 2}, (2, 3, 13, 16, 16)),
])
def test_float32_parity_frame_counts_and_sizes(config, model, mlx_float32, overrides, frames_shape):
    latents = make_latents(config, seed=1, **overrides)
    ref, ours = run_reference(model, latents), run_mlx(mlx_float32, latents)
    assert ref.order == layer_names(frames_shape[2] // 4 + 1)
    assert first_difference(ref, ours) is None
    assert ours.shapes["frames"] == frames_shape


def test_one_shot_decoding_equals_the_chunked_reference(ref_capture, mlx_float32, latents):
    """Causal convs carrying 2 frames and upsample3d's first-chunk rule make per-frame decoding exact."""
    ours = run_mlx(mlx_float32, latents, chunked=False)
    assert sorted(ours.order) == sorted(ref_capture.order)  # one-shot taps layer by layer, each layer's chunks together
    assert first_difference(ref_capture, ours) is None


def test_frames_are_clamped_as_diffusers(ref_capture, mlx_float32, latents):
    """``_decode`` clamps to [-1, 1] after concatenating the chunks; conv_out taps are unclamped."""
    ours = run_mlx(mlx_float32, latents)
    conv_out = np.concatenate([ref_capture[f"chunk{c}/conv_out"] for c in range(3)], axis=2)
    assert np.abs(conv_out).max() > 1  # the clamp does something on this input
    np.testing.assert_array_equal(ref_capture["frames"], np.clip(conv_out, -1, 1))
    assert np.abs(ours["frames"]).max() <= 1


def test_capture_does_not_change_results(mlx_float32, latents):
    x = mx.array(latents.transpose(0, 2, 3, 4, 1))
    plain = mlx_float32.decode(x)
    with record_taps(Capture("mlx")):
        recorded = mlx_float32.decode(x)
    assert mx.array_equal(plain, recorded).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_sanity_and_precision_budget(config, model, weights, seed):
    """bf16 runs, is finite, keeps every layer, and stays within the harness' precision budget: per layer,
    RMSE against a float64 reference at most 2x the reference's own bf16 RMSE (measured <= 1.25x)."""
    latents = make_latents(config, seed=seed)
    ours = run_mlx(build_mlx(config, weights, "bfloat16"), latents, "bfloat16")
    assert ours.order == layer_names(3)
    assert all(ours.dtypes[n] == "bfloat16" and np.isfinite(ours[n]).all() for n in ours.order)
    ref_bf16 = run_reference(copy.deepcopy(model).to(torch.bfloat16), latents, torch.bfloat16)
    truth = run_reference(copy.deepcopy(model).double(), latents.astype(np.float64), torch.float64)

    def rmse(a, b):
        return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))

    ratios = {n: rmse(ours[n], truth[n]) / rmse(ref_bf16[n], truth[n]) for n in ours.order}
    assert max(ratios.values()) <= 2, {n: r for n, r in ratios.items() if r > 2}


# --- weights -----------------------------------------------------------------------------------

def test_full_checkpoint_splits_into_strict_encoder_and_decoder_loads(config, weights):
    encoder_keys = {k for k in weights if k.startswith(("encoder.", "quant_conv."))}
    assert set(decoder_weights(weights)) == set(weights) - encoder_keys
    build_mlx(config, weights)  # decoder.* + post_quant_conv.*, every key used, every parameter filled
    encoder = vae.WanVAEEncoder.from_config(config["vae"])
    strict_load(encoder, {k: weights[k] for k in encoder_keys}, convert=convert)


def test_decoder_missing_and_stray_keys_fail_loudly(config, weights):
    missing = {k: v for k, v in weights.items() if k != "decoder.up_blocks.0.upsamplers.0.time_conv.weight"}
    with pytest.raises(WeightLoadError, match=r"missing keys \['decoder\.up_blocks\.0\.upsamplers\.0\.time_conv\.weight'\]"):
        build_mlx(config, missing)
    stray = {**weights, "decoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightLoadError, match=r"missing keys none; unused keys \['decoder\.extra\.weight'\]"):
        build_mlx(config, stray)


def test_temporal_upsample_order_is_the_reversed_downsample_order(config, weights):
    """[False, True, True] downsampling -> upsample3d in up blocks 0 and 1; a decoder built with the
    order not reversed puts time_conv on blocks 1 and 2, which the strict loader refuses."""
    wrong = WanVAEDecoder.from_config({**config["vae"], "temperal_downsample": [True, True, False]})
    with pytest.raises(WeightLoadError, match=r"missing keys \['decoder\.up_blocks\.2\.upsamplers\.0\.time_conv"):
        strict_load(wrong, decoder_weights(weights), convert=convert)


# --- fault injection: the first differing layer names the fault ---------------------------------

def test_fault_latents_not_denormalised(monkeypatch, ref_capture, config, weights, latents):
    monkeypatch.setattr(WanVAEDecoder, "denormalise", lambda self, x: x)
    assert first_difference(ref_capture, run_mlx(build_mlx(config, weights), latents)) == "post_quant_conv"


@pytest.mark.parametrize("fault", ["zeros", "fresh_cache_per_chunk"])
def test_fault_feature_cache_not_carried_across_chunks(monkeypatch, ref_capture, mlx_float32, latents, fault):
    """(a) Cached frames replaced by zeros, or a new cache per chunk (then upsample3d also treats every chunk
    as the first: 1 frame each): chunk 0 is exact, chunk 1's first causal conv is the first to differ."""
    if fault == "zeros":
        monkeypatch.setattr(vae.FeatureCache, "get", lambda self, layer: (
            None if self._frames.get(id(layer)) is None else mx.zeros_like(self._frames[id(layer)])))
    else:
        monkeypatch.setattr(vae.FeatureCache, "get", lambda self, layer: None)
        monkeypatch.setattr(vae.FeatureCache, "first_call", lambda self, layer: True)
    ours = run_mlx(mlx_float32, latents)
    assert first_difference(ref_capture, ours) == "chunk1/conv_in"
    assert not any(differs(ref_capture, ours, n) for n in chunk_layers(ref_capture, 0))
    if fault == "fresh_cache_per_chunk":
        assert ours.shapes["chunk1/up_blocks.0.upsamplers.0"] == (1, 16, 1, 8, 8)  # reference: 2 frames
        assert ours.shapes["frames"] == (1, 3, 3, 32, 32)  # reference: 9


def one_sequence_time_upsample(self, x):
    """A one-shot port's upsample3d: frame 0 passes through, but time_conv runs over the whole sequence, so
    latent frames 1 and 2 see frame 0 as causal context (the reference restarts time_conv after chunk 0)."""
    if x.shape[1] == 1:
        return x
    return mx.concatenate([x[:, :1], vae.interleave_frames(self.time_conv(x))[:, 2:]], axis=1)


def test_fault_all_latent_frames_decoded_as_one_sequence(monkeypatch, config, model, mlx_float32):
    """(b) Catalog bug 11: decoding all latent frames as one sequence instead of chunk by chunk.

    The divergence is born at the seam between chunk 0 and chunk 1: in the first upsample3d, and there only
    in chunks 1 and 2 (time_conv's 3-frame window reaches back 2 latent frames to frame 0); chunks 0, 3, 4
    of that layer agree. Later causal convs carry it on, so every frame after the first differs."""
    latents = make_latents(config, latent_frames=5)
    ref = run_reference(model, latents)
    assert first_difference(ref, run_mlx(mlx_float32, latents, chunked=False)) is None  # the exact one-shot
    monkeypatch.setattr(vae.Resample, "time_upsample_whole", one_sequence_time_upsample)
    ours = run_mlx(mlx_float32, latents, chunked=False)
    assert sorted(ours.order) == sorted(ref.order)
    assert all(ours.shapes[n] == ref.shapes[n] for n in ref.order)  # same layers, same shapes: only values show it
    assert first_difference(ref, ours) == "chunk1/up_blocks.0.upsamplers.0"
    born = [differs(ref, ours, f"chunk{c}/up_blocks.0.upsamplers.0") for c in range(5)]
    assert born == [False, True, True, False, False]
    assert not any(differs(ref, ours, n) for n in chunk_layers(ref, 0))
    errors = frame_rmse(ref["frames"], ours["frames"])
    assert errors[0] < 1e-5 and (errors[1:] > 1e-2).all()


@pytest.mark.parametrize("keep", ["last_frame", "both_frames"])
def test_fault_time_conv_on_the_first_chunk(monkeypatch, ref_capture, mlx_float32, latents, keep):
    """(c) upsample3d without the first-chunk rule: chunk 0's frame goes through time_conv (zero history);
    keeping the last of the two frames (a Wan2.2 DupUp3D-style trim) hides it in the shapes, keeping both
    changes them. Either way the first upsample3d of chunk 0 is the first layer to differ."""
    correct = vae.Resample.time_upsample

    def time_conv_first(self, x, cache):
        if cache is not None and cache.first_call(self):
            y = vae.interleave_frames(self.time_conv(x, cache))
            return y[:, -1:] if keep == "last_frame" else y
        return correct(self, x, cache)

    monkeypatch.setattr(vae.Resample, "time_upsample", time_conv_first)
    ours = run_mlx(mlx_float32, latents)
    assert first_difference(ref_capture, ours) == "chunk0/up_blocks.0.upsamplers.0"
    assert not differs(ref_capture, ours, "chunk0/up_blocks.0.resnets.2")
    expected = (1, 16, 1, 8, 8) if keep == "last_frame" else (1, 16, 2, 8, 8)
    assert ours.shapes["chunk0/up_blocks.0.upsamplers.0"] == expected


# --- bad input ---------------------------------------------------------------------------------

def test_wrong_latent_layout_is_an_error(mlx_float32):
    with pytest.raises(ValueError, match=r"expected channels-last latents \(N, T, h, w, 4\), got shape \(1, 4, 3, 4, 8\)"):
        mlx_float32.decode(mx.zeros((1, 4, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"expected channels-last latents .* got shape \(1, 3, 4, 4\)"):
        mlx_float32.decode(mx.zeros((1, 3, 4, 4)))


def test_wan22_layouts_are_refused(config):
    with pytest.raises(ValueError, match=r"WanVAEDecoder supports the Wan2\.1 VAE .* config sets \{'is_residual': True\}"):
        WanVAEDecoder.from_config({**config["vae"], "is_residual": True})


# --- round trip --------------------------------------------------------------------------------

def test_roundtrip_matches_the_reference_per_layer():
    """encode -> normalised latents -> denormalise -> decode, on both sides; each compared per layer,
    and both equally far from the input video (random weights: far, but the same)."""
    config = json.loads((CONFIGS / "vae_roundtrip.json").read_text())
    model = reference.build(config["vae"], seed=2)
    weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    clip = video(config["kind"], config["frames"], config["height"], config["width"], config["batch"], seed=2)
    ref = Capture("ref")
    with torch.no_grad():
        reference.run_roundtrip(model, {"video": clip}, torch.float32, ref)

    encoder = vae.WanVAEEncoder.from_config(config["vae"])
    strict_load(encoder, {k: v for k, v in weights.items() if k.startswith(("encoder.", "quant_conv."))}, convert=convert)
    decoder = build_mlx(config, weights)
    ours = Capture("mlx")
    with record_taps(ours):
        out = roundtrip(encoder, decoder, mx.array(clip.transpose(0, 2, 3, 4, 1)))
    mx.eval(out)

    encode_layers = [n for n in ref.order if n.startswith("encode/")]
    assert encode_layers[-2:] == ["encode/quant_conv", "encode/latents"]
    assert ref.order == [*encode_layers, *layer_names(3, "decode/")]
    assert ours.order == ref.order
    assert first_difference(ref, ours) is None
    assert tuple(out.shape) == (1, 9, 32, 32, 3)
    to_input = {side: float(np.sqrt(np.mean((c["decode/frames"] - clip) ** 2))) for side, c in (("ref", ref), ("mlx", ours))}
    assert abs(to_input["mlx"] - to_input["ref"]) <= 1e-5 * to_input["ref"]
