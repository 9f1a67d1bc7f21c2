#!/usr/bin/env bash
# Build a wheel for every distribution in this repo (rllm-core, plugins/*, examples/*, rllm_tinker,
# rllm_verl) into one folder (default dist/wheels), ready for `pip install --find-links DIR rllm-core rllm-verl`.
# Builds from a clean copy of the files git would commit (tracked plus untracked, not ignored), so
# stale build/ and *.egg-info/ folders in the checkout never leak into a wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(mkdir -p "${1:-dist/wheels}" && cd "${1:-dist/wheels}" && pwd)"
VENV="${RLLM_VENV:-.venv}"
[[ "$VENV" = /* ]] || VENV="$PWD/$VENV"
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"

SRC="$(mktemp -d)"
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -e "$f" ]; then cp --parents -- "$f" "$SRC"; fi  # a tracked file deleted in the checkout is skipped
done

dists=(./)
for dir in plugins/*/ examples/*/ rllm_tinker/ rllm_verl/; do
  if [ -f "$SRC/$dir/pyproject.toml" ]; then dists+=("./$dir"); fi
done
rm -f "$OUT"/rllm_*.whl  # an older build's wheels would otherwise sit beside the new ones
# One pip run for all of them, with the builder's own setuptools when it meets every build-system.requires
# (pip checks); else in pip's isolated build environments, which fetch setuptools from the index.
build() { (cd "$SRC" && "$PY" -m pip wheel -q --no-deps --disable-pip-version-check -w "$OUT" "$@" "${dists[@]}"); }
build --no-build-isolation --check-build-dependencies 2>/dev/null || build
echo "built ${#dists[@]} wheels in $OUT:"
(cd "$OUT" && ls -1 *.whl | sed 's/^/  /')
