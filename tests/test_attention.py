"""Attention maps: both sides' probabilities, per-head metrics, the per-head verdict with faults that prove each limit, report and command."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_impl import block
from mlx_impl.taps import requesting
from parity import attention
from parity.commands import main
from parity.registry import get
from parity.runner import run_component
from parity.thresholds import ThresholdsError, load
from parity.vocab import InputError
from reference_runners import attention as ref_attention

#: One drift step: the faults are judged on the layers; the drift section is test_block.py's.
FAST = {"drift_steps": 1}
RESTRICTED = {**FAST, "history_attention": "restricted"}
MIXED = {"stream": "float32", "stream_scale": 4.0}


def _map(result, name="attn1/probs"):
    return result.layer(name)


def _heads(layer, metric):
    """The heads a failure of ``metric`` names (None: that limit held)."""
    found = [f.heads for f in layer.failures if f.metric == metric]
    return found[0] if found else None


# --- the maps are what the attention kernels compute ----------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_reference_probs_reproduce_sdpa(monkeypatch, mask_kind):
    """probs @ v is torch's SDPA output, for every kind of mask, also when computed in several row chunks."""
    monkeypatch.setattr(ref_attention, "CHUNK_ELEMENTS", 2 * 3 * 7)  # 1 query row per chunk
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    mask = {"none": None, "bool": torch.rand(5, 7, generator=g) > 0.3, "float": torch.randn(5, 7, generator=g,
                                                                                              dtype=torch.float64),
            "causal": None}[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[:, 0] = True  # no fully masked row
    args = {"query": q, "key": k, "attn_mask": mask, "is_causal": mask_kind == "causal", "scale": 0.3}
    probs = ref_attention.dispatch_probs(args)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask_kind == "causal", scale=0.3)
    assert probs.dtype == torch.float64 and probs.shape == (2, 3, 5, 7)
    torch.testing.assert_close(probs @ v.transpose(1, 2), expected, rtol=1e-12, atol=1e-12)
    default = ref_attention.dispatch_probs({"query": q, "key": k})  # scale None: head_dim ** -0.5, as SDPA
    torch.testing.assert_close(default @ v.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), rtol=1e-12, atol=1e-12)


def test_mlx_probs_reproduce_sdpa(monkeypatch):
    """Ours: probs @ v is MLX's fused attention output, with the history mask, in row chunks."""
    monkeypatch.setattr(block, "MAP_CHUNK_ELEMENTS", 2 * 9)
    q, k, v = (mx.random.normal((1, 2, 9, 8), key=mx.random.key(i)) for i in range(3))
    mask = block.history_mask(4, 9)
    probs = block.attention_probs(q, k, 0.35, mask)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
    np.testing.assert_allclose(probs @ np.array(v), np.array(expected), rtol=1e-5, atol=1e-6)
    assert (probs[:, :, :4, 4:] == 0).all() and (probs[:, :, 4:] > 0).all()  # history rows see history keys only


def test_maps_are_taps_only_when_requested_while_recording(monkeypatch):
    """No map is computed in a plain forward (production, the drift runs), nor while recording without the request."""
    component = get("block")
    config = component.load_config()
    model = component.build_mlx(config, component.reference_weights(component.build_reference(config, 0)), "float32")
    args = component.mlx_inputs(model, component.make_inputs(config, 0), "float32")
    from parity.capture import Capture
    from parity.capture_mlx import record_taps

    calls = []
    original = block.attention_probs
    monkeypatch.setattr(block, "attention_probs", lambda *a: calls.append(1) or original(*a))
    model.block(**args)
    with record_taps(Capture("mlx")) as plain:
        model.block(**args)
    assert not calls and "attn1/probs" not in plain
    with record_taps(Capture("mlx")) as capture, requesting(block.ATTENTION_MAPS):
        model.block(**args)
    assert len(calls) == 2 and capture.order.index("attn1/probs") == capture.order.index("attn1/attention") + 1


# --- per-head metrics ---------------------------------------------------------------------------------
def test_metrics_of_known_maps(monkeypatch):
    """JS, top-k, entropy, sparsity, masses, sink and dropped mass on maps whose values are known by hand."""
    n = 8
    onehot, uniform = np.eye(n)[[2] * 4], np.full((4, n), 1 / n)
    ranked = np.tile([0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0], (4, 1))
    ref = np.stack([onehot, uniform, ranked])[None]  # (1 batch, 3 heads, 4 queries, 8 keys)
    ours = np.stack([uniform, uniform, ranked[:, [3, 0, 1, 2, 4, 5, 6, 7]]])[None]  # ours' top 2: keys 1 and 2
    m = attention.head_metrics(ref, ours, {"history": (0, 2)})
    kl_p = math.log2(2 * n / (n + 1))
    kl_q = (1 / n) * math.log2(2 / (n + 1)) + (n - 1) / n
    assert m["attn_js_mean"][0] == pytest.approx(0.5 * (kl_p + kl_q), rel=1e-12) == m["attn_js_max"][0]
    assert m["attn_js_mean"][1] == 0 and m["attn_topk_overlap"][1] == 1
    assert m["attn_topk"] == 2 and m["attn_topk_overlap"][2] == 0.5  # reference's top 2: keys 0 and 1
    assert m["attn_entropy_ref"][:2] == [0.0, pytest.approx(1.0)] and m["attn_entropy_mlx"][:2] == [pytest.approx(1.0)] * 2
    assert m["attn_sparsity_ref"][:2] == [1 / n, 1.0]  # one key holds all; 8 of 8 uniform keys to pass 0.9
    assert m["attn_sparsity_ref"][2] == 3 / n  # 0.4 + 0.3 + 0.2
    assert m["attn_sink_key_ref"] == [2, 0, 0] and m["attn_sink_key_mlx"][2] == 1
    assert m["attn_mass_sink_ref"][0] == 1 and m["attn_mass_sink_mlx"][0] == 1 / n
    assert m["attn_mass_first_ref"][0] == 0 and m["attn_mass_history_mlx"][0] == pytest.approx(2 / n)
    assert m["attn_mass_history_ref"][2] == pytest.approx(0.7) and m["attn_mass_history_mlx"][2] == pytest.approx(0.5)
    assert m["attn_dropped"] == [0.0, 0.0, 0.0]
    dropped = attention.head_metrics(uniform[None, None], onehot[None, None])["attn_dropped"]
    assert dropped == [pytest.approx(7 / 8)]  # ours zeroes 7 of 8 keys the reference gives 1/8 each
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", n)  # one row per chunk: the same numbers
    chunked = attention.head_metrics(ref, ours, {"history": (0, 2)})
    assert chunked.keys() == m.keys()
    for key in m:
        assert chunked[key] == (pytest.approx(m[key], rel=1e-12, abs=1e-15) if isinstance(m[key], list) else m[key]), key
    with pytest.raises(InputError, match="map: key group 'history' \\(0, 9\\) is outside the map's 8 keys"):
        attention.head_metrics(ref, ours, {"history": (0, 9)})


def test_maps_auto_on_for_fixture_configs_and_off_when_asked():
    from parity.component import CONFIG_DIR

    comp = get("block")
    assert comp.maps_on(comp.load_config()) and comp.maps_on(comp.load_config(CONFIG_DIR / "block_14b.json"))
    assert not comp.maps_on(comp.load_config(CONFIG_DIR / "block_14b.json", {"frames": 20}))  # 40 heads x 1344^2 > 2^24
    assert comp.maps_on(comp.load_config(CONFIG_DIR / "block_14b.json", {"frames": 20, "attention_maps": True}))
    result = run_component("wan_block", "float32", out_dir=None, overrides={**FAST, "attention_maps": False})
    assert result.verdict == "PASS" and not [l for l in result.layers if attention.is_map(l.name)]


# --- clean runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,overrides", [("float32", RESTRICTED), ("bfloat16", RESTRICTED),
                                             ("bfloat16", {**RESTRICTED, **MIXED})])
def test_restricted_history_parity(dtype, overrides):
    """History queries attend to history keys only, on both sides; the reference's map shows it (the mask reached diffusers' kernel)."""
    result = run_component("block", dtype, out_dir=None, overrides=overrides)
    assert result.verdict == "PASS", result.first_divergence
    history = get("block").history_len(result.context.config)
    ref = result.context.ref["attn1/probs"]
    assert (ref[:, :, :history, history:] == 0).all() and (ref[:, :, history:] > 0).all()
    layer = _map(result)
    assert layer.metrics["attn_groups"]["history"] == [0, history]
    assert layer.limits["attn_js_mean"] == (1e-9 if dtype == "float32" else 2e-4)  # the parity.toml limits applied


# --- faults: each FAIL names the layer and the heads ------------------------------------------------------
def _wrong_scale(monkeypatch):
    init = block.Attention.__init__

    def wrong(self, dim, heads, eps, history_scale_mode=None):
        init(self, dim, heads, eps, history_scale_mode)
        self.scale = dim ** -0.5
    monkeypatch.setattr(block.Attention, "__init__", wrong)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_wrong_softmax_scale(monkeypatch, dtype):
    """1/sqrt(dim) for 1/sqrt(head_dim): our map flatter than the reference's in every head (entropy and the share
    of keys holding 90% rise), JS rises; the key order, so the top-k, is kept."""
    _wrong_scale(monkeypatch)
    result = run_component("block", dtype, out_dir=None, overrides=FAST)
    assert result.verdict == "FAIL" and result.first_divergence == "attn1/attention"
    layer = _map(result)
    assert layer.verdict == "FAIL"
    for metric in ("attn_js_mean", "attn_js_max", "attn_entropy", "attn_sparsity"):
        assert _heads(layer, metric) == [0, 1], metric
    assert _heads(layer, "attn_topk_overlap") is None  # a scale never reorders keys
    m = layer.metrics
    for side in ("entropy", "sparsity"):
        assert all(mlx > ref + 0.01 for ref, mlx in zip(m[f"attn_{side}_ref"], m[f"attn_{side}_mlx"])), side
    assert "in head(s) 0, 1" in next(f.message for f in layer.failures if f.metric == "attn_entropy")


def _head_scale(monkeypatch, factor, head=1):
    """One head's logits scaled by ``factor`` (a per-head scale bug in a fused kernel)."""
    attend = block.Attention.attend

    def faulty(self, q, k, v, mask=None):
        weights = mx.array([factor if h == head else 1.0 for h in range(q.shape[2])]).astype(q.dtype)[:, None]
        return attend(self, q * weights, k, v, mask)
    monkeypatch.setattr(block.Attention, "attend", faulty)


@pytest.mark.parametrize("dtype,factor,overrides,metrics", [
    ("float32", 1.1, FAST, ("attn_js_mean", "attn_js_max", "attn_entropy", "attn_sparsity", "attn_mass_history")),
    ("bfloat16", 1.05, {**FAST, **MIXED}, ("attn_js_mean", "attn_entropy")),
])
def test_fault_one_head_scale_localised_to_that_head(monkeypatch, dtype, factor, overrides, metrics):
    """One head's logits 10% (float32) / 5% (bf16, mixed precision) too large: every attention failure of the map names head 1 only."""
    _head_scale(monkeypatch, factor)
    result = run_component("block", dtype, out_dir=None, overrides=overrides)
    layer = _map(result)
    assert layer.verdict == "FAIL"
    for metric in metrics:
        assert _heads(layer, metric) == [1], metric
    assert all(f.heads == [1] for f in layer.failures if f.kind == "attention")
    js = layer.metrics["attn_js_mean"]
    assert js[0] < layer.limits["attn_js_mean"] < js[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fault_key_mask_off_by_one(monkeypatch, dtype):
    """The restricted history's mask covering one key too many: the first main query loses its main keys (dropped
    mass, worst-row JS), history queries see one main key."""
    monkeypatch.setattr(block.Attention, "key_mask",
                        lambda self, h, tokens: block.history_mask(h + 1, tokens) if self.restrict_history and h else None)
    result = run_component("block", dtype, out_dir=None, overrides=RESTRICTED)
    assert result.verdict == "FAIL"
    layer = _map(result)
    for metric in ("attn_js_mean", "attn_js_max", "attn_dropped", "attn_mass_history"):
        assert _heads(layer, metric), metric
    assert _heads(layer, "attn_js_max") == [0, 1] and _heads(layer, "attn_dropped") == [0, 1]
    assert max(layer.metrics["attn_js_max"]) > 10 * max(layer.metrics["attn_js_mean"])  # one row carries it


def test_fault_history_restricted_where_reference_attends_fully(monkeypatch):
    monkeypatch.setattr(block.Attention, "key_mask", lambda self, h, tokens: block.history_mask(h, tokens) if h else None)
    result = run_component("block", "bfloat16", out_dir=None, overrides=FAST)
    layer = _map(result)
    assert result.verdict == "FAIL"
    for metric in ("attn_dropped", "attn_mass_history", "attn_topk_overlap", "attn_js_mean"):
        assert _heads(layer, metric) == [0, 1], metric
    assert min(layer.metrics["attn_dropped"]) > 0.1  # the reference's mass of history queries on main keys


def test_fault_full_attention_where_reference_restricts_history(monkeypatch):
    """The reverse: our port ignores the restriction. Nothing is dropped; mass moves off the history keys."""
    monkeypatch.setattr(block.Attention, "key_mask", lambda self, h, tokens: None)
    result = run_component("block", "float32", out_dir=None, overrides=RESTRICTED)
    layer = _map(result)
    assert result.verdict == "FAIL"
    assert _heads(layer, "attn_dropped") is None
    for metric in ("attn_mass_history", "attn_topk_overlap", "attn_js_mean"):
        assert _heads(layer, metric) == [0, 1], metric
    m = layer.metrics
    assert all(mlx < ref - 0.1 for ref, mlx in zip(m["attn_mass_history_ref"], m["attn_mass_history_mlx"]))


@pytest.mark.parametrize("name,dtype", [("block", "float32"), ("wan_block", "bfloat16")])
def test_fault_rope_on_q_only(monkeypatch, name, dtype):
    """Keys left unrotated: caught at k_rope first; the map shows the attended keys themselves changed (top-k)."""
    monkeypatch.setattr(block.Attention, "rotate",
                        lambda self, q, k, rope: (block.tap("q_rope", block.apply_rotary_emb(q, *rope)), block.tap("k_rope", k)))
    result = run_component(name, dtype, out_dir=None, overrides=FAST)
    assert result.first_divergence == "attn1/k_rope"
    layer = _map(result)
    assert _heads(layer, "attn_topk_overlap") == [0, 1] and _heads(layer, "attn_js_mean") == [0, 1]
    assert max(layer.metrics["attn_topk_overlap"]) < 0.6


def test_layer_glob_thresholds_allow_an_approximate_attention(monkeypatch, tmp_path):
    """A port with a deliberate restriction (an approximate attention) allows the mass it drops for that layer only."""
    monkeypatch.setattr(block.Attention, "key_mask", lambda self, h, tokens: block.history_mask(h, tokens) if h else None)
    extra = tmp_path / "parity.toml"
    extra.write_text('[components.block.float32.layers."attn1/probs"]\nattn_dropped = 0.4\n')
    result = run_component("block", "float32", out_dir=None, overrides=FAST, thresholds=load(extra))
    layer = _map(result)
    assert layer.limits["attn_dropped"] == 0.4 and _heads(layer, "attn_dropped") is None
    assert _heads(layer, "attn_js_mean") == [0, 1]  # the pattern still differs from the reference's
    extra.write_text('[defaults.float32]\nattn_topk_min = 1.5\n')
    with pytest.raises(ThresholdsError, match="attn_topk_min: must be at most 1"):
        load(extra)


# --- report and command ----------------------------------------------------------------------------------
def test_attention_command_and_html(monkeypatch, tmp_path, capsys):
    _head_scale(monkeypatch, 1.1)
    result = run_component("block", "float32", out_dir=tmp_path, overrides=FAST)
    report_dir = result.report_dir
    assert main(["attention", str(report_dir), "--failing", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("attn1/probs")]
    assert len(lines) == 1 and lines[0].split()[1] == "1" and "FAIL js_mean" in lines[0]
    assert main(["attention", str(report_dir.parent), "--quiet"]) == 0  # a run folder: every report in it
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("attn")]) == 4

    row = next(r for r in json.loads((report_dir / "report.json").read_text())["layers"] if r["layer"] == "attn1/probs")
    assert {tuple(f["heads"]) for f in row["failures"] if f["kind"] == "attention"} == {(1,)}
    assert main(["report", str(report_dir), "--no-index", "--quiet"]) == 0
    html = (report_dir / "report.html").read_text()
    section = html[html.index('<h2 id="attention">'):html.index("<h2>Tensors</h2>")]
    assert section.count("<img") == 2 + 4  # entropy and mass curves, one grid per map layer (of both calls)
    assert 'alt="reference, MLX and difference attention maps of call2/attn2/probs"' in section
    assert "Worst heads of <code>attn1/probs</code>" in section and 'badge FAIL' in section

    report = json.loads((report_dir / "report.json").read_text())  # names are escaped
    for r in report["layers"]:
        if r["layer"] == "attn2/probs":
            r["layer"] = "<b>x</b>/probs"
    (report_dir / "report.json").write_text(json.dumps(report))
    assert main(["report", str(report_dir), "--no-index", "--quiet"]) == 0
    html = (report_dir / "report.html").read_text()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;/probs" in html


def test_attention_command_without_maps(tmp_path, capsys):
    result = run_component("rope", "float32", out_dir=tmp_path)
    assert main(["attention", str(result.report_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no attention maps in this run" in err
    assert main(["run", "rope", "--attention-maps", "--out", str(tmp_path), "--quiet"]) == 2
    assert "--attention-maps: rope capture(s) no attention maps" in capsys.readouterr().err
