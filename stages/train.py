"""Stage train: LaSeR (or the GRPO-only baseline) on DeepSpeed ZeRO-3, resumable, exported as an HF model.

    python -m stages.train --variant laser [--params params.yaml]      # one process (CPU: gloo)
    torchrun --nproc_per_node 2 -m stages.train --variant laser         # data parallel, CPU or GPU
    deepspeed --num_gpus 8 --module stages.train --variant laser        # multi-GPU; add --hostfile for nodes

``--variant`` names one of params.yaml's ``variants`` (its self_reward / train overrides apply: Params.for_variant).

Reads ``paths.train_data``, the base model and ``paths.ref_constant`` (z_c and c_ref). Writes, for variant ``v``
(``PathsParams.trained(v)``), ``models/v`` (safetensors + tokenizer; the self-reward and prompt settings in
config.json's ``laser`` key and in laser.json; a model card README.md: laser/model_card.py), ``train/v/steps.jsonl``
(one JSON line per step),
``train/v/live`` (DVCLive: per-step metrics for ``dvc plots``/``dvc exp show``) and ``train/v/curves.png`` (the
training-curve PNG; both laser/train_log.py), ``train/v/completions.jsonl`` (a few decoded samples per step:
laser/completions.py), ``train/v/metrics.json`` and checkpoints under ``checkpoints/v`` (every
``train.checkpoint_every`` steps).
A re-run resumes from the latest checkpoint if it was made with the same params, data and code (a fingerprint is kept
beside the checkpoints); otherwise it starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from laser import engine as ds
from laser.cli import stage_main
from laser.completions import append_completions
from laser.config import Params, TrainedPaths
from laser.engine import gathered_for_generation
from laser.errors import StageError
from laser.io import atomic_path, atomic_write_json, atomic_write_text, ensure_writable
from laser.model_card import CONFIG_KEY, export_settings, render_model_card, write_export_files
from laser.models import load_model, load_tokenizer
from laser.policy_generation import open_policy_generator
from laser.rollouts import read_problems
from laser.runtime import base_model_dir, code_digest, self_reward_config
from laser.score import SelfRewardConfig
from laser.train_log import TrainLog, render_training_curves
from laser.trainer import LaserTrainer, append_jsonl, run_step

FINGERPRINT = "fingerprint.json"
log = logging.getLogger("laser.stages.train")


def fingerprint(params: Params, train_data: Path, ref_config: SelfRewardConfig, world_size: int = 1) -> str:
    """What a checkpoint must share with this run to be resumed: the training params, the data, z_c, c_ref, the
    code and the number of processes (DeepSpeed's ZeRO shards cannot be loaded into another world size)."""
    relevant = {k: asdict(getattr(params, k)) for k in ("model", "self_reward", "generation", "verifier", "train")}
    if params.train.lr_schedule == "constant":
        relevant["train"].pop("steps")  # training longer continues the same run; a decaying LR's length is `steps`
    relevant["train"].pop("checkpoint_every")
    relevant["train"].pop("keep_checkpoints")
    relevant["train"].pop("completions_per_step")  # what is logged, not what is trained
    digest = hashlib.sha256(json.dumps([relevant, asdict(ref_config), world_size], sort_keys=True).encode())
    digest.update(train_data.read_bytes())
    digest.update(code_digest().encode())
    return digest.hexdigest()


def prepare_checkpoint_dir(ckpt_dir: Path, steps_log: Path, expected: str, steps: int) -> bool:
    """True when ``ckpt_dir`` holds a checkpoint of this very run at step <= ``steps``; else clear it (and the
    step log). A checkpoint past ``steps`` (the run was made shorter) cannot give this run's model."""
    marker = ckpt_dir / FINGERPRINT
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == expected:
        latest = ckpt_dir / "latest"
        if not latest.exists():
            return False
        if int(latest.read_text().strip().removeprefix("step")) <= steps:
            return True
        log.warning(f"{ckpt_dir}: the latest checkpoint ({latest.read_text().strip()}) is past "
                    f"train.steps={steps}; starting over")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    steps_log.unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"fingerprint": expected})
    return False


def prune_checkpoints(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoint tags (``step<N>`` directories); returns the deleted tags.

    DeepSpeed's ``latest`` names the newest tag, which is always kept, so a crash mid-delete cannot break resume.
    """
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))
    old = tags[:-keep]
    for tag in old:
        shutil.rmtree(tag)
    return [tag.name for tag in old]


def truncate_log(steps_log: Path, last_step: int) -> None:
    """Keep the complete lines of steps <= last_step (a crash may have left later or partial lines)."""
    if not steps_log.exists():
        return
    kept = []
    for line in steps_log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break
    atomic_write_text(steps_log, "".join(f"{line}\n" for line in kept))


def export_model(engine, tokenizer, variant: str, ref_config: SelfRewardConfig, rank: int, params: Params,
                 train_rows: int | None = None, train_metrics: dict | None = None) -> None:
    """Consolidated safetensors + tokenizer, the settings (config.json's ``laser`` key and laser.json) and the
    model card, written atomically by rank 0 to variant ``variant``'s model directory."""
    out_dir = Path(params.paths.trained(variant).model)
    settings = export_settings(ref_config, params.prepare, params.generation)
    with gathered_for_generation(engine) as model:  # every rank joins the gather; rank 0 writes
        if rank == 0:
            with atomic_path(out_dir, is_dir=True) as tmp:
                setattr(model.config, CONFIG_KEY, settings)  # saved into config.json: a plain HF load carries it
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                write_export_files(tmp, settings, render_model_card(params, variant, settings, train_rows,
                                                                                 train_metrics))


def final_metrics(steps_log: Path) -> dict:
    records = read_records(steps_log)
    last = records[-1]
    tail = records[-max(1, len(records) // 4):]

    def tail_mean(key: str):
        values = [r[key] for r in tail if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    keys = ("reward_mean", "sv_f1", "sv_acc_correct", "sv_acc_incorrect", "self_reward_mse", "pg_loss")
    return {"steps": last["step"], **{f"final_{k}": last.get(k) for k in keys},
            **{f"last_quarter_{k}": tail_mean(k) for k in keys},
            "gen_seconds_total": sum(r["gen_seconds"] for r in records),
            "train_seconds_total": sum(r["train_seconds"] for r in records),
            # samples the verifier could not judge (left out of the rewards above, never scored 0)
            "verify_timeouts_total": sum(r.get("verify_timeouts", 0) for r in records),
            "verify_errors_total": sum(r.get("verify_errors", 0) for r in records)}


def read_records(steps_log: Path) -> list[dict]:
    return [json.loads(line) for line in steps_log.read_text().splitlines()] if steps_log.exists() else []


def check_outputs_writable(paths: TrainedPaths) -> None:
    """Fail before step 1, not at the export after the last one, when an output cannot be written (permission
    denied, read-only filesystem: laser.cli makes it one ``error:`` line, exit 3)."""
    ensure_writable(*dict.fromkeys([Path(paths.model).parent, Path(paths.checkpoints), Path(paths.steps).parent,
                                    Path(paths.curves).parent, Path(paths.live), Path(paths.metrics).parent,
                                    Path(paths.completions).parent]))


def train(params: Params, variant: str) -> None:
    """Train variant ``variant`` of ``params`` (its overrides applied) and export it."""
    params, paths = params.for_variant(variant), params.paths.trained(variant)
    check_outputs_writable(paths)
    rank, world_size = ds.init_distributed()
    t = params.train
    if t.prompts_per_step % world_size or t.mini_batch_size % (world_size * t.micro_batch_size):
        # each rank must run exactly mini/(W*micro) micro-batches per mini-batch: DeepSpeed's accumulation count
        raise StageError(f"with {world_size} processes, train.prompts_per_step={t.prompts_per_step} must be a "
                         f"multiple of {world_size} and train.mini_batch_size={t.mini_batch_size} a multiple of "
                         f"{world_size} x micro_batch_size={t.micro_batch_size}")
    ref_config, noise_warning = self_reward_config(params)
    if noise_warning and rank == 0:
        log.warning("%s", noise_warning)
    model_dir = base_model_dir(params)
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code)
    model = load_model(model_dir, params.model.dtype, params.model.trust_remote_code)
    engine = ds.initialize(model, params.train, params.model.dtype, world_size)
    ref_model = None
    if params.train.kl_coef > 0:  # loaded only when the KL term is on (the paper's runs use none)
        ref_model = load_model(model_dir, params.model.dtype, params.model.trust_remote_code, engine.device)
    steps_log, ckpt_dir = Path(paths.steps), Path(paths.checkpoints)
    start = 0
    if rank == 0:
        resumable = prepare_checkpoint_dir(ckpt_dir, steps_log, fingerprint(params, Path(params.paths.train_data),
                                                                              ref_config, world_size), t.steps)
    if world_size > 1:
        torch.distributed.barrier()
    if (ckpt_dir / "latest").exists() and (rank != 0 or resumable):
        loaded, client_state = engine.load_checkpoint(str(ckpt_dir))
        if loaded is None:
            raise StageError(f"checkpoint in {ckpt_dir} could not be loaded; delete the directory to start over")
        start = client_state["step"]
        if rank == 0:
            truncate_log(steps_log, start)
            truncate_log(Path(paths.completions), start)
            log.info(f"resumed from checkpoint at step {start}")
    if rank == 0 and start == 0:
        steps_log.unlink(missing_ok=True)  # a crash before the first checkpoint leaves lines to drop
        Path(paths.completions).unlink(missing_ok=True)
    with open_policy_generator(params, engine, tokenizer, model_dir, params.train.seed, rank) as generator:
        trainer = LaserTrainer(params, engine, tokenizer, read_problems(params.paths.train_data),
                               ref_config, rank, world_size, ref_model, generator)
        train_steps(params, paths, trainer, start)
    # only rank 0 writes the step log
    metrics = {**final_metrics(steps_log), "train_problems": len(trainer.problems)} if rank == 0 else None
    export_model(engine, tokenizer, variant, ref_config, rank, params, len(trainer.problems),
                 metrics)
    if rank == 0:
        render_training_curves(read_records(steps_log), paths.curves)
        atomic_write_json(paths.metrics, metrics)
    if world_size > 1:
        torch.distributed.barrier()  # every rank's work is written before any leaves the group
    ds.shutdown_distributed()


def train_steps(params: Params, paths: TrainedPaths, trainer: LaserTrainer, start: int) -> None:
    """Steps start+1 .. train.steps: log each, checkpoint every ``train.checkpoint_every``."""
    engine, rank = trainer.engine, trainer.rank
    steps_log, ckpt_dir = Path(paths.steps), Path(paths.checkpoints)
    steps_log.parent.mkdir(parents=True, exist_ok=True)
    train_log = None
    if rank == 0:
        train_log = TrainLog(paths.live)
        train_log.replay(read_records(steps_log))  # the steps a resumed run keeps
    bar = tqdm(range(start + 1, params.train.steps + 1), desc="train", disable=rank != 0, initial=start,
               total=params.train.steps)
    for step in bar:
        record = run_step(trainer, step)
        if rank == 0:
            append_jsonl(steps_log, record)
            append_completions(paths.completions, trainer.last_completions)
            train_log.log(record)  # DVCLive: `dvc plots show` draws the run so far
            bar.set_postfix(reward=_fmt(record["reward_mean"]), sv_f1=_fmt(record["sv_f1"]),
                            mse=_fmt(record["self_reward_mse"]))
        if step % params.train.checkpoint_every == 0 or step == params.train.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state={"step": step})
            if rank == 0:  # older tags only: other ranks may still be finishing their shards of this one
                prune_checkpoints(ckpt_dir, params.train.keep_checkpoints)
    if rank == 0:
        train_log.close()


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> None:
    stage_main(lambda params, args: train(params, args.variant), __doc__.splitlines()[0], argv, _arguments,
               log_name=lambda args: f"train-{args.variant}")


def _arguments(parser) -> None:
    parser.add_argument("--variant", required=True, help="one of params.yaml's variants (e.g. laser)")


if __name__ == "__main__":
    main()
