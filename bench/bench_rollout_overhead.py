"""Rollout throughput and the cost of scoring z_c: static vs continuous batching, in-pass vs the official recipe.

    python bench/bench_rollout_overhead.py [--problems 16] [--samples 4] [--repeats 2]

At the default params (generation.batch_size, max_new_tokens, temperature) on the pipeline's own prompts (the
default synthetic task rendered with its chat template, instruction and few-shot turns), side by side in one run,
the same seeds (each sample has its own generator, so every way samples the same tokens up to float rounding):

  static_plain       : static batches (a batch is refilled only when empty), every sample prefills its whole
                       prompt: the implementation before; no score
  static_in_pass     : the same, log π(z_c | x, y, EOS) read in the generation pass
  continuous_plain   : continuous batching (finished rows are replaced from the queue), whole prompts, no score
  continuous_in_pass : continuous batching + in-pass z_c
  shared_plain       : continuous batching + shared prefill (the prompts' common prefix once per call, each
                       prompt once for all its samples), no score
  shared_in_pass     : shared prefill + continuous batching + in-pass z_c (what the pipeline runs)
  official           : shared_plain, then one separate full forward over prompt + response (the official code)

Each way is timed ``--repeats`` times in rotating order; medians give samples/s, tokens/s, the speed-up over the
implementation before and the overhead of scoring (time / time of the same batching without it).
Seconds on a shared 2-core VM vary ±15% run to run, more than the cost of scoring, so the work is counted too
(``decode_work``: model calls and positions fed, in-pass vs plain; ``--work-only`` adds it to an existing file).
Writes bench/results/rollout_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser.batch import collate, policy_forward
from laser.config import Params
from laser.data import render_prompt, synthetic_problem
from laser.generation import HFGenerator
from laser.io import atomic_write_json
from laser.models import load_model, load_tokenizer, resolve_model_dir, token_id, z_c_candidates
from laser.runtime import sampling

WAYS = ("static_plain", "static_in_pass", "continuous_plain", "continuous_in_pass", "shared_plain", "shared_in_pass",
        "official")


def official_scores(model, completions, z_c_id: int, pad_id: int, micro: int) -> list[float]:
    """The official recipe: a separate forward over prompt + response (+ z_c) for every sample."""
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(completions), micro):
            part = completions[i:i + micro]
            batch = collate([c.prompt_token_ids for c in part], [c.response_token_ids for c in part],
                            [True] * len(part), z_c_id, pad_id)
            scores += policy_forward(model, batch)[1].tolist()
    return scores


def decode_work(model, generate) -> dict:
    """Model calls and positions (rows × new columns) fed while ``generate()`` runs: prefill and decode alike."""
    calls, positions = [], []

    def count(_module, _args, kwargs):
        calls.append(1)
        positions.append(kwargs["input_ids"].numel())

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        generate()
    finally:
        hook.remove()
    return {"model_calls": len(calls), "positions": sum(positions)}


def work_of(model, run, shared) -> dict:
    work = {name: decode_work(model, lambda probe=probe: run(shared, probe))
            for name, probe in (("shared_plain", False), ("shared_in_pass", True))}
    plain, in_pass = work["shared_plain"], work["shared_in_pass"]
    return {**work, "calls_in_pass_over_plain": in_pass["model_calls"] / plain["model_calls"],
            "positions_in_pass_over_plain": in_pass["positions"] / plain["positions"]}


def prompts_of(params: Params, tokenizer, n: int) -> list[list[int]]:
    rng = random.Random(1)
    out = []
    for _ in range(n):
        text, _answer, _key = synthetic_problem(rng, params.prepare.train)
        prompt = render_prompt(text, params.prepare.instruction, params.prepare.few_shot, tokenizer,
                               params.prepare.prompt_format)[1]
        out.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/rollout_overhead.json")
    parser.add_argument("--work-only", action="store_true", help="only (re)count decode_work into --out")
    args = parser.parse_args()

    params = Params()
    model_dir = resolve_model_dir(params.model.name, ".cache")
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    z_c_id = token_id(tokenizer, z_c_candidates(tokenizer)[0])
    prompts = prompts_of(params, tokenizer, args.problems)
    batch = params.generation.batch_size
    static = HFGenerator(model, tokenizer, batch_size=batch, continuous=False, share_prefill=False)
    continuous = HFGenerator(model, tokenizer, batch_size=batch, share_prefill=False)
    shared = HFGenerator(model, tokenizer, batch_size=batch)
    plan = sampling(params, seed=0)

    def run(generator, probe):
        return generator.generate(prompts, args.samples, plan, probe_token_ids=[z_c_id] if probe else [])

    ways = {
        "static_plain": lambda: run(static, False),
        "static_in_pass": lambda: run(static, True),
        "continuous_plain": lambda: run(continuous, False),
        "continuous_in_pass": lambda: run(continuous, True),
        "shared_plain": lambda: run(shared, False),
        "shared_in_pass": lambda: run(shared, True),
        "official": lambda: official_scores(model, run(shared, False), z_c_id, tokenizer.pad_token_id, batch),
    }
    assert tuple(ways) == WAYS
    if args.work_only:
        result = json.loads(Path(args.out).read_text())
        result["decode_work"] = work_of(model, run, shared)
        atomic_write_json(args.out, result)
        print(json.dumps(result["decode_work"], indent=1))
        return
    run(shared, False)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats):
        names = list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]  # rotate the order
        for name in names:
            start = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - start)
    static_out, continuous_out, shared_out = run(static, True), run(continuous, True), run(shared, True)
    tokens = sum(len(c.response_token_ids) for c in shared_out)

    def same_as_static(out):
        return f"{sum(a.response_token_ids == b.response_token_ids for a, b in zip(static_out, out))}/{len(out)}"

    gaps = [abs(a.probe_logprobs[z_c_id] - b.probe_logprobs[z_c_id]) for a, b in zip(static_out, shared_out)
            if a.probe_logprobs and b.probe_logprobs]
    median = {name: statistics.median(values) for name, values in times.items()}
    samples = len(shared_out)
    result = {
        "model": params.model.name, "samples": samples, "batch_size": batch,
        "max_new_tokens": params.generation.max_new_tokens, "generated_tokens": tokens,
        "prompt_tokens": sum(len(c.prompt_token_ids) for c in shared_out),
        "finished": sum(c.finish_reason == "eos" for c in shared_out),
        "same_tokens_static_vs_continuous": same_as_static(continuous_out),
        "same_tokens_static_vs_shared": same_as_static(shared_out),
        "max_z_c_logprob_gap_static_vs_shared": max(gaps) if gaps else None,
        "seconds": times, "median_seconds": median,
        "samples_per_s": {name: samples / t for name, t in median.items()},
        "tokens_per_s": {name: tokens / t for name, t in median.items()},
        "speedup_over_static": median["static_in_pass"] / median["shared_in_pass"],
        "speedup_continuous_over_static": median["static_in_pass"] / median["continuous_in_pass"],
        "speedup_shared_over_continuous": median["continuous_in_pass"] / median["shared_in_pass"],
        "overhead_in_pass": median["shared_in_pass"] / median["shared_plain"],
        "overhead_in_pass_continuous": median["continuous_in_pass"] / median["continuous_plain"],
        "overhead_in_pass_static": median["static_in_pass"] / median["static_plain"],
        "overhead_official": median["official"] / median["shared_plain"],
        "decode_work": work_of(model, run, shared),
        "goals": {"speedup_over_static": 1.5, "overhead_in_pass": 1.02},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("speedup_over_static", "speedup_continuous_over_static",
                                             "overhead_in_pass", "overhead_official", "samples_per_s",
                                             "same_tokens_static_vs_shared", "max_z_c_logprob_gap_static_vs_shared")},
                     indent=1))


if __name__ == "__main__":
    main()
