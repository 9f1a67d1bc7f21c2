#!/usr/bin/env bash
# Create the benchmark's own venv (torch==2.13.0 pinned first, then trl, then this repo's
# packages editable) and run the comparison. Extra arguments go to bench.py.
set -euo pipefail
cd "$(dirname "$0")"
VENV=../.trl-venv  # shared with benchmarks/learning
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" trl "torch==2.13.0"
  "${PIP[@]}" -e ../.. -e ../../plugins/torch -e ../../examples/arith "torch==2.13.0"
fi
exec "$VENV/bin/python" bench.py "$@"
