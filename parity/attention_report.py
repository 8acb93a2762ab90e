"""The attention part of a finished run, read from its ``report.json`` (and the map dumps for pictures).

The HTML page (:mod:`parity.html_report`) and ``parity attention REPORT_DIR`` show the same
per-head rows: the metrics :mod:`parity.attention` recorded on each map layer, and which of its
limits each head broke (the heads the verdict's failures name). Nothing here judges.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from parity import attention
from parity.vocab import InputError, fmt

#: Heads drawn per map layer (the worst: failing first, then by mean JS divergence).
WORST_HEADS = 3
#: Longest side of a drawn map (larger maps are averaged over blocks of queries and keys).
MAX_SIDE = 128
NO_MAPS = ("no attention maps in this run (maps come from a component that captures them: run it with "
           "--attention-maps or config attention_maps true)")


def map_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's attention-map layer rows that carry per-head metrics, in execution order."""
    return [row for row in report.get("layers") or []
            if attention.is_map(str(row.get("layer"))) and isinstance(row.get("attn_js_mean"), list)]


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, Callable[[dict[str, Any], int], Any]]]:
    """``(key, header, value(row, head))`` of the per-head table; mass columns for every group any layer has."""
    def metric(name: str) -> Callable[[dict[str, Any], int], Any]:
        return lambda row, h: (row.get(name) or [None] * (h + 1))[h]

    cols = [("attn_js_mean", "JS mean", metric("attn_js_mean")), ("attn_js_max", "JS worst row", metric("attn_js_max")),
            ("attn_topk_overlap", "top-k overlap", metric("attn_topk_overlap"))]
    for name, header in (("entropy", "entropy"), ("sparsity", "sparsity")):
        cols += [(f"attn_{name}", f"{header} ref", metric(f"attn_{name}_ref")),
                 (f"attn_{name}", f"{header} MLX", metric(f"attn_{name}_mlx"))]
    cols += [("attn_sink_key", "sink key ref", metric("attn_sink_key_ref")),
             ("attn_sink_key", "sink key MLX", metric("attn_sink_key_mlx"))]
    groups = list(dict.fromkeys(g for row in rows for g in attention.mass_groups(row)))
    for group in groups:
        cols += [(f"attn_mass_{group}", f"{group} mass ref", metric(f"attn_mass_{group}_ref")),
                 (f"attn_mass_{group}", f"{group} mass MLX", metric(f"attn_mass_{group}_mlx"))]
    cols.append(("attn_dropped", "dropped", metric("attn_dropped")))
    return cols


def failing_metrics(row: dict[str, Any], head: int) -> list[str]:
    """The metrics whose limits ``head`` of this map layer broke (from the recorded failures)."""
    return [str(f.get("metric")) for f in row.get("failures") or [] if head in (f.get("heads") or [])]


def head_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (map layer, head): ``layer``, ``head``, ``failing`` metrics and ``values`` by column."""
    cols = columns(rows)
    out = []
    for row in rows:
        for head in range(int(row.get("attn_heads") or len(row["attn_js_mean"]))):
            out.append({"layer": str(row["layer"]), "head": head, "failing": failing_metrics(row, head),
                        "values": [(key, header, get(row, head)) for key, header, get in cols]})
    return out


def worst_heads(row: dict[str, Any], count: int = WORST_HEADS) -> list[int]:
    js = row["attn_js_mean"]
    return sorted(range(len(js)), key=lambda h: (not failing_metrics(row, h), -(js[h] or 0.0)))[:count]


def depth_curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``curves`` data over the map layers: entropy, and mass per key group (mean over heads, both sides)."""
    names = [str(row["layer"]) for row in rows]

    def mean(row: dict[str, Any], key: str) -> float | None:
        values = [v for v in row.get(key) or [] if isinstance(v, (int, float))]
        return float(np.mean(values)) if values else None

    entropy = {f"{side_label} (mean over heads)": [mean(r, f"attn_entropy_{side}") for r in rows]
               for side, side_label in (("ref", "reference"), ("mlx", "MLX"))}
    mass = {f"{group} mass {side_label}": [mean(r, f"attn_mass_{group}_{side}") for r in rows]
            for group in dict.fromkeys(g for r in rows for g in attention.mass_groups(r))
            for side, side_label in (("ref", "reference"), ("mlx", "MLX"))}
    return [{"x": names, "series": entropy, "xlabel": "attention layer", "ylabel": "entropy / log(keys)", "log": False},
            {"x": names, "series": mass, "xlabel": "attention layer", "ylabel": "attention mass (share of a row)",
             "log": False}]


def pooled(image: np.ndarray, side: int = MAX_SIDE) -> np.ndarray:
    """A ``(queries, keys)`` map in blocks of ``f x f`` (``f``: the smallest keeping both sides <= ``side``):
    query rows averaged, key mass summed per block, so a pooled row still sums to 1."""
    factor = -(-max(image.shape) // side)
    if factor == 1:
        return image
    pad = [(0, -n % factor) for n in image.shape]
    blocks = np.pad(image, pad).reshape(-(-image.shape[0] // factor), factor, -(-image.shape[1] // factor), factor)
    rows = np.minimum(factor, image.shape[0] - factor * np.arange(blocks.shape[0]))  # real rows per block
    return blocks.sum(axis=(1, 3)) / rows[:, None]


def grids(rows: list[dict[str, Any]], load: Callable[[str, str], np.ndarray | None]) -> list[dict[str, Any]]:
    """Per map layer: the worst heads' reference / MLX / difference maps (batch 0), or why there is no picture.

    ``load(side, layer)`` returns a side's dumped map, or None when it was not kept.
    """
    from parity import plots

    out = []
    for row in rows:
        layer, heads = str(row["layer"]), worst_heads(row)
        entry = {"layer": layer, "heads": heads, "image": None, "note": ""}
        out.append(entry)
        try:
            ref, ours = load("ref", layer), load("mlx", str(row.get("mlx_layer") or layer))
        except InputError as err:
            entry["note"] = f"no picture: {err}"
            continue
        if ref is None or ours is None:
            entry["note"] = "no picture: the map dumps were not kept (--keep-tensors)"
            continue
        if ref.ndim != 4 or ref.shape != ours.shape:
            entry["note"] = f"no picture: maps shaped {list(ref.shape)} / {list(ours.shape)}"
            continue
        panels = [(f"head {h} (JS {row['attn_js_mean'][h]:.3g})", pooled(np.asarray(ref[0, h], np.float64)),
                   pooled(np.asarray(ours[0, h], np.float64))) for h in heads]
        entry["image"] = plots.attention_grid(panels)
        if max(ref.shape[2:]) > MAX_SIDE:
            entry["note"] = (f"maps {ref.shape[2]} x {ref.shape[3]} drawn in blocks (query rows averaged, key mass "
                             f"summed) to at most {MAX_SIDE} per side")
    return out


def text_table(rows: list[dict[str, Any]], failing_only: bool = False) -> str:
    """The per-head table of some map layer rows as aligned text (``parity attention``)."""
    heads = head_rows(rows)
    header = ["layer", "head", "verdict", *(h for _k, h, _v in heads[0]["values"])]
    lines = [[r["layer"], str(r["head"]), "FAIL " + ",".join(m.removeprefix("attn_") for m in r["failing"])
              if r["failing"] else "PASS", *(fmt(v) for _k, _h, v in r["values"])]
             for r in heads if r["failing"] or not failing_only]
    if not lines:
        return "no head breaks a limit"
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *lines])
