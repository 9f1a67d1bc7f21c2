#!/usr/bin/env bash
# Create (or update) ./.venv with rllm-core, every plugin in this repo, and the dev tools.
# Torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null
"${PIP[@]}" "torch==2.13.0"
pkgs=(-e ".[dev,parquet]")
for dir in plugins/*/ examples/*/ rllm_tinker/ rllm_verl/; do
  [ -f "$dir/pyproject.toml" ] || continue
  # A plugin's `test` extra holds what its tests need beyond its own dependencies (e.g. peft).
  if grep -q '^test = ' "$dir/pyproject.toml"; then pkgs+=(-e "${dir%/}[test]"); else pkgs+=(-e "$dir"); fi
done
"${PIP[@]}" "${pkgs[@]}" "torch==2.13.0"
echo "ready: $VENV ($("$VENV/bin/python" -c 'import rllm_core; print("rllm-core", rllm_core.__version__)'))"
