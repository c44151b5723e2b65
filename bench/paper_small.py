"""Collect the paper-small experiment (bench/run_paper_small.sh) into bench/results/paper_small.{json,png}.

    python bench/paper_small.py --run ../paper-small-run [--out bench/results] [--name paper_small]
    python bench/paper_small.py --combine bench/results/paper_small.json bench/results/paper_small_seed1.json \
                                --name paper_small_seeds

``--run``: a checkout where ``dvc repro`` ran profiles/paper-small.yaml, every training variant of its
params.yaml (dvc.yaml's ``train@<v>``, ``rollout@<v>``) beside ``rollout_base``. Reads each model's rollouts from
the workspace and evaluates them all with this checkout's ``stages.evaluate`` (the macro headline, 95% bootstrap
intervals over problems, the collapse verdict), and ``train/<v>/steps.jsonl`` for the per-step curves (batch
self-verification AUROC and F1, reward) of every variant. Writes the table (rows Base / GRPO / LaSeR: accuracy
avg@K, maj@K, weighted maj@K, paper-F1, AUROC, ECE) with a header naming the model, steps, seeds, the git
revision and params digest. ``--add-model NAME=FILE:MODEL`` (with ``--run``) adds a row from another run, for a
seed whose variants ran in different clones: FILE is that run's evaluate ``metrics.json`` or a result file this
script wrote (``bench/results/<name>.json``); the row is taken as that run evaluated it and records its source.
``--combine``: per-seed result files -> the mean (and range) per method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser.config import load_params
from laser.io import atomic_path, atomic_write_json


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


def evaluate_models(run: Path, params) -> dict:
    """Base's and every variant's rollouts through this checkout's evaluate: one code version computes the
    table, its 95% intervals and the collapse verdicts."""
    from collections import Counter

    from laser.answers import verifier_equivalent
    from stages.evaluate import evaluate, read_rollouts

    rollouts = read_rollouts(run / params.paths.rollouts_dir, ["base", *params.variants])
    unjudged: Counter = Counter()
    equivalent = verifier_equivalent(params.verifier.timeout_s, params.verifier.num_workers, unjudged)
    result = evaluate(rollouts, params.evaluate, equivalent=equivalent)
    return {name: table_row(mm) for name, mm in result.metrics["models"].items()}


def table_row(model_metrics: dict) -> dict:
    """One model's entry of evaluate's metrics.json ``models`` -> its row of the table."""
    head = model_metrics["headline"]["macro"]
    overall = model_metrics["overall"]
    return {**{column: head[key] for column, key in HEADLINE.items()},
            "ci95": overall["ci95"], "sv_collapse": overall["sv_collapse"],
            "sv_auroc_answered": overall["self_verification"]["answered"]["auroc"]}


HEADLINE = {"accuracy": "avg@K", "maj": "maj@K", "weighted_maj": "weighted_maj@K", "sv_f1": "sv_f1",
            "sv_auroc": "sv_auroc", "sv_ece": "sv_ece"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def added_row(spec: str) -> tuple[str, dict, Path]:
    """``NAME=FILE:MODEL`` -> (NAME, the row of MODEL in FILE, FILE). FILE is an evaluate metrics.json (its
    ``models``) or a result file of this script (its ``table``, rows already in table form)."""
    try:
        name, rest = spec.split("=", 1)
        path, model = rest.rsplit(":", 1)
    except ValueError:
        raise SystemExit(f"--add-model {spec!r}: expected NAME=FILE:MODEL, e.g. "
                         "laser=bench/results/paper_small_seed1_laser/metrics.json:trained") from None
    data = json.loads(Path(path).read_text())
    if "models" in data:
        rows = {m: table_row(mm) for m, mm in data["models"].items()}
    elif "table" in data and "runs" not in data:  # a --combine output holds per-method ranges, not rows
        rows = data["table"]
    else:
        raise SystemExit(f"--add-model {spec!r}: {path} is neither an evaluate metrics.json (no 'models') nor a "
                         "one-run result file of bench/paper_small.py (a 'table' of rows, not a --combine output)")
    if model not in rows:
        raise SystemExit(f"--add-model {spec!r}: {path} has no model {model!r} (it has {sorted(rows)})")
    row = rows[model]
    source = f"{path} ({model}), as that run evaluated it"
    if "source" in row:  # a row that file took from a third run: keep the chain back to it
        source += f"; there from {row['source']}"
    return name, {**row, "source": source}, Path(path)


def collect(run: Path, out: Path, name: str, added: list[str] = ()) -> None:
    params = load_params(run / "params.yaml")
    variants = {v: params.for_variant(v) for v in params.variants}
    table = evaluate_models(run, params)
    curves = {v: read_jsonl(run / params.paths.trained(v).steps) for v in variants}
    for spec in added:
        model, row, metrics = added_row(spec)
        if model in table:
            raise SystemExit(f"--add-model {spec!r}: {model!r} is already a model of {run}")
        table[model] = row
        if (steps := metrics.with_name("steps.jsonl")).exists():  # that run's step log, when kept beside
            curves[model] = read_jsonl(steps)
    train = {v: json.loads((run / params.paths.trained(v).metrics).read_text()) for v in variants}
    params_text = (run / "params.yaml").read_text()
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=run, capture_output=True, text=True).stdout.strip()
    result = {
        "header": {"model": params.model.name,
                   "variants": {v: {"method": "LaSeR" if p.self_reward.enabled else "GRPO", "steps": p.train.steps,
                                    "train_seed": p.train.seed} for v, p in variants.items()},
                   "rollout_seed": params.rollout.seed, "generation_backend": params.generation.backend,
                   "git_revision": revision or None,
                   "params_digest": hashlib.sha256(params_text.encode()).hexdigest()[:12]},
        "table": table, "K": params.rollout.samples_per_problem,
        "eval": f"held-out set(s) {sorted(params.prepare.eval_sets)} (data/stats.json held_out); macro-average; "
                "ci95: bootstrap over problems of the pooled samples",
        "train_seconds": {v: t.get("gen_seconds_total", 0) + t.get("train_seconds_total", 0) for v, t in train.items()},
        "steps": {v: t.get("steps") for v, t in train.items()},
        "params_yaml": params_text,
        "goals": GOALS,
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(out / f"{name}.json", result)
    figure(curves, out / f"{name}.png")
    print(json.dumps(table, indent=1))


GOALS = {"laser_sv_auroc": 0.80, "laser_sv_f1": 0.70, "grpo_sv_auroc": "near 0.5",
         "laser_accuracy_vs_grpo": "within 2 points or better", "laser_weighted_maj_vs_maj": ">="}


def method_of(result: dict, model: str) -> str:
    """Base / GRPO / LaSeR of a row; older result files name the variants laser and grpo without a method."""
    if model == "base":
        return "Base"
    variants = result["header"].get("variants") or {}
    return variants[model]["method"] if model in variants else {"laser": "LaSeR", "grpo": "GRPO"}[model]


def combine(files: list[Path], out: Path, name: str) -> None:
    """Per-seed runs -> per method the mean of each headline number and its range over the runs."""
    results = [json.loads(f.read_text()) for f in files]
    rows: dict[str, list[dict]] = {}
    for result in results:
        for model, row in result["table"].items():
            rows.setdefault(method_of(result, model), []).append(row)
    keys = [*HEADLINE, "sv_auroc_answered"]
    table = {method: {key: {"mean": statistics.fmean(r[key] for r in runs), "min": min(r[key] for r in runs),
                            "max": max(r[key] for r in runs), "n": len(runs)}
                      for key in keys if all(r.get(key) is not None for r in runs)}
             for method, runs in rows.items()}
    atomic_write_json(out / f"{name}.json", {"runs": [str(f) for f in files], "table": table, "goals": GOALS,
                                             "date": time.strftime("%Y-%m-%d")})
    print(json.dumps(table, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a checkout where dvc repro ran the paper-small profile")
    source.add_argument("--combine", type=Path, nargs="+", help="result files of runs at different seeds")
    parser.add_argument("--add-model", action="append", default=[], metavar="NAME=FILE:MODEL",
                        help="with --run: a row from another run's evaluate metrics.json or result file")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="paper_small", help="results file stem: <out>/<name>.json/.png")
    args = parser.parse_args()
    if args.run:
        collect(args.run, args.out, args.name, args.add_model)
    else:
        combine(args.combine, args.out, args.name)


if __name__ == "__main__":
    main()
