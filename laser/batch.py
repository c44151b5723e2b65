"""Training batches: completions -> right-padded tensors with z_c written into the slot after EOS, and the one
forward pass that yields both the response token log-probs and log π_θ(z_c | x, y, EOS).

Row layout: [prompt | response (… EOS) | z_c | pad …]. Token log-probs use the target layout of laser.score
(``token_logprobs[b, t] = log π(ids[b, t] | ids[b, :t])``), so the z_c log-prob sits at the slot index and the
response log-probs at the response positions of the same tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from laser.score import read_z_c_logprob, write_z_c, z_c_slot


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # (R, W) with z_c in the slot of finished rows
    attention_mask: torch.Tensor  # (R, W)
    response_mask: torch.Tensor  # (R, W) target layout: 1 on response tokens (EOS included)
    slot: torch.Tensor  # (R,) index right after the response
    has_slot: torch.Tensor  # (R,) finished rows (they hold z_c)
    finished: torch.Tensor  # (R,)

    def select(self, rows: slice | torch.Tensor) -> PolicyBatch:
        return PolicyBatch(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def to(self, device) -> PolicyBatch:
        return PolicyBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], finished: Sequence[bool],
            z_c_id: int, pad_id: int) -> PolicyBatch:
    """Right-padded rows with one spare column, so every finished response has room for z_c."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses)) + 1
    rows = len(prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    response_mask = torch.zeros((rows, width), dtype=torch.bool)
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        n_p, n_r = len(prompt), len(response)
        ids[b, :n_p + n_r] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention[b, :n_p + n_r + 1] = 1  # the slot is attended (z_c or pad): it changes no earlier position
        response_mask[b, n_p:n_p + n_r] = True
    finished_t = torch.tensor(list(finished), dtype=torch.bool)
    slot, has_slot = z_c_slot(response_mask, finished_t)
    ids = write_z_c(ids, slot, has_slot, z_c_id)
    return PolicyBatch(ids, attention, response_mask, slot, has_slot, finished_t)


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
                               ) -> torch.Tensor:
    """Target-layout log-probs (R, W) of log_softmax(logits / temperature) from logits (R, W, V); column 0 is 0.

    One logsumexp, no softmax copy; a temperature other than 1 costs one more (R, W, V) copy.
    """
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    values = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(values, (1, 0))


def logprob_after_eos(logits: torch.Tensor, slot: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token_ids[r] | x, y, EOS) at temperature 1, from the logits row that feeds the slot.

    logits: (R, W, V); slot: (R,) index right after EOS; token_ids: (R,) -> (R,)
    """
    eos_position = (slot - 1).clamp(min=0)
    rows = logits[torch.arange(len(eos_position), device=logits.device), eos_position].float()
    return rows.gather(1, token_ids.unsqueeze(1)).squeeze(1) - torch.logsumexp(rows, dim=-1)


def policy_forward(model, batch: PolicyBatch, extra_token_id: int | None = None, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward: (token_logprobs (R, W), z_c_logprob (R,), log π(extra token | x, y, EOS) (R,) or None).

    ``token_logprobs`` are those of the sampling distribution, log_softmax(logits / temperature), so PPO ratios
    and the policy gradient refer to the policy that produced the rollouts (as in verl); ``temperature`` 0
    (greedy) counts as 1. z_c, and ``extra_token_id`` (z_i of the SFT ablation), are read at temperature 1: the
    self-rewarding score is defined on π_θ itself, and the rollout engine scores it so at test time. Rows
    without a slot (truncated responses) get z_c log-prob 0: mask them with ``batch.has_slot``.
    """
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    slot, has_slot = batch.slot.to(device), batch.has_slot.to(device)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    logits = model(input_ids=input_ids, attention_mask=batch.attention_mask.to(device), position_ids=positions,
                   use_cache=False).logits
    temperature = temperature if temperature > 0 else 1.0
    token_logprobs = token_logprobs_from_logits(logits, input_ids, temperature)
    if temperature == 1.0:  # z_c sits in its slot, so its log-prob is already in token_logprobs
        z_c_logprob = read_z_c_logprob(token_logprobs, slot, has_slot)
    else:
        z_c_ids = input_ids.gather(1, torch.where(has_slot, slot, 0).unsqueeze(1)).squeeze(1)
        z_c_logprob = torch.where(has_slot, logprob_after_eos(logits, slot, z_c_ids), 0.0)
    extra = None
    if extra_token_id is not None:
        extra = logprob_after_eos(logits, slot, torch.full_like(slot, extra_token_id))
    return token_logprobs, z_c_logprob, extra
