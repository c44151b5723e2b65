"""LaSeR's loss terms as pure functions: (loss, metrics) out, no config objects, no torch.distributed.

    L = L_GRPO + α · L_SR,
    L_SR = 1/(N_c + N_i) · Σ_{finished j} w_j · (r_s,j − r_v,j)²,
    w_c = (N_c + N_i) / (2 N_c),   w_i = (N_c + N_i) / (2 N_i)                       (paper Eq. 8)

so each class carries half the loss whatever the class balance. Departures and choices:
- Only *finished* responses (with an EOS, hence a z_c slot) enter L_SR; an empty class gets weight 0.
- Normalisers (token count, class counts) may be passed in as *global* counts: then the sum of the losses of
  data-parallel shards equals the loss of the whole batch, and so do the gradients (tests/test_core_math.py).
- GRPO uses the token-mean over the whole batch (DAPO's "token-level" mean) with asymmetric clipping
  (ε_low, ε_high), verl's dual clip (the loss of a token with A < 0 is at most c·|A|, c = 3) and the log-ratio
  clamped to ±20 before exp (a stale ratio can overflow to inf and make the gradient NaN), and an optional k3
  ("low-variance") KL term whose coefficient defaults to 0, as in the paper.
- L_SR is divided by N_c + N_i (finished responses, as the paper's Eq. 8); the official code divides by all
  rollouts, truncated ones included, so its term is ours times the finished fraction.
- ``self_reward_sft_loss`` is the ablation of paper §5: z_c for correct and a second token z_i for incorrect
  responses, trained with class-weighted cross-entropy over the full vocabulary.
"""

from __future__ import annotations

import torch

from laser.score import self_reward_score

LOG_RATIO_LIMIT = 20.0  # |log π/π_old| beyond this is clamped: exp(20) ≈ 5e8 still fits, exp(100) overflows


def _as_float(t: torch.Tensor) -> float:
    return float(t.detach().float().item())


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    *,
    clip_ratio_c: float | None = 3.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate  −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)  token-mean over the batch (+ β_KL·k3);
    for A < 0 also dual-clipped at −c·A (verl's ``clip_ratio_c``; None: off). log ρ is clamped to ±20.

    logprobs, old_logprobs, ref_logprobs: (B, T) log π of each response token (any layout, aligned with mask).
    advantages: (B,) one advantage per response, broadcast over its tokens.
    response_mask: (B, T) 1 on the tokens that count.
    num_tokens: the denominator; default the mask's sum. Pass the global count when the batch is sharded.
    Returns (loss scalar, metrics: pg_loss, clip_frac, approx_kl[, kl]).
    """
    mask = response_mask.to(logprobs.dtype)
    denom = mask.sum().clamp(min=1.0) if num_tokens is None else torch.tensor(max(float(num_tokens), 1.0))
    log_ratio = (logprobs - old_logprobs) * mask  # masked first: a pad position can never overflow exp()
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    adv = advantages.unsqueeze(1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    metrics = {"clip_frac": _as_float(((clipped > unclipped).to(mask.dtype) * mask).sum() / denom)}
    if clip_ratio_c is not None:
        dual = torch.minimum(per_token, -adv * clip_ratio_c)
        dual_clipped = (adv < 0) & (dual < per_token)
        per_token = torch.where(adv < 0, dual, per_token)
        metrics["dual_clip_frac"] = _as_float((dual_clipped.to(mask.dtype) * mask).sum() / denom)
    pg_loss = (per_token * mask).sum() / denom
    metrics.update(pg_loss=_as_float(pg_loss), approx_kl=_as_float((-log_ratio * mask).sum() / denom))
    loss = pg_loss
    if ref_logprobs is not None and kl_coef > 0:
        delta = (ref_logprobs - logprobs) * mask
        kl = ((torch.exp(delta) - delta - 1.0) * mask).sum() / denom  # k3: unbiased, always >= 0
        loss = loss + kl_coef * kl
        metrics["kl"] = _as_float(kl)
    return loss, metrics


def class_weights(correct: torch.Tensor, incorrect: torch.Tensor, num_correct: float | None = None,
                  num_incorrect: float | None = None) -> tuple[torch.Tensor, float]:
    """Per-response weights w_c / w_i (0 outside both classes) and the normaliser N_c + N_i.

    correct, incorrect: (B,) bool, disjoint. num_correct / num_incorrect: global class counts (default: local).
    An empty class gets weight 0, so nothing divides by zero.
    """
    n_c = float(correct.sum()) if num_correct is None else float(num_correct)
    n_i = float(incorrect.sum()) if num_incorrect is None else float(num_incorrect)
    total = n_c + n_i
    w_c = total / (2.0 * n_c) if n_c > 0 else 0.0
    w_i = total / (2.0 * n_i) if n_i > 0 else 0.0
    zeros = torch.zeros(correct.shape, dtype=torch.float32, device=correct.device)
    weights = torch.where(correct, zeros + w_c, torch.where(incorrect, zeros + w_i, zeros))
    return weights, total


def _split_classes(rewards: torch.Tensor, finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    correct = finished.bool() & (rewards > 0.5)
    incorrect = finished.bool() & (rewards <= 0.5)
    return correct, incorrect


def self_reward_mse_loss(
    z_c_logprob: torch.Tensor,
    rewards: torch.Tensor,
    finished: torch.Tensor,
    c_ref: float,
    beta_v: float,
    *,
    num_correct: float | None = None,
    num_incorrect: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Class-reweighted MSE between r_s = β_v·(log π(z_c|x,y,EOS) − c_ref) and r_v, finished responses only.

    z_c_logprob: (B,) (any value where not finished). rewards: (B,) in {0, 1}. finished: (B,) bool.
    Returns (loss scalar, metrics: self_reward_mse (weighted loss), self_reward_mse_unweighted,
    num_correct, num_incorrect) — counts are the local ones.
    """
    correct, incorrect = _split_classes(rewards, finished)
    weights, total = class_weights(correct, incorrect, num_correct, num_incorrect)
    weights = weights.to(z_c_logprob.dtype)
    used = correct | incorrect
    # Rows without a slot may hold any value (even -inf): replace them before the square, not after, so that
    # neither the loss nor its gradient can pick up inf * 0 = nan.
    z_c_logprob = torch.where(used, z_c_logprob, torch.full_like(z_c_logprob, c_ref))
    score = self_reward_score(z_c_logprob, c_ref, beta_v)
    squared_error = (score - rewards.to(score.dtype)) ** 2
    loss = (weights * squared_error).sum() / max(total, 1.0)
    used = used.to(score.dtype)
    metrics = {
        "self_reward_mse": _as_float(loss),
        "self_reward_mse_unweighted": _as_float((squared_error * used).sum() / used.sum().clamp(min=1.0)),
        "num_correct": float(correct.sum()),
        "num_incorrect": float(incorrect.sum()),
    }
    return loss, metrics


def self_reward_sft_loss(
    z_c_logprob: torch.Tensor,
    z_i_logprob: torch.Tensor,
    rewards: torch.Tensor,
    finished: torch.Tensor,
    *,
    num_correct: float | None = None,
    num_incorrect: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Ablation: class-weighted NLL of z_c after correct and of z_i after incorrect finished responses.

    z_c_logprob, z_i_logprob: (B,) log π(z | x, y, EOS) over the full vocabulary (same logits row).
    rewards: (B,) in {0, 1}. finished: (B,) bool. Test-time score: sigmoid(log π(z_c) − log π(z_i)).
    Returns (loss scalar, metrics: self_reward_sft, num_correct, num_incorrect).
    """
    correct, incorrect = _split_classes(rewards, finished)
    weights, total = class_weights(correct, incorrect, num_correct, num_incorrect)
    target_logprob = torch.where(correct, z_c_logprob, z_i_logprob)
    target_logprob = torch.where(correct | incorrect, target_logprob, torch.zeros_like(target_logprob))
    loss = -(weights.to(target_logprob.dtype) * target_logprob).sum() / max(total, 1.0)
    metrics = {
        "self_reward_sft": _as_float(loss),
        "num_correct": float(correct.sum()),
        "num_incorrect": float(incorrect.sum()),
    }
    return loss, metrics
