"""A capture: the named intermediate tensors of one forward run on one side, in execution order.

A :class:`Capture` records ``layer name -> numpy array`` plus each tensor's original dtype and
shape. Tensors are stored as float32 numpy arrays (float64 stays float64), so metrics never
depend on a framework being importable. A capture may forward each tensor to a sink as it
arrives (streaming) instead of, or as well as, keeping it. Names recorded inside
:meth:`Capture.scope` blocks are prefixed (``chunk1/`` + ``conv_in``), on either side.

The tools that fill a capture live in :mod:`parity.capture_torch` (forward hooks, wrapped
functions, traced locals on the reference) and :mod:`parity.capture_mlx` (our taps, hooks by
module path and wrapped functions on an MLX port). Both name layers with the same patterns:
``*`` matches one component of a dotted path, ``**`` any number; a name template refers to the
wildcards as ``{0}``, ``{1}``... and to the per-scope call count as ``{call}``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from functools import cache
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from parity.vocab import InputError

Sink = Callable[[str, np.ndarray, str], None]


class CaptureError(InputError):
    """A capture was used inconsistently (duplicate layer, unknown module path, unexpected extra call, ...)."""


def to_numpy(x: Any) -> tuple[np.ndarray, str]:
    """Convert a torch / MLX / numpy tensor to numpy (bf16/fp16 widened to float32) and its dtype name."""
    module = type(x).__module__
    if module.startswith("torch"):
        import torch

        dtype = str(x.dtype).removeprefix("torch.")
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype not in (torch.float32, torch.float64):
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


def is_tensor(x: Any) -> bool:
    """True for torch tensors, MLX arrays and numpy arrays (what a capture can record)."""
    module = type(x).__module__
    return isinstance(x, np.ndarray) or (module.startswith(("torch", "mlx")) and hasattr(x, "dtype") and hasattr(x, "shape"))


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
        self._scopes: list[str] = []
        #: Called with each recorded name (progress bars).
        self.observers: list[Callable[[str], None]] = []

    def full_name(self, name: str) -> str:
        return "/".join([*self._scopes, name])

    @property
    def current_scope(self) -> str:
        return "/".join(self._scopes)

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix every name recorded inside the block with ``name/``."""
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def add(self, name: str, tensor: Any) -> None:
        """Record ``tensor`` under ``name`` (prefixed by the open scopes); a name may be recorded once."""
        name = self.full_name(name)
        if name in self.dtypes:
            raise CaptureError(f"{self.side}: layer {name!r} captured twice; give each call its own name "
                               "(a scope, or {call} in the name template)")
        array, dtype = to_numpy(tensor)
        self.order.append(name)
        self.dtypes[name] = dtype
        self.shapes[name] = tuple(array.shape)
        if self.keep:
            self.tensors[name] = array
        if self.sink is not None:
            self.sink(name, array, dtype)
        for observe in self.observers:
            observe(name)

    def add_tree(self, name: str, value: Any) -> None:
        """Record a tensor, or each tensor of a tuple/list output as ``name/0``, ``name/1``..."""
        if isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                if is_tensor(item):
                    self.add(f"{name}/{i}", item)
        elif is_tensor(value):
            self.add(name, value)

    def stats_of(self, name: str) -> dict[str, Any] | None:
        """The statistics a stats-only layer was reduced to (streaming), or None: the tensor is kept."""
        return None

    @property
    def last(self) -> str | None:
        """The layer recorded last (where a crashed forward got to)."""
        return self.order[-1] if self.order else None

    def __contains__(self, name: str) -> bool:
        return name in self.dtypes

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __len__(self) -> int:
        return len(self.order)


# --- name patterns shared by both sides ---------------------------------------------------------

@cache
def compile_pattern(pattern: str) -> re.Pattern:
    """A dotted-path glob as a regex: ``*`` one path component (captured), ``**`` any (captured)."""
    parts = re.split(r"(\*\*|\*)", pattern)
    regex = "".join("(.+)" if p == "**" else "([^./]+)" if p == "*" else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


def match_pattern(pattern: str, path: str) -> tuple[str, ...] | None:
    """The wildcard captures of ``path`` against ``pattern``, or None when it does not match."""
    found = compile_pattern(pattern).match(path)
    return found.groups() if found else None


def expand(template: str, groups: tuple[str, ...], call: int = 0) -> str:
    """A name template filled with wildcard captures (``{0}``...) and the call count (``{call}``)."""
    try:
        return template.format(*groups, call=call)
    except (IndexError, KeyError) as err:
        raise CaptureError(f"name template {template!r}: no value for {err} (wildcards: {list(groups)})") from None


Names = str | Sequence[str]


def name_for(names: Names, groups: tuple[str, ...], call: int, what: str) -> str:
    """The layer name of the ``call``-th call: a template, or the ``call``-th of a list of names."""
    if isinstance(names, str):
        return expand(names, groups, call)
    if call >= len(names):
        raise CaptureError(f"{what} was called more than the {len(names)} time(s) its names list")
    return expand(names[call], groups, call)


class CallCounter:
    """Counts calls per (key, enclosing scope): the i-th call of a module or function inside each scope."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.counts: dict[tuple[Any, str], int] = {}

    def next(self, key: Any) -> int:
        slot = (key, self.capture.current_scope)
        count = self.counts.get(slot, 0)
        self.counts[slot] = count + 1
        return count
