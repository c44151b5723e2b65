#!/usr/bin/env bash
# The paper-small experiment (issue 20): profiles/paper-small.yaml in a clone of this repo at $1 (default
# ../paper-small-run), one `dvc repro` for Base and every training variant of the profile (LaSeR and GRPO-only:
# dvc.yaml's train@<v> / rollout@<v>), then bench/paper_small.py collects the numbers and the figure into
# bench/results/<name> ($2, default paper_small). Extra params go in $PAPER_SMALL_SET, `key=value` pairs as
# `dvc exp run -S` takes them (e.g. "generation.backend=vllm train.seed=1"). Survives a stop: rerun the same
# command; DVC skips finished stages, train resumes from its last checkpoint (every 10 steps), rollout reuses the
# eval sets it finished.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$here/../paper-small-run}"
name="${2:-paper_small}"
source "$here/scripts/env.sh"
[ -x "$here/.venv-vllm/bin/python" ] || bash "$here/scripts/setup_vllm.sh"  # the profile's generation backend
export PATH="$here/.venv/bin:$PATH" PYTHONPATH="$work"
if [ ! -d "$work/.git" ]; then
  git clone -q "$here" "$work"
fi
cd "$work"
if ! git log -1 --format=%s | grep -q "^paper-small: params"; then
  git -c user.name=laser -c user.email=laser@localhost checkout -q -B paper-small
  python - "$here" ${PAPER_SMALL_SET:-} <<'EOF'
import sys
import yaml
from laser.config import apply_profile, build, Params
apply_profile("params.yaml", "profiles/paper-small.yaml")
data = yaml.safe_load(open("params.yaml"))
data["paths"]["cache_dir"] = f"{sys.argv[1]}/.cache"  # the models cache of this checkout: converted once
data["generation"]["vllm"]["python"] = f"{sys.argv[1]}/.venv-vllm/bin/python"
for pair in sys.argv[2:]:
    key, value = pair.split("=", 1)
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
build(Params, data)  # a bad key fails here, before any stage
yaml.safe_dump(data, open("params.yaml", "w"), sort_keys=False)
EOF
  git add params.yaml && git -c user.name=laser -c user.email=laser@localhost commit -qm "paper-small: params"
fi
start=$(date +%s)
dvc repro
echo "dvc repro: $(( $(date +%s) - start )) s (this attempt)"
python "$here/bench/paper_small.py" --run "$work" --out "$here/bench/results" --name "$name"
