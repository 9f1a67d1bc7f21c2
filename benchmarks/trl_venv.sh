#!/usr/bin/env bash
# Source me: make sure the benchmarks' TRL venv exists (torch==2.13.0 pinned first, then trl, then
# this repo's packages editable) and set TRL_PYTHON to its interpreter. Shared by local_vs_trl/
# and learning/, so TRL is installed once.
TRL_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.trl-venv"
TRL_PYTHON="$TRL_VENV/bin/python"
if [ ! -x "$TRL_PYTHON" ]; then
  _root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  _pip=("$TRL_PYTHON" -m pip install -q --disable-pip-version-check)
  python3 -m venv "$TRL_VENV"
  "${_pip[@]}" "torch==2.13.0"
  "${_pip[@]}" trl "torch==2.13.0"
  "${_pip[@]}" -e "$_root" -e "$_root/plugins/torch" -e "$_root/examples/arith" "torch==2.13.0"
fi
