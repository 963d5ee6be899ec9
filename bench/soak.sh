#!/usr/bin/env bash
# The crash soak of tests/test_crash.py, run for longer than CI does:
# producers and reserve/ack consumers while the broker is SIGKILLed every
# 1.5 s; the checker proves no acknowledged message was lost and none was
# delivered twice beyond what at-least-once allows.
#
#   bench/soak.sh [SECONDS]      (default 120; run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
export BROKERQ_TEST_SOAK_SECONDS=${1:-120}
exec .venv/bin/python -m pytest tests/test_crash.py -k soak -q -p no:cacheprovider \
  --timeout "$((BROKERQ_TEST_SOAK_SECONDS * 3 + 60))"
