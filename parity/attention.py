"""Attention maps: per-head diagnostics of the reference's and our attention probabilities.

A map is a layer named ``<attention>/probs`` (:func:`is_map`), shape ``(batch, heads, queries,
keys)``: ``softmax(Q K^T * scale + mask)`` recomputed on each side from the q/k its attention
call used, with that side's own scale and mask (the reference: ``reference_runners.attention``;
ours: ``mlx_impl.block.attention_probs``). Maps are layers, so the elementwise rules judge them
as any tensor, and :func:`head_metrics` adds, per head, what an output comparison cannot show:

- ``attn_js_mean`` / ``attn_js_max``: Jensen-Shannon divergence (bits, 0..1) of the two maps'
  query rows, mean and worst row;
- ``attn_topk_overlap``: share of the reference's top-k keys (k = :func:`topk_count`) that are
  also ours, mean over rows;
- ``attn_entropy_{ref,mlx}``: row entropy over log(keys) (1: uniform, 0: one key);
- ``attn_sparsity_{ref,mlx}``: share of the keys holding 90% of a row's mass;
- ``attn_mass_<group>_{ref,mlx}``: mass on a group of keys, mean over rows: ``sink`` (the key
  the reference attends to most, per head; ``attn_sink_key_{ref,mlx}`` say which key each side
  attends to most), ``first`` (key 0), and the component's groups (:data:`KeyGroups`, e.g.
  ``history``);
- ``attn_dropped``: the reference's mass on keys we give exactly zero (a mask or a sparse /
  windowed approximation drops it), mean over rows.

Every value is a list over heads. ``parity.compare.apply_rules`` judges them (``parity.toml``
keys ``attn_*``) and names the failing heads. Everything is computed in float64 by chunks of
query rows, so memory stays bounded whatever the token count.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping

import numpy as np

from parity.vocab import InputError

#: The last name component of an attention map layer.
MAP = "probs"
#: ``attention_maps: "auto"`` computes maps when none holds more probabilities than this (64 MB float32 per side).
AUTO_MAX_ELEMENTS = 1 << 24
#: Top-k overlap uses k = keys // 4, between 1 and this.
TOPK = 16
#: Sparsity: the share of keys needed for this much of a row's mass.
SPARSITY_MASS = 0.9
#: Rows are processed in chunks of about this many probabilities.
CHUNK_ELEMENTS = 1 << 18
#: Named key ranges ``{group: (start, stop)}`` of one attention layer (e.g. ``{"history": (0, 36)}``).
KeyGroups = Mapping[str, tuple[int, int]]


def is_map(name: str) -> bool:
    return name == MAP or name.endswith("/" + MAP)


def enabled(setting: bool | str, elements: int) -> bool:
    """Whether maps are computed: ``True`` / ``False``, or ``"auto"``: when the largest holds at most :data:`AUTO_MAX_ELEMENTS`."""
    return elements <= AUTO_MAX_ELEMENTS if setting == "auto" else bool(setting)


def groups_for(layer: str, key_groups: Mapping[str, KeyGroups]) -> KeyGroups:
    """The key groups of ``layer``: those of the first glob of ``key_groups`` matching it, else none."""
    return next((groups for pattern, groups in key_groups.items() if fnmatch.fnmatchcase(layer, pattern)), {})


def topk_count(keys: int) -> int:
    return max(1, min(TOPK, keys // 4))


def _xlogx_sum(p: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
    """Row sums of ``p * log(p / base)`` (``base`` None: ``p * log p``), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = p * np.log(p / base if base is not None else p)
    return np.where(p > 0, terms, 0.0).sum(axis=1)


def _row_metrics(p: np.ndarray, q: np.ndarray, k: int, groups: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Per-row metrics of reference rows ``p`` and our rows ``q`` (``(rows, keys)`` float64)."""
    keys = p.shape[1]
    m = 0.5 * (p + q)
    js = np.maximum(0.5 * (_xlogx_sum(p, m) + _xlogx_sum(q, m)) / math.log(2), 0.0)
    top = [np.zeros(p.shape, bool) for _ in range(2)]
    for mask, rows in zip(top, (p, q)):
        np.put_along_axis(mask, np.argpartition(-rows, k - 1, axis=1)[:, :k], True, axis=1)
    out = {"js": js, "topk": (top[0] & top[1]).sum(axis=1) / k, "dropped": np.where(q == 0, p, 0.0).sum(axis=1)}
    norm = math.log(keys) if keys > 1 else 1.0
    for side, rows in (("ref", p), ("mlx", q)):
        out[f"entropy_{side}"] = -_xlogx_sum(rows) / norm
        cumulative = np.cumsum(-np.sort(-rows, axis=1), axis=1)
        needed = (cumulative < SPARSITY_MASS * cumulative[:, -1:]).sum(axis=1) + 1
        out[f"sparsity_{side}"] = needed / keys
        for group, (start, stop) in groups.items():
            out[f"mass_{group}_{side}"] = rows[:, start:stop].sum(axis=1)
    return out


def head_metrics(ref: np.ndarray, ours: np.ndarray, groups: KeyGroups | None = None, layer: str = "map") -> dict[str, Any]:
    """Per-head diagnostics of two ``(batch, heads, queries, keys)`` maps (see the module docstring).

    A key group outside the map is an :class:`~parity.vocab.InputError` (the component's ``attention_groups``).
    """
    batch, heads, queries, keys = ref.shape
    groups = {"first": (0, 1), **(groups or {})}
    for group, (start, stop) in groups.items():
        if not 0 <= start < stop <= keys:
            raise InputError(f"{layer}: key group {group!r} ({start}, {stop}) is outside the map's {keys} keys "
                             "(the component's attention_groups)")
    k = topk_count(keys)
    rows = max(1, CHUNK_ELEMENTS // keys)
    per_head: dict[str, list] = {}
    for h in range(heads):
        sums: dict[str, float] = {}
        js_max = 0.0
        columns = {"ref": np.zeros(keys), "mlx": np.zeros(keys)}
        for b in range(batch):
            for start in range(0, queries, rows):
                p = np.asarray(ref[b, h, start:start + rows], np.float64)
                q = np.asarray(ours[b, h, start:start + rows], np.float64)
                row = _row_metrics(p, q, k, groups)
                js_max = max(js_max, float(row["js"].max()))
                for name, values in row.items():
                    sums[name] = sums.get(name, 0.0) + float(values.sum())
                columns["ref"] += p.sum(axis=0)
                columns["mlx"] += q.sum(axis=0)
        count = batch * queries
        values = {f"attn_{'js_mean' if n == 'js' else 'topk_overlap' if n == 'topk' else n}": s / count
                  for n, s in sums.items()}
        values["attn_js_max"] = js_max
        sink = int(np.argmax(columns["ref"]))
        values["attn_sink_key_ref"], values["attn_sink_key_mlx"] = sink, int(np.argmax(columns["mlx"]))
        for side in ("ref", "mlx"):
            values[f"attn_mass_sink_{side}"] = float(columns[side][sink]) / count
        for name, value in values.items():
            per_head.setdefault(name, []).append(value)
    order = ["attn_js_mean", "attn_js_max", "attn_topk_overlap", "attn_entropy_ref", "attn_entropy_mlx",
             "attn_sparsity_ref", "attn_sparsity_mlx", "attn_sink_key_ref", "attn_sink_key_mlx",
             *(f"attn_mass_{g}_{side}" for g in ("sink", *groups) for side in ("ref", "mlx")), "attn_dropped"]
    return {"attn_heads": heads, "attn_topk": k, "attn_groups": {g: list(r) for g, r in groups.items()},
            **{name: per_head[name] for name in order}}


def mass_groups(metrics: Mapping[str, Any]) -> list[str]:
    """The key groups whose mass a map layer's metrics hold: ``sink`` then its declared groups."""
    return ["sink", *(metrics.get("attn_groups") or {})]
