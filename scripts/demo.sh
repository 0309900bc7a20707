#!/usr/bin/env bash
# Main job: headless box + 5 clicks through real MRML (slicer-core); outputs in out/demo (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh mrml
exec .venv/bin/segvolgru demo -o "${1:-out/demo}"
