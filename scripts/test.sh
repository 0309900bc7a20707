#!/usr/bin/env bash
# The whole test suite, on a fresh machine too (creates .venv when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh test
exec .venv/bin/python -m pytest -q "$@"
