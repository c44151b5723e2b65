# Sourced by the scripts: keep every cache inside the project and turn off telemetry.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LASER_CACHE="$ROOT/.cache"
export PREFECT_HOME="$LASER_CACHE/prefect"
mkdir -p "$PREFECT_HOME"  # Prefect creates its home without parents: a fresh clone has no .cache yet
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_LEVEL="${PREFECT_LOGGING_LEVEL:-WARNING}"
export TORCH_EXTENSIONS_DIR="$LASER_CACHE/torch_extensions"  # DeepSpeed's CPU ops: built once (50-70 s)
export HF_HOME="$LASER_CACHE/huggingface"
export MPLCONFIGDIR="$LASER_CACHE/matplotlib"  # the report's plots: font cache
export PIP_CACHE_DIR="$LASER_CACHE/pip"
export HF_HUB_DISABLE_TELEMETRY=1
export DVC_NO_ANALYTICS=1
export DVC_SITE_CACHE_DIR="$LASER_CACHE/dvc-site"
export DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$ROOT/.venv/bin:$PATH"
