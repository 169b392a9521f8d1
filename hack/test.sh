#!/usr/bin/env bash
# The suite as `make test` runs it: two pytest processes at once. tests/e2e (the real node: most of
# its time is spent waiting for pods to start, for the Job controller's back-off and for restarted
# ranks to meet) runs beside tests/unit and tests/integration, its output kept in
# build/e2e-pytest.log and printed when both are done. Both use the real control planes and
# MinIO servers of their own (free ports, their own folders), so neither sees the other's.
# BESIDE names unit test files that run in the e2e process instead (they need no control plane
# and take minutes: the two processes then end about together; CI's stop at 5082d8f measured
# 2306 s for unit + integration against 1568 s for e2e).
# Arguments go to both pytest runs; with a test path among them, one plain pytest run instead.
set -uo pipefail
cd "$(dirname "$0")/.."
pytest=${PYTEST:-.venv/bin/pytest}

for arg in "$@"; do
    if [[ $arg != -* && -e ${arg%%::*} ]]; then
        exec "$pytest" "$@"
    fi
done

beside=(tests/unit/test_train_distributed.py)
# torch's OpenMP threads wait for work by spinning, which on a machine this busy (two pytest
# processes, their servers, training subprocesses) takes the cores from the processes with work:
# 80 steps of the local job took 87-99 s with two busy processes beside them, 55-60 s with passive
# waiting (50 s with one thread), and 27 s against 28 s on an idle machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

mkdir -p build
log=build/e2e-pytest.log
"$pytest" "$@" tests/e2e "${beside[@]}" >"$log" 2>&1 &
e2e=$!
# a Ctrl-C or a CI stop ends both runs
trap 'kill "$e2e" 2>/dev/null' EXIT INT TERM

"$pytest" "$@" tests/unit tests/integration "${beside[@]/#/--ignore=}"
rest=$?
wait "$e2e"
e2e_rc=$?
trap - EXIT INT TERM

echo
echo "=========== tests/e2e and ${beside[*]} (ran beside the above) ==========="
cat "$log"
echo "tests/unit + tests/integration: exit $rest; tests/e2e (and ${beside[*]}): exit $e2e_rc"
if ((rest != 0)); then exit "$rest"; fi
exit "$e2e_rc"
