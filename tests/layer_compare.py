"""Direct layer-by-layer comparison of two captures, for tests that run both sides themselves.

Walks the layers in execution order (the reference's, with any layer only we record placed after
its predecessor in our order) and judges each as the harness does in float32: present on both
sides, same shape, finite, and ``max_abs <= atol + rtol * max|ref|``. The defaults are
parity/thresholds.toml's float32 ``atol = rtol = 1e-5``: two float32 implementations of the same math differ by
reordered roundings, a few ulps (6e-8) per op over tens of ops, ~1e-6 relative; 1e-5 leaves an order
of magnitude and still fails any formula change. For bf16, :func:`precision_budget` applies the
harness's rule against a float64 run of the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from parity.capture import Capture

ATOL = RTOL = 1e-5
BUDGET_RATIO = 2.0


@dataclass
class Layer:
    name: str
    max_abs: float
    limit: float
    reason: str | None  # None: the layer matches

    @property
    def ok(self) -> bool:
        return self.reason is None


def merged_order(ref: Capture, ours: Capture) -> list[str]:
    names = list(ref.order)
    for i, name in enumerate(ours.order):
        if name not in ref:
            names.insert(names.index(ours.order[i - 1]) + 1 if i else 0, name)
    return names


def compare(ref: Capture, ours: Capture, atol: float = ATOL, rtol: float = RTOL) -> list[Layer]:
    layers = []
    for name in merged_order(ref, ours):
        if name not in ours or name not in ref:
            side = "MLX" if name not in ours else "reference"
            layers.append(Layer(name, math.nan, math.nan, f"missing on the {side} side"))
            continue
        a, b = ref[name].astype(np.float64), ours[name].astype(np.float64)
        if a.shape != b.shape:
            layers.append(Layer(name, math.nan, math.nan, f"shape {b.shape} != reference {a.shape}"))
            continue
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            layers.append(Layer(name, math.nan, math.nan, "NaN/Inf"))
            continue
        max_abs = float(np.abs(a - b).max()) if a.size else 0.0
        limit = atol + rtol * (float(np.abs(a).max()) if a.size else 0.0)
        layers.append(Layer(name, max_abs, limit, None if max_abs <= limit else f"max abs {max_abs:.3g} > {limit:.3g}"))
    return layers


def first_difference(layers: list[Layer]) -> Layer | None:
    return next((layer for layer in layers if not layer.ok), None)


def assert_match(ref: Capture, ours: Capture, **tolerance: float) -> list[Layer]:
    layers = compare(ref, ours, **tolerance)
    first = first_difference(layers)
    assert first is None, f"first differing layer {first.name}: {first.reason}"
    assert ours.order == ref.order
    return layers


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))) if a.size else 0.0


@dataclass
class Budget:
    name: str
    ours: float  # rmse of our bf16 run against the float64 truth
    ref: float  # rmse of the reference's bf16 run against the truth
    max_abs_ours: float
    max_abs_ref: float
    agree: bool  # ours within float32 tolerance of the reference's bf16 run

    @property
    def ratio(self) -> float:
        return self.ours / self.ref if self.ref else (0.0 if self.ours == 0 else math.inf)

    @property
    def ok(self) -> bool:
        return self.agree or self.ratio <= BUDGET_RATIO


def precision_budget(ref: Capture, ours: Capture, truth: Capture) -> list[Budget]:
    """Per layer: our and the reference's bf16 error against the float64 truth (parity/thresholds.toml's bf16 rule:
    ours <= 2 x the reference's own, or agreeing with the reference to float32 tolerance anyway)."""
    rows = []
    for name in ref.order:
        t, r, o = truth[name], ref[name], ours[name]
        limit = ATOL + RTOL * float(np.abs(r).max())
        rows.append(Budget(name, rmse(o, t), rmse(r, t), float(np.abs(o - t.astype(np.float64)).max()),
                           float(np.abs(r - t.astype(np.float64)).max()),
                           bool(np.abs(o.astype(np.float64) - r).max() <= limit)))
    return rows
