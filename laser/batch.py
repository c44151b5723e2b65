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
    prompt_length: torch.Tensor | None  # (R,) the row's prompt tokens (rows of one group share them); None: rows
    # run whole (the reference the shared-prompt forward is tested against)

    def select(self, rows: slice | torch.Tensor) -> PolicyBatch:
        return PolicyBatch(*(_apply(getattr(self, f), lambda t: t[rows]) for f in self.__dataclass_fields__))

    def to(self, device) -> PolicyBatch:
        return PolicyBatch(*(_apply(getattr(self, f), lambda t: t.to(device)) for f in self.__dataclass_fields__))


def _apply(value: torch.Tensor | None, fn):
    return None if value is None else fn(value)


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], finished: Sequence[bool],
            z_c_id: int, pad_id: int) -> PolicyBatch:
    """Right-padded rows with one spare column, so every finished response has room for z_c."""
    empty = [row for row, prompt in enumerate(prompts) if not len(prompt)]
    if empty:  # the first response token's log-prob is read at the last prompt position
        raise ValueError(f"rows {empty[:5]} have an empty prompt: every row needs at least one prompt token")
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
    prompt_length = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return PolicyBatch(ids, attention, response_mask, slot, has_slot, finished_t, prompt_length)


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


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")  # configs whose logits are not just lm_head(h)


class PolicyModel(torch.nn.Module):
    """A causal LM whose training forward computes the LM head only where the losses read it.

    The losses need log π at the response positions (and log π(z_c | x, y, EOS) at the slot): about a third of a
    row's positions here, and the (R, W, V) logits tensor is the largest activation of a small-vocabulary-heavy
    model (SmolLM2: V = 49,152 against H = 576). The decoder body runs once over each row (a prompt that rows
    share once for them all: ``_hidden_states``); the head runs on the selected positions in chunks of
    ``logits_chunk`` rows, each recomputed in backward (activation checkpointing) when there is more than one, so
    memory stays O(chunk × V) however long the responses.
    ``compute_dtype`` ``bfloat16``: the forward runs under bfloat16 autocast (the weights and the optimizer stay fp32);
    log-softmax is always fp32. Models whose logits are transformed after the head (soft-capping, a logit scale)
    take the full-logits path.

    ``causal_lm`` is the Hugging Face model (generation, export and checkpoints use it unchanged).
    """

    def __init__(self, causal_lm, logits_chunk: int = 2048, compute_dtype: str = "float32"):
        super().__init__()
        self.causal_lm, self.logits_chunk, self.compute_dtype = causal_lm, logits_chunk, compute_dtype
        config = causal_lm.config
        self.lean = not any(getattr(config, key, None) for key in LOGIT_TRANSFORMS) and \
            causal_lm.get_output_embeddings() is not None
        # A sliding window is masked by cache index, not position: a tail after a shorter prompt's padding would
        # see a shifted window. Those models run rows whole.
        layer_types = getattr(config, "layer_types", None)
        self.can_share_prompts = ("sliding_attention" not in layer_types if layer_types
                                  else getattr(config, "sliding_window", None) is None)

    def forward(self, input_ids, attention_mask, position_ids, response_mask, slot, has_slot,
                extra_token_id: int | None = None, temperature: float = 1.0, prompt_length=None):
        """-> (token_logprobs (R, W) target layout, zero off the response and slot; z_c_logprob (R,), 0 where
        ``has_slot`` is False; log π(extra_token_id | x, y, EOS) (R,) or None). ``prompt_length`` (R,): rows
        with the same prompt run it once (see ``_hidden_states``)."""
        bf16 = self.compute_dtype == "bfloat16"
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            if not self.lean:
                logits = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).logits
                return _from_full_logits(logits, input_ids, slot, has_slot, extra_token_id, temperature)
            hidden, offset = self._hidden_states(input_ids, attention_mask, position_ids, prompt_length)
            return self._lean_logprobs(hidden, offset, input_ids, response_mask, slot, has_slot, extra_token_id,
                                       temperature)

    def _hidden_states(self, input_ids, attention_mask, position_ids, prompt_length):
        """-> (hidden, offset (R,)): ``hidden[r, t - offset[r]]`` is the decoder's output at position t of row r,
        for every t ≥ offset[r] (0 when the rows run whole).

        The rows of a group share their prompt (~130 of ~155 tokens at the default task): when some rows repeat
        a prompt, each distinct prompt runs once with its keys and values cached, and every row runs only its
        response (and slot) on its prompt's cache; the gradient reaches the prompt through the cache. The same
        maths up to float rounding. Not under gradient checkpointing: the recompute would write the cache twice
        (transformers drops the cache there), so those rows run whole (see ``_prompt_groups``)."""
        decoder = self.causal_lm.get_decoder()
        groups = self._prompt_groups(input_ids, prompt_length)
        if groups is None:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            return hidden, torch.zeros_like(input_ids[:, 0])
        first, group = groups
        width = int(prompt_length.max())
        prompt_mask = attention_mask[first, :width] * (torch.arange(width, device=input_ids.device)
                                                       < prompt_length[first, None])
        from transformers import DynamicCache

        cache = DynamicCache(config=self.causal_lm.config)
        prompt_hidden = decoder(input_ids=input_ids[first, :width], attention_mask=prompt_mask,
                                position_ids=position_ids[first, :width], past_key_values=cache,
                                use_cache=True).last_hidden_state
        cache.batch_select_indices(group)  # each row goes on from its prompt's keys and values
        tail = attention_mask.sum(dim=1) - prompt_length  # (R,) the response and its slot
        columns = prompt_length[:, None] + torch.arange(int(tail.max()), device=input_ids.device)
        inside = columns < (prompt_length + tail)[:, None]
        columns = columns.clamp(max=input_ids.shape[1] - 1)
        response_hidden = decoder(
            input_ids=input_ids.gather(1, columns),
            attention_mask=torch.cat([prompt_mask[group], attention_mask.gather(1, columns) * inside], dim=1),
            position_ids=position_ids.gather(1, columns), past_key_values=cache, use_cache=True).last_hidden_state
        last_prompt = prompt_hidden[group, prompt_length - 1]  # (R, H): what the first response token is read at
        return torch.cat([last_prompt[:, None], response_hidden], dim=1), prompt_length - 1

    def _prompt_groups(self, input_ids, prompt_length) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(first row of each distinct prompt, each row's prompt index) for the prompt-once path, or None: rows
        run whole. In a world of one that is decided per micro-batch (no prompt repeated: whole rows). With more
        ranks every rank must make the same module calls (ZeRO-3 gathers weights per call), so the prompt-once
        path runs whatever the rows, each prompt its own group when none repeats."""
        checkpointing = self.training and getattr(self.causal_lm, "is_activation_checkpointing", False)
        if prompt_length is None or checkpointing or not self.can_share_prompts:
            return None
        groups = _distinct_prompts(input_ids, prompt_length)
        if groups is None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            rows = torch.arange(len(input_ids), device=input_ids.device)
            groups = rows, rows
        return groups

    def _lean_logprobs(self, hidden, offset, input_ids, response_mask, slot, has_slot, extra_token_id,
                       temperature):
        """The head at the response positions and the slot only (see the class docstring)."""
        targets = response_mask.bool().clone()
        rows = torch.nonzero(has_slot, as_tuple=True)[0]
        targets[rows, slot[rows]] = True  # the z_c slot: its log-prob is the score's
        row, col = torch.nonzero(targets, as_tuple=True)
        picked = self._head_logprobs(hidden[row, col - 1 - offset[row]], input_ids[row, col].unsqueeze(1),
                                     temperature)
        token_logprobs = torch.zeros(input_ids.shape, dtype=picked.dtype, device=picked.device)
        token_logprobs = token_logprobs.index_put((row, col), picked[:, 0])
        z_c_logprob = torch.where(has_slot, token_logprobs.gather(1, slot.clamp(max=input_ids.shape[1] - 1)
                                                                  .unsqueeze(1)).squeeze(1), 0.0)
        if temperature == 1.0 and extra_token_id is None:
            return token_logprobs, z_c_logprob, None
        # z_c (and z_i) are read at temperature 1: one more head pass over the R slot rows only
        eos_column = ((slot - 1).clamp(min=0) - offset).clamp(min=0)  # rows without a slot: any (masked below)
        eos_hidden = hidden[torch.arange(len(slot), device=slot.device), eos_column]
        z_c_ids = input_ids.gather(1, torch.where(has_slot, slot, 0).unsqueeze(1))
        extra_ids = torch.full_like(z_c_ids, 0 if extra_token_id is None else extra_token_id)
        at_eos = self._head_logprobs(eos_hidden, torch.cat([z_c_ids, extra_ids], dim=1), 1.0)
        z_c_logprob = torch.where(has_slot, at_eos[:, 0], 0.0)
        return token_logprobs, z_c_logprob, None if extra_token_id is None else at_eos[:, 1]

    def _head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """log_softmax(lm_head(hidden) / T) at ``targets``: hidden (P, H), targets (P, m) -> (P, m) fp32."""
        head = self.causal_lm.get_output_embeddings()
        chunks = range(0, len(hidden), self.logits_chunk)
        recompute = len(chunks) > 1 and torch.is_grad_enabled()
        parts = []
        for start in chunks:
            args = (head, hidden[start:start + self.logits_chunk], targets[start:start + self.logits_chunk],
                    temperature)
            parts.append(torch.utils.checkpoint.checkpoint(_picked_logprobs, *args, use_reentrant=False)
                         if recompute else _picked_logprobs(*args))
        return torch.cat(parts) if parts else hidden.new_zeros((0, targets.shape[1]), dtype=torch.float32)


def _distinct_prompts(input_ids: torch.Tensor, prompt_length: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row of each distinct prompt (U,), each row's prompt index (R,)), or None if no row repeats one."""
    index: dict[tuple[int, ...], int] = {}
    first, group = [], []
    for row, (ids, length) in enumerate(zip(input_ids.tolist(), prompt_length.tolist())):
        key = tuple(ids[:length])
        if key not in index:
            index[key] = len(first)
            first.append(row)
        group.append(index[key])
    if len(first) == len(group):
        return None
    device = input_ids.device
    return torch.tensor(first, device=device), torch.tensor(group, device=device)


def _picked_logprobs(head, hidden, targets, temperature):
    logits = head(hidden).float()  # (chunk, V): the one full-vocabulary tensor, fp32 for the log-softmax
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)


def _from_full_logits(logits, input_ids, slot, has_slot, extra_token_id, temperature):
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


def as_policy(model) -> torch.nn.Module:
    """``model`` itself when it is a :class:`PolicyModel` or an engine wrapping one, else a PolicyModel over it."""
    if isinstance(model, PolicyModel) or isinstance(getattr(model, "module", None), PolicyModel):
        return model
    return PolicyModel(model)


def policy_forward(model, batch: PolicyBatch, extra_token_id: int | None = None, temperature: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward: (token_logprobs (R, W), z_c_logprob (R,), log π(extra token | x, y, EOS) (R,) or None).

    ``model``: a :class:`PolicyModel`, a DeepSpeed engine over one, or a plain HF causal LM (wrapped).
    ``token_logprobs`` are those of the sampling distribution, log_softmax(logits / temperature), so PPO ratios
    and the policy gradient refer to the policy that produced the rollouts (as in verl); ``temperature`` 0
    (greedy) counts as 1. They are computed at the response positions (and the z_c slot) only; elsewhere 0.
    z_c, and ``extra_token_id`` (z_i of the SFT ablation), are read at temperature 1: the self-rewarding score is
    defined on π_θ itself, and the rollout engine scores it so at test time. Rows without a slot (truncated
    responses) get z_c log-prob 0: mask them with ``batch.has_slot``.
    """
    device = next(model.parameters()).device
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    return as_policy(model)(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
        position_ids=positions.to(device), response_mask=batch.response_mask.to(device),
        slot=batch.slot.to(device), has_slot=batch.has_slot.to(device), extra_token_id=extra_token_id,
        temperature=temperature if temperature > 0 else 1.0,
        prompt_length=None if batch.prompt_length is None else batch.prompt_length.to(device))


def full_logits_forward(model, batch: PolicyBatch, extra_token_id: int | None = None, temperature: float = 1.0):
    """The reference: one forward computing the head at every position (what policy_forward did before the
    lean head; tests compare the two)."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                   use_cache=False).logits
    temperature = temperature if temperature > 0 else 1.0
    return _from_full_logits(logits, batch.input_ids, batch.slot, batch.has_slot, extra_token_id, temperature)
