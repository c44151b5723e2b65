"""The last-token self-rewarding score (LaSeR, arXiv 2510.14943, Eq. 5-6).

    r_s = β_v · (log π_θ(z_c | x, y, EOS) − c_ref)

z_c is a pre-specified unused token. Its log-prob is read at the position right after the response's EOS: the
"z_c slot". In training z_c is written into that slot, so the ordinary shifted token log-probs of one forward
pass contain log π_θ(z_c | x, y, EOS) at the slot, beside the response log-probs (causality keeps z_c from
changing any earlier position). At test time the score is clipped to [0, 1]; > 0.5 reads "self-verified correct".

Layout convention: sequences are right-padded, ``response_mask[b, t] = 1`` on response tokens (the EOS included
when finished). Token log-probs use the "target" layout: ``token_logprobs[b, t] = log π(ids[b, t] | ids[b, :t])``
(position 0 has no prediction and is unused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class SelfRewardConfig:
    """How a model scores its own answers: z_c (its token and id), c_ref, β_v, and the loss ``kind`` — ``mse``
    (LaSeR) or ``sft`` (the paper's ablation, which also needs z_i). What an exported model's ``laser.json``
    holds (laser.model_card reads and writes it); built from params and the reference statistics by
    ``laser.runtime.self_reward_config``."""

    z_c_token: str
    z_c_id: int
    c_ref: float
    beta_v: float
    kind: Literal["mse", "sft"] = "mse"
    z_i_id: int | None = None  # sft only: score = sigmoid(log π(z_c) − log π(z_i))

    def __post_init__(self) -> None:
        if self.kind not in ("mse", "sft") or (self.kind == "sft") != (self.z_i_id is not None):
            raise ValueError(f"self-reward kind {self.kind!r} with z_i id {self.z_i_id!r}: sft needs z_i, mse none")

    @property
    def probe_token_ids(self) -> list[int]:
        """Tokens whose log-prob after EOS the score needs: z_c (and z_i for sft)."""
        return [self.z_c_id] if self.z_i_id is None else [self.z_c_id, self.z_i_id]

    def score(self, probe_logprobs: Mapping[int, float] | None) -> float | None:
        """r_s from the probe log-probs by token id (None for a truncated response: no score)."""
        if probe_logprobs is None:
            return None
        if self.kind == "sft":
            return 1.0 / (1.0 + math.exp(probe_logprobs[self.z_i_id] - probe_logprobs[self.z_c_id]))
        return self.beta_v * (probe_logprobs[self.z_c_id] - self.c_ref)


def z_c_slot(response_mask: torch.Tensor, finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the slot right after each response's last token, and whether the slot is usable.

    response_mask: (B, T) bool/0-1, 1 on response tokens (right-padded layout).
    finished: (B,) bool, True when the response ended with EOS (truncated responses have no z_c slot).
    Returns slot: (B,) long (= last response index + 1; 0 for empty responses), has_slot: (B,) bool
    (finished, non-empty, and the slot lies inside the T columns).
    """
    mask = response_mask.bool()
    length = mask.shape[1]
    positions = torch.arange(length, device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    slot = last + 1
    has_slot = finished.bool() & (last >= 0) & (slot < length)
    return slot, has_slot


def write_z_c(input_ids: torch.Tensor, slot: torch.Tensor, has_slot: torch.Tensor, z_c_id: int) -> torch.Tensor:
    """A copy of ``input_ids`` (B, T) with ``z_c_id`` written at ``slot`` (B,) where ``has_slot`` (B,)."""
    rows = torch.nonzero(has_slot, as_tuple=True)[0]
    out = input_ids.clone()
    out[rows, slot[rows]] = z_c_id
    return out


def read_z_c_logprob(token_logprobs: torch.Tensor, slot: torch.Tensor, has_slot: torch.Tensor) -> torch.Tensor:
    """log π(z_c | x, y, EOS) from target-layout token log-probs (B, T) of ids that hold z_c at ``slot``.

    Returns (B,) float; rows without a slot get 0.0 (mask them with ``has_slot``: never read them as scores).
    """
    safe_slot = torch.where(has_slot, slot, torch.zeros_like(slot))
    values = token_logprobs.gather(1, safe_slot.unsqueeze(1)).squeeze(1)
    return torch.where(has_slot, values, torch.zeros_like(values))


def self_reward_score(z_c_logprob: torch.Tensor, c_ref: float, beta_v: float) -> torch.Tensor:
    """r_s = β_v · (log π_θ(z_c | x, y, EOS) − c_ref).   z_c_logprob: (B,) -> (B,), unclipped."""
    return beta_v * (z_c_logprob - c_ref)


def score_headroom(c_ref: float, beta_v: float) -> float:
    """How far below 0 the log-prob a score of 1 needs lies: −(c_ref + 1/β_v), in nats.

    A score of 1 needs log π(z_c) = c_ref + 1/β_v; a log-prob is at most 0, so with headroom ≤ 0 the target of a
    correct answer cannot be reached, and once c_ref > −0.5/β_v not even 0.5 can (every answer reads incorrect).
    """
    return -(c_ref + 1.0 / beta_v)


def clip_score(score: torch.Tensor) -> torch.Tensor:
    """The test-time score: r_s clipped to [0, 1]; > 0.5 means self-verified correct.   (B,) -> (B,)"""
    return score.clamp(0.0, 1.0)


def two_token_score(z_c_logprob: torch.Tensor, z_i_logprob: torch.Tensor) -> torch.Tensor:
    """Score of the SFT/BCE ablation: P(z_c) / (P(z_c) + P(z_i)) = sigmoid(log π(z_c) − log π(z_i)).  (B,)"""
    return torch.sigmoid(z_c_logprob - z_i_logprob)
