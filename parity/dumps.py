"""Run folders, atomic writes, ``.npy`` dumps with a manifest.

Layout: ``<out>/<run-id>/<component>-<dtype>/{ref,mlx,truth}/<layer>.npy`` plus ``manifest.json``.
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written file; a run folder is created fresh (a new run never overwrites an old one) and
holds an ``INCOMPLETE`` marker until the run ends, so an interrupted run is listed as such and
never read as a finished one.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from parity.vocab import InputError, inside, json_default, load_npy, strict_json

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
INCOMPLETE = "INCOMPLETE"
#: Dumps larger than this are memory-mapped instead of read.
MMAP_BYTES = 256 << 20


def writable_folder(path: str | Path, option: str) -> Path:
    """``path`` as a folder we can write into, or an :class:`InputError` naming ``option``.

    Checked before anything runs, and without creating anything (a probe file is written and removed
    in the nearest existing folder on the way to it): a bad ``--out``, or any input error found after
    this check, costs nothing and leaves no folder behind. Writers create the folder when they write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file, expected a folder")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{option} {path}: {existing} is a file, expected a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".parity-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    return path


def writable_file(path: str | Path, option: str) -> Path:
    """``path`` as a file we can (over)write atomically: its folder writable, itself not a folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path}: is a folder, expected a file")
    writable_folder(path.parent if str(path.parent) else Path("."), option)
    return path


def new_run_dir(out: str | Path, run_id: str | None = None) -> Path:
    """Create ``out/<run-id>`` (marked incomplete); the id is timestamped and unique, never reused."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    path = out / run_id
    path.mkdir()  # raises FileExistsError rather than overwrite an earlier run
    mark_incomplete(path, "running")
    return path


def mark_incomplete(run_dir: Path, why: str) -> None:
    write_text(run_dir / INCOMPLETE, f"{why} ({datetime.now(timezone.utc).isoformat(timespec='seconds')})\n")


def mark_complete(run_dir: Path) -> None:
    (run_dir / INCOMPLETE).unlink(missing_ok=True)


def incomplete_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` is incomplete (its marker's text), or None for a finished run."""
    marker = run_dir / INCOMPLETE
    if not marker.is_file():
        return None
    return marker.read_text().strip() or "incomplete"


def discard_if_empty(run_dir: Path) -> bool:
    """Remove a run folder that holds no component report (an input error stopped it); True if removed."""
    if run_dir.is_dir() and not any(run_dir.glob("*/report.json")):
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    return False


#: Temporary names are ``.<name>.<pid><token>-<n>.tmp``: unique to this process (a fork's too), no random draw per file.
_TOKEN = secrets.token_hex(3)
_COUNTER = itertools.count()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary name next to it, then rename it into place.

    Four system calls (open, write, close, rename; the folder is made only when missing), new
    files getting the usual permissions (the umask applies).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TOKEN}-{next(_COUNTER)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (no NaN / Infinity): non-finite numbers become null, listed under ``"nonfinite"`` of a top-level object.

    One member per line down to the second level (a report's layer rows: one line each), deeper
    values on their line, each encoded by the standard library's C encoder; only a line holding a
    non-finite number is walked to name it.
    """
    found: dict[str, str] = {}
    if isinstance(data, dict) and data:
        members = {k: _lines(v, 1, str(k), found) for k, v in data.items() if k != "nonfinite"}
        if found or "nonfinite" in data:
            members["nonfinite"] = _lines({**(data.get("nonfinite") or {}), **found}, 1, "nonfinite", {})
        text = _object(members.items(), 0)
    else:
        text = _lines(data, 0, "", found)
    write_text(path, text + "\n")


def _key(key: Any) -> str:
    """An object key as JSON writes it (a string; numbers and booleans as their JSON text)."""
    return json.dumps(key if isinstance(key, str) else json.dumps(key))


def _object(members: Iterable[tuple[Any, str]], depth: int) -> str:
    """A JSON object at ``depth`` from its members' keys and encoded values, one member per line."""
    inner = "  " * (depth + 1)
    return "{\n" + ",\n".join(f"{inner}{_key(k)}: {text}" for k, text in members) + f"\n{'  ' * depth}}}"


def _lines(value: Any, depth: int, path: str, found: dict[str, str]) -> str:
    """``value`` as strict JSON at ``path``; objects, and lists of objects or lists, open one line per member
    above depth 2. Non-finite numbers become null, their paths added to ``found``."""
    if depth < 2 and isinstance(value, dict) and value:
        return _object(((k, _lines(v, depth + 1, f"{path}.{k}" if path else str(k), found)) for k, v in value.items()),
                       depth)
    if depth < 2 and isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in value):
        items = (f"{'  ' * (depth + 1)}{_lines(v, depth + 1, f'{path}[{i}]', found)}" for i, v in enumerate(value))
        return "[\n" + ",\n".join(items) + f"\n{'  ' * depth}]"
    try:
        return json.dumps(value, default=json_default, allow_nan=False)
    except ValueError:  # a NaN or an infinity in it: find and name each
        clean, bad = strict_json(json.loads(json.dumps(value, default=json_default, allow_nan=True)))
        found.update({path + (k if not k or k.startswith("[") or not path else f".{k}"): v for k, v in bad.items()})
        return json.dumps(clean, allow_nan=False)


def layer_file(layer: str) -> str:
    """Relative file path for a layer name: ``/`` keeps nesting, other unsafe characters become ``_``."""
    parts = [_SAFE.sub("_", part) for part in layer.split("/")]
    parts = [p if p not in ("", ".", "..") else "_" for p in parts]
    return "/".join(parts) + ".npy"


def write_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False), mode="wb")


def write_dumps(directory: Path, meta: Mapping[str, Any], captures: Mapping[str, Any],
                keep: Callable[[str, str], bool] | None = None) -> None:
    """Write each captured tensor as ``<side>/<layer>.npy`` and a ``manifest.json`` describing them.

    ``keep(side, layer)`` selects the tensors written (retention: e.g. failing layers only); the
    manifest lists every layer's shape and dtype either way. A streamed capture has its files on
    disk already and describes itself (``dump_entry``).
    """
    sides = {}
    for side, capture in captures.items():
        if capture is None:
            continue
        if hasattr(capture, "dump_entry"):
            sides[side] = capture.dump_entry(directory, side, keep)
            continue
        files = {}
        for layer in capture.order:
            if layer in capture.tensors and (keep is None or keep(side, layer)):
                relative = f"{side}/{layer_file(layer)}"
                write_npy(directory / relative, capture.tensors[layer])
                files[layer] = relative
        sides[side] = {"layer_order": capture.order, "files": files,
                       "shapes": {k: list(v) for k, v in capture.shapes.items()}, "dtypes": capture.dtypes}
    write_json(directory / "manifest.json", {**meta, "sides": sides})


def manifest_files(manifest: Mapping[str, Any], side: str, where: str) -> dict[str, str]:
    """``layer -> relative file`` of one side of a manifest, checked to be a mapping."""
    entry = (manifest.get("sides") or {}).get(side) or {}
    files = entry.get("files") or {}
    if not isinstance(entry, Mapping) or not isinstance(files, Mapping):
        raise InputError(f"{where}: manifest 'sides.{side}.files' must be an object of layer -> file, "
                         f"got {type(files).__name__}")
    return dict(files)


def dump_path(report_dir: Path, manifest: Mapping[str, Any], side: str, layer: str) -> Path:
    """Where a report folder keeps the ``side`` dump of ``layer`` (its manifest's entry, else the default name),
    refused when it points outside the folder."""
    relative = manifest_files(manifest, side, f"report {report_dir}").get(layer) or f"{side}/{layer_file(layer)}"
    return inside(report_dir, relative, f"report {report_dir}: manifest entry of the {side} dump of {layer!r}")


def load_dump(path: Path) -> np.ndarray:
    """A dumped tensor, memory-mapped when large (read-only either way for the caller's purposes)."""
    return load_npy(path, mmap=path.is_file() and path.stat().st_size > MMAP_BYTES)
