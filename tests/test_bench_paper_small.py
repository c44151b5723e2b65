"""bench/paper_small.py's bookkeeping: a row added from another run's metrics.json, and seeds combined per method."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_small():
    spec = importlib.util.spec_from_file_location("paper_small", ROOT / "bench" / "paper_small.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_metrics(accuracy: float, auroc: float, answered_auroc: float) -> dict:
    """The part of one model's entry in evaluate's metrics.json that the table reads."""
    macro = {"avg@K": accuracy, "maj@K": accuracy + 0.01, "weighted_maj@K": accuracy + 0.02, "sv_f1": 0.6,
             "sv_auroc": auroc, "sv_ece": 0.2}
    overall = {"ci95": {"avg@K": [accuracy - 0.05, accuracy + 0.05]}, "sv_collapse": None,
               "self_verification": {"answered": {"auroc": answered_auroc}}}
    return {"headline": {"macro": macro}, "overall": overall}


def test_added_row_is_the_other_runs_row_with_its_source(paper_small, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"models": {"trained": model_metrics(0.42, 0.815, 0.784)}}))
    name, row, path = paper_small.added_row(f"laser={metrics}:trained")
    assert name == "laser" and path == metrics
    assert row["accuracy"] == 0.42 and row["weighted_maj"] == pytest.approx(0.44)
    assert row["sv_auroc"] == 0.815 and row["sv_auroc_answered"] == 0.784
    assert str(metrics) in row["source"]
    with pytest.raises(SystemExit, match=r"has no model 'laser'.*trained"):
        paper_small.added_row(f"laser={metrics}:laser")
    with pytest.raises(SystemExit, match="expected NAME=FILE:MODEL"):
        paper_small.added_row(str(metrics))


def test_added_row_from_a_result_file_keeps_its_row_and_source_chain(paper_small, tmp_path):
    table = {"grpo": paper_small.table_row(model_metrics(0.58, 0.48, 0.48)),
             "laser": {**paper_small.table_row(model_metrics(0.42, 0.815, 0.784)), "source": "elsewhere.json"}}
    result = tmp_path / "paper_small_seed1.json"
    result.write_text(json.dumps({"header": {}, "table": table}))
    name, row, path = paper_small.added_row(f"grpo={result}:grpo")
    assert name == "grpo" and path == result
    assert {k: v for k, v in row.items() if k != "source"} == table["grpo"]
    assert str(result) in row["source"]
    _, row, _ = paper_small.added_row(f"laser={result}:laser")
    assert row["sv_auroc"] == 0.815 and row["source"].endswith("there from elsewhere.json")
    for other in ({"runs": []}, {"runs": [str(result)], "table": {"GRPO": {"accuracy": {"mean": 0.5}}}}):
        (tmp_path / "other.json").write_text(json.dumps(other))  # no table; a --combine output's ranges
        with pytest.raises(SystemExit, match=r"neither an evaluate metrics\.json"):
            paper_small.added_row(f"GRPO={tmp_path / 'other.json'}:GRPO")


def test_combine_averages_each_method_over_the_seed_files(paper_small, tmp_path):
    def result(seed: int, laser_auroc: float) -> Path:
        table = {"base": paper_small.table_row(model_metrics(0.40, 0.60, 0.50)),
                 "grpo": paper_small.table_row(model_metrics(0.53, 0.60, 0.60)),
                 "laser": paper_small.table_row(model_metrics(0.50, laser_auroc, laser_auroc - 0.01))}
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps({"header": {"variants": {"laser": {"method": "LaSeR"},
                                                            "grpo": {"method": "GRPO"}}}, "table": table}))
        return path

    paper_small.combine([result(0, 0.80), result(1, 0.70)], tmp_path, "seeds")
    table = json.loads((tmp_path / "seeds.json").read_text())["table"]
    assert set(table) == {"Base", "GRPO", "LaSeR"}
    assert table["LaSeR"]["sv_auroc"] == {"mean": pytest.approx(0.75), "min": 0.70, "max": 0.80, "n": 2}
    assert table["LaSeR"]["sv_auroc_answered"]["mean"] == pytest.approx(0.74)
    assert table["GRPO"]["accuracy"]["n"] == 2 and table["GRPO"]["accuracy"]["mean"] == pytest.approx(0.53)
