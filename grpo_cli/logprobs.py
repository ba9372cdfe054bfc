"""Log-probabilities of completion tokens, computed only where they are needed.

Only completion positions go through the output layer, in chunks of `logit_chunk` tokens (their
fp32 logits fill LOGIT_CHUNK_BYTES), each recomputed in backward when a micro-batch has more than
one, so the full-vocabulary logits (vocab x tokens x 4 bytes: 49k words make that 200 KB per
token) never exist for more than a chunk at a time. Per chunk, one fp32 vocabulary-wide tensor
serves the log-probs, the entropy and the gradient: the logits, turned in place into the softmax
and then into the logits' gradient (`_OutputLayerLogprob`).

Two batch layouts (the learner picks one per device, `model.share_prompts`): `pack`, one
right-padded row per completion, and `pack_segments`, rows holding each distinct prompt once
followed by its completions, back to back with no padding between them, under a block mask that
lets each completion see only its own prompt and itself. The second costs each group's prompt one
forward/backward instead of G and spends nothing on padding; attention over a packed row costs its
full length squared whatever the mask hides, though, and an arbitrary mask keeps SDPA off its
fastest kernels, so on a GPU it measured 20% slower (benchmarks/learner_layout.py, RESULTS.md).

On an unsharded model the output layer's and the embedding's weight gradients go straight into
`.grad` (`accumulate_in_place`).

Some models change the output layer's product before it becomes logits: Gemma-2 soft-caps it,
Granite and Cohere scale it. `detect_logit_form` finds out how by running the model's own forward
once, and the log-probs apply the same (a scale folds into the temperature).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from grpo_cli import onednn
from grpo_cli.errors import UserError

# fp32 logits of one chunk of completion tokens (logit_chunk): all the vocabulary-wide memory the
# log-probs hold at once, with a block of rows' temporaries (STATS_BLOCK_BYTES) and, in a bf16
# model, the chunk's logits in bf16 for as long as their conversion takes.
LOGIT_CHUNK_BYTES = 128 << 20
STATS_BLOCK_BYTES = 16 << 20
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


def _softmax_stats(z: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
    """Per row of the logits z (M, V), read only: logsumexp, and the entropy of the softmax (zeros
    unless `with_entropy`), a block of rows at a time so that no temporary exceeds STATS_BLOCK_BYTES."""
    lse = torch.empty(z.shape[0], dtype=z.dtype, device=z.device)
    entropy = torch.zeros_like(lse)
    rows = max(1, STATS_BLOCK_BYTES // (z.shape[1] * z.element_size()))
    for start in range(0, z.shape[0], rows):
        block = z[start : start + rows]
        lse[start : start + rows] = block_lse = torch.logsumexp(block, dim=-1)
        if with_entropy:
            logp = block - block_lse[:, None]
            entropy[start : start + rows] = -logp.exp().mul_(logp).sum(-1)
    return lse, entropy


def _token_logprobs(z: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """From logits z (M, V), read only: the targets' log-probs, the entropies and the logsumexps."""
    lse, entropy = _softmax_stats(z, with_entropy)
    return z.gather(1, targets[:, None]).squeeze(1) - lse, entropy, lse


def _logits(hidden: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """(M, V) hidden @ weight.T / temperature in fp32 (or better): a new tensor, free to write into."""
    return _scaled(onednn.product(hidden, weight), temperature, own=True)


def _scaled(logits: Tensor, temperature: float, own: bool = False) -> Tensor:
    """logits / temperature in fp32 (or better): the softmax is taken in fp32. own: the caller's
    own tensor, divided in place (a converted copy always is; the half-precision one is dropped)."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits, own = logits.float(), True
    if temperature == 1.0:
        return logits
    return logits.div_(temperature) if own else logits / temperature


def _softmax_grad_(probs: Tensor, targets: Tensor, grad_logp: Tensor) -> Tensor:
    """The logits' gradient, grad_logp * (onehot(target) - softmax), written over `probs` (M, V).
    `probs` is a saved tensor: autograd refuses a second backward through the same graph
    (retain_graph) once it has changed, rather than compute a wrong gradient."""
    return probs.mul_(-grad_logp[:, None]).scatter_add_(1, targets[:, None], grad_logp[:, None])


class _OutputLayerLogprob(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature)[target] and the softmax's entropy (no gradient),
    for a plain bias-free output layer, holding one fp32 vocabulary-wide tensor at a time.

    keep=True: the softmax (its exp, in place over the logits) is saved for backward. keep=False:
    only hidden and the logsumexp (M,) are saved; backward recomputes the logits (one matrix
    product and an exp) instead of re-running the whole forward, as activation checkpointing would.
    Backward turns the softmax into the logits' gradient in place (onehot - softmax); the weight's
    gradient goes straight into `weight.grad` (one addmm_, no vocabulary x hidden temporary) when
    the weight is marked (`accumulate_in_place`), else back to autograd."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool, keep: bool) -> tuple[Tensor, Tensor]:
        z = _logits(hidden, weight, temperature)
        logp, entropy, lse = _token_logprobs(z, targets, with_entropy)
        saved = z.sub_(lse[:, None]).exp_() if keep else lse  # the softmax, or what recomputes it
        ctx.save_for_backward(hidden, saved, targets)
        ctx.weight, ctx.temperature, ctx.keep = weight, temperature, keep
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        hidden, saved, targets = ctx.saved_tensors
        weight, temperature = ctx.weight, ctx.temperature
        probs = saved if ctx.keep else _logits(hidden, weight, temperature).sub_(saved[:, None]).exp_()
        grad = _softmax_grad_(probs, targets, grad_logp)
        if temperature != 1.0:
            grad.div_(temperature)
        grad = grad.to(weight.dtype)
        grad_hidden = onednn.product(grad, weight, transposed=False) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            if getattr(weight, _IN_PLACE, False):
                _grad_of(weight).addmm_(grad.t(), hidden)
            else:
                grad_weight = grad.t() @ hidden
        return grad_hidden, grad_weight, None, None, None, None


class _TokenLogprob(torch.autograd.Function):
    """`_OutputLayerLogprob` after any other output layer (sharded, adapted or with a bias), from
    its logits: the softmax is saved for backward (the caller's activation checkpointing recomputes
    it instead where it must), and the gradient is onehot(target) - softmax. The entropy carries no
    gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
        logp, entropy, lse = _token_logprobs(logits, targets, with_entropy)
        ctx.save_for_backward((logits - lse[:, None]).exp_(), targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        probs, targets = ctx.saved_tensors
        return _softmax_grad_(probs, targets, grad_logp), None, None


def _plain(head: torch.nn.Module) -> bool:
    """An output layer whose weight the log-probs may use directly: a bias-free nn.Linear (a
    sharded or adapted one is of another type, and goes through its own forward)."""
    return type(head) is torch.nn.Linear and head.bias is None


def _chunk_logprobs(hidden: Tensor, targets: Tensor, head: torch.nn.Module, temperature: float,
                    with_entropy: bool = True, keep: bool = True) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy (zeros unless `with_entropy`) for (M, H) hidden states through
    the output layer. With a backward to come, keep=False recomputes the logits in it."""
    if not torch.is_grad_enabled():
        z = _logits(hidden, head.weight, temperature) if _plain(head) else _scaled(head(hidden), temperature)
        return _token_logprobs(z, targets, with_entropy)[:2]
    if _plain(head):
        return _OutputLayerLogprob.apply(hidden, head.weight, targets, temperature, with_entropy, keep)
    if keep:
        return _TokenLogprob.apply(_scaled(head(hidden), temperature), targets, with_entropy)
    return checkpoint(_chunk_logprobs, hidden, targets, head, temperature, with_entropy, use_reentrant=False)


def logit_chunk(vocab: int) -> int:
    """Completion tokens per chunk: as many as LOGIT_CHUNK_BYTES of fp32 logits hold (682 with
    SmolLM2's 49,152-word vocabulary, 220 with Qwen2.5's 151,936)."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab))


class LogitForm(NamedTuple):
    """How a model's forward turns its output layer's product x into logits: x * scale, then, with
    a softcap, softcap * tanh(x * scale / softcap) (Gemma-2's final_logit_softcapping)."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, x: Tensor) -> Tensor:
        x = x * self.scale if self.scale != 1.0 else x
        return x if self.softcap is None else torch.tanh(x / self.softcap) * self.softcap


# Set on a model by detect_logit_form; sequence_logprobs reads it (a model without it: plain logits).
_FORM = "_grpo_logit_form"


def detect_logit_form(model: torch.nn.Module) -> LogitForm:
    """The LogitForm under which the log-probs reproduce `model`'s own logits, recorded on the model.

    Tried in turn on a few tokens: the scales and softcaps its config names (an attribute about the
    logits or the output layer: Granite's logits_scaling, which divides, or HyperCLOVA X's, which
    multiplies; Cohere's logit_scale; Falcon-H1's lm_head_multiplier; Gemma's final_logit_softcapping),
    then none. A model whose logits match none of them is refused rather than trained on log-probs
    that are not its own."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    ids = (torch.arange(1, 9) % vocab)[None].to(head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            theirs = model(input_ids=ids, use_cache=False).logits.float()
            ours = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(was_training)
    half = head.weight.dtype in (torch.bfloat16, torch.float16)
    tolerance = (2e-2 if half else 1e-4) * (1.0 + float(theirs.abs().max()))
    gap = float("inf")
    for form in (*_declared_forms(model.config), LogitForm()):
        gap = min(gap, float((form.apply(ours) - theirs).abs().max()))
        if gap <= tolerance:
            set_logit_form(model, form)
            return form
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise UserError(f"model type {kind}: its logits are not its output layer's product, scaled or soft-capped "
                    f"as its config says (off by {gap:.3g}), so grpo cannot compute its log-probs; "
                    "please report this model type")


def set_logit_form(model: torch.nn.Module, form: LogitForm) -> None:
    """Record `form` on a model of the same architecture as one detect_logit_form examined."""
    setattr(model, _FORM, form)


def _declared_forms(config: Any) -> list[LogitForm]:
    """Scales (and their inverses) and softcaps of the logits named in a model config, final ones first."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        configs.append(text)
    forms: list[tuple[bool, LogitForm]] = []
    for c in configs:
        for name, value in vars(c).items():
            key = name.lower()
            if (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
                    or "attn" in key or "attention" in key or not ("logit" in key or "lm_head" in key)):
                continue
            first = "final" in key
            if "softcap" in key or "soft_cap" in key:
                forms.append((first, LogitForm(softcap=float(value))))
            else:
                forms += [(first, LogitForm(scale=float(value))), (first, LogitForm(scale=1.0 / value))]
    return [form for first, form in sorted(forms, key=lambda f: not f[0])]


class _SoftCapped(torch.nn.Module):
    """An output layer followed by its model's LogitForm, for the log-probs' generic path."""

    def __init__(self, head: torch.nn.Module, form: LogitForm) -> None:
        super().__init__()
        self.head, self.form = head, form
        self.out_features = head.weight.shape[0]

    def forward(self, hidden: Tensor) -> Tensor:
        return self.form.apply(self.head(hidden))


def sequence_logprobs(model: torch.nn.Module, batch: Packed | Segments, temperature: float,
                      entropy: bool = True) -> tuple[Tensor, Tensor]:
    """Log-probs (B, T) of the completion tokens under log_softmax(logits / temperature), and
    per-token entropies (B, T, no gradient; all zeros with entropy=False, which saves a softmax
    over the vocabulary per token); zeros on padding. The logits are the model's own, as
    detect_logit_form found them (plain ones if it was not run)."""
    hidden = _predicting_states(model, batch)
    picked = hidden[batch.mask]  # (M, H)
    targets = batch.targets[batch.mask]
    head = model.get_output_embeddings()
    form = getattr(model, _FORM, LogitForm())
    if form.softcap is not None:
        head = _SoftCapped(head, form)
    else:  # logits * scale / temperature: the scale folds into the temperature
        temperature = temperature / form.scale
    chunk = logit_chunk(getattr(head, "out_features", None) or model.config.vocab_size)
    # Each chunk's logits are recomputed in backward rather than kept, unless there is only one:
    # then keeping it holds no more than a chunk, and recomputing would be pure cost.
    keep = picked.shape[0] <= chunk
    logps, entropies = [], []
    for start in range(0, picked.shape[0], chunk):
        h, t = picked[start : start + chunk], targets[start : start + chunk]
        lp, ent = _chunk_logprobs(h, t, head, temperature, entropy, keep)
        logps.append(lp)
        entropies.append(ent)
    logp = torch.zeros(batch.mask.shape, dtype=torch.promote_types(hidden.dtype, torch.float32),
                       device=hidden.device)
    entropy = torch.zeros_like(logp)
    if logps:
        logp = logp.masked_scatter(batch.mask, torch.cat(logps))
        entropy = entropy.masked_scatter(batch.mask, torch.cat(entropies))
    elif torch.is_grad_enabled():  # no completion tokens: zeros still joined to the model's graph, so a
        logp = logp + picked.sum() * 0  # backward through them runs (a zero gradient) instead of failing
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
    if _plain(head) and head.weight.requires_grad:
        setattr(head.weight, _IN_PLACE, True)
    if (type(embedding) is torch.nn.Embedding and embedding.weight.requires_grad and embedding.max_norm is None
            and not embedding.scale_grad_by_freq and not embedding.sparse):
        setattr(embedding.weight, _IN_PLACE, True)
        embedding.forward = functools.partial(_Lookup.apply, embedding.weight, embedding.padding_idx)


class _Lookup(torch.autograd.Function):
    """weight[ids]; backward index_adds the rows' gradients straight into weight.grad (rows of
    `padding_idx` get none, as nn.Embedding's) and hands autograd no gradient for the weight.

    The rows of a token that occurs many times (a prompt's, in every completion of its group) are
    first summed in fp32, so each row of .grad takes one add: a bf16 .grad that took them one by
    one would round after each (on a GPU index_add_ adds atomically, element by element)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, padding_idx: int | None, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        ids, where = ids.unique(return_inverse=True)
        sums = torch.zeros((len(ids), rows.shape[1]), dtype=torch.float32, device=rows.device)
        sums.index_add_(0, where, rows.float())
        _grad_of(ctx.weight).index_add_(0, ids, sums.to(ctx.weight.dtype))
        return None, None, None


def _grad_of(weight: Tensor) -> Tensor:
    """weight.grad, zero-filled first when the update's first micro-batch has not made it yet."""
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return weight.grad
