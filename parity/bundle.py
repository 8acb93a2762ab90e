"""Portable reference bundles: run the PyTorch reference once, compare the MLX side anywhere.

``parity dump-ref COMPONENT --out BUNDLE`` runs only the reference and writes a bundle::

    BUNDLE/manifest.json          format, component, dtype, seed, config (+ sha256), weights and
                                  inputs fingerprints, captured layers, versions, git commit
    BUNDLE/inputs/<name>.npy      the inputs both sides are fed
    BUNDLE/weights.safetensors    the weights (random init: always; a checkpoint: when small)
    BUNDLE/ref/<layer>.npy        every captured reference tensor (stats-only layers: .stats.json)
    BUNDLE/truth/<layer>.npy      bfloat16 bundles: the float64 truth too

``parity compare COMPONENT --ref-bundle BUNDLE`` runs only the MLX side on the bundle's inputs
and weights, streaming (each layer judged as it arrives against the bundle's tensor), and writes
the same report as ``parity run``: the component's views are computed, its extra runs (which
need the reference model) are listed as not available. PyTorch and diffusers are not needed. A
bundle made for another component, config, weights or inputs, or whose files do not match its
manifest (shapes, fingerprints, paths outside the bundle), is refused (exit code 2).

Fingerprints are sha256 digests: of the config as canonical JSON; of a state dict / the inputs
over the sorted keys, each key followed by NUL, the numpy dtype string, the shape, NUL and the
array's bytes.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from parity import calibration, registry
from parity import thresholds as thresholds_mod
from parity.compare import Comparison, Judge, compare
from parity.component import Component, RunContext, Section
from parity.dumps import new_run_dir, write_json, write_npy, writable_folder
from parity.progress import SILENT, Progress
from parity.runner import (check_dtype, explanation, finish_run, git_commit, judge_for, prepare, run_meta,
                           run_reference, run_sides, sections, versions)
from parity.streaming import StreamCapture, spool_dir, stats_predicate
from parity.vocab import InputError, canonical_json, inside, load_json, load_npy
from parity.weights import read_checkpoint, select_prefix

FORMAT = "parity-reference-bundle"
FORMAT_VERSION = 2
#: Checkpoint weights larger than this are left out of a bundle (only their fingerprint is kept).
DEFAULT_MAX_WEIGHTS_MB = 512


class BundleMismatch(InputError):
    """A bundle that does not fit the comparison asked for, or whose files do not match its manifest."""


# --- fingerprints ---------------------------------------------------------------------------------

def arrays_fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the sorted keys: key, NUL, dtype, shape, NUL, bytes (see the module docstring)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(key.encode())
        digest.update(b"\0")
        digest.update(array.dtype.str.encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(b"\0")
        digest.update(array.reshape(-1).view(np.uint8).data if array.size else b"")
    return digest.hexdigest()


weights_fingerprint = arrays_fingerprint


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def _safe_input(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# --- dump-ref -------------------------------------------------------------------------------------

def dump_reference(
    name: str | Component,
    out: str | Path,
    dtype: str = "float32",
    seed: int = 0,
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    stats_only: Sequence[str] | None = None,
    max_weights_mb: float = DEFAULT_MAX_WEIGHTS_MB,
    overrides: Mapping[str, Any] | None = None,
    progress: Progress = SILENT,
    inputs: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Run only the reference of a component and write a bundle at ``out`` (which must not exist, or be empty);
    on ``inputs`` when given (``parity mutate``'s bundle of the second call), else on the component's own."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out {out}: exists and is not an empty folder; a bundle is never overwritten")
    writable_folder(out.parent, f"--out {out}: its folder")
    setup = prepare(name, dtype, seed, config_path, weights_path, overrides, mlx=False, progress=progress)
    if inputs is not None:
        setup.inputs = dict(inputs)
    comp = setup.component
    weights = comp.reference_weights(setup.reference)
    nbytes = sum(int(np.asarray(v).nbytes) for v in weights.values())
    include = bool(weights) and (not weights_path or nbytes <= max_weights_mb * 2**20)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        for key, value in setup.inputs.items():
            write_npy(tmp / "inputs" / f"{_safe_input(key)}.npy", np.asarray(value))
        if include:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        keep = stats_predicate(stats_only)
        sides: dict[str, StreamCapture] = {}
        for side, side_dtype in ([("truth", "float64")] if dtype != "float32" else []) + [("ref", dtype)]:
            progress.step(f"[{setup.name} {dtype}] reference in {side_dtype}")
            sides[side] = StreamCapture(side, tmp / side, keep)
            crash = run_reference(setup, side_dtype, sides[side])
            if crash:
                raise InputError(f"{comp.name}: the reference crashed in {side_dtype} after "
                                 f"{crash.after or 'no layer'}: {crash.error}; no bundle written")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "component": comp.name,
            "dtype": dtype,
            "seed": seed,
            "config": setup.config.to_dict(),
            "config_sha256": config_fingerprint(setup.config.to_dict()),
            "weights": {
                "source": setup.weights_source,
                "sha256": arrays_fingerprint(weights),
                "file": "weights.safetensors" if include else None,
                "count": len(weights),
                "nbytes": nbytes,
                "prefix": comp.weights_prefix,
            },
            "inputs": {k: {"file": f"inputs/{_safe_input(k)}.npy", "dtype": str(np.asarray(v).dtype),
                           "shape": list(np.shape(v))} for k, v in setup.inputs.items()},
            "inputs_sha256": arrays_fingerprint({k: np.asarray(v) for k, v in setup.inputs.items()}),
            "stats_only": list(stats_only or []),
            "sides": {side: capture.manifest_entry() for side, capture in sides.items()},
            "versions": versions(),
            "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - setup.started, 3),
        }
        write_json(tmp / "manifest.json", manifest)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.step(f"[{setup.name} {dtype}] reference bundle: {out} ({len(sides['ref'].order)} layers"
                  f"{', weights included' if include else ', weights fingerprint only' if weights else ''})")
    return out


# --- compare --------------------------------------------------------------------------------------

def read_manifest(bundle: str | Path) -> dict[str, Any]:
    """The bundle's manifest, checked to be one of ours and well-formed."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleMismatch(f"--ref-bundle {bundle}: not a folder")
    manifest = load_json(bundle / "manifest.json", "bundle manifest")
    where = f"bundle {bundle}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleMismatch(f"{bundle} is not a reference bundle (made by `parity dump-ref`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleMismatch(f"{where} has bundle format version {manifest.get('format_version')}; "
                             f"this harness reads version {FORMAT_VERSION} (make it again with `parity dump-ref`)")
    for key, kind in (("component", str), ("dtype", str), ("seed", int), ("config", dict), ("config_sha256", str),
                      ("weights", dict), ("inputs", dict), ("inputs_sha256", str), ("sides", dict)):
        if not isinstance(manifest.get(key), kind):
            raise BundleMismatch(f"{where}: manifest key {key!r} missing or not a {kind.__name__}")
    for name, entry in manifest["inputs"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("shape"), list):
            raise BundleMismatch(f"{where}: manifest inputs[{name!r}] must be an object with 'file' and 'shape'")
    return manifest


def _config_difference(ours: Mapping[str, Any], theirs: Mapping[str, Any], prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _config_difference(a, b, f"{prefix}{key}.")
        elif canonical_json({"v": a}) != canonical_json({"v": b}):
            found.append(f"{prefix}{key}: ours {a!r}, bundle {b!r}")
    return found


def _bundle_inputs(bundle: Path, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    inputs = {}
    for name, entry in manifest["inputs"].items():
        path = inside(bundle, entry["file"], f"bundle {bundle}: input {name!r}")
        array = load_npy(path)
        if list(array.shape) != list(entry["shape"]) or str(array.dtype) != entry.get("dtype", str(array.dtype)):
            raise BundleMismatch(f"bundle {bundle}: input file {entry['file']} holds {array.dtype} {list(array.shape)}, "
                                 f"the manifest says {entry.get('dtype')} {entry['shape']}")
        inputs[name] = array
    if arrays_fingerprint(inputs) != manifest["inputs_sha256"]:
        raise BundleMismatch(f"bundle {bundle}: its inputs do not match their fingerprint (edited or corrupt)")
    return inputs


@dataclass
class OpenBundle:
    """A reference bundle checked against the comparison asked for: what the MLX side needs and the stored sides."""

    path: Path
    manifest: dict[str, Any]
    component: Component
    dtype: str
    config: Any
    weights: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    ref: StreamCapture
    truth: StreamCapture | None


def open_bundle(
    name: str | Component,
    bundle: str | Path,
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    use_bundle_config: bool = False,
) -> OpenBundle:
    """Read and check a bundle for ``name``; a mismatch is a :class:`BundleMismatch` naming what differs (see
    :func:`compare_bundle`)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    comp = registry.get(name)
    if manifest["component"] != comp.name:
        raise BundleMismatch(f"bundle {bundle} holds the reference of component {manifest['component']!r}, "
                             f"not {comp.name!r}")
    dtype = check_dtype(manifest["dtype"])
    if config_fingerprint(manifest["config"]) != manifest["config_sha256"]:
        raise BundleMismatch(f"bundle {bundle}: its config does not match its own fingerprint (edited or corrupt)")
    if use_bundle_config:
        config = comp.config_model.model_validate(manifest["config"])
    else:
        config = comp.load_config(config_path)
        if config_fingerprint(config.to_dict()) != manifest["config_sha256"]:
            diff = _config_difference(config.to_dict(), manifest["config"])
            raise BundleMismatch(
                f"bundle {bundle} was made with another {comp.name} config ({'; '.join(diff[:6]) or 'see manifest'}"
                f"{'; ...' if len(diff) > 6 else ''}); pass the matching --config, --use-bundle-config, "
                "or make a new bundle with `parity dump-ref`")
    weights = _bundle_weights(bundle, manifest, comp, weights_path)
    inputs = _bundle_inputs(bundle, manifest)
    sides = manifest["sides"]
    if "ref" not in sides:
        raise BundleMismatch(f"bundle {bundle} holds no reference tensors")
    if dtype != "float32" and "truth" not in sides:
        raise BundleMismatch(f"bundle {bundle} is {dtype} but lacks the float64 truth")
    where = f"bundle {bundle}"
    ref = StreamCapture.open("ref", bundle / "ref", sides["ref"], where)
    truth = StreamCapture.open("truth", bundle / "truth", sides["truth"], where) if "truth" in sides else None
    return OpenBundle(bundle, manifest, comp, dtype, config, weights, inputs, ref, truth)


@dataclass
class BundleRun:
    """The MLX side run against an open bundle and judged: its setup, captures, judge, comparison (with views),
    context, and what the report says of the calibration the judge used."""

    setup: Any
    sides: Any
    judge: Judge
    comparison: Comparison
    context: RunContext
    calibrated: dict[str, Any] | None


def run_against(opened: OpenBundle, thresholds: Any, spool: Path, spool_owner: Any = None, keep_mlx: bool = True,
                progress: Progress = SILENT, calibration_dir: str | Path | None = calibration.DEFAULT_DIR) -> BundleRun:
    """Run the MLX side on the bundle's inputs and weights, streaming into ``spool``, judge it (with the
    calibration in ``calibration_dir`` that fits, as a run does) and add the views."""
    comp, dtype = opened.component, opened.dtype
    setup = prepare(comp, dtype, opened.manifest["seed"], reference=False, weights=opened.weights,
                    config=opened.config, progress=progress)
    setup.inputs = opened.inputs
    setup.weights_source = opened.manifest["weights"]["source"]
    judge, calibrated = judge_for(setup, thresholds, calibration_dir)
    progress.step(f"[{comp.name} {dtype}] MLX against reference bundle {opened.path}")
    sides = run_sides(setup, judge, streaming=True, spool=spool, stats_only=opened.manifest.get("stats_only"),
                      ref=opened.ref, truth=opened.truth, keep_mlx=keep_mlx or comp.has_views(), progress=progress)
    comparison = compare(comp.name, dtype, opened.ref, sides.mlx, thresholds, judge.alignment, opened.truth,
                         sides.judged, sides.crashes[0] if sides.crashes else None, judge.lineage,
                         calibrated=judge.calibrated, key_groups=judge.key_groups)
    context = RunContext(comp, opened.config, opened.manifest["seed"], dtype, opened.inputs, None, setup.mlx_model,
                         opened.ref, sides.mlx, opened.truth, thresholds,
                         extra={"ref_bundle": str(opened.path), "spool": spool_owner}, comparison=comparison)
    comparison.sections = sections(setup, context, bool(sides.crashes), extra_runs=False)
    if comp.has_extra_runs():
        note = "not computed from a reference bundle: it runs the reference model, which is not here"
        comparison.sections.append(Section("extra_runs", f"{comp.name} extra runs (drift, ...)", "table",
                                           {"columns": ["note"], "rows": [[note]]}, None, None, note))
    return BundleRun(setup, sides, judge, comparison, context, calibrated)


def compare_bundle(
    name: str | Component,
    bundle: str | Path,
    out_dir: str | Path | None = "reports",
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    use_bundle_config: bool = False,
    thresholds: Any = None,
    run_dir: Path | None = None,
    progress: Progress = SILENT,
):
    """Compare the MLX side against a reference bundle; returns a ``parity.runner.RunResult``.

    Our config (the component's default, or ``config_path``) must be the bundle's, unless
    ``use_bundle_config``; the weights (the bundle's own, or ``weights_path``) must match the
    bundle's fingerprint, and its inputs theirs. Otherwise :class:`BundleMismatch` names what differs.
    """
    opened = open_bundle(name, bundle, config_path, weights_path, use_bundle_config)
    comp, dtype = opened.component, opened.dtype
    thresholds = thresholds or thresholds_mod.load()
    created = run_dir is None and out_dir is not None
    if out_dir is not None:
        run_dir = run_dir or new_run_dir(writable_folder(out_dir, "--out"))
    report_dir = run_dir / f"{comp.name}-{dtype}" if out_dir is not None else None
    spool, tmp = spool_dir(report_dir)
    try:
        run = run_against(opened, thresholds, spool, tmp, keep_mlx=report_dir is not None, progress=progress)
        meta = run_meta(run.setup, thresholds, run.sides.crashes, run.calibrated)
        meta["second_call"] = "not made: a reference bundle holds the reference's first call only"
        meta["explanation"] = explanation(run.setup, run.judge, run.comparison, run.context, progress)  # tensor hypotheses
        manifest = opened.manifest
        meta["ref_bundle"] = {"path": str(opened.path), "created": manifest.get("created"),
                              "versions": manifest.get("versions"), "git_commit": manifest.get("git_commit")}
        result = finish_run(run.comparison, run.context, meta, run_dir, report_dir, progress=progress)
    except BaseException:
        if report_dir is not None:
            shutil.rmtree(run_dir if created else report_dir, ignore_errors=True)
        raise
    if created:
        from parity.dumps import mark_complete

        mark_complete(run_dir)
    return result


def _bundle_weights(bundle: Path, manifest: Mapping[str, Any], comp: Component,
                    weights_path: str | Path | None) -> dict[str, np.ndarray]:
    info = manifest["weights"]
    expected = info.get("sha256")
    if weights_path:
        weights = select_prefix(read_checkpoint(weights_path), comp.weights_prefix)
        if arrays_fingerprint(weights) != expected:
            raise BundleMismatch(f"weights {weights_path} are not the bundle's (fingerprint "
                                 f"{arrays_fingerprint(weights)[:12]} vs bundle {str(expected)[:12]}, "
                                 f"made from {info.get('source')})")
        return weights
    if info.get("file"):
        weights = read_checkpoint(inside(bundle, info["file"], f"bundle {bundle}: weights"))
        if arrays_fingerprint(weights) != expected:
            raise BundleMismatch(f"bundle {bundle}: weights.safetensors does not match the weights fingerprint (corrupt?)")
        return weights
    if info.get("count"):
        raise BundleMismatch(f"bundle {bundle} holds only the fingerprint of its weights ({info.get('source')}); "
                             "pass them with --weights")
    if arrays_fingerprint({}) != expected:
        raise BundleMismatch(f"bundle {bundle}: weights fingerprint does not match an empty state dict")
    return {}
