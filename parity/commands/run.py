"""``parity run``: compare components against their references, write reports and HTML."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import registry
from parity.commands import add, html_option, load_thresholds, non_negative_int, progress, thresholds_option, write_html
from parity.dumps import writable_folder
from parity.report import unchecked
from parity.runner import KEEP_TENSORS, run_many
from parity.vocab import DTYPE_CHOICES, EXIT_FAIL, EXIT_PASS, UsageError, dtypes


def run(args: argparse.Namespace) -> int:
    names = registry.select(args.components)
    if (args.config or args.weights) and len(names) != 1:
        raise UsageError("--config/--weights apply to one component; name exactly one")
    overrides = None
    if args.attention_maps:
        without = [n for n in names if "attention_maps" not in registry.get(n).config_model.model_fields]
        if without:
            raise UsageError(f"--attention-maps: {', '.join(without)} capture(s) no attention maps; name components "
                             "that do (config key attention_maps)")
        overrides = {"attention_maps": True}
    writable_folder(args.out, "--out")
    limits = load_thresholds(args)
    chosen = dtypes(args.dtype)
    results = run_many(names, chosen, out_dir=args.out, seed=args.seed, config_path=args.config,
                       weights_path=args.weights, streaming=args.streaming, stats_only=args.stats_only,
                       thresholds=limits, keep_tensors=args.keep_tensors, progress=progress(args),
                       overrides=overrides, coverage=args.coverage)
    failed = [f"{r.report.get('variant') or r.comparison.component} {r.comparison.dtype} "
              f"(first divergence: {r.first_divergence})" for r in results if r.verdict != "PASS"]
    print(f"\n{len(results) - len(failed)}/{len(results)} component runs pass" + (":" if failed else ""))
    for line in failed:
        print(f"  FAIL {line}")
    for note in unchecked(set(chosen)):
        print(f"note: {note} (--dtype all runs both)")
    write_html(args, Path(results[0].report_dir).parent if results and results[0].report_dir else None)
    return EXIT_FAIL if failed else EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "run", "compare components against their PyTorch references and write reports",
            description="Run each component in each dtype, judge every layer, write reports/<run-id>/<component>-"
                        "<dtype>/ (report.json/csv/html, .npy dumps, manifest) and reports/index.html.")
    p.add_argument("components", nargs="*", metavar="COMPONENT", help="component names, or 'all' (default: all)")
    p.add_argument("--dtype", default="all", choices=DTYPE_CHOICES,
                   help="precision to compare in (default all: float32 and bfloat16, as make parity)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run folders go (default reports/)")
    p.add_argument("--config", type=Path, help="a component config, or a diffusers config.json / model folder")
    p.add_argument("--weights", type=Path, help="a real diffusers checkpoint (.safetensors file or model folder)")
    p.add_argument("--streaming", action="store_true",
                   help="keep no tensor in memory: write each one to disk as captured, judge MLX tensors as they arrive")
    p.add_argument("--stats-only", action="append", metavar="GLOB",
                   help="keep only statistics and a small sample of layers matching GLOB (repeatable; implies --streaming)")
    p.add_argument("--keep-tensors", choices=KEEP_TENSORS, default="all",
                   help="which .npy dumps the report folder keeps (default all; failing: those of failing layers)")
    p.add_argument("--coverage", action="store_true",
                   help="also run each component's coverage cells (config variants, float32), as the gate does")
    p.add_argument("--attention-maps", action="store_true",
                   help="record and judge attention probability maps per head even at large token counts "
                        "(config attention_maps true; default \"auto\": only while a map holds at most 2^24 probabilities)")
    html_option(p)
    thresholds_option(p)
    p.set_defaults(func=run)
