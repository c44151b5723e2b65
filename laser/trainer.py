"""The on-policy LaSeR trainer over a DeepSpeed engine (ZeRO-3 by default).

Per step s (1-based):
  1. B prompts (a seeded permutation of the train set; the step number fixes which, so a resumed run sees the
     same data), K rollouts each from the current policy with parameters gathered (laser.engine). The rollout
     pass also returns log π_old(z_c | x, y, EOS) (laser.generation), from a sequence that really ends in EOS.
  2. Verifier rewards r_v; GRPO advantages A_v; after w_r + w_sr steps A_v is integrated with A_s from the
     rollout-time scores r_s = β_v(log π_old(z_c|…) − c_ref) (the official code reads them from a pass
     without z_c — not copied). A sample the verifier could not judge (timeout/error) is no verdict: it gets
     advantage 0, stays out of its group's statistics and of the self-reward loss (counted as
     verify_timeouts/verify_errors and unjudged_frac in the step log), rather than being scored 0.
  3. Per mini-batch: one forward over [prompt | response | z_c] per micro-batch yields the response log-probs
     and log π_θ(z_c|…) together; loss = GRPO + α·L_SR (after w_r steps; α·L_SR never in the GRPO-only mode).
     Normalisers (tokens, N_c, N_i) are global over the mini-batch and all ranks, so accumulation and data
     parallelism give the unsharded gradient.
  4. Log one JSON line; checkpoint every N steps (DeepSpeed state + step), resume from the latest.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from laser.advantages import grpo_advantages, integrate_advantages, self_reward_advantages
from laser.batch import PolicyBatch, collate, policy_forward
from laser.completions import completion_samples
from laser.config import Params
from laser.losses import grpo_policy_loss, self_reward_mse_loss, self_reward_sft_loss
from laser.metrics import auroc, self_verification
from laser.policy_generation import InProcessPolicyGenerator
from laser.runtime import make_generator, sampling, tokenize_prompts, verify_completions
from laser.schedule import Phase, warmup_phase
from laser.score import SelfRewardConfig
from laser.verify import UNJUDGED, summarize

STEP_NORMALISED = ("self_reward_mse", "self_reward_sft")  # losses divided by the step's class counts


@dataclass
class Rollout:
    """One step's samples on this rank, group-contiguous (rows g*K .. g*K+K-1 share a prompt)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    finished: torch.Tensor  # (N,) bool
    rewards: torch.Tensor  # (N,) float
    old_scores: torch.Tensor  # (N,) r_s under π_old (0 where truncated)
    verdict_counts: dict
    judged: torch.Tensor  # (N,) bool: the verifier gave a verdict (False: it timed out or failed on that sample)


def prompt_indices(step: int, prompts_per_step: int, num_problems: int, seed: int) -> list[int]:
    """The problems of step ``step`` (1-based): consecutive slices of seeded per-epoch permutations."""
    start = (step - 1) * prompts_per_step
    indices = []
    for position in range(start, start + prompts_per_step):
        epoch, offset = divmod(position, num_problems)
        order = list(range(num_problems))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        indices.append(order[offset])
    return indices


class LaserTrainer:
    def __init__(self, params: Params, engine, tokenizer, problems: list[dict], config: SelfRewardConfig,
                 rank: int = 0, world_size: int = 1, ref_model=None, generator=None):
        """``generator``: the policy's rollouts (laser.policy_generation.open_policy_generator); default the HF
        loop in-process over ``engine``."""
        self.params, self.engine, self.tokenizer, self.problems = params, engine, tokenizer, problems
        self.config, self.rank, self.world_size, self.ref_model = config, rank, world_size, ref_model
        self.generator = generator or InProcessPolicyGenerator(engine, lambda m: make_generator(params, m, tokenizer))
        self.train = params.train
        self.prompt_ids = tokenize_prompts(tokenizer, problems)

    # ------------------------------------------------------------------------------------------------ rollouts

    def rollout(self, step: int) -> Rollout:
        indices = prompt_indices(step, self.train.prompts_per_step, len(self.problems), self.train.seed)
        positions = range(self.rank, len(indices), self.world_size)  # whole groups per rank
        mine = [indices[j] for j in positions]
        step_sampling = sampling(self.params, seed=self.train.seed + 7919 * step)
        # one seed per prompt of the step, from its place in the step: the samples do not depend on the world size
        seeds = [step_sampling.seed * 100_003 + j for j in positions]
        completions = self.generator.generate([self.prompt_ids[i] for i in mine], self.train.group_size,
                                              step_sampling, probe_token_ids=self.config.probe_token_ids,
                                              seeds=seeds)
        v = self.params.verifier
        verdicts = verify_completions(completions, [self.problems[mine[c.prompt_index]]["answer"] for c in completions],
                                      v, v.require_single_boxed)
        return Rollout(
            prompts=[c.prompt_token_ids for c in completions],
            responses=[c.response_token_ids for c in completions],
            finished=torch.tensor([c.finish_reason == "eos" for c in completions]),
            rewards=torch.tensor([float(v.reward) for v in verdicts]),
            old_scores=torch.tensor([self._score(c.probe_logprobs) for c in completions]),
            verdict_counts=summarize(verdicts),
            judged=torch.tensor([v.status not in UNJUDGED for v in verdicts]),
        )

    def _score(self, probe_logprobs: dict[int, float] | None) -> float:
        score = self.config.score(probe_logprobs)
        return 0.0 if score is None else score

    # ---------------------------------------------------------------------------------------------- advantages

    def advantages(self, rollout: Rollout, phase: Phase) -> tuple[torch.Tensor, dict]:
        """Â per sample. An unjudged sample (verifier timeout/error) gets 0 and stays out of its group's A_v
        statistics: a reward of 0 for it would be a guess."""
        k = self.train.group_size
        advantages, metrics = grpo_advantages(rollout.rewards, k, self.train.adv_eps, self.train.scale_adv_by_std,
                                              valid=rollout.judged)
        if phase.advantage_integration and self.params.self_reward.enabled:
            # A_s is always divided by its group std (as the official code), whatever scale_adv_by_std says of A_v
            a_s, score_std = self_reward_advantages(rollout.old_scores, rollout.finished, k, self.train.adv_eps)
            sr = self.params.self_reward
            advantages, mix = integrate_advantages(advantages, a_s, score_std, sr.tau, sr.std_threshold)
            metrics.update(mix)
        advantages = torch.where(rollout.judged, advantages, torch.zeros_like(advantages))
        metrics["unjudged_frac"] = float((~rollout.judged).float().mean())
        return advantages, metrics

    # ------------------------------------------------------------------------------------------------ training

    def policy_batch(self, rollout: Rollout) -> PolicyBatch:
        """z_c goes after the EOS of finished, judged samples: the self-reward loss needs a slot and a known label."""
        return collate(rollout.prompts, rollout.responses, (rollout.finished & rollout.judged).tolist(),
                       self.config.z_c_id, self.tokenizer.pad_token_id)

    def train_on(self, rollout: Rollout, advantages: torch.Tensor, phase: Phase) -> dict:
        # train mode: gradient checkpointing (train.gradient_checkpointing) recomputes only in it (no dropout in
        # these models, so the log-probs are those of eval mode)
        self.engine.module.train()
        batch = self.policy_batch(rollout)
        old_logprobs = self._old_logprobs(batch)
        class_counts = self._step_class_counts(batch, rollout.rewards)
        per_rank = self.train.mini_batch_size // self.world_size
        metrics: list[dict] = []
        for _ in range(self.train.ppo_epochs):
            for start in range(0, len(rollout.responses), per_rank):
                rows = slice(start, start + per_rank)
                metrics.append(self._mini_batch(batch.select(rows), rollout.rewards[rows], advantages[rows],
                                                None if old_logprobs is None else old_logprobs[rows], phase,
                                                class_counts))
        # The self-reward losses are normalised by the step's N_c + N_i: per epoch they add up over mini-batches
        # to the step's loss; every other metric is a per-mini-batch mean.
        epochs = self.train.ppo_epochs
        return {key: sum(m[key] for m in metrics) / (epochs if key in STEP_NORMALISED else len(metrics))
                for key in metrics[0]}

    @property
    def _temperature(self) -> float:
        """Training log-probs are those of the sampling distribution (policy_forward; 0 = greedy counts as 1)."""
        return self.params.generation.temperature

    def _on_policy(self) -> bool:
        return self.train.ppo_epochs == 1 and self.train.mini_batch_size == self.train.rollouts_per_step

    @torch.no_grad()
    def _old_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        """π_old token log-probs, needed only when the policy moves between mini-batches (else ratio ≡ 1)."""
        if self._on_policy():
            return None
        micro = self.train.micro_batch_size
        parts = [policy_forward(self.engine, batch.select(slice(i, i + micro)), temperature=self._temperature)[0]
                 for i in range(0, len(batch.finished), micro)]
        return _cat_padded(parts)

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over ranks (a no-op in a world of 1); float64 on the engine's device (nccl reduces only those)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def _step_class_counts(self, batch: PolicyBatch, rewards: torch.Tensor) -> dict:
        """N_c, N_i of the whole step (every mini-batch, every rank), as the paper and the official code take
        them: the class weights of the self-reward loss are fixed for the step, whatever the mini-batching."""
        n_c, n_i = self._all_reduce_sum([float((batch.has_slot & (rewards > 0.5)).sum()),
                                         float((batch.has_slot & (rewards <= 0.5)).sum())])
        return {"num_correct": n_c, "num_incorrect": n_i}

    def _mini_batch(self, batch: PolicyBatch, rewards, advantages, old_logprobs, phase: Phase,
                    class_counts: dict) -> dict:
        """One optimizer step; the token count normalising the policy loss is this mini-batch's (all ranks)."""
        (num_tokens,) = self._all_reduce_sum([float(batch.response_mask.sum())])
        counts = {"num_tokens": num_tokens, **class_counts}
        micro = self.train.micro_batch_size
        sums: dict[str, float] = {}
        for start in range(0, len(rewards), micro):
            rows = slice(start, start + micro)
            loss, metrics = self._micro_loss(batch.select(rows), rewards[rows], advantages[rows],
                                             None if old_logprobs is None else old_logprobs[rows], phase, counts)
            # Losses are normalised by global counts, so sum (not average) over micro-batches and ranks:
            # DeepSpeed averages gradients over ranks, hence the world-size factor.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        # each rank holds its share of globally normalised sums: add them up
        sums = dict(zip(sums, self._all_reduce_sum(list(sums.values()))))
        sums["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        sums["lr"] = float(self.engine.get_lr()[0])
        return sums

    def _micro_loss(self, batch: PolicyBatch, rewards, advantages, old_logprobs, phase, counts):
        sr = self.params.self_reward
        device = self.engine.device
        batch = batch.to(device)
        rewards, advantages = rewards.to(device), advantages.to(device)
        old_logprobs = None if old_logprobs is None else old_logprobs.to(device)
        extra = self.config.z_i_id  # z_i for the sft ablation, else None
        token_logprobs, z_c_logprob, z_i_logprob = policy_forward(self.engine, batch, extra, self._temperature)
        old = token_logprobs.detach() if old_logprobs is None else old_logprobs[:, :token_logprobs.shape[1]]
        ref = self._ref_logprobs(batch) if self.train.kl_coef > 0 else None
        pg_loss, metrics = grpo_policy_loss(token_logprobs, old, advantages, batch.response_mask,
                                            self.train.clip_low, self.train.clip_high,
                                            clip_ratio_c=self.train.clip_ratio_c, ref_logprobs=ref,
                                            kl_coef=self.train.kl_coef, num_tokens=counts["num_tokens"])
        finished = batch.has_slot
        class_counts = {"num_correct": counts["num_correct"], "num_incorrect": counts["num_incorrect"]}
        if self.config.kind == "sft":
            sr_loss, sr_metrics = self_reward_sft_loss(z_c_logprob, z_i_logprob, rewards, finished, **class_counts)
        else:
            sr_loss, sr_metrics = self_reward_mse_loss(z_c_logprob, rewards, finished, self.config.c_ref,
                                                       self.config.beta_v, **class_counts)
        use_sr = sr.enabled and phase.self_reward_loss
        loss = pg_loss + sr.alpha * sr_loss if use_sr else pg_loss
        # the self-reward loss is logged only while it is on (null in the step log otherwise: GRPO-only, warm-up)
        keep = ("pg_loss", "clip_frac", "dual_clip_frac", "approx_kl", "kl",
                *(("self_reward_mse", "self_reward_sft") if use_sr else ()))
        merged = {k: v for k, v in {**metrics, **sr_metrics}.items() if k in keep}
        return loss, merged

    @torch.no_grad()
    def _ref_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        return policy_forward(self.ref_model, batch, temperature=self._temperature)[0]


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


# ---------------------------------------------------------------------------------------------------- step metrics


def rollout_metrics(rollout: Rollout, threshold: float = 0.5) -> dict:
    """Batch-level numbers for the step log: rewards, lengths, self-verification of π_old's scores over the
    finished samples the verifier judged (a truncated one has no score, as in the official metric; an unjudged
    one has no label to check the score against)."""
    correct = rollout.rewards > 0.5
    scored = rollout.judged & rollout.finished
    scores = rollout.old_scores
    sv = self_verification(scores[scored].numpy(), correct[scored].numpy(), threshold)
    lengths = torch.tensor([float(len(r)) for r in rollout.responses])

    def mean_or_none(values: torch.Tensor) -> float | None:
        return float(values.mean()) if len(values) else None

    return {
        # over the judged samples: an unjudged one (verifier timeout/error) has no reward, it is counted below
        "reward_mean": mean_or_none(rollout.rewards[rollout.judged]),
        "finished_frac": float(rollout.finished.float().mean()),
        "response_length": float(lengths.mean()),
        "sv_acc_correct": sv["acc_correct"], "sv_acc_incorrect": sv["acc_incorrect"], "sv_f1": sv["f1"],
        "sv_auroc": auroc(scores[scored].numpy(), correct[scored].numpy()),
        "score_mean_correct": mean_or_none(scores[correct & scored]),
        "score_mean_incorrect": mean_or_none(scores[~correct & scored]),
        "verify_timeouts": rollout.verdict_counts.get("timeout", 0),
        "verify_errors": rollout.verdict_counts.get("error", 0),
        "num_tokens_generated": int(lengths.sum()),
    }


def gather_rollouts(rollout: Rollout, world_size: int) -> Rollout:
    """All ranks' rollouts concatenated (for metrics only); a no-op in a world of 1."""
    if world_size == 1:
        return rollout
    parts: list = [None] * world_size
    torch.distributed.all_gather_object(parts, rollout)
    counts: dict = {}
    for part in parts:
        for key, value in part.verdict_counts.items():
            counts[key] = counts.get(key, 0) + value
    return Rollout([x for p in parts for x in p.prompts], [x for p in parts for x in p.responses],
                   torch.cat([p.finished for p in parts]), torch.cat([p.rewards for p in parts]),
                   torch.cat([p.old_scores for p in parts]), counts, torch.cat([p.judged for p in parts]))


@contextlib.contextmanager
def timer(into: dict, key: str):
    start = time.perf_counter()
    yield
    into[key] = time.perf_counter() - start


def run_step(trainer: LaserTrainer, step: int) -> dict:
    """One full step; returns its log record. A few decoded samples of the step (rank 0's share) are left in
    ``trainer.last_completions`` (laser.completions; ``train.completions_per_step`` of them)."""
    sr = trainer.params.self_reward
    phase = warmup_phase(step, sr.warmup_rl_steps, sr.warmup_self_reward_steps)
    times: dict = {}
    with timer(times, "gen_seconds"):
        rollout = trainer.rollout(step)
    trainer.last_completions = (completion_samples(rollout, trainer.tokenizer, step, trainer.train.completions_per_step)
                                if trainer.rank == 0 else [])
    advantages, adv_metrics = trainer.advantages(rollout, phase)
    with timer(times, "train_seconds"):
        train_metrics = trainer.train_on(rollout, advantages, phase)
    everything = gather_rollouts(rollout, trainer.world_size)
    record = {"step": step, "self_reward_loss_on": phase.self_reward_loss and sr.enabled,
              "advantage_integration_on": phase.advantage_integration and sr.enabled,
              **train_metrics, **adv_metrics, **rollout_metrics(everything), **times}
    record.setdefault("self_reward_mse", None)
    record["tokens_per_s"] = record["num_tokens_generated"] / max(times["gen_seconds"], 1e-9)
    record["world_size"] = trainer.world_size
    record["weight_sync_seconds"] = trainer.generator.last_sync_seconds  # part of gen_seconds (vLLM backend)
    return record


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
