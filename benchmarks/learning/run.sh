#!/usr/bin/env bash
# The learning benchmark: rllm's torch backend and TRL's GRPOTrainer on the main job's multi-token
# task, seeds 0-2. TRL goes into the benchmarks' own venv (benchmarks/.trl-venv: torch==2.13.0
# pinned first, then trl, then this repo's packages editable). Extra arguments go to bench.py.
set -euo pipefail
cd "$(dirname "$0")"
VENV=../.trl-venv
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" trl "torch==2.13.0"
  "${PIP[@]}" -e ../.. -e ../../plugins/torch -e ../../examples/arith "torch==2.13.0"
fi
exec "$VENV/bin/python" bench.py "$@"
