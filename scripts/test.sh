#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy) and run the whole test suite (unit, integration on a
# tiny random Llama, end-to-end on the real default model). GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy src
.venv/bin/python -m pytest -q -ra --durations=10 "$@"
