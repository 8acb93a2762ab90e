"""Parity thresholds from ``parity.toml``: defaults per dtype, per component, per layer glob.

Layout::

    [defaults.<dtype>]                       # float32 / bfloat16
    [components.<name>.<dtype>]              # overrides for one component
    [components.<name>.<dtype>.layers."glob"]  # overrides for layers matching a glob

Unknown keys, dtypes or components raise :class:`ThresholdsError` naming the table and key.
"""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "parity.toml"
DTYPES = ("float32", "bfloat16")


class ThresholdsError(ValueError):
    """The thresholds file is malformed."""


@dataclass(frozen=True)
class Tolerance:
    """Limits for one layer. ``None`` disables a check."""

    atol: float | None = None
    rtol: float | None = None
    cosine_min: float | None = None
    max_rel: float | None = None
    budget_ratio: float | None = None
    drift_ratio: float | None = None
    baseline_factor: float | None = None


KEYS = {f for f in Tolerance.__dataclass_fields__}
#: Keys with a lower bound other than 0: a baseline factor below 1 would flag an unchanged run.
MINIMUM = {"baseline_factor": 1.0}


@dataclass
class Thresholds:
    path: Path
    defaults: dict[str, Tolerance]
    components: dict[str, dict[str, Tolerance]] = field(default_factory=dict)
    layers: dict[str, dict[str, list[tuple[str, Tolerance]]]] = field(default_factory=dict)

    def for_layer(self, component: str, dtype: str, layer: str) -> Tolerance:
        """The tolerance of ``layer``: dtype default, then component override, then first matching glob."""
        tol = self.for_component(component, dtype)
        for pattern, override in self.layers.get(component, {}).get(dtype, []):
            if fnmatch.fnmatchcase(layer, pattern):
                tol = _merge(tol, override)
                break
        return tol

    def for_component(self, component: str, dtype: str) -> Tolerance:
        if dtype not in self.defaults:
            raise ThresholdsError(f"{self.path}: no [defaults.{dtype}] table")
        return _merge(self.defaults[dtype], self.components.get(component, {}).get(dtype, Tolerance()))


def _merge(base: Tolerance, override: Tolerance) -> Tolerance:
    return replace(base, **{k: v for k, v in vars(override).items() if v is not None})


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ThresholdsError(f"{where}.{key}: expected a non-negative number, got {value!r}")
        if value < MINIMUM.get(key, 0):
            raise ThresholdsError(f"{where}.{key}: must be at least {MINIMUM[key]:g}, got {value!r}")
        values[key] = float(value)
    return Tolerance(**values)


def load(path: str | Path | None = None, known_components: Iterable[str] | None = None) -> Thresholds:
    """Parse and validate a thresholds file (the repository's ``parity.toml`` by default)."""
    path = Path(path) if path else DEFAULT_PATH
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ThresholdsError(f"thresholds file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ThresholdsError(f"{path}: not valid TOML: {err}") from None
    for key in data:
        if key not in ("defaults", "components"):
            raise ThresholdsError(f"{path}: unknown top-level table [{key}]; expected defaults or components")
    defaults = {}
    for dtype, table in _table(data.get("defaults", {}), f"{path}: [defaults]").items():
        _check_dtype(path, f"defaults.{dtype}", dtype)
        defaults[dtype] = _tolerance(table, f"{path}: [defaults.{dtype}]")
    known = set(known_components) if known_components is not None else None
    components: dict[str, dict[str, Tolerance]] = {}
    layers: dict[str, dict[str, list[tuple[str, Tolerance]]]] = {}
    for name, per_dtype in _table(data.get("components", {}), f"{path}: [components]").items():
        if known is not None and name not in known:
            raise ThresholdsError(f"{path}: [components.{name}] names an unknown component; known: {sorted(known)}")
        for dtype, table in _table(per_dtype, f"{path}: [components.{name}]").items():
            _check_dtype(path, f"components.{name}.{dtype}", dtype)
            where = f"{path}: [components.{name}.{dtype}]"
            components.setdefault(name, {})[dtype] = _tolerance(table, where, allow=("layers",))
            globs = table.get("layers", {})
            if not isinstance(globs, dict):
                raise ThresholdsError(f"{where}.layers: expected a table of glob = {{...}}")
            layers.setdefault(name, {})[dtype] = [
                (pattern, _tolerance(sub, f"{where}.layers.{pattern!r}")) for pattern, sub in globs.items()
            ]
    return Thresholds(path=path, defaults=defaults, components=components, layers=layers)


def _check_dtype(path: Path, where: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ThresholdsError(f"{path}: [{where}]: unknown dtype {dtype!r}; expected one of {DTYPES}")
