#!/usr/bin/env bash
# The chaos soak of tests/test_chaos.py (spawn-research scenario 19), run for
# longer than CI does: producers, reserve/ack and get consumers, while the
# broker and the clients are SIGKILLed and SIGSTOPped at random; the test
# prints a one-line summary (kills, stops, messages, losses allowed to get).
#
#   bench/chaos.sh [SECONDS] [SEED]      (default 120 s, a random seed; run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
export BROKERQ_TEST_CHAOS_SECONDS=${1:-120}
if [ -n "${2:-}" ]; then export BROKERQ_TEST_CHAOS_SEED=$2; fi
exec .venv/bin/python -m pytest tests/test_chaos.py -q -s -p no:cacheprovider \
  --timeout "$((BROKERQ_TEST_CHAOS_SECONDS * 2 + 120))"
