"""Which MLX layer each reference layer is compared with, brought into the reference's layout.

An :class:`Alignment` holds

- **rules**: a reference name pattern and the MLX name it maps to (``blocks.*/attn1/q`` ->
  ``blocks.{0}.self_attn.q``; ``*`` one component of a ``.``/``/`` path, ``**`` any; ``{0}``...
  in the MLX name refer to the wildcards). The first matching rule wins; a layer no rule
  matches keeps its name. A rule may name an **adapter** that brings the MLX tensor into the
  reference's layout before any metric is computed: ``transpose(0, 2, 1, 3)`` (BHLD -> BLHD),
  ``channels_first`` (NTHWC -> NCTHW), ``channels_last``, ``split(3, 0)`` (part 0 of a fused
  q/k/v along the last axis), ``take(-1, 0)`` (index 0 of the last axis), ``repeat(2)`` (each
  element twice along the last axis), ``swap_halves`` (``[sin, cos]`` -> ``[cos, sin]``),
  ``interleave_halves`` (rotary pairs stored as two halves -> adjacent pairs), ``reshape`` (to the
  reference's shape, same element order); steps chain with ``|``. The adapter is shown in the
  report next to the layer.
- **exclusions**: layer patterns (per side) a port never materialises, each with a reason;
  they show as ``excluded: <reason>`` instead of failing. An exclusion that matches no layer is
  an error: a stale exclusion would otherwise hide a layer that reappears under another name.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
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


def _take(x: np.ndarray, ref_shape: tuple[int, ...], axis: int, index: int) -> np.ndarray:
    return np.take(x, index, axis=axis)


def _repeat(x: np.ndarray, ref_shape: tuple[int, ...], times: int, axis: int = -1) -> np.ndarray:
    return np.repeat(x, times, axis=axis)


def _swap_halves(x: np.ndarray, ref_shape: tuple[int, ...], axis: int = -1) -> np.ndarray:
    first, second = np.split(x, 2, axis=axis)
    return np.concatenate([second, first], axis=axis)


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
    "split": _split, "take": _take, "repeat": _repeat, "swap_halves": _swap_halves,
    "interleave_halves": _interleave_halves, "reshape": _reshape,
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
    def of(cls, value: "Alignment | Mapping[str, Any] | None" = None, exclude: Mapping[str, str] | None = None
           ) -> "Alignment":
        """An alignment from itself, None (identity) or a mapping ``ref pattern -> mlx name | (mlx name, adapter)``.

        ``exclude``: ``pattern -> reason`` of layers not compared; a pattern ``mlx:<glob>`` names
        MLX-side layers, any other the reference's.
        """
        if isinstance(value, Alignment):
            return value
        rules = []
        for ref, target in (value or {}).items():
            mlx, adapter = (target, None) if isinstance(target, str) else tuple(target)
            rules.append(Rule(ref, mlx, adapter))
        exclusions = tuple(Exclusion(p.removeprefix("mlx:"), reason, "mlx" if p.startswith("mlx:") else "ref")
                           for p, reason in (exclude or {}).items())
        return cls(tuple(rules), exclusions)

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
    converted tensor name its sources, in the order they are laid out. Returns ``{port module:
    [reference modules]}`` (a module is a key without its last component): ``self_attn.qkv`` ->
    ``[attn1.to_q, attn1.to_k, attn1.to_v]`` for a fused projection. Tensors a converter computes
    with (scales, sums) match nothing and are left out.
    """
    keys = sorted(state)
    tagged = {k: np.full(np.shape(state[k]), float(i + 1), np.float32) for i, k in enumerate(keys)}
    found: dict[str, list[str]] = {}
    for key, array in convert(tagged).items():
        flat = np.asarray(array, np.float64).reshape(-1)
        values, first = np.unique(flat, return_index=True)
        if not all(float(v).is_integer() and 1 <= v <= len(keys) for v in values):
            continue
        sources = [keys[int(v) - 1].rpartition(".")[0] for v in values[np.argsort(first)]]
        modules = found.setdefault(key.rpartition(".")[0], [])
        modules += [m for m in dict.fromkeys(sources) if m not in modules]
    return found


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _common_prefix(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def derive(convert: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], state: Mapping[str, np.ndarray],
           reference_layers: Mapping[str, str]) -> tuple[dict[str, str], list[Rule]]:
    """MLX hooks and alignment rules read off the port's weight converter.

    ``reference_layers`` maps reference module paths (globs, in the state dict's namespace) to the
    layer names the reference side records for their outputs. A port module all of whose weights
    come from one reference module ``P`` -- and that holds all of ``P``'s weights -- is that module:
    it is captured under ``P``'s layer name. A port leaf fused from several (``qkv`` from ``to_q``,
    ``to_k``, ``to_v``) is captured under its own path and each reference layer is its part,
    ``split(n, i)`` along the last axis in the order the converter laid them out. Returns
    ``(outputs for MlxHooks, alignment rules)``; modules without weights (activations, parameter-free
    norms) and functions are left to the port's declared hooks.
    """
    leaves = module_correspondence(convert, state)
    ref_leaves = {key.rpartition(".")[0] for key in state}
    covered: dict[str, set[str]] = {}
    for leaf, sources in leaves.items():
        for prefix in _prefixes(leaf):
            covered.setdefault(prefix, set()).update(sources)

    def layer_of(module: str) -> str | None:
        for pattern, template in reference_layers.items():
            groups = match_pattern(pattern, module)
            if groups is not None:
                return expand(template, groups)
        return None

    def leaves_under(module: str) -> set[str]:
        return {m for m in ref_leaves if m == module or m.startswith(module + ".")}

    outputs: dict[str, str] = {}
    rules: list[Rule] = []
    for port_module in sorted(covered, key=lambda m: m.count(".")):  # outermost first
        sources = covered[port_module]
        fused = leaves.get(port_module, [])
        if len(fused) > 1:
            names = [layer_of(m) for m in fused]
            if all(names):
                outputs[port_module] = port_module
                rules += [Rule(name, port_module, f"split({len(fused)}, {i})") for i, name in enumerate(names)]
            continue
        # a leaf is a leaf (a Linear is a Linear); a container only the container holding the same weights
        leaf = port_module in leaves
        same = [p for p in _prefixes(_common_prefix(sources))
                if leaves_under(p) == sources and (p in ref_leaves) == leaf and layer_of(p)]
        name = layer_of(same[0]) if same else None
        if name and name not in outputs.values():
            outputs[port_module] = name
    return outputs, rules
