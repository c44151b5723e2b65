"""Training-step cost of LaSeR vs GRPO-only on the same batches, with DeepSpeed ZeRO-3 (CPU).

    python bench/bench_train_step.py [--model smollm2-135m-instruct] [--steps 4]

Time: one process, one engine; the same fixed rollout batch is trained on alternately with the self-reward
loss on (LaSeR) and off (GRPO-only), so both see the same shapes. The only extra work of LaSeR is the z_c
column in the same forward and the MSE term. Memory: each mode once more in a fresh subprocess, reporting
its peak resident set size (ru_maxrss). Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser import engine as ds  # noqa: E402
from laser.config import Params, build  # noqa: E402
from laser.io import atomic_write_json  # noqa: E402
from laser.models import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from laser.schedule import Phase  # noqa: E402
from laser.score import SelfRewardConfig  # noqa: E402
from laser.trainer import LaserTrainer, Rollout  # noqa: E402


def make_trainer(model_name: str) -> LaserTrainer:
    params = build(Params, {"model": {"name": model_name},
                            "train": {"prompts_per_step": 4, "group_size": 4, "mini_batch_size": 16,
                                      "micro_batch_size": 4, "lr": 1e-6}})
    ds.init_distributed()
    model_dir = resolve_model_dir(model_name, ".cache")
    tokenizer = load_tokenizer(model_dir)
    engine = ds.initialize(load_model(model_dir), params.train, "float32", world_size=1)
    problems = [{"id": str(i), "answer": "1", "prompt": "x"} for i in range(4)]
    config = SelfRewardConfig("z_c", 6, c_ref=-26.6, beta_v=params.self_reward.beta_v)
    return LaserTrainer(params, engine, tokenizer, problems, config)


def fixed_rollout(trainer: LaserTrainer, length: int) -> Rollout:
    """16 responses of ``length`` tokens (EOS-terminated), half rewarded: the same batch for both modes."""
    g = torch.Generator().manual_seed(0)
    vocab = len(trainer.tokenizer)
    prompts = [torch.randint(100, vocab - 100, (64,), generator=g).tolist() for _ in range(16)]
    eos = trainer.tokenizer.eos_token_id
    responses = [[*torch.randint(100, vocab - 100, (length - 1,), generator=g).tolist(), eos] for _ in range(16)]
    rewards = torch.tensor([float(i % 2) for i in range(16)])
    return Rollout(prompts, responses, torch.ones(16, dtype=torch.bool), rewards, torch.zeros(16), {},
                   torch.ones(16, dtype=torch.bool))


def step_seconds(trainer: LaserTrainer, rollout: Rollout, laser_on: bool) -> float:
    sr = replace(trainer.params.self_reward, enabled=laser_on)
    trainer.params = replace(trainer.params, self_reward=sr)
    advantages = torch.linspace(-1, 1, len(rollout.responses))
    start = time.perf_counter()
    trainer.train_on(rollout, advantages, Phase(True, False))
    return time.perf_counter() - start


def memory_child(model_name: str, laser_on: bool, length: int) -> None:
    trainer = make_trainer(model_name)
    rollout = fixed_rollout(trainer, length)
    step_seconds(trainer, rollout, laser_on)
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--memory-child", choices=("laser", "grpo"))
    parser.add_argument("--out", default="bench/results/train_step.json")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.model, args.memory_child == "laser", args.length)
        return
    trainer = make_trainer(args.model)
    rollout = fixed_rollout(trainer, args.length)
    step_seconds(trainer, rollout, True)  # warm-up
    times: dict[str, list[float]] = {"laser": [], "grpo": []}
    for i in range(args.steps):
        for mode in (("laser", "grpo") if i % 2 == 0 else ("grpo", "laser")):
            times[mode].append(step_seconds(trainer, rollout, mode == "laser"))
    memory = {}
    for mode in ("laser", "grpo"):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--length", str(args.length),
                              "--memory-child", mode], capture_output=True, text=True, check=True, env=env)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    median = {mode: statistics.median(values) for mode, values in times.items()}
    result = {"model": args.model, "batch": f"16 x (64 prompt + {args.length} response) tokens, micro-batch 4",
              "zero_stage": trainer.engine.zero_optimization_stage(), "seconds": times, "median_seconds": median,
              "ratio_laser_over_grpo": median["laser"] / median["grpo"], "goal_ratio": 1.03,
              "peak_rss_mb": memory, "torch_threads": torch.get_num_threads()}
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("ratio_laser_over_grpo", "median_seconds", "peak_rss_mb")}, indent=1))


if __name__ == "__main__":
    main()
