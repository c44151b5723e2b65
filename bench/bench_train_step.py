"""Training-step cost, side by side on one batch: LaSeR and GRPO-only on DeepSpeed ZeRO-3, and a bare PyTorch floor.

    python bench/bench_train_step.py [--model smollm2-135m-instruct] [--steps 3] [--modes laser_fp32,...]
                                     [--prompt-tokens 64] [--length 128]

Every mode trains on the same fixed rollout batch (16 × (64 prompt + 128 response) tokens, micro-batch 8, one
optimizer step) through the trainer's own ``train_on`` (the same loss maths). Its 16 prompts are distinct, so
every row runs whole; the ``_groups`` modes give each group of 4 rows one prompt, as GRPO rollouts have:

  laser_fp32_full_head : ZeRO-3, fp32, the LM head on every position (the implementation before the lean head)
  laser_fp32 / grpo_fp32 : ZeRO-3, fp32, the head on response positions + the slot only (self-reward loss on/off)
  laser_bf16 / grpo_bf16 : ZeRO-3, bf16 autocast (fp32 weights and AdamW state)
  laser_bf16_gc / laser_fp32_gc : ZeRO-3, gradient checkpointing (train.gradient_checkpointing)
  bare_fp32 / bare_bf16  : no DeepSpeed: the same PolicyModel, loss and clipping, plain torch.optim.AdamW (floor)
  bare_fp32_fused        : the floor with torch's fused AdamW, the ZeRO-3 modes' optimizer (like for like)
  laser_fp32_loop_adamw  : laser_fp32 with torch's CPU default AdamW (a single-tensor loop, a pass per op)
  laser_fp32_zero3_linear : laser_fp32 with zero_optimization.memory_efficient_linear on (DeepSpeed's autograd
                         Function for F.linear; laser.engine turns it off in a world of one, where nothing is
                         partitioned)
  laser_fp32_groups      : ZeRO-3, fp32, groups of 4 rows share a prompt: it runs once per group (what the
                         trainer does; laser.batch.PolicyModel._hidden_states)
  laser_fp32_groups_whole : the same batch with every row run whole (the forward before)
  bare_fp32_fused_groups : the fused-AdamW floor on the grouped batch (it shares the prompt too)

Each mode runs in a fresh process (one warm-up step, then ``--steps`` timed), which also gives its peak resident
set size (ru_maxrss) and the resident set after engine start-up (weights, optimizer state: what no step frees).
The FLOP floor is 6 · parameters · tokens (forward + backward). The peer (TRL's GRPOTrainer, a full step with
generation) is bench/bench_peer.py. Writes bench/results/train_step.json (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser import engine as ds  # noqa: E402
from laser.batch import PolicyModel  # noqa: E402
from laser.config import Params, build  # noqa: E402
from laser.io import atomic_write_json  # noqa: E402
from laser.models import load_model, load_tokenizer, resolve_model_dir  # noqa: E402
from laser.schedule import Phase  # noqa: E402
from laser.score import SelfRewardConfig  # noqa: E402
from laser.trainer import LaserTrainer, Rollout  # noqa: E402

MODES = ("laser_fp32_full_head", "laser_fp32", "laser_fp32_loop_adamw", "laser_fp32_zero3_linear", "grpo_fp32",
         "bare_fp32", "bare_fp32_fused", "laser_bf16", "grpo_bf16", "bare_bf16", "laser_bf16_gc", "laser_fp32_gc",
         "laser_fp32_groups", "laser_fp32_groups_whole", "bare_fp32_fused_groups")
ROWS, GROUP, MICRO = 16, 4, 8  # micro-batch 8: the main job's train.micro_batch_size


class BareEngine:
    """What LaserTrainer needs of a DeepSpeed engine, in plain PyTorch: AdamW, global-norm clipping, no ZeRO."""

    def __init__(self, module: torch.nn.Module, lr: float, grad_clip: float | None, accumulation: int,
                 fused: bool = False):
        self.module, self.grad_clip, self.accumulation = module, grad_clip, accumulation
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0, fused=fused)
        self.device = torch.device("cpu")
        self._norm = 0.0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def parameters(self):
        return self.module.parameters()

    def zero_optimization_stage(self) -> int:
        return 0

    def backward(self, loss, scale_wrt_gas=False):
        loss.backward()

    def step(self):  # micro-batches accumulate; the trainer calls step() once per micro-batch, as with DeepSpeed
        self._micro = getattr(self, "_micro", 0) + 1
        if self._micro % self.accumulation == 0:
            self._norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip or 1e9))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self._norm

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]


def patch_engine_build(mode: str) -> None:
    """The before/after variants of the ZeRO-3 engine, patched into ``laser.engine`` in this child process (it
    builds one engine): torch's loop AdamW instead of the fused one, or DeepSpeed's memory-efficient linear."""
    if mode.endswith("_loop_adamw"):
        fused_optimizer = ds.build_optimizer

        def loop_optimizer(module, train):
            optimizer = fused_optimizer(module, train)
            optimizer.param_groups[0]["fused"] = False  # before any state exists: torch's single-tensor path
            return optimizer

        ds.build_optimizer = loop_optimizer
    if mode.endswith("_zero3_linear"):
        zero3_config = ds.deepspeed_config

        def zero3_linear_config(*args):
            config = zero3_config(*args)
            config["zero_optimization"]["memory_efficient_linear"] = True
            return config

        ds.deepspeed_config = zero3_linear_config


def make_trainer(model_name: str, mode: str) -> LaserTrainer:
    bf16, gc = "bf16" in mode, mode.endswith("_gc")
    params = build(Params, {"model": {"name": model_name},
                            "train": {"prompts_per_step": 4, "group_size": 4, "mini_batch_size": 16,
                                      "micro_batch_size": MICRO, "lr": 1e-6,
                                      "compute_dtype": "bfloat16" if bf16 else "float32",
                                      "gradient_checkpointing": gc},
                            "self_reward": {"enabled": not mode.startswith("grpo")}})
    model_dir = resolve_model_dir(model_name, ".cache")
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    if mode.startswith("bare"):
        engine = BareEngine(PolicyModel(model, params.train.logits_chunk, params.train.compute_dtype), 1e-6, 1.0,
                            accumulation=params.train.mini_batch_size // params.train.micro_batch_size,
                            fused="_fused" in mode)
    else:
        ds.init_distributed()
        patch_engine_build(mode)
        engine = ds.initialize(model, params.train, "float32", world_size=1)
        if mode.endswith("full_head"):
            engine.module.lean = False
    problems = [{"id": str(i), "answer": "1", "prompt": "x"} for i in range(4)]
    config = SelfRewardConfig("z_c", 6, c_ref=-26.6, beta_v=params.self_reward.beta_v)
    trainer = LaserTrainer(params, engine, tokenizer, problems, config)
    if mode.endswith("_whole"):
        batch_of = trainer.policy_batch
        trainer.policy_batch = lambda rollout: dataclasses.replace(batch_of(rollout), prompt_length=None)
    return trainer


def fixed_rollout(trainer: LaserTrainer, length: int, prompt_tokens: int, grouped: bool) -> Rollout:
    """16 responses of ``length`` tokens (EOS-terminated), half rewarded: the same batch for every mode (of one
    kind: 16 distinct prompts, or ``grouped``: one per 4 rows)."""
    g = torch.Generator().manual_seed(0)
    vocab = len(trainer.tokenizer)
    prompts = [torch.randint(100, vocab - 100, (prompt_tokens,), generator=g).tolist() for _ in range(ROWS)]
    if grouped:
        prompts = [prompts[row // GROUP] for row in range(ROWS)]
    eos = trainer.tokenizer.eos_token_id
    responses = [[*torch.randint(100, vocab - 100, (length - 1,), generator=g).tolist(), eos] for _ in range(ROWS)]
    rewards = torch.tensor([float(i % 2) for i in range(ROWS)])
    return Rollout(prompts, responses, torch.ones(ROWS, dtype=torch.bool), rewards, torch.zeros(ROWS), {},
                   torch.ones(ROWS, dtype=torch.bool))


def step_seconds(trainer: LaserTrainer, rollout: Rollout) -> tuple[float, dict]:
    advantages = torch.linspace(-1, 1, len(rollout.responses))
    start = time.perf_counter()
    metrics = trainer.train_on(rollout, advantages, Phase(True, False))
    return time.perf_counter() - start, metrics


@torch.no_grad()
def precision_gap(model_name: str, length: int, prompt_tokens: int) -> dict:
    """How far bf16 autocast moves the training forward's numbers from fp32 on the bench batch: token log-probs
    (response positions) and log π(z_c | x, y, EOS), and what that is in self-reward score units (× β_v)."""
    from laser.batch import policy_forward

    trainer = make_trainer(model_name, "bare_fp32")
    batch = trainer.policy_batch(fixed_rollout(trainer, length, prompt_tokens, grouped=False))
    model = trainer.engine.module
    out = {}
    for dtype in ("float32", "bfloat16"):
        model.compute_dtype = dtype
        out[dtype] = policy_forward(model, batch)
    mask = batch.response_mask
    token_gap = (out["float32"][0] - out["bfloat16"][0])[mask].abs()
    z_c_gap = (out["float32"][1] - out["bfloat16"][1])[batch.has_slot].abs()
    beta_v = trainer.params.self_reward.beta_v
    return {"token_logprob_abs_diff_mean": float(token_gap.mean()),
            "token_logprob_abs_diff_max": float(token_gap.max()),
            "z_c_logprob_abs_diff_mean": float(z_c_gap.mean()), "z_c_logprob_abs_diff_max": float(z_c_gap.max()),
            "score_abs_diff_max": beta_v * float(z_c_gap.max()), "beta_v": beta_v}


def resident_mb() -> float:
    """The resident set now (VmRSS), MB; ru_maxrss is only the peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def time_engine_calls(engine, spent: dict) -> None:
    """Add the seconds spent in ``engine.backward`` and ``engine.step`` to ``spent``. ``step`` is the optimizer
    step at the last micro-batch of an accumulation (ZeRO-3: with the gradient norm, clipping and the copy back
    into the parameters); the rest of a train step is mostly the forward and the losses."""
    def timed(name: str):
        call = getattr(engine, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            return out
        return wrapper

    for name in ("backward", "step"):
        setattr(engine, name, timed(name))


def child(model_name: str, mode: str, length: int, prompt_tokens: int, steps: int) -> dict:
    trainer = make_trainer(model_name, mode)
    after_init = resident_mb()
    rollout = fixed_rollout(trainer, length, prompt_tokens, grouped="_groups" in mode)
    _, first = step_seconds(trainer, rollout)  # warm-up (and the loss at the same weights for every mode)
    seconds, phases, spent = [], [], {}
    time_engine_calls(trainer.engine, spent)
    for _ in range(steps):
        spent.clear()
        seconds.append(step_seconds(trainer, rollout)[0])
        phases.append({"rest": seconds[-1] - sum(spent.values()), **spent})
    median_step = phases[seconds.index(statistics.median(seconds))] if steps % 2 else None
    return {"seconds": seconds, "median_seconds": statistics.median(seconds), "median_step_phases": median_step,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_init_mb": after_init, "rss_after_steps_mb": resident_mb(),
            "first_step_pg_loss": first["pg_loss"], "first_step_self_reward_mse": first.get("self_reward_mse")}


def run_child(args, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--length", str(args.length),
                          "--prompt-tokens", str(args.prompt_tokens), "--steps", str(args.steps), "--child", mode],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=128, help="response tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--out", default="bench/results/train_step.json")
    parser.add_argument("--precision-gap-only", action="store_true",
                        help="only (re)measure bf16_vs_fp32_forward into the existing --out file")
    args = parser.parse_args()
    if args.precision_gap_only:
        result = json.loads(Path(args.out).read_text())
        result["bf16_vs_fp32_forward"] = precision_gap(args.model, args.length, args.prompt_tokens)
        atomic_write_json(args.out, result)
        print(json.dumps(result["bf16_vs_fp32_forward"], indent=1))
        return
    if args.child:
        print(json.dumps(child(args.model, args.child, args.length, args.prompt_tokens, args.steps)))
        return
    modes = {}
    for mode in args.modes.split(","):
        modes[mode] = run_child(args, mode)
        print(mode, json.dumps({k: modes[mode][k] for k in ("median_seconds", "peak_rss_mb")}), flush=True)
    tokens = ROWS * (args.prompt_tokens + args.length)
    n_params = sum(p.numel() for p in load_model(resolve_model_dir(args.model, ".cache")).parameters())
    for result in modes.values():
        result["tokens_per_s"] = tokens / result["median_seconds"]
    median = {mode: r["median_seconds"] for mode, r in modes.items()}

    def ratio(a: str, b: str) -> float | None:
        return median[a] / median[b] if a in median and b in median else None

    result = {
        "model": args.model, "parameters": n_params,
        "batch": f"{ROWS} x ({args.prompt_tokens} prompt + {args.length} response) tokens, micro-batch {MICRO}"
                 + (f"; _groups modes: one prompt per {GROUP} rows" if any("_groups" in m for m in modes) else ""),
        "tokens": tokens, "flop_floor_tflop": 6 * n_params * tokens / 1e12, "modes": modes,
        # only beside bf16 modes: on a CPU without bf16 kernels (AVX2) a bf16 forward takes minutes
        "bf16_vs_fp32_forward": (precision_gap(args.model, args.length, args.prompt_tokens)
                                 if any("bf16" in m for m in modes) else None),
        "ratios": {
            "laser_over_grpo_fp32": ratio("laser_fp32", "grpo_fp32"),
            "laser_over_grpo_bf16": ratio("laser_bf16", "grpo_bf16"),
            "zero3_over_bare_fp32": ratio("laser_fp32", "bare_fp32"),
            "zero3_over_bare_fused_fp32": ratio("laser_fp32", "bare_fp32_fused"),
            "zero3_over_bare_bf16": ratio("laser_bf16", "bare_bf16"),
            "lean_head_over_full_head_fp32": ratio("laser_fp32", "laser_fp32_full_head"),
            "fused_adamw_over_loop_fp32": ratio("laser_fp32", "laser_fp32_loop_adamw"),
            "native_linear_over_zero3_linear_fp32": ratio("laser_fp32", "laser_fp32_zero3_linear"),
            "bf16_over_fp32_before": ratio("laser_bf16", "laser_fp32_full_head"),
            "gradient_checkpointing_over_bf16": ratio("laser_bf16_gc", "laser_bf16"),
            "shared_prompt_over_whole_rows_fp32": ratio("laser_fp32_groups", "laser_fp32_groups_whole"),
            "zero3_over_bare_fused_groups_fp32": ratio("laser_fp32_groups", "bare_fp32_fused_groups"),
        },
        "goals": {"laser_over_grpo": 1.03, "zero3_over_bare": 1.15, "bf16_over_fp32_before": 0.45,
                  "peak_rss_mb_with_gradient_checkpointing": 2500},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
