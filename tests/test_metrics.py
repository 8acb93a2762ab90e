"""Metrics on inputs whose answers are known."""
import math

import numpy as np
import pytest

from parity import metrics
from parity.metrics import precision_budget, tensor_metrics


def _x(n=1000, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_identical_tensors():
    x = _x()
    m = tensor_metrics(x, x.copy())
    assert m["cosine"] == pytest.approx(1.0, abs=1e-15)
    assert m["max_abs"] == m["max_rel"] == m["mean_abs"] == m["rmse"] == 0.0
    assert m["snr_db"] == math.inf


def test_sign_flip():
    x = _x()
    m = tensor_metrics(x, -x)
    assert m["cosine"] == pytest.approx(-1.0)
    assert m["max_abs"] == pytest.approx(2 * np.abs(x).max())
    assert m["snr_db"] == pytest.approx(10 * math.log10(1 / 4))


def test_scaled_tensor():
    x = _x()
    m = tensor_metrics(x, 1.01 * x)
    assert m["cosine"] == pytest.approx(1.0)  # cosine is blind to scale...
    assert m["max_rel"] == pytest.approx(0.01, rel=1e-3)  # ...the relative error is not
    assert m["snr_db"] == pytest.approx(40.0, abs=0.01)


def test_nan_and_inf_are_counted_per_side_and_left_out_of_sums():
    x = _x()
    y = x.copy()
    y[3], y[7] = np.nan, np.inf
    m = tensor_metrics(x, y)
    assert (m["nan_mlx"], m["inf_mlx"], m["nan_ref"], m["inf_ref"]) == (1, 1, 0, 0)
    assert m["max_abs"] == 0.0


def test_zeros():
    z = np.zeros(10, np.float32)
    assert tensor_metrics(z, z)["cosine"] == 1.0
    m = tensor_metrics(z, np.full(10, 1e-3, np.float32))
    assert m["cosine"] == 0.0
    assert math.isfinite(m["max_rel"])  # the floor keeps a zero reference from exploding
    assert m["snr_db"] == -math.inf


def test_chunked_equals_single_pass(monkeypatch):
    x, y = _x(10_000, 1), _x(10_000, 2)
    whole = tensor_metrics(x, y)
    monkeypatch.setattr(metrics, "CHUNK", 999)
    chunked = tensor_metrics(x, y)
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, rel=1e-12), key


def test_precision_budget_ratio():
    truth = _x().astype(np.float64)
    ref = truth + 1e-3
    ours = truth + 3e-3
    budget = precision_budget(truth, ref, ours)
    assert budget["budget_ratio"] == pytest.approx(3.0)


def test_precision_budget_floor_when_reference_is_exact():
    """The reference exact, ours off by e: the ratio is e over float32 unit roundoff times rms(truth), not e / 0."""
    truth = _x().astype(np.float64)
    error = 3e-6 * np.random.default_rng(2).standard_normal(truth.shape)
    budget = precision_budget(truth, truth.copy(), truth + error)
    floor = 2.0**-24 * np.sqrt(np.mean(truth**2))
    assert budget["ref_err_vs_truth"] == 0.0
    assert budget["budget_ratio"] == pytest.approx(np.sqrt(np.mean(error**2)) / floor, rel=1e-9)


def _direct(ref, test):
    """The metrics straight from their definitions, on whole float64 copies."""
    a, b = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = np.abs(b - a)
    rms = math.sqrt(float(np.mean(a * a))) if a.size else 0.0
    floor = max(metrics.REL_FLOOR * rms, np.finfo(np.float64).tiny)
    return {"max_abs": float(d.max(initial=0.0)), "max_rel": float((d / np.maximum(np.abs(a), floor)).max(initial=0.0)),
            "mean_abs": float(d.mean()), "rmse": math.sqrt(float(np.mean(d * d))), "ref_rms": rms,
            "ref_max_abs": float(np.abs(a).max(initial=0.0)),
            "cosine": float(a @ b / math.sqrt(float(a @ a) * float(b @ b)))}


def _cases():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(100_003).astype(np.float32)
    noise = rng.standard_normal(x.size).astype(np.float32)
    relu = np.maximum(x, 0)
    near_floor = x.copy()
    near_floor[::97] = np.float32(1e-3) * np.sqrt(np.mean(x.astype(np.float64) ** 2)) * (1 + noise[::97] / 100)
    heavy = (rng.standard_t(1.5, x.size)).astype(np.float32)
    holes = x.copy()
    holes[5], holes[77_777] = np.nan, np.inf
    grid = rng.standard_normal((7, 130, 90)).astype(np.float32)
    return {
        "noise": (x, x + np.float32(1e-4) * noise),
        "error grows along the tensor": (x, x * (1 + np.linspace(0, 1e-3, x.size, dtype=np.float32))),
        "relu with errors at the zeros": (relu, relu + np.float32(1e-6) * np.abs(noise)),
        "values near the floor": (near_floor, near_floor + np.float32(1e-5) * noise),
        "heavy tails": (heavy, heavy * (1 + np.float32(1e-3) * noise)),
        "non-finite values": (holes, x + np.float32(1e-4) * noise),
        "non-contiguous": (grid.transpose(2, 0, 1), (grid + np.float32(1e-3)).transpose(2, 0, 1)),
        "float64": (x.astype(np.float64), x.astype(np.float64) + 1e-9 * noise),
        "float16": (x[:5000].astype(np.float16), (x[:5000] + np.float32(1e-2)).astype(np.float16)),
        "one element": (x[:1], x[:1] * 2),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_one_pass_equals_the_definitions(case, monkeypatch):
    ref, test = _cases()[case]
    expected = _direct(ref, test)
    for chunk in (metrics.CHUNK, 4096, 1 << 20):  # several chunks (a running max_rel filters later ones), or one
        monkeypatch.setattr(metrics, "CHUNK", chunk)
        got = tensor_metrics(ref, test)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15 if key == "cosine" else 0), (case, chunk, key)


@pytest.mark.parametrize("where", ["max_abs", "ref_max_abs", "max_rel above the band", "max_rel below the band",
                                   "max_rel in the band"])
def test_a_maximum_set_in_the_last_span_is_found(where):
    """Once the maxima settle, the compiled pass skips the exact loop over a span with no candidate: a new
    maximum of each kind, alone in the tensor's last span, must still reach the result."""
    rng = np.random.default_rng(11)
    ref = rng.standard_normal(40 * metrics._SPAN + 5).astype(np.float32)
    test = ref + np.float32(1e-6) * rng.standard_normal(ref.size).astype(np.float32)
    floor = metrics.REL_FLOOR * math.sqrt(float(np.mean(ref.astype(np.float64) ** 2)))
    i = ref.size - 3
    if where == "max_abs":
        test[i] = ref[i] + np.float32(1e-3)
    elif where == "ref_max_abs":
        ref[i] = test[i] = np.float32(40.0)
    else:
        scale = {"max_rel above the band": 3.0, "max_rel below the band": 0.2, "max_rel in the band": 1.005}[where]
        ref[i] = np.float32(floor * scale)
        test[i] = ref[i] + np.float32(floor / 2)  # a ratio near 1/2: far above the noise
    key = where.split()[0]
    expected = _direct(ref, test)[key]
    assert tensor_metrics(ref, test)[key] == pytest.approx(expected, rel=1e-12)
    assert expected > 2 * _direct(ref[:-5], test[:-5])[key]  # the last span does set the maximum


def test_the_compiled_pass_is_serial():
    """The metric loops never start threads of their own: numba's parallel target is off for each."""
    for kernel in (metrics._sums, metrics._exact, metrics._accumulate, metrics._max_ratio):
        assert not kernel.targetoptions.get("parallel"), kernel
