"""Run directories, atomic writes, ``.npy`` dumps with a manifest, and safe loading.

Layout: ``<out>/<run-id>/<component>/{ref,mlx,truth}/<layer>.npy`` plus ``manifest.json``.
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file, and a run directory is created fresh: a new run never overwrites an old one.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def new_run_dir(out: str | Path, run_id: str | None = None) -> Path:
    """Create and return ``out/<run-id>``; the id is timestamped and unique, never reused."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    path = out / run_id
    path.mkdir()  # raises FileExistsError rather than overwrite an earlier run
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` through ``write(fileobj)`` into a temp file, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; reports are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_json_default, allow_nan=True) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, tuple)):
        return value.tolist() if isinstance(value, np.ndarray) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def layer_file(layer: str) -> str:
    """Relative file path for a layer name: ``/`` keeps nesting, other unsafe characters become ``_``."""
    parts = [_SAFE.sub("_", part) for part in layer.split("/")]
    parts = [p if p not in ("", ".", "..") else "_" for p in parts]
    return "/".join(parts) + ".npy"


def write_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False), mode="wb")


def load_npy(path: str | Path) -> np.ndarray:
    """Load a dump; a missing, pickled or corrupt file raises ``ValueError`` naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ValueError(f"dump {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt file
        raise ValueError(f"dump {path} is not a valid .npy file: {err}") from None


def load_json(path: str | Path, what: str = "file") -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None
