"""pytest plugin for the mutation check: run a mutant's tests fastest first, with the component imports loaded.

mutmut's fork runner orders each mutant's tests by their measured duration, so a mutant is
usually killed by a quick unit test before any component run starts; its fork-server runner
(which this project needs: MLX cannot compute in a process forked after it computed) does not.
This restores that order from mutmut's own measurements (``mutmut-stats.json`` in the folder the
tests run from). The fork server loads this plugin before it forks, so the reference runners of
the components the tests run (and the diffusers modules they import) are imported once there,
not again in every mutant's process. Used only by the mutation check (``pytest_add_cli_args``).
"""
import importlib
import json
from pathlib import Path

for module in ("reference_runners.rope", "reference_runners.time_embedding"):  # see above
    importlib.import_module(module)


def pytest_collection_modifyitems(items):
    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid, 0.0))
