#!/usr/bin/env python
"""Peak memory of ``wan_causal``'s cached path over growing chunk counts: bounded by the cache window.

    python bench/causal_memory.py [--chunks 4,8,16,32] [--window 8] [--json FILE]

Our MLX ``CausalWanTransformer.stream`` (random weights, no reference) generates chunk after chunk, one 2-frame
causal block per chunk, each chunk's step then the commit of its clean latents at t = 0, with inputs drawn per
chunk and outputs dropped, so only the cache can grow. Per run: MLX's peak memory (``mx.get_peak_memory``, reset
before the run) and the size of the keys/values the cache holds at the end, with the window and without. Not a
test; prints one Markdown table and the environment (CPU, BLAS, ``OPENBLAS_*`` variables).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run_bench import machine  # noqa: E402
from mlx_impl.causal import CausalDims, CausalWanTransformer, Chunk  # noqa: E402
from parity import threads  # noqa: E402

DIMS = CausalDims(num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                  freq_dim=64, ffn_dim=512, num_layers=4, num_frame_per_block=2)
LATENT = (16, 16)  # 8 x 8 = 64 tokens per frame
TEXT_LEN = 16


def model() -> CausalWanTransformer:
    causal = CausalWanTransformer(DIMS)
    mx.random.seed(0)
    causal.update(tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(causal.parameters())]))
    mx.eval(causal.parameters())
    return causal


def chunks(count: int):
    block = DIMS.num_frame_per_block
    for _ in range(count):
        shape = (1, block, *LATENT, DIMS.in_channels)
        yield Chunk(mx.random.normal(shape), mx.full((1, block), 500.0), mx.random.normal(shape))


def cache_mb(frames: int) -> float:
    """Keys and values of ``frames`` cached frames, every layer, float32."""
    tokens = frames * (LATENT[0] // 2) * (LATENT[1] // 2)
    return 2 * DIMS.num_layers * tokens * DIMS.dim * 4 / 2**20


def measure(causal: CausalWanTransformer, count: int, window: int | None) -> dict:
    text = mx.random.normal((1, TEXT_LEN, DIMS.text_dim))
    mx.eval(text)
    mx.reset_peak_memory()
    for _ in causal.stream(chunks(count), text, window):
        pass
    frames = count * DIMS.num_frame_per_block
    kept = frames if window is None else min(frames, window)
    return {"chunks": count, "frames": frames, "window": window, "peak_mb": mx.get_peak_memory() / 2**20,
            "cache_mb": cache_mb(kept)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="4,8,16,32", help="chunk counts, comma-separated")
    parser.add_argument("--window", type=int, default=8, help="cache window in frames")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args()
    causal = model()
    rows = [measure(causal, int(n), window) for window in (args.window, None) for n in args.chunks.split(",")]
    env = {**machine(), "threads": threads.current()}
    print(f"machine: {env['cpu']}, {env['nproc']} cores; mlx {env['versions']['mlx']}, BLAS {env['versions']['mlx_blas']}; "
          f"OPENBLAS_*/OMP_*/MKL_*: {env['threads']['env'] or 'unset'}; threadpoolctl: "
          + "; ".join(f"{p['internal_api']} {p['version']} x{p['num_threads']}" for p in env["threads"]["blas"]))
    print("\n| window (frames) | chunks | frames | MLX peak MB | cached keys/values MB |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['window'] or 'none'} | {row['chunks']} | {row['frames']} | {row['peak_mb']:.1f} | {row['cache_mb']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
