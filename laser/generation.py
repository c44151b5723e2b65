"""Rollout generation that scores z_c inside the generation pass itself.

When a sequence samples EOS, the next decode step feeds that EOS through the model with the KV cache anyway;
the logits of that step are log π(· | x, y, EOS), so log π(z_c | x, y, EOS) costs nothing while other sequences
are still decoding, and at most one extra one-token decode step per batch when the last sequence finishes. The
official code instead re-runs a full forward over prompt + response (measured here: 1.29× the generation time).

Backends share one interface, ``Generator.generate(prompts, num_samples, sampling, probe_token_ids)``:
- ``HFGenerator``: a hand-written KV-cache decode loop over any HF causal LM (CPU or GPU). It does not use
  ``model.generate`` because generate leaves the last sampled token out of the cache and keeps decoding
  finished rows; here finished rows leave the batch (``DynamicCache.batch_select_indices``) and waiting
  samples take their place (continuous batching). Prefill is shared: the prompts' common prefix (the
  instruction and few-shot turns) is run once per call, and each distinct prompt once for all its samples
  (measured: prompt tokens were ~5× the generated ones at the default task, and prefill ~40% of rollout time).
- ``laser.vllm_backend.VLLMGenerator``: a vLLM engine in a worker process from its own environment (vLLM's pins
  conflict with prefect's: fastapi, transformers), z_c forced for one decode step after EOS inside the same
  request, the same ``Completion`` schema.

Layout: prompts are left-padded; ``position_ids = cumsum(attention_mask) - 1`` so padding never shifts
positions, which keeps the logits equal to a full forward over the unpadded sequence.
"""

from __future__ import annotations

import copy
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


def sample_seed(sampling: Sampling, seeds: Sequence[int] | None, prompt: int, sample: int) -> int:
    """The seed of sample ``sample`` of prompt ``prompt``: from (``seeds[prompt]``, sample) when per-prompt seeds
    are given, else from (``sampling.seed``, prompt, sample). Every backend seeds each sample with it."""
    base = seeds[prompt] if seeds is not None else sampling.seed * 100_003 + prompt
    return (base * 1_000_003 + sample) % 2**63


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
    """The jobs in the batch (one row each), their KV cache, attention mask, next positions and pending logits."""

    def __init__(self, jobs: list[int], attention_mask: torch.Tensor, next_position: torch.Tensor, cache,
                 logits: torch.Tensor):
        self.jobs, self.attention_mask, self.next_position, self.cache = jobs, attention_mask, next_position, cache
        self.logits = logits  # (R, V): each row's next-token logits (for a row that just fed EOS: the probe's)
        self.awaiting_probe = torch.zeros(len(jobs), dtype=torch.bool, device=logits.device)  # (R,) fed EOS

    def keep(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        index = torch.nonzero(keep, as_tuple=True)[0]
        self.jobs = [self.jobs[i] for i in index.tolist()]
        self.attention_mask, self.next_position = self.attention_mask[index], self.next_position[index]
        self.logits, self.awaiting_probe = self.logits[index], self.awaiting_probe[index]
        if self.jobs:
            self.cache.batch_select_indices(index)
            self._trim_left()

    def _trim_left(self) -> None:
        """Drop leading columns no remaining row attends (the padding of rows that left): attention stays short."""
        used = self.attention_mask.any(dim=0)
        first = int(used.nonzero()[0]) if bool(used.any()) else 0
        if first:
            self.attention_mask = self.attention_mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def extend(self, other: _DecodeState) -> None:
        """Append ``other``'s rows; the shorter cache is left-padded (masked: positions are explicit)."""
        width, other_width = self.attention_mask.shape[1], other.attention_mask.shape[1]
        for state, pad in ((self, other_width - width), (other, width - other_width)):
            if pad > 0:
                state.attention_mask = torch.nn.functional.pad(state.attention_mask, (pad, 0))
                for layer in state.cache.layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        self.jobs = self.jobs + other.jobs
        self.attention_mask = torch.cat([self.attention_mask, other.attention_mask])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.awaiting_probe = torch.cat([self.awaiting_probe, other.awaiting_probe])


class HFGenerator:
    """KV-cache sampling loop over a Hugging Face causal LM, reading probe-token log-probs after EOS.

    Continuous batching: the batch holds up to ``batch_size`` samples; rows that finish leave it and, once a
    quarter of the slots is free, waiting samples are prefilled and join (their cache left-padded to the batch's
    width), so the batch is not left decoding its last long sample alone. Prefill is shared (``share_prefill``):
    the prompts' common prefix once per call, each distinct prompt once per admission for all its samples there
    (they copy its cache). Every sample draws from its own seeded
    generator, so what it gets does not depend on which samples share its batch (up to float rounding of the
    batched matmuls, which can change a draw in rare near-ties).
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, stop_token_ids: Sequence[int] | None = None,
                 continuous: bool = True, share_prefill: bool = True):
        """``continuous`` False: static batches (the next ones join only when the batch is empty); ``share_prefill``
        False: every sample prefills its whole prompt. Both only to measure what they save (benches, tests)."""
        self.model, self.tokenizer, self.batch_size, self.continuous = model, tokenizer, batch_size, continuous
        self.share_prefill = share_prefill
        self.stop_token_ids = sorted(set(stop_token_ids or default_stop_ids(model, tokenizer)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_token_ids[0]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, sampling: Sampling,
                 probe_token_ids: Sequence[int] = (), progress: bool = False,
                 seeds: Sequence[int] | None = None) -> list[Completion]:
        """Sample k of prompt p draws from its own generator, seeded from (``seeds[p]``, k) when ``seeds`` (one
        per prompt) is given — what a prompt gets then does not depend on the other prompts of the call (the
        trainer's rollouts are the same whatever the number of ranks; up to float rounding, as the shared prefix
        prefilled once depends on the call's prompts) — else from (``sampling.seed``, p, k)."""
        jobs = [(p, k) for p in range(len(prompts)) for k in range(num_samples)]
        if not jobs:
            return []
        device = self.model.device
        rngs = [torch.Generator(device=device).manual_seed(sample_seed(sampling, seeds, p, k)) for p, k in jobs]
        prefix = self._shared_prefix(prompts) if self.share_prefill else None
        responses: list[list[int]] = [[] for _ in jobs]
        probes: list[dict[int, float] | None] = [None] * len(jobs)
        probe_ids = list(probe_token_ids)
        stop = torch.tensor(self.stop_token_ids, device=device)
        queue = list(range(len(jobs)))
        state = None
        bar = _progress(len(jobs), progress)
        while queue or state.jobs:
            state, queue = self._admit(state, queue, jobs, prompts, prefix)
            awaiting_probe = state.awaiting_probe
            if probe_ids and bool(awaiting_probe.any()):
                # These rows fed their EOS in the previous step: these logits are log π(· | x, y, EOS).
                values = torch.log_softmax(state.logits[awaiting_probe].float(), dim=-1)[:, probe_ids]
                for job, row in zip(_masked(state.jobs, awaiting_probe), values.tolist()):
                    probes[job] = dict(zip(probe_ids, row))
            bar.update(int(awaiting_probe.sum()))
            state.keep(~awaiting_probe)
            if not state.jobs:
                continue
            tokens = sample_next_token(state.logits, sampling.temperature, sampling.top_p,
                                       [rngs[j] for j in state.jobs])
            for job, token in zip(state.jobs, tokens.tolist()):
                responses[job].append(token)
            finished = torch.isin(tokens, stop)
            at_budget = torch.tensor([len(responses[j]) >= sampling.max_new_tokens for j in state.jobs],
                                     device=device)
            # Leaving now: truncated rows, and finished ones when there is nothing to read after their EOS.
            leaving = at_budget & ~finished if probe_ids else at_budget | finished
            bar.update(int(leaving.sum()))
            state.keep(~leaving)
            tokens, finished = tokens[~leaving], finished[~leaving]
            if not state.jobs:
                continue
            state.awaiting_probe = finished if probe_ids else torch.zeros_like(finished)
            state.attention_mask = torch.cat([state.attention_mask, torch.ones_like(tokens)[:, None]], dim=1)
            state.logits = self._forward(tokens[:, None], state.attention_mask, state.next_position[:, None],
                                         state.cache)
            state.next_position = state.next_position + 1
        bar.close()
        return [self._completion(prompts, job, responses[j], probes[j]) for j, job in enumerate(jobs)]

    def _admit(self, state: _DecodeState | None, queue: list[int], jobs: list[tuple[int, int]],
               prompts: Sequence[Sequence[int]], prefix: _Prefix | None) -> tuple[_DecodeState, list[int]]:
        """Prefill waiting samples into the free slots once a quarter of the batch is free (or it is empty)."""
        active = 0 if state is None else len(state.jobs)
        free = self.batch_size - active
        if not queue or (active and (not self.continuous or free < max(1, self.batch_size // 4))):
            return state, queue
        admitted, queue = queue[:free], queue[free:]
        joined = self._prefill(admitted, [jobs[j][0] for j in admitted], prompts, prefix)
        if active:
            state.extend(joined)
            return state, queue
        return joined, queue

    def _shared_prefix(self, prompts: Sequence[Sequence[int]]) -> _Prefix | None:
        """The KV cache (batch 1) of the tokens every prompt starts with, leaving each prompt one token of its own
        (its last position's logits are the first draw's); None when they share nothing."""
        length, first = min(len(p) for p in prompts) - 1, prompts[0]
        for prompt in prompts[1:]:
            length = _common_length(first, prompt, length)
        if length <= 0:
            return None
        cache = _new_cache(self.model)
        ids = torch.tensor([list(first[:length])], device=self.model.device)
        self._forward(ids, torch.ones_like(ids), torch.arange(length, device=ids.device)[None], cache)
        return _Prefix(length, cache)

    def _prefill(self, jobs: list[int], job_prompts: list[int], prompts: Sequence[Sequence[int]],
                 prefix: _Prefix | None) -> _DecodeState:
        """One prefill row per distinct prompt (after the shared prefix); its samples copy that row's cache."""
        device = self.model.device
        keys = job_prompts if self.share_prefill else jobs  # a prefill row per distinct prompt, or per sample
        row_of = {key: row for row, key in enumerate(dict.fromkeys(keys))}
        distinct = [job_prompts[keys.index(key)] for key in row_of]  # the prompt of each prefill row
        rows = torch.tensor([row_of[key] for key in keys], device=device)
        shared = prefix.length if prefix else 0
        ids, mask = left_pad([prompts[p][shared:] for p in distinct], self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        position = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = prefix.copies(len(distinct)) if prefix else _new_cache(self.model)
        mask = torch.cat([mask.new_ones((len(distinct), shared)), mask], dim=1)
        logits = self._forward(ids, mask, position, cache)
        if len(rows) != len(distinct):
            cache.batch_select_indices(rows)
        return _DecodeState(list(jobs), mask[rows], position[rows, -1] + 1, cache, logits[rows])

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


class _Prefix:
    """The KV cache of the prompts' shared first ``length`` tokens, one row."""

    def __init__(self, length: int, cache):
        self.length, self.cache = length, cache

    def copies(self, rows: int):
        """A fresh cache holding the prefix ``rows`` times (the decode loop extends and reorders its own)."""
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


def _common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


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

