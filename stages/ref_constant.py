"""Stage ref_constant: c_ref = mean log π_ref(z_c | x, y, EOS) over reference rollouts on training prompts.

    python -m stages.ref_constant [--params params.yaml]

Reads ``paths.train_data`` and the base model; writes ``paths.ref_constant`` (JSON: the ``laser.json`` keys
self_reward_token, self_reward_token_id, c_ref, beta_v, plus std, min, max, n, the implied score noise β_v·std
and a warning when it exceeds ``ref_constant.noise_warning``) and ``paths.ref_logprobs`` (CSV, DVC plot data).

``self_reward.token: auto`` probes every candidate token (special/added tokens that are not EOS/BOS/PAD and not
in the chat template) in the same generation pass and picks, among those whose c_ref leaves room for a score of 1
(c_ref + 1/β_v ≤ −``ref_constant.headroom_margin``), the one whose log-prob after EOS has the smallest std: the
steadier c_ref, the less noise in r_s at step 0. A named token that leaves no such room is an error.
"""

from __future__ import annotations

import csv
import io
import random
import statistics

from laser.cli import stage_main
from laser.config import Params
from laser.errors import StageError
from laser.io import atomic_write_json, atomic_write_text
from laser.models import reserved_tokens, token_id, z_c_candidates
from laser.rollouts import read_problems, tokenize_prompts
from laser.runtime import base_model_dir, load_generator, sampling
from laser.score import score_headroom


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


def summarize_candidates(tokens: list[str], token_ids: list[int], probe_rows: list[list[float]]) -> list[dict]:
    """Mean/std/min/max of each candidate's log-prob after EOS. probe_rows: (n_finished, n_candidates)."""
    stats = []
    for j, (token, tid) in enumerate(zip(tokens, token_ids)):
        values = [row[j] for row in probe_rows]
        stats.append({"token": token, "token_id": tid, "mean": statistics.fmean(values),
                      "std": statistics.pstdev(values), "min": min(values), "max": max(values)})
    return stats


def choose_z_c(stats: list[dict], beta_v: float, margin: float, auto: bool) -> int:
    """The index of z_c among the candidates: the steadiest (smallest std) of those whose c_ref leaves room for a
    score of 1 (:func:`laser.score.score_headroom` >= ``margin``). A likely token has a small std but a c_ref
    near 0, where no answer could ever score 1. A named token (``auto`` False) must pass the same test."""
    fits = [j for j, s in enumerate(stats) if score_headroom(s["mean"], beta_v) >= margin]
    if not fits:
        worst = stats[0] if not auto else max(stats, key=lambda s: s["mean"])
        which = f"self_reward.token {worst['token']!r}" if not auto else f"none of the {len(stats)} candidates"
        room = -worst["mean"] - margin  # 1/beta_v may be at most this
        fix = (f"raise self_reward.beta_v to at least {1 / room:.3g}, or " if room > 0 else "") + \
            "name a rarer token in self_reward.token"
        raise StageError(
            f"{which}: c_ref = {worst['mean']:.2f} leaves no room for a score of 1 at beta_v = {beta_v} (it needs "
            f"log pi(z_c) = c_ref + 1/beta_v = {worst['mean'] + 1 / beta_v:.2f} <= -{margin}, "
            f"ref_constant.headroom_margin): {fix}")
    return min(fits, key=lambda j: stats[j]["std"])


def ref_constant(params: Params, generator, tokenizer, problems: list[dict]) -> tuple[dict, list[float]]:
    """Sample reference rollouts, probe the candidate tokens after EOS; returns (summary, z_c log-probs)."""
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
    stats = summarize_candidates(tokens, ids, probe_rows)
    best = choose_z_c(stats, sr.beta_v, cfg.headroom_margin, auto=sr.token == "auto")
    z_c = stats[best]
    noise = sr.beta_v * z_c["std"]
    summary = {
        "self_reward_token": z_c["token"], "self_reward_token_id": z_c["token_id"], "c_ref": z_c["mean"],
        "beta_v": sr.beta_v, "std": z_c["std"], "min": z_c["min"], "max": z_c["max"], "n": len(probe_rows),
        "num_rollouts": len(completions), "num_truncated": len(completions) - len(probe_rows),
        "score_noise": noise,
        "warning": (f"beta_v * std = {noise:.3f} exceeds {cfg.noise_warning}: the self-reward score starts noisy"
                    if noise > cfg.noise_warning else None),
        "selection": "auto" if sr.token == "auto" else "fixed",
        "candidates": stats,
    }
    if sr.loss == "sft":
        summary["incorrect_token"] = sr.incorrect_token
        summary["incorrect_token_id"] = token_id(tokenizer, sr.incorrect_token)
    return summary, [row[best] for row in probe_rows]


def _csv(values: list[float]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["sample", "z_c_logprob"])
    writer.writerows(enumerate(values))
    return out.getvalue()


def run(params: Params, _args) -> None:
    problems = read_problems(params.paths.train_data)
    tokenizer, _model, generator = load_generator(params, base_model_dir(params))
    summary, values = ref_constant(params, generator, tokenizer, problems)
    atomic_write_text(params.paths.ref_logprobs, _csv(values))
    atomic_write_json(params.paths.ref_constant, summary)
    print(f"c_ref = {summary['c_ref']:.3f} ± {summary['std']:.3f} for {summary['self_reward_token']!r} "
          f"(id {summary['self_reward_token_id']}, n={summary['n']})")
    if summary["warning"]:
        print(f"warning: {summary['warning']}")


def main(argv=None) -> None:
    stage_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
