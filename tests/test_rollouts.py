"""The self-reward config (laser.json) and the rollout parquet contract."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from laser.cli import StageError
from laser.generation import Completion
from laser.rollouts import (
    ROLLOUT_SCHEMA,
    SelfRewardConfig,
    read_self_reward_config,
    rollout_rows,
    write_rollouts,
    write_self_reward_config,
)
from laser.verify import Verdict


def test_laser_json_round_trip_and_scores(tmp_path):
    config = SelfRewardConfig("<z>", 7, c_ref=-23.0, beta_v=0.1)
    write_self_reward_config(tmp_path, config)
    assert json.loads((tmp_path / "laser.json").read_text()) == {
        "self_reward_token": "<z>", "self_reward_token_id": 7, "c_ref": -23.0, "beta_v": 0.1}
    assert read_self_reward_config(tmp_path) == config
    assert config.probe_token_ids == [7]
    assert config.score([-18.0]) == pytest.approx(0.5)
    assert config.score(None) is None
    sft = SelfRewardConfig("<z>", 7, -23.0, 0.1, incorrect_token_id=8)
    assert sft.probe_token_ids == [7, 8]
    assert sft.score([math.log(0.3), math.log(0.1)]) == pytest.approx(0.75)
    write_self_reward_config(tmp_path, sft)
    assert read_self_reward_config(tmp_path / "laser.json") == sft


def test_laser_json_missing_key_is_named(tmp_path):
    (tmp_path / "laser.json").write_text(json.dumps({"self_reward_token": "<z>", "c_ref": -1.0}))
    with pytest.raises(StageError, match="self_reward_token_id"):
        read_self_reward_config(tmp_path)
    with pytest.raises(StageError, match="ref_constant"):
        read_self_reward_config(tmp_path / "nope")


def test_rollout_rows_follow_the_schema(tmp_path):
    completions = [
        Completion(0, 0, [1, 2], [5, 6, 9], "x \\boxed{3}", "eos", [-20.0]),
        Completion(0, 1, [1, 2], [5, 5, 5], "x", "length", None),
    ]
    verdicts = [Verdict("correct", 1, "3"), Verdict("no_answer", 0, None)]
    config = SelfRewardConfig("<z>", 7, -23.0, 0.1)
    rows = rollout_rows(completions, [{"id": "p0", "answer": "3"}], verdicts, config, "set")
    write_rollouts(tmp_path / "r.parquet", rows)
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema.equals(ROLLOUT_SCHEMA)
    first, second = table.to_pylist()
    assert first["score"] == pytest.approx(0.3) and first["num_tokens"] == 3 and first["reward"] == 1
    assert second["z_c_logprob"] is None and second["score"] is None and second["finish_reason"] == "length"
    assert second["verify_status"] == "no_answer" and second["pred_answer"] is None
