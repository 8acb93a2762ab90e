#!/usr/bin/env bash
# The mutation check of the harness's judging core: mutmut mutates the judging modules of parity/
# ([tool.mutmut] in pyproject.toml) and runs the fast judging tests against every mutant.
# Not part of `make test` (a full run takes hours on 2 cores); docs/mutation.md has the last result.
#
#   scripts/mutation_check.sh                 a fresh full run (removes mutants/ first)
#   MUTATION_KEEP=1 scripts/mutation_check.sh  reuse mutants/: only new or changed mutants run
#   scripts/mutation_check.sh 'parity.gate.*'  (re)run the mutants matching these names
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-mutmut}
if [ "${MUTATION_KEEP:-0}" != 1 ] && [ $# -eq 0 ]; then
    rm -rf mutants
fi
started=$(date +%s)
"$MUTMUT" run "$@" || true  # its exit status says nothing about the score; the summary below does
echo "wall time: $(( $(date +%s) - started ))s"
"$MUTMUT" export-cicd-stats >/dev/null
python3 - <<'PY'
import json
s = json.load(open("mutants/mutmut-cicd-stats.json"))
detected = s["killed"] + s["timeout"]
print(f"mutants {s['total']}: killed {s['killed']}, timeout {s['timeout']}, survived {s['survived']}, "
      f"no tests {s['no_tests']}, suspicious {s['suspicious']}, segfault {s['segfault']}")
print(f"score (killed + timeout) / total: {100 * detected / max(s['total'], 1):.1f}%")
PY
echo "survivors (mutmut show NAME for the diff):"
"$MUTMUT" results | grep -v ": killed$" || true
