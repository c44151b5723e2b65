"""Rollout generation that scores z_c inside the generation pass itself.

When a sequence samples EOS, the next decode step feeds that EOS through the model with the KV cache anyway;
the logits of that step are log π(· | x, y, EOS), so log π(z_c | x, y, EOS) costs nothing while other sequences
are still decoding, and at most one extra one-token decode step per batch when the last sequence finishes. The
official code instead re-runs a full forward over prompt + response (measured here: 1.29× the generation time).

Backends share one interface, ``Generator.generate(prompts, num_samples, sampling, probe_token_ids)``:
- ``HFGenerator``: a hand-written KV-cache decode loop over any HF causal LM (CPU or GPU). It does not use
  ``model.generate`` because generate leaves the last sampled token out of the cache and keeps decoding
  finished rows; here finished rows leave the batch (``DynamicCache.batch_select_indices``).
- a vLLM backend (GPU) is not written yet; it plugs in here with the same ``Completion`` schema, reading z_c from
  the logprobs of one extra decode step after EOS, and runs from its own environment (vLLM's pins conflict with
  prefect's: fastapi, transformers).

Layout: prompts are left-padded; ``position_ids = cumsum(attention_mask) - 1`` so padding never shifts
positions, which keeps the logits equal to a full forward over the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0


@dataclass
class Completion:
    """One sampled response. ``probe_logprobs[t]`` = log π(t | x, y, EOS) for each probe token id t; None if
    truncated (no EOS, nothing after it)."""

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    response_token_ids: list[int]  # including the final EOS when finished
    text: str
    finish_reason: str  # "eos" | "length"
    probe_logprobs: dict[int, float] | None


class Generator(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), progress: bool = False,
                 seeds: Sequence[int] | None = None) -> list[Completion]: ...


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Sample one token per row from logits (R, V): greedy at temperature 0, else nucleus sampling.

    ``generator``: one for the batch, or a list of one per row (each row's draw then depends on its own
    generator only, not on which other rows share the batch)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keeps the token that crosses top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=g).squeeze(-1)
                          for row, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (R, P) and attention mask (R, P) for prompts of different lengths."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


class _DecodeState:
    """The rows still in the batch, their KV cache, masks and positions."""

    def __init__(self, rows: list[int], attention_mask: torch.Tensor, next_position: torch.Tensor, cache):
        self.rows, self.attention_mask, self.next_position, self.cache = rows, attention_mask, next_position, cache

    def keep(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        index = torch.nonzero(keep, as_tuple=True)[0]
        self.rows = [self.rows[i] for i in index.tolist()]
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]
        self.cache.batch_select_indices(index)


class HFGenerator:
    """KV-cache sampling loop over a Hugging Face causal LM, reading probe-token log-probs after EOS."""

    def __init__(self, model, tokenizer, batch_size: int = 16, stop_token_ids: Sequence[int] | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_token_ids = sorted(set(stop_token_ids or default_stop_ids(model, tokenizer)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), progress: bool = False,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """``seeds`` (one per prompt): sample k of prompt p draws from its own generator, seeded from
        (seeds[p], k), so what a prompt gets does not depend on the other prompts of the call (the trainer's
        rollouts are then the same whatever the number of ranks); else one generator per chunk of ``sampling.seed``.
        """
        jobs = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
        chunks = [jobs[i:i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        bar = _progress(len(jobs), progress)
        completions: list[Completion] = []
        for chunk_index, chunk in enumerate(chunks):
            # One generator per chunk, seeded from (seed, chunk): results do not depend on earlier chunks' lengths.
            rng = torch.Generator(device=self.model.device).manual_seed(sampling.seed * 1_000_003 + chunk_index)
            if seeds is not None:
                rng = [torch.Generator(device=self.model.device).manual_seed((seeds[p] * 1_000_003 + k) % 2**63)
                       for p, k in chunk]
            completions += self._generate_chunk(prompts, chunk, sampling, list(probe_token_ids), rng)
            bar.update(len(chunk))
        bar.close()
        return completions

    def _generate_chunk(self, prompts, chunk, sampling, probe_ids, rng) -> list[Completion]:
        device = self.model.device
        ids, mask = left_pad([prompts[p] for p, _ in chunk], self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        state = _DecodeState(list(range(len(chunk))), mask, position[:, -1] + 1, _new_cache(self.model))
        logits = self._forward(ids, mask, position, state.cache)
        responses: list[list[int]] = [[] for _ in chunk]
        probes: list[dict[int, float] | None] = [None] * len(chunk)
        stop = torch.tensor(self.stop_token_ids, device=device)
        awaiting_probe = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        for step in range(sampling.max_new_tokens + 1):
            if probe_ids and bool(awaiting_probe.any()):
                # These rows fed their EOS in the previous step: these logits are log π(· | x, y, EOS).
                probe_logprobs = torch.log_softmax(logits[awaiting_probe].float(), dim=-1)[:, probe_ids]
                for row, values in zip(_masked(state.rows, awaiting_probe), probe_logprobs.tolist()):
                    probes[row] = dict(zip(probe_ids, values))
            active = ~awaiting_probe
            if step == sampling.max_new_tokens:
                break
            state.keep(active)
            logits = logits[active]
            if not state.rows:
                break
            tokens = sample_next_token(logits, sampling.temperature, sampling.top_p,
                                       [rng[row] for row in state.rows] if isinstance(rng, list) else rng)
            for row, token in zip(state.rows, tokens.tolist()):
                responses[row].append(token)
            finished = torch.isin(tokens, stop)
            if not probe_ids:  # nothing to read after EOS: finished rows leave now
                state.keep(~finished)
                tokens, finished = tokens[~finished], finished[~finished]
                if not state.rows:
                    break
            awaiting_probe = finished
            state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
            logits = self._forward(tokens[:, None], state.attention_mask, state.next_position[:, None], state.cache)
            state.next_position = state.next_position + 1
        return [self._completion(prompts, job, responses[row], probes[row]) for row, job in enumerate(chunk)]

    def _forward(self, ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _completion(self, prompts, job, response, probe) -> Completion:
        prompt_index, sample_index = job
        finished = bool(response) and response[-1] in self.stop_token_ids
        return Completion(
            prompt_index=prompt_index, sample_index=sample_index, prompt_token_ids=list(prompts[prompt_index]),
            response_token_ids=response, text=self.tokenizer.decode(response, skip_special_tokens=True),
            finish_reason="eos" if finished else "length", probe_logprobs=probe if finished else None)


def _masked(rows: list[int], mask: torch.Tensor) -> list[int]:
    return [row for row, keep in zip(rows, mask.tolist()) if keep]


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def default_stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the generation config's EOS id(s)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the model's generation config names none")
    return sorted(ids)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rollouts", unit="sample", disable=not enabled, mininterval=2.0)


def full_forward_probe_logprobs(model, prompt_ids: Sequence[int], response_ids: Sequence[int],
                                probe_token_ids: Sequence[int]) -> list[float]:
    """Reference (the official recipe): one full forward over prompt + response; logits at the EOS position."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)[list(probe_token_ids)].tolist()

