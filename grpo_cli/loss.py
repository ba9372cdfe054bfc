"""The GRPO objective as pure tensor functions.

GRPO (Shao et al., 2024, DeepSeekMath) samples a group of G completions per prompt, scores each
with a reward, and uses the reward relative to its group as the advantage of every token of that
completion, so no value network is needed. The policy is then trained with PPO's clipped surrogate

    L = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) + beta * KL(pi || pi_ref),
    r = pi(token) / pi_old(token),

where the KL penalty sits in the loss (not in the reward) and is estimated per token with
Schulman's k3 estimator. Variants selectable here:

* advantage scale: per group std (GRPO), batch std, or none (Dr. GRPO);
* aggregation over tokens: per-sequence mean then mean (GRPO), mean over all tokens of the batch
  (BNPO / DAPO), or sum divided by a constant N * max_tokens (Dr. GRPO);
* asymmetric clipping (DAPO clip-higher) via clip_low != clip_high;
* sequence-level importance ratio (GSPO).

`pass_at_k` is the unbiased pass@k estimator of Chen et al. (2021), used for evaluation.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Collection

import torch
from torch import Tensor

SCALES = ("group", "batch", "none")
RATIO_LEVELS = ("token", "sequence")


def _k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return logp - ref_logp


def _k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    d = ref_logp - logp
    # expm1 keeps exp(d) - 1 accurate when the policy is close to the reference (d ~ 0).
    return torch.expm1(d) - d


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}

# Each aggregation maps (per-token loss [N, T] with zeros at padding, tokens per sequence [N],
# max_tokens) to a scalar.
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "seq_mean_token_mean": lambda tok, n_tok, _: (tok.sum(1) / n_tok.clamp(min=1)).mean(),
    "token_mean": lambda tok, n_tok, _: tok.sum() / n_tok.sum().clamp(min=1),
    "seq_sum_norm": lambda tok, _, max_tokens: tok.sum() / (tok.shape[0] * max_tokens),
}


def _choice(name: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {sorted(allowed)}")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
                     batch_std: float | None = None) -> Tensor:
    """Group-relative advantages: reward minus its group's mean, optionally divided by a std.

    rewards: [N], N = prompts * group_size, each prompt's completions contiguous.
    scale: "group" (group std, GRPO), "batch" (std of all N rewards, or `batch_std` when given: that
    of a batch these rewards are a part of) or "none" (Dr. GRPO).
    The std is the unbiased (ddof=1) sample std. Returns [N]; a group whose rewards are all equal
    gets exactly 0 (it carries no learning signal), also when group_size is 1.
    """
    _choice("scale", scale, SCALES)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"number of rewards ({rewards.numel()}) must be a positive multiple of group_size ({group_size})"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    # The mean of equal floats need not round back to the value itself, so force the exact zero.
    flat_group = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centered = torch.where(flat_group, torch.zeros_like(centered), centered)
    if scale == "group":
        # ddof=1 std of a single element is NaN; such a group is flat anyway, so any finite std works.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centered)
        centered = centered / (std + eps)
    elif scale == "batch":
        if batch_std is not None:
            std = rewards.new_tensor(batch_std)
        else:
            std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        centered = centered / (std + eps)
    return centered.reshape(-1)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, same shape as inputs.

    With d = ref_logp - logp: k3 = exp(d) - d - 1 (unbiased and non-negative, used by DeepSeekMath),
    k1 = -d (unbiased, can be negative), k2 = d^2 / 2 (biased, low variance).
    As a loss term (tokens sampled from pi) what matters is the gradient: k1's is grad log pi, zero in
    expectation, so it does not pull pi toward pi_ref at all; k2's, -d * grad log pi, is in expectation
    the gradient of the token's KL(pi || pi_ref); k3's, (1 - e^d) * grad log pi, that of KL(pi_ref || pi).
    """
    _choice("kl kind", kind, KL_ESTIMATORS)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    return KL_ESTIMATORS[kind](logp, ref_logp)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "seq_mean_token_mean",
    max_tokens: int | None = None,
    kl: str = "k3",
    ratio_level: str = "token",
    is_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss with optional KL penalty, aggregated over completion tokens.

    logp, old_logp, ref_logp, mask: [N, T] (log-probs of the sampled tokens; mask is 1/True on
    completion tokens, 0/False on padding, any nonzero counts as a token). advantages: [N].
    The KL penalty beta * KL enters the loss only when beta != 0 and ref_logp is given (with no
    reference model there is nothing to penalise against, so beta is then ignored).
    Values at padding never reach the loss or its gradient, whatever they are (inf and NaN included).
    ratio_level="sequence" (GSPO) uses one ratio per sequence, exp of its mean token log-ratio.
    is_weight: optional [N, T] constant per-token weight on the policy-gradient term (not on the
    KL term): the truncated importance weight min(pi_old / pi_sampler, cap) that corrects for the
    rollout engine sampling from slightly different numbers than the learner computes.
    Returns the scalar loss and detached python-float stats: loss, pg_loss (without the KL term),
    clip_frac (+ _low / _high), ratio_mean / _min / _max and kl (0.0 without ref_logp), all
    taken over completion tokens (ratio stats are 1.0 when there are none).
    """
    _choice("agg", agg, AGGREGATIONS)
    _choice("ratio_level", ratio_level, RATIO_LEVELS)
    _choice("kl kind", kl, KL_ESTIMATORS)
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D [N, T], got shape {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp, "is_weight": is_weight}
    for name, t in named.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)} like logp")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must have shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if agg == "seq_sum_norm" and (max_tokens is None or max_tokens < 1):
        raise ValueError(f"agg='seq_sum_norm' needs a positive max_tokens, got {max_tokens}")

    valid = mask.bool()
    n_tok = valid.sum(1).to(logp.dtype)
    zero = logp.new_zeros(())
    # torch.where before exp: the unselected branch gets an exactly-zero gradient, whereas
    # multiplying by the mask afterwards gives inf * 0 = NaN for extreme padding values.
    log_ratio = torch.where(valid, logp, zero) - torch.where(valid, old_logp, zero)
    if ratio_level == "sequence":
        seq_log_ratio = log_ratio.sum(1) / n_tok.clamp(min=1)
        log_ratio = seq_log_ratio[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio)
    adv = advantages.to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    pg_tok = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        pg_tok = pg_tok * is_weight.detach()
    pg_tok = torch.where(valid, pg_tok, zero)
    pg_loss = AGGREGATIONS[agg](pg_tok, n_tok, max_tokens)

    kl_tok = None
    if ref_logp is not None:
        kl_tok = kl_estimate(torch.where(valid, logp, zero), torch.where(valid, ref_logp, zero), kl)
        kl_tok = torch.where(valid, kl_tok, zero)
    if beta != 0 and kl_tok is not None:
        loss = AGGREGATIONS[agg](pg_tok + beta * kl_tok, n_tok, max_tokens)
    else:
        loss = pg_loss

    with torch.no_grad():
        # Computed as tensors and read back in one transfer: on a GPU each .item() waits for the device.
        total = n_tok.sum().clamp(min=1)

        def frac(hit: Tensor) -> Tensor:
            return (hit & valid).sum() / total

        r = ratio.detach()
        some = valid.any()
        one = logp.new_ones(())
        values = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "clip_frac": frac(unclipped > clipped),
            "clip_frac_low": frac((ratio < 1 - clip_low) & (adv < 0)),
            "clip_frac_high": frac((ratio > 1 + clip_high) & (adv > 0)),
            "ratio_mean": torch.where(some, torch.where(valid, r, zero).sum() / total, one),
            "ratio_min": torch.where(some, torch.where(valid, r, torch.inf).min(), one),
            "ratio_max": torch.where(some, torch.where(valid, r, -torch.inf).max(), one),
            "kl": kl_tok.sum() / total if kl_tok is not None else zero,
        }
        stats = dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist(), strict=True))
    return loss, stats


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n - c, k) / C(n, k).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which avoids huge binomial coefficients.
    """
    n, c, k = operator.index(n), operator.index(c), operator.index(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
