"""Figures for the HTML reports, rendered with matplotlib (Agg) and returned as ``data:`` PNG URIs.

Every function takes plain report data (lists, dicts, numpy arrays), never a live model, and
copes with the values a failing run produces: NaN, +-Inf, exact zeros on a log axis, missing
columns. Nothing here touches the network or writes files.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any, Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FAIL_COLOR = "#c62828"
PASS_COLOR = "#2e7d32"
SKIP_COLOR = "#9e9e9e"
#: At most this many layer names are written under an axis; beyond that, indices only.
MAX_TICK_LABELS = 48
#: The side of the largest image drawn for a tensor slice (larger slices are cropped around the worst error).
MAX_IMAGE_SIDE = 256


def to_data_uri(fig: "plt.Figure") -> str:
    """Render ``fig`` to a base64 PNG ``data:`` URI and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _num(value: Any) -> float:
    """A float for plotting; None, strings and other non-numbers become NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _positive(values: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Values for a log axis: (positive finite values with NaN elsewhere, mask of exact zeros)."""
    arr = np.array([_num(v) for v in values], dtype=np.float64)
    zeros = arr == 0
    arr[~(np.isfinite(arr) & (arr > 0))] = np.nan
    return arr, zeros


def _layer_ticks(ax: "plt.Axes", names: Sequence[str]) -> None:
    n = len(names)
    if 0 < n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n))
        ax.set_xticklabels([_short(s) for s in names], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.5, max(n - 0.5, 0.5))


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def _mark_failing(ax: "plt.Axes", failing: Sequence[bool], first: int | None) -> None:
    for i, bad in enumerate(failing):
        if bad:
            ax.axvspan(i - 0.5, i + 0.5, color=FAIL_COLOR, alpha=0.08, lw=0)
    if first is not None:
        ax.axvline(first, color=FAIL_COLOR, lw=1.2, ls="--")


def _log_series(ax: "plt.Axes", x: np.ndarray, values: Iterable[Any], label: str, floor_holder: list, **style: Any) -> None:
    """Plot ``values`` on a log axis; exact zeros are drawn later at the axis floor as hollow triangles."""
    y, zeros = _positive(values)
    if np.isfinite(y).any() or zeros.any():
        line, = ax.plot(x, y, marker="o", ms=3, lw=1.2, label=label, **style)
        if zeros.any():
            floor_holder.append((x[zeros], line.get_color()))


def _draw_zero_markers(ax: "plt.Axes", zero_points: list) -> None:
    if not zero_points:
        return
    low = ax.get_ylim()[0]
    for xs, color in zero_points:
        ax.plot(xs, np.full(len(xs), low), ls="none", marker="v", mfc="none", mec=color, ms=6, clip_on=False)


def depth_plot(layers: Sequence[dict[str, Any]], first_divergence: str | None = None,
               budget_limit: float | None = None) -> str | None:
    """Errors (log), 1 - cosine (log) and, when present, the precision-budget ratio over layer depth."""
    compared = [row for row in layers if row.get("cosine") is not None or row.get("max_abs") is not None]
    if not compared:
        return None
    names = [str(row.get("layer", "?")) for row in layers]
    x = np.arange(len(layers))
    failing = [row.get("verdict") != "PASS" for row in layers]
    first = names.index(first_divergence) if first_divergence in names else None
    has_budget = any(row.get("budget_ratio") is not None for row in layers)
    panels = 3 if has_budget else 2
    fig, axes = plt.subplots(panels, 1, figsize=(11, 2.6 * panels + 1.2), sharex=True)

    ax = axes[0]
    zero_points: list = []
    for key, label in (("max_abs", "max abs"), ("mean_abs", "mean abs"), ("rmse", "RMSE"),
                       ("err_vs_truth", "MLX vs float64 truth (RMSE)"),
                       ("ref_err_vs_truth", "reference vs float64 truth (RMSE)")):
        if any(row.get(key) is not None for row in layers):
            _log_series(ax, x, [row.get(key) for row in layers], label, zero_points)
    _finish_log_axis(ax, "error (MLX vs reference)", zero_points)
    _mark_failing(ax, failing, first)

    ax = axes[1]
    zero_points = []
    deficit = [1.0 - _num(row.get("cosine")) for row in layers]
    _log_series(ax, x, deficit, "1 − cosine", zero_points, color="#6a1b9a")
    _finish_log_axis(ax, "1 − cosine", zero_points)
    _mark_failing(ax, failing, first)

    if has_budget:
        ax = axes[2]
        zero_points = []
        excused = [bool(row.get("budget_excused")) for row in layers]
        ratios = [None if skip else row.get("budget_ratio") for row, skip in zip(layers, excused)]
        _log_series(ax, x, ratios, "budget ratio", zero_points, color="#ef6c00")
        if any(excused):
            y, _zeros = _positive([row.get("budget_ratio") if skip else None for row, skip in zip(layers, excused)])
            ax.plot(x, y, ls="none", marker="o", ms=6, mfc="none", mec=SKIP_COLOR,
                    label="excused (matches the reference to float32 tolerance)")
        if budget_limit is not None:
            ax.axhline(budget_limit, color=FAIL_COLOR, lw=1, ls=":", label=f"limit {budget_limit:g}")
        _finish_log_axis(ax, "precision-budget ratio", zero_points)
        _mark_failing(ax, failing, first)

    _layer_ticks(axes[-1], names)
    axes[-1].set_xlabel("layer (execution order)" + ("" if len(names) <= MAX_TICK_LABELS else "; index"))
    axes[0].set_title("Error over depth (shaded: failing layers; dashed: first divergence; ▽: exactly 0)", fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


def _finish_log_axis(ax: "plt.Axes", ylabel: str, zero_points: list) -> None:
    ax.set_ylabel(ylabel, fontsize=9)
    if ax.lines:
        ax.set_yscale("log")
        _draw_zero_markers(ax, zero_points)
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="#777")
    ax.grid(True, which="major", alpha=0.3)


def _all_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def curves_plot(data: dict[str, Any]) -> str | None:
    """A ``curves`` section: ``{"x", "series": {label: values}, "xlabel", "ylabel", "log"}``; None if nothing is finite."""
    from matplotlib.ticker import MaxNLocator

    series = data.get("series") or {}
    if not isinstance(series, dict) or not series:
        return None
    log = bool(data.get("log"))
    given_x = data.get("x")
    numeric_x = _all_numbers(given_x)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    zero_points: list = []
    drawn = False
    for label, values in series.items():
        values = list(values) if isinstance(values, (list, tuple)) else []
        x = np.array([_num(v) for v in given_x]) if numeric_x and len(given_x) == len(values) else np.arange(len(values))
        y = np.array([_num(v) for v in values], dtype=np.float64)
        drawn |= bool(np.isfinite(y).any())
        if log:
            _log_series(ax, x, values, str(label), zero_points)
        else:
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=str(label))
    if not drawn:
        plt.close(fig)
        return None
    if isinstance(given_x, (list, tuple)) and given_x and not numeric_x and len(given_x) <= MAX_TICK_LABELS:
        ax.set_xticks(range(len(given_x)))
        ax.set_xticklabels([_short(str(v), 24) for v in given_x], rotation=45, ha="right", fontsize=7)
    elif not numeric_x or all(float(v).is_integer() for v in given_x):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(str(data.get("xlabel", "")))
    if log:
        _finish_log_axis(ax, str(data.get("ylabel", "")), zero_points)
    else:
        ax.set_ylabel(str(data.get("ylabel", "")), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return to_data_uri(fig)


def heatmap_plot(data: dict[str, Any]) -> str | None:
    """A ``heatmap`` section: ``{"rows": [...], "cols": [...], "values": [[...]], "label": str}``.

    Non-negative values spanning more than three decades get a log colour scale (exact zeros take
    the lowest colour); NaN/Inf cells are magenta. Small maps carry their values as text.
    """
    from matplotlib.colors import LogNorm

    raw = data.get("values") or []
    values = np.array([[_num(v) for v in row] for row in raw], dtype=np.float64) if all(
        isinstance(r, (list, tuple)) for r in raw) else np.empty((0, 0))
    if values.ndim != 2 or values.size == 0:
        return None
    rows = [str(r) for r in data.get("rows") or []]
    cols = [str(c) for c in data.get("cols") or []]
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    shown = np.where(np.isfinite(values), values, np.nan)
    norm = None
    if finite.size and (finite >= 0).all() and positive.size and (
            data.get("log") or (positive.max() / positive.min() > 1e3)) and positive.max() > positive.min():
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        shown = np.where(shown == 0, positive.min(), shown)
    h, w = values.shape
    fig, ax = plt.subplots(figsize=(min(max(3 + 0.9 * w, 6), 14), min(max(1.2 + 0.45 * h, 2.6), 10)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#ff00ff")  # NaN / Inf cells stand out
    image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=str(data.get("label", "")) + (" (log scale)" if norm is not None else ""))
    if rows and len(rows) == h and h <= MAX_TICK_LABELS:
        ax.set_yticks(range(h))
        ax.set_yticklabels([_short(r, 24) for r in rows], fontsize=8)
    if cols and len(cols) == w and w <= MAX_TICK_LABELS:
        ax.set_xticks(range(w))
        ax.set_xticklabels([_short(c, 24) for c in cols], rotation=45 if w > 8 else 0,
                           ha="right" if w > 8 else "center", fontsize=8)
    if h * w <= 200:
        for (i, j), v in np.ndenumerate(values):
            text = "NaN" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.2g}")
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.6))
    fig.tight_layout()
    return to_data_uri(fig)


# --- tensor slices -------------------------------------------------------------------------------

def slice_plan(ref: np.ndarray, test: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """How to cut a 1-D or 2-D view out of tensors shaped like ``ref``; returns ``(cut, description)``.

    Size-1 axes are dropped. Rank <= 2 is drawn whole. Higher ranks show their last two axes as
    an image (folding the last two together while one of them is shorter than 4, so
    ``(tokens, heads, head_dim)`` becomes ``tokens x (heads*head_dim)``), at the leading index
    that holds the largest |ref - test| (NaN/Inf count as largest): for a video tensor
    ``(B, C, F, H, W)`` that is the H x W image of the channel and frame that diverge most.
    Views longer than :data:`MAX_IMAGE_SIDE` are cropped around the largest error.
    ``cut`` applies the same view to any array of that shape (e.g. the float64 truth).
    """
    shape = tuple(ref.shape)
    kept = [i for i, n in enumerate(shape) if n != 1]
    folded = [shape[i] for i in kept] or [1]
    groups = [[i] for i in kept] or [[]]  # original axes behind each folded axis
    while len(folded) >= 3 and min(folded[-2:]) < 4:
        folded = folded[:-2] + [folded[-2] * folded[-1]]
        groups = groups[:-2] + [groups[-2] + groups[-1]]
    lead_shape = folded[:-2] if len(folded) >= 3 else []
    image_shape = folded[len(lead_shape):]
    lead = int(np.prod(lead_shape)) if lead_shape else 1

    def stack(x: np.ndarray) -> np.ndarray:
        return np.asarray(x).reshape(lead, *image_shape)

    best = 0
    index = [":" if n != 1 else "0" for n in shape]
    if lead_shape:
        best = _worst_lead_index(stack(ref), stack(test))
        for group, i in zip(groups, np.unravel_index(best, lead_shape)):
            index[group[0]] = str(int(i))
    window: tuple[slice, ...] = ()
    side = MAX_IMAGE_SIDE if len(image_shape) == 2 else MAX_IMAGE_SIDE * 16
    if max(image_shape) > side:
        err = _error_map(stack(ref)[best], stack(test)[best])
        center = np.unravel_index(int(np.argmax(err)), err.shape)
        starts = [_window(c, n, side) for c, n in zip(center, image_shape)]
        window = tuple(slice(s, s + min(side, n)) for s, n in zip(starts, image_shape))

    def cut(x: np.ndarray) -> np.ndarray:
        view = stack(x)[best]
        if window:
            view = view[window]
        return np.asarray(view, dtype=np.float64)

    image_groups = groups[len(lead_shape):]
    axes_text = ["axis " + "\u00b7".join(map(str, g)) if g else "scalar" for g in image_groups]
    text = (f"x[{', '.join(index)}]" if index else "x") + f" of shape {list(shape)}"
    if len(image_groups) == 2:
        text += f"; rows: {axes_text[0]}, columns: {axes_text[1]}"
    if any(len(g) > 1 for g in image_groups):
        text += " (\u00b7 = axes flattened together)"
    if lead_shape:
        text += "; the slice with the largest |MLX \u2212 reference|"
    if window:
        text += "; cropped around the largest error to " + ", ".join(
            f"{t} {w.start}..{w.stop - 1}" for t, w in zip(axes_text, window))
    return cut, text


def slice_pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """The same 1-D or 2-D view (see :func:`slice_plan`) of two same-shape tensors, and its description."""
    cut, text = slice_plan(ref, test)
    return cut(ref), cut(test), text


def _window(center: int, size: int, side: int = MAX_IMAGE_SIDE) -> int:
    return int(min(max(center - side // 2, 0), max(size - side, 0)))


def _error_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(np.asarray(b, np.float64) - np.asarray(a, np.float64))
    return np.where(np.isfinite(diff), diff, np.inf)


def _worst_lead_index(a3: np.ndarray, b3: np.ndarray, block_elements: int = 1 << 22) -> int:
    """Index along axis 0 with the largest |a - b| (non-finite counts as infinite), in memory-bounded blocks."""
    per = max(int(np.prod(a3.shape[1:])), 1)
    step = max(block_elements // per, 1)
    best, best_value = 0, -1.0
    for start in range(0, a3.shape[0], step):
        err = _error_map(a3[start:start + step], b3[start:start + step]).reshape(-1, per).max(axis=1)
        i = int(np.argmax(err))
        if err[i] > best_value:
            best, best_value = start + i, float(err[i])
    return best


def _image(fig, ax, data: np.ndarray, cmap: str, vmin: float, vmax: float, title: str) -> None:
    colors = plt.get_cmap(cmap).with_extremes(bad="#ff00ff")  # NaN / Inf pixels stand out
    shown = ax.imshow(np.where(np.isfinite(data), data, np.nan), cmap=colors, vmin=vmin, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    finite = np.concatenate([x[np.isfinite(x)].ravel() for x in arrays])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def _span(*arrays: np.ndarray) -> float:
    finite = np.concatenate([np.abs(x[np.isfinite(x)]).ravel() for x in arrays])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _figure_size(shape: tuple[int, ...], panels: int) -> tuple[float, float]:
    width = 14.0 if panels == 3 else 10.0
    ratio = shape[1] / max(shape[0], 1)
    return width, min(max(width / panels / max(ratio, 0.25), 2.2), 4.2) + 0.8


def side_by_side(ref: np.ndarray, test: np.ndarray, truth: np.ndarray | None = None) -> tuple[str, str, str | None]:
    """Reference, MLX and MLX − reference of one slice (see :func:`slice_plan`).

    Returns ``(data URI, description of the slice, truth URI)``; with a float64 ``truth`` of the
    same shape the second figure shows reference − truth and MLX − truth on one colour scale.
    """
    cut, text = slice_plan(ref, test)
    a, b = cut(ref), cut(test)
    with np.errstate(invalid="ignore", over="ignore"):
        d = b - a
    if a.ndim <= 1:
        a1, b1, d1 = np.atleast_1d(a), np.atleast_1d(b), np.atleast_1d(d)
        fig, axes = plt.subplots(2, 1, figsize=(11, 4.6), sharex=True)
        axes[0].plot(a1, lw=1.2, label="reference")
        axes[0].plot(b1, lw=1, ls="--", label="MLX")
        axes[0].legend(fontsize=8)
        axes[0].grid(True, alpha=0.3)
        axes[1].plot(d1, lw=1, color=FAIL_COLOR)
        axes[1].set_ylabel("MLX \u2212 reference", fontsize=9)
        axes[1].grid(True, alpha=0.3)
        axes[1].set_xlabel("element")
    else:
        lo, hi = _limits(a, b)
        span = _span(d)
        fig, axes = plt.subplots(1, 3, figsize=_figure_size(a.shape, 3))
        _image(fig, axes[0], a, "viridis", lo, hi, "reference")
        _image(fig, axes[1], b, "viridis", lo, hi, "MLX")
        _image(fig, axes[2], d, "RdBu_r", -span, span, f"MLX \u2212 reference (max |\u0394| {span:.3g})")
    fig.tight_layout()
    main = to_data_uri(fig)

    truth_uri = None
    if truth is not None and tuple(truth.shape) == tuple(ref.shape):
        t = cut(truth)
        with np.errstate(invalid="ignore", over="ignore"):
            ref_err, our_err = a - t, b - t
        span = _span(ref_err, our_err)
        rms = lambda e: float(np.sqrt(np.nanmean(np.where(np.isfinite(e), e, np.nan) ** 2))) if e.size else math.nan  # noqa: E731
        labels = (f"reference \u2212 truth (RMSE {rms(ref_err):.3g})", f"MLX \u2212 truth (RMSE {rms(our_err):.3g})")
        if a.ndim <= 1:
            fig, ax = plt.subplots(figsize=(11, 2.8))
            ax.plot(np.atleast_1d(ref_err), lw=1, label=labels[0])
            ax.plot(np.atleast_1d(our_err), lw=1, label=labels[1], color=FAIL_COLOR)
            ax.legend(fontsize=8)
            ax.grid(True, alpha=0.3)
        else:
            fig, axes = plt.subplots(1, 2, figsize=_figure_size(a.shape, 2))
            _image(fig, axes[0], ref_err, "RdBu_r", -span, span, labels[0])
            _image(fig, axes[1], our_err, "RdBu_r", -span, span, labels[1])
        fig.tight_layout()
        truth_uri = to_data_uri(fig)
    return main, text, truth_uri


def trend_plot(labels: Sequence[str], series: dict[str, Sequence[Any]], statuses: Sequence[str],
               ylabel: str, title: str = "") -> str | None:
    """A metric over tested commits (bisect), on a log axis: one line per series, x ticks coloured by good/bad/skip."""
    if not labels or not series:
        return None
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(11, 3.4))
    zero_points: list = []
    for name, values in series.items():
        _log_series(ax, x, values, name, zero_points)
    _finish_log_axis(ax, ylabel, zero_points)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8, family="monospace")
    colors = {"good": PASS_COLOR, "bad": FAIL_COLOR}
    for tick, status in zip(ax.get_xticklabels(), statuses):
        tick.set_color(colors.get(status, SKIP_COLOR))
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


# --- videos --------------------------------------------------------------------------------------

def frame_panels(panels: Sequence[dict[str, Any]], seams: Sequence[int] = (), title: str = "") -> str | None:
    """Per-frame curves of a video comparison, stacked panels sharing the frame axis.

    Each panel: ``{"ylabel", "series": {label: values}, "styles": {label: matplotlib kwargs},
    "limits": [(value, label)], "log": bool, "flagged": [frame, ...]}``. Seams (first frames of
    chunks) are dotted vertical lines between frames; flagged frames are shaded. None (or NaN/Inf)
    values leave gaps. Returns None when no panel has a finite value.
    """
    panels = [p for p in panels if any(np.isfinite([_num(v) for v in values]).any()
                                       for values in (p.get("series") or {}).values())]
    if not panels:
        return None
    length = max(len(v) for p in panels for v in p["series"].values())
    x = np.arange(length)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.9 * len(panels) + 0.9), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for frame in panel.get("flagged") or ():
            ax.axvspan(frame - 0.5, frame + 0.5, color=FAIL_COLOR, alpha=0.12, lw=0)
        for i, seam in enumerate(seams):
            ax.axvline(seam - 0.5, color="#555", lw=1, ls=":", label="seam" if i == 0 else None)
        styles = panel.get("styles") or {}
        zero_points: list = []
        for label, values in panel["series"].items():
            style = {"marker": "o", "ms": 2.5, "lw": 1.2, **styles.get(label, {})}
            if panel.get("log"):
                y, zeros = _positive(values)
                if zeros.any():
                    zero_points.append((x[:len(values)][zeros], style.get("color")))
            else:
                y = np.array([_num(v) for v in values], dtype=np.float64)
                y[~np.isfinite(y)] = np.nan
            ax.plot(x[:len(y)], y, label=str(label), **style)
        for value, label in panel.get("limits") or ():
            ax.axhline(_num(value), color=FAIL_COLOR, lw=1, ls="--", label=str(label))
        if panel.get("log"):
            ax.set_yscale("log")
            _draw_zero_markers(ax, zero_points)
        ax.set_ylabel(str(panel.get("ylabel", "")), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[-1, 0].set_xlim(-0.5, length - 0.5)
    axes[-1, 0].set_xlabel("frame")
    if title:
        axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


def attention_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> str | None:
    """Attention maps of some heads: per row (label, reference map, our map), drawn as reference / MLX / MLX − reference.

    Maps are ``(queries, keys)``; the reference and ours share a colour scale per row, the
    difference is symmetric around 0. None without rows.
    """
    if not rows:
        return None
    height = max(1.6, min(3.2, 9.0 / len(rows)))
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, height * len(rows) + 0.4), squeeze=False)
    for (label, ref, ours), ax in zip(rows, axes):
        lo, hi = _limits(ref, ours)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = ours - ref
        span = _span(diff)
        _image(fig, ax[0], ref, "viridis", lo, hi, f"{label}: reference")
        _image(fig, ax[1], ours, "viridis", lo, hi, f"{label}: MLX")
        _image(fig, ax[2], diff, "RdBu_r", -span, span, f"MLX \u2212 reference (max |\u0394| {span:.3g})")
        for a in ax:
            a.set_xlabel("key", fontsize=8)
        ax[0].set_ylabel("query", fontsize=8)
    fig.tight_layout()
    return to_data_uri(fig)
