"""Which MLX layer each reference layer is compared with, brought into the reference's layout.

An :class:`Alignment` holds

- **rules**: a reference name pattern and the MLX name it maps to (``blocks.*/attn1/q`` ->
  ``blocks.{0}.self_attn.q``; ``*`` one component of a ``.``/``/`` path, ``**`` any; ``{0}``...
  in the MLX name refer to the wildcards). The first matching rule wins; a layer no rule
  matches keeps its name. A rule may name an **adapter** that brings the MLX tensor into the
  reference's layout before any metric is computed: ``transpose(0, 2, 1, 3)`` (BHLD -> BLHD),
  ``channels_first`` (NTHWC -> NCTHW), ``channels_last``, ``split(3, 0)`` (part 0 of a fused
  q/k/v along the last axis), ``interleave_halves`` (rotary pairs stored as two halves ->
  adjacent pairs), ``reshape`` (to the reference's shape, same element order); steps chain with
  ``|``. The adapter is shown in the report next to the layer.
- **exclusions**: layer patterns (per side) a port never materialises, each with a reason;
  they show as ``excluded: <reason>`` instead of failing. An exclusion that matches no layer is
  an error: a stale exclusion would otherwise hide a layer that reappears under another name.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from parity.capture import expand, match_pattern
from parity.vocab import InputError


class AlignmentError(InputError):
    """A malformed rule, an unknown adapter, or an exclusion that matches nothing."""


# --- adapters ---------------------------------------------------------------------------------

def _transpose(x: np.ndarray, ref_shape: tuple[int, ...], *axes: int) -> np.ndarray:
    return np.transpose(x, axes)


def _channels_first(x: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def _channels_last(x: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def _split(x: np.ndarray, ref_shape: tuple[int, ...], parts: int, index: int, axis: int = -1) -> np.ndarray:
    if x.shape[axis] % parts:
        raise AlignmentError(f"split({parts}, {index}): axis {axis} of size {x.shape[axis]} does not split in {parts}")
    return np.split(x, parts, axis=axis)[index]


def _interleave_halves(x: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _reshape(x: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    if x.size != int(np.prod(ref_shape)):
        raise AlignmentError(f"reshape: {x.shape} has {x.size} elements, the reference's {ref_shape} has "
                             f"{int(np.prod(ref_shape))}")
    return x.reshape(ref_shape)


ADAPTERS: dict[str, Callable[..., np.ndarray]] = {
    "transpose": _transpose, "channels_first": _channels_first, "channels_last": _channels_last,
    "split": _split, "interleave_halves": _interleave_halves, "reshape": _reshape,
}


def parse_adapter(spec: str) -> list[tuple[str, tuple[Any, ...]]]:
    """``"transpose(0, 2, 1, 3) | reshape"`` -> ``[("transpose", (0, 2, 1, 3)), ("reshape", ())]``."""
    steps = []
    for part in spec.split("|"):
        part = part.strip()
        name, _, rest = part.partition("(")
        name = name.strip()
        if name not in ADAPTERS:
            raise AlignmentError(f"adapter {spec!r}: unknown step {name!r}; known: {sorted(ADAPTERS)}")
        inner = rest.rstrip().removesuffix(")")
        if rest and (inner == rest.rstrip() or "(" in inner or ")" in inner):
            raise AlignmentError(f"adapter {spec!r}: expected {name}(arguments)")
        try:
            args = ast.literal_eval(f"({inner},)") if inner.strip() else ()
        except (ValueError, SyntaxError):
            raise AlignmentError(f"adapter {spec!r}: cannot read the arguments of {name!r}") from None
        steps.append((name, tuple(args)))
    return steps


def apply_adapter(spec: str, x: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    """The MLX tensor ``x`` after the adapter steps of ``spec``."""
    for name, args in parse_adapter(spec):
        x = ADAPTERS[name](x, ref_shape, *args)
    return x


# --- rules and exclusions -----------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    ref: str
    mlx: str
    adapter: str | None = None

    def __post_init__(self) -> None:
        if self.adapter:
            parse_adapter(self.adapter)


@dataclass(frozen=True)
class Exclusion:
    pattern: str
    reason: str
    side: str = "ref"  # ref | mlx

    def __post_init__(self) -> None:
        if self.side not in ("ref", "mlx"):
            raise AlignmentError(f"exclusion {self.pattern!r}: side must be 'ref' or 'mlx', got {self.side!r}")
        if not self.reason.strip():
            raise AlignmentError(f"exclusion {self.pattern!r}: give the reason the layer is not compared")


@dataclass(frozen=True)
class Alignment:
    rules: Sequence[Rule] = ()
    exclusions: Sequence[Exclusion] = ()

    @classmethod
    def of(cls, value: "Alignment | Mapping[str, Any] | None") -> "Alignment":
        """An alignment from itself, None (identity) or a mapping ``ref pattern -> mlx name | (mlx name, adapter)``."""
        if value is None:
            return cls()
        if isinstance(value, Alignment):
            return value
        rules = []
        for ref, target in value.items():
            mlx, adapter = (target, None) if isinstance(target, str) else tuple(target)
            rules.append(Rule(ref, mlx, adapter))
        return cls(tuple(rules))

    def target(self, ref_name: str) -> tuple[str, str | None]:
        """The MLX name ``ref_name`` is compared with, and the adapter to apply to it (None: as is)."""
        for rule in self.rules:
            groups = match_pattern(rule.ref, ref_name)
            if groups is not None:
                return expand(rule.mlx, groups), rule.adapter
        return ref_name, None

    def excluded(self, name: str, side: str) -> str | None:
        """The reason ``name`` on ``side`` is not compared, or None."""
        for exclusion in self.exclusions:
            if exclusion.side == side and match_pattern(exclusion.pattern, name) is not None:
                return exclusion.reason
        return None

    def check_exclusions(self, ref_names: Iterable[str], mlx_names: Iterable[str]) -> None:
        """Every exclusion must match a layer of its side, or :class:`AlignmentError`."""
        names = {"ref": list(ref_names), "mlx": list(mlx_names)}
        stale = [e for e in self.exclusions if not any(match_pattern(e.pattern, n) is not None for n in names[e.side])]
        if stale:
            raise AlignmentError("exclusion(s) matching no layer: " + ", ".join(
                f"{e.pattern!r} ({e.side}: {e.reason})" for e in stale) + "; remove them or fix the pattern")


def merged(*alignments: Alignment) -> Alignment:
    """One alignment with the rules and exclusions of all, in order (earlier rules win)."""
    return Alignment(tuple(r for a in alignments for r in a.rules), tuple(e for a in alignments for e in a.exclusions))


def module_correspondence(convert: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                          state: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Which reference modules each port module is built from, read off the port's own weight converter.

    Every reference tensor is replaced by a constant array of its shape holding a value unique to
    its key; after ``convert`` (the port's whole-state-dict converter) the values found in each
    converted tensor name its sources. Returns ``{port module: [reference modules]}`` (a module is
    a key without its last component): ``self_attn.qkv`` -> ``[attn1.to_q, attn1.to_k, attn1.to_v]``
    for a fused projection. Tensors a converter computes with (scales, sums) match nothing and are left out.
    """
    keys = sorted(state)
    tagged = {k: np.full(np.shape(state[k]), float(i + 1), np.float32) for i, k in enumerate(keys)}
    found: dict[str, list[str]] = {}
    for key, array in convert(tagged).items():
        values = np.unique(np.asarray(array, np.float64))
        sources = [keys[int(v) - 1] for v in values if float(v).is_integer() and 1 <= v <= len(keys)]
        if len(sources) != len(values):
            continue
        port_module = key.rpartition(".")[0]
        for source in sources:
            ref_module = source.rpartition(".")[0]
            found.setdefault(port_module, [])
            if ref_module not in found[port_module]:
                found[port_module].append(ref_module)
    return found
