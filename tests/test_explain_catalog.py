"""parity explain, catalog by catalog entry on synthetic tensors: each tensor hypothesis is ranked first for its own
mistake and for no other; rows, limits and windows; a project's own entries. No model runs here."""
from __future__ import annotations

import numpy as np
import pytest

from parity.compare import judge_tensors
from parity.explain import catalog
from parity.explain.catalog import CATALOG, Hypothesis
from parity.explain.evidence import Evidence, tolerance_of, window
from parity.explain.run import NONE_EXPLAINS, explain_layer
from parity.metrics import round_to
from parity.thresholds import Tolerance
from parity.vocab import InputError

FLOAT32 = Tolerance(atol=1e-5, rtol=1e-5, cosine_min=0.99999)
BF16 = Tolerance(budget_ratio=2.0, rounding_excess=0.25)


def normal(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def evidence(ref, ours, layer="x", limits=FLOAT32, dtype_ref="float32", dtype_mlx="float32", truth=None, dtype="float32",
             first_call=None, key_groups=None):
    """The evidence a run would hand over: the row judged by the one verdict, its recorded limits."""
    exact = FLOAT32 if dtype != "float32" else None
    row = judge_tensors(layer, layer, ref, ours, truth, limits, exact, dtype_ref, dtype_mlx, key_groups=key_groups).row()
    return Evidence.of(layer, row, ref, ours, truth, limits=tolerance_of(row), exact=exact, rounding=BF16, dtype=dtype,
                       first_call=first_call)


def top(ev, hypotheses=CATALOG):
    entry = explain_layer(ev, hypotheses)
    assert not entry["skipped"], entry["skipped"]
    return entry


def halves(x):
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def shift_schedule(c, s):
    return c * s / (1 + (c - 1) * s)


def bf16(x):
    return round_to(x, "bfloat16")


REF = normal(2, 6, 8, 8)
TOKENS = normal(1, 10, 12)


def shifted(x):
    out = x.copy()
    out[:, 1:] = x[:, :-1]
    return out


def zeroed(x):
    out = x.copy()
    out[:, :3] = 0
    return out


SCHEDULE = shift_schedule(5.0, np.linspace(1, 0.001, 9)[:-1]).astype(np.float32)
A, B, C = normal(4, 64, seed=1), normal(4, 64, seed=2), normal(4, 64, seed=3)
SUM = A + B * C
SUM_IN_BF16 = bf16(bf16(A) + bf16(bf16(B) * bf16(C)))

#: (mistake, layer, reference, ours, dtype_ref, expected detail fragment)
CASES = [
    ("transpose_last_two", "x", REF, np.swapaxes(REF, -1, -2), "float32", "transpose(0, 1, 3, 2)"),
    ("axis_order", "x", REF, REF.transpose(0, 2, 1, 3).copy(), "float32", "transpose(0, 2, 1, 3)"),
    ("axis_order", "x", normal(2, 5, 3, 8), normal(2, 5, 3, 8).transpose(0, 2, 1, 3).copy(), "float32", "transpose"),
    ("axis_order", "x", normal(2, 3, 4, 5), normal(2, 3, 4, 5).transpose(0, 2, 3, 1).reshape(2, 3, 4, 5), "float32",
     "a reshape where a transpose belongs"),
    ("axis_order", "x", TOKENS, TOKENS.reshape(1, 2, 5, 12).transpose(0, 2, 1, 3).reshape(1, 10, 12), "float32",
     "flattened as (5, 2) where the reference has (2, 5)"),
    ("axis_order", "x", TOKENS, np.random.default_rng(0).permutation(TOKENS.reshape(-1)).reshape(TOKENS.shape), "float32",
     "the same values in another order"),
    ("chunk_order", "x", TOKENS, np.concatenate(np.split(TOKENS, 3, axis=-1)[::-1], axis=-1), "float32", "(2, 1, 0)"),
    ("chunk_order", "x", TOKENS, np.concatenate(np.split(TOKENS, 2, axis=-1)[::-1], axis=-1), "float32", "swap_halves"),
    ("rotary_layout", "x", TOKENS, halves(TOKENS), "float32", "interleave_halves"),
    ("one_step_shift", "x", TOKENS, shifted(TOKENS), "float32", "axis 1 shifted by +1"),
    ("zeroed_region", "x", TOKENS, zeroed(TOKENS), "float32", "slices 0..2 of axis 1 zeroed"),
    ("zeroed_region", "x", TOKENS, np.zeros_like(TOKENS), "float32", "all values zero"),
    ("sign_flip", "x", TOKENS, -TOKENS, "float32", "the sign flipped"),
    ("clamp", "x", TOKENS, np.clip(TOKENS, -0.5, 0.7), "float32", "a clamp to [-0.5, 0.7]"),
    ("clamp", "x", np.clip(TOKENS, -1, 1), TOKENS, "float32", "no clamp where the reference clamps to [-1, 1]"),
    ("scale", "x", TOKENS, TOKENS * np.float32(0.5), "float32", "a factor 0.5"),
    ("offset", "x", TOKENS, TOKENS + np.float32(0.01), "float32", "an offset 0.01"),
    ("shift_again", "sigmas", SCHEDULE, shift_schedule(5.0, SCHEDULE.astype(np.float64)).astype(np.float32), "float32",
     "time-shifted again by 5"),
    ("rounded_once", "x", TOKENS, bf16(TOKENS), "float32", "rounded once to bfloat16"),
    ("rounded_once", "x", TOKENS, TOKENS.astype(np.float16).astype(np.float32), "float32", "rounded once to float16"),
    ("bf16_arithmetic", "sum", SUM, SUM_IN_BF16, "float32", "computed in bfloat16"),
    ("residual_bf16", "residual1", SUM, SUM_IN_BF16, "float32", "computed in bfloat16"),
]


@pytest.mark.parametrize("mistake,layer,ref,ours,dtype_ref,detail", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_tensor_mistake_is_ranked_first_for_its_own_fault(mistake, layer, ref, ours, dtype_ref, detail):
    ev = evidence(ref, ours, layer, dtype_ref=dtype_ref)
    assert ev.row["verdict"] == "FAIL"
    entry = top(ev)
    assert entry["top"] == mistake, entry["summary"]
    assert detail in entry["hypotheses"][0]["detail"], entry["hypotheses"][0]["detail"]
    assert entry["summary"].startswith(f"{layer}: matches the reference with ")


def test_a_float64_schedule_computed_in_float32():
    """Exact thresholds (atol 1e-12) as the schedules have: float32 arithmetic fails them, within 64 roundoffs."""
    steps = np.linspace(1, 0.001, 9)
    ref = 5 * steps / (1 + 4 * steps)
    ours = (np.float32(5) * steps.astype(np.float32) / (1 + np.float32(4) * steps.astype(np.float32))).astype(np.float64)
    entry = top(evidence(ref, ours, "stage0/sigmas", Tolerance(atol=1e-12, rtol=0.0), "float64", "float64"))
    assert entry["top"] == "float32_schedule", entry["summary"]


def test_bf16_arithmetic_against_the_float64_truth_in_a_bf16_run():
    """A value the reference keeps float32 in a bf16 run, computed in bf16 by the port (the truth: float64)."""
    truth = A.astype(np.float64) + B.astype(np.float64) * C.astype(np.float64)
    ev = evidence(SUM, SUM_IN_BF16, "modulation/shift", BF16, "float32", "bfloat16", truth, "bfloat16")
    assert ev.row["verdict"] == "FAIL" and "more than one bfloat16 rounding" in ev.row["reasons"]
    entry = top(ev)
    assert entry["top"] == "bf16_arithmetic" and "float64" in entry["summary"], entry["summary"]


def test_a_missing_cast_back_is_named_and_nothing_else_explains_a_wider_dtype():
    """A residual sum the reference rounds to bf16, kept in float32 by the port: the dtype rule fails it; only the
    missing cast back explains it (every other candidate is still a float32 tensor where the reference holds bf16)."""
    x = bf16(A)
    truth = x.astype(np.float64) + B.astype(np.float64) * C.astype(np.float64)
    ours = x + B * C
    ev = evidence(bf16(ours), ours, "residual1", BF16, "bfloat16", "float32", truth, "bfloat16")
    assert ev.row["verdict"] == "FAIL" and [f["metric"] for f in ev.row["failures"]] == ["dtype"]
    entry = top(ev)
    assert entry["top"] == "cast_back_missing", entry["summary"]
    assert "the cast back to bfloat16 left out (ours kept in float32)" in entry["summary"]
    others = top(ev, [h for h in CATALOG if h.name != "cast_back_missing"])
    assert others["top"] is None and not any(h["explained"] for h in others["hypotheses"])


@pytest.mark.parametrize("ours", [TOKENS + normal(*TOKENS.shape, seed=9) * 0.1, np.tanh(TOKENS), TOKENS ** 3],
                         ids=["noise", "tanh", "cube"])
def test_a_mistake_outside_the_catalog_is_not_a_wrong_guess(ours):
    entry = top(evidence(TOKENS, ours.astype(np.float32)))
    assert entry["top"] is None and entry["summary"] == f"x: {NONE_EXPLAINS}"
    assert all(not h["explained"] for h in entry["hypotheses"])


def test_no_constant_is_fitted_on_a_scalar():
    """A one-value layer (an expert index 0 where the reference has 1): any offset, factor or clamp would fit it."""
    entry = top(evidence(np.array([1.0], np.float32), np.array([0.0], np.float32), "step3/expert"))
    assert entry["top"] in (None, "zeroed_region") and not any(
        h["explained"] for h in entry["hypotheses"] if h["name"] in ("scale", "offset", "clamp"))
    entry = top(evidence(np.array([0.0], np.float32), np.array([1.0], np.float32), "step3/expert"))
    assert entry["top"] is None, entry["summary"]


def test_a_clamp_needs_values_at_its_bound():
    """Frequencies 1e-4 too large (the largest, 1, goes over the reference's range): a factor, not a clamp left out."""
    ref = (1e-3 ** (np.arange(4) / 3)).astype(np.float32)  # helios/freqs_t of test_browser.py's failing page
    entry = top(evidence(ref, ref * np.float32(1.0001), limits=Tolerance(atol=1e-5, rtol=1e-5)))
    assert entry["top"] == "scale", entry["summary"]
    assert "clamp" not in [h["name"] for h in entry["hypotheses"]]


def test_a_more_precise_value_is_no_bf16_mistake():
    """Within a quarter of a bf16 rounding of the reference, but not bf16 numbers: no precision mistake claimed."""
    ours = TOKENS + np.float32(1e-4)
    ours[0, 0, 0] += np.float32(1e-3)
    entry = top(evidence(TOKENS, ours))
    assert entry["top"] != "rounded_once" and all(h["name"] not in ("rounded_once", "bf16_arithmetic")
                                                  for h in entry["hypotheses"] if h["explained"])


def test_a_hypothesis_that_raises_is_reported_and_skipped():
    def broken(ev):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    catalog_ = [Hypothesis("broken", "raises", broken), *CATALOG]
    entry = explain_layer(evidence(REF, -REF), catalog_)
    assert entry["skipped"] == [{"name": "broken", "error": "RuntimeError: boom"}]
    assert entry["top"] == "sign_flip"


def test_explaining_writes_no_array():
    """Read-only tensors (dumps are memory-mapped read-only): any in-place write would raise and be reported."""
    ref, ours = REF.copy(), np.swapaxes(REF, -1, -2).copy()
    for array in (ref, ours):
        array.setflags(write=False)
    entry = explain_layer(evidence(ref, ours), CATALOG)
    assert entry["skipped"] == [] and entry["top"] == "transpose_last_two"
    np.testing.assert_array_equal(ref, REF)


def test_a_second_call_holding_the_first_calls_value():
    first, second = normal(1, 10, 12, seed=4), normal(1, 10, 12, seed=5)
    entry = top(evidence(second, first.copy(), "call2/x", first_call=first))
    assert entry["top"] == "stale_state" and "the first call's value" in entry["summary"], entry["summary"]
    assert top(evidence(second, first.copy(), "x", first_call=first))["top"] is None  # a first call's layer: no such mistake


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def test_an_attention_map_is_judged_per_head_for_every_candidate():
    """A map stored (keys, queries) under elementwise limits loose enough to let fitted values through: the map's
    per-head limits (read back from its row, with its key groups) still refuse them; only the layouts explain it."""
    ref = softmax(normal(1, 4, 6, 6, seed=6))
    loose = Tolerance(atol=0.9, rtol=0.0, attn_js_mean=1e-6, attn_mass_diff=1e-4)
    ev = evidence(ref, np.swapaxes(ref, -1, -2).copy(), "attn1/probs", loose, key_groups={"history": (0, 2)})
    assert ev.row["verdict"] == "FAIL" and {f["kind"] for f in ev.row["failures"]} == {"attention"}
    assert ev.limits.attn_js_mean == 1e-6 and ev.key_groups == {"first": (0, 1), "history": (0, 2)}
    entry = top(ev)
    assert entry["top"] == "transpose_last_two", entry["summary"]
    assert [h["name"] for h in entry["hypotheses"] if h["explained"]] == ["transpose_last_two", "axis_order"]


def test_tolerance_of_a_row_reads_back_the_limits_applied_calibrated_ones_too():
    row = {"ref_max_abs": 2.0, "limits": {"atol": 1e-5, "rtol": 1e-5, "cosine_min": 0.99999, "abs_limit": 1e-6,
                                          "budget_ratio": 1.1, "calibrated": ["abs_limit", "budget_ratio"]}}
    tol = tolerance_of(row)
    assert tol.abs_limit(2.0) == pytest.approx(1e-6) and tol.budget_limit() == 1.1 and tol.cosine_min == 0.99999


def test_large_tensors_are_cut_to_a_window_along_an_axis_no_other_shares():
    assert window((4, 8)) is None
    assert window((2, 64, 64, 4096), limit=1 << 20) == (3, 128)
    ev = Evidence.of("x", {}, np.zeros((3, 1 << 21), np.float32), np.zeros((3, 1 << 21), np.float32), None,
                     limits=FLOAT32, exact=None, rounding=BF16, dtype="float32")
    assert ev.ref.shape == (3, (1 << 22) // 3) and "tested on slices" in ev.notes[0]


# --- a project's own entries -----------------------------------------------------------------------

OWN = '''
import numpy as np
from parity.explain.catalog import Hypothesis

def doubled(evidence):
    yield evidence.mapped("twice the reference", lambda x: 2 * x)

HYPOTHESES = [Hypothesis("my_doubling", "the port doubles", doubled)]
'''


def test_a_projects_own_hypotheses_module(tmp_path, monkeypatch):
    path = tmp_path / "my_hypotheses.py"
    path.write_text(OWN)
    monkeypatch.setattr(catalog, "_files", [])
    catalog.use_files([path])
    found = catalog.hypotheses()
    assert found[-1].name == "my_doubling" and found[:len(CATALOG)] == list(CATALOG)
    entry = explain_layer(evidence(TOKENS, TOKENS * 2), [h for h in found if h.name != "scale"])
    assert entry["top"] == "my_doubling"


def test_bad_hypotheses_modules_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "_files", [])
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(InputError, match="defines no HYPOTHESIS"):
        catalog.use_files([empty])
    twice = tmp_path / "twice.py"
    twice.write_text(OWN.replace("my_doubling", "scale"))
    catalog.use_files([twice])
    with pytest.raises(InputError, match="hypotheses defined twice: scale"):
        catalog.hypotheses()
    with pytest.raises(InputError, match="needs a name"):
        Hypothesis("x", "", lambda ev: ())


def test_every_entry_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [h.name for h in CATALOG if f"`{h.name}`" not in readme]
    assert not missing, f"README's catalog table lacks {missing}"
