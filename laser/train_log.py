"""The training log as DVC users read it: DVCLive per-step metrics and a training-curve PNG.

``paths.train_steps`` (one JSON line per step, every number the trainer logs) stays the record a resumed run
truncates to its checkpoint; from it this module keeps, for DVC:

- ``paths.train_live`` (DVCLive): ``plots/metrics/<name>.tsv`` per logged metric (what ``dvc plots show``
  draws, also while ``dvc exp run`` is running) and ``metrics.json`` (the last step's values). The directory is
  rebuilt from the step log when a run resumes, so a crash between a step and its checkpoint leaves no
  duplicated steps.
- ``paths.train_curves``: one PNG, a panel per quantity (reward; self-reward MSE; batch self-verification F1
  and AUROC; the mean score of correct vs incorrect answers) over steps; the evaluate report embeds it.

dvclive and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from laser.io import atomic_path

LIVE_METRICS = ("reward_mean", "self_reward_mse", "sv_f1", "sv_auroc", "sv_acc_correct", "sv_acc_incorrect",
                "score_mean_correct", "score_mean_incorrect", "pg_loss", "grad_norm", "response_length",
                "finished_frac", "gen_seconds", "train_seconds")

# (panel title, y label, [(step-log key, legend)]): one quantity, one unit per axis
PANELS = (
    ("verifier reward", "mean reward (0-1)", [("reward_mean", "reward")]),
    ("self-reward loss", "class-weighted MSE", [("self_reward_mse", "MSE(r_s, r_v)")]),
    ("batch self-verification", "F1 / AUROC (0-1)", [("sv_f1", "paper F1"), ("sv_auroc", "AUROC")]),
    ("self-reward score by answer class", "mean r_s", [("score_mean_correct", "correct"),
                                                       ("score_mean_incorrect", "incorrect")]),
)


class TrainLog:
    """DVCLive over ``live_dir`` (rank 0 only). ``replay`` the kept step records first, then ``log`` each step."""

    def __init__(self, live_dir: str | Path):
        from dvclive import Live

        self.live_dir = Path(live_dir)
        shutil.rmtree(live_dir, ignore_errors=True)  # rebuilt from the step log: no step twice after a resume
        # no dvc.yaml of its own (dvc.yaml declares the plots), no experiment of its own (dvc exp run makes it)
        self.live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)

    def replay(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        self.live.step = record["step"]
        for key in LIVE_METRICS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.live.log_metric(f"train/{key}", value)  # null (loss off, no sample of a class): no point
        self.live.make_summary()

    def close(self) -> None:
        """End the DVCLive run; a metric never logged (no sample of a class, loss off) gets a header-only file,
        so every plot dvc.yaml declares exists (empty) rather than failing ``dvc plots show``."""
        self.live.end()
        for key in LIVE_METRICS:
            path = self.live_dir / "plots" / "metrics" / "train" / f"{key}.tsv"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"step\t{key}\n")


def render_training_curves(records: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The training-curve PNG (one panel per quantity, steps on x), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes[0], PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged\n(loss off)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 and ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
