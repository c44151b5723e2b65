"""Rollout parquet tables as per-problem arrays: what evaluation computes on (plumbing beside the rollout schema of
laser/rollouts.py).

A :class:`SampleTable` holds one (model, eval set) table as (P, W) arrays, problems in first-appearance order,
samples sorted by ``sample_idx``: the extracted answers, correctness, raw scores, lengths, which cells are real
samples (``valid``) and which the verifier judged (``judged``), plus counts of what is missing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from laser.answers import normalize_answer
from laser.errors import StageError
from laser.verify import UNJUDGED

REQUIRED_COLUMNS = ("problem_id", "sample_idx", "pred_answer", "reward", "score", "num_tokens")


@dataclass
class SampleTable:
    """One (model, eval set) rollout table as (P, W) arrays, problems in first-appearance order, samples sorted by
    sample_idx; W = the most samples of a problem, ``valid`` False on padding."""

    problem_ids: list[str]
    answers: list[list[Any]]
    correct: np.ndarray
    score: np.ndarray
    num_tokens: np.ndarray
    valid: np.ndarray
    judged: np.ndarray  # False where the verifier timed out or failed: no label to check a score against
    counts: dict[str, Any]
    cluster: np.ndarray | None = None

    @property
    def flat(self) -> dict[str, np.ndarray]:
        v = self.valid
        return {"correct": self.correct[v], "score": self.score[v], "num_tokens": self.num_tokens[v],
                "judged": self.judged[v],
                "answered": (self.cluster[v] >= 0) if self.cluster is not None else None}


def _columns(table: Any, where: str) -> dict[str, list]:
    if hasattr(table, "column_names") and hasattr(table, "to_pydict"):  # pyarrow.Table
        names = list(table.column_names)

        def get(name):
            return table.column(name).to_pylist()
    elif hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas.DataFrame
        names = [str(c) for c in table.columns]

        def get(name):
            return table[name].tolist()
    else:
        raise TypeError(f"{where}: expected a pyarrow.Table or pandas.DataFrame, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise StageError(f"{where}: rollout table lacks column(s) {missing}; has {names}")
    wanted = [*REQUIRED_COLUMNS, *(c for c in ("finish_reason", "verify_status") if c in names)]
    return {name: get(name) for name in wanted}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _sorted_samples(cols: dict[str, list], rows: list[int], pid: str, where: str) -> list[int]:
    """One problem's rows sorted by sample_idx; a repeated sample_idx is an error."""
    rows = sorted(rows, key=lambda r: cols["sample_idx"][r])
    seen = [cols["sample_idx"][r] for r in rows]
    if len(set(seen)) != len(seen):
        dup = sorted({s for s in seen if seen.count(s) > 1})
        raise StageError(f"{where}: problem {pid!r} has duplicate sample_idx {dup}")
    return rows


def _fill_problem(d: SampleTable, p: int, cols: dict[str, list], rows: list[int]) -> int:
    """Write problem p's samples (``rows``, sorted) into ``d``; returns how many have no reward."""
    d.answers.append([None if _is_missing(cols["pred_answer"][r]) else cols["pred_answer"][r] for r in rows])
    missing_reward = 0
    for i, r in enumerate(rows):
        reward = cols["reward"][r]
        missing_reward += _is_missing(reward)
        d.correct[p, i] = not _is_missing(reward) and float(reward) == 1.0
        d.score[p, i] = np.nan if _is_missing(cols["score"][r]) else float(cols["score"][r])
        d.num_tokens[p, i] = np.nan if _is_missing(cols["num_tokens"][r]) else float(cols["num_tokens"][r])
        d.valid[p, i] = True
        d.judged[p, i] = "verify_status" not in cols or cols["verify_status"][r] not in UNJUDGED
    return missing_reward


def _counts(d: SampleTable, cols: dict[str, list], missing_reward: int) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "no_answer": int(sum(normalize_answer(a) is None for ans in d.answers for a in ans)),
        "no_score": int((np.isnan(d.score) & d.valid).sum()),
        "no_reward": int(missing_reward),
        "unjudged": int((~d.judged & d.valid).sum()),  # left out of self-verification
    }
    for name in ("finish_reason", "verify_status"):
        if name in cols:
            counts[name] = dict(sorted(Counter(str(v) for v in cols[name]).items()))
    return counts


def sample_table(table: Any, where: str) -> SampleTable:
    cols = _columns(table, where)
    rows_of: dict[str, list[int]] = {}
    for row, pid in enumerate(cols["problem_id"]):
        rows_of.setdefault(str(pid), []).append(row)
    shape = (len(rows_of), max((len(r) for r in rows_of.values()), default=0))
    d = SampleTable(list(rows_of), [], np.zeros(shape, dtype=bool), np.full(shape, np.nan), np.full(shape, np.nan),
              np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool), {})
    missing_reward = 0
    for p, (pid, rows) in enumerate(rows_of.items()):
        missing_reward += _fill_problem(d, p, cols, _sorted_samples(cols, rows, pid, where))
    d.counts = _counts(d, cols, missing_reward)
    return d


def _merge_counts(parts: Sequence[SampleTable]) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for d in parts:
        for key, value in d.counts.items():
            if isinstance(value, dict):
                merged = Counter(counts.get(key, {}))
                merged.update(value)
                counts[key] = dict(sorted(merged.items()))
            else:
                counts[key] = counts.get(key, 0) + value
    return counts


def concat_tables(parts: Sequence[SampleTable]) -> SampleTable:
    width = max((d.valid.shape[1] for d in parts), default=0)

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full((a.shape[0], width), fill, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        return out

    def stack(name: str, fill: Any, dtype: Any) -> np.ndarray:
        arrays = [pad(getattr(d, name), fill) for d in parts]
        return np.concatenate(arrays) if arrays else np.zeros((0, width), dtype=dtype)

    return SampleTable([pid for d in parts for pid in d.problem_ids], [a for d in parts for a in d.answers],
                 stack("correct", False, bool), stack("score", np.nan, float), stack("num_tokens", np.nan, float),
                 stack("valid", False, bool), stack("judged", False, bool), _merge_counts(parts),
                 stack("cluster", -1, np.int64))
