#!/usr/bin/env bash
# Throughput against TRL on the one-token arith task (TRL in the benchmarks' own venv, see
# ../trl_venv.sh). Arguments go to bench.py.
set -euo pipefail
cd "$(dirname "$0")"
source ../trl_venv.sh
exec "$TRL_PYTHON" bench.py "$@"
