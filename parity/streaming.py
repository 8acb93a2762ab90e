"""Streamed capture: compare each layer as soon as both sides have it, keep nothing in memory.

In a streaming run (``run_component(..., streaming=True)``) the reference side runs first and
each captured tensor goes straight to ``<dir>/<side>/<layer>.npy`` (the report folder, or a
temporary folder when no report is written, or a reference bundle that already holds them, see
``parity.bundle``). Then our MLX side runs, and each tap is judged the moment it arrives against
the reference tensor read back from disk (memory-mapped), and written out too. Peak memory is
one layer's pair of tensors, not the sum over layers.

Stats-only layers (``stats_only=["blocks.*/ffn*", ...]``, globs on reference layer names) keep
no tensor on either side, only :func:`tensor_stats`: shape, dtype, finite min/max/mean/std, norm,
NaN/Inf counts and a small deterministic sample (the same element indices on every side and
machine). Their report row has the usual layer/verdict/shape/dtype/NaN columns, ``stats_only:
true``, the statistics of both sides (``ref_mean``, ``mlx_mean``, ...) and metrics on the sample
(``sample_cosine``, ``sample_max_abs``, ...); the full-tensor columns (``cosine``, ``max_abs``,
...) stay empty. Their verdict judges what can be judged:

- shape mismatch, and any NaN/Inf on either side (counts are exact): FAIL;
- with an ``atol``/``rtol`` limit (float32): FAIL when min, max, mean, std or rms differ by more
  than the limit, or when an element of the sample does. Each of these is a necessary condition
  of the full ``max_abs <= limit`` check, so such a FAIL is certain; a PASS is not a proof (an
  error confined to elements outside the sample can go unseen);
- ``cosine_min`` and ``max_rel``: checked on the sample (an estimate of the full value);
- bfloat16: the precision budget on the sample against the float64 truth's sample, excused
  when the sample agrees with the reference to float32 tolerance, as for full layers.
"""
from __future__ import annotations

import fnmatch
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from parity.capture import Capture, Sink
from parity.compare import (FAIL, PASS, LayerResult, _within, judge_layer, layer_tolerances, limit_reasons,
                            nonfinite_reasons)
from parity.dumps import layer_file, load_json, write_json, write_npy
from parity.metrics import blocks, precision_budget, tensor_metrics

#: Elements kept per stats-only tensor.
SAMPLE_SIZE = 1024
#: How the sample's element indices are chosen; both sides of a comparison must agree on it.
SAMPLE_METHOD = "golden-ratio-v1"
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0

StatsPredicate = Callable[[str], bool]


# --- statistics ------------------------------------------------------------------------------

def sample_indices(numel: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """Sorted flat indices of the sample of a tensor with ``numel`` elements.

    All of them when ``numel <= size``; otherwise ``floor(frac(j * golden) * numel)`` for
    ``j < size``: spread over the whole tensor without aliasing on channel strides, and plain
    IEEE arithmetic, so every machine and numpy version picks the same elements.
    """
    if numel <= size:
        return np.arange(numel, dtype=np.int64)
    j = np.arange(size, dtype=np.float64)
    return np.unique((np.mod(j * _GOLDEN, 1.0) * numel).astype(np.int64).clip(0, numel - 1))


def take_sample(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``array.flat[indices]`` as float64 without copying a non-contiguous array."""
    if array.ndim == 0:
        return np.asarray(array, np.float64).reshape(-1)[indices]
    if array.flags.c_contiguous:
        return array.reshape(-1)[indices].astype(np.float64)
    return np.asarray(array[np.unravel_index(indices, array.shape)], np.float64)


def tensor_stats(array: np.ndarray, dtype: str | None = None, sample_size: int = SAMPLE_SIZE) -> dict[str, Any]:
    """Shape, dtype, finite min/max/mean/std (population), norm, NaN/Inf counts and a sample.

    One chunked pass in float64 (mean and variance merged per chunk, Chan et al.), no copy of
    the whole tensor.
    """
    count = 0
    mean = m2 = sum_sq = 0.0
    low, high = math.inf, -math.inf
    nan = inf = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for chunk in blocks(array):
            x = chunk.astype(np.float64)
            s = float(x.sum())
            if not math.isfinite(s):
                finite = np.isfinite(x)
                nan += int(np.isnan(x).sum())
                inf += int(np.isinf(x).sum())
                x = x[finite]
                s = float(x.sum())
            if x.size == 0:
                continue
            m = x.size
            chunk_mean = s / m
            centred = x - chunk_mean
            chunk_m2 = float(centred @ centred)
            delta = chunk_mean - mean
            total = count + m
            mean += delta * m / total
            m2 += chunk_m2 + delta * delta * count * m / total
            count = total
            sum_sq += float(x @ x)
            low, high = min(low, float(x.min())), max(high, float(x.max()))
    indices = sample_indices(array.size, sample_size)
    return {
        "shape": list(array.shape),
        "dtype": dtype or str(array.dtype),
        "numel": int(array.size),
        "finite": count,
        "min": low if count else None,
        "max": high if count else None,
        "mean": mean if count else None,
        "std": math.sqrt(m2 / count) if count else None,
        "norm": math.sqrt(sum_sq),
        "rms": math.sqrt(sum_sq / count) if count else None,
        "nan": nan,
        "inf": inf,
        "sample_method": SAMPLE_METHOD,
        "sample": [float(v) for v in take_sample(array, indices)],
    }


def stats_predicate(globs: Iterable[str] | None) -> StatsPredicate:
    """``layer -> True`` when ``layer`` matches one of the glob patterns (``fnmatch``, case-sensitive)."""
    patterns = tuple(globs or ())
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _never(_name: str) -> bool:
    return False


# --- the capture -----------------------------------------------------------------------------

class _SpooledTensors(Mapping):
    """``capture.tensors`` of a :class:`StreamCapture`: read back from disk (memory-mapped) on access."""

    def __init__(self, capture: "StreamCapture"):
        self._capture = capture

    def __getitem__(self, name: str) -> np.ndarray:
        capture = self._capture
        if capture._hot is not None and capture._hot[0] == name:
            return capture._hot[1]
        if name in capture.files and capture.directory is not None:
            path = capture.directory / capture.files[name]
            try:
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise ValueError(f"{capture.side}: dump {path} of layer {name!r} does not exist") from None
            except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt file
                raise ValueError(f"{capture.side}: dump {path} of layer {name!r} is not a valid .npy file: {err}") from None
        if name in capture.stats:
            raise KeyError(f"{capture.side}: layer {name!r} was captured as statistics only")
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        capture = self._capture
        return name in capture.files or (capture._hot is not None and capture._hot[0] == name)

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._capture.order if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class StreamCapture(Capture):
    """A :class:`Capture` that keeps no tensor in memory.

    Each tensor is written to ``directory/<layer>.npy`` as it arrives (or, for layers
    ``stats_only(name)`` selects, summarised by :func:`tensor_stats`), then handed to ``sink``.
    ``capture[name]`` / ``capture.tensors[name]`` read it back memory-mapped. ``directory=None``
    keeps only shapes, dtypes and statistics.
    """

    def __init__(self, side: str, directory: str | Path | None, stats_only: StatsPredicate | None = None,
                 sink: Sink | None = None):
        super().__init__(side, keep=False, sink=self._store)
        self.directory = Path(directory) if directory is not None else None
        self.stats_only = stats_only or _never
        self.forward = sink
        self.files: dict[str, str] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.tensors = _SpooledTensors(self)  # type: ignore[assignment]
        self._hot: tuple[str, np.ndarray] | None = None
        self._tmp: Any = None  # a TemporaryDirectory that must live as long as the capture

    def _store(self, name: str, array: np.ndarray, dtype: str) -> None:
        if self.stats_only(name):
            self.stats[name] = tensor_stats(array, dtype)
            if self.directory is not None:
                write_json(self.directory / _stats_file(name), self.stats[name])
        elif self.directory is not None:
            write_npy(self.directory / layer_file(name), array)
            self.files[name] = layer_file(name)
        if self.forward is not None:
            self._hot = (name, array)
            try:
                self.forward(name, array, dtype)
            finally:
                self._hot = None

    @classmethod
    def open(cls, side: str, directory: str | Path, entry: Mapping[str, Any]) -> "StreamCapture":
        """A finished capture read from a manifest entry (see :meth:`manifest_entry`) under ``directory``."""
        capture = cls(side, directory)
        directory = capture.directory
        for key in ("layer_order", "shapes", "dtypes"):
            if key not in entry:
                raise ValueError(f"{side}: manifest entry lacks {key!r}")
        capture.order = list(entry["layer_order"])
        capture.shapes = {k: tuple(v) for k, v in entry["shapes"].items()}
        capture.dtypes = dict(entry["dtypes"])
        capture.files = {k: _inside(directory, v, side) for k, v in (entry.get("files") or {}).items()}
        for layer, relative in (entry.get("stats") or {}).items():
            capture.stats[layer] = load_json(directory / _inside(directory, relative, side), f"{side} statistics of {layer!r}")
        missing = [k for k in capture.order if k not in capture.files and k not in capture.stats]
        if missing:
            raise ValueError(f"{side}: manifest lists layers with neither a tensor nor statistics: {missing[:5]}")
        return capture

    def manifest_entry(self) -> dict[str, Any]:
        """Layer order, files and statistics files (relative to ``directory``), shapes and dtypes."""
        return {
            "layer_order": list(self.order),
            "files": dict(self.files),
            "stats": {name: _stats_file(name) for name in self.stats},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "dtypes": dict(self.dtypes),
        }

    def dump_entry(self, directory: Path, side: str) -> dict[str, Any]:
        """The ``manifest.json`` entry of this side in report folder ``directory`` (``runner.write_dumps``).

        Files already written under ``directory/side`` stay where they are; files elsewhere (a
        bundle, a temporary folder) are hard-linked or copied in. Statistics are written there.
        """
        target = Path(directory) / side
        same = self.directory is not None and target.resolve() == self.directory.resolve()
        entry = self.manifest_entry()
        if not same:
            for name, relative in self.files.items():
                _link_or_copy(self.directory / relative, target / relative)
            for name in self.stats:
                write_json(target / _stats_file(name), self.stats[name])
        entry["files"] = {k: f"{side}/{v}" for k, v in entry["files"].items()}
        entry["stats"] = {k: f"{side}/{v}" for k, v in entry["stats"].items()}
        return entry


def _stats_file(layer: str) -> str:
    return layer_file(layer).removesuffix(".npy") + ".stats.json"


def _inside(directory: Path, relative: str, side: str) -> str:
    path = (directory / relative).resolve()
    if directory.resolve() not in path.parents:
        raise ValueError(f"{side}: manifest points outside its folder: {relative}")
    return relative


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- judging as the MLX side runs ------------------------------------------------------------

class StreamJudge:
    """The MLX capture's sink: judges each arriving MLX tensor against its reference layer(s)."""

    def __init__(self, component: str, dtype: str, ref: StreamCapture, truth: StreamCapture | None,
                 thresholds: Any, alignment: Mapping[str, str] | None, stats_only: StatsPredicate | None = None):
        self.component, self.dtype = component, dtype
        self.ref, self.truth, self.thresholds = ref, truth, thresholds
        self.by_mlx: dict[str, list[str]] = {}
        for name in ref.order:
            self.by_mlx.setdefault((alignment or {}).get(name, name), []).append(name)
        self.user_stats_only = stats_only or _never
        self.judged: dict[str, LayerResult] = {}
        self.mlx: StreamCapture | None = None

    def stats_only(self, mlx_name: str) -> bool:
        """An MLX layer is stats-only when its reference layer is (or, unmatched, when a glob selects it)."""
        names = self.by_mlx.get(mlx_name)
        if names is None:
            return self.user_stats_only(mlx_name)
        return any(name in self.ref.stats for name in names)

    def capture(self, directory: str | Path | None) -> StreamCapture:
        self.mlx = StreamCapture("mlx", directory, self.stats_only, sink=self)
        return self.mlx

    def __call__(self, mlx_name: str, array: np.ndarray, dtype: str) -> None:
        mlx = self.mlx
        for name in self.by_mlx.get(mlx_name, ()):
            if name in self.ref.stats:
                mlx_stats = mlx.stats.get(mlx_name) or tensor_stats(array, dtype)
                truth_stats = self.truth.stats.get(name) if self.truth is not None else None
                tol, exact = layer_tolerances(self.thresholds, self.component, self.dtype, name)
                self.judged[name] = judge_stats(name, mlx_name, self.ref, self.ref.stats[name], mlx_stats,
                                                self.truth, truth_stats, tol, exact, mlx.dtypes[mlx_name])
            else:
                self.judged[name] = judge_layer(self.component, self.dtype, name, mlx_name, self.ref, mlx,
                                                self.truth, self.thresholds)


def judge_stats(name: str, mlx_name: str, ref: Capture, ref_stats: dict, mlx_stats: dict,
                truth: Capture | None, truth_stats: dict | None, tol: Any, exact: Any, mlx_dtype: str) -> LayerResult:
    """Judge a stats-only layer on what its statistics and sample can tell (see the module docstring)."""
    result = LayerResult(name, mlx_name, PASS, [], {}, tuple(ref_stats["shape"]), tuple(mlx_stats["shape"]),
                         ref.dtypes[name], mlx_dtype)
    if result.shape_ref != result.shape_mlx:
        result.verdict = FAIL
        result.reasons.append(f"shape mismatch: reference {result.shape_ref} vs MLX {result.shape_mlx}")
        return result
    reasons = result.reasons
    ref_extent = [abs(v) for v in (ref_stats["min"], ref_stats["max"]) if v is not None]
    m: dict[str, Any] = {
        "stats_only": True,
        "numel": ref_stats["numel"],
        "ref_max_abs": max(ref_extent, default=0.0),
        "ref_rms": ref_stats["rms"] if ref_stats["rms"] is not None else 0.0,
        "nan_ref": ref_stats["nan"], "inf_ref": ref_stats["inf"],
        "nan_mlx": mlx_stats["nan"], "inf_mlx": mlx_stats["inf"],
    }
    for side, stats in (("ref", ref_stats), ("mlx", mlx_stats)):
        for key in ("min", "max", "mean", "std", "norm"):
            m[f"{side}_{key}"] = stats[key]
    result.metrics = m
    reasons += nonfinite_reasons(m)
    methods = {ref_stats.get("sample_method"), mlx_stats.get("sample_method")}
    if len(methods) != 1 or len(ref_stats["sample"]) != len(mlx_stats["sample"]):
        reasons.append(f"samples not comparable (methods {sorted(map(str, methods))})")
        result.verdict = FAIL
        return result
    ref_sample = np.asarray(ref_stats["sample"], np.float64)
    mlx_sample = np.asarray(mlx_stats["sample"], np.float64)
    sample = tensor_metrics(ref_sample, mlx_sample)
    m["sample_size"] = int(ref_sample.size)
    for key in ("cosine", "max_abs", "max_rel", "rmse"):
        m[f"sample_{key}"] = sample[key]
    if truth is not None and truth_stats is None:
        reasons.append("missing in the float64 truth run")
    elif truth_stats is not None:
        budget = precision_budget(np.asarray(truth_stats["sample"], np.float64), ref_sample, mlx_sample)
        m.update({f"sample_{k}": v for k, v in budget.items()})
        over = tol.budget_ratio is not None and not budget["budget_ratio"] <= tol.budget_ratio
        if over and exact is not None and _within({**sample, "ref_max_abs": m["ref_max_abs"]}, exact):
            m["sample_budget_excused"] = True
        elif over:
            reasons.append(f"precision budget on the sample {budget['budget_ratio']:.3g} > {tol.budget_ratio:g}")
    differences = {key: abs(ref_stats[key] - mlx_stats[key]) for key in ("min", "max", "mean", "std", "rms")
                   if ref_stats[key] is not None and mlx_stats[key] is not None}
    reasons += limit_reasons(sample, m, tol, "sample ", differences)
    if reasons:
        result.verdict = FAIL
    return result


# --- one streamed comparison -----------------------------------------------------------------

def run_reference_side(comp: Any, reference: Any, inputs: dict, dtype: str, directory: Path | None,
                       stats_only: StatsPredicate | None = None) -> StreamCapture:
    """Run the reference in ``dtype`` (``float64``: the truth), streaming its tensors into ``directory``."""
    from parity.runner import _run_reference

    capture = StreamCapture("truth" if dtype == "float64" else "ref", directory, stats_only)
    _run_reference(comp, reference, inputs, dtype, capture)
    return capture


def run_mlx_side(comp: Any, mlx_model: Any, inputs: dict, dtype: str, ref: StreamCapture,
                 truth: StreamCapture | None, thresholds: Any, directory: Path | None,
                 stats_only: StatsPredicate | None = None) -> tuple[StreamCapture, dict[str, LayerResult]]:
    """Run our MLX side, judging each tap as it arrives; returns the capture and the judged layers."""
    judge = StreamJudge(comp.name, dtype, ref, truth, thresholds, comp.alignment, stats_only)
    mlx = judge.capture(directory)
    comp.run_mlx(mlx_model, inputs, dtype, mlx)
    return mlx, judge.judged


def spool_dir(report_dir: Path | None) -> tuple[Path, Any]:
    """Where a streaming run writes its tensors: the report folder, or a temporary folder (returned to keep alive)."""
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        return report_dir, None
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="parity-stream-")
    return Path(tmp.name), tmp


def needs_mlx_tensors(comp: Any) -> bool:
    """True when the component computes extra report sections (which may read the MLX tensors)."""
    from parity.component import Component

    return type(comp).sections is not Component.sections


def keep_alive(captures: Sequence[StreamCapture | None], tmp: Any) -> None:
    """Tie a temporary spool folder's lifetime to the captures that read from it."""
    if tmp is not None:
        for capture in captures:
            if capture is not None:
                capture._tmp = tmp
