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
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from laser.errors import StageError
from laser.io import atomic_path, atomic_write_json
from laser.score import self_reward_score, two_token_score

LASER_JSON = "laser.json"

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


@dataclass(frozen=True)
class SelfRewardConfig:
    """Everything needed to score with a model: the ``laser.json`` beside an exported model's weights."""

    self_reward_token: str
    self_reward_token_id: int
    c_ref: float
    beta_v: float
    incorrect_token_id: int | None = None  # z_i of the SFT ablation only: then score = sigmoid(lp(z_c) − lp(z_i))

    @property
    def probe_token_ids(self) -> list[int]:
        """Tokens whose log-prob after EOS the score needs: z_c (and z_i for the SFT ablation)."""
        extra = [] if self.incorrect_token_id is None else [self.incorrect_token_id]
        return [self.self_reward_token_id, *extra]

    def score(self, probe_logprobs: list[float] | None) -> float | None:
        """r_s from the probe log-probs (None for a truncated response)."""
        if probe_logprobs is None:
            return None
        values = torch.tensor(probe_logprobs, dtype=torch.float64)
        if self.incorrect_token_id is not None:
            return float(two_token_score(values[0], values[1]))
        return float(self_reward_score(values[0], self.c_ref, self.beta_v))


def read_self_reward_config(path: str | Path) -> SelfRewardConfig:
    """From a ``laser.json`` (a model dir or the file itself) or the ref_constant JSON (a superset)."""
    path = Path(path)
    if path.is_dir():
        path = path / LASER_JSON
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: self-reward config not found (run the ref_constant or train stage)") from None
    keys = [f for f in SelfRewardConfig.__dataclass_fields__]
    missing = [k for k in keys[:4] if k not in data]
    if missing:
        raise StageError(f"{path}: missing keys {missing} (a laser.json needs {keys[:4]})")
    return SelfRewardConfig(**{k: data[k] for k in keys if k in data})


def write_self_reward_config(model_dir: str | Path, config: SelfRewardConfig) -> None:
    data = {k: v for k, v in asdict(config).items() if v is not None}
    atomic_write_json(Path(model_dir) / LASER_JSON, data)


def rollout_rows(completions, problems: Sequence[dict], verdicts, config: SelfRewardConfig | None,
                 eval_set: str) -> list[dict]:
    """One parquet row per completion. ``problems[c.prompt_index]`` holds ``id`` and ``answer``;
    ``probe_logprobs[0]`` of each completion is log π(z_c | x, y, EOS)."""
    rows = []
    for completion, verdict in zip(completions, verdicts, strict=True):
        problem = problems[completion.prompt_index]
        probes = completion.probe_logprobs
        z_c = probes[0] if probes else None
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


def tokenize_prompts(tokenizer, problems: Sequence[dict]) -> list[list[int]]:
    """Token ids of each prepared ``prompt`` text (already chat-formatted: no special tokens added)."""
    return [tokenizer(p["prompt"], add_special_tokens=False)["input_ids"] for p in problems]
