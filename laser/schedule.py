"""LaSeR's warm-up schedule (paper §4.2; counted as the official code counts, steps starting at 1).

    step ≤ w_r             : plain GRPO (no self-reward loss, no integration)
    w_r < step ≤ w_r + w_sr : GRPO + α·L_SR
    step > w_r + w_sr       : GRPO + α·L_SR, advantages integrated (τ, T)
"""

from __future__ import annotations

from typing import NamedTuple


class Phase(NamedTuple):
    self_reward_loss: bool
    advantage_integration: bool


def warmup_phase(step: int, warmup_rl_steps: int, warmup_self_reward_steps: int) -> Phase:
    """Which LaSeR terms are active at optimizer step ``step`` (1-based) given w_r and w_sr."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return Phase(
        self_reward_loss=step > warmup_rl_steps,
        advantage_integration=step > warmup_rl_steps + warmup_self_reward_steps,
    )
