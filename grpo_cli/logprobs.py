"""Log-probabilities of completion tokens, computed only where they are needed.

Only completion positions go through the output layer, in chunks of LOGIT_CHUNK tokens, each
recomputed in backward (activation checkpointing) when a micro-batch has more than one, so the
full-vocabulary logits (vocab x tokens x 4 bytes: 49k words make that 200 KB per token) never
exist for more than a chunk at a time. One softmax per chunk serves the log-probs, the entropy and
the gradient (`_TokenLogprob`).

Two batch layouts (the learner picks one per device, `model.share_prompts`): `pack`, one
right-padded row per completion, and `pack_segments`, rows holding each distinct prompt once
followed by its completions, back to back with no padding between them, under a block mask that
lets each completion see only its own prompt and itself. The second costs each group's prompt one
forward/backward instead of G and spends nothing on padding; attention over a packed row costs its
full length squared whatever the mask hides, though, and an arbitrary mask keeps SDPA off its
fastest kernels, so on a GPU it measured 20% slower (benchmarks/learner_layout.py, RESULTS.md).

On a CPU the output layer's and the embedding's weight gradients go straight into `.grad`
(`accumulate_in_place`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK = 1024  # completion tokens whose full-vocabulary logits exist at once
# Tokens per packed row. Attention over a row costs N^2 whatever the mask hides, so a row holds at
# most this many (one long prompt + completion gets a row of its own).
PACK_TOKENS = 2048


class Packed(NamedTuple):
    """A micro-batch of prompt + completion sequences, right-padded."""

    input_ids: Tensor       # (B, L) prompt then completion tokens, then padding
    attention_mask: Tensor  # (B, L) 1 on real tokens
    positions: Tensor       # (B, T) index in input_ids of each completion token (0 on padding)
    targets: Tensor         # (B, T) completion token ids (0 on padding)
    mask: Tensor            # (B, T) True on completion tokens


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
         device: torch.device) -> Packed:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    B, L, T = len(prompts), max(lengths), max(max(len(c) for c in completions), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : lengths[i]] = torch.tensor([*p, *c])
        attention_mask[i, : lengths[i]] = 1
        positions[i, : len(c)] = torch.arange(len(p), len(p) + len(c))
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = True
    return Packed(*(t.to(device) for t in (input_ids, attention_mask, positions, targets, mask)))


class Segments(NamedTuple):
    """A micro-batch packed without per-completion padding: in each of R rows, every distinct prompt
    once, followed by its completions (all but their last token, which predicts nothing we need).
    A block mask lets each completion attend to its own prompt and to itself, causally."""

    input_ids: Tensor   # (R, N) prompts and completions back to back, then padding
    positions: Tensor   # (R, N) position of each token within its own prompt + completion
    allowed: Tensor     # (R, N, N) bool: query token i may attend to key token j
    index: Tensor       # (B, T) flat index (row * N + column) of the state predicting completion token t
    targets: Tensor     # (B, T) completion token ids (0 on padding)
    mask: Tensor        # (B, T) True on completion tokens


def pack_segments(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                  device: torch.device, row_tokens: int | None = None) -> Segments:
    """Rows of at most `row_tokens` tokens (default PACK_TOKENS; a longer prompt + completion gets a
    row of its own), filled in order: callers put a prompt's completions next to each other so it
    is stored once."""
    row_tokens = row_tokens or PACK_TOKENS
    B, T = len(completions), max(max(len(c) for c in completions), 1)
    rows: list[dict[str, list[int]]] = []  # per row: token, position, group (prompt), member (completion)
    groups: dict[tuple[int, ...], tuple[int, int]] = {}  # prompt -> (group, column of its last token), this row
    placed: list[tuple[int, int, int]] = []  # per completion: row, its prompt's last column, its first column
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        body = list(c[:-1])
        cost = len(body) + (0 if tuple(p) in groups else len(p))
        if not rows or (rows[-1]["token"] and len(rows[-1]["token"]) + cost > row_tokens):
            rows.append({"token": [], "position": [], "group": [], "member": []})
            groups = {}
        row = rows[-1]
        if tuple(p) not in groups:
            groups[tuple(p)] = (len(groups), len(row["token"]) + len(p) - 1)
            row["token"] += p
            row["position"] += range(len(p))
            row["group"] += [groups[tuple(p)][0]] * len(p)
            row["member"] += [-1] * len(p)
        group, last = groups[tuple(p)]
        placed.append((len(rows) - 1, last, len(row["token"])))
        row["token"] += body
        row["position"] += range(len(p), len(p) + len(body))
        row["group"] += [group] * len(body)
        row["member"] += [i] * len(body)
    R, N = len(rows), max(len(row["token"]) for row in rows)
    columns = {key: torch.full((R, N), fill, dtype=torch.long)
               for key, fill in (("token", pad_id), ("position", 0), ("group", -1), ("member", -2))}
    for r, row in enumerate(rows):
        for key, values in row.items():
            columns[key][r, : len(values)] = torch.tensor(values, dtype=torch.long)
    group, member = columns["group"], columns["member"]
    same_group = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
    visible = (member[:, None, :] == -1) | (member[:, :, None] == member[:, None, :])  # key is a prompt token, or ours
    causal = torch.ones((N, N), dtype=torch.bool).tril()
    # Padding attends to itself only: no query row is fully masked (that would give NaN).
    allowed = (same_group & visible & causal) | torch.eye(N, dtype=torch.bool)
    index = torch.zeros((B, T), dtype=torch.long)
    targets = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (c, (r, last, first)) in enumerate(zip(completions, placed, strict=True)):
        if not c:
            continue
        targets[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = True
        # Completion token 0 is predicted by its prompt's last token, token t by completion token t - 1.
        index[i, : len(c)] = r * N + torch.tensor([last, *range(first, first + len(c) - 1)], dtype=torch.long)
    return Segments(*(t.to(device) for t in (columns["token"], columns["position"], allowed, index, targets, mask)))


def _predicting_states(model: torch.nn.Module, batch: Packed | Segments) -> Tensor:
    """(B, T, H) final hidden states, the one at [b, t] being what predicts completion token t."""
    base = model.base_model
    if isinstance(batch, Packed):
        hidden = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        # The token at position p is predicted from the hidden state at p - 1.
        index = (batch.positions - 1).clamp(min=0)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    # A 4-D mask is used as given. SDPA takes it as bool (True = attend); eager attention adds it.
    mask = batch.allowed[:, None]
    if model.config._attn_implementation != "sdpa":
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    hidden = base(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.positions,
                  use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch.index]


def _token_logprobs(logp_all: Tensor, targets: Tensor, with_entropy: bool,
                    keep_probs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """From log_softmax(logits) (M, V), which it takes over: the targets' log-probs, the entropy
    (zeros unless `with_entropy`), and the softmax when it was computed (for the entropy, or kept
    for a backward).

    Callers get `logp_all` from one fused log_softmax, the only vocabulary-wide result the log-probs
    need (logsumexp and a subtraction would write two), and drop the logits right after it; the
    softmax is its exp and the entropy's product is taken in place, so at most two vocabulary-wide
    tensors are alive at once."""
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    if not (with_entropy or keep_probs):
        return logp, torch.zeros_like(logp), None
    if not with_entropy:
        return logp, torch.zeros_like(logp), logp_all.exp_()
    probs = logp_all.exp()
    return logp, -logp_all.mul_(probs).sum(-1), probs


class _TokenLogprob(torch.autograd.Function):
    """log_softmax(logits)[target] and the entropy of softmax(logits), row by row, from one softmax.

    Autograd through logsumexp and gather would recompute the softmax in backward (a subtraction
    and an exp over the whole vocabulary) and zero-fill a vocabulary-wide tensor for the gather;
    here the softmax of forward serves the entropy and the gradient, which is
    d logp / d logits = onehot(target) - softmax. The entropy carries no gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
        logp, entropy, probs = _token_logprobs(torch.log_softmax(logits, dim=-1), targets, with_entropy, keep_probs=True)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        probs, targets = ctx.saved_tensors
        return _logits_grad(probs, targets, grad_logp), None, None


def _logits_grad(probs: Tensor, targets: Tensor, grad_logp: Tensor) -> Tensor:
    """(M, V) gradient of logp (M,) = log_softmax(logits)[target] for upstream grad_logp: onehot - softmax.
    Not in place on `probs`: backward may run again (retain_graph)."""
    grad = probs * -grad_logp[:, None]
    return grad.scatter_add_(1, targets[:, None], grad_logp[:, None])


class _OutputLayerLogprob(torch.autograd.Function):
    """`_TokenLogprob` with the output layer folded in, for a weight whose gradient is accumulated
    in place (`accumulate_in_place`): backward adds grad_logits^T @ hidden straight into
    `weight.grad` (one addmm_) and hands autograd no gradient for the weight, so no vocabulary x
    hidden gradient (113 MB for SmolLM2) is allocated, page-faulted in and added per micro-batch."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        logp_all = torch.log_softmax(_scaled(hidden @ weight.t(), temperature), dim=-1)  # (M, V); logits dropped
        logp, entropy, probs = _token_logprobs(logp_all, targets, with_entropy, keep_probs=True)
        ctx.save_for_backward(hidden, probs, targets)
        ctx.weight, ctx.temperature = weight, temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        hidden, probs, targets = ctx.saved_tensors
        weight = ctx.weight
        grad = _logits_grad(probs, targets, grad_logp)  # (M, V)
        if ctx.temperature != 1.0:
            grad /= ctx.temperature
        grad = grad.to(weight.dtype)
        _grad_of(weight).addmm_(grad.t(), hidden)
        return (grad @ weight if ctx.needs_input_grad[0] else None), None, None, None, None


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    if logits.dtype in (torch.bfloat16, torch.float16):  # the softmax in fp32 (or better)
        logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def _chunk_logprobs(hidden: Tensor, targets: Tensor, head: torch.nn.Module,
                    temperature: float, with_entropy: bool = True) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy (zeros unless `with_entropy`) for (M, H) hidden states through
    the output layer."""
    if not torch.is_grad_enabled():  # no backward: the softmax only if the entropy needs it
        logp_all = torch.log_softmax(_scaled(head(hidden), temperature), dim=-1)  # the logits are dropped here
        return _token_logprobs(logp_all, targets, with_entropy, keep_probs=False)[:2]
    weight = getattr(head, "weight", None)
    if weight is not None and getattr(weight, _IN_PLACE, False):  # marked only on a bias-free nn.Linear
        return _OutputLayerLogprob.apply(hidden, weight, targets, temperature, with_entropy)
    return _TokenLogprob.apply(_scaled(head(hidden), temperature), targets, with_entropy)


def sequence_logprobs(model: torch.nn.Module, batch: Packed | Segments, temperature: float,
                      entropy: bool = True) -> tuple[Tensor, Tensor]:
    """Log-probs (B, T) of the completion tokens under log_softmax(logits / temperature), and
    per-token entropies (B, T, no gradient; all zeros with entropy=False, which saves a softmax
    over the vocabulary per token); zeros on padding."""
    hidden = _predicting_states(model, batch)
    picked = hidden[batch.mask]  # (M, H)
    targets = batch.targets[batch.mask]
    head = model.get_output_embeddings()
    logps, entropies = [], []
    # Each chunk's logits are recomputed in backward rather than kept, unless there is only one:
    # then keeping it holds no more than a chunk, and recomputing would be pure cost.
    recompute = torch.is_grad_enabled() and picked.shape[0] > LOGIT_CHUNK
    for start in range(0, picked.shape[0], LOGIT_CHUNK):
        h, t = picked[start : start + LOGIT_CHUNK], targets[start : start + LOGIT_CHUNK]
        if recompute:
            lp, ent = checkpoint(_chunk_logprobs, h, t, head, temperature, entropy, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, t, head, temperature, entropy)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.zeros(batch.mask.shape, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    if logps:
        logp = logp.masked_scatter(batch.mask, torch.cat(logps))
        entropy = entropy.masked_scatter(batch.mask, torch.cat(entropies))
    return logp, entropy


# Set on a parameter whose gradient the learner's own backward functions add straight into `.grad`.
_IN_PLACE = "_grpo_grad_in_place"


def accumulate_in_place(model: torch.nn.Module) -> None:
    """Have the backward of `model`'s output layer and input embedding add their weight gradients
    straight into `.grad` (the way Megatron-LM's gradient-accumulation fusion writes its linear
    layers' weight gradients) instead of returning them to autograd.

    Autograd returns each of them as a new vocabulary x hidden tensor per micro-batch: the output
    layer's weight gradient, and for the embedding a zero-filled one (or a sparse one, which a tied
    weight then copies into yet another dense tensor, since autograd never adds a sparse gradient
    in place). Each then is added to `.grad`. In place, `.grad` takes an addmm_ and an index_add_,
    and the update's peak memory loses two such tensors. Only for plain nn.Linear / nn.Embedding
    modules of an unsharded model (sharded gradients belong to FSDP), trained with .backward():
    torch.autograd.grad would not see these two gradients."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None and head.weight.requires_grad:
        setattr(head.weight, _IN_PLACE, True)
    if (type(embedding) is torch.nn.Embedding and embedding.weight.requires_grad and embedding.max_norm is None
            and not embedding.scale_grad_by_freq and not embedding.sparse):
        setattr(embedding.weight, _IN_PLACE, True)
        embedding.forward = functools.partial(_Lookup.apply, embedding.weight, embedding.padding_idx)


class _Lookup(torch.autograd.Function):
    """weight[ids]; backward index_adds the rows' gradients straight into weight.grad (rows of
    `padding_idx` get none, as nn.Embedding's) and hands autograd no gradient for the weight."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, padding_idx: int | None, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(ctx.weight.dtype)
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        _grad_of(ctx.weight).index_add_(0, ids, rows)
        return None, None, None


def _grad_of(weight: Tensor) -> Tensor:
    """weight.grad, zero-filled first when the update's first micro-batch has not made it yet."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad
