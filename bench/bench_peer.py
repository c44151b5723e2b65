"""A full training step (generation + update) against the peer users would pick instead: TRL's GRPOTrainer.

    pip install -e .[bench]        # trl, bench-only
    python bench/bench_peer.py [--steps 3] [--sides ours_fp32,ours_bf16,ours_vllm_bf16,ours_vllm_fp32,trl_fp32,trl_bf16]

Same workload on both sides: SmolLM2-135M-Instruct, 4 prompts × 4 completions per step, at most 48 new tokens,
temperature 1, lr 1e-5, no KL term, CPU, the pipeline's own prompts (chat template, instruction, few-shot turns)
on the default synthetic task. TRL: ``GRPOTrainer`` (plain PyTorch, HF ``generate``, no DeepSpeed), reward =
the last ``\\boxed{}`` equal to the gold answer; step time from a callback around each optimizer step. Ours: the
train stage's ``run_step`` (ZeRO-3 engine, continuous-batching HF rollouts with z_c scored in-pass, math-verify
pool, the LaSeR loss) at fp32 and bf16 compute, and with vLLM rollouts (``ours_vllm_bf16``: the colocated
engine, weights pushed every step; its start-up is outside the timed steps, as in the train stage;
``ours_vllm_fp32`` the same in fp32, for CPUs without bf16 kernels, where a bf16 step takes minutes). Each side and
precision runs in its own process, one warm-up step, then ``--steps`` timed. Writes bench/results/peer_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser.config import Params, build  # noqa: E402
from laser.io import atomic_write_json  # noqa: E402

PROMPTS, GROUP, MAX_NEW, LR = 4, 4, 48, 1e-5
SIDES = ("ours_fp32", "ours_bf16", "ours_vllm_bf16", "ours_vllm_fp32", "trl_fp32", "trl_bf16")


def workload(params: Params, tokenizer, steps: int) -> list[dict]:
    """PROMPTS × (steps + 1) problems of the default synthetic train task, rendered as the pipeline renders them."""
    from laser.data import render_prompt, synthetic_problem

    rng = random.Random(0)
    problems = []
    for i in range(PROMPTS * (steps + 1)):
        text, answer, _key = synthetic_problem(rng, params.prepare.train)
        messages, prompt = render_prompt(text, params.prepare.instruction, params.prepare.few_shot, tokenizer,
                                         params.prepare.prompt_format)
        problems.append({"id": str(i), "problem": text, "answer": answer, "prompt": prompt, "messages": messages})
    return problems


def ours(bf16: bool, steps: int, backend: str = "hf") -> list[float]:
    from laser import engine as ds
    from laser.models import load_model, load_tokenizer, resolve_model_dir, token_id, z_c_candidates
    from laser.policy_generation import open_policy_generator
    from laser.score import SelfRewardConfig
    from laser.trainer import LaserTrainer, run_step

    params = build(Params, {"train": {"steps": steps + 1, "prompts_per_step": PROMPTS, "group_size": GROUP,
                                      "mini_batch_size": PROMPTS * GROUP, "lr": LR, "kl_coef": 0.0,
                                      "compute_dtype": "bfloat16" if bf16 else "float32"},
                            "generation": {"max_new_tokens": MAX_NEW, "backend": backend}})
    model_dir = resolve_model_dir(params.model.name, ".cache")
    tokenizer = load_tokenizer(model_dir)
    ds.init_distributed()
    engine = ds.initialize(load_model(model_dir), params.train, "float32", world_size=1)
    z_c = z_c_candidates(tokenizer)[0]  # an unused special token (which one does not change the cost)
    config = SelfRewardConfig(z_c, token_id(tokenizer, z_c), c_ref=-26.6, beta_v=0.1)
    seconds = []
    # the vLLM engine starts before the first step (the train stage starts it once): not part of a step
    with open_policy_generator(params, engine, tokenizer, model_dir) as generator:
        trainer = LaserTrainer(params, engine, tokenizer, workload(params, tokenizer, steps), config,
                               generator=generator)
        for step in range(1, steps + 2):
            start = time.perf_counter()
            run_step(trainer, step)
            seconds.append(time.perf_counter() - start)
    return seconds[1:]


def trl(bf16: bool, steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from laser.boxes import last_boxed
    from laser.models import load_model, load_tokenizer, resolve_model_dir

    params = Params()
    model_dir = resolve_model_dir(params.model.name, ".cache")
    tokenizer = load_tokenizer(model_dir)
    problems = workload(params, tokenizer, steps)
    dataset = Dataset.from_list([{"prompt": p["messages"], "answer": p["answer"]} for p in problems])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float((last_boxed(t) or "").strip() == str(a)) for t, a in zip(texts, answer)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, *_args, **_kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    config = GRPOConfig(
        output_dir=str(ROOT / ".cache" / "bench-trl"), per_device_train_batch_size=PROMPTS * GROUP,
        num_generations=GROUP, max_completion_length=MAX_NEW, learning_rate=LR, beta=0.0, max_steps=steps + 1,
        temperature=1.0, use_cpu=True, bf16=bf16, report_to=[], logging_steps=1, save_strategy="no",
        shuffle_dataset=False, seed=0)
    trainer = GRPOTrainer(model=load_model(model_dir), reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return timer.seconds[1:]


def child(side: str, steps: int) -> dict:
    bf16 = side.endswith("bf16")
    seconds = (ours(bf16, steps, "vllm" if "vllm" in side else "hf") if side.startswith("ours")
               else trl(bf16, steps))
    return {"seconds": seconds, "median_seconds": statistics.median(seconds),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--out", default="bench/results/peer_step.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    sides = {}
    for side in args.sides.split(","):
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", side],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        sides[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(side, json.dumps({k: sides[side][k] for k in ("median_seconds", "peak_rss_mb")}), flush=True)
    median = {side: r["median_seconds"] for side, r in sides.items()}

    def ratio(a, b):
        return median[a] / median[b] if a in median and b in median else None

    import torch

    result = {"workload": f"SmolLM2-135M-Instruct, {PROMPTS} prompts x {GROUP} completions, <= {MAX_NEW} new "
                          f"tokens, lr {LR}, no KL, CPU", "sides": sides,
              "ratios": {"ours_bf16_over_trl_fp32": ratio("ours_bf16", "trl_fp32"),
                         "ours_bf16_over_trl_bf16": ratio("ours_bf16", "trl_bf16"),
                         "ours_fp32_over_trl_fp32": ratio("ours_fp32", "trl_fp32"),
                         "ours_vllm_bf16_over_trl_bf16": ratio("ours_vllm_bf16", "trl_bf16"),
                         "ours_vllm_bf16_over_trl_fp32": ratio("ours_vllm_bf16", "trl_fp32"),
                         "ours_vllm_fp32_over_trl_fp32": ratio("ours_vllm_fp32", "trl_fp32")},
              "goal_ours_over_trl_hf_backend": 0.6, "goal_ours_over_trl_vllm_backend": 0.3,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(args.out, result)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
