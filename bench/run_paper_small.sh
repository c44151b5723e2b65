#!/usr/bin/env bash
# The paper-small experiment (issue 20): LaSeR, then GRPO-only as a DVC experiment on the same seeds, data order
# and steps, in a clone of this repo at $1 (default ../paper-small-run), then bench/paper_small.py collects the
# numbers and the figure into bench/results/. Survives a stop: rerun the same command; DVC skips finished stages,
# train resumes from its last checkpoint (every 10 steps), rollout reuses the eval sets it finished.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$here/../paper-small-run}"
source "$here/scripts/env.sh"
export PATH="$here/.venv/bin:$PATH" PYTHONPATH="$work"
if [ ! -d "$work/.git" ]; then
  git clone -q "$here" "$work"
fi
cd "$work"
git -c user.name=laser -c user.email=laser@localhost checkout -q -B paper-small
if ! git log -1 --format=%s | grep -q "^paper-small: laser"; then
  python -c "from laser.config import apply_profile; apply_profile('params.yaml', 'profiles/paper-small.yaml')"
  # the models cache of this checkout: the built-in model is converted once
  python -c "import yaml; d = yaml.safe_load(open('params.yaml')); d['paths']['cache_dir'] = '$here/.cache'; yaml.safe_dump(d, open('params.yaml', 'w'), sort_keys=False)"
  dvc repro
  git add -A && git -c user.name=laser -c user.email=laser@localhost commit -qm "paper-small: laser"
fi
if ! dvc exp show --json 2>/dev/null | grep -q '"name": "grpo"'; then
  dvc exp run -S self_reward.enabled=false -n grpo
fi
python "$here/bench/paper_small.py" --run "$work" --out "$here/bench/results"
