"""The DeepSpeed ZeRO-3 LaSeR trainer on a tiny random model, CPU, real engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stage_env

from laser import engine as ds
from laser.advantages import grpo_advantages
from laser.batch import collate, policy_forward
from laser.config import Params, TrainParams, build
from laser.models import load_model, load_tokenizer, token_id
from laser.schedule import Phase
from laser.score import SelfRewardConfig, self_reward_score
from laser.trainer import LaserTrainer, Rollout, run_step

ROOT = Path(__file__).resolve().parents[1]
C_REF = -11.5


def _problems(tokenizer, n=8):
    out = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        question = f"What is {a} + {b}?"
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        out.append({"id": f"p{i}", "problem": question, "answer": str(a + b), "prompt": prompt})
    return out


def _params(repo_cache, **train) -> Params:
    base = {"paths": {"cache_dir": str(repo_cache)}, "model": {"name": "tiny-random"},
            "self_reward": {"token": "<|z_c|>"}, "generation": {"max_new_tokens": 40, "batch_size": 8},
            "train": {"steps": 3, "prompts_per_step": 2, "group_size": 4, "mini_batch_size": 8,
                      "micro_batch_size": 4, "lr": 1e-3, **train}}
    return build(Params, base)


@pytest.fixture
def make_trainer(tiny_model_dir, repo_cache):
    ds.init_distributed()
    engines = []

    def make(params: Params | None = None, **train) -> LaserTrainer:
        params = params or _params(repo_cache, **train)
        tokenizer = load_tokenizer(tiny_model_dir)
        engine = ds.initialize(load_model(tiny_model_dir), params.train, "float32", world_size=1)
        engines.append(engine)
        config = SelfRewardConfig("<|z_c|>", token_id(tokenizer, "<|z_c|>"), C_REF, params.self_reward.beta_v)
        return LaserTrainer(params, engine, tokenizer, _problems(tokenizer), config)

    yield make
    for engine in engines:
        engine.destroy()


def _flat_params(engine) -> torch.Tensor:
    with ds.gathered_for_generation(engine) as model:
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_engine_is_zero3_and_steps_change_parameters(make_trainer):
    trainer = make_trainer()
    assert trainer.engine.zero_optimization_stage() == 3
    before = _flat_params(trainer.engine)
    records = [run_step(trainer, step) for step in (1, 2, 3)]
    after = _flat_params(trainer.engine)
    assert not torch.equal(before, after)
    for record in records:
        assert all(v is None or not isinstance(v, float) or torch.isfinite(torch.tensor(v)) for v in record.values())
        assert record["gen_seconds"] > 0 and record["train_seconds"] > 0
        assert 0 <= record["reward_mean"] <= 1
    # gathering for generation restores the ZeRO-3 hooks: a further step still trains
    run_step(trainer, 4)
    assert not torch.equal(after, _flat_params(trainer.engine))


def _fixed_rollout(trainer) -> Rollout:
    """Real prompts with two easily told-apart kinds of finished response: 'correct' and 'incorrect' ones."""
    prompts = [trainer.prompt_ids[i] for i in range(4) for _ in range(trainer.train.group_size)]
    n, eos = len(prompts), trainer.tokenizer.eos_token_id
    texts = ["The answer is \\boxed{7}.", "I am not sure, maybe a dog."]
    responses = [trainer.tokenizer(texts[i % 2], add_special_tokens=False)["input_ids"] + [eos] for i in range(n)]
    rewards = torch.tensor([float(i % 2 == 0) for i in range(n)])  # both classes in every group
    return Rollout(prompts, responses, torch.ones(n, dtype=torch.bool), rewards, torch.zeros(n), {},
                   torch.ones(n, dtype=torch.bool))


def _z_c_logprobs(trainer, rollout) -> torch.Tensor:
    batch = collate(rollout.prompts, rollout.responses, rollout.finished.tolist(), trainer.config.z_c_id,
                    trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        return policy_forward(trainer.engine, batch)[1]


def test_mse_alone_moves_scores_toward_rewards(make_trainer, repo_cache):
    params = _params(repo_cache, lr=3e-3)
    params = replace(params, self_reward=replace(params.self_reward, alpha=1.0))
    trainer = make_trainer(params)
    rollout = _fixed_rollout(trainer)
    # c_ref set so that every score starts near 0.5: both classes have room to move toward their target
    c_ref = float(_z_c_logprobs(trainer, rollout).mean()) - 5.0
    trainer.config = replace(trainer.config, c_ref=c_ref)
    zero_advantages = torch.zeros(len(rollout.responses))  # the policy-gradient term contributes no gradient
    correct = rollout.rewards > 0.5
    first = self_reward_score(_z_c_logprobs(trainer, rollout), c_ref, 0.1)
    mse = [trainer.train_on(rollout, zero_advantages, Phase(True, False))["self_reward_mse"] for _ in range(8)]
    last = self_reward_score(_z_c_logprobs(trainer, rollout), c_ref, 0.1)
    assert mse[-1] < 0.5 * mse[0], mse
    assert (1 - last[correct]).abs().mean() < 0.7 * (1 - first[correct]).abs().mean()
    assert last[~correct].abs().mean() < 0.7 * first[~correct].abs().mean()


def test_grpo_only_and_laser_differ_by_alpha_mse(make_trainer, repo_cache):
    laser_params = _params(repo_cache)
    baseline_params = replace(laser_params, self_reward=replace(laser_params.self_reward, enabled=False))
    trainer = make_trainer(laser_params)
    rollout = _fixed_rollout(trainer)
    batch = collate(rollout.prompts, rollout.responses, rollout.finished.tolist(), trainer.config.z_c_id,
                    trainer.tokenizer.pad_token_id)
    advantages = torch.linspace(-1, 1, len(rollout.responses))
    counts = {"num_tokens": float(batch.response_mask.sum()), **trainer._step_class_counts(batch, rollout.rewards)}
    laser_loss, metrics = trainer._micro_loss(batch, rollout.rewards, advantages, None, Phase(True, True), counts)
    trainer.params = baseline_params
    grpo_loss, _ = trainer._micro_loss(batch, rollout.rewards, advantages, None, Phase(True, True), counts)
    assert metrics["self_reward_mse"] > 0
    assert laser_loss.item() - grpo_loss.item() == pytest.approx(0.1 * metrics["self_reward_mse"], rel=1e-6)


def test_an_unjudged_sample_gets_no_advantage_and_leaves_the_self_reward_loss(make_trainer):
    """A verifier timeout/error is no verdict: its reward 0 must not drive the policy or teach the score."""
    trainer = make_trainer()
    rollout = _fixed_rollout(trainer)  # groups of 4 with rewards (1, 0, 1, 0)
    k = trainer.train.group_size
    judged_all, _ = trainer.advantages(rollout, Phase(True, True))
    rollout.judged[1] = False
    advantages, metrics = trainer.advantages(rollout, Phase(True, True))
    # group 0 is judged on (1, 1, 0): the unjudged sample has 0, the others their advantage among the three
    expected = grpo_advantages(torch.tensor([1.0, 1.0, 0.0]), 3, trainer.train.adv_eps)[0]
    assert advantages[[0, 2, 3]].tolist() == pytest.approx(expected.tolist()) and advantages[1] == 0
    assert torch.equal(advantages[k:], judged_all[k:])
    assert metrics["unjudged_frac"] == 1 / len(rollout.judged)
    has_slot = trainer.policy_batch(rollout).has_slot
    assert not has_slot[1] and has_slot[[0, *range(2, len(has_slot))]].all()


def test_gradient_checkpointing_changes_memory_not_maths(make_trainer, repo_cache):
    """train.gradient_checkpointing recomputes layers in backward: the same losses and the same update, and no
    deprecation warning from transformers at start-up (the main job's log stays clean)."""
    import warnings

    results = []
    for checkpointing in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            trainer = make_trainer(gradient_checkpointing=checkpointing)
        assert trainer.engine.module.causal_lm.is_activation_checkpointing is checkpointing
        _run_rows_whole(trainer)  # as checkpointing does: this test compares recomputing with not
        rollout = _fixed_rollout(trainer)
        metrics = trainer.train_on(rollout, torch.linspace(-1, 1, len(rollout.responses)), Phase(True, False))
        results.append((metrics, _flat_params(trainer.engine)))
    (plain, plain_weights), (recomputed, recomputed_weights) = results
    for key in ("pg_loss", "self_reward_mse", "grad_norm"):
        assert recomputed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(recomputed_weights, plain_weights, rtol=1e-5, atol=1e-7)


def _run_rows_whole(trainer) -> None:
    """The trainer's batches without prompt lengths: every row runs whole (the forward before prompt sharing)."""
    batch_of = trainer.policy_batch
    trainer.policy_batch = lambda rollout: replace(batch_of(rollout), prompt_length=None)


def _assert_same_update(weights, expected, lr):
    """Each weight within 1% of one optimizer step (lr) of the expected: AdamW's first step is g / (|g| + eps),
    so float rounding of a gradient entry near 1e-6 (summation order) moves its step by up to ~1% of lr; an
    update that differs in maths moves weights by whole steps."""
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-2 * lr)


def test_shared_prompt_forward_gives_the_losses_and_update_of_whole_rows(make_trainer):
    """On ZeRO-3, the rows of a group running their prompt once (laser.batch.PolicyModel._hidden_states) give
    the log-probs, losses, gradient norm and update of every row run whole (the forward before), to 1e-5."""
    results = []
    for shared in (True, False):
        trainer = make_trainer()
        rollout = _fixed_rollout(trainer)  # 4 prompts, 4 rows each
        if not shared:
            _run_rows_whole(trainer)
        batch = trainer.policy_batch(rollout)
        with torch.no_grad():
            token_logprobs, z_c_logprob, _ = policy_forward(trainer.engine, batch)
        metrics = trainer.train_on(rollout, torch.linspace(-1, 1, len(rollout.responses)), Phase(True, False))
        results.append((token_logprobs, z_c_logprob, metrics, _flat_params(trainer.engine)))
    (tokens, z_c, metrics, weights), (tokens_whole, z_c_whole, metrics_whole, weights_whole) = results
    torch.testing.assert_close(tokens, tokens_whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(z_c, z_c_whole, rtol=0, atol=1e-5)
    for key in ("pg_loss", "self_reward_mse", "grad_norm"):
        assert metrics[key] == pytest.approx(metrics_whole[key], rel=1e-5, abs=1e-7), key
    _assert_same_update(weights, weights_whole, trainer.train.lr)
    assert not torch.allclose(weights, _flat_params(make_trainer().engine))  # the step did move the weights


def _two_steps(trainer) -> torch.Tensor:
    rollout = _fixed_rollout(trainer)
    for _ in range(2):
        trainer.train_on(rollout, torch.linspace(-1, 1, len(rollout.responses)), Phase(True, False))
    return _flat_params(trainer.engine)


def test_fused_adamw_gives_the_update_of_the_reference_loop(make_trainer, monkeypatch):
    """train.optimizer adamw runs torch's fused AdamW kernel (one pass over the state): two ZeRO-3 steps give the
    weights that torch's reference single-tensor AdamW gives, to float rounding."""
    kernel_calls = []
    fused_kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: kernel_calls.append(1) or fused_kernel(*a, **k))
    fused = make_trainer()
    start = _flat_params(fused.engine)
    fused_weights = _two_steps(fused)
    assert len(kernel_calls) == 4  # 16 responses in mini-batches of 8: two optimizer steps per train_on

    build = ds.build_optimizer

    def reference_loop(model, train):
        optimizer = build(model, train)
        optimizer.param_groups[0]["fused"] = False  # before any state exists: torch's single-tensor path
        return optimizer

    monkeypatch.setattr(ds, "build_optimizer", reference_loop)
    loop_weights = _two_steps(make_trainer())
    assert len(kernel_calls) == 4
    assert not torch.equal(start, fused_weights)
    torch.testing.assert_close(fused_weights, loop_weights, rtol=1e-5, atol=1e-7)


def test_lr_schedule():
    train = TrainParams(steps=4, prompts_per_step=2, group_size=2, mini_batch_size=4, micro_batch_size=4,
                        warmup_steps=2, lr_schedule="linear")
    factor = ds.lr_lambda(train)
    assert [factor(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_code_digest_follows_the_loaded_sources(tmp_path, monkeypatch):
    import types

    from laser.runtime import code_digest

    source = tmp_path / "probe.py"
    source.write_text("x = 1\n")
    before = code_digest()
    probe = types.ModuleType("laser._digest_probe")
    probe.__file__ = str(source)
    monkeypatch.setitem(sys.modules, "laser._digest_probe", probe)
    with_probe = code_digest()
    source.write_text("x = 2\n")
    assert len({before, with_probe, code_digest()}) == 3  # a new module and an edited one both change it


def test_code_digest_counts_this_stage_when_it_runs_as_main(monkeypatch):
    """``python -m stages.train`` (as dvc.yaml runs it) loads this file as ``__main__``, not ``stages.train``."""
    import types

    import stages.train
    from laser.runtime import code_digest

    imported = code_digest()
    as_main = types.ModuleType("__main__")
    as_main.__file__ = stages.train.__file__
    monkeypatch.delitem(sys.modules, "stages.train")
    monkeypatch.setitem(sys.modules, "__main__", as_main)
    assert code_digest() == imported
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # e.g. an interactive session
    assert code_digest() != imported


def test_prune_checkpoints_keeps_the_newest_tags(tmp_path):
    from stages.train import prune_checkpoints

    for tag in ("step2", "step4", "step10", "step9", "stepx"):
        (tmp_path / tag).mkdir()
    (tmp_path / "latest").write_text("step10")
    assert prune_checkpoints(tmp_path, keep=2) == ["step2", "step4"]  # numeric order: step10 is the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step10", "step9", "stepx"]


def test_deepspeed_config_geometry_clipping_and_precision():
    train = TrainParams(prompts_per_step=4, group_size=4, mini_batch_size=16, micro_batch_size=4, grad_clip=None)
    config = ds.deepspeed_config(train, "auto", world_size=2)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["train_batch_size"] == 16 and config["zero_optimization"]["stage"] == 3
    assert config["gradient_clipping"] == 0.0  # null grad_clip: DeepSpeed's "off"
    # the reduce bucket (a whole fp32 gradient copy up to its size) stays far below the parameter count
    assert config["zero_optimization"]["reduce_bucket_size"] == ds.REDUCE_BUCKET_ELEMENTS < 10**8
    # DeepSpeed's memory-efficient linear only where weights are partitioned (more than one rank)
    assert config["zero_optimization"]["memory_efficient_linear"]
    assert not ds.deepspeed_config(train, "auto", world_size=1)["zero_optimization"]["memory_efficient_linear"]
    assert config["bf16"]["enabled"] == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert ds.deepspeed_config(replace(train, grad_clip=0.5), "bfloat16", 1)["bf16"]["enabled"]
    assert ds.deepspeed_config(replace(train, grad_clip=0.5), "bfloat16", 1)["gradient_clipping"] == 0.5


def test_compute_dtype_auto_picks_bf16_only_where_the_hardware_has_it(make_trainer, caplog):
    from laser.models import native_bf16, resolve_compute_dtype

    # this machine's answer, from oneDNN (CPU) or CUDA: AVX2-only CPUs emulate bf16 (measured 26x slower)
    assert resolve_compute_dtype("auto") == ("bfloat16" if native_bf16() else "float32")
    assert resolve_compute_dtype("float32") == "float32"
    with caplog.at_level("WARNING", logger="laser.models"):
        assert resolve_compute_dtype("bfloat16") == "bfloat16"  # as asked, never silently changed
    warned = any("autocast is emulated" in r.getMessage() for r in caplog.records)
    assert warned == (not native_bf16())
    trainer = make_trainer(compute_dtype="auto")  # the engine's forward runs the resolved dtype
    assert trainer.engine.module.compute_dtype == resolve_compute_dtype("auto")


# --------------------------------------------------------------------------------------- the stage, as a process


@pytest.fixture
def train_workdir(tmp_path, tiny_model_dir, repo_cache):
    """A work dir with params, a train parquet and a ref_constant JSON, ready for `python -m stages.train`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tokenizer = load_tokenizer(tiny_model_dir)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(_problems(tokenizer, 16)), tmp_path / "data" / "train.parquet")
    (tmp_path / "ref").mkdir()
    z_c = token_id(tokenizer, "<|z_c|>")
    (tmp_path / "ref" / "ref_constant.json").write_text(json.dumps({"selection": "fixed", "candidates": [
        {"token": "<|z_c|>", "token_id": z_c, "mean": C_REF, "std": 0.5, "min": C_REF - 1, "max": C_REF + 1}]}))
    params = {"paths": {"cache_dir": str(repo_cache)}, "model": {"name": "tiny-random"},
              "self_reward": {"token": "<|z_c|>"}, "generation": {"max_new_tokens": 40, "batch_size": 8},
              "train": {"steps": 6, "prompts_per_step": 2, "group_size": 4, "mini_batch_size": 4,
                        "micro_batch_size": 2, "lr": 1e-3, "checkpoint_every": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _steps(workdir: Path) -> dict[int, dict]:
    lines = (workdir / "train" / "laser" / "steps.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_stage_resumes_after_kill_with_identical_next_step(train_workdir, tmp_path_factory):
    import shutil

    uninterrupted = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(train_workdir, uninterrupted, dirs_exist_ok=True)
    cmd = [sys.executable, "-m", "stages.train", "--variant", "laser"]
    subprocess.run(cmd, cwd=uninterrupted, env=stage_env(), check=True, capture_output=True)
    reference = _steps(uninterrupted)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    exported = uninterrupted / "models" / "laser"
    assert (exported / "model.safetensors").exists() and (exported / "laser.json").exists()
    assert json.loads((exported / "config.json").read_text())["laser"]["c_ref"] == C_REF
    assert "laser.load(" in (exported / "README.md").read_text()
    completions = (uninterrupted / "train" / "laser" / "completions.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["step"] for line in completions}) == [1, 2, 3, 4, 5, 6]
    assert (uninterrupted / "logs" / "train-laser.log").exists()
    assert json.loads((exported / "laser.json").read_text())["c_ref"] == C_REF
    kept = [p.name for p in (uninterrupted / "checkpoints" / "laser").glob("step*")]
    assert kept and len(kept) <= TrainParams().keep_checkpoints and "step6" in kept  # older ones were pruned

    proc = subprocess.Popen(cmd, cwd=train_workdir, env=stage_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = train_workdir / "checkpoints" / "laser" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() in ("step2", "step3"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    assert not (train_workdir / "models" / "laser").exists()  # no half-written export

    resumed = subprocess.run(cmd, cwd=train_workdir, env=stage_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from checkpoint at step {killed_at}" in resumed.stdout
    after = _steps(train_workdir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    for step in range(killed_at + 1, 7):
        for key in ("pg_loss", "self_reward_mse", "reward_mean", "response_length"):
            assert after[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_processes(train_workdir, launcher):
    params = yaml.safe_load((train_workdir / "params.yaml").read_text())
    params["train"].update(steps=2, checkpoint_every=2)
    (train_workdir / "params.yaml").write_text(yaml.safe_dump(params))
    port = str(ds._free_port())  # port 0 hangs the static rendezvous
    cmd = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", port, "-m", "stages.train", "--variant", "laser"],
           # the deepspeed launcher appends --local_rank=N to the stage's arguments
           "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                         "--master_port", port, "--module", "stages.train", "--variant", "laser"]}[launcher]
    done = subprocess.run(cmd, cwd=train_workdir, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = _steps(train_workdir)
    assert sorted(steps) == [1, 2]
    assert all(r["world_size"] == 2 for r in steps.values())
    # metrics cover both ranks' samples: 2 prompts x 4 samples, each rank generating one group
    assert all(0 <= r["reward_mean"] <= 1 for r in steps.values())
    assert (train_workdir / "models" / "laser" / "model.safetensors").exists()
    # DeepSpeed's launcher turns on its /dev/shm all-reduce; its per-rank segments are gone after the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_checkpoint_dir_resumes_only_the_same_run_up_to_its_steps(tmp_path):
    from stages.train import prepare_checkpoint_dir

    ckpt, log = tmp_path / "ckpt", tmp_path / "steps.jsonl"
    assert prepare_checkpoint_dir(ckpt, log, "run-a", steps=8) is False  # nothing yet: marks the dir as run-a's
    (ckpt / "latest").write_text("step4")
    log.write_text("{}\n")
    assert prepare_checkpoint_dir(ckpt, log, "run-a", steps=8) is True  # same run, longer: resume
    assert prepare_checkpoint_dir(ckpt, log, "run-a", steps=4) is True
    assert prepare_checkpoint_dir(ckpt, log, "run-a", steps=3) is False  # made shorter: the checkpoint is past it
    assert not (ckpt / "latest").exists() and not log.exists()
    (ckpt / "latest").write_text("step2")
    assert prepare_checkpoint_dir(ckpt, log, "run-b", steps=8) is False  # other params, data or code: start over
    assert not (ckpt / "latest").exists()


def test_step_log_self_verification_counts_judged_samples_only():
    from laser.trainer import rollout_metrics

    rollout = Rollout([[1]] * 4, [[2, 3]] * 4, torch.ones(4, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0, 0.0]),
                      torch.tensor([0.9, 0.2, 0.3, 0.8]), {"timeout": 1}, torch.tensor([True, True, True, False]))
    m = rollout_metrics(rollout)
    assert (m["sv_acc_correct"], m["sv_acc_incorrect"]) == (0.5, 1.0)  # 0.8 on the unjudged one is not checked
    assert m["sv_f1"] == pytest.approx(2 / 3)
    assert m["score_mean_incorrect"] == pytest.approx(0.2) and m["score_mean_correct"] == pytest.approx(0.6)
    # the unjudged sample has no reward (its 0.0 is a placeholder): counted, not averaged in as wrong
    assert m["verify_timeouts"] == 1 and m["reward_mean"] == pytest.approx(2 / 3)
    assert m["sv_auroc"] == 1.0  # both correct scores (0.9, 0.3) above the judged incorrect one (0.2)
    unjudged = Rollout([[1]] * 2, [[2, 3]] * 2, torch.ones(2, dtype=torch.bool), torch.zeros(2), torch.zeros(2),
                       {"error": 2}, torch.zeros(2, dtype=torch.bool))
    assert rollout_metrics(unjudged)["reward_mean"] is None and rollout_metrics(unjudged)["verify_errors"] == 2


def test_final_metrics_total_the_unjudged_samples(tmp_path):
    from stages.train import final_metrics

    log = tmp_path / "steps.jsonl"
    records = [{"step": s, "reward_mean": r, "gen_seconds": 1.0, "train_seconds": 2.0, "verify_timeouts": t,
                "verify_errors": e} for s, r, t, e in ((1, 0.5, 1, 0), (2, None, 0, 2), (3, 0.75, 0, 0))]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    m = final_metrics(log)
    assert m["verify_timeouts_total"] == 1 and m["verify_errors_total"] == 2
    assert m["final_reward_mean"] == 0.75 and m["train_seconds_total"] == 6.0


def test_step_log_self_verification_leaves_truncated_samples_out():
    """The official metric scores finished samples only; before, a truncated one counted as score 0 (verified
    incorrect), which flattered acc_incorrect."""
    from laser.trainer import rollout_metrics

    finished = torch.tensor([True, True, False, False])
    rollout = Rollout([[1]] * 4, [[2, 3]] * 4, finished, torch.tensor([1.0, 0.0, 0.0, 1.0]),
                      torch.tensor([0.9, 0.7, 0.0, 0.0]), {}, torch.ones(4, dtype=torch.bool))
    m = rollout_metrics(rollout)
    assert (m["sv_acc_correct"], m["sv_acc_incorrect"], m["sv_f1"]) == (1.0, 0.0, 0.0)


def test_class_counts_are_taken_once_per_step_over_all_mini_batches(make_trainer, repo_cache):
    """Two mini-batches with different class balance: the self-reward loss weights each sample with the step's
    N_c, N_i (as the paper and the official code), so the mini-batch losses add up to the step's class-weighted
    MSE. With per-mini-batch counts (before) they did not."""
    from laser.losses import self_reward_mse_loss

    trainer = make_trainer(lr=1e-12)  # parameters practically fixed: both mini-batches see the same model
    rollout = _fixed_rollout(trainer)
    assert len(rollout.responses) == 2 * trainer.train.mini_batch_size
    rollout.rewards = torch.tensor([1.0] * 7 + [0.0] + [1.0] + [0.0] * 7)  # 7:1, then 1:7
    z_c = _z_c_logprobs(trainer, rollout)
    expected, _ = self_reward_mse_loss(z_c, rollout.rewards, rollout.finished, trainer.config.c_ref, 0.1)
    got = trainer.train_on(rollout, torch.zeros(len(rollout.rewards)), Phase(True, False))["self_reward_mse"]
    assert got == pytest.approx(expected.item(), rel=1e-4)


def test_self_reward_advantages_are_normalised_even_without_std_scaling(make_trainer):
    """scale_adv_by_std: false is Dr. GRPO for A_v only; the official code always divides A_s by its group std."""
    from laser.advantages import integrate_advantages, self_reward_advantages

    trainer = make_trainer(scale_adv_by_std=False)
    rollout = _fixed_rollout(trainer)
    rollout.old_scores = torch.linspace(0.0, 1.0, len(rollout.rewards))
    advantages, _ = trainer.advantages(rollout, Phase(True, True))
    a_v, _ = grpo_advantages(rollout.rewards, 4, trainer.train.adv_eps, scale_by_std=False)
    a_s, std = self_reward_advantages(rollout.old_scores, rollout.finished, 4, trainer.train.adv_eps)
    expected, _ = integrate_advantages(a_v, a_s, std, 0.1, 0.1)
    assert advantages.tolist() == pytest.approx(expected.tolist())
    assert a_s.view(-1, 4).std(dim=1).tolist() == pytest.approx([1.0] * 4, rel=1e-4)


def test_grpo_only_step_logs_no_self_reward_mse(make_trainer, repo_cache):
    params = _params(repo_cache)
    trainer = make_trainer(replace(params, self_reward=replace(params.self_reward, enabled=False)))
    record = run_step(trainer, 1)
    assert record["self_reward_mse"] is None and record["self_reward_loss_on"] is False


def test_a_checkpoint_of_another_world_size_is_not_resumed(tmp_path):
    """DeepSpeed cannot load ZeRO shards of 2 processes into 1 (it raised ZeRORuntimeException, exit 1, retried
    by the flow): the world size is part of the fingerprint, so the run starts over."""
    from stages.train import fingerprint

    data = tmp_path / "train.parquet"
    data.write_bytes(b"rows")
    params = build(Params, {})
    config = SelfRewardConfig("<z>", 7, -20.0, 0.1)
    assert fingerprint(params, data, config, 1) == fingerprint(params, data, config, 1)
    assert fingerprint(params, data, config, 1) != fingerprint(params, data, config, 2)
