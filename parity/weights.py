"""Strict weight loading: checkpoint files -> numpy state dicts -> MLX modules.

Every key of the checkpoint must land on exactly one MLX parameter and every MLX parameter
must be filled, with the right shape; otherwise the load fails naming the keys. (A loader
that silently ignored missing encoder keys once shipped a randomly initialised VAE encoder.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

#: Maps one checkpoint key/array to the MLX parameter key and its array in MLX layout.
Converter = Callable[[str, np.ndarray], tuple[str, np.ndarray]]


class WeightLoadError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a checkpoint as float32/float64 numpy arrays.

    Accepts a ``.safetensors`` file, a diffusers model folder (``*.safetensors``, sharded or
    not), or a PyTorch ``.bin``/``.pt``/``.pth`` file (read with ``weights_only=True``).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no *.safetensors checkpoint")
        state: dict[str, np.ndarray] = {}
        for file in files:
            state.update(read_checkpoint(file))
        return state
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
    elif path.suffix in (".bin", ".pt", ".pth"):
        import torch

        def load_file(p):
            return torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint {path}: expected .safetensors, .bin, .pt or a diffusers model folder")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"checkpoint {path} could not be read: {err}") from err
    return {k: _to_numpy(v) for k, v in tensors.items()}


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype != torch.float64 and tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()


def read_config(path: str | Path) -> dict:
    """A diffusers ``config.json`` (file or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"config {path} is not valid JSON: {err}") from None


def select_prefix(state: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The sub-state-dict under ``prefix`` (e.g. ``"condition_embedder."``), prefix stripped."""
    if not prefix:
        return dict(state)
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        raise WeightLoadError(f"checkpoint has no keys under prefix {prefix!r}")
    return selected


def load_torch_strict(module, state: dict[str, np.ndarray]) -> None:
    """Load numpy ``state`` into a torch module; any missing or unused key is a :class:`WeightLoadError`."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    missing, unused = module.load_state_dict(tensors, strict=False)
    if missing or unused:
        raise WeightLoadError(
            f"strict load failed for reference {type(module).__name__}: "
            f"missing keys {sorted(missing) or 'none'}; unused keys {sorted(unused) or 'none'}"
        )


def identity(key: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    return key, array


def strict_load(model, state: dict[str, np.ndarray], convert: Converter = identity, dtype=None, keep_float32: Iterable[str] = ()) -> None:
    """Load ``state`` into the MLX ``model`` through ``convert``; fail on any mismatch.

    ``dtype`` (an ``mlx.core`` dtype) casts the parameters, except those whose key contains
    one of ``keep_float32`` (mirroring diffusers' ``_keep_in_fp32_modules``).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    expected = dict(tree_flatten(model.parameters()))
    converted: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    unused = []
    for key, array in state.items():
        new_key, new_array = convert(key, array)
        if new_key not in expected:
            unused.append(key if new_key == key else f"{key} (as {new_key})")
            continue
        converted[new_key], sources[new_key] = new_array, key
    missing = sorted(set(expected) - set(converted))
    if missing or unused:
        raise WeightLoadError(
            f"strict load failed for {type(model).__name__}: "
            f"missing keys {missing or 'none'}; unused keys {sorted(unused) or 'none'}"
        )
    params = []
    for key, array in converted.items():
        want = tuple(expected[key].shape)
        if tuple(array.shape) != want:
            raise WeightLoadError(f"weight {sources[key]!r}: expected shape {want} for {key!r}, got {tuple(array.shape)}")
        value = mx.array(np.ascontiguousarray(array, dtype=np.float32))
        if dtype is not None and not any(tag in key for tag in keep_float32):
            value = value.astype(dtype)
        params.append((key, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
