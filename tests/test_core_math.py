"""The LaSeR core math: hand-computed values, loop references vs vectorised code, and sharding equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from laser.advantages import grpo_advantages, integrate_advantages, self_reward_advantages
from laser.losses import class_weights, grpo_policy_loss, self_reward_mse_loss, self_reward_sft_loss
from laser.schedule import warmup_phase
from laser.score import (
    clip_score,
    read_z_c_logprob,
    self_reward_score,
    two_token_score,
    write_z_c,
    z_c_slot,
)

# ------------------------------------------------------------------------------------------------ score / z_c slot


def test_z_c_slot_hand_values():
    # row 0: prompt(2) + response(3) + pad(2): slot 5; row 1: truncated; row 2: response reaches the last column
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    finished = torch.tensor([True, False, True])
    slot, has_slot = z_c_slot(mask, finished)
    assert slot.tolist() == [5, 7, 7]
    assert has_slot.tolist() == [True, False, False]  # row 2 is finished but has no room: caller must pad


def test_z_c_slot_empty_response_has_no_slot():
    slot, has_slot = z_c_slot(torch.zeros(1, 4), torch.tensor([True]))
    assert slot.tolist() == [0] and has_slot.tolist() == [False]


def test_write_and_read_z_c():
    ids = torch.tensor([[10, 11, 12, 2, 0], [10, 11, 12, 13, 14]])
    slot, has_slot = torch.tensor([4, 5]), torch.tensor([True, False])
    written = write_z_c(ids, slot, has_slot, z_c_id=99)
    assert written.tolist() == [[10, 11, 12, 2, 99], [10, 11, 12, 13, 14]]
    assert ids[0, 4] == 0  # input untouched
    token_logprobs = torch.tensor([[0.0, -1.0, -2.0, -3.0, -23.5], [0.0, -1.0, -2.0, -3.0, -4.0]])
    assert read_z_c_logprob(token_logprobs, slot, has_slot).tolist() == [-23.5, 0.0]


def test_score_hand_values():
    z_c_logprob = torch.tensor([-23.0, -18.0, -30.0, -13.0])
    score = self_reward_score(z_c_logprob, c_ref=-23.0, beta_v=0.1)
    assert torch.allclose(score, torch.tensor([0.0, 0.5, -0.7, 1.0]))
    assert torch.allclose(clip_score(torch.tensor([-0.7, 0.3, 1.4])), torch.tensor([0.0, 0.3, 1.0]))
    assert two_token_score(torch.tensor([math.log(0.3)]), torch.tensor([math.log(0.1)])).item() == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------------- GRPO loss


def test_grpo_loss_hand_values():
    # one response of 2 tokens, A=+1: token ratios 1.5 (clipped at 1.28) and 0.5 (unclipped, min picks 0.5).
    logprobs = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    loss, metrics = grpo_policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 2), 0.2, 0.28)
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    # A=-1: ratio 1.5 -> max(-(-1)*1.5, 1.28) = 1.5 ; ratio 0.5 -> clip at 0.8 -> max(0.5, 0.8) = 0.8
    loss, _ = grpo_policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2), 0.2, 0.28)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2)


def test_grpo_loss_token_mean_over_batch_and_kl():
    logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = grpo_policy_loss(logprobs, logprobs, torch.tensor([1.0, -2.0]), mask)
    assert loss.item() == pytest.approx((-1 * 3 + 2 * 1) / 4)  # 4 tokens, not a mean of per-row means
    ref = torch.full((2, 3), math.log(2.0))  # k3 with delta = log 2: 2 - log2 - 1
    loss_kl, metrics = grpo_policy_loss(logprobs, logprobs, torch.zeros(2), mask, ref_logprobs=ref, kl_coef=0.5)
    assert metrics["kl"] == pytest.approx(1 - math.log(2.0))
    assert loss_kl.item() == pytest.approx(0.5 * (1 - math.log(2.0)))


def _grpo_loop_reference(logprobs, old, adv, mask, lo, hi, c=None):
    total, count = 0.0, 0
    for b in range(len(logprobs)):
        for t in range(len(logprobs[0])):
            if mask[b][t]:
                ratio = math.exp(min(max(logprobs[b][t] - old[b][t], -20.0), 20.0))
                clipped = min(max(ratio, 1 - lo), 1 + hi)
                loss = max(-adv[b] * ratio, -adv[b] * clipped)
                if c is not None and adv[b] < 0:
                    loss = min(loss, -adv[b] * c)
                total += loss
                count += 1
    return total / count


def test_dual_clip_bounds_a_negative_advantage_token():
    """log ρ = 5, A = -0.5: the plain clipped loss is e^5 · 0.5 = 74.2; the dual clip caps it at c·|A| = 1.5."""
    logprobs, old, mask = torch.tensor([[5.0]]), torch.zeros(1, 1), torch.ones(1, 1)
    plain, _ = grpo_policy_loss(logprobs, old, torch.tensor([-0.5]), mask, clip_ratio_c=None)
    assert plain.item() == pytest.approx(0.5 * math.exp(5))
    dual, metrics = grpo_policy_loss(logprobs, old, torch.tensor([-0.5]), mask, clip_ratio_c=3.0)
    assert dual.item() == pytest.approx(1.5) and metrics["dual_clip_frac"] == 1.0
    positive, _ = grpo_policy_loss(logprobs, old, torch.tensor([0.5]), mask, clip_ratio_c=3.0)
    assert positive.item() == pytest.approx(-0.5 * 1.28)  # A > 0: the ordinary clip, untouched


def test_huge_log_ratio_gives_a_finite_loss_and_gradient():
    logprobs = torch.tensor([[100.0, -100.0]], requires_grad=True)
    for adv in (1.0, -1.0):
        for c in (None, 3.0):
            loss, _ = grpo_policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([adv]), torch.ones(1, 2),
                                       clip_ratio_c=c)
            (grad,) = torch.autograd.grad(loss, logprobs)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (adv, c)


def _random_size(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=g))


@pytest.mark.parametrize("seed", range(8))
def test_grpo_loss_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    b, t = _random_size(g, 1, 9), _random_size(g, 1, 17)  # random shapes, seeded
    logprobs = -torch.rand(b, t, generator=g, dtype=torch.float64)
    old = logprobs + 1.5 * torch.randn(b, t, generator=g, dtype=torch.float64)  # some ratios > c
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    for c in (None, 3.0):
        loss, _ = grpo_policy_loss(logprobs, old, adv, mask, 0.2, 0.28, clip_ratio_c=c)
        ref = _grpo_loop_reference(logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, c)
        assert loss.item() == pytest.approx(ref, rel=1e-10)


# ------------------------------------------------------------------------------------------------ self-reward losses


def test_class_weights_hand_values_and_empty_class():
    correct = torch.tensor([True, False, False, False])
    incorrect = torch.tensor([False, True, True, False])
    weights, total = class_weights(correct, incorrect)
    assert total == 3
    assert weights.tolist() == pytest.approx([3 / 2, 3 / 4, 3 / 4, 0.0])  # w_c = 3/(2*1), w_i = 3/(2*2)
    weights, total = class_weights(correct, torch.zeros(4, dtype=torch.bool))
    assert total == 1 and weights.tolist() == pytest.approx([0.5, 0, 0, 0])  # empty class -> weight 0
    weights, total = class_weights(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    assert total == 0 and weights.tolist() == [0, 0, 0, 0]


def test_mse_hand_values():
    # c_ref=-23, beta=0.1; scores: 0.5 (correct), 0.2 (incorrect), 0.4 (incorrect), truncated row ignored.
    z_c_logprob = torch.tensor([-18.0, -21.0, -19.0, float("-inf")])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    finished = torch.tensor([True, True, True, False])
    loss, metrics = self_reward_mse_loss(z_c_logprob, rewards, finished, c_ref=-23.0, beta_v=0.1)
    # w_c = 3/2, w_i = 3/4: (1.5*0.25 + 0.75*0.04 + 0.75*0.16) / 3
    assert loss.item() == pytest.approx((1.5 * 0.25 + 0.75 * 0.04 + 0.75 * 0.16) / 3)
    assert metrics["num_correct"] == 1 and metrics["num_incorrect"] == 2
    assert metrics["self_reward_mse_unweighted"] == pytest.approx((0.25 + 0.04 + 0.16) / 3)


def test_mse_no_finished_is_zero_with_finite_grad():
    z = torch.tensor([float("-inf"), 3.0], requires_grad=True)
    loss, _ = self_reward_mse_loss(z, torch.tensor([1.0, 0.0]), torch.tensor([False, False]), -23.0, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def _mse_loop_reference(z, r, finished, c_ref, beta):
    n_c = sum(1 for j in range(len(z)) if finished[j] and r[j] == 1)
    n_i = sum(1 for j in range(len(z)) if finished[j] and r[j] == 0)
    total = 0.0
    for j in range(len(z)):
        if not finished[j]:
            continue
        w = (n_c + n_i) / (2 * n_c) if r[j] == 1 else (n_c + n_i) / (2 * n_i)
        total += w * (beta * (z[j] - c_ref) - r[j]) ** 2
    return total / max(n_c + n_i, 1)


@pytest.mark.parametrize("seed", range(8))
def test_mse_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = _random_size(g, 1, 33)
    z = -23 + 5 * torch.randn(n, generator=g, dtype=torch.float64)
    r = (torch.rand(n, generator=g) > 0.5).double()
    finished = torch.rand(n, generator=g) > 0.2
    loss, _ = self_reward_mse_loss(z, r, finished, -23.0, 0.1)
    assert loss.item() == pytest.approx(_mse_loop_reference(z.tolist(), r.tolist(), finished.tolist(), -23.0, 0.1))


def test_sft_hand_values():
    lp_c = torch.tensor([math.log(0.5), math.log(0.1), 0.0])
    lp_i = torch.tensor([math.log(0.2), math.log(0.4), 0.0])
    rewards = torch.tensor([1.0, 0.0, 1.0])
    finished = torch.tensor([True, True, False])
    loss, metrics = self_reward_sft_loss(lp_c, lp_i, rewards, finished)
    # one per class: w_c = w_i = 1; loss = -(log 0.5 + log 0.4) / 2
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.4)) / 2)
    assert metrics["num_correct"] == 1 and metrics["num_incorrect"] == 1


# --------------------------------------------------------------------------------------------------------- sharding


def test_sharded_losses_and_grads_equal_unsharded():
    g = torch.Generator().manual_seed(7)
    b, t = 8, 6
    logits_param = torch.randn(b, t, generator=g, dtype=torch.float64)
    z_param = -23 + 3 * torch.randn(b, generator=g, dtype=torch.float64)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.3
    rewards = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.float64)
    finished = torch.tensor([True, True, False, True, True, True, True, False])

    def total_loss(rows, num_tokens=None, num_correct=None, num_incorrect=None):
        lp = torch.nn.functional.logsigmoid(logits_param_var[rows])
        pg, _ = grpo_policy_loss(lp, old[rows], adv[rows], mask[rows], num_tokens=num_tokens)
        sr, _ = self_reward_mse_loss(z_var[rows], rewards[rows], finished[rows], -23.0, 0.1,
                                     num_correct=num_correct, num_incorrect=num_incorrect)
        return pg + 0.1 * sr

    logits_param_var = logits_param.clone().requires_grad_()
    z_var = z_param.clone().requires_grad_()
    full = total_loss(slice(None))
    full.backward()
    full_grads = (logits_param_var.grad.clone(), z_var.grad.clone())

    logits_param_var.grad, z_var.grad = None, None
    counts = {
        "num_tokens": float(mask.sum()),
        "num_correct": float((finished & (rewards == 1)).sum()),
        "num_incorrect": float((finished & (rewards == 0)).sum()),
    }
    shard_sum = sum(total_loss(rows, **counts) for rows in (slice(0, 4), slice(4, 8)))
    shard_sum.backward()
    assert shard_sum.item() == pytest.approx(full.item(), rel=1e-12)
    assert torch.allclose(logits_param_var.grad, full_grads[0])
    assert torch.allclose(z_var.grad, full_grads[1])


# ------------------------------------------------------------------------------------------------------- advantages


def test_grpo_advantages_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, metrics = grpo_advantages(rewards, group_size=4, eps=0.0)
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased std of (1, 0, 0, 0) = 0.5
    assert adv[:4].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    assert metrics["zero_std_group_frac"] == 0.5
    adv, _ = grpo_advantages(rewards, group_size=4, eps=1e-6)
    assert adv[4:].tolist() == [0.0] * 4  # all-correct group: no signal, no division by zero
    adv, _ = grpo_advantages(rewards, group_size=4, scale_by_std=False)
    assert adv[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_grpo_advantages_leave_unjudged_samples_out_hand_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, True, False, True, False, False, False])
    adv, metrics = grpo_advantages(rewards, group_size=4, eps=0.0, valid=valid)
    std = math.sqrt((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / math.sqrt(2)  # unbiased std of (1, 0, 0) = 0.577
    assert adv[:4].tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0.0])
    assert metrics["zero_std_group_frac"] == 0.5
    adv, _ = grpo_advantages(rewards, group_size=4, eps=1e-6, valid=valid)
    assert adv[4:].tolist() == [0.0] * 4  # one judged member: nothing to compare it with
    all_valid, _ = grpo_advantages(rewards, 4, valid=torch.ones(8, dtype=torch.bool))
    assert torch.allclose(all_valid, grpo_advantages(rewards, 4)[0])


@pytest.mark.parametrize("seed", range(8))
def test_grpo_advantages_with_unjudged_samples_match_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    k, groups = _random_size(g, 2, 8), _random_size(g, 2, 9)
    rewards = (torch.rand(groups * k, generator=g) > 0.5).double()
    valid = torch.rand(groups * k, generator=g) > 0.3
    adv, _ = grpo_advantages(rewards, k, eps=1e-6, valid=valid)
    ref = []
    for g0 in range(0, len(rewards), k):
        judged = [rewards[j].item() for j in range(g0, g0 + k) if valid[j]]
        mean = sum(judged) / len(judged) if judged else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in judged) / (len(judged) - 1)) if len(judged) > 1 else 0.0
        ref += [(rewards[j].item() - mean) / (std + 1e-6) if valid[j] else 0.0 for j in range(g0, g0 + k)]
    assert adv.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_grpo_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError, match="group_size=4"):
        grpo_advantages(torch.zeros(6), group_size=4)


def _advantage_loop_reference(rewards, scores, finished, k, tau, threshold, eps):
    out = []
    for g0 in range(0, len(rewards), k):
        r = rewards[g0:g0 + k]
        s = [min(max(scores[j], 0.0), 1.0) if finished[j] else 0.0 for j in range(g0, g0 + k)]
        mean_r, mean_s = sum(r) / k, sum(s) / k
        std_r = math.sqrt(sum((x - mean_r) ** 2 for x in r) / (k - 1))
        std_s = math.sqrt(sum((x - mean_s) ** 2 for x in s) / (k - 1))
        for j in range(k):
            a_v = (r[j] - mean_r) / (std_r + eps)
            a_s = (s[j] - mean_s) / (std_s + eps)
            out.append((1 - tau) * a_v + tau * a_s if std_s > threshold else a_v)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_integrated_advantages_match_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    k, groups = _random_size(g, 2, 8), _random_size(g, 2, 9)
    rewards = (torch.rand(groups * k, generator=g) > 0.5).double()
    scores = 0.6 * torch.randn(groups * k, generator=g, dtype=torch.float64) + 0.4
    finished = torch.rand(groups * k, generator=g) > 0.2
    scores[:k], finished[:k] = 0.5, True  # a group with constant scores: keeps A_v
    a_v, _ = grpo_advantages(rewards, k)
    a_s, score_std = self_reward_advantages(scores, finished, k)
    adv, metrics = integrate_advantages(a_v, a_s, score_std, tau=0.1, std_threshold=0.1)
    ref = _advantage_loop_reference(rewards.tolist(), scores.tolist(), finished.tolist(), k, 0.1, 0.1, 1e-6)
    assert adv.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert adv[:k].tolist() == pytest.approx(a_v[:k].tolist())
    assert 0 < metrics["integrated_frac"] < 1


def test_integration_hand_values():
    a_v = torch.tensor([1.0, -1.0, 1.0, -1.0])
    a_s = torch.tensor([-1.0, 1.0, 0.5, -0.5])
    std = torch.tensor([0.3, 0.3, 0.05, 0.05])
    adv, metrics = integrate_advantages(a_v, a_s, std, tau=0.25, std_threshold=0.1)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 1.0, -1.0])
    assert metrics["integrated_frac"] == 0.5


def test_self_reward_advantages_truncated_count_as_zero():
    scores = torch.tensor([1.4, 0.6, 0.9, -0.3])  # clipped: 1, 0.6, (truncated -> 0), 0
    finished = torch.tensor([True, True, False, True])
    a_s, std = self_reward_advantages(scores, finished, group_size=4, eps=0.0)
    values = [1.0, 0.6, 0.0, 0.0]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert a_s.tolist() == pytest.approx([(v - mean) / sd for v in values])
    assert std.tolist() == pytest.approx([sd] * 4)


# --------------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, (False, False)), (2, (False, False)), (3, (True, False)), (5, (True, False)), (6, (True, True))],
)
def test_warmup_phase(step, expected):
    assert tuple(warmup_phase(step, warmup_rl_steps=2, warmup_self_reward_steps=3)) == expected


def test_warmup_phase_no_warmup_and_bad_step():
    assert tuple(warmup_phase(1, 0, 0)) == (True, True)
    with pytest.raises(ValueError):
        warmup_phase(0, 0, 0)
