"""Portable reference bundles: run the PyTorch reference once, compare our MLX side anywhere.

``parity dump-ref COMPONENT --out BUNDLE`` runs only the reference and writes a bundle::

    BUNDLE/manifest.json          format, component, dtype, seed, config (+ sha256), weights
                                  fingerprint, inputs, captured layers, versions, git commit
    BUNDLE/inputs/<name>.npy      the inputs both sides are fed
    BUNDLE/weights.safetensors    the weights (random init: always; a checkpoint: when small)
    BUNDLE/ref/<layer>.npy        every captured reference tensor (stats-only layers: .stats.json)
    BUNDLE/truth/<layer>.npy      bfloat16 bundles: the float64 truth too

``parity compare COMPONENT --ref-bundle BUNDLE`` runs only our MLX side on the bundle's inputs
and weights, streaming (each layer judged as it arrives against the bundle's tensor), and
writes the same report as ``parity run``. PyTorch and diffusers are not needed (the component's
module must not import torch at import time). A bundle made for another component, config or
weights is refused (exit code 2).

The weights fingerprint is a sha256 over the sorted keys; for each key: the key, a NUL, the
numpy dtype string, the shape, a NUL and the array's bytes (the float32 state dict the MLX side
is built from). The config fingerprint is a sha256 of the config as canonical JSON.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import secrets
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from parity import component as registry
from parity.component import DTYPES, Component, RunContext, Section
from parity.dumps import load_json, load_npy, new_run_dir, write_json, write_npy

FORMAT = "parity-reference-bundle"
FORMAT_VERSION = 1
#: Checkpoint weights larger than this are left out of a bundle (only their fingerprint is kept).
DEFAULT_MAX_WEIGHTS_MB = 512
EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class BundleMismatch(ValueError):
    """A bundle that does not fit the comparison asked for (another component, config or weights)."""


# --- fingerprints --------------------------------------------------------------------------------

def weights_fingerprint(weights: dict[str, np.ndarray]) -> str:
    """sha256 over the sorted keys: key, NUL, dtype, shape, NUL, bytes (see the module docstring)."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        array = np.ascontiguousarray(weights[key])
        digest.update(key.encode())
        digest.update(b"\0")
        digest.update(array.dtype.str.encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(b"\0")
        digest.update(array.reshape(-1).view(np.uint8).data if array.size else b"")
    return digest.hexdigest()


def config_fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- components without torch --------------------------------------------------------------------

def load_component(name: str) -> Component:
    """The component ``name``, importing only its own module when it is named after it.

    The registry imports every component module; one that imports torch at import time would
    make a comparison without torch impossible for all of them.
    """
    if name.isidentifier():
        module_name = f"parity.components.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                return registry.get(name)
            if err.name in ("torch", "diffusers"):
                raise BundleMismatch(
                    f"component {name!r} imports {err.name} when its module ({module_name}) is imported, "
                    f"so it cannot run without {err.name}; import it inside run_reference/build_reference instead"
                ) from None
            raise
        component = getattr(module, "COMPONENT", None)
        if isinstance(component, Component) and component.name == name:
            return component
    return registry.get(name)


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint as float32/float64 numpy arrays, like ``parity.weights.read_checkpoint``, without torch if need be.

    With torch importable this *is* ``read_checkpoint``. Without it, ``.safetensors`` files (or a
    folder of them) are read with safetensors' numpy API, or MLX for bfloat16 tensors.
    """
    from parity.weights import read_checkpoint

    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        return read_checkpoint(path)
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no *.safetensors checkpoint")
    state: dict[str, np.ndarray] = {}
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"checkpoint {file} does not exist")
        if file.suffix != ".safetensors":
            raise ValueError(f"checkpoint {file}: without torch only .safetensors checkpoints can be read")
        state.update(_read_safetensors(file))
    return state


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(file))
    except Exception:  # noqa: BLE001 - numpy has no bfloat16; MLX reads it
        import mlx.core as mx

        try:
            loaded = mx.load(str(file))
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"checkpoint {file} could not be read: {err}") from err
        tensors = {}
        for key, value in loaded.items():
            if mx.issubdtype(value.dtype, mx.floating) and value.dtype != mx.float32:
                value = value.astype(mx.float32)
            tensors[key] = np.array(value)
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" and v.dtype.itemsize < 4 else v) for k, v in tensors.items()}


# --- dump-ref ------------------------------------------------------------------------------------

def dump_reference(
    name: str | Component,
    out: str | Path,
    dtype: str = "float32",
    seed: int = 0,
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    stats_only: Sequence[str] | None = None,
    max_weights_mb: float = DEFAULT_MAX_WEIGHTS_MB,
    overrides: dict[str, Any] | None = None,
    progress: Any = None,
) -> Path:
    """Run only the reference of a component and write a bundle at ``out`` (which must not exist, or be empty)."""
    from parity import streaming
    from parity.runner import git_commit, versions
    from parity.weights import select_prefix

    comp = load_component(name) if isinstance(name, str) else name
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    say = progress or (lambda _m: None)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; a bundle is never overwritten")
    started = time.perf_counter()
    config = {**comp.load_config(config_path), **(overrides or {})}

    say(f"[{comp.name} {dtype}] building the reference")
    if weights_path:
        weights = select_prefix(read_weights(weights_path), comp.weights_prefix)
        reference = comp.load_reference(config, weights)
        source = str(weights_path)
    else:
        reference = comp.build_reference(config, seed)
        weights = comp.reference_weights(reference)
        source = f"random init, seed {seed}"
    inputs = comp.make_inputs(config, seed)
    nbytes = sum(int(np.asarray(v).nbytes) for v in weights.values())
    include = bool(weights) and (not weights_path or nbytes <= max_weights_mb * 2**20)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(3)}"
    tmp.mkdir()
    try:
        for key, value in inputs.items():
            write_npy(tmp / "inputs" / f"{_safe_input(key)}.npy", np.asarray(value))
        if include:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        keep = streaming.stats_predicate(stats_only)
        sides = {}
        if dtype != "float32":
            say(f"[{comp.name} {dtype}] reference in float64 (truth)")
            sides["truth"] = streaming.run_reference_side(comp, reference, inputs, "float64", tmp / "truth", keep)
        say(f"[{comp.name} {dtype}] reference in {dtype}")
        sides["ref"] = streaming.run_reference_side(comp, reference, inputs, dtype, tmp / "ref", keep)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "component": comp.name,
            "dtype": dtype,
            "seed": seed,
            "config": config,
            "config_sha256": config_fingerprint(config),
            "weights": {
                "source": source,
                "sha256": weights_fingerprint(weights),
                "file": "weights.safetensors" if include else None,
                "count": len(weights),
                "nbytes": nbytes,
                "prefix": comp.weights_prefix,
            },
            "inputs": {k: {"file": f"inputs/{_safe_input(k)}.npy", "dtype": str(np.asarray(v).dtype),
                           "shape": list(np.shape(v))} for k, v in inputs.items()},
            "stats_only": list(stats_only or []),
            "sides": {side: capture.manifest_entry() for side, capture in sides.items()},
            "versions": versions(),
            "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json(tmp / "manifest.json", manifest)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"[{comp.name} {dtype}] reference bundle: {out} ({len(sides['ref'].order)} layers"
        f"{', weights included' if include else ', weights fingerprint only' if weights else ''})")
    return out


def _safe_input(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


# --- compare -------------------------------------------------------------------------------------

def read_manifest(bundle: str | Path) -> dict[str, Any]:
    bundle = Path(bundle)
    manifest = load_json(bundle / "manifest.json", "bundle manifest")
    if manifest.get("format") != FORMAT:
        raise BundleMismatch(f"{bundle} is not a reference bundle (made by `parity dump-ref`)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleMismatch(f"{bundle} has bundle format version {manifest.get('format_version')}; "
                             f"this harness reads version {FORMAT_VERSION}")
    return manifest


def _config_difference(ours: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(ours) | set(theirs))
    found = []
    for key in keys:
        a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += _config_difference(a, b, f"{prefix}{key}.")
        elif _canonical({"v": a}) != _canonical({"v": b}):
            found.append(f"{prefix}{key}: ours {a!r}, bundle {b!r}")
    return found


def compare_bundle(
    name: str | Component,
    bundle: str | Path,
    out_dir: str | Path | None = "reports",
    config_path: str | Path | None = None,
    weights_path: str | Path | None = None,
    use_bundle_config: bool = False,
    thresholds: Any = None,
    run_dir: Path | None = None,
    progress: Any = None,
):
    """Compare our MLX side against a reference bundle; returns a ``parity.runner.RunResult``.

    Our config (the component's default, or ``config_path``) must be the bundle's, unless
    ``use_bundle_config``; the weights (the bundle's own, or ``weights_path``) must match the
    bundle's fingerprint. Otherwise :class:`BundleMismatch` names what differs.
    """
    from parity import streaming
    from parity import thresholds as thresholds_mod
    from parity.compare import compare
    from parity.runner import finish_run, run_meta
    from parity.weights import select_prefix

    started = time.perf_counter()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    wanted = name if isinstance(name, str) else name.name
    if manifest["component"] != wanted:
        raise BundleMismatch(f"bundle {bundle} holds the reference of component {manifest['component']!r}, "
                             f"not {wanted!r}")
    comp = load_component(wanted) if isinstance(name, str) else name
    dtype = manifest["dtype"]
    say = progress or (lambda _m: None)
    thresholds = thresholds or thresholds_mod.load()

    if use_bundle_config:
        config = manifest["config"]
    else:
        config = comp.load_config(config_path)
        if config_fingerprint(config) != manifest["config_sha256"]:
            diff = _config_difference(config, manifest["config"])
            raise BundleMismatch(
                f"bundle {bundle} was made with another {comp.name} config ({'; '.join(diff[:6]) or 'see manifest'}"
                f"{'; ...' if len(diff) > 6 else ''}); pass the matching --config, --use-bundle-config, "
                "or make a new bundle with `parity dump-ref`")
    if config_fingerprint(manifest["config"]) != manifest["config_sha256"]:
        raise BundleMismatch(f"bundle {bundle}: its config does not match its own fingerprint (edited or corrupt)")

    expected = manifest["weights"]["sha256"]
    if weights_path:
        weights = select_prefix(read_weights(weights_path), comp.weights_prefix)
        if weights_fingerprint(weights) != expected:
            raise BundleMismatch(f"weights {weights_path} are not the bundle's (fingerprint {weights_fingerprint(weights)[:12]} "
                                 f"vs bundle {expected[:12]}, made from {manifest['weights']['source']})")
    elif manifest["weights"]["file"]:
        weights = _read_safetensors(bundle / manifest["weights"]["file"])
        if weights_fingerprint(weights) != expected:
            raise BundleMismatch(f"bundle {bundle}: weights.safetensors does not match the weights fingerprint (corrupt?)")
    elif manifest["weights"]["count"]:
        raise BundleMismatch(f"bundle {bundle} holds only the fingerprint of its weights "
                             f"({manifest['weights']['source']}); pass them with --weights")
    else:
        weights = {}
        if weights_fingerprint(weights) != expected:
            raise BundleMismatch(f"bundle {bundle}: weights fingerprint does not match an empty state dict")
    inputs = {k: load_npy(bundle / _inside(bundle, v["file"])) for k, v in manifest["inputs"].items()}
    sides = manifest.get("sides") or {}
    if "ref" not in sides:
        raise BundleMismatch(f"bundle {bundle} holds no reference tensors")
    if dtype != "float32" and "truth" not in sides:
        raise BundleMismatch(f"bundle {bundle} is {dtype} but lacks the float64 truth")
    ref = streaming.StreamCapture.open("ref", bundle / "ref", sides["ref"])
    truth = streaming.StreamCapture.open("truth", bundle / "truth", sides["truth"]) if "truth" in sides else None

    say(f"[{comp.name} {dtype}] building MLX from the bundle's weights")
    mlx_model = comp.build_mlx(config, weights, dtype)
    del weights
    report_dir = None
    created_run_dir = out_dir is not None and run_dir is None
    if out_dir is not None:
        run_dir = run_dir or new_run_dir(out_dir)
        report_dir = run_dir / f"{comp.name}-{dtype}"
    spool, tmp = streaming.spool_dir(report_dir)
    say(f"[{comp.name} {dtype}] MLX in {dtype} against reference bundle {bundle}")
    keep_mlx = report_dir is not None or streaming.needs_mlx_tensors(comp)
    try:
        mlx, judged = streaming.run_mlx_side(comp, mlx_model, inputs, dtype, ref, truth, thresholds,
                                             spool / "mlx" if keep_mlx else None,
                                             streaming.stats_predicate(manifest.get("stats_only")))
    except BaseException:
        if report_dir is not None:
            shutil.rmtree(run_dir if created_run_dir else report_dir, ignore_errors=True)
        raise
    streaming.keep_alive([mlx], tmp)
    comparison = compare(comp.name, dtype, ref, mlx, thresholds, comp.alignment, truth, judged=judged)
    context = RunContext(comp, config, manifest["seed"], dtype, inputs, None, mlx_model, ref, mlx, truth, thresholds,
                         extra={"ref_bundle": str(bundle)})
    try:
        comparison.sections = comp.sections(context)
    except Exception as err:  # noqa: BLE001 - sections may need the reference model itself
        note = f"not computed from a reference bundle (no reference model here): {type(err).__name__}: {err}"
        comparison.sections = [Section("bundle_sections", "Component sections", "table",
                                       {"columns": ["note"], "rows": [[note]]}, None, None, note)]
    meta = run_meta(config, manifest["seed"], manifest["weights"]["source"], started)
    meta["ref_bundle"] = {"path": str(bundle), "created": manifest.get("created"),
                          "versions": manifest.get("versions"), "git_commit": manifest.get("git_commit")}
    return finish_run(comparison, context, meta, out_dir, run_dir, say)


def _inside(bundle: Path, relative: str) -> str:
    if bundle.resolve() not in (bundle / relative).resolve().parents:
        raise BundleMismatch(f"bundle {bundle}: manifest points outside the bundle: {relative}")
    return relative


# --- command line --------------------------------------------------------------------------------

def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_dump_ref(args: argparse.Namespace) -> int:
    dump_reference(args.component, args.out, dtype=args.dtype, seed=args.seed, config_path=args.config,
                   weights_path=args.weights, stats_only=args.stats_only, max_weights_mb=args.max_weights_mb,
                   progress=_stderr)
    return EXIT_PASS


def cmd_compare(args: argparse.Namespace) -> int:
    result = compare_bundle(args.component, args.ref_bundle, out_dir=args.out, config_path=args.config,
                            weights_path=args.weights, use_bundle_config=args.use_bundle_config, progress=_stderr)
    return EXIT_PASS if result.verdict == "PASS" else EXIT_FAIL


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("dump-ref", help="run only the PyTorch reference and write a portable reference bundle",
                              description="Run only the reference of COMPONENT and write a bundle (tensors, inputs, "
                                          "weights or their fingerprint, manifest) that `parity compare` reads.")
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to create (must not exist, or be empty)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="precision of the reference (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--config", type=Path, help="a diffusers config.json (or component config) instead of the tiny default")
    p.add_argument("--weights", type=Path, help="a real diffusers checkpoint (.safetensors file or model folder)")
    p.add_argument("--stats-only", action="append", metavar="GLOB",
                   help="keep only statistics and a sample of reference layers matching GLOB (repeatable)")
    p.add_argument("--max-weights-mb", type=float, default=DEFAULT_MAX_WEIGHTS_MB,
                   help=f"leave checkpoint weights larger than this out of the bundle, keeping their fingerprint "
                        f"(default {DEFAULT_MAX_WEIGHTS_MB}; random weights are always included)")
    p.set_defaults(func=cmd_dump_ref)

    p = subparsers.add_parser("compare", help="compare the MLX side against a reference bundle (no PyTorch needed)",
                              description="Run only our MLX side of COMPONENT on a bundle's inputs and weights and "
                                          "compare against its tensors; same report as `parity run`. A bundle made "
                                          "for another component, config or weights is refused (exit 2).")
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("--ref-bundle", type=Path, required=True, help="a bundle written by `parity dump-ref`")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run directories go (default reports/)")
    p.add_argument("--config", type=Path, help="our config, if not the component's default (must match the bundle's)")
    p.add_argument("--use-bundle-config", action="store_true", help="take the config from the bundle instead of checking ours")
    p.add_argument("--weights", type=Path, help="the checkpoint, when the bundle holds only its fingerprint")
    p.set_defaults(func=cmd_compare)
