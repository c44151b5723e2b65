#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the whole pipeline through Prefect (DVC decides which stages are stale).
# Extra args go to the flow, e.g. `bash scripts/run.sh --profile smoke` or `--force train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
[ -d .dvc ] || dvc init -q --no-scm 2>/dev/null || true
python -m flows.pipeline "$@"
