"""Collect the paper-small experiment (bench/run_paper_small.sh) into bench/results/paper_small.{json,png}.

    python bench/paper_small.py --run ../paper-small-run [--out bench/results]

The run directory holds LaSeR at its ``paper-small`` branch head and GRPO-only as the DVC experiment ``grpo``;
both evaluated against the same base rollouts. Reads each one's ``eval/summary.json``, ``eval/metrics.json``
(headline per eval set) and ``train/steps.jsonl`` from git (``git show <rev>:<path>``), and writes the table
(rows Base / GRPO / LaSeR: accuracy avg@K, maj@K, weighted maj@K, paper-F1, AUROC, ECE) and per-step curves
(batch self-verification AUROC and F1, reward) for LaSeR vs GRPO.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser.io import atomic_path, atomic_write_json

COLUMNS = ("accuracy", "maj", "weighted_maj", "sv_f1", "sv_auroc", "sv_ece")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    revs = {"laser": "paper-small", "grpo": exp_rev(args.run, "grpo")}
    summaries = {name: git_json(args.run, rev, "eval/summary.json") for name, rev in revs.items()}
    table = {"base": {k: summaries["laser"]["base"][k] for k in COLUMNS},
             "grpo": {k: summaries["grpo"]["trained"][k] for k in COLUMNS},
             "laser": {k: summaries["laser"]["trained"][k] for k in COLUMNS}}
    curves = {name: git_json(args.run, rev, "train/steps.jsonl") for name, rev in revs.items()}
    train = {name: git_json(args.run, rev, "train/metrics.json") for name, rev in revs.items()}
    params = subprocess.run(["git", "show", "paper-small:params.yaml"], cwd=args.run, capture_output=True,
                            text=True, check=True).stdout
    result = {
        "table": table, "K": summaries["laser"].get("K"),
        "eval": "held-out synthetic set (200 problems x K samples; data/stats.json held_out)",
        "train_seconds": {name: t.get("gen_seconds_total", 0) + t.get("train_seconds_total", 0)
                          for name, t in train.items()},
        "steps": {name: t.get("steps") for name, t in train.items()},
        "git_revs": revs, "params_yaml": params,
        "goals": {"laser_sv_auroc": 0.80, "laser_sv_f1": 0.70, "grpo_sv_auroc": "near 0.5",
                  "laser_accuracy_vs_grpo": "within 2 points or better", "laser_weighted_maj_vs_maj": ">="},
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(args.out / "paper_small.json", result)
    figure(curves, args.out / "paper_small.png")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
