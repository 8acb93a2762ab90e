"""``parity list``: the registered components."""
from __future__ import annotations

import argparse
from typing import Any

from parity import registry
from parity.commands import add
from parity.vocab import EXIT_PASS


def run(args: argparse.Namespace) -> int:
    for name in registry.available():
        print(f"{name:20s} {registry.get(name).description}")
    return EXIT_PASS


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    add(sub, common, "list", "list the components (ours, installed packages', --component-module files')").set_defaults(func=run)
