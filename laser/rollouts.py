"""Rollouts as data: the self-reward config file, sampling from a model dir, and the rollout parquet.

Rollout parquet (one row per sample; see README "Contracts"):
    problem_id str, sample_idx int, prompt_token_ids list<int>, response_token_ids list<int> (with the final
    EOS when finished), response str, finish_reason "eos"|"length", num_tokens int, pred_answer str|null,
    verify_status "correct"|"incorrect"|"no_answer"|"timeout"|"error", reward int (0|1),
    z_c_logprob float|null (null when truncated), score float|null (β_v·(z_c_logprob − c_ref), unclipped),
    gold_answer str, eval_set str.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from laser.errors import StageError
from laser.io import atomic_path, atomic_write_json
from laser.model_card import LASER_JSON, laser_json, self_reward_config_from
from laser.score import SelfRewardConfig

ROLLOUT_SCHEMA = pa.schema([
    ("problem_id", pa.string()),
    ("sample_idx", pa.int64()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),
    ("response", pa.string()),
    ("finish_reason", pa.string()),
    ("num_tokens", pa.int64()),
    ("pred_answer", pa.string()),
    ("verify_status", pa.string()),
    ("reward", pa.int8()),
    ("z_c_logprob", pa.float64()),
    ("score", pa.float64()),
    ("gold_answer", pa.string()),
    ("eval_set", pa.string()),
])


def read_self_reward_config(path: str | Path) -> SelfRewardConfig:
    """From an exported model's ``laser.json`` (the model dir or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / LASER_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: self-reward config not found (the train stage exports it beside the model; "
                         "for the base model it comes from the ref_constant stage)") from None
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err})") from None
    return self_reward_config_from(data, str(path))


def write_self_reward_config(model_dir: str | Path, config: SelfRewardConfig) -> None:
    atomic_write_json(Path(model_dir) / LASER_JSON, laser_json(config))


def rollout_rows(completions, problems: Sequence[dict], verdicts, config: SelfRewardConfig | None,
                 eval_set: str) -> list[dict]:
    """One parquet row per completion. ``problems[c.prompt_index]`` holds ``id`` and ``answer``; each
    completion's ``probe_logprobs[config.z_c_id]`` is log π(z_c | x, y, EOS)."""
    rows = []
    for completion, verdict in zip(completions, verdicts, strict=True):
        problem = problems[completion.prompt_index]
        probes = completion.probe_logprobs
        z_c = probes[config.z_c_id] if probes and config else None
        rows.append({
            "problem_id": str(problem["id"]),
            "sample_idx": completion.sample_index,
            "prompt_token_ids": completion.prompt_token_ids,
            "response_token_ids": completion.response_token_ids,
            "response": completion.text,
            "finish_reason": completion.finish_reason,
            "num_tokens": len(completion.response_token_ids),
            "pred_answer": verdict.pred_answer,
            "verify_status": verdict.status,
            "reward": int(verdict.reward),
            "z_c_logprob": z_c,
            "score": config.score(probes) if config else None,
            "gold_answer": str(problem["answer"]),
            "eval_set": eval_set,
        })
    return rows


def write_rollouts(path: str | Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_problems(path: str | Path) -> list[dict]:
    """The prepared rows (id, problem, answer, prompt, ...) of a data parquet, as dicts."""
    return pq.read_table(path).to_pylist()
