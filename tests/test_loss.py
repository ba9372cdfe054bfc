"""Tests for grpo_cli.loss: every expected number is worked out by hand in the comments."""

from __future__ import annotations

import math
import statistics
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_cli.loss import group_advantages, kl_estimate, pass_at_k, policy_loss

F64 = torch.float64
LN = math.log


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_close(actual, expected, tol: float = 1e-9) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), rtol=0, atol=tol
    )


# ---------------------------------------------------------------- group_advantages

# [1, 0, 0, 1]: mean 0.5, deviations +-0.5, sum of squares 1, ddof=1 var 1/3,
# std sqrt(1/3) = 0.5773502691896257, 0.5 / (0.5773502691896257 + 1e-4) = 0.8658754297607016
A_1001 = 0.8658754297607016


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        ("group", [A_1001, -A_1001, -A_1001, A_1001]),
        ("batch", [A_1001, -A_1001, -A_1001, A_1001]),  # one group: batch std == group std
        ("none", [0.5, -0.5, -0.5, 0.5]),  # Dr. GRPO: reward - mean only
    ],
)
def test_loss_group_advantages_single_group(scale, expected):
    assert_close(group_advantages(t([1, 0, 0, 1]), 4, scale=scale), expected)


def test_loss_group_advantages_two_groups():
    rewards = t([1, 0, 0, 1, 0, 0, 0, 1])
    # second group: mean 0.25, deviations (-0.25, -0.25, -0.25, 0.75), sum of squares
    # 3 * 0.0625 + 0.5625 = 0.75, var 0.75 / 3 = 0.25, std 0.5:
    # -0.25 / 0.5001 = -0.4999000199960008, 0.75 / 0.5001 = 1.4997000599880024
    lo, hi = -0.4999000199960008, 1.4997000599880024
    assert_close(group_advantages(rewards, 4), [A_1001, -A_1001, -A_1001, A_1001, lo, lo, lo, hi])
    assert_close(
        group_advantages(rewards, 4, scale="none"), [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75]
    )
    # batch: centred by group mean, scaled by the std of all 8 rewards (3 ones, 5 zeros): mean 0.375,
    # sum of squares 3 * 0.625^2 + 5 * 0.375^2 = 1.171875 + 0.703125 = 1.875, var 1.875 / 7,
    # std 0.5175491695067657; 0.5 / (std + 1e-4) = 0.9659051524730883,
    # 0.25 / (std + 1e-4) = 0.48295257623654414, 0.75 / (std + 1e-4) = 1.4488577287096325
    b5, b25, b75 = 0.9659051524730883, 0.48295257623654414, 1.4488577287096325
    assert_close(group_advantages(rewards, 4, scale="batch"), [b5, -b5, -b5, b5, -b25, -b25, -b25, b75])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_loss_group_advantages_flat_group_is_exactly_zero(scale):
    # 0.1 * 3 / 3 does not round back to 0.1, yet a flat group must give exactly 0
    adv = group_advantages(t([0.1, 0.1, 0.1, 1.0, 0.0, 1.0]), 3, scale=scale)
    assert torch.equal(adv[:3], torch.zeros(3, dtype=F64))
    assert torch.isfinite(adv).all()
    assert torch.equal(group_advantages(t([0.3, 0.3]), 2, scale=scale), torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_loss_group_advantages_group_size_one(scale):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "degrees of freedom <= 0" warning from std of one element
        adv = group_advantages(t([1.0, 0.0, 2.5]), 1, scale=scale)
        single = group_advantages(t([7.0]), 1, scale=scale)
    assert torch.equal(adv, torch.zeros(3, dtype=F64))
    assert torch.equal(single, torch.zeros(1, dtype=F64))


def test_loss_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t([1, 0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(t([1, 0]), 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t([1, 0]), 2, scale="rank")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(t([[1, 0]]), 2)


def _advantages_reference(rewards: list[float], group_size: int, scale: str, eps: float) -> list[float]:
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if len(set(group)) == 1:
            out += [0.0] * len(group)
            continue
        mean = statistics.fmean(group)
        denom = {"group": statistics.stdev(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out += [(r - mean) / denom for r in group]
    return out


@settings(max_examples=100, deadline=None)
@given(
    data=st.data(),
    group_size=st.integers(1, 6),
    n_groups=st.integers(1, 5),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_loss_group_advantages_matches_loop(data, group_size, n_groups, scale):
    element = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-10, 10, allow_nan=False))
    rewards = data.draw(st.lists(element, min_size=group_size * n_groups, max_size=group_size * n_groups))
    expected = _advantages_reference(rewards, group_size, scale, 1e-4)
    assert_close(group_advantages(t(rewards), group_size, scale=scale), expected, tol=1e-9)


# ---------------------------------------------------------------- kl_estimate


def test_loss_kl_estimate_known_points():
    logp, ref = t([-1.0, -2.0, -0.7]), t([-2.0, -1.0, -0.7])
    # d = ref - logp = (-1, 1, 0)
    # k3 = e^d - d - 1: e^-1 + 1 - 1 = 0.36787944117144233; e - 1 - 1 = 0.7182818284590451; 1 - 0 - 1 = 0
    assert_close(kl_estimate(logp, ref), [0.36787944117144233, 0.7182818284590451, 0.0], tol=1e-12)
    assert kl_estimate(logp, ref)[2].item() == 0.0
    assert_close(kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0], tol=1e-12)  # logp - ref
    assert_close(kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0], tol=1e-12)  # (logp - ref)^2 / 2


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_loss_kl_estimator_gradient_in_expectation(kind):
    """What each estimator does as a loss term: its gradient averaged over tokens drawn from pi (an exact
    sum over a 3-token vocabulary) is 0 for k1, grad KL(pi || ref) for k2 and grad KL(ref || pi) for k3."""
    theta = t([0.3, -1.2, 0.9]).requires_grad_(True)
    ref = torch.log_softmax(t([-0.5, 0.4, 0.2]), 0)
    logp = torch.log_softmax(theta, 0)
    probs = logp.exp().detach()
    expected_grad = sum(probs[x] * torch.autograd.grad(kl_estimate(logp[x], ref[x], kind), theta, retain_graph=True)[0]
                        for x in range(3))
    kl_pi_ref = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    kl_ref_pi = (ref.exp() * (ref - logp)).sum()  # KL(ref || pi)
    target = {"k1": torch.zeros(3, dtype=F64), "k2": torch.autograd.grad(kl_pi_ref, theta, retain_graph=True)[0],
              "k3": torch.autograd.grad(kl_ref_pi, theta)[0]}[kind]
    assert target.abs().max() > 0.1 or kind == "k1"
    assert_close(expected_grad, target, tol=1e-12)


def test_loss_kl_estimate_errors():
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(t([0.0]), t([0.0]), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(t([0.0, 1.0]), t([0.0]))


# ---------------------------------------------------------------- policy_loss: clipping


def one_token(ratio: float, adv: float, **kw):
    old = t([[-1.0]])
    return policy_loss(old + LN(ratio), old, t([adv]), torch.ones(1, 1, dtype=torch.bool), **kw)


@pytest.mark.parametrize(
    ("ratio", "adv", "kw", "expected", "clip_frac"),
    [
        (1.5, 1.0, {}, -1.2, 1.0),  # min(1.5, 1.2) = 1.2, clipped branch active
        (1.5, -1.0, {}, 1.5, 0.0),  # min(-1.5, -1.2) = -1.5, unclipped
        (0.5, -1.0, {}, 0.8, 1.0),  # min(-0.5, -0.8) = -0.8, clipped up to 0.8
        (0.5, 1.0, {}, -0.5, 0.0),  # min(0.5, 0.8) = 0.5, unclipped
        (1.5, 1.0, {"clip_high": 0.28}, -1.28, 1.0),  # DAPO clip-higher: min(1.5, 1.28)
        (1.25, 1.0, {"clip_high": 0.28}, -1.25, 0.0),  # 1.25 < 1.28: not clipped (would be with 0.2)
        (0.75, -1.0, {"clip_high": 0.28}, 0.8, 1.0),  # low side still 1 - 0.2: min(-0.75, -0.8)
        (1.5, 2.0, {"clip_low": 0.1, "clip_high": 0.3}, -2.6, 1.0),  # min(3.0, 1.3 * 2)
    ],
)
def test_loss_clipping(ratio, adv, kw, expected, clip_frac):
    loss, stats = one_token(ratio, adv, **kw)
    assert_close(loss, expected)
    assert stats["clip_frac"] == clip_frac
    assert_close(stats["ratio_mean"], ratio)


def test_loss_clip_frac_low_high_stats():
    loss, stats = one_token(0.5, -1.0)
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == (1.0, 0.0)
    loss, stats = one_token(1.5, 1.0)
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("ratio", "adv", "kw", "low", "high"),
    [
        # Outside the range on the side the min() does not take: not clipped, in neither statistic.
        (0.5, 1.0, {}, 0.0, 0.0),  # min(0.5, 0.8) = 0.5: the unclipped term
        (1.5, -1.0, {}, 0.0, 0.0),  # min(-1.5, -1.2) = -1.5: the unclipped term
        # A = 0 (every row of a flat group): both terms are 0, nothing is clipped, whatever the ratio.
        (0.5, 0.0, {}, 0.0, 0.0),
        (1.5, 0.0, {}, 0.0, 0.0),
        # Asymmetric ranges: each side reads its own bound.
        (1.25, 1.0, {"clip_low": 0.3, "clip_high": 0.1}, 0.0, 1.0),  # 1.25 > 1 + 0.1
        (1.25, 1.0, {"clip_low": 0.1, "clip_high": 0.3}, 0.0, 0.0),  # 1.25 < 1 + 0.3 (but > 1 + 0.1)
        (0.85, -1.0, {"clip_low": 0.1, "clip_high": 0.3}, 1.0, 0.0),  # 0.85 < 1 - 0.1 (but > 1 - 0.3)
        (0.85, -1.0, {"clip_low": 0.3, "clip_high": 0.1}, 0.0, 0.0),  # 0.85 > 1 - 0.3
    ],
)
def test_loss_clip_frac_sides_follow_the_advantage_sign_and_own_bound(ratio, adv, kw, low, high):
    _, stats = one_token(ratio, adv, **kw)
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == (low, high)
    assert stats["clip_frac"] == low + high  # one token: clipped on one side or not at all


# ---------------------------------------------------------------- policy_loss: KL term


def test_loss_kl_term_enters_loss():
    logp, ref, mask = t([[-1.0]]), t([[-2.0]]), torch.ones(1, 1)
    # on-policy, A = 0.5: pg = -0.5; k3 at d = -1 is e^-1 = 0.36787944117144233
    # loss = -0.5 + 0.1 * 0.36787944117144233 = -0.46321205588285574
    loss, stats = policy_loss(logp, logp.clone(), t([0.5]), mask, ref_logp=ref, beta=0.1)
    assert_close(loss, -0.46321205588285574)
    assert_close(stats["pg_loss"], -0.5)
    assert_close(stats["kl"], 0.36787944117144233)
    # k1 = logp - ref = 1: loss = -0.5 + 0.1 * 1 = -0.4
    loss, _ = policy_loss(logp, logp.clone(), t([0.5]), mask, ref_logp=ref, beta=0.1, kl="k1")
    assert_close(loss, -0.4)


def test_loss_kl_stat_reported_with_beta_zero():
    logp = t([[-1.0, -2.0, 5.0]])
    ref = t([[-2.0, -1.0, 9.0]])
    mask = t([[1, 1, 0]])
    # k3 per token: 0.36787944117144233, 0.7182818284590451 (third is padding); mean 0.5430806348152437
    loss, stats = policy_loss(logp, logp.clone(), t([1.0]), mask, ref_logp=ref)
    assert_close(stats["kl"], 0.5430806348152437)
    assert_close(loss, -1.0)  # KL not in the loss when beta == 0
    _, stats = policy_loss(logp, logp.clone(), t([1.0]), mask)
    assert stats.get("kl", 0.0) == 0.0


def test_loss_beta_without_ref_logp_adds_no_kl():
    # the KL term needs a reference: with beta = 0.1 but no ref_logp the loss is the bare surrogate,
    # here on-policy with A = 1 on 2 tokens: -1
    logp, mask = t([[-1.0, -2.0, 5.0]]), t([[1, 1, 0]])
    loss, stats = policy_loss(logp, logp.clone(), t([1.0]), mask, beta=0.1)
    assert_close(loss, -1.0)
    assert stats["kl"] == 0.0


# ---------------------------------------------------------------- policy_loss: aggregation

# Ragged batch, T = 4: sequence 0 has 3 tokens with ratios (1.1, 0.9, 1.5) and A = +1,
# sequence 1 has 1 token with ratio 0.5 and A = -1. clip 0.2.
# per-token losses: -1.1, -0.9, -min(1.5, 1.2) = -1.2  |  -min(-0.5, -0.8) = +0.8
RAGGED_MASK = [[1, 1, 1, 0], [1, 0, 0, 0]]


def ragged_inputs():
    old = t([[-1.0, -2.0, -0.5, -3.0], [-1.5, -1.0, -1.0, -1.0]])
    logp = old + t([[LN(1.1), LN(0.9), LN(1.5), 0.0], [LN(0.5), 0.0, 0.0, 0.0]])
    return logp, old, t([1.0, -1.0]), t(RAGGED_MASK)


@pytest.mark.parametrize(
    ("agg", "max_tokens", "expected"),
    [
        ("seq_mean_token_mean", None, -0.1333333333333333),  # (-3.2 / 3 + 0.8) / 2
        ("token_mean", None, -0.6),  # (-3.2 + 0.8) / 4
        ("seq_sum_norm", 4, -0.3),  # (-3.2 + 0.8) / (2 * 4)
        ("seq_sum_norm", 10, -0.12),  # (-3.2 + 0.8) / (2 * 10)
    ],
)
def test_loss_aggregation_ragged(agg, max_tokens, expected):
    loss, stats = policy_loss(*ragged_inputs(), agg=agg, max_tokens=max_tokens)
    assert_close(loss, expected)
    assert_close(stats["pg_loss"], expected)
    # clipped tokens: ratio 1.5 with A > 0 and ratio 0.5 with A < 0 -> 2 of 4
    assert_close(stats["clip_frac"], 0.5)
    assert_close(stats["clip_frac_low"], 0.25)
    assert_close(stats["clip_frac_high"], 0.25)
    assert_close(stats["ratio_mean"], 1.0)  # (1.1 + 0.9 + 1.5 + 0.5) / 4
    assert_close(stats["ratio_max"], 1.5)
    assert_close(stats["ratio_min"], 0.5)


def test_loss_bool_and_float_mask_agree():
    logp, old, adv, mask = ragged_inputs()
    loss_f, _ = policy_loss(logp, old, adv, mask)
    loss_b, _ = policy_loss(logp, old, adv, mask.bool())
    assert_close(loss_f, loss_b, tol=0)


def test_loss_stats_are_python_floats():
    _, stats = policy_loss(*ragged_inputs(), ref_logp=ragged_inputs()[1], beta=0.04)
    required = {"clip_frac", "kl", "ratio_mean", "pg_loss", "ratio_max", "ratio_min"}
    assert required <= stats.keys()
    assert all(type(v) is float for v in stats.values())


def test_loss_stats_with_no_completion_tokens():
    logp, old, adv, mask = ragged_inputs()
    loss, stats = policy_loss(logp, old, adv, torch.zeros_like(mask), ref_logp=old - 0.3, beta=0.1)
    assert_close(loss, 0.0, tol=0)
    # The ratio statistics are 1.0 (as documented), the fractions and the KL 0.
    assert stats == {"loss": 0.0, "pg_loss": 0.0, "clip_frac": 0.0, "clip_frac_low": 0.0, "clip_frac_high": 0.0,
                     "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "kl": 0.0}


# ---------------------------------------------------------------- masked positions are inert


@pytest.mark.parametrize("junk", [1e4, -1e4, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_sum_norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_loss_masked_positions_change_nothing(junk, agg, ratio_level):
    logp, old, adv, mask = ragged_inputs()
    ref = old - 0.3
    pad = mask == 0
    kw = {"agg": agg, "max_tokens": 4, "ratio_level": ratio_level, "beta": 0.1}

    clean = logp.clone().requires_grad_(True)
    loss_clean, stats_clean = policy_loss(clean, old, adv, mask, ref_logp=ref, **kw)
    loss_clean.backward()

    dirty = logp.masked_fill(pad, junk).requires_grad_(True)
    loss_dirty, stats_dirty = policy_loss(
        dirty, old.masked_fill(pad, -junk), adv, mask, ref_logp=ref.masked_fill(pad, junk), **kw
    )
    loss_dirty.backward()

    assert torch.isfinite(loss_dirty)
    assert torch.isfinite(dirty.grad).all()
    assert_close(loss_dirty, loss_clean, tol=0)
    assert_close(dirty.grad, clean.grad, tol=0)
    assert (dirty.grad[pad] == 0).all()
    assert stats_dirty == stats_clean


# ---------------------------------------------------------------- on-policy gradient

# 4 sequences, T = 4, token counts (3, 1, 2, 0), A = (1.5, -2, 0.5, 0.7). On-policy the ratio is 1,
# so d(per-token loss)/d logp = -A_i and the aggregation supplies the weights.
ON_MASK = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("agg", "row_grads"),
    [
        # -A_i / n_i / N with N = 4: -1.5/3/4 = -0.125, 2/1/4 = 0.5, -0.5/2/4 = -0.0625, empty row 0
        ("seq_mean_token_mean", [-0.125, 0.5, -0.0625, 0.0]),
        # -A_i / 6 total tokens: -0.25, 0.3333333333333333, -0.08333333333333333
        ("token_mean", [-0.25, 0.3333333333333333, -0.08333333333333333, 0.0]),
        # -A_i / (N * max_tokens) = -A_i / 16: -0.09375, 0.125, -0.03125
        ("seq_sum_norm", [-0.09375, 0.125, -0.03125, 0.0]),
    ],
)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_loss_on_policy_gradient(agg, row_grads, ratio_level):
    mask = t(ON_MASK)
    logp = (-0.1 * torch.arange(16, dtype=F64).reshape(4, 4)).requires_grad_(True)
    loss, stats = policy_loss(
        logp,
        logp.detach().clone(),
        t([1.5, -2.0, 0.5, 0.7]),
        mask,
        agg=agg,
        max_tokens=4,
        ratio_level=ratio_level,
    )
    loss.backward()
    expected = t(row_grads)[:, None] * mask
    assert_close(logp.grad, expected, tol=1e-12)
    assert torch.isfinite(loss)
    assert stats["clip_frac"] == 0.0


def test_loss_empty_sequence_no_nan():
    # seq_mean_token_mean: per-sequence means (-1.5, 2, -0.5, 0) / 4 = 0; the empty row counts with 0
    loss, _ = policy_loss(t(ON_MASK) * 0 - 1, t(ON_MASK) * 0 - 1, t([1.5, -2.0, 0.5, 0.7]), t(ON_MASK))
    assert_close(loss, 0.0, tol=1e-12)
    loss, stats = policy_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([1.0]), t([[0, 0]]))
    assert loss.item() == 0.0
    assert stats["clip_frac"] == 0.0 and not math.isnan(stats["ratio_mean"])


# ---------------------------------------------------------------- off-policy gradient, with the KL term

# 2 sequences of 2 tokens; ratios (1.5, 0.5) in both, A = (+1, -1), clip 0.2, token_mean (weight 1/4).
# Per-token d(-min(r A, clip(r) A)) / d logp, where d r / d logp = r:
#   seq 0, A = +1: r = 1.5 -> clipped term 1.2 is the min: 0;  r = 0.5 -> min(0.5, 0.8) unclipped: -0.5
#   seq 1, A = -1: r = 1.5 -> min(-1.5, -1.2) unclipped: +1.5; r = 0.5 -> clipped term -0.8 is the min: 0
# KL term: ref = logp + ln 0.5 on every token, so d = ref - logp = ln 0.5 and
#   k3: d(e^d - d - 1)/d logp = 1 - e^d = 0.5;  k1: d(logp - ref)/d logp = 1;
#   k2: d((logp - ref)^2 / 2)/d logp = logp - ref = ln 2 = 0.6931471805599453
@pytest.mark.parametrize(("kl", "kl_grad"), [("k3", 0.5), ("k1", 1.0), ("k2", math.log(2))])
def test_loss_off_policy_gradient_with_clipping_and_kl(kl, kl_grad):
    old = t([[-1.0, -2.0], [-1.5, -0.5]])
    logp = (old + t([[LN(1.5), LN(0.5)], [LN(1.5), LN(0.5)]])).requires_grad_(True)
    ref = logp.detach() + LN(0.5)
    loss, stats = policy_loss(logp, old, t([1.0, -1.0]), torch.ones(2, 2), ref_logp=ref, beta=0.1, kl=kl,
                              agg="token_mean")
    loss.backward()
    pg_grad = t([[0.0, -0.5], [1.5, 0.0]])
    # (pg + 0.1 * kl_grad) / 4, e.g. k3: [[0.0125, -0.1125], [0.3875, 0.0125]]
    assert_close(logp.grad, (pg_grad + 0.1 * kl_grad) / 4, tol=1e-12)
    # loss: pg (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15, plus 0.1 * the KL estimate (the same on all 4 tokens):
    # k3 = 0.5 - ln 0.5 - 1 = 0.1931471805599454, k1 = -ln 0.5 = ln 2, k2 = (ln 2)^2 / 2 = 0.2402265069591007
    kl_value = {"k3": 0.5 - LN(0.5) - 1, "k1": math.log(2), "k2": math.log(2) ** 2 / 2}[kl]
    assert_close(stats["pg_loss"], 0.15, tol=1e-12)
    assert_close(loss, 0.15 + 0.1 * kl_value, tol=1e-12)
    assert_close(stats["kl"], kl_value, tol=1e-12)
    assert_close(stats["clip_frac"], 0.5)


# ---------------------------------------------------------------- GSPO


def gspo_inputs():
    old = t([[-1.0, -2.0, -4.0], [-0.5, -1.5, -2.5]])
    logp = old + t([[0.1, 0.3, 9.0], [-0.1, -0.2, -0.3]])  # 9.0 sits on padding
    return logp, old, t([1.0, -1.0]), t([[1, 1, 0], [1, 1, 1]])


def test_loss_gspo_sequence_ratio():
    # seq 0: mean log-ratio (0.1 + 0.3) / 2 = 0.2, s = e^0.2 = 1.2214027581601699, A = +1
    #        -> min(1.2214, 1.2) = 1.2, loss -1.2 on each of its 2 tokens (clipped)
    # seq 1: mean (-0.1 - 0.2 - 0.3) / 3 = -0.2, s = e^-0.2 = 0.8187307530779818 > 0.8, A = -1
    #        -> not clipped, loss +0.8187307530779818 on each of its 3 tokens
    # seq_mean_token_mean: (-1.2 + 0.8187307530779818) / 2 = -0.19063462346100907
    # token_mean: (2 * -1.2 + 3 * 0.8187307530779818) / 5 = 0.011238451846789132
    loss, stats = policy_loss(*gspo_inputs(), ratio_level="sequence")
    assert_close(loss, -0.19063462346100907)
    assert_close(stats["clip_frac"], 0.4)  # 2 of 5 tokens
    assert_close(stats["ratio_max"], 1.2214027581601699)
    assert_close(stats["ratio_min"], 0.8187307530779818)
    # over the 5 completion tokens (padding excluded): (2 * e^0.2 + 3 * e^-0.2) / 5 = 0.979799555110857
    assert_close(stats["ratio_mean"], 0.979799555110857)
    loss, _ = policy_loss(*gspo_inputs(), ratio_level="sequence", agg="token_mean")
    assert_close(loss, 0.011238451846789132)


def test_loss_gspo_differs_from_token_level():
    # token level on the same data: seq 0 ratios e^0.1 = 1.1051709180756477, e^0.3 -> clipped to 1.2,
    # mean -(1.1051709180756477 + 1.2) / 2; seq 1 ratios e^-0.1 = 0.9048374180359595,
    # e^-0.2 = 0.8187307530779818, e^-0.3 = 0.7408182206817179 -> clipped to 0.8 (A < 0 takes the max),
    # mean (0.9048374180359595 + 0.8187307530779818 + 0.8) / 3;
    # total (-1.152585459037824 + 0.8411893903713139) / 2 = -0.15569803433325502
    loss, stats = policy_loss(*gspo_inputs())
    assert_close(loss, -0.15569803433325502)
    assert_close(stats["clip_frac"], 0.4)  # e^0.3 with A > 0, e^-0.3 with A < 0
    assert (stats["clip_frac_low"], stats["clip_frac_high"]) == (0.2, 0.2)
    # (e^0.1 + e^0.3 + e^-0.1 + e^-0.2 + e^-0.3) / 5 = (1.1051709180756477 + 1.3498588075760032
    # + 0.9048374180359595 + 0.8187307530779818 + 0.7408182206817179) / 5; padding (ratio 1) left out
    assert_close(stats["ratio_mean"], 0.9838832234894621)


# ---------------------------------------------------------------- policy_loss: validation


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"agg": "sum"}, "seq_mean_token_mean"),
        ({"ratio_level": "batch"}, "sequence"),
        ({"kl": "k5"}, "k3"),
        ({"agg": "seq_sum_norm"}, "max_tokens"),
        ({"agg": "seq_sum_norm", "max_tokens": 0}, "max_tokens"),
        ({"clip_low": -0.1}, "clip"),
        ({"ref_logp": torch.zeros(2, 3, dtype=F64)}, "ref_logp"),
    ],
)
def test_loss_policy_loss_errors(kw, match):
    logp, old, adv, mask = ragged_inputs()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, adv, mask, **kw)


def test_loss_policy_loss_shape_errors():
    logp, old, adv, mask = ragged_inputs()
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[:1])
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:, None], mask)
    with pytest.raises(ValueError, match="2-D"):
        policy_loss(logp[0], old[0], adv, mask[0])


# ---------------------------------------------------------------- policy_loss vs a python loop


def _loss_reference(logp, old, ref, adv, mask, beta, clip_low, clip_high, ratio_level, agg, max_tokens):
    """One sequence and one token at a time, straight from the formulas in the issue."""
    seq_sums, seq_counts = [], []
    for lp, op, rp, a, m in zip(logp, old, ref, adv, mask, strict=True):
        idx = [j for j, keep in enumerate(m) if keep]
        seq_ratio = math.exp(sum(lp[j] - op[j] for j in idx) / len(idx)) if idx else 1.0
        total = 0.0
        for j in idx:
            r = seq_ratio if ratio_level == "sequence" else math.exp(lp[j] - op[j])
            clipped = min(max(r, 1 - clip_low), 1 + clip_high)
            d = rp[j] - lp[j]
            total += -min(r * a, clipped * a) + beta * (math.exp(d) - d - 1)
        seq_sums.append(total)
        seq_counts.append(len(idx))
    if agg == "seq_mean_token_mean":  # an empty sequence counts as 0
        return sum(s / c if c else 0.0 for s, c in zip(seq_sums, seq_counts, strict=True)) / len(seq_sums)
    if agg == "token_mean":
        return sum(seq_sums) / max(sum(seq_counts), 1)
    return sum(seq_sums) / (len(seq_sums) * max_tokens)  # seq_sum_norm


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), length=st.integers(1, 5))
def test_loss_policy_loss_matches_loop(data, n, length):
    def grid(lo, hi):
        row = st.lists(st.floats(lo, hi, allow_nan=False), min_size=length, max_size=length)
        return data.draw(st.lists(row, min_size=n, max_size=n))

    logp = grid(-5, 0)
    old = [[x + dx for x, dx in zip(r, rd, strict=True)] for r, rd in zip(logp, grid(-0.5, 0.5), strict=True)]
    ref = [[x + dx for x, dx in zip(r, rd, strict=True)] for r, rd in zip(logp, grid(-1, 1), strict=True)]
    mask = data.draw(
        st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=n, max_size=n)
    )
    adv = data.draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=n, max_size=n))
    beta = data.draw(st.sampled_from([0.0, 0.04, 0.5]))
    clip_low, clip_high = data.draw(st.floats(0, 0.5)), data.draw(st.floats(0, 0.5))
    ratio_level = data.draw(st.sampled_from(["token", "sequence"]))
    agg = data.draw(st.sampled_from(["seq_mean_token_mean", "token_mean", "seq_sum_norm"]))
    max_tokens = data.draw(st.integers(length, 8))

    expected = _loss_reference(
        logp, old, ref, adv, mask, beta, clip_low, clip_high, ratio_level, agg, max_tokens
    )
    # junk on padding must not matter
    junk = torch.full((n, length), 1e4, dtype=F64)
    m = torch.tensor(mask)
    loss, _ = policy_loss(
        torch.where(m, t(logp), junk),
        torch.where(m, t(old), -junk),
        t(adv),
        m,
        ref_logp=torch.where(m, t(ref), junk),
        beta=beta,
        clip_low=clip_low,
        clip_high=clip_high,
        ratio_level=ratio_level,
        agg=agg,
        max_tokens=max_tokens,
    )
    assert_close(loss, expected, tol=1e-9)


# ---------------------------------------------------------------- pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 0, 2, 0.0),  # no correct sample
        (3, 2, 2, 1.0),  # n - c = 1 < k: every 2-subset holds a correct one
        (10, 3, 5, 0.9166666666666666),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
        (4, 4, 4, 1.0),
        (5, 2, 3, 0.9),  # n - c = k: 1 - C(3,3)/C(5,3) = 1 - 1/10, not yet 1
        (4, 1, 3, 0.75),  # n - c = k: 1 - C(3,3)/C(4,3) = 1 - 1/4
        (1000, 1, 1, 0.001),  # 1 - 999/1000
        (1000, 10, 100, 0.653072285207994),  # 1 - C(990,100)/C(1000,100), exact fraction via math.comb
    ],
)
def test_loss_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(5, -1, 1), (5, 6, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_loss_pass_at_k_invalid(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_loss_truncated_importance_weight_scales_the_policy_term_only() -> None:
    # One sequence, two tokens, ratio 1.5 on both (logp - old = ln 1.5), A = +1, clip 0.2:
    # min(1.5 * 1, 1.2 * 1) = 1.2 per token. Weights 0.5 and 2.0 give token losses -0.6 and -2.4,
    # mean -1.5. The KL term is not weighted: logp = ln 0.5, ref = ln 0.25 -> d = ln 0.5,
    # k3 = 0.5 - ln 0.5 - 1 = 0.19314718..., times beta 0.1 on both tokens, mean 0.019314718.
    logp = torch.full((1, 2), math.log(0.5), dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 2), math.log(0.5 / 1.5), dtype=torch.float64)
    ref = torch.full((1, 2), math.log(0.25), dtype=torch.float64)
    weight = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, ref_logp=ref, beta=0.1,
                              is_weight=weight)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(-1.5 + 0.1 * k3, abs=1e-12)
    assert stats["pg_loss"] == pytest.approx(-1.5, abs=1e-12)
    # Unclipped case (ratio 1, on-policy): d loss / d logp_t = -w_t * A / T.
    on = logp.detach().clone().requires_grad_(True)
    policy_loss(on, on.detach(), torch.tensor([1.0], dtype=torch.float64), mask, is_weight=weight)[0].backward()
    torch.testing.assert_close(on.grad, torch.tensor([[-0.25, -1.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    # The weight is a constant: no gradient flows into it even if it requires one.
    w = weight.clone().requires_grad_(True)
    policy_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), mask, is_weight=w)[0].backward()
    assert w.grad is None
