"""Stage ref_constant: the reference statistics of z_c: log π_ref(z · | x, y, EOS) over reference rollouts on
training prompts, for every candidate z_c. c_ref is the mean of the one chosen.

    python -m stages.ref_constant [--params params.yaml]

Reads ``paths.train_data`` and the base model; writes ``paths.ref_constant`` (JSON: ``candidates``, each with its
token, id, mean (= its c_ref), std, min, max; ``selection`` auto | fixed; n, rollout counts; z_i for the sft
ablation) and ``paths.ref_logprobs`` (CSV, DVC plot data: the log-prob of every candidate in every finished
rollout).

``self_reward.token: auto`` probes every candidate token (special/added tokens that are not EOS/BOS/PAD and not
in the chat template) in the same generation pass. Which one is z_c is decided where β_v is known
(:func:`laser.runtime.self_reward_config`, in train and rollout@base): the steadiest of those that leave room for
a score of 1. So nothing here depends on β_v, and changing β_v does not rerun the reference rollouts.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import statistics

from laser.cli import stage_main
from laser.config import Params
from laser.errors import StageError
from laser.io import atomic_write_json, atomic_write_text
from laser.models import reserved_tokens, token_id, z_c_candidates
from laser.rollouts import read_problems
from laser.runtime import base_model_dir, open_generator, sampling, tokenize_prompts

log = logging.getLogger("laser.stages.ref_constant")


def candidate_tokens(tokenizer, token: str, incorrect_token: str | None = None) -> list[str]:
    """``[token]``, or for ``auto`` every unused special token except z_i (the SFT ablation's incorrect token)."""
    if token != "auto":
        if token in reserved_tokens(tokenizer) or token == incorrect_token:
            raise StageError(f"self_reward.token {token!r} is the tokenizer's EOS/BOS/PAD/UNK token or "
                             "self_reward.incorrect_token: z_c must be a token the model never otherwise emits "
                             "there; name an unused special token, or use 'auto'")
        return [token]
    candidates = [t for t in z_c_candidates(tokenizer) if t != incorrect_token]
    if not candidates:
        raise StageError("self_reward.token is 'auto' but the tokenizer has no unused special token (other than "
                         "self_reward.incorrect_token); name a token in self_reward.token")
    return candidates


def summarize_candidates(tokens: list[str], token_ids: list[int], probe_rows: list[dict[int, float]]) -> list[dict]:
    """Mean/std/min/max of each candidate's log-prob after EOS. probe_rows: one {token id: log-prob} per finished
    rollout."""
    stats = []
    for token, tid in zip(tokens, token_ids):
        values = [row[tid] for row in probe_rows]
        stats.append({"token": token, "token_id": tid, "mean": statistics.fmean(values),
                      "std": statistics.pstdev(values), "min": min(values), "max": max(values)})
    return stats


def ref_constant(params: Params, generator, tokenizer, problems: list[dict]) -> tuple[dict, list[dict]]:
    """Sample reference rollouts, probe the candidate tokens after EOS; returns (summary, per-rollout log-probs
    of every candidate as rows for the plot)."""
    cfg, sr = params.ref_constant, params.self_reward
    rng = random.Random(cfg.seed)
    chosen = rng.sample(problems, min(cfg.num_prompts, len(problems)))
    tokens = candidate_tokens(tokenizer, sr.token, sr.incorrect_token if sr.loss == "sft" else None)
    ids = [token_id(tokenizer, t) for t in tokens]
    completions = generator.generate(tokenize_prompts(tokenizer, chosen), cfg.samples_per_prompt,
                                     sampling(params, cfg.seed), probe_token_ids=ids, progress=True)
    probe_rows = [c.probe_logprobs for c in completions if c.probe_logprobs is not None]
    if not probe_rows:
        raise StageError(f"none of {len(completions)} reference rollouts finished with EOS within "
                         f"generation.max_new_tokens={params.generation.max_new_tokens}: raise it")
    summary = {
        "selection": "auto" if sr.token == "auto" else "fixed",
        "candidates": summarize_candidates(tokens, ids, probe_rows),
        "n": len(probe_rows),
        "num_rollouts": len(completions), "num_truncated": len(completions) - len(probe_rows),
    }
    if sr.loss == "sft":
        summary["incorrect_token"] = sr.incorrect_token
        summary["incorrect_token_id"] = token_id(tokenizer, sr.incorrect_token)
    plot = [{"sample": i, "token": token, "logprob": row[tid]} for i, row in enumerate(probe_rows)
            for token, tid in zip(tokens, ids)]
    return summary, plot


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["sample", "token", "logprob"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def run(params: Params, _args) -> None:
    problems = read_problems(params.paths.train_data)
    with open_generator(params, base_model_dir(params), seed=params.ref_constant.seed) as (tokenizer, generator):
        summary, plot = ref_constant(params, generator, tokenizer, problems)
    atomic_write_text(params.paths.ref_logprobs, _csv(plot))
    atomic_write_json(params.paths.ref_constant, summary)
    steadiest = min(summary["candidates"], key=lambda c: c["std"])
    log.info(f"{len(summary['candidates'])} z_c candidate(s) over n={summary['n']} finished rollouts; steadiest "
             f"{steadiest['token']!r}: log-prob {steadiest['mean']:.3f} ± {steadiest['std']:.3f}")


def main(argv=None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
