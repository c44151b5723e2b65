"""laser/train_log.py: DVCLive files rebuilt from the step log (no step twice after a resume) and the curve PNG."""

from __future__ import annotations

import json
from pathlib import Path

from laser.train_log import TrainLog, render_training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(n: int) -> list[dict]:
    return [{"step": s, "reward_mean": 0.1 * s, "self_reward_mse": None if s < 2 else 0.25, "sv_f1": 0.5,
             "sv_auroc": 0.6, "score_mean_correct": 0.3, "score_mean_incorrect": 0.2, "pg_loss": 0.0,
             "flag": True} for s in range(1, n + 1)]


def _tsv_rows(live: Path, name: str) -> list[list[str]]:
    lines = (live / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()
    return [line.split("\t") for line in lines[1:]]


def test_dvclive_files_follow_the_kept_step_log_after_a_resume(tmp_path):
    live = tmp_path / "live"
    log = TrainLog(live)
    log.replay(_records(3))
    log.close()
    assert [row[0] for row in _tsv_rows(live, "reward_mean")] == ["1", "2", "3"]
    assert [row[0] for row in _tsv_rows(live, "self_reward_mse")] == ["2", "3"]  # null (loss off): no point
    # a crash after step 3 with the checkpoint at step 2: the resumed run keeps steps 1-2, then logs step 3 anew
    log = TrainLog(live)
    log.replay(_records(2))
    log.log({**_records(3)[2], "reward_mean": 0.9})
    log.close()
    rows = _tsv_rows(live, "reward_mean")
    assert [row[0] for row in rows] == ["1", "2", "3"] and float(rows[-1][1]) == 0.9
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 3 and summary["train"]["reward_mean"] == 0.9
    assert _tsv_rows(live, "grad_norm") == []  # never logged: a header-only file for dvc.yaml's plot
    assert not (live / "dvc.yaml").exists()  # dvc.yaml declares the plots; DVCLive writes none of its own


def test_training_curves_png_has_a_panel_per_quantity(tmp_path):
    path = tmp_path / "curves.png"
    render_training_curves(_records(4), path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    render_training_curves([{"step": 1, "reward_mean": 0.5}], path)  # the GRPO-only log: MSE and scores absent
    assert path.stat().st_size > 1000
