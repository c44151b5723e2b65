"""GRPO group advantages and LaSeR's advantage integration, as pure functions.

    A_v,j = (r_v,j − mean_g r_v) / (std_g r_v + ε)                      GRPO, per group g of K samples
    A_s,j = (s_j − mean_g s) / (std_g s + ε),   s_j = clip(r_s,j, 0, 1)  (0 for truncated responses)
    Â_j   = (1 − τ)·A_v,j + τ·A_s,j    if std_g s > T,   else A_v,j      (paper Eq. 9)

Samples are laid out group-contiguously: rows [g·K, (g+1)·K) belong to prompt g. std is the unbiased (n−1)
estimator, as in verl's GRPO. Departure from the official code: the scores fed here must come from a forward
pass that actually contains z_c in the slot after EOS (the official integration reads them from a pass without).
"""

from __future__ import annotations

import torch

from laser.score import clip_score


def _group_stats(values: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and unbiased std of values (B,) with B = G·K, returned broadcast back to (B,).

    valid: optional (B,) bool; only valid members enter their group's statistics (std 0 with fewer than two).
    """
    if values.numel() % group_size:
        raise ValueError(f"batch of {values.numel()} is not a multiple of group_size={group_size}")
    groups = values.view(-1, group_size)
    if valid is None:
        mean = groups.mean(dim=1, keepdim=True)
        std = groups.std(dim=1, unbiased=True, keepdim=True)
    else:
        mask = valid.view(-1, group_size).to(values.dtype)
        count = mask.sum(dim=1, keepdim=True)
        mean = (groups * mask).sum(dim=1, keepdim=True) / count.clamp(min=1)
        std = ((((groups - mean) * mask) ** 2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    return mean.expand_as(groups).reshape(-1), std.expand_as(groups).reshape(-1)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """A_v = (r − mean_g) / (std_g + ε), or r − mean_g when ``scale_by_std`` is False (Dr. GRPO).

    rewards: (B,) with B = G·K, group-contiguous. valid: optional (B,) bool, the samples the verifier judged; an
    unjudged one (timeout/error) gets advantage 0 and stays out of its group's mean and std.
    Returns (advantages (B,), metrics: zero_std_group_frac).
    """
    rewards = rewards.float()
    mean, std = _group_stats(rewards, group_size, valid)
    advantages = rewards - mean
    if scale_by_std:
        advantages = advantages / (std + eps)
    if valid is not None:
        advantages = torch.where(valid.bool(), advantages, torch.zeros_like(advantages))
    zero_std = (std.view(-1, group_size)[:, 0] == 0).float().mean()
    return advantages, {"zero_std_group_frac": float(zero_std)}


def self_reward_advantages(
    scores: torch.Tensor, finished: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_s from unclipped scores r_s (B,): clipped to [0, 1], truncated responses count as 0.

    finished: (B,) bool. Returns (A_s (B,), per-sample std of its group's clipped scores (B,)) — the std gates
    the integration.
    """
    clipped = torch.where(finished.bool(), clip_score(scores.float()), torch.zeros_like(scores, dtype=torch.float))
    mean, std = _group_stats(clipped, group_size)
    advantages = clipped - mean
    if scale_by_std:
        advantages = advantages / (std + eps)
    return advantages, std


def integrate_advantages(
    verifier_advantages: torch.Tensor,
    self_reward_advantages: torch.Tensor,
    score_std: torch.Tensor,
    tau: float,
    std_threshold: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Â = (1−τ)·A_v + τ·A_s where the group's score std > T; A_v elsewhere.

    All inputs (B,); score_std is the per-sample group std from ``self_reward_advantages``.
    Returns (advantages (B,), metrics: integrated_frac = fraction of samples whose advantage was mixed).
    """
    mixed = (1.0 - tau) * verifier_advantages + tau * self_reward_advantages
    use_mix = score_std > std_threshold
    advantages = torch.where(use_mix, mixed, verifier_advantages)
    return advantages, {"integrated_frac": float(use_mix.float().mean())}
