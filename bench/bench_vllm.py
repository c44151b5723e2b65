"""HF backend vs vLLM backend, side by side in one run: rollout throughput, the cost of z_c, the train step's
generation time (weights pushed into the engine every step) and the z_c equality with the HF full forward.

    python bench/bench_vllm.py [--problems 32] [--samples 4] [--max-new-tokens 64] [--repeats 2]

On the pipeline's own prompts (the default synthetic task, chat template, instruction and few-shot turns) with
the default model (SmolLM2-135M-Instruct), fp32, 2 threads for the HF loop (torch's default here):

  hf_plain / hf_z_c        : laser.generation.HFGenerator (continuous batching), without / with z_c in-pass
  vllm_plain / vllm_z_c    : laser.vllm_backend.VLLMGenerator, without / with the forced z_c step
  train_gen_hf / _vllm     : one train step's rollouts (train.prompts_per_step x group_size at the default
                             params) from a ZeRO-3 engine: gathered in-process HF vs weights pushed to vLLM
                             (write + reload + re-tie + prefix-cache reset, reported apart as weight_sync_s)

Each rollout way is timed ``--repeats`` times in rotating order after one untimed warm-up; medians give
samples/s and tokens/s. Goals (issue 14): vLLM tokens/s >= 4x HF's, vLLM's z_c overhead <= 1.05x; z_c within
1e-4 of the HF full forward. Writes bench/results/vllm.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_rollout_overhead import prompts_of
from laser.config import Params, build
from laser.generation import HFGenerator, Sampling, full_forward_probe_logprobs
from laser.io import atomic_write_json
from laser.models import load_model, load_tokenizer, resolve_model_dir, token_id, z_c_candidates
from laser.policy_generation import open_policy_generator
from laser.runtime import stop_ids_for_dir
from laser.vllm_backend import VLLMGenerator

RESULTS = Path("bench/results/vllm.json")


def timed(generator, prompts, samples: int, sampling: Sampling, probes) -> tuple[float, list]:
    start = time.perf_counter()
    completions = generator.generate(prompts, samples, sampling, probe_token_ids=probes)
    return time.perf_counter() - start, completions


def rollout_ways(params: Params, model_dir: Path, tokenizer, prompts, args) -> tuple[dict, dict]:
    z_c = [z_c_token(tokenizer)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)
    model = load_model(model_dir, "float32").eval()
    hf = HFGenerator(model, tokenizer, batch_size=params.generation.batch_size)
    settings = params.generation.vllm
    vllm = VLLMGenerator(model_dir, tokenizer, settings, stop_ids_for_dir(model_dir, tokenizer, False))
    ways = {"hf_plain": (hf, ()), "hf_z_c": (hf, z_c), "vllm_plain": (vllm, ()), "vllm_z_c": (vllm, z_c)}
    timed(vllm, prompts[:4], 1, sampling, z_c)  # warm-up: the engine's first batch pays one-off costs
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    outputs: dict[str, list] = {}
    for repeat in range(args.repeats):
        order = list(ways)[repeat % len(ways):] + list(ways)[:repeat % len(ways)]
        for way in order:
            generator, probes = ways[way]
            elapsed, outputs[way] = timed(generator, prompts, args.samples, sampling, probes)
            seconds[way].append(elapsed)
            print(way, f"{elapsed:.2f} s", flush=True)
    result = {}
    for way, completions in outputs.items():
        tokens = sum(len(c.response_token_ids) for c in completions)
        median = statistics.median(seconds[way])
        result[way] = {"seconds": seconds[way], "median_s": median, "samples": len(completions), "tokens": tokens,
                       "samples_per_s": len(completions) / median, "tokens_per_s": tokens / median,
                       "finished": sum(c.finish_reason == "eos" for c in completions)}
    finished = [c for c in outputs["vllm_z_c"] if c.finish_reason == "eos"]
    diffs = [abs(c.probe_logprobs[z_c[0]] - full_forward_probe_logprobs(model, c.prompt_token_ids,
                                                                        c.response_token_ids, z_c)[0])
             for c in finished]
    equality = {"samples": len(diffs), "max_abs_diff": max(diffs, default=None),
                "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None}
    vllm.close()
    return result, equality


def z_c_token(tokenizer) -> int:
    """An unused special token of the model (the first z_c candidate the ref_constant stage would consider)."""
    return token_id(tokenizer, z_c_candidates(tokenizer)[0])


def train_generation(params: Params, model_dir: Path, tokenizer, prompts, repeats: int) -> dict:
    """One train step's rollouts, at the current weights of a ZeRO-3 engine, for each backend."""
    from laser import engine as ds

    ds.init_distributed()
    t = params.train
    sampling = Sampling(max_new_tokens=params.generation.max_new_tokens, seed=0)
    step_prompts = prompts[:t.prompts_per_step]
    z_c = [z_c_token(tokenizer)]
    out = {}
    for backend in ("hf", "vllm"):
        engine = ds.initialize(load_model(model_dir, "float32"), t, "float32", world_size=1)
        backend_params = build(Params, {"generation": {"backend": backend}})
        with open_policy_generator(backend_params, engine, tokenizer, model_dir) as policy:
            policy.generate(step_prompts[:1], 1, sampling, z_c)  # warm-up (and the engine start)
            seconds, syncs, tokens = [], [], 0
            for _ in range(repeats):
                elapsed, completions = timed(policy, step_prompts, t.group_size, sampling, z_c)
                seconds.append(elapsed)
                syncs.append(policy.last_sync_seconds)
                tokens = sum(len(c.response_token_ids) for c in completions)
        engine.destroy()
        out[f"train_gen_{backend}"] = {"seconds": seconds, "median_s": statistics.median(seconds),
                                       "weight_sync_s": statistics.median(syncs), "tokens_last": tokens,
                                       "samples": t.prompts_per_step * t.group_size}
        print(backend, out[f"train_gen_{backend}"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = Params()
    model_dir = resolve_model_dir(params.model.name, ".cache")
    tokenizer = load_tokenizer(model_dir)
    prompts = prompts_of(params, tokenizer, args.problems)
    ways, equality = rollout_ways(params, model_dir, tokenizer, prompts, args)
    train = train_generation(params, model_dir, tokenizer, prompts, args.repeats)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "model": params.model.name, "dtype": "float32",
        "workload": {"problems": args.problems, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                     "repeats": args.repeats},
        "rollouts": ways, "z_c_equality_vs_hf_full_forward": equality, "train_step_generation": train,
        "ratios": {
            "vllm_vs_hf_tokens_per_s": ways["vllm_z_c"]["tokens_per_s"] / ways["hf_z_c"]["tokens_per_s"],
            "vllm_z_c_overhead": ways["vllm_z_c"]["median_s"] / ways["vllm_plain"]["median_s"],
            "hf_z_c_overhead": ways["hf_z_c"]["median_s"] / ways["hf_plain"]["median_s"],
            "train_gen_vllm_vs_hf": train["train_gen_vllm"]["median_s"] / train["train_gen_hf"]["median_s"],
        },
        "goals": {"vllm_vs_hf_tokens_per_s": ">= 4", "vllm_z_c_overhead": "<= 1.05",
                  "z_c_max_abs_diff": "<= 1e-4"},
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(RESULTS, result)
    print(result["ratios"], equality)


if __name__ == "__main__":
    main()
