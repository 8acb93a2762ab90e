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
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from parity.capture import Capture, Sink
from parity.compare import Judge, LayerResult
from parity.dumps import layer_file, write_json, write_npy
from parity.stats import tensor_stats
from parity.vocab import InputError, inside, load_json, load_npy

StatsPredicate = Callable[[str], bool]


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
            array = load_npy(path, mmap=True)
            expected = capture.shapes.get(name)
            if expected is not None and tuple(array.shape) != tuple(expected):
                raise InputError(f"{path}: holds shape {tuple(array.shape)}, its manifest says {tuple(expected)} "
                                 f"for {capture.side} layer {name!r}")
            return array
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

    def stats_of(self, name: str) -> dict[str, Any] | None:
        return self.stats.get(name)

    @classmethod
    def open(cls, side: str, directory: str | Path, entry: Any, where: str) -> "StreamCapture":
        """A finished capture read from a manifest entry (see :meth:`manifest_entry`) under ``directory``."""
        capture = cls(side, directory)
        directory = capture.directory
        if not isinstance(entry, Mapping):
            raise InputError(f"{where}: manifest 'sides.{side}' must be an object, got {type(entry).__name__}")
        for key, kind in (("layer_order", list), ("shapes", dict), ("dtypes", dict), ("files", dict), ("stats", dict)):
            if key in ("files", "stats") and entry.get(key) is None:
                continue
            if not isinstance(entry.get(key), kind):
                raise InputError(f"{where}: manifest 'sides.{side}.{key}' must be a JSON "
                                 f"{'array' if kind is list else 'object'}, got {type(entry.get(key)).__name__}")
        capture.order = list(entry["layer_order"])
        capture.shapes = {k: tuple(v) for k, v in entry["shapes"].items()}
        capture.dtypes = dict(entry["dtypes"])
        for layer, relative in (entry.get("files") or {}).items():
            inside(directory, relative, f"{where}: {side} tensor of {layer!r}")
            capture.files[layer] = relative
        for layer, relative in (entry.get("stats") or {}).items():
            path = inside(directory, relative, f"{where}: {side} statistics of {layer!r}")
            capture.stats[layer] = load_json(path, f"{where}: {side} statistics of {layer!r}")
        missing = [k for k in capture.order if k not in capture.files and k not in capture.stats]
        if missing:
            raise InputError(f"{where}: {side}: manifest lists layers with neither a tensor nor statistics: {missing[:5]}")
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

    def dump_entry(self, directory: Path, side: str, keep: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
        """The ``manifest.json`` entry of this side in report folder ``directory`` (:func:`parity.dumps.write_dumps`).

        Files already written under ``directory/side`` stay where they are (unless ``keep`` drops
        them); files elsewhere (a bundle, a temporary folder) are hard-linked or copied in.
        Statistics are written there.
        """
        target = Path(directory) / side
        same = self.directory is not None and target.resolve() == self.directory.resolve()
        entry = self.manifest_entry()
        files = {}
        for name, relative in self.files.items():
            if keep is not None and not keep(side, name):
                if same:
                    (target / relative).unlink(missing_ok=True)
                continue
            if not same:
                _link_or_copy(self.directory / relative, target / relative)
            files[name] = f"{side}/{relative}"
        if not same:
            for name in self.stats:
                write_json(target / _stats_file(name), self.stats[name])
        entry["files"] = files
        entry["stats"] = {k: f"{side}/{v}" for k, v in entry["stats"].items()}
        return entry


def _stats_file(layer: str) -> str:
    return layer_file(layer).removesuffix(".npy") + ".stats.json"


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- judging as the MLX side runs ------------------------------------------------------------

class StreamJudge:
    """The MLX capture's sink: judges each arriving MLX tensor against its reference layer(s)."""

    def __init__(self, judge: Judge, ref: StreamCapture, truth: StreamCapture | None,
                 stats_only: StatsPredicate | None = None):
        self.judge, self.ref, self.truth = judge, ref, truth
        self.by_mlx: dict[str, list[tuple[str, str | None]]] = {}
        for name in ref.order:
            if judge.alignment.excluded(name, "ref") is None:
                mlx_name, adapter = judge.alignment.target(name)
                self.by_mlx.setdefault(mlx_name, []).append((name, adapter))
        self.user_stats_only = stats_only or _never
        self.judged: dict[str, LayerResult] = {}
        self.mlx: StreamCapture | None = None

    def stats_only(self, mlx_name: str) -> bool:
        """An MLX layer is stats-only when its reference layer is (or, unmatched, when a glob selects it)."""
        names = self.by_mlx.get(mlx_name)
        if names is None:
            return self.user_stats_only(mlx_name)
        return any(name in self.ref.stats for name, _ in names)

    def capture(self, directory: str | Path | None) -> StreamCapture:
        self.mlx = StreamCapture("mlx", directory, self.stats_only, sink=self)
        return self.mlx

    def __call__(self, mlx_name: str, array: np.ndarray, dtype: str) -> None:
        for name, adapter in self.by_mlx.get(mlx_name, ()):
            self.judged[name] = self.judge.layer(name, mlx_name, self.ref, self.mlx, self.truth, adapter)


def spool_dir(report_dir: Path | None) -> tuple[Path, Any]:
    """Where a streaming run writes its tensors: the report folder, or a temporary folder (returned to keep alive)."""
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        return report_dir, None
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="parity-stream-")
    return Path(tmp.name), tmp
