"""The self-reward config (laser.json) and the rollout parquet contract."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laser.errors import ModelError, StageError
from laser.generation import Completion
from laser.rollouts import (
    ROLLOUT_SCHEMA,
    read_self_reward_config,
    rollout_rows,
    write_rollouts,
    write_self_reward_config,
)
from laser.score import SelfRewardConfig
from laser.verify import Verdict


def test_laser_json_round_trip_and_scores(tmp_path):
    config = SelfRewardConfig("<z>", 7, c_ref=-23.0, beta_v=0.1)
    write_self_reward_config(tmp_path, config)
    assert json.loads((tmp_path / "laser.json").read_text()) == {
        "self_reward_token": "<z>", "self_reward_token_id": 7, "c_ref": -23.0, "beta_v": 0.1, "loss": "mse"}
    assert read_self_reward_config(tmp_path) == config
    assert config.probe_token_ids == [7]
    assert config.score({7: -18.0}) == pytest.approx(0.5)
    assert config.score(None) is None
    sft = SelfRewardConfig("<z>", 7, -23.0, 0.1, kind="sft", z_i_id=8)
    assert sft.probe_token_ids == [7, 8]
    assert sft.score({7: math.log(0.3), 8: math.log(0.1)}) == pytest.approx(0.75)
    assert sft.score({8: math.log(0.1), 7: math.log(0.3)}) == pytest.approx(0.75)  # by id, not by position
    with pytest.raises(ValueError, match="sft needs z_i"):
        SelfRewardConfig("<z>", 7, -23.0, 0.1, kind="sft")
    write_self_reward_config(tmp_path, sft)
    assert read_self_reward_config(tmp_path / "laser.json") == sft
    assert json.loads((tmp_path / "laser.json").read_text())["loss"] == "sft"  # the mode is written, not implied
    older = {k: v for k, v in json.loads((tmp_path / "laser.json").read_text()).items() if k != "loss"}
    (tmp_path / "laser.json").write_text(json.dumps(older))
    assert read_self_reward_config(tmp_path) == sft  # an export from before "loss": inferred from z_i


def test_laser_json_missing_key_is_named(tmp_path):
    (tmp_path / "laser.json").write_text(json.dumps({"self_reward_token": "<z>", "c_ref": -1.0}))
    with pytest.raises(ModelError, match="self_reward_token_id"):
        read_self_reward_config(tmp_path)
    (tmp_path / "laser.json").write_text('{"self_reward_token": ')
    with pytest.raises(StageError, match="not valid JSON"):
        read_self_reward_config(tmp_path)
    (tmp_path / "laser.json").write_text(json.dumps({"self_reward_token": "<z>", "self_reward_token_id": 7,
                                                     "c_ref": -23.0, "beta_v": 0.1, "loss": "sfx"}))
    with pytest.raises(ModelError, match=r"bad self-reward settings.*sfx"):
        read_self_reward_config(tmp_path)
    with pytest.raises(StageError, match="ref_constant"):
        read_self_reward_config(tmp_path / "nope")


def test_rollout_rows_follow_the_schema(tmp_path):
    completions = [
        Completion(0, 0, [1, 2], [5, 6, 9], "x \\boxed{3}", "eos", {7: -20.0}),
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


def test_rollout_stage_resumes_the_eval_sets_an_earlier_attempt_finished(tmp_path, monkeypatch, tiny_model_dir,
                                                                          tiny_tokenizer, capsys):
    import yaml

    from stages import prepare as prepare_stage
    from stages import rollout as rollout_stage

    monkeypatch.chdir(tmp_path)
    synthetic = {"kind": "synthetic", "num_problems": 3, "split": "test"}
    Path("params.yaml").write_text(yaml.safe_dump({
        "paths": {"cache_dir": str(tmp_path / "cache")}, "model": {"name": str(tiny_model_dir)},
        "prepare": {"train": {"kind": "synthetic", "num_problems": 20},
                    "eval_sets": {"a": {**synthetic, "seed": 1}, "b": {**synthetic, "seed": 2}}},
        "generation": {"max_new_tokens": 12}, "rollout": {"samples_per_problem": 2}}))
    prepare_stage.main([])
    z_c = "<|z_c|>"
    Path("ref").mkdir()
    Path("ref/ref_constant.json").write_text(json.dumps({"selection": "fixed", "candidates": [{
        "token": z_c, "token_id": tiny_tokenizer.convert_tokens_to_ids(z_c), "mean": -11.5, "std": 0.5, "min": -12.0,
        "max": -11.0}]}))
    good_b = Path("data/eval/b.parquet").read_bytes()
    Path("data/eval/b.parquet").write_bytes(b"not parquet")  # set a finishes, then set b fails
    with pytest.raises(ValueError, match=r"(?i)parquet"):  # pyarrow's ArrowInvalid: an unexpected failure, retried
        rollout_stage.main(["--model", "base"])
    assert not Path("rollouts/base").exists()  # no half-written output
    assert len(list((tmp_path / "cache" / "rollout-work" / "base").glob("a-*.parquet"))) == 1

    Path("data/eval/b.parquet").write_bytes(good_b)
    capsys.readouterr()
    rollout_stage.main(["--model", "base"])
    out = capsys.readouterr().out
    assert "base/a: reused" in out and "base/b: 6 samples" in out
    assert sorted(p.name for p in Path("rollouts/base").iterdir()) == ["a.parquet", "b.parquet"]
    assert pq.read_table("rollouts/base/a.parquet").num_rows == 6
    assert not list((tmp_path / "cache" / "rollout-work" / "base").iterdir())  # the finished sets are removed


class ScriptedGenerator:
    """A Generator (laser.generation protocol) that returns given texts: the input of the verification under
    test, not a stand-in for it."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def generate(self, prompts, num_samples, sampling, probe_token_ids=(), progress=False):
        return [Completion(0, i, list(prompts[0]), [1, 2], text, "eos", dict.fromkeys(probe_token_ids, -20.0))
                for i, text in enumerate(self.texts)]


def test_eval_rollouts_gate_boxes_with_their_own_setting(tiny_tokenizer):
    """The official single-box gate shapes the training reward only: eval reads the last box (before, eval used
    verifier.require_single_boxed too)."""
    from laser.config import Params, build
    from stages.rollout import rollout_eval_set

    params = build(Params, {"verifier": {"require_single_boxed": True}})
    problems = [{"id": "p", "answer": "7", "prompt": "What is 3 + 4?"}]
    texts = ["First \\boxed{6}, no: \\boxed{7}.", "\\boxed{7}"]
    config = SelfRewardConfig("<z>", 7, c_ref=-23.0, beta_v=0.1)
    rows, counts = rollout_eval_set(params, ScriptedGenerator(texts), tiny_tokenizer, config, problems, "s")
    assert [r["verify_status"] for r in rows] == ["correct", "correct"] and counts["accuracy"] == 1.0
    gated = build(Params, {"rollout": {"require_single_boxed": True}})
    rows, _ = rollout_eval_set(gated, ScriptedGenerator(texts), tiny_tokenizer, config, problems, "s")
    assert [r["verify_status"] for r in rows] == ["no_answer", "correct"]
