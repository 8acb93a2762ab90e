"""Capture of named intermediate tensors from a PyTorch module and from our MLX code.

A :class:`Capture` is an ordered record ``layer name -> numpy array`` in execution order,
plus each tensor's original dtype. Tensors are stored as float32 numpy arrays (float64 stays
float64) so metrics never depend on a framework being importable. A capture may forward each
tensor to a sink as it arrives (streaming) instead of, or as well as, keeping it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mlx_impl import taps

Sink = Callable[[str, np.ndarray, str], None]


class CaptureError(ValueError):
    """A capture was used inconsistently (duplicate layer, unexpected extra call, ...)."""


def to_numpy(x: Any) -> tuple[np.ndarray, str]:
    """Convert a torch / MLX / numpy tensor to numpy (bf16/fp16 widened to float32) and its dtype name."""
    module = type(x).__module__
    if module.startswith("torch"):
        dtype = str(x.dtype).removeprefix("torch.")
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype not in (_torch().float32, _torch().float64):
            x = x.float()
        return x.numpy(), dtype
    if module.startswith("mlx"):
        import mlx.core as mx

        dtype = str(x.dtype).removeprefix("mlx.core.")
        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x), dtype
    array = np.asarray(x)
    return array, str(array.dtype)


def _torch():
    import torch

    return torch


class Capture:
    """Ordered ``layer name -> tensor`` record of one forward run on one side."""

    def __init__(self, side: str, keep: bool = True, sink: Sink | None = None):
        self.side = side
        self.keep = keep
        self.sink = sink
        self.order: list[str] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, tensor: Any) -> None:
        """Record ``tensor`` under ``name``; a name may be recorded once per capture."""
        if name in self.dtypes:
            raise CaptureError(f"{self.side}: layer {name!r} captured twice; give each call its own name")
        array, dtype = to_numpy(tensor)
        self.order.append(name)
        self.dtypes[name] = dtype
        self.shapes[name] = tuple(array.shape)
        if self.keep:
            self.tensors[name] = array
        if self.sink is not None:
            self.sink(name, array, dtype)

    def __contains__(self, name: str) -> bool:
        return name in self.dtypes

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.order)


@contextmanager
def capture_mlx(capture: Capture) -> Iterator[Capture]:
    """Record every ``mlx_impl.taps.tap`` call made inside the block into ``capture``."""
    with taps.recorder(capture.add):
        yield capture


@contextmanager
def capture_torch(
    root: Any, capture: Capture, hooks: Mapping[str, str | Sequence[str]]
) -> Iterator[Capture]:
    """Record outputs of named submodules of ``root`` via forward hooks.

    ``hooks`` maps a submodule path (as in ``root.named_modules()``) to the layer name to
    record, or to a list of names for successive calls of the same submodule. A tuple/list
    output is recorded element-wise as ``name/0``, ``name/1``... An unknown path, or more
    calls than names, raises :class:`CaptureError`.
    """
    modules = dict(root.named_modules())
    handles = []
    try:
        for path, names in hooks.items():
            if path not in modules:
                raise CaptureError(f"reference has no submodule {path!r} to hook")
            names = [names] if isinstance(names, str) else list(names)
            handles.append(modules[path].register_forward_hook(_make_hook(capture, path, names)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def _make_hook(capture: Capture, path: str, names: list[str]):
    calls = iter(names)

    def hook(_module, _inputs, output):
        name = next(calls, None)
        if name is None:
            raise CaptureError(f"submodule {path!r} was called more than the {len(names)} time(s) expected")
        if isinstance(output, (tuple, list)):
            for i, item in enumerate(output):
                if item is not None:
                    capture.add(f"{name}/{i}", item)
        else:
            capture.add(name, output)

    return hook
