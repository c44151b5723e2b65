"""A few decoded samples per train step (laser/completions.py): picked, written, truncated, rendered."""

from __future__ import annotations

import json
import types

import torch

from laser.completions import (
    append_completions,
    completion_samples,
    completions_markdown,
    pick_samples,
    read_completions,
)


def test_pick_alternates_correct_and_incorrect_in_order():
    assert pick_samples([0, 0, 1, 0, 1], 2) == [0, 2]
    assert pick_samples([0, 0, 1, 0, 1], 3) == [0, 2, 4]  # correct 2, incorrect 0, correct 4
    assert pick_samples([0, 0, 0], 2) == [0, 1]
    assert pick_samples([1, 0], 5) == [0, 1]
    assert pick_samples([1, 1], 0) == []


def _rollout(tokenizer):
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    return types.SimpleNamespace(
        prompts=[encode("<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")] * 3,
        responses=[[*encode("The answer is \\boxed{4}."), eos], [*encode("The answer is \\boxed{3}."), eos],
                   encode("The answer is | 3")],
        rewards=torch.tensor([0.0, 1.0, 0.0]), finished=torch.tensor([True, True, False]),
        judged=torch.tensor([True, True, True]), old_scores=torch.tensor([0.25, 0.75, 0.0]))


def test_samples_written_truncated_and_rendered(tmp_path, tiny_tokenizer):
    from stages.train import truncate_log

    path = tmp_path / "completions.jsonl"
    rollout = _rollout(tiny_tokenizer)
    for step in (1, 2, 3):
        append_completions(path, completion_samples(rollout, tiny_tokenizer, step, 2))
    rows = read_completions(path)
    assert [(r["step"], r["sample"]) for r in rows] == [(s, i) for s in (1, 2, 3) for i in (0, 1)]
    first, second = rows[:2]
    assert second["response"] == "The answer is \\boxed{3}." and second["answer"] == "3"
    assert second["reward"] == 1.0 and second["score"] == 0.75 and second["finish_reason"] == "eos"
    assert first["prompt_tail"].endswith("What is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    truncated = completion_samples(rollout, tiny_tokenizer, 9, 3)[2]
    assert truncated["score"] is None and truncated["finish_reason"] == "length"

    truncate_log(path, 2)  # what a resumed run does with the step log
    assert {r["step"] for r in read_completions(path)} == {1, 2}

    table = completions_markdown(path)
    assert "train step 2" in table and table.count("\n| ") == 3  # header + 2 samples of the last step
    assert "\\boxed{3}" in table and "0.750" in table
    assert completions_markdown(tmp_path / "missing.jsonl") == ""
    pipes = completions_markdown([{**rows[0], "response": "a | b", "step": 7}])
    assert "a \\| b" in pipes


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps({"step": 1, "sample": 0}) + "\n{\"step\": 2, \"sam")
    assert read_completions(path) == [{"step": 1, "sample": 0}]
