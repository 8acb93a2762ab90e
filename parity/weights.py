"""Checkpoints and strict weight loading: files -> numpy state dicts -> torch and MLX modules.

Every key of a state dict must land on exactly one parameter and every parameter must be filled,
with the right shape; otherwise the load fails naming the keys and shapes. (A loader that
silently ignored missing encoder keys once shipped a randomly initialised VAE encoder.)
Checkpoints are read without unpickling: safetensors, or PyTorch files with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from parity.vocab import InputError

#: Maps one checkpoint key/array to the MLX parameter key and its array in MLX layout.
Converter = Callable[[str, np.ndarray], tuple[str, np.ndarray]]


class WeightLoadError(InputError):
    """A state dict that does not fit its model: missing, unused or wrong-shape keys, or an unreadable file."""


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A checkpoint as float32/float64 numpy arrays (bf16/fp16 widened).

    Accepts a ``.safetensors`` file, a diffusers model folder (``*.safetensors``, sharded or
    not), or a PyTorch ``.bin``/``.pt``/``.pth`` file (``weights_only=True``; needs torch).
    Without torch, safetensors files are read with safetensors' numpy API, or MLX for bf16.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightLoadError(f"checkpoint {path}: folder holds no *.safetensors file")
        state: dict[str, np.ndarray] = {}
        for file in files:
            state.update(read_checkpoint(file))
        return state
    if not path.exists():
        raise WeightLoadError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise WeightLoadError(f"checkpoint {path}: reading .bin/.pt needs PyTorch; use .safetensors") from None
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the file named
            raise WeightLoadError(f"checkpoint {path} could not be read: {err}") from None
        if not isinstance(tensors, dict):
            raise WeightLoadError(f"checkpoint {path}: expected a state dict, got {type(tensors).__name__}")
        return {k: _widen(v.detach().cpu().float().numpy() if v.is_floating_point() and v.dtype != torch.float64
                          else v.detach().cpu().numpy()) for k, v in tensors.items()}
    raise WeightLoadError(f"checkpoint {path}: expected .safetensors, .bin, .pt or a diffusers model folder")


def _widen(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype.kind == "f" and array.dtype.itemsize < 4 else array


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: _widen(v) for k, v in load_file(str(file)).items()}
    except (SafetensorError, OSError) as err:
        numpy_error = err
    except TypeError as err:  # numpy has no bfloat16: MLX reads it
        numpy_error = err
    try:
        import mlx.core as mx

        loaded = mx.load(str(file))
    except Exception:  # noqa: BLE001 - re-raised with the file named
        raise WeightLoadError(f"checkpoint {file} could not be read: {numpy_error}") from None
    out = {}
    for key, value in loaded.items():
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != mx.float32:
            value = value.astype(mx.float32)
        out[key] = np.array(value)
    return out


def read_config(path: str | Path) -> dict:
    """A JSON config (file, or the folder holding ``config.json``) that must be an object."""
    from parity.config import read_object

    path = Path(path)
    return read_object(path / "config.json" if path.is_dir() else path, "config")


def select_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The sub-state-dict under ``prefix`` (e.g. ``"condition_embedder."``), prefix stripped."""
    if not prefix:
        return dict(state)
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise WeightLoadError(f"checkpoint has no keys under prefix {prefix!r}")
    return selected


def check_state(name: str, expected: dict[str, tuple[int, ...]], state: dict[str, tuple[int, ...]],
                sources: dict[str, str] | None = None) -> None:
    """Missing, unused or wrong-shape keys of ``state`` against ``expected`` (key -> shape): a :class:`WeightLoadError`."""
    sources = sources or {}
    missing = sorted(set(expected) - set(state))
    unused = sorted(sources.get(k, k) if sources.get(k, k) == k else f"{sources[k]} (as {k})"
                    for k in set(state) - set(expected))
    if missing or unused:
        raise WeightLoadError(f"strict load failed for {name}: missing keys {missing or 'none'}; "
                              f"unused keys {unused or 'none'}")
    wrong = [(k, expected[k], state[k]) for k in sorted(expected) if tuple(state[k]) != tuple(expected[k])]
    if wrong:
        key, want, got = wrong[0]
        origin = f"{sources[key]!r} (as {key!r})" if sources.get(key, key) != key else repr(key)
        raise WeightLoadError(f"strict load failed for {name}: weight {origin}: expected shape {tuple(want)}, "
                              f"got {tuple(got)}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def load_torch_strict(module, state: dict[str, np.ndarray]) -> None:
    """Load numpy ``state`` into a torch module; missing, unused or wrong-shape keys are a :class:`WeightLoadError`."""
    import torch

    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state(f"reference {type(module).__name__}", expected, {k: tuple(np.shape(v)) for k, v in state.items()})
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)


def identity(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    return key, array


def keeps_float32(key: str, keep_float32: Iterable[str]) -> bool:
    """True when a dotted parameter key lies under one of the module names diffusers keeps in float32."""
    parts = key.split(".")
    return any(name in parts for name in keep_float32)


def strict_load(model, state: dict[str, np.ndarray], convert: Converter = identity, dtype=None,
                keep_float32: Iterable[str] = ()):
    """Load ``state`` into the MLX ``model`` through ``convert`` (per key); fail on any mismatch; return ``model``.

    ``dtype`` (an ``mlx.core`` dtype) casts the parameters, except those under a module named in
    ``keep_float32`` (diffusers' ``_keep_in_fp32_modules``, a component's ``keep_fp32``).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    converted: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for key, array in state.items():
        new_key, new_array = convert(key, array)
        if new_key in converted:
            raise WeightLoadError(f"strict load failed for {type(model).__name__}: {sources[new_key]!r} and {key!r} "
                                  f"both convert to {new_key!r}")
        converted[new_key], sources[new_key] = new_array, key
    check_state(type(model).__name__, expected, {k: tuple(np.shape(v)) for k, v in converted.items()}, sources)
    params = []
    for key, array in converted.items():
        value = mx.array(np.ascontiguousarray(array, dtype=np.float32))
        if dtype is not None and not keeps_float32(key, keep_float32):
            value = value.astype(dtype)
        params.append((key, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model
