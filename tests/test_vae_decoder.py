"""Wan VAE decoder through the harness (``parity.runner.run_component``): parity per block and per chunk in both
dtypes against the real diffusers ``AutoencoderKLWan``, realistic porting faults failing at the layer where they
are born, the loaders' errors, and ``parity video`` on the decoded frames the run dumps.

Tiny config (fixtures/configs/vae_decoder.json): base_dim 8, z_dim 4, 3 latent frames 4x4 -> 9 frames 32x32,
random weights with RMS-norm gains perturbed. Thresholds: parity.toml (``norm_out`` has its own, with its reason).
"""
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import vae
from mlx_impl.vae_decoder import WanVAEDecoder, convert, decoder_weights
from parity.commands import main
from parity.config import ConfigError
from parity.registry import get
from parity.runner import run_component
from parity.weights import WeightLoadError, strict_load

#: Decoder blocks of the tiny config in execution order (a block's tap after its sub-blocks').
BLOCKS = ["conv_in", "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
          *[name for i in range(4) for name in (
              *[f"up_blocks.{i}.resnets.{j}" for j in range(3)],
              *([f"up_blocks.{i}.upsamplers.0"] if i < 3 else []),
              f"up_blocks.{i}")],
          "norm_out", "conv_out"]
FIRST_UPSAMPLE3D = "up_blocks.0.upsamplers.0"


def layer_names(latent_frames, prefix=""):
    chunks = [f"{prefix}chunk{c}/{b}" for c in range(latent_frames) for b in BLOCKS]
    return [f"{prefix}post_quant_conv", *chunks, f"{prefix}frames"]


def chunk_layers(result, chunk, prefix=""):
    return [l for l in result.layers if l.name.startswith(f"{prefix}chunk{chunk}/")]


def sections(result):
    return {s.name: s for s in result.sections}


def heat_row(result, block, name="block_chunk_error"):
    heat = sections(result)[name].data
    return np.array(heat["values"][heat["rows"].index(block)])


@pytest.fixture(scope="module")
def correct(tmp_path_factory):
    """The float32 run, written (its dumps hold the decoded frames ``parity video`` reads)."""
    return run_component("vae_decoder", "float32", out_dir=tmp_path_factory.mktemp("reports"))


@pytest.fixture(scope="module")
def one_shot_five():
    """Our one-shot decode of 5 latent frames (17 frames), correct."""
    return run_component("vae_decoder", "float32", out_dir=None, overrides={"mlx_decoding": "one_shot", "latent_frames": 5})


# --- parity ------------------------------------------------------------------------------------

def test_float32_parity_per_block_and_chunk(correct):
    assert correct.verdict == "PASS", correct.first_divergence
    assert [l.name for l in correct.layers] == layer_names(3) + layer_names(3, "call2/")
    assert correct.layer("frames").shape_ref == (1, 3, 9, 32, 32)
    # latent frame 0 -> 1 frame, every later one -> 4 (two upsample3d)
    assert [correct.layer(f"chunk{c}/conv_out").shape_ref[2] for c in range(3)] == [1, 4, 4]
    assert set(sections(correct)) == {"block_chunk_error", "frame_error", "chunk_error", "seams", "periodicity",
                                      "frame_stats"}
    assert correct.layer("chunk0/norm_out").limits["atol"] == 4e-5  # parity.toml, see its reason there
    assert (correct.report_dir / "report.json").exists()


@pytest.mark.parametrize("overrides, frames_shape", [
    ({"latent_frames": 1}, (1, 3, 1, 32, 32)),
    ({"latent_frames": 2, "latent_height": 3, "latent_width": 5, "batch": 2}, (2, 3, 5, 24, 40)),
])
def test_float32_parity_frame_counts_and_sizes(overrides, frames_shape):
    result = run_component("vae_decoder", "float32", out_dir=None, overrides=overrides)
    assert result.verdict == "PASS", result.first_divergence
    frames = overrides["latent_frames"]
    assert [l.name for l in result.layers] == layer_names(frames) + layer_names(frames, "call2/")
    assert result.layer("frames").shape_ref == frames_shape


def test_bfloat16_parity():
    result = run_component("vae_decoder", "bfloat16", out_dir=None)
    assert result.verdict == "PASS", result.first_divergence
    assert all("budget_ratio" in l.metrics for l in result.layers)
    rows = sections(result)["frame_error"].data["rows"]
    assert rows[-2:] == ["MLX vs float64", "reference vs float64"]


def test_one_shot_decoding_equals_the_chunked_reference(one_shot_five):
    """Causal convs carrying 2 frames and upsample3d's first-chunk rule make one-shot decoding exact."""
    assert one_shot_five.verdict == "PASS", one_shot_five.first_divergence
    assert [l.name for l in one_shot_five.layers] == layer_names(5) + layer_names(5, "call2/")


def test_frames_are_clamped_as_diffusers(correct):
    """``_decode`` clamps to [-1, 1] after concatenating the chunks; the conv_out taps are unclamped."""
    ref, mlx = correct.context.ref, correct.context.mlx
    conv_out = np.concatenate([ref[f"chunk{c}/conv_out"] for c in range(3)], axis=2)
    assert np.abs(conv_out).max() > 1  # the clamp does something on this input
    np.testing.assert_array_equal(ref["frames"], np.clip(conv_out, -1, 1))
    assert np.abs(mlx["frames"]).max() <= 1


def test_capture_does_not_change_results():
    from parity.capture import Capture
    from parity.capture_mlx import record_taps

    component = get("vae_decoder")
    config = component.load_config()
    model = component.build_mlx(config, component.reference_weights(component.build_reference(config, 0)), "float32")
    latents = mx.array(component.make_inputs(config, 0)["latents"].transpose(0, 2, 3, 4, 1))
    plain = model.decode(latents)
    with record_taps(Capture("mlx")):
        recorded = model.decode(latents)
    assert mx.array_equal(plain, recorded).item()


# --- fault injection: the first diverging layer names the fault ----------------------------------

def test_fault_latents_not_denormalised(monkeypatch):
    monkeypatch.setattr(WanVAEDecoder, "denormalise", lambda self, x: x)
    result = run_component("vae_decoder", "float32", out_dir=None)
    assert result.verdict == "FAIL" and result.first_divergence == "post_quant_conv"


def lose_cache(monkeypatch, fault):
    """Cached frames replaced by zeros, or a new cache per chunk (then upsample3d also takes every chunk for the first)."""
    if fault == "zeros":
        monkeypatch.setattr(vae.FeatureCache, "get", lambda self, layer: (
            None if self._frames.get(id(layer)) is None else mx.zeros_like(self._frames[id(layer)])))
    else:
        monkeypatch.setattr(vae.FeatureCache, "get", lambda self, layer: None)
        monkeypatch.setattr(vae.FeatureCache, "first_call", lambda self, layer: True)


@pytest.mark.parametrize("fault, dtype", [("zeros", "float32"), ("zeros", "bfloat16"), ("fresh_cache_per_chunk", "float32")])
def test_fault_feature_cache_not_carried_across_chunks(monkeypatch, fault, dtype):
    """Chunk 0 is exact; chunk 1's first causal conv is the first layer to differ."""
    lose_cache(monkeypatch, fault)
    result = run_component("vae_decoder", dtype, out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "chunk1/conv_in"
    assert all(l.verdict == "PASS" for l in chunk_layers(result, 0))
    if fault == "fresh_cache_per_chunk":
        assert result.layer(f"chunk1/{FIRST_UPSAMPLE3D}").shape_mlx == (1, 16, 1, 8, 8)  # reference: 2 frames
        assert result.layer("frames").shape_mlx == (1, 3, 3, 32, 32)  # reference: 9


def one_sequence_time_upsample(self, x):
    """A one-shot port's upsample3d: frame 0 passes through, but time_conv runs over the whole sequence, so the
    latent frames after it see frame 0 as causal context (the reference restarts time_conv after chunk 0)."""
    if x.shape[1] == 1:
        return x
    return mx.concatenate([x[:, :1], vae.interleave_frames(self.time_conv(x))[:, 2:]], axis=1)


def jump_ratio_gap(result):
    """Largest relative difference between our and the reference's seam / inside-chunk jump ratios of the decoded video."""
    row = next(r for r in sections(result)["seams"].data["rows"] if r[0] == "frames (pixel space)")
    return max(abs(mlx - ref) / ref for ref, mlx in zip(row[1:7:2], row[2:7:2]))


def test_fault_all_latent_frames_decoded_as_one_sequence(monkeypatch, one_shot_five):
    """Catalog bug 11: all latent frames decoded as one sequence where the reference decodes chunk by chunk.

    Same layers, same shapes: only values show it. The divergence is born at the first seam, in the first
    upsample3d, and there only in chunks 1 and 2 (time_conv's 3-frame window reaches back across the seam to
    frame 0); chunks 0, 3 and 4 of that layer agree. Later causal convs carry it on, so every frame after the
    first differs, and the decoded video's seams no longer read like the reference's."""
    monkeypatch.setattr(vae.Resample, "time_upsample_whole", one_sequence_time_upsample)
    result = run_component("vae_decoder", "float32", out_dir=None,
                           overrides={"mlx_decoding": "one_shot", "latent_frames": 5})
    assert result.verdict == "FAIL"
    assert result.first_divergence == f"chunk1/{FIRST_UPSAMPLE3D}"
    assert all(l.shape_mlx == l.shape_ref for l in result.layers)
    assert all(l.verdict == "PASS" for l in chunk_layers(result, 0))
    assert [result.layer(f"chunk{c}/{FIRST_UPSAMPLE3D}").verdict for c in range(5)] == ["PASS", "FAIL", "FAIL", "PASS", "PASS"]
    born = heat_row(result, FIRST_UPSAMPLE3D)
    assert (born[[1, 2]] > 1e-2).all() and (born[[0, 3, 4]] < 1e-6).all()
    frames = np.array(sections(result)["frame_error"].data["values"][0])
    assert frames[0] < 1e-6 and (frames[1:] > 1e-2).all()
    assert jump_ratio_gap(one_shot_five) < 1e-4 < 1e-2 < jump_ratio_gap(result)


@pytest.mark.parametrize("keep", ["last_frame", "both_frames"])
def test_fault_time_conv_on_the_first_chunk(monkeypatch, keep):
    """upsample3d without the first-chunk rule: chunk 0's frame goes through time_conv (zero history); keeping
    the last of the two frames (a Wan2.2 DupUp3D-style trim) hides it in the shapes, keeping both changes them."""
    correct_upsample = vae.Resample.time_upsample

    def time_conv_first(self, x, cache):
        if cache is not None and cache.first_call(self):
            y = vae.interleave_frames(self.time_conv(x, cache))
            return y[:, -1:] if keep == "last_frame" else y
        return correct_upsample(self, x, cache)

    monkeypatch.setattr(vae.Resample, "time_upsample", time_conv_first)
    result = run_component("vae_decoder", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == f"chunk0/{FIRST_UPSAMPLE3D}"
    assert result.layer("chunk0/up_blocks.0.resnets.2").verdict == "PASS"
    assert result.layer(f"chunk0/{FIRST_UPSAMPLE3D}").shape_mlx == (1, 16, 1 if keep == "last_frame" else 2, 8, 8)


# --- parity video on the decoded frames ---------------------------------------------------------

def parity_video(report_dir, out, capsys):
    code = main(["video", str(report_dir / "ref" / "frames.npy"), str(report_dir / "mlx" / "frames.npy"),
                 "--boundaries", "1,5", "--out", str(out), "--quiet"])
    return code, json.loads((out / "video.json").read_text()), capsys.readouterr().out


def test_parity_video_reads_the_decoder_dumps(correct, tmp_path, capsys):
    code, result, printed = parity_video(correct.report_dir, tmp_path, capsys)
    assert code == 0 and result["verdict"] == "PASS" and printed.startswith("PASS")
    assert result["frames"] == 9 and result["boundaries"] == [0, 1, 5]
    assert result["inputs"]["ours"]["layout"] == "(N, C, T, H, W)" and result["inputs"]["ours"]["range"] == "[-1, 1]"
    assert (tmp_path / "video.html").exists()


def test_parity_video_flags_a_lost_cache_after_the_first_chunk(monkeypatch, tmp_path, capsys):
    lose_cache(monkeypatch, "zeros")
    run = run_component("vae_decoder", "float32", out_dir=tmp_path / "reports")
    code, result, printed = parity_video(run.report_dir, tmp_path / "video", capsys)
    assert code == 1 and printed.startswith("FAIL")
    flagged = result["summary"]["flagged_frames"]
    assert flagged and 0 not in flagged  # frame 0 (chunk 0) is exact


# --- weights and bad input -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights():
    component = get("vae_decoder")
    return component.reference_weights(component.build_reference(component.load_config(), 0))


def test_full_checkpoint_splits_into_strict_encoder_and_decoder_loads(weights):
    component = get("vae_decoder")
    encoder_keys = {k for k in weights if k.startswith(("encoder.", "quant_conv."))}
    assert encoder_keys and set(decoder_weights(weights)) == set(weights) - encoder_keys
    config = component.load_config()
    component.build_mlx(config, weights, "float32")  # decoder.* + post_quant_conv.*, every key used
    encoder = vae.WanVAEEncoder.from_config(config.vae.to_dict())
    strict_load(encoder, {k: weights[k] for k in encoder_keys}, convert=convert)


def test_decoder_missing_and_stray_keys_fail_loudly(weights):
    component = get("vae_decoder")
    config = component.load_config()
    missing = {k: v for k, v in weights.items() if k != f"decoder.{FIRST_UPSAMPLE3D}.time_conv.weight"}
    with pytest.raises(WeightLoadError, match=r"missing keys \['decoder\.up_blocks\.0\.upsamplers\.0\.time_conv\.weight'\]"):
        component.build_mlx(config, missing, "float32")
    stray = {**weights, "decoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(WeightLoadError, match=r"missing keys none; unused keys \['decoder\.extra\.weight'\]"):
        component.build_mlx(config, stray, "float32")


def test_temporal_upsample_order_is_the_reversed_downsample_order(weights):
    """[False, True, True] downsampling -> upsample3d in up blocks 0 and 1; a decoder built with the order not
    reversed puts time_conv on blocks 1 and 2, which the strict loader refuses."""
    config = get("vae_decoder").load_config().vae.to_dict()
    wrong = WanVAEDecoder.from_config({**config, "temperal_downsample": [True, True, False]})
    with pytest.raises(WeightLoadError, match=r"missing keys \['decoder\.up_blocks\.2\.upsamplers\.0\.time_conv"):
        strict_load(wrong, decoder_weights(weights), convert=convert)


def test_wrong_latent_layout_is_an_error(weights):
    component = get("vae_decoder")
    model = component.build_mlx(component.load_config(), weights, "float32")
    with pytest.raises(ValueError, match=r"expected channels-last latents \(N, T, h, w, 4\), got shape \(1, 4, 3, 4, 8\)"):
        model.decode(mx.zeros((1, 4, 3, 4, 8)))
    with pytest.raises(ValueError, match=r"expected channels-last latents .* got shape \(1, 3, 4, 4\)"):
        model.decode(mx.zeros((1, 3, 4, 4)))


def test_wan22_layouts_are_refused():
    with pytest.raises(ConfigError, match=r"is_residual"):
        get("vae_decoder").load_config(overrides={"vae": {"is_residual": True}})
    with pytest.raises(ValueError, match=r"WanVAEDecoder supports the Wan2\.1 VAE .* config sets \{'is_residual': True\}"):
        WanVAEDecoder.from_config({**get("vae_decoder").load_config().vae.to_dict(), "is_residual": True})
