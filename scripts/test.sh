#!/usr/bin/env bash
# Set up (or reuse) .venv, then lint and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # the vLLM backend's own environment: tests/test_vllm.py runs it for real
export LASER_REQUIRE_VLLM=1  # so a missing vLLM environment fails those tests instead of skipping them
source scripts/env.sh
ruff check .
python -m pytest "$@"
