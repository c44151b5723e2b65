"""Collect the paper-small experiment (bench/run_paper_small.sh) into bench/results/paper_small.{json,png}.

    python bench/paper_small.py --run ../paper-small-run [--out bench/results] [--laser-rev paper-small]
                                [--grpo-exp grpo] [--name paper_small]

The run directory holds LaSeR at its ``paper-small`` branch head and GRPO-only as the DVC experiment ``grpo``,
both rolled out on the same held-out set. Reads each variant's rollouts (``dvc.api`` at its revision; the base
model's from the LaSeR revision) and evaluates them all with this checkout's ``stages.evaluate`` (the macro
headline, 95% bootstrap intervals over problems, the collapse verdict), and ``train/steps.jsonl`` from git for
the per-step curves (batch self-verification AUROC and F1, reward) of LaSeR vs GRPO. Writes the table (rows
Base / GRPO / LaSeR: accuracy avg@K, maj@K, weighted maj@K, paper-F1, AUROC, ECE) with a header naming the model,
steps, seeds, git revisions and params digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from laser.config import Params, build
from laser.io import atomic_path, atomic_write_json


def git_json(run: Path, rev: str, path: str):
    text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=run, capture_output=True, text=True,
                          check=True).stdout
    return json.loads(text) if path.endswith(".json") else [json.loads(line) for line in text.splitlines()]


def exp_rev(run: Path, name: str) -> str:
    out = subprocess.run(["dvc", "exp", "show", "--json"], cwd=run, capture_output=True, text=True, check=True)
    for rev in json.loads(out.stdout):
        for exp in rev.get("experiments") or []:
            for r in exp.get("revs") or []:
                if r.get("name") == name:
                    return r["rev"]
    raise SystemExit(f"no DVC experiment {name!r} in {run}")


def figure(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("sv_auroc", "batch self-verification AUROC"), ("sv_f1", "batch self-verification paper-F1"),
              ("reward_mean", "verifier reward (accuracy of the step's rollouts)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for name, records in curves.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                window = 8  # 16 samples a step: a running mean shows the trend
                smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                          for i in range(len(values))]
                line, = ax.plot(steps, smooth, label=f"{name} (mean of {window} steps)")
                ax.plot(steps, values, alpha=0.2, color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)


def read_rollouts_at(run: Path, rev: str, model: str, eval_sets: list[str]) -> dict:
    """``{eval_set: pyarrow.Table}`` of ``rollouts/<model>`` as DVC recorded it at git revision ``rev``."""
    import io

    import dvc.api
    import pyarrow.parquet as pq

    tables = {}
    for eval_set in eval_sets:
        with dvc.api.open(f"rollouts/{model}/{eval_set}.parquet", repo=str(run), rev=rev, mode="rb") as f:
            tables[eval_set] = pq.read_table(io.BytesIO(f.read()))
    return tables


def evaluate_variants(run: Path, revs: dict[str, str], params) -> dict:
    """Every variant's rollouts (and the base model's, from the LaSeR revision) through this checkout's evaluate:
    one code version computes the table, its 95% intervals and the collapse verdicts."""
    from collections import Counter

    from laser.answers import verifier_equivalent
    from stages.evaluate import evaluate

    eval_sets = sorted(params.prepare.eval_sets)
    rollouts = {"base": read_rollouts_at(run, revs["laser"], "base", eval_sets)}
    for name, rev in revs.items():
        rollouts[name] = read_rollouts_at(run, rev, "trained", eval_sets)
    unjudged: Counter = Counter()
    equivalent = verifier_equivalent(params.verifier.timeout_s, params.verifier.num_workers, unjudged)
    result = evaluate(rollouts, params.evaluate, equivalent=equivalent)
    out = {}
    for name, mm in result.metrics["models"].items():
        head = mm["headline"]["macro"]
        overall = mm["overall"]
        out[name] = {**{column: head[key] for column, key in HEADLINE.items()},
                     "ci95": overall["ci95"], "sv_collapse": overall["sv_collapse"],
                     "sv_auroc_answered": overall["self_verification"]["answered"]["auroc"]}
    return out


HEADLINE = {"accuracy": "avg@K", "maj": "maj@K", "weighted_maj": "weighted_maj@K", "sv_f1": "sv_f1",
            "sv_auroc": "sv_auroc", "sv_ece": "sv_ece"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--laser-rev", default="paper-small", help="the git revision of the LaSeR run")
    parser.add_argument("--grpo-exp", default="grpo", help="the DVC experiment of the GRPO-only run")
    parser.add_argument("--name", default="paper_small", help="results file stem: <out>/<name>.json/.png")
    args = parser.parse_args()
    revs = {"laser": args.laser_rev, "grpo": exp_rev(args.run, args.grpo_exp)}
    params_text = subprocess.run(["git", "show", f"{args.laser_rev}:params.yaml"], cwd=args.run,
                                 capture_output=True, text=True, check=True).stdout
    params = build(Params, yaml.safe_load(params_text))
    table = evaluate_variants(args.run, revs, params)
    curves = {name: git_json(args.run, rev, "train/steps.jsonl") for name, rev in revs.items()}
    train = {name: git_json(args.run, rev, "train/metrics.json") for name, rev in revs.items()}
    result = {
        "header": {"model": params.model.name, "steps": params.train.steps,
                   "seeds": {"train": params.train.seed, "rollout": params.rollout.seed},
                   "git_revs": {name: subprocess.run(["git", "rev-parse", rev], cwd=args.run, capture_output=True,
                                                     text=True, check=True).stdout.strip()
                                for name, rev in revs.items()},
                   "params_digest": hashlib.sha256(params_text.encode()).hexdigest()[:12],
                   "variants_differ_in": "self_reward.enabled (true: LaSeR, false: GRPO-only)"},
        "table": table, "K": params.rollout.samples_per_problem,
        "eval": f"held-out set(s) {sorted(params.prepare.eval_sets)} (data/stats.json held_out); macro-average; "
                "ci95: bootstrap over problems of the pooled samples",
        "train_seconds": {name: t.get("gen_seconds_total", 0) + t.get("train_seconds_total", 0)
                          for name, t in train.items()},
        "steps": {name: t.get("steps") for name, t in train.items()},
        "params_yaml": params_text,
        "goals": {"laser_sv_auroc": 0.80, "laser_sv_f1": 0.70, "grpo_sv_auroc": "near 0.5",
                  "laser_accuracy_vs_grpo": "within 2 points or better", "laser_weighted_maj_vs_maj": ">="},
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(args.out / f"{args.name}.json", result)
    figure(curves, args.out / f"{args.name}.png")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
