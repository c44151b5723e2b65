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


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Target-layout log-probs (R, W) from logits (R, W, V); column 0 is 0. Uses one logsumexp, no softmax copy."""
    logits = logits[:, :-1].float()
    picked = logits.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    values = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(values, (1, 0))


def policy_forward(model, batch: PolicyBatch, extra_token_id: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward: (token_logprobs (R, W), z_c_logprob (R,), log π(extra token | x, y, EOS) (R,) or None).

    ``extra_token_id`` is z_i of the SFT ablation, read from the same logits row as z_c.
    """
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0).to(device)
    logits = model(input_ids=input_ids, attention_mask=batch.attention_mask.to(device), position_ids=positions,
                   use_cache=False).logits
    token_logprobs = token_logprobs_from_logits(logits, input_ids)
    z_c_logprob = read_z_c_logprob(token_logprobs, batch.slot.to(device), batch.has_slot.to(device))
    extra = None
    if extra_token_id is not None:
        eos_position = (batch.slot - 1).clamp(min=0).to(device)
        rows = logits[torch.arange(len(eos_position), device=device), eos_position].float()
        extra = rows[:, extra_token_id] - torch.logsumexp(rows, dim=-1)
    return token_logprobs, z_c_logprob, extra
