#!/usr/bin/env bash
# Set up (or reuse) .venv, then lint and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
ruff check .
python -m pytest "$@"
