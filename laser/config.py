"""params.yaml -> frozen dataclasses, one per section, validated at load.

Every error names the key path (``train.lr``), the value found and what is allowed, so a bad edit fails before
any stage starts. Modes are explicit string fields (``self_reward.loss: mse | sft``), never sentinel numbers.

A *profile* (``profiles/<name>.yaml``) is a partial params file deep-merged over ``params.yaml``; applying one
writes the merged result back to ``params.yaml`` (as ``dvc exp run -S`` does), so DVC sees one params file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml

from laser.errors import ParamsError


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ParamsError(f"params: {key} = {value!r} is invalid; allowed: {allowed}")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        _fail(key, value, allowed)


# ----------------------------------------------------------------------------------------------------------- sections


# The project's own files, by top-level name: no output path may be, or lie inside, one of them (a stage replaces
# its outputs: `paths.data_stats: params.yaml` would overwrite the params). A static list, not `git ls-files`:
# DVC metrics with `cache: false` are often committed to git on purpose, and they are outputs.
PROJECT_FILES = frozenset({
    "laser", "stages", "flows", "tests", "scripts", "bench", "profiles", ".ci", ".dvc", ".git", ".venv",
    "laser_pipeline.egg-info", "params.yaml", "dvc.yaml", "dvc.lock", "pyproject.toml", "constraints.txt",
    "README.md", "DEVELOPERS.md", ".gitignore", ".dvcignore",
})


@dataclass(frozen=True)
class PathsParams:
    """Every artifact path of the pipeline; dvc.yaml refers to these with ``${paths.*}``."""

    train_data: str = "data/train.parquet"
    eval_data_dir: str = "data/eval"
    data_stats: str = "data/stats.json"
    data_rejects: str = "data/rejects.jsonl"
    ref_constant: str = "ref/ref_constant.json"
    ref_logprobs: str = "ref/logprobs.csv"
    models_dir: str = "models"  # models/<variant>: each training variant's export (safetensors + tokenizer + card)
    release_model: str = "release"  # the export of package.variant with a model card holding this run's evaluation
    checkpoints_dir: str = "checkpoints"  # checkpoints/<variant>: resume state (not a DVC output)
    train_dir: str = "train"  # train/<variant>/: the step log, metrics, curves, DVCLive, sample completions
    rollouts_dir: str = "rollouts"
    eval_metrics: str = "eval/metrics.json"
    eval_summary: str = "eval/summary.json"  # the headline per model (tens of keys): what dvc exp show shows
    eval_plots: str = "eval/plots"  # plot data (CSV) for dvc plots
    eval_figures: str = "eval/figures"  # the same plots as PNGs, rendered offline (the report embeds them)
    eval_report: str = "eval/report.md"
    cache_dir: str = ".cache"  # may be absolute (a cache shared between checkouts); it is not a DVC output
    logs_dir: str = "logs"  # each stage's <stage>.log (laser/logs.py): ignored by DVC and git, not an output

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _require(bool(value.strip()), f"paths.{f.name}", value, "a non-empty path")
            if f.name != "cache_dir":  # DVC outputs: inside the project
                path = PurePath(value)
                _require(bool(path.parts) and not path.is_absolute() and ".." not in path.parts, f"paths.{f.name}",
                         value,
                         "a path relative to the project root, without '..' (the stages' outputs stay inside it)")
                _require(path.parts[0] not in PROJECT_FILES, f"paths.{f.name}", value,
                         "a path outside the project's own files (" + ", ".join(sorted(PROJECT_FILES)) + "): a stage "
                         "replaces or deletes its outputs")
        self._check_no_nesting()

    def _check_no_nesting(self) -> None:
        """No output may be, or lie inside, another (a stage would overwrite or delete the other's files); the
        cache directory, when it is inside the project, is neither an output nor inside one."""
        outputs = {f.name: PurePath(getattr(self, f.name)) for f in dataclasses.fields(self)}
        cache = outputs.pop("cache_dir")
        if not cache.is_absolute() and ".." not in cache.parts:
            outputs["cache_dir"] = cache
        names = list(outputs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if outputs[a] == outputs[b] or outputs[a] in outputs[b].parents:
                    inner, outer = b, a
                elif outputs[b] in outputs[a].parents:
                    inner, outer = a, b
                else:
                    continue
                _fail(f"paths.{inner}", str(outputs[inner]),
                      f"a path that is not, and is not inside, paths.{outer} = {str(outputs[outer])!r} (the output "
                      "paths and the cache dir must be distinct and not nested)")

    def trained(self, variant: str) -> TrainedPaths:
        """Where training variant ``variant`` writes (dvc.yaml's ``train@<variant>`` outputs spell the same)."""
        run = PurePath(self.train_dir) / variant
        return TrainedPaths(
            model=str(PurePath(self.models_dir) / variant), checkpoints=str(PurePath(self.checkpoints_dir) / variant),
            steps=str(run / "steps.jsonl"), metrics=str(run / "metrics.json"), curves=str(run / "curves.png"),
            live=str(run / "live"), completions=str(run / "completions.jsonl"))


@dataclass(frozen=True)
class TrainedPaths:
    """One training variant's artifacts (``PathsParams.trained``)."""

    model: str  # the export: safetensors + tokenizer, laser.json, a model card
    checkpoints: str  # resume state, not a DVC output
    steps: str  # one JSON line per step (persist: a resumed run continues it)
    metrics: str  # the final step's numbers and the run's totals
    curves: str  # the training-curve PNG, a panel per quantity (laser/train_log.py)
    live: str  # DVCLive: plots/metrics/train/<metric>.tsv per step, metrics.json (last step)
    completions: str  # a few decoded samples per step (train.completions_per_step)


@dataclass(frozen=True)
class ModelParams:
    """The base (= reference) model: a local HF dir, a hub id, or a built-in name."""

    name: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "auto"] = "float32"  # auto: bfloat16 on a GPU that has it, else float32
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "model.name", self.name, "a non-empty model name or path")


@dataclass(frozen=True)
class SelfRewardParams:
    """LaSeR's knobs. Names follow the paper: β_v, α, τ, T, w_r, w_sr."""

    token: str = "auto"  # z_c: a token string in the vocabulary, or "auto" (see laser.models)
    incorrect_token: str | None = None  # z_i, used only by loss: sft
    loss: Literal["mse", "sft"] = "mse"
    enabled: bool = True  # false = the GRPO-only baseline, everything else identical
    beta_v: float = 0.1
    alpha: float = 0.1
    tau: float = 0.1
    std_threshold: float = 0.1
    warmup_rl_steps: int = 0  # w_r: steps <= w_r are plain GRPO
    warmup_self_reward_steps: int = 0  # w_sr: integration starts after w_r + w_sr
    # z_c must leave room for a score of 1: c_ref + 1/beta_v <= -headroom_margin (nats; see laser.score)
    headroom_margin: float = 1.0
    noise_warning: float = 0.1  # warn when beta_v * std(log pi_ref(z_c)) exceeds this

    def __post_init__(self) -> None:
        _require(self.beta_v > 0, "self_reward.beta_v", self.beta_v, "a number > 0")
        _require(self.alpha >= 0, "self_reward.alpha", self.alpha, "a number >= 0")
        _require(0 <= self.tau <= 1, "self_reward.tau", self.tau, "a number in [0, 1]")
        _require(self.std_threshold >= 0, "self_reward.std_threshold", self.std_threshold, "a number >= 0")
        _require(self.headroom_margin >= 0, "self_reward.headroom_margin", self.headroom_margin, "a number >= 0")
        _require(self.warmup_rl_steps >= 0, "self_reward.warmup_rl_steps", self.warmup_rl_steps, "an int >= 0")
        _require(self.warmup_self_reward_steps >= 0, "self_reward.warmup_self_reward_steps",
                 self.warmup_self_reward_steps, "an int >= 0")
        if self.loss == "sft":
            _require(self.incorrect_token is not None, "self_reward.incorrect_token", self.incorrect_token,
                     "a token string (z_i) when self_reward.loss is 'sft'")
            _require(self.incorrect_token != self.token, "self_reward.incorrect_token", self.incorrect_token,
                     "a token different from self_reward.token")


@dataclass(frozen=True)
class FewShotTurn:
    user: str
    assistant: str


@dataclass(frozen=True)
class SourceParams:
    """One data source. ``kind`` picks which of the other fields apply."""

    kind: Literal["synthetic", "jsonl", "parquet", "hf"]
    path: str | None = None  # jsonl / parquet file
    dataset: str | None = None  # hf: dataset name
    config: str | None = None  # hf: config name
    split: str = "train"  # hf split; also the split label written to the output
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    limit: int | None = None  # keep the first N rows (after rejection)
    # synthetic generator
    num_problems: int = 1000
    seed: int = 0
    # the default task (params.yaml): operands 1-12, +/-, 10% word problems; base SmolLM2-135M ~40% right
    min_digits: int = 1
    max_digits: int = 2
    max_operand: int | None = 12  # the largest operand (null: the largest with max_digits digits)
    max_operations: int = 1
    operators: tuple[str, ...] = ("+", "-")
    word_fraction: float = 0.1  # share of one-operation problems phrased as a short word problem (harder)

    def validate(self, key: str) -> None:
        if self.kind in ("jsonl", "parquet"):
            _require(bool(self.path), f"{key}.path", self.path, f"a file path when kind is '{self.kind}'")
        if self.kind == "hf":
            _require(bool(self.dataset), f"{key}.dataset", self.dataset, "a dataset name when kind is 'hf'")
        if self.limit is not None:
            _require(self.limit > 0, f"{key}.limit", self.limit, "null or an int > 0")
        if self.kind == "synthetic":
            _require(self.limit is None, f"{key}.limit", self.limit,
                     "null for a synthetic source (its size is num_problems)")
            _require(self.num_problems > 0, f"{key}.num_problems", self.num_problems, "an int > 0")
            _require(1 <= self.min_digits <= self.max_digits <= 9, f"{key}.max_digits", self.max_digits,
                     "1 <= min_digits <= max_digits <= 9")
            if self.max_operand is not None:
                smallest = 10 ** (self.min_digits - 1) if self.min_digits > 1 else 1
                _require(self.max_operand >= smallest, f"{key}.max_operand", self.max_operand,
                         f"null or an int >= {smallest} (the smallest operand with min_digits={self.min_digits})")
            _require(self.max_operations >= 1, f"{key}.max_operations", self.max_operations, "an int >= 1")
            _require(bool(self.operators) and set(self.operators) <= {"+", "-", "*"}, f"{key}.operators",
                     self.operators, "a non-empty list drawn from '+', '-', '*'")
            _require(0 <= self.word_fraction <= 1, f"{key}.word_fraction", self.word_fraction, "a number in [0, 1]")


@dataclass(frozen=True)
class PrepareParams:
    train: SourceParams = field(default_factory=lambda: SourceParams(kind="synthetic", num_problems=2000))
    eval_sets: dict[str, SourceParams] = field(
        default_factory=lambda: {"synthetic": SourceParams(kind="synthetic", split="test", num_problems=32, seed=1)})
    instruction: str = "Solve the problem step by step and put the final answer in \\boxed{}."
    # SmolLM2-135M-Instruct boxes its answer only after seeing examples (0/32 with the instruction alone)
    few_shot: tuple[FewShotTurn, ...] = (
        FewShotTurn("What is 3 + 4?", "3 + 4 = 7. The answer is \\boxed{7}."),
        FewShotTurn("What is 9 - 5?", "9 - 5 = 4. The answer is \\boxed{4}."),
    )
    prompt_format: Literal["chat", "plain"] = "chat"
    max_prompt_tokens: int = 512
    max_reject_fraction: float = 0.05

    def __post_init__(self) -> None:
        self.train.validate("prepare.train")
        _require(bool(self.eval_sets), "prepare.eval_sets", self.eval_sets, "at least one named eval set")
        for name, source in self.eval_sets.items():
            _require(name.replace("_", "").replace("-", "").isalnum(), f"prepare.eval_sets.{name}", name,
                     "a name of letters, digits, '_' and '-'")
            source.validate(f"prepare.eval_sets.{name}")
        _require(self.max_prompt_tokens > 0, "prepare.max_prompt_tokens", self.max_prompt_tokens, "an int > 0")
        _require(0 <= self.max_reject_fraction <= 1, "prepare.max_reject_fraction", self.max_reject_fraction,
                 "a number in [0, 1]")


@dataclass(frozen=True)
class VLLMParams:
    """The vLLM engine (``generation.backend: vllm``), run as a worker process from its own environment."""

    python: str = ".venv-vllm/bin/python"  # the vLLM environment's interpreter (bash scripts/setup_vllm.sh)
    # fp32 on CPU: bf16 moves log pi(z_c | x, y, EOS) by 0.26-0.38 nats there (issue 14); bfloat16 on a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA, else float32
    gpu_memory_utilization: float = 0.3  # the engine's share of GPU memory: colocated with training in train
    tensor_parallel_size: int = 1
    max_model_len: int = 2048  # prompt + response + the z_c step
    enable_prefix_caching: bool = True
    block_size: int | None = 32  # KV block tokens; null: vLLM's default (128 on CPU: never hits on short prompts)
    max_num_seqs: int = 64  # sequences decoded together
    cpu_kvcache_space_gb: int = 2  # CPU backend: the KV cache's memory in GiB (VLLM_CPU_KVCACHE_SPACE)
    weight_sync_dir: str = "/dev/shm"  # train: where the policy's weights are written for the engine to reload
    start_timeout_s: float = 600.0

    def validate(self, key: str) -> None:
        _require(0 < self.gpu_memory_utilization <= 1, f"{key}.gpu_memory_utilization",
                 self.gpu_memory_utilization, "a number in (0, 1]")
        for name in ("tensor_parallel_size", "max_model_len", "max_num_seqs"):
            _require(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "an int > 0")
        _require(self.block_size is None or (self.block_size > 0 and self.block_size % 16 == 0),
                 f"{key}.block_size", self.block_size, "null or a positive multiple of 16")
        _require(self.cpu_kvcache_space_gb > 0, f"{key}.cpu_kvcache_space_gb", self.cpu_kvcache_space_gb,
                 "an int > 0 (GiB)")
        _require(self.start_timeout_s > 0, f"{key}.start_timeout_s", self.start_timeout_s, "a number > 0")


@dataclass(frozen=True)
class GenerationParams:
    # hf: laser.generation.HFGenerator (in-process); vllm: laser.vllm_backend.VLLMGenerator (a vLLM worker process)
    backend: Literal["hf", "vllm"] = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    batch_size: int = 16
    vllm: VLLMParams = field(default_factory=VLLMParams)

    def __post_init__(self) -> None:
        self.vllm.validate("generation.vllm")
        _require(self.temperature >= 0, "generation.temperature", self.temperature, "a number >= 0")
        _require(0 < self.top_p <= 1, "generation.top_p", self.top_p, "a number in (0, 1]")
        _require(self.max_new_tokens > 0, "generation.max_new_tokens", self.max_new_tokens, "an int > 0")
        _require(self.batch_size > 0, "generation.batch_size", self.batch_size, "an int > 0")


@dataclass(frozen=True)
class VerifierParams:
    timeout_s: float = 5.0
    num_workers: int = 2
    require_single_boxed: bool = False  # the official format gate: exactly one \boxed{}

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "verifier.timeout_s", self.timeout_s, "a number > 0")
        _require(self.num_workers >= 1, "verifier.num_workers", self.num_workers, "an int >= 1")


@dataclass(frozen=True)
class RefConstantParams:
    num_prompts: int = 16
    samples_per_prompt: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_prompts > 0, "ref_constant.num_prompts", self.num_prompts, "an int > 0")
        _require(self.samples_per_prompt > 0, "ref_constant.samples_per_prompt", self.samples_per_prompt,
                 "an int > 0")



@dataclass(frozen=True)
class TrainParams:
    steps: int = 8
    prompts_per_step: int = 4  # B
    group_size: int = 4  # K
    mini_batch_size: int = 16  # samples per optimizer step
    micro_batch_size: int = 8  # samples per forward
    ppo_epochs: int = 1
    lr: float = 1e-5
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = 3.0  # dual clip (verl): a token's loss with A < 0 is at most c·|A|; null: off
    kl_coef: float = 0.0
    adv_eps: float = 1e-6
    scale_adv_by_std: bool = True
    seed: int = 0
    checkpoint_every: int = 4
    keep_checkpoints: int = 2  # the newest N checkpoints stay on disk; older ones are deleted after each save
    zero_stage: int = 3
    offload_optimizer: bool = False
    optimizer: Literal["adamw", "cpu_adam"] = "adamw"
    completions_per_step: int = 2  # decoded samples kept per step in paths.train_completions (0: none)
    # bfloat16: autocast forward, fp32 weights/optimizer; auto: bfloat16 where the hardware has it (laser.engine)
    compute_dtype: Literal["float32", "bfloat16", "auto"] = "float32"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    logits_chunk: int = 2048  # LM-head rows at once (response positions only); more are recomputed in backward

    @property
    def rollouts_per_step(self) -> int:
        """B·K: samples generated (and trained on) per step."""
        return self.prompts_per_step * self.group_size

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "mini_batch_size", "micro_batch_size", "ppo_epochs",
                    "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "an int > 0")
        _require(self.group_size >= 2, "train.group_size", self.group_size, "an int >= 2 (GRPO needs a group)")
        rollouts = self.rollouts_per_step
        _require(rollouts % self.mini_batch_size == 0, "train.mini_batch_size", self.mini_batch_size,
                 f"a divisor of prompts_per_step * group_size = {rollouts}")
        _require(self.mini_batch_size % self.micro_batch_size == 0, "train.micro_batch_size",
                 self.micro_batch_size, f"a divisor of mini_batch_size = {self.mini_batch_size}")
        _require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _require(0 <= self.clip_low < 1, "train.clip_low", self.clip_low, "a number in [0, 1)")
        _require(self.clip_high >= 0, "train.clip_high", self.clip_high, "a number >= 0")
        _require(self.clip_ratio_c is None or self.clip_ratio_c > 1, "train.clip_ratio_c", self.clip_ratio_c,
                 "a number > 1 (the dual clip bound on ρ for A < 0), or null for none")
        _require(self.kl_coef >= 0, "train.kl_coef", self.kl_coef, "a number >= 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", self.grad_clip,
                 "a number > 0, or null for no clipping")
        _require(self.adv_eps > 0, "train.adv_eps", self.adv_eps,
                 "a number > 0 (it keeps a group whose rewards are all equal from dividing 0 by 0)")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "an int >= 0")
        _require(self.logits_chunk > 0, "train.logits_chunk", self.logits_chunk, "an int > 0")
        _require(self.completions_per_step >= 0, "train.completions_per_step", self.completions_per_step,
                 "an int >= 0")
        _require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", self.zero_stage, "0, 1, 2 or 3")
        if self.offload_optimizer:  # DeepSpeed refuses a torch optimizer for an offloaded (CPU-resident) state
            _require(self.optimizer == "cpu_adam", "train.optimizer", self.optimizer,
                     "cpu_adam when train.offload_optimizer is true")
            _require(self.zero_stage >= 1, "train.zero_stage", self.zero_stage,
                     "1, 2 or 3 when train.offload_optimizer is true (offloading is a ZeRO feature)")


@dataclass(frozen=True)
class RolloutParams:
    """Test-time sampling; which models are rolled out is the ``foreach`` of dvc.yaml's rollout stage (the DAG)."""

    samples_per_problem: int = 4
    seed: int = 1234
    # the eval-time format gate; the official eval reads the last box (its single-box gate is training's only)
    require_single_boxed: bool = False

    def __post_init__(self) -> None:
        _require(self.samples_per_problem > 0, "rollout.samples_per_problem", self.samples_per_problem,
                 "an int > 0")


@dataclass(frozen=True)
class EvaluateParams:
    subset_seeds: int = 8  # random subsets of the K samples averaged per k in the scaling curves
    threshold: float = 0.5
    ece_bins: int = 10
    bootstrap_resamples: int = 1000  # the headline's 95% intervals: problems resampled with replacement
    collapse_auroc: float = 0.55  # at or below it the report says self-verification collapsed

    def __post_init__(self) -> None:
        _require(self.bootstrap_resamples > 0, "evaluate.bootstrap_resamples", self.bootstrap_resamples,
                 "an int > 0")
        _require(0 <= self.collapse_auroc <= 1, "evaluate.collapse_auroc", self.collapse_auroc, "a number in [0, 1]")
        _require(self.subset_seeds > 0, "evaluate.subset_seeds", self.subset_seeds, "an int > 0")
        _require(0 < self.threshold < 1, "evaluate.threshold", self.threshold, "a number in (0, 1)")
        _require(self.ece_bins > 0, "evaluate.ece_bins", self.ece_bins, "an int > 0")


@dataclass(frozen=True)
class FlowParams:
    """The Prefect flow (flows/pipeline.py) and how the train stage is launched; none of it changes a result."""

    retries: int = 2
    retry_delay_s: float = 5.0
    retry_backoff: float = 2.0
    max_parallel: int = 1  # stages run at once when the DAG allows (rollout@base beside train); 1 on a CPU machine
    gpu_stages: tuple[str, ...] = ("ref_constant", "train", "rollout_base", "rollout")  # stages / foreach groups: GPU
    gpu_tag: str = "gpu"  # their Prefect tag: a tag concurrency limit on it keeps two of them off one GPU
    train_launcher: str = "python"  # dvc.yaml runs `${flow.train_launcher} -m stages.train`: torchrun ..., deepspeed
    train_stage: str = "train"  # the stage (or foreach group: every train@<v>) train_dispatch sends
    train_dispatch: Literal["local", "deployment"] = "local"  # deployment: run it on a (GPU) work pool
    train_deployment: str = "laser-remote-stage/gpu"  # flow-name/deployment-name (python -m flows.deploy --remote)
    dispatch_start_timeout_s: float = 600.0  # no worker picked the dispatched run up by then: failed (retried)
    dispatch_heartbeat_s: float = 30.0  # the dispatched run says it is alive this often
    dispatch_lost_after_s: float = 300.0  # no sign of life for this long: crashed (its worker or machine died)

    def __post_init__(self) -> None:
        _require(self.retries >= 0, "flow.retries", self.retries, "an int >= 0")
        _require(self.retry_delay_s >= 0, "flow.retry_delay_s", self.retry_delay_s, "a number >= 0")
        _require(self.retry_backoff >= 1, "flow.retry_backoff", self.retry_backoff, "a number >= 1")
        _require(self.max_parallel >= 1, "flow.max_parallel", self.max_parallel, "an int >= 1")
        _require(bool(re.fullmatch(r"[A-Za-z0-9_.:-]+", self.gpu_tag)), "flow.gpu_tag", self.gpu_tag,
                 "a non-empty tag of letters, digits, '_', '.', ':', '-'")
        _require(bool(self.train_launcher.strip()) and "\n" not in self.train_launcher, "flow.train_launcher",
                 self.train_launcher, "a one-line command prefix that runs `-m stages.train`: python, "
                 "'torchrun --nproc_per_node 8', 'deepspeed --hostfile hosts --no_python python'")
        _require(bool(self.train_stage), "flow.train_stage", self.train_stage, "a stage name")
        _require(bool(re.fullmatch(r"[^/\s]+/[^/\s]+", self.train_deployment)), "flow.train_deployment",
                 self.train_deployment, "'<flow name>/<deployment name>'")
        for key in ("dispatch_start_timeout_s", "dispatch_heartbeat_s", "dispatch_lost_after_s"):
            _require(getattr(self, key) > 0, f"flow.{key}", getattr(self, key), "a number > 0")
        _require(self.dispatch_lost_after_s > self.dispatch_heartbeat_s, "flow.dispatch_lost_after_s",
                 self.dispatch_lost_after_s, f"a number > flow.dispatch_heartbeat_s = {self.dispatch_heartbeat_s}")


@dataclass(frozen=True)
class VariantParams:
    """One training variant (dvc.yaml's ``train@<name>``): keys of ``self_reward`` and ``train`` that differ from
    the shared sections; everything else (data, seeds unless overridden, generation, rollouts) is shared."""

    self_reward: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackageParams:
    variant: str = "laser"  # which training variant the package stage releases (paths.release_model)


VARIANT_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")


@dataclass(frozen=True)
class Params:
    paths: PathsParams = field(default_factory=PathsParams)
    model: ModelParams = field(default_factory=ModelParams)
    self_reward: SelfRewardParams = field(default_factory=SelfRewardParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    generation: GenerationParams = field(default_factory=GenerationParams)
    verifier: VerifierParams = field(default_factory=VerifierParams)
    ref_constant: RefConstantParams = field(default_factory=RefConstantParams)
    train: TrainParams = field(default_factory=TrainParams)
    rollout: RolloutParams = field(default_factory=RolloutParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    flow: FlowParams = field(default_factory=FlowParams)
    # The training variants, each trained, rolled out and evaluated beside the base model (dvc.yaml foreach).
    variants: dict[str, VariantParams] = field(default_factory=lambda: {"laser": VariantParams()})
    package: PackageParams = field(default_factory=PackageParams)

    def __post_init__(self) -> None:
        _require(bool(self.variants), "variants", self.variants, "at least one training variant, e.g. {laser: {}}")
        for name in self.variants:
            _require(bool(VARIANT_NAME.fullmatch(name)) and name != "base", f"variants.{name}", name,
                     "a name of lower-case letters, digits, '_' or '-' (at most 40), starting with a letter, and not "
                     "'base' (the untrained model's rollouts)")
            self._variant_sections(name)  # validates the overrides, naming variants.<name>.<section>.<key>
        _require(self.package.variant in self.variants, "package.variant", self.package.variant,
                 f"one of the variants: {', '.join(self.variants)}")

    def for_variant(self, name: str) -> Params:
        """These params as training variant ``name`` sees them: its overrides applied to self_reward and train."""
        if name not in self.variants:
            raise ParamsError(f"params: no training variant {name!r}; variants: {', '.join(self.variants)}")
        self_reward, train = self._variant_sections(name)
        # Not dataclasses.replace: it would rerun __post_init__, checking every *other* variant's overrides over
        # this variant's sections instead of the shared ones. Each section here was validated by build().
        view = copy.copy(self)
        object.__setattr__(view, "self_reward", self_reward)
        object.__setattr__(view, "train", train)
        return view

    def _variant_sections(self, name: str) -> tuple[SelfRewardParams, TrainParams]:
        overrides, where = self.variants[name], f"variants.{name}"
        for key in SHARED_SELF_REWARD_KEYS:
            if key in overrides.self_reward:
                raise ParamsError(f"params: {where}.self_reward.{key} cannot be set per variant: the ref_constant "
                                  f"stage, shared by all variants, picks z_c/z_i from the shared self_reward.{key}; "
                                  "set it there (or run the other value as its own experiment)")
        try:
            return (build(SelfRewardParams, {**dataclasses.asdict(self.self_reward), **overrides.self_reward},
                          f"{where}.self_reward"),
                    build(TrainParams, {**dataclasses.asdict(self.train), **overrides.train}, f"{where}.train"))
        except ParamsError as err:
            if where in str(err):
                raise
            # a cross-field check names the section's own key (train.mini_batch_size); say whose values they are
            raise ParamsError(f"{err} (in {where}: its overrides over the shared sections)") from None


# What the shared ref_constant stage reads of self_reward: a variant cannot change them.
SHARED_SELF_REWARD_KEYS = ("token", "incorrect_token", "loss")


# ------------------------------------------------------------------------------------------------------ typed build


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


_MAX_INT = 2**63 - 1  # what every consumer (numpy, torch, parquet) can hold: beyond it a knob is a typo


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists/dicts to tuples/dataclasses."""
    if tp is Any:  # checked where it is used (VariantParams: by building the section it overrides)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        _require(value in args, key, value, _describe(tp))
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, value, f"a list of {_describe(args[0])}")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, value, "a mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, value, f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}")
        return build(tp, value, key)
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value), key,
                 value, "a finite number")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        _require(abs(value) <= _MAX_INT, key, value if abs(value) < 10**30 else f"<an integer of {value.bit_length()} "
                 "bits>", f"an integer of magnitude <= 2**63 - 1 = {_MAX_INT}")
        return value
    if tp is bool:
        _require(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is str:
        _require(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")  # a bug in this module, not in params


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and missing required keys fail."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    where = f"{prefix}." if prefix else ""
    for key in data:
        if key not in names:
            raise ParamsError(f"params: unknown key {where}{key} (value {data[key]!r}); allowed keys here: "
                              f"{', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"params: missing required key {where}{f.name} ({_describe(hints[f.name])})")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------ file access


def deep_merge(base: dict, override: dict) -> dict:
    """A new dict: ``override`` merged into ``base``; nested mappings merge, everything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: ``1e-05`` (what ``dvc exp run -S
    train.lr=1e-5`` writes; DVC itself reads YAML 1.2) and ``1E5`` would be strings. Ints stay ints.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}  # a SafeLoader subclass: no arbitrary objects
    except FileNotFoundError:
        raise ParamsError(f"params: file not found: {path}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an int past Python's digit limit
        raise ParamsError(f"params: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"params: {path} must hold a mapping at the top level, found {type(data).__name__}")
    return data


def load_params(path: str | Path = "params.yaml", profile: str | Path | None = None) -> Params:
    """Load and validate params; ``profile`` is a partial params file merged over ``path``."""
    data = read_yaml(path)
    if profile is not None:
        data = deep_merge(data, read_yaml(profile))
    try:
        return build(Params, data)
    except ParamsError as err:
        raise ParamsError(f"{path}{f' + profile {profile}' if profile is not None else ''}: {err}") from None


def apply_profile(params_path: str | Path, profile_path: str | Path) -> Params:
    """Merge ``profile_path`` into ``params_path`` and write it back (validated first, written atomically)."""
    from laser.io import atomic_write_text

    merged = deep_merge(read_yaml(params_path), read_yaml(profile_path))
    try:
        params = build(Params, merged)
    except ParamsError as err:
        raise ParamsError(f"{params_path} + profile {profile_path}: {err}") from None
    atomic_write_text(params_path, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True, width=120))
    return params
