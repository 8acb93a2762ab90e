"""``parity dump-ref`` and ``parity compare``: reference bundles (see :mod:`parity.bundle`)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from parity import bundle, html_report
from parity.commands import add, load_thresholds, non_negative_int, progress, thresholds_option
from parity.vocab import DTYPES, EXIT_FAIL, EXIT_PASS


def dump_ref(args: argparse.Namespace) -> int:
    bundle.dump_reference(args.component, args.out, dtype=args.dtype, seed=args.seed, config_path=args.config,
                          weights_path=args.weights, stats_only=args.stats_only, max_weights_mb=args.max_weights_mb,
                          progress=progress(args))
    return EXIT_PASS


def compare(args: argparse.Namespace) -> int:
    result = bundle.compare_bundle(args.component, args.ref_bundle, out_dir=args.out, config_path=args.config,
                                   weights_path=args.weights, use_bundle_config=args.use_bundle_config,
                                   thresholds=load_thresholds(args), progress=progress(args))
    if result.report_dir is not None:
        html_report.write_html_report(result.report_dir)
    return EXIT_PASS if result.verdict == "PASS" else EXIT_FAIL


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(sub, common, "dump-ref", "run only the PyTorch reference and write a portable reference bundle",
            description="Run only the reference of COMPONENT and write a bundle (tensors, inputs, weights or their "
                        "fingerprint, manifest) that `parity compare` reads.")
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to create (must not exist, or be empty)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="precision of the reference (default float32)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--config", type=Path, help="a component config, or a diffusers config.json / model folder")
    p.add_argument("--weights", type=Path, help="a real diffusers checkpoint (.safetensors file or model folder)")
    p.add_argument("--stats-only", action="append", metavar="GLOB",
                   help="keep only statistics and a sample of reference layers matching GLOB (repeatable)")
    p.add_argument("--max-weights-mb", type=float, default=bundle.DEFAULT_MAX_WEIGHTS_MB,
                   help=f"leave checkpoint weights larger than this out of the bundle, keeping their fingerprint "
                        f"(default {bundle.DEFAULT_MAX_WEIGHTS_MB}; random weights are always included)")
    p.set_defaults(func=dump_ref)

    p = add(sub, common, "compare", "compare the MLX side against a reference bundle (no PyTorch needed)",
            description="Run only the MLX side of COMPONENT on a bundle's inputs and weights and compare against its "
                        "tensors; same report as `parity run`. A bundle made for another component, config, weights "
                        "or inputs, or whose files do not match its manifest, is refused (exit 2).")
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("--ref-bundle", type=Path, required=True, help="a bundle written by `parity dump-ref`")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run folders go (default reports/)")
    p.add_argument("--config", type=Path, help="our config, if not the component's default (must match the bundle's)")
    p.add_argument("--use-bundle-config", action="store_true", help="take the config from the bundle instead of checking ours")
    p.add_argument("--weights", type=Path, help="the checkpoint, when the bundle holds only its fingerprint")
    thresholds_option(p)
    p.set_defaults(func=compare)
