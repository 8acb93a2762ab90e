"""The ``parity`` command line: one small module per command, each adding itself with ``register(subparsers)``.

Every command takes ``--component-module FILE`` (components defined outside this package),
``--hypotheses-module FILE`` (entries of the catalog ``parity explain`` tests), ``--threads N`` and ``--quiet``. The library never imports this package.

Exit codes: 0 pass, 1 parity failure, 2 usage or input error (one line naming the file, key or
layer), 3 internal error (a bug: the traceback is printed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from parity import registry, threads
from parity import thresholds as thresholds_mod
from parity.progress import Progress
from parity.vocab import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, InputError

#: Modules of this package that add subcommands, in ``--help`` order.
COMMANDS = ("list", "run", "report", "explain", "attention", "gate", "baseline", "calibrate", "bisect", "bundle",
            "mutate", "video", "clean")


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def common_options() -> argparse.ArgumentParser:
    """Options every command takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--component-module", action="append", default=[], metavar="FILE", type=Path,
                        help="a Python file defining COMPONENT(S): your own port's components (repeatable)")
    common.add_argument("--hypotheses-module", action="append", default=[], metavar="FILE", type=Path,
                        help="a Python file defining HYPOTHESIS/HYPOTHESES: your own entries of the catalog of "
                             "porting mistakes parity explain tests (repeatable)")
    common.add_argument("--threads", metavar="N",
                        help="threads for torch and BLAS (default: PARITY_THREADS, else one for a small reference "
                             "and the cores this process may use for a big one)")
    common.add_argument("--quiet", action="store_true", help="no progress output")
    return common


def thresholds_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--thresholds", type=Path, metavar="FILE",
                        help="thresholds layered over the harness's parity/thresholds.toml and your project's "
                             "(parity.toml or [tool.parity] in pyproject.toml, found from the current folder)")


def load_thresholds(args: argparse.Namespace) -> thresholds_mod.Thresholds:
    """The harness's thresholds, then the project's thresholds file, then ``--thresholds``."""
    files = [f for f in (thresholds_mod.project_file(Path.cwd()), getattr(args, "thresholds", None)) if f]
    return thresholds_mod.load(files, known_components=registry.available())


def html_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-html", action="store_true", help="do not render report.html and the index")


def write_html(args: argparse.Namespace, run_dir: Path | None) -> None:
    """Render the run folder's report.html pages and the index of ``--out`` (unless ``--no-html``)."""
    from parity import html_report

    if run_dir is None:
        return
    if args.no_html:
        print(f"HTML not written (--no-html): parity report {run_dir}", file=sys.stderr)
        return
    html_report.write_html_reports(run_dir, index_link=True)
    print(f"HTML: {run_dir}/*/report.html, index {html_report.write_index(Path(args.out))}")


def progress(args: argparse.Namespace) -> Progress:
    return Progress(quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parity", description="Compare MLX ports of video diffusion components "
                                     "against their diffusers references, layer by layer.", epilog=EXIT_CODES)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    for name in COMMANDS:
        importlib.import_module(f"parity.commands.{name}").register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``parity ARGS``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 with argparse's one-line message
    try:
        if not getattr(args, "worktree_component_modules", False):
            registry.use_files(args.component_module)
        if args.hypotheses_module:
            from parity.explain import catalog

            catalog.use_files(args.hypotheses_module)
        threads.configure(args.threads)
        return args.func(args)
    except InputError as err:
        print(f"parity: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # the user's file system: an output that cannot be written, a file that vanished
        where = f"{err.filename}: " if err.filename else ""
        print(f"parity: error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("parity: interrupted (an unfinished run folder is kept, marked INCOMPLETE)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - not the user's input: say so, with the traceback
        traceback.print_exc()
        print("parity: internal error: this is a bug in the harness or in a component definition; "
              "please report it with the traceback above", file=sys.stderr)
        return EXIT_INTERNAL


def add(sub: Any, common: argparse.ArgumentParser, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the common options and the exit codes in its epilog."""
    kwargs.setdefault("epilog", EXIT_CODES)
    return sub.add_parser(name, help=help, parents=[common], **kwargs)
