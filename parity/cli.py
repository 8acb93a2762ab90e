"""parity: compare MLX ports of video diffusion components against their diffusers references.

Exit codes: 0 every comparison passed, 1 a parity failure, 2 a usage or input error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from parity import component as registry
from parity.component import DTYPES
from parity.thresholds import ThresholdsError
from parity.weights import WeightLoadError

#: Modules that add subcommands: each defines ``register(subparsers)``.
COMMAND_MODULES = ("parity.html_report", "parity.bisect", "parity.gate", "parity.bundle")

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input files: reported on stderr with exit code 2."""


def _components(names: list[str]) -> list[str]:
    if not names or names == ["all"]:
        return registry.available()
    for name in names:
        registry.get(name)  # raises UnknownComponentError with the list of components
    return names


def _dtypes(value: str) -> list[str]:
    return list(DTYPES) if value == "all" else [value]


def cmd_list(args: argparse.Namespace) -> int:
    for name in registry.available():
        print(f"{name:18s} {registry.get(name).description}")
    return EXIT_PASS


def cmd_run(args: argparse.Namespace) -> int:
    from parity.runner import run_many

    names = _components(args.components)
    if (args.config or args.weights) and len(names) != 1:
        raise UsageError("--config/--weights apply to one component; name exactly one")
    results = run_many(names, _dtypes(args.dtype), out_dir=args.out, seed=args.seed,
                       config_path=args.config, weights_path=args.weights,
                       streaming=args.streaming, stats_only=args.stats_only)
    failed = [f"{r.comparison.component} {r.comparison.dtype} (first divergence: {r.first_divergence})"
              for r in results if r.verdict != "PASS"]
    print(f"\n{len(results) - len(failed)}/{len(results)} component runs pass" + (":" if failed else ""))
    for line in failed:
        print(f"  FAIL {line}")
    return EXIT_FAIL if failed else EXIT_PASS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description=__doc__.splitlines()[0],
                                     epilog="Exit codes: 0 pass, 1 parity failure, 2 usage or input error.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the components")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="compare components against their PyTorch references and write reports")
    p.add_argument("components", nargs="*", metavar="COMPONENT", help="component names, or 'all' (default: all)")
    p.add_argument("--dtype", default="float32", choices=[*DTYPES, "all"], help="precision to compare in (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where run directories go (default reports/)")
    p.add_argument("--config", type=Path, help="a diffusers config.json (or component config) instead of the tiny default")
    p.add_argument("--weights", type=Path, help="a real diffusers checkpoint (.safetensors file or model folder)")
    p.add_argument("--streaming", action="store_true",
                   help="keep no tensor in memory: write each one to disk as captured, judge MLX taps as they arrive")
    p.add_argument("--stats-only", action="append", metavar="GLOB",
                   help="keep only statistics and a small sample of layers matching GLOB (repeatable; implies --streaming)")
    p.set_defaults(func=cmd_run)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, registry.UnknownComponentError, WeightLoadError, ThresholdsError, FileNotFoundError, ValueError) as err:
        print(f"parity: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
