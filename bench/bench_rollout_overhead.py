"""Self-reward overhead of rollouts: z_c scored in the generation pass vs no scoring vs the official recipe.

    python bench/bench_rollout_overhead.py [--model smollm2-135m-instruct] [--samples 16] [--tokens 128]

Three ways, side by side in one run, on the same prompts and seeds (so the same sampled tokens):
  plain    : generation only (no z_c score)
  in_pass  : generation that also returns log π(z_c | x, y, EOS) (this project)
  official : generation only, then one separate batched full forward over prompt + response (the official code)
Each is timed ``--repeats`` times in rotating order; the medians give overhead = time / time(plain).
Writes bench/results/rollout_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laser.batch import collate, policy_forward
from laser.generation import HFGenerator, Sampling
from laser.io import atomic_write_json
from laser.models import load_model, load_tokenizer, resolve_model_dir, token_id, z_c_candidates

QUESTIONS = ["What is 17 + 25?", "Tom has 3 apples and buys 9 more. How many apples?", "What is 81 - 39?",
             "Compute 6 * 7.", "A box holds 12 pens. How many pens are in 4 boxes?", "What is 150 + 275?",
             "Sara reads 14 pages a day. How many pages in 3 days?", "What is 99 - 58?"]


def official_scores(model, completions, z_c_id: int, pad_id: int, micro: int) -> list[float]:
    """The official recipe: a separate forward over prompt + response (+ z_c) for every sample (truncated ones
    are masked afterwards, as the official code does)."""
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(completions), micro):
            part = completions[i:i + micro]
            batch = collate([c.prompt_token_ids for c in part], [c.response_token_ids for c in part],
                            [True] * len(part), z_c_id, pad_id)
            scores += policy_forward(model, batch)[1].tolist()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--z-c-token", default=None,
                        help="the z_c token string (default: the first z_c candidate of the tokenizer)")
    parser.add_argument("--out", default="bench/results/rollout_overhead.json")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model, ".cache")
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    z_c_id = token_id(tokenizer, args.z_c_token or z_c_candidates(tokenizer)[0])
    messages = [[{"role": "user", "content": q + " Show your reasoning briefly."}] for q in QUESTIONS]
    prompts = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for m in messages]
    per_prompt = max(1, args.samples // len(prompts))
    generator = HFGenerator(model, tokenizer, batch_size=args.samples)
    sampling = Sampling(temperature=1.0, max_new_tokens=args.tokens, seed=0)

    def plain():
        return generator.generate(prompts, per_prompt, sampling)

    def in_pass():
        return generator.generate(prompts, per_prompt, sampling, probe_token_ids=[z_c_id])

    def official():
        completions = generator.generate(prompts, per_prompt, sampling)
        return official_scores(model, completions, z_c_id, tokenizer.pad_token_id, args.samples)

    ways = {"plain": plain, "in_pass": in_pass, "official": official}
    plain()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.repeats):
        names = list(ways)[r % 3:] + list(ways)[:r % 3]  # rotate the order
        for name in names:
            start = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - start)
    completions = in_pass()
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model, "samples": len(completions), "max_new_tokens": args.tokens,
        "generated_tokens": sum(len(c.response_token_ids) for c in completions),
        "finished": sum(c.finish_reason == "eos" for c in completions), "z_c_token_id": z_c_id,
        "seconds": times, "median_seconds": median,
        "overhead_in_pass": median["in_pass"] / median["plain"],
        "overhead_official": median["official"] / median["plain"],
        "goal_in_pass": 1.02,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("overhead_in_pass", "overhead_official", "median_seconds",
                                             "generated_tokens", "finished")}, indent=1))


if __name__ == "__main__":
    main()
