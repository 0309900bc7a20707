#!/usr/bin/env bash
# Creates .venv with pip when it is missing. torch goes first so that no later package pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # Here torch 2.13.0 comes as a local CPU wheel; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  # (or a CUDA index) so that pip does not fetch the multi-GB default build.
  .venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
extras=${1:-test}
stamp=".venv/.installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[$extras]"
  touch "$stamp"
fi
