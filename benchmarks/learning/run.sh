#!/usr/bin/env bash
# The learning benchmark: rllm's torch backend and TRL's GRPOTrainer on the main job's multi-token
# task, seeds 0-2 (TRL in the benchmarks' own venv, see ../trl_venv.sh). Arguments go to bench.py.
set -euo pipefail
cd "$(dirname "$0")"
source ../trl_venv.sh
exec "$TRL_PYTHON" bench.py "$@"
