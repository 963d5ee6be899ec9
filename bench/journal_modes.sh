#!/usr/bin/env bash
# brokerq throughput by journal mode, each run beside redis (for the ratio).
#
#   bench/journal_modes.sh [WORKLOADS]     (default: b; run from the project root,
#                                          after ../shared/bench/setup.sh)
#
# One run of ../shared/bench/peers.py per mode: no journal, then --fsync
# never, batch and always. Quote each mode as its brokerq / redis ratio from
# its own run (bench/README.md says why).
set -euo pipefail
cd "$(dirname "$0")/.."
workloads=${1:-b}
py=.bench-venv/bin/python
for mode in no-journal never batch always; do
  if [ "$mode" = no-journal ]; then
    export BROKERQ_JOURNAL=0; unset BROKERQ_FSYNC || true
  else
    export BROKERQ_JOURNAL=1 BROKERQ_FSYNC=$mode
  fi
  echo "## $mode"
  $py ../shared/bench/peers.py --peers brokerq,redis --workloads "$workloads" --no-floor 2>/dev/null \
    | grep -E '^\| (brokerq|redis) '
done
