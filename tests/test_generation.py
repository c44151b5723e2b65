"""Model resolution and the rollout engine: z_c log-probs from the generation pass equal a full forward."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from laser.batch import collate, policy_forward
from laser.errors import ModelError, StageError
from laser.generation import HFGenerator, Sampling, full_forward_probe_logprobs, left_pad, sample_next_token
from laser.models import load_model, load_tokenizer, resolve_model_dir, token_id, z_c_candidates
from laser.runtime import choose_z_c, self_reward_config


def _chat_prompts(tokenizer, questions):
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                    add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for q in questions]


def _assert_probe_equivalence(model, completions, probe_ids, atol):
    finished = [c for c in completions if c.finish_reason == "eos"]
    assert finished, "no finished sample: the equivalence would be vacuous"
    for c in finished:
        reference = full_forward_probe_logprobs(model, c.prompt_token_ids, c.response_token_ids, probe_ids)
        assert list(c.probe_logprobs) == list(probe_ids)  # named by token id, in the order asked
        assert list(c.probe_logprobs.values()) == pytest.approx(reference, abs=atol)
    for c in completions:
        if c.finish_reason == "length":
            assert c.probe_logprobs is None


def test_tiny_model_probe_logprobs_equal_full_forward(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    probe_ids = [token_id(tokenizer, "<|z_c|>"), token_id(tokenizer, "<|z_i|>")]
    # prompts of very different lengths, so left padding and per-row positions are exercised
    prompts = _chat_prompts(tokenizer, ["What is 1 + 2?", "What is 7 + 8? Think about it carefully first.", "Hi"])
    completions = HFGenerator(model, tokenizer, batch_size=5).generate(
        prompts, 4, Sampling(temperature=1.0, max_new_tokens=40, seed=3), probe_token_ids=probe_ids)
    assert len(completions) == 12
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(p, k) for p in range(3) for k in range(4)]
    _assert_probe_equivalence(model, completions, probe_ids, atol=1e-4)
    for c in completions:
        assert c.response_token_ids and len(c.response_token_ids) <= 40
        assert (c.response_token_ids[-1] == tokenizer.eos_token_id) == (c.finish_reason == "eos")


def test_generation_is_seeded_and_probes_do_not_change_samples(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    prompts = _chat_prompts(tokenizer, ["What is 2 + 2?", "What is 5 + 1?"])
    generator = HFGenerator(model, tokenizer, batch_size=3)
    sampling = Sampling(temperature=1.0, max_new_tokens=24, seed=11)
    with_probe = generator.generate(prompts, 3, sampling, probe_token_ids=[token_id(tokenizer, "<|z_c|>")])
    without = generator.generate(prompts, 3, sampling)
    again = generator.generate(prompts, 3, sampling)
    assert [c.response_token_ids for c in with_probe] == [c.response_token_ids for c in without]
    assert [c.response_token_ids for c in without] == [c.response_token_ids for c in again]
    other_seed = generator.generate(prompts, 3, Sampling(temperature=1.0, max_new_tokens=24, seed=12))
    assert [c.response_token_ids for c in other_seed] != [c.response_token_ids for c in without]


def test_shared_prefill_changes_the_work_not_the_samples(tiny_model_dir):
    """The prompts' common prefix is prefilled once per call and each prompt once for all its samples: the same
    tokens and probe log-probs as prefilling every sample's whole prompt, for a fraction of the prompt tokens."""
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    few_shot = "Answer in \\boxed{}. Example: what is 2 + 2? 2 + 2 = 4, so \\boxed{4}. Now: "
    prompts = _chat_prompts(tokenizer, [few_shot + q for q in ("What is 1 + 2?", "What is 30 + 12?", "And 5 - 5?")])
    probe_ids = [token_id(tokenizer, "<|z_c|>")]
    fed = []  # prompt tokens fed (prefill calls: more than one position per row), padding included
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: fed.append(kw["input_ids"].numel()) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    sampling = Sampling(temperature=1.0, max_new_tokens=30, seed=5)
    try:
        runs = {}
        for share in (True, False):
            fed.clear()
            runs[share] = (HFGenerator(model, tokenizer, batch_size=4, share_prefill=share).generate(
                prompts, 4, sampling, probe_token_ids=probe_ids), sum(fed))
    finally:
        hook.remove()
    (shared, shared_fed), (whole, whole_fed) = runs[True], runs[False]
    assert [c.response_token_ids for c in shared] == [c.response_token_ids for c in whole]
    for a, b in zip(shared, whole):
        assert (a.probe_logprobs is None) == (b.probe_logprobs is None)
        if a.probe_logprobs is not None:
            assert a.probe_logprobs[probe_ids[0]] == pytest.approx(b.probe_logprobs[probe_ids[0]], abs=1e-4)
    assert whole_fed >= 4 * sum(len(p) for p in prompts)  # every sample its whole prompt
    assert shared_fed * 4 < whole_fed  # the prefix once, each prompt's own tokens once per admission
    _assert_probe_equivalence(model, shared, probe_ids, atol=1e-4)


def test_truncated_samples_have_no_probe(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    completions = HFGenerator(model, tokenizer).generate(
        _chat_prompts(tokenizer, ["What is 1 + 1?"]), 3, Sampling(max_new_tokens=2, seed=0), probe_token_ids=[5])
    assert all(c.finish_reason == "length" and c.probe_logprobs is None for c in completions)
    assert all(len(c.response_token_ids) == 2 for c in completions)


def test_sampling_helpers():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sample_next_token(logits, 0.0, 1.0, None).tolist() == [1, 0]
    # top_p = 0.5 keeps only the top token (its probability alone crosses 0.5)
    rng = torch.Generator().manual_seed(0)
    draws = {tuple(sample_next_token(logits, 1.0, 0.5, rng).tolist()) for _ in range(20)}
    assert draws == {(1, 0)}


def test_model_resolution_errors(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        resolve_model_dir(str(empty), tmp_path)
    with pytest.raises(ModelError, match="not a directory, not a built-in"):
        resolve_model_dir("./missing/model/dir", tmp_path)


def test_token_lookup(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert token_id(tokenizer, "<|z_c|>") == tokenizer.convert_tokens_to_ids("<|z_c|>")
    with pytest.raises(ModelError, match="not a single token"):
        token_id(tokenizer, "<|no_such_token|>")
    candidates = z_c_candidates(tokenizer)
    assert "<|z_c|>" in candidates and tokenizer.eos_token not in candidates
    assert "<|im_start|>" not in candidates  # used by the chat template
    from stages.ref_constant import candidate_tokens

    assert "<|z_i|>" in candidates  # ...but `auto` never picks the SFT ablation's incorrect token as z_c:
    assert candidate_tokens(tokenizer, "auto", "<|z_i|>") == [t for t in candidates if t != "<|z_i|>"]
    assert candidate_tokens(tokenizer, "<|z_c|>", "<|z_i|>") == ["<|z_c|>"]
    for taken in (tokenizer.eos_token, "<|z_i|>"):  # a named z_c may not be EOS (or PAD, ...) nor z_i
        with pytest.raises(StageError, match="z_c must be a token"):
            candidate_tokens(tokenizer, taken, "<|z_i|>")


@pytest.mark.slow
def test_smollm2_builtin_probe_logprobs_equal_full_forward(repo_cache):
    model_dir = resolve_model_dir("smollm2-135m-instruct", repo_cache)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    probe_ids = [5, token_id(tokenizer, "<|endoftext|>")]
    prompts = _chat_prompts(tokenizer, ["What is 3 + 4? Put the answer in \\boxed{}.", "Say hello."])
    completions = HFGenerator(model, tokenizer, batch_size=4).generate(
        prompts, 2, Sampling(temperature=1.0, max_new_tokens=48, seed=0), probe_token_ids=probe_ids)
    _assert_probe_equivalence(model, completions, probe_ids, atol=1e-4)


def test_hub_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"could not be downloaded.*built-in"):
        resolve_model_dir("some-org/some-model-that-does-not-exist", tmp_path)
    with pytest.raises(ModelError, match=r"could not be downloaded"):  # a dotted name is a hub id (Qwen2.5-Math-7B)
        resolve_model_dir("some-org/no-such-model-2.5-Math-7B", tmp_path)
    for not_hub in ("/abs/missing", "a/b/c", "no-slash"):
        with pytest.raises(ModelError, match="not a directory, not a built-in"):
            resolve_model_dir(not_hub, tmp_path)


def test_model_cache_write_is_atomic_under_a_race(tmp_path):
    import threading
    import time

    from laser.models import _cached

    builds = []

    def slow_build(out_dir):
        builds.append(out_dir)
        (out_dir / "weights.bin").write_bytes(b"x" * 1000)
        time.sleep(0.2)  # both racers are inside their build at once
        (out_dir / "config.json").write_text("{}")

    target = tmp_path / "models" / "m"
    results = []
    threads = [threading.Thread(target=lambda: results.append(_cached(target, slow_build))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target] and len(builds) == 2
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # no temp dir left behind

    def failing_build(out_dir):
        (out_dir / "partial").write_text("half")
        raise RuntimeError("crash mid-build")

    with pytest.raises(RuntimeError):
        _cached(tmp_path / "models" / "broken", failing_build)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_ref_constant_auto_picks_the_steadiest_candidate(tiny_model_dir, repo_cache):
    from laser.config import Params, build
    from stages.ref_constant import ref_constant

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    params = build(Params, {"paths": {"cache_dir": str(repo_cache)}, "self_reward": {"token": "auto"},
                            "generation": {"max_new_tokens": 40}, "ref_constant": {"num_prompts": 3,
                                                                                    "samples_per_prompt": 3}})
    problems = [{"id": str(i), "answer": str(i), "prompt": tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {i} + 1?"}], tokenize=False, add_generation_prompt=True)}
        for i in range(5)]
    summary, plot = ref_constant(params, HFGenerator(model, tokenizer), tokenizer, problems)
    stds = {c["token"]: c["std"] for c in summary["candidates"]}
    assert set(stds) == set(z_c_candidates(tokenizer)) and summary["selection"] == "auto"
    assert "beta_v" not in json.dumps(summary)  # the reference statistics do not depend on beta_v
    assert len(plot) == summary["n"] * len(stds) and summary["n"] > 0
    for candidate in summary["candidates"]:
        values = [row["logprob"] for row in plot if row["token"] == candidate["token"]]
        assert candidate["mean"] == pytest.approx(sum(values) / len(values))
    # the choice, where beta_v is known: the steadiest candidate that leaves room for a score of 1
    config, _warning = self_reward_config(params, summary)
    roomy = {c["token"]: c["std"] for c in summary["candidates"] if c["mean"] + 10 <= -1.0}
    assert config.z_c_token == min(roomy, key=roomy.get)
    assert config.c_ref == next(c["mean"] for c in summary["candidates"] if c["token"] == config.z_c_token)
    assert config.beta_v == 0.1 and config.kind == "mse"


def test_training_logprobs_follow_the_sampling_temperature_and_z_c_does_not(tiny_model_dir):
    """policy_forward at T: response log-probs of softmax(logits / T) (a per-row loop reference), while z_c and z_i
    stay at temperature 1 and equal the rollout engine's scores."""
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    z_c, z_i = token_id(tokenizer, "<|z_c|>"), token_id(tokenizer, "<|z_i|>")
    prompts = _chat_prompts(tokenizer, ["What is 1 + 2?", "What is 7 + 8? Think first."])
    completions = HFGenerator(model, tokenizer, batch_size=4).generate(
        prompts, 3, Sampling(temperature=0.7, max_new_tokens=30, seed=5), probe_token_ids=[z_c, z_i])
    finished = [c.finish_reason == "eos" for c in completions]
    assert any(finished)
    batch = collate([c.prompt_token_ids for c in completions], [c.response_token_ids for c in completions],
                    finished, z_c, tokenizer.pad_token_id)
    with torch.no_grad():
        hot, z_c_hot, z_i_hot = policy_forward(model, batch, z_i, temperature=0.7)
        cold, z_c_cold, z_i_cold = policy_forward(model, batch, z_i, temperature=1.0)
    assert torch.allclose(z_c_hot, z_c_cold, atol=1e-5) and torch.allclose(z_i_hot, z_i_cold, atol=1e-5)
    assert not torch.allclose(hot[batch.response_mask], cold[batch.response_mask], atol=1e-3)
    for r, c in enumerate(completions):
        ids = list(c.prompt_token_ids) + list(c.response_token_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        start = len(c.prompt_token_ids)
        expected = [torch.log_softmax(logits[t - 1] / 0.7, dim=-1)[ids[t]].item() for t in range(start, len(ids))]
        assert hot[r, start:len(ids)].tolist() == pytest.approx(expected, abs=1e-4)
        if c.finish_reason == "eos":
            assert [z_c_hot[r].item(), z_i_hot[r].item()] == pytest.approx([c.probe_logprobs[z_c],
                                                                           c.probe_logprobs[z_i]], abs=1e-4)
        else:
            assert z_c_hot[r].item() == 0.0


def _candidate(token: str, mean: float, std: float) -> dict:
    return {"token": token, "token_id": 0, "mean": mean, "std": std, "min": mean, "max": mean}


def test_auto_z_c_skips_a_steady_but_likely_token():
    """A likely token (log-prob near 0) is steady, so std alone picked it; yet with c_ref = -2 a score of 1 needs
    log π(z_c) = 8 > 0 at β_v = 0.1: no correct answer could reach its target."""
    stats = [_candidate("likely", -2.0, 0.1), _candidate("rare", -25.0, 0.8), _candidate("rarer", -30.0, 1.5)]
    assert choose_z_c(stats, beta_v=0.1, margin=1.0, auto=True) == 1
    assert choose_z_c(stats, beta_v=1.0, margin=1.0, auto=True) == 0  # at β_v = 1 a score of 1 needs -1: room


def test_named_z_c_without_room_for_a_score_of_1_is_an_error_naming_the_fix():
    from laser.errors import StageError

    with pytest.raises(StageError, match=r"'likely'.*c_ref = -5.00.*raise self_reward.beta_v to at least 0.25"):
        choose_z_c([_candidate("likely", -5.0, 0.1)], beta_v=0.1, margin=1.0, auto=False)
    with pytest.raises(StageError, match=r"none of the 1 candidates.*name a rarer token"):
        choose_z_c([_candidate("likely", -0.5, 0.1)], beta_v=0.1, margin=1.0, auto=True)


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 1024), (1.0, 3), (0.7, 5)])
def test_lean_head_equals_the_full_logits_forward_in_values_and_gradients(tiny_model_dir, temperature, chunk):
    """The LM head on response positions and the slot only (chunked, recomputed in backward when chunked) gives
    the full-logits forward's log-probs, z_c and z_i log-probs (to 1e-5) and parameter gradients (to 1e-5 of each
    gradient's largest entry)."""
    from laser.batch import PolicyModel, full_logits_forward

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    z_c, z_i = token_id(tokenizer, "<|z_c|>"), token_id(tokenizer, "<|z_i|>")
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("7 - 1 =")]
    responses = [[*tokenizer.encode(" 5."), tokenizer.eos_token_id], tokenizer.encode(" six, I think")]
    batch = collate(prompts * 2, responses * 2, [True, False, True, True], z_c, tokenizer.pad_token_id)

    def loss_and_grads(forward):
        model.zero_grad()
        tokens, z_c_lp, z_i_lp = forward()
        mask = batch.response_mask
        loss = (tokens * mask).sum() + 0.5 * (z_c_lp * batch.has_slot).sum() + 0.25 * z_i_lp.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return tokens * mask, z_c_lp, z_i_lp, grads

    lean = loss_and_grads(lambda: policy_forward(PolicyModel(model, logits_chunk=chunk), batch, z_i, temperature))
    full = loss_and_grads(lambda: full_logits_forward(model, batch, z_i, temperature))
    for a, b in zip(lean[:3], full[:3]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert set(lean[3]) == set(full[3])
    for name in full[3]:
        # relative to the gradient's scale (up to ~130 on the embeddings): float32 summation order, not maths
        scale = max(1.0, float(full[3][name].abs().max()))
        assert float((lean[3][name] - full[3][name]).abs().max()) <= 1e-5 * scale, name


def test_rows_sharing_a_prompt_run_it_once_with_the_same_values_and_gradients(tiny_model_dir):
    """Rows of one group share their prompt: it runs once (cached keys and values), each row its response on top.
    Log-probs, z_c / z_i log-probs and gradients equal running every row whole (to 1e-5); far fewer positions
    go through the decoder; under gradient checkpointing (train mode) the rows run whole."""
    from laser.batch import PolicyModel

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    z_c, z_i = token_id(tokenizer, "<|z_c|>"), token_id(tokenizer, "<|z_i|>")
    long_prompt = tokenizer.encode("Answer in a box. Example: 2 + 2 = 4. Now: what is 12 + 30, and why?")
    prompts = [long_prompt] * 3 + [tokenizer.encode("7 - 1 =")] * 2
    responses = [[*tokenizer.encode(" 42."), tokenizer.eos_token_id], tokenizer.encode(" forty two, since"),
                 [tokenizer.eos_token_id], [*tokenizer.encode(" 6"), tokenizer.eos_token_id],
                 tokenizer.encode(" six, I think it is six")]
    batch = collate(prompts, responses, [True, False, True, True, False], z_c, tokenizer.pad_token_id)
    policy = PolicyModel(model)
    positions = []  # query positions through the decoder, per call
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: positions.append(kw["input_ids"].numel()), with_kwargs=True)

    def run(shared, temperature):
        model.zero_grad()
        positions.clear()
        tokens, z_c_lp, z_i_lp = policy_forward(policy, batch if shared else
                                                dataclasses.replace(batch, prompt_length=None), z_i, temperature)
        loss = (tokens * batch.response_mask).sum() + 0.5 * (z_c_lp * batch.has_slot).sum() + 0.25 * z_i_lp.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return tokens * batch.response_mask, z_c_lp, z_i_lp, grads, sum(positions)

    try:
        for temperature in (1.0, 0.7):
            shared, whole = run(True, temperature), run(False, temperature)
            for a, b in zip(shared[:3], whole[:3]):
                assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
            for name, grad in whole[3].items():
                assert float((shared[3][name] - grad).abs().max()) <= 1e-5 * max(1.0, float(grad.abs().max())), name
            assert whole[4] == batch.input_ids.numel()
            assert shared[4] < 0.7 * whole[4], (shared[4], whole[4])
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        policy.train()
        checkpointed = run(True, 1.0)
        assert checkpointed[4] == batch.input_ids.numel()  # whole rows: the recompute would write a cache twice
        assert torch.allclose(checkpointed[0], run(False, 1.0)[0], atol=1e-5)
    finally:
        hook.remove()


def test_prompt_once_path_has_a_fixed_shape_across_ranks_and_is_off_for_sliding_windows(tiny_model_dir, monkeypatch):
    """With more than one rank every rank must make the same decoder calls (ZeRO-3 gathers weights per call):
    rows whose prompts are all distinct still take the prompt-once path there (two calls), with the values of
    whole rows; in a world of one they run whole (one call). Sliding-window models always run rows whole, and
    an empty prompt is a clear error."""
    from laser.batch import PolicyModel

    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    z_c = token_id(tokenizer, "<|z_c|>")
    prompts = [tokenizer.encode("What is 2 + 3?"), tokenizer.encode("And 7 - 1, then?")]
    responses = [[*tokenizer.encode(" 5."), tokenizer.eos_token_id], tokenizer.encode(" six")]
    batch = collate(prompts, responses, [True, False], z_c, tokenizer.pad_token_id)
    policy = PolicyModel(model)
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            whole = policy_forward(policy, batch)
            assert len(calls) == 1
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
            calls.clear()
            ranks = policy_forward(policy, batch)
            assert len(calls) == 2
    finally:
        hook.remove()
    for a, b in zip(ranks[:2], whole[:2]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    assert not PolicyModel(model).can_share_prompts and policy.can_share_prompts
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty prompt"):
        collate([prompts[0], []], responses, [True, True], z_c, tokenizer.pad_token_id)
