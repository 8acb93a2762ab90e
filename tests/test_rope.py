"""RoPE parity, and proof that it fails, localised, on realistic porting faults."""
import mlx.core as mx
import numpy as np
import pytest

from mlx_impl import rope
from parity.runner import run_component

SHAPES = {
    "default": {},  # frame indices 250..259: positions past 256, where bf16 could not count
    "odd": {"batch": 2, "num_frames": 3, "height": 7, "width": 9, "frame_start": 0},
    "many_tokens": {"num_frames": 5, "height": 8, "width": 9, "frame_start": 300},  # 360 tokens
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_parity(seed, shape):
    result = run_component("rope", "float32", seed=seed, out_dir=None, overrides=SHAPES[shape])
    assert result.verdict == "PASS", result.first_divergence
    assert len(result.layers) == 2 * 13  # and the second call's
    for layer in result.layers:
        assert layer.metrics["max_abs"] <= 1e-5 * max(1.0, layer.metrics["ref_max_abs"])


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_parity(seed):
    result = run_component("rope", "bfloat16", seed=seed, out_dir=None, overrides=SHAPES["odd"])
    assert result.verdict == "PASS", result.first_divergence
    assert result.layer("helios/q_rot").metrics["budget_ratio"] <= 2.0


def _single_table_freqs_base(dims, theta):
    """The other RoPE convention: one table of head_dim/2 exponents, split into t/y/x parts."""
    head_dim = sum(dims)
    inv = 1.0 / theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)
    splits = np.cumsum([d // 2 for d in dims])[:-1].tolist()
    return mx.split(inv, splits)


def test_fault_helios_one_shared_table_instead_of_per_axis(monkeypatch):
    config = {"rope_dim": [8, 4, 4], "theta": 10000.0}
    tables = iter(_single_table_freqs_base(config["rope_dim"], config["theta"]))
    monkeypatch.setattr(rope, "helios_freqs_base", lambda dim, theta: next(tables))
    result = run_component("rope", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    # The t table is normalised by head_dim instead of DT: its frequencies fall off too slowly.
    assert result.first_divergence == "helios/freqs_t"


def test_fault_wan_one_shared_table_instead_of_per_axis(monkeypatch):
    def one_table(head_dim, max_seq_len, theta=10000.0):
        inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        angles = np.repeat(np.outer(np.arange(max_seq_len), inv), 2, axis=1)
        return (rope.tap("table_cos", mx.array(np.cos(angles).astype(np.float32))),
                rope.tap("table_sin", mx.array(np.sin(angles).astype(np.float32))))

    monkeypatch.setattr(rope, "wan_rope_tables", one_table)
    result = run_component("rope", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "wan/table_cos"


def test_fault_wan_thw_split_sizes_swapped(monkeypatch):
    correct = rope.wan_axis_dims
    monkeypatch.setattr(rope, "wan_axis_dims", lambda head_dim: tuple(correct(head_dim)[i] for i in (1, 0, 2)))
    result = run_component("rope", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "wan/table_cos"


def test_fault_helios_axis_dims_swapped(monkeypatch):
    correct = rope.helios_rotary_emb
    monkeypatch.setattr(rope, "helios_rotary_emb",
                        lambda f, h, w, dims, theta: correct(f, h, w, (dims[1], dims[0], dims[2]), theta))
    result = run_component("rope", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "helios/freqs_t"
    assert "shape mismatch" in result.layer("helios/freqs_t").reasons[0]


@pytest.mark.parametrize("dtype,shape", [("float32", "default"), ("bfloat16", "odd")])  # the parity tests' shapes
def test_fault_sin_cos_flipped_in_rotation(monkeypatch, dtype, shape):
    correct = rope.apply_rotary_emb
    monkeypatch.setattr(rope, "apply_rotary_emb", lambda x, cos, sin: correct(x, sin, cos))
    result = run_component("rope", dtype, out_dir=None, overrides=SHAPES[shape])
    assert result.verdict == "FAIL"
    assert result.first_divergence == "helios/q_rot"


def test_fault_positions_in_bfloat16(monkeypatch):
    """Frame positions rounded to bf16 collapse past 256 (the bug diffusers guards against with autocast off)."""
    correct = rope.helios_rotary_emb
    monkeypatch.setattr(rope, "helios_rotary_emb",
                        lambda f, h, w, dims, theta: correct(f.astype(mx.bfloat16), h, w, dims, theta))
    result = run_component("rope", "float32", out_dir=None)
    assert result.verdict == "FAIL"
    assert result.first_divergence == "helios/cos"
