"""Parity thresholds: defaults per dtype, per component, per layer glob, layered over several files.

Layout of a thresholds file (``parity.toml``, or ``[tool.parity]`` in a ``pyproject.toml``)::

    [defaults.<dtype>]                          # float32 / bfloat16
    [components.<name>.<dtype>]                 # overrides for one component ("wan22_*": a glob)
    [components.<name>.<dtype>.layers."glob"]   # overrides for layers matching a glob (first match wins)

Files are layered: the harness's ``parity.toml`` first, then the user's project file, then a
file given on the command line; a later file overrides an earlier one key by key, and its layer
globs are tried first. A component inherits the tables of the components it subclasses (its
*lineage*, most general first) and overrides them with its own.

Unknown keys, dtypes or components are :class:`ThresholdsError` naming the file, table and key;
so is a layer glob that matches no layer of its component (checked after a run, see
:meth:`Thresholds.unmatched_globs`).
"""
from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from parity.vocab import DTYPES, InputError

DEFAULT_PATH = Path(__file__).resolve().parent / "thresholds.toml"


class ThresholdsError(InputError):
    """A thresholds file is malformed, or names something that does not exist."""


@dataclass(frozen=True)
class Tolerance:
    """Limits for one layer. ``None`` disables a check."""

    atol: float | None = None
    rtol: float | None = None
    cosine_min: float | None = None
    max_rel: float | None = None
    budget_ratio: float | None = None
    rounding_excess: float | None = None
    drift_ratio: float | None = None
    baseline_factor: float | None = None
    # attention maps, per head (parity.attention; judged in parity.compare._check_attention)
    attn_js_mean: float | None = None
    attn_js_max: float | None = None
    attn_topk_min: float | None = None
    attn_entropy_diff: float | None = None
    attn_sparsity_diff: float | None = None
    attn_mass_diff: float | None = None
    attn_dropped: float | None = None
    #: A layer may hold a wider float dtype than the reference's (judged in parity.compare._check_dtype).
    allow_wider_dtype: bool | None = None
    #: Per-layer limits from ``parity calibrate`` (never set in a file): max abs <= this x max|ref|
    #: (float32), budget ratio <= this (bf16); they only ever tighten the limits above.
    calibrated_rel: float | None = None
    calibrated_budget: float | None = None

    def merged(self, override: "Tolerance") -> "Tolerance":
        return replace(self, **{k: v for k, v in vars(override).items() if v is not None})

    def abs_limit(self, ref_max_abs: float) -> float | None:
        """``atol + rtol * max|ref|`` (or the calibrated limit where tighter), or None without any."""
        limits = [self.global_abs_limit(ref_max_abs),
                  self.calibrated_rel * ref_max_abs if self.calibrated_rel is not None else None]
        return min((x for x in limits if x is not None), default=None)

    def global_abs_limit(self, ref_max_abs: float) -> float | None:
        """``atol + rtol * max|ref|``, or None without either."""
        if self.atol is None and self.rtol is None:
            return None
        return (self.atol or 0.0) + (self.rtol or 0.0) * ref_max_abs

    def budget_limit(self) -> float | None:
        """The budget ratio limit: ``budget_ratio``, or the calibrated one where tighter."""
        return min((x for x in (self.budget_ratio, self.calibrated_budget) if x is not None), default=None)

    def applied(self) -> dict[str, float]:
        """The limits that are set, as report data."""
        return {k: v for k, v in vars(self).items() if v is not None}


KEYS = tuple(k for k in Tolerance.__dataclass_fields__ if not k.startswith("calibrated_"))
#: Keys with a lower bound other than 0: a baseline factor below 1 would flag an unchanged run.
MINIMUM = {"baseline_factor": 1.0}
#: Keys with an upper bound: a top-k overlap (a share) above 1 could never be met.
MAXIMUM = {"attn_topk_min": 1.0}
#: Keys that take true or false.
BOOLEAN = ("allow_wider_dtype",)


@dataclass(frozen=True)
class Table:
    """One ``[components.<pattern>.<dtype>]`` table: its overrides and its layer globs, and the file it is in."""

    path: Path
    name: str  # components.<pattern>.<dtype>
    tolerance: Tolerance
    layers: tuple[tuple[str, Tolerance], ...] = ()


@dataclass
class Thresholds:
    paths: list[Path]
    defaults: dict[str, Tolerance]
    #: component pattern -> dtype -> tables, later files first
    components: dict[str, dict[str, list[Table]]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.paths[-1]

    def _tables(self, lineage: Sequence[str], dtype: str) -> list[Table]:
        """Tables applying to a component, most general first: parents before children, globs before names."""
        found: list[Table] = []
        for name in reversed(list(lineage)):
            for exact in (False, True):
                for pattern, per_dtype in self.components.items():
                    if (pattern == name) == exact and fnmatch.fnmatchcase(name, pattern):
                        found += reversed(per_dtype.get(dtype, []))
        return found

    def for_component(self, lineage: str | Sequence[str], dtype: str) -> Tolerance:
        if dtype not in self.defaults:
            raise ThresholdsError(f"{self.path}: no [defaults.{dtype}] table")
        tol = self.defaults[dtype]
        for table in self._tables(_lineage(lineage), dtype):
            tol = tol.merged(table.tolerance)
        return tol

    def for_layer(self, lineage: str | Sequence[str], dtype: str, layer: str) -> Tolerance:
        """The tolerance of ``layer``: dtype default, component tables, then the first matching layer glob."""
        tol = self.for_component(lineage, dtype)
        for table in reversed(self._tables(_lineage(lineage), dtype)):
            for pattern, override in table.layers:
                if fnmatch.fnmatchcase(layer, pattern):
                    return tol.merged(override)
        return tol

    def unmatched_globs(self, lineage: str | Sequence[str], dtype: str, layers: Iterable[str]) -> list[str]:
        """``file: [table] "glob"`` of each layer glob of this component that matches none of ``layers``."""
        names = list(layers)
        return [f"{table.path}: [{table.name}].layers.{pattern!r}" for table in self._tables(_lineage(lineage), dtype)
                for pattern, _ in table.layers if not any(fnmatch.fnmatchcase(n, pattern) for n in names)]

    def check_components(self, known: Iterable[str]) -> None:
        """Every component table of a user's file must name (or, as a glob, match) a registered component
        (the harness's own tables may name components a trimmed install does not register)."""
        known = list(known)
        for pattern, per_dtype in self.components.items():
            paths = [t.path for tables in per_dtype.values() for t in tables if t.path != DEFAULT_PATH.resolve()]
            if paths and not any(fnmatch.fnmatchcase(name, pattern) for name in known):
                raise ThresholdsError(f"{paths[0]}: [components.{pattern}] names an unknown component; "
                                      f"registered: {sorted(known)}")


def _lineage(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ThresholdsError(f"{where}: expected a table, got {value!r}")
    return value


def _tolerance(table: dict[str, Any], where: str, allow: Iterable[str] = ()) -> Tolerance:
    table = _table(table, where)
    values = {}
    for key, value in table.items():
        if key in allow:
            continue
        if key not in KEYS:
            raise ThresholdsError(f"{where}: unknown key {key!r}; expected one of {sorted(KEYS)}")
        if key in BOOLEAN:
            if not isinstance(value, bool):
                raise ThresholdsError(f"{where}.{key}: expected true or false, got {value!r}")
            values[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ThresholdsError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        if value < MINIMUM.get(key, 0):
            raise ThresholdsError(f"{where}.{key}: must be at least {MINIMUM[key]:g}, got {value!r}")
        if value > MAXIMUM.get(key, math.inf):
            raise ThresholdsError(f"{where}.{key}: must be at most {MAXIMUM[key]:g}, got {value!r}")
        values[key] = float(value)
    return Tolerance(**values)


def _read(path: Path) -> dict[str, Any]:
    """The thresholds tables of ``path``: a whole file, or ``[tool.parity]`` of a ``pyproject.toml``."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ThresholdsError(f"thresholds file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ThresholdsError(f"thresholds file {path} cannot be read: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ThresholdsError(f"{path}: not valid TOML: {err}") from None
    if path.name == "pyproject.toml":
        data = (data.get("tool") or {}).get("parity") or {}
    for key in data:
        if key not in ("defaults", "components"):
            raise ThresholdsError(f"{path}: unknown top-level table [{key}]; expected defaults or components")
    return data


def load(paths: str | Path | Sequence[str | Path] | None = None, known_components: Iterable[str] | None = None,
         base: bool = True) -> Thresholds:
    """Parse, validate and layer thresholds files: the harness's ``thresholds.toml`` (unless ``base`` is False), then ``paths``."""
    extra = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = ([DEFAULT_PATH] if base else []) + [Path(p) for p in extra]
    files = list(dict.fromkeys(p.resolve() for p in files))
    thresholds = Thresholds(paths=files, defaults={})
    for path in files:
        data = _read(path)
        for dtype, table in _table(data.get("defaults", {}), f"{path}: [defaults]").items():
            _check_dtype(path, f"defaults.{dtype}", dtype)
            override = _tolerance(table, f"{path}: [defaults.{dtype}]")
            thresholds.defaults[dtype] = thresholds.defaults.get(dtype, Tolerance()).merged(override)
        for name, per_dtype in _table(data.get("components", {}), f"{path}: [components]").items():
            for dtype, table in _table(per_dtype, f"{path}: [components.{name}]").items():
                _check_dtype(path, f"components.{name}.{dtype}", dtype)
                where = f"components.{name}.{dtype}"
                tolerance = _tolerance(table, f"{path}: [{where}]", allow=("layers",))
                globs = table.get("layers", {})
                if not isinstance(globs, dict):
                    raise ThresholdsError(f"{path}: [{where}].layers: expected a table of glob = {{...}}")
                layers = tuple((pattern, _tolerance(sub, f"{path}: [{where}].layers.{pattern!r}"))
                               for pattern, sub in globs.items())
                tables = thresholds.components.setdefault(name, {}).setdefault(dtype, [])
                tables.insert(0, Table(path, where, tolerance, layers))  # later files first
    if known_components is not None:
        thresholds.check_components(known_components)
    return thresholds


def _check_dtype(path: Path, where: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ThresholdsError(f"{path}: [{where}]: unknown dtype {dtype!r}; expected one of {DTYPES}")


def project_file(start: str | Path) -> Path | None:
    """The user's thresholds next to their code: the nearest ``parity.toml``, or a ``pyproject.toml``
    with a ``[tool.parity]`` table, in ``start`` or a parent folder; None when there is none."""
    folder = Path(start).resolve()
    for candidate in (folder, *folder.parents):
        toml = candidate / "parity.toml"
        if toml.is_file():
            return toml
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "[tool.parity" in pyproject.read_text(errors="replace"):
            return pyproject
    return None
