"""The harness's shared vocabulary: dtypes, exit codes, input errors, number formatting, safe paths and files.

Every module that needs one of these takes it from here, so each exists once: the dtype list,
the exit-code contract, the error classes that mean "bad input" (exit 2), how a metric is
printed, the guard that keeps a manifest's paths inside its folder, ``.npy`` loading, and
canonical / strict JSON.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

#: The precisions a comparison runs in; bf16 runs also run the reference in float64 (the truth).
DTYPES = ("float32", "bfloat16")
TRUTH_DTYPE = "float64"
#: Prefix of the layers of a component's second call (:func:`parity.runner.second_call`).
SECOND_CALL = "call2/"
DTYPE_CHOICES = (*DTYPES, "all")

#: Exit codes of every command (README, ``--help``).
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ("exit codes: 0 pass, 1 parity failure, 2 usage or input error, 3 internal error (a bug: "
              "please report it with the traceback), 130 interrupted")


class InputError(ValueError):
    """Bad arguments, files, configs or component definitions: one line on stderr, exit code 2."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UsageError(InputError):
    """Bad command-line arguments."""


def dtypes(value: str) -> list[str]:
    """``"all"`` -> every dtype; a dtype -> [it]; anything else is a :class:`UsageError`."""
    if value == "all":
        return list(DTYPES)
    if value not in DTYPES:
        raise UsageError(f"unknown dtype {value!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return [value]


# --- numbers ----------------------------------------------------------------------------------

def number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def fmt(value: Any, style: str = "g") -> str:
    """A metric as text, the same everywhere (terminal, assertions, JUnit, HTML).

    ``-`` when absent; ``NaN`` / ``inf`` spelled out; ``int``; ``cos``: a cosine with as many
    digits as it takes to differ from 1 (0.9999997 is never shown as 1.000000); ``db``: one
    decimal; ``g``: 3 significant digits (0 as ``0``). Lists and tuples as ``(a, b)``.
    """
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    x = number(value)
    if x is None:
        return "-" if value is None else str(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if style == "int" or isinstance(value, (int, np.integer)):
        return str(int(x))
    if style == "cos":
        if x == 1.0:
            return "1"
        digits = max(7, math.ceil(-math.log10(abs(1.0 - x))) + 2) if abs(1.0 - x) < 1 else 7
        return f"{x:.{digits}f}"
    if style == "db":
        return f"{x:.1f}"
    if x == 0:
        return "0"
    return f"{x:.3g}"


# --- paths and files ----------------------------------------------------------------------------

def inside(folder: str | Path, relative: str, what: str) -> Path:
    """``folder / relative``, refusing a path that leaves ``folder`` (``..``, absolute paths, links out)."""
    folder = Path(folder)
    path = (folder / relative).resolve()
    if folder.resolve() not in path.parents:
        raise InputError(f"{what}: points outside {folder}: {relative!r}")
    return path


def load_npy(path: str | Path, mmap: bool = False) -> np.ndarray:
    """Load an ``.npy`` dump (never a pickle); a missing or corrupt file is an :class:`InputError` naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise InputError(f"{path} is not a valid .npy file: {err}") from None


def load_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file; missing or malformed is an :class:`InputError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} {path} is not valid JSON: {err}") from None


# --- JSON ---------------------------------------------------------------------------------------

def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays, tuples, paths and pydantic models."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple, set, frozenset)):
        return list(value.tolist() if isinstance(value, np.ndarray) else value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def canonical_json(value: Any) -> str:
    """One text per value (sorted keys, no spaces): for fingerprints and equality of configs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=json_default)


def strict_json(data: Any) -> tuple[Any, dict[str, str]]:
    """``data`` with every NaN / +-inf replaced by None, and ``{json path: "nan" | "inf" | "-inf"}`` of them.

    ``report.json`` must parse everywhere (``JSON.parse`` rejects ``Infinity``); the map says why a
    value is null, e.g. ``{"layers[3].snr_db": "inf"}`` for two identical tensors.
    """
    found: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            found[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, np.ndarray):
            return clean(value.tolist(), path)
        if isinstance(value, np.generic):
            return clean(value.item(), path)
        return value

    return clean(data, ""), found


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def restore_nonfinite(data: Any, found: dict[str, str]) -> Any:
    """Put back into ``data`` the non-finite numbers :func:`strict_json` replaced (``found``: its map)."""
    for path, kind in found.items():
        keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        target = data
        try:
            for key in keys[:-1]:
                target = target[key]
            if target[keys[-1]] is None:
                target[keys[-1]] = _NONFINITE[kind]
        except (KeyError, IndexError, TypeError):
            continue  # a map that does not fit the data: leave the nulls
    return data
