#!/usr/bin/env bash
# The mutation check of the harness's judging core: mutmut mutates the judging modules of parity/
# ([tool.mutmut] in pyproject.toml) and runs the fast judging tests against every mutant.
# Not part of `make test` (a full run takes hours on 2 cores); docs/mutation.md has the last result.
#
#   scripts/mutation_check.sh                 a fresh full run (removes mutants/ first)
#   MUTATION_KEEP=1 scripts/mutation_check.sh  reuse mutants/: only new or changed mutants run
#   scripts/mutation_check.sh 'parity.gate.*'  (re)run the mutants matching these names
#   MUTATION_CHILDREN=1 ...                    at most this many mutants at once (default: one per CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-mutmut}
if [ "${MUTATION_KEEP:-0}" != 1 ] && [ $# -eq 0 ]; then
    rm -rf mutants
fi
started=$(date +%s)
"$MUTMUT" run ${MUTATION_CHILDREN:+--max-children "$MUTATION_CHILDREN"} "$@" || true  # its exit status says nothing about the score; the summary below does
echo "wall time: $(( $(date +%s) - started ))s"
"$MUTMUT" results --all true > mutants/results.txt
python3 - <<'PY'
import collections
# "    parity.compare.x_f__mutmut_3: killed" -> per module: status counts
counts = collections.defaultdict(collections.Counter)
for line in open("mutants/results.txt"):
    name, _, status = line.strip().rpartition(": ")
    if name.startswith("parity."):
        counts[name.split(".")[1]][status] += 1
total = collections.Counter()
for c in counts.values():
    total.update(c)
for module, c in sorted(counts.items()) + [("total", total)]:
    checked = sum(c.values()) - c["not checked"] - c["skipped"]
    if not checked:
        continue
    detected = c["killed"] + c["timeout"]
    rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("killed", "timeout", "not checked"))
    print(f"{module:12} {detected}/{checked} killed or timed out ({100 * detected / checked:.1f}%)"
          + (f"; {rest}" if rest else ""))
PY
echo "survivors (mutmut show NAME for the diff):"
"$MUTMUT" results | grep -v ": killed$\|: not checked$" || true
