#!/usr/bin/env bash
# The whole test suite (the README's test command; CI runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLLM_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q "$@"
