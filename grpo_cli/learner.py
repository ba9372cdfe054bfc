"""The learner: the policy, its frozen reference, the optimizer and schedule, and the GRPO update.

Log-probabilities are computed only at completion positions and through the output layer in
chunks of LOGIT_CHUNK tokens, each recomputed in backward (activation checkpointing) when a
micro-batch has more than one, so the full-vocabulary logits (vocab x tokens x 4 bytes: 49k words
make that 200 KB per token) never exist for more than a chunk at a time.

The G completions of a prompt share it: on a CPU by default (`model.share_prompts`) a micro-batch
is packed into rows holding each distinct prompt once followed by its completions, back to back
with no padding between them, and a block mask lets each completion see only its own prompt and
itself (`pack_segments`). Prompt tokens then cost one forward/backward per group instead of G, and
no time goes into padding short completions up to the longest one. Rows are ordered by prompt,
then by length, before they are cut into micro-batches, so a group stays together. On a GPU the
default is one right-padded row per completion (`pack`): attention over a packed row costs its
full length squared whatever the mask hides, and an arbitrary mask keeps SDPA off its fastest
kernels, so there packing measured 20% slower (benchmarks/learner_layout.py, RESULTS.md).
Gradients accumulate over micro-batches with weights that make the sum equal the full-batch
gradient for every aggregation (per-sequence or per-token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from grpo_cli import distributed
from grpo_cli.config import Config, ModelConfig
from grpo_cli.errors import UserError
from grpo_cli.loss import policy_loss
from grpo_cli.models import load_model, torch_dtype

LOGIT_CHUNK = 1024  # completion tokens whose full-vocabulary logits exist at once
# Tokens per packed row. Attention over a row costs N^2 whatever the mask hides, so a row holds at
# most this many (one long prompt + completion gets a row of its own).
PACK_TOKENS = 2048


class TrainingError(RuntimeError):
    """The update cannot go on (non-finite loss, out of memory): the message says what to change."""


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


def _token_logprobs(logits: Tensor, targets: Tensor, with_entropy: bool,
                    keep_probs: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """log_softmax(logits)[target], the entropy (zeros unless `with_entropy`), and softmax(logits)
    when it was computed (for the entropy, or kept for a backward).

    One fused log_softmax writes the only vocabulary-wide result the log-probs need (logsumexp
    followed by a subtraction writes two); the softmax is its exp, in place when nothing else
    reads it."""
    logp_all = torch.log_softmax(logits, dim=-1)  # (M, V)
    logp = logp_all.gather(1, targets[:, None]).squeeze(1)
    if not (with_entropy or keep_probs):
        return logp, torch.zeros_like(logp), None
    if not with_entropy:
        return logp, torch.zeros_like(logp), logp_all.exp_()
    probs = logp_all.exp()
    return logp, -(probs * logp_all).sum(-1), probs


class _TokenLogprob(torch.autograd.Function):
    """log_softmax(logits)[target] and the entropy of softmax(logits), row by row, from one softmax.

    Autograd through logsumexp and gather would recompute the softmax in backward (a subtraction
    and an exp over the whole vocabulary) and zero-fill a vocabulary-wide tensor for the gather;
    here the softmax of forward serves the entropy and the gradient, which is
    d logp / d logits = onehot(target) - softmax. The entropy carries no gradient."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor]:
        logp, entropy, probs = _token_logprobs(logits, targets, with_entropy, keep_probs=True)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        probs, targets = ctx.saved_tensors
        grad = probs * -grad_logp[:, None]  # not in place: backward may run again (retain_graph)
        grad.scatter_add_(1, targets[:, None], grad_logp[:, None])
        return grad, None, None


class _OutputLayerLogprob(torch.autograd.Function):
    """`_TokenLogprob` with the output layer folded in, for a weight whose gradient is accumulated
    in place (`_accumulate_in_place`): backward adds grad_logits^T @ hidden straight into
    `weight.grad` (one addmm_) and hands autograd no gradient for the weight, so no vocabulary x
    hidden gradient (113 MB for SmolLM2) is allocated, page-faulted in and added per micro-batch."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        logits = _scaled(hidden @ weight.t(), temperature)  # (M, V)
        logp, entropy, probs = _token_logprobs(logits, targets, with_entropy, keep_probs=True)
        ctx.save_for_backward(hidden, probs, targets)
        ctx.weight, ctx.temperature = weight, temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        hidden, probs, targets = ctx.saved_tensors
        weight = ctx.weight
        grad = probs * -grad_logp[:, None]  # (M, V); not in place: backward may run again (retain_graph)
        grad.scatter_add_(1, targets[:, None], grad_logp[:, None])
        if ctx.temperature != 1.0:
            grad /= ctx.temperature
        grad = grad.to(weight.dtype)
        _add_to_grad(weight, lambda out: torch.mm(grad.t(), hidden, out=out),
                     lambda acc: acc.addmm_(grad.t(), hidden))
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
        return _token_logprobs(_scaled(head(hidden), temperature), targets, with_entropy, keep_probs=False)[:2]
    weight = getattr(head, "weight", None)
    if weight is not None and getattr(weight, _IN_PLACE, False) and getattr(head, "bias", None) is None:
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


@dataclass
class MicroBatch:
    rows: Tensor             # (B,) indices into the step's completions
    packed: Packed | Segments
    engine_logp: Tensor      # (B, T) the rollout engine's log-probs of the same tokens
    ref_logp: Tensor | None  # (B, T) frozen reference model's log-probs (None when beta = 0)
    old_logp: Tensor | None  # (B, T) policy before this step's updates (only when num_iterations > 1)
    filler: bool = False     # sharded: a stand-in so that every rank runs as many micro-batches; weight 0


class Learner:
    """Under torchrun (grpo_cli.distributed) the policy and reference are sharded over the ranks
    with FSDP2 and each rank's `update` gets its own rows; the micro-batch weights use the global
    row and token counts and gradients are summed over ranks, so the step equals one process
    training on all the rows. Every method then must be called by all ranks together."""

    def __init__(self, cfg: Config, device: torch.device, pad_id: int) -> None:
        self.cfg, self.device, self.pad_id = cfg, device, pad_id
        self.sharded = distributed.world() > 1
        model_cfg, load_device = cfg.model, device
        if self.sharded:
            if cfg.model.lora_rank > 0:
                raise UserError("model.lora_rank > 0 is not supported with several learner processes (torchrun) "
                                "yet: train LoRA in one process, or set model.lora_rank=0")
            # fp32 master weights loaded on the host; FSDP moves each rank's shard to its device and
            # computes in model.dtype (bf16 on a GPU by default).
            model_cfg, load_device = dataclasses.replace(cfg.model, dtype="float32"), torch.device("cpu")
        compute_dtype = torch_dtype(cfg.model.dtype, device)
        # `policy` is always the plain transformers model; with LoRA its linear layers carry adapters
        # (injected in place by peft, whose wrapper `peft` is kept for adapter switching and saving).
        self.policy = load_model(model_cfg, load_device)
        self.peft = _add_lora(self.policy, cfg.model) if cfg.model.lora_rank > 0 else None
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.peft is not None:  # frozen embeddings: the checkpointed blocks still need an input grad
                self.policy.enable_input_require_grads()
        self.policy.config.use_cache = False
        # Packed rows need a 4-D attention mask, which flash-attention implementations do not take.
        share = cfg.model.share_prompts
        if share is None:  # on a GPU the padded layout was faster (module docstring)
            share = self.device.type != "cuda"
        self.share_prompts = share and self.policy.config._attn_implementation in ("sdpa", "eager")
        self.policy.train()
        if not self.sharded and self.device.type == "cpu":  # see _accumulate_in_place
            _accumulate_in_place(self.policy)
        self.reference = None
        if cfg.loss.beta != 0 and self.peft is None:  # the reference only feeds the KL term; with LoRA
            # it is the same model with its adapters switched off, so no second copy is loaded
            self.reference = load_model(model_cfg, load_device).eval().requires_grad_(False)
        if self.sharded:
            for model in (self.policy, self.reference):
                if model is not None:
                    distributed.shard(model, compute_dtype, {_LOGPROBS: sequence_logprobs})
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        opt = cfg.optimizer
        # Fused: one kernel over all parameters, no full-size temporaries (on SmolLM2-135M, CPU: 0.11 s a
        # step instead of 0.45 s, and ~0.5 GB less peak memory). Sharded parameters keep the default.
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.trainer.lr, betas=tuple(opt.betas),
                                           eps=opt.eps, weight_decay=opt.weight_decay, fused=not self.sharded)
        total = max(cfg.trainer.max_steps * cfg.trainer.num_iterations, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg.trainer.lr_scheduler, cfg.trainer.warmup_steps, total))
        # True while an update has changed some weights but not finished: such a state is not saved.
        self.dirty = False

    # ------------------------------------------------------------------ the update
    def update(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               engine_logprobs: Sequence[Sequence[float]], advantages: Tensor) -> dict[str, float]:
        """One GRPO step on N completions: num_iterations optimizer steps over the same rollouts.

        prompts/completions: token ids per completion; engine_logprobs: the sampler's log-prob of
        each completion token; advantages: (N,). Returns the step's statistics.
        """
        cfg = self.cfg
        temperature = cfg.rollout.temperature
        # Sharded, every rank runs as many micro-batches (each is a fixed sequence of collectives);
        # one with fewer rows makes up the difference with fillers of weight 0.
        local_count = math.ceil(len(completions) / cfg.trainer.micro_batch_size)
        count = int(distributed.all_reduce([float(local_count)], "max")[0])
        batches = list(self._micro_batches(prompts, completions, engine_logprobs, count))
        local_tokens = sum(int(mb.packed.mask.sum()) for mb in batches if not mb.filler)
        # The micro-batch weights below use the counts of the whole (global) batch.
        n_rows, n_tokens = (int(x) for x in distributed.all_reduce([float(len(completions)), float(local_tokens)]))
        # One extra zero at index N: the advantage of the filler rows.
        advantages = torch.cat([advantages.to(self.device, torch.float32), torch.zeros(1, device=self.device)])
        totals: dict[str, float] = {}
        # Summed on the device and read once at the end: a read per micro-batch would stall a GPU.
        zero = torch.zeros((), device=self.device)
        diffs_max, diffs_sum, entropy_sum = zero, zero, zero
        grad_norm = 0.0
        for iteration in range(cfg.trainer.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for mb in batches:
                logp, entropy = _logprobs(self.policy, mb.packed, temperature)
                mask = mb.packed.mask
                old = mb.old_logp if mb.old_logp is not None else logp.detach()
                is_weight = None
                if cfg.loss.tis_cap is not None:  # the engine sampled; the learner's old policy is what we train
                    is_weight = torch.exp(old - mb.engine_logp).clamp(max=cfg.loss.tis_cap)
                loss, stats = policy_loss(
                    logp, old, advantages[mb.rows], mask, ref_logp=mb.ref_logp, beta=cfg.loss.beta,
                    clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high, agg=cfg.loss.agg,
                    max_tokens=cfg.rollout.max_new_tokens, kl=cfg.loss.kl, ratio_level=cfg.loss.ratio_level,
                    is_weight=is_weight)
                finite = math.isfinite(stats["loss"])  # already read back with the other stats
                if distributed.all_reduce([0.0 if finite else 1.0], "max")[0]:  # on any rank: all stop together
                    value = "not finite on another rank" if finite else f"{loss.item()} (not finite)"
                    raise TrainingError(f"loss is {value}; the weights were not updated. "
                                        "Lower trainer.lr or raise loss.adv_eps; the last checkpoint is intact")
                # Weighted so that summing over micro-batches (and ranks) gives the full batch's loss exactly.
                if mb.filler:
                    share = 0.0
                elif cfg.loss.agg == "token_mean":
                    share = int(mask.sum()) / max(n_tokens, 1)
                else:
                    share = len(mb.rows) / n_rows
                (loss * share).backward()
                if iteration == 0:
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value * share
                    if not mb.filler:
                        with torch.no_grad():
                            diff = torch.where(mask, (logp.detach() - mb.engine_logp).abs(), 0.0)
                            diffs_max = torch.maximum(diffs_max, diff.max())
                            diffs_sum = diffs_sum + diff.sum()
                            entropy_sum = entropy_sum + torch.where(mask, entropy, 0.0).sum()
            # Sharded: the gradients are DTensors and the norm is that of the whole gradient.
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.trainer.max_grad_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            if not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingError(f"gradient norm is {grad_norm}; the weights were not updated. "
                                    "Lower trainer.lr; the last checkpoint is intact")
            self.dirty = True
            self.optimizer.step()
            self.scheduler.step()
        self.dirty = False
        keys = sorted(totals)
        entropy_sum, diffs_sum, diffs_max = torch.stack([entropy_sum, diffs_sum, diffs_max]).tolist()
        summed = distributed.all_reduce([totals[k] for k in keys] + [entropy_sum, diffs_sum])
        totals = dict(zip(keys, summed, strict=False))
        entropy_sum, diffs_sum = summed[-2:]
        diffs_max = distributed.all_reduce([diffs_max], "max")[0]
        return {
            **totals,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "entropy": entropy_sum / max(n_tokens, 1),
            "rollout/logprob_diff_max": diffs_max,
            "rollout/logprob_diff_mean": diffs_sum / max(n_tokens, 1),
            "tokens/trained": float(n_tokens),
        }

    def _micro_batches(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                       engine_logprobs: Sequence[Sequence[float]], count: int = 0) -> Iterator[MicroBatch]:
        """The rows cut into micro-batches, then filler micro-batches (one padding row each, whose row
        index N points at a zero advantage) up to `count` in all."""
        size = self.cfg.trainer.micro_batch_size
        temperature = self.cfg.rollout.temperature
        if self.share_prompts:
            # A group's rows together (they share one prompt), groups of similar length together.
            first_seen: dict[tuple[int, ...], int] = {}
            for i, p in enumerate(prompts):
                first_seen.setdefault(tuple(p), i)
            order = sorted(range(len(completions)), key=lambda i: (len(prompts[i]), first_seen[tuple(prompts[i])],
                                                                   len(completions[i])))
        else:  # sorting by length keeps sequences of similar length together: little padding
            order = sorted(range(len(completions)), key=lambda i: len(prompts[i]) + len(completions[i]))
        packer = pack_segments if self.share_prompts else pack
        cuts = [order[start : start + size] for start in range(0, len(order), size)]
        fillers = max(count - len(cuts), 0)
        for k, rows in enumerate(cuts + [[len(completions)]] * fillers):
            filler = k >= len(cuts)
            if filler:
                packed = packer([[self.pad_id]], [[self.pad_id, self.pad_id]], self.pad_id, self.device)
            else:
                packed = packer([prompts[i] for i in rows], [completions[i] for i in rows], self.pad_id, self.device)
            engine = torch.zeros(packed.mask.shape, dtype=torch.float32)
            for j, i in enumerate([] if filler else rows):
                engine[j, : len(engine_logprobs[i])] = torch.tensor(engine_logprobs[i], dtype=torch.float32)
            with torch.no_grad():
                ref = None
                if self.cfg.loss.beta != 0:
                    ref = self._reference_logprobs(packed, temperature)
                old = None
                if self.cfg.trainer.num_iterations > 1:  # the ratio needs the pre-update policy fixed
                    old = _logprobs(self.policy, packed, temperature, entropy=False)[0]
            yield MicroBatch(torch.tensor(rows, device=self.device), packed, engine.to(self.device), ref, old, filler)

    def _reference_logprobs(self, packed: Packed | Segments, temperature: float) -> Tensor:
        if self.peft is not None:
            with self.peft.disable_adapter():
                return sequence_logprobs(self.policy, packed, temperature, entropy=False)[0]
        assert self.reference is not None
        return _logprobs(self.reference, packed, temperature, entropy=False)[0]

    # ------------------------------------------------------------------ state
    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(HF name, tensor) pairs of the policy in state-dict order, for a rollout engine or a
        checkpoint. With LoRA: the base weights with each adapter's update merged in, under the
        base model's own names (the adapters themselves are left out).

        Sharded: whole tensors on every rank, each gathered as it is reached, so all ranks must
        iterate together to the end (a weight push does: each rank fills its own engine)."""
        if self.sharded:
            yield from distributed.full_tensors(self.policy.state_dict().items())
            return
        if self.peft is None:
            for name, tensor in self.policy.state_dict().items():
                yield name, tensor.detach()
            return
        adapters = dict(self.policy.named_modules())
        for name, tensor in self.policy.state_dict().items():
            if ".lora_" in name:
                continue
            if ".base_layer." in name:
                module, leaf = name.split(".base_layer.")
                if leaf == "weight":
                    with torch.no_grad():
                        tensor = tensor + adapters[module].get_delta_weight("default")
                name = f"{module}.{leaf}"
            yield name, tensor.detach()

    def save_weights(self, folder: Path) -> None:
        """A Hugging Face model folder (merged weights with LoRA), plus adapter/ with LoRA for resuming.
        Sharded: every rank takes part, rank 0 writes the fp32 master weights."""
        if self.sharded:
            full = dict(distributed.full_tensors(self.policy.state_dict().items(), keep=False, to_cpu=True))
            if distributed.is_main():
                self.policy.save_pretrained(folder, state_dict=full, safe_serialization=True)
            return
        if self.peft is None:
            self.policy.save_pretrained(folder, safe_serialization=True)
            return
        self.policy.save_pretrained(folder, state_dict=dict(self.named_weights()), safe_serialization=True)
        self.peft.save_pretrained(folder / "adapter")

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule. Sharded: the optimizer state gathered whole (complete on rank 0
        only), in the layout one process saves, so a checkpoint resumes on any number of ranks."""
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            optimizer["state"] = {index: dict(distributed.full_tensors(sorted(values.items()), keep=False, to_cpu=True))
                                  for index, values in sorted(optimizer["state"].items())}
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], weights_dir: Path) -> None:
        from safetensors.torch import load_file

        optimizer = state["optimizer"]
        if self.sharded:  # whole tensors in the file: each rank keeps its own piece
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer = {**optimizer, "state": {
                index: {k: distributed.shard_like(v, params[index]) if isinstance(v, Tensor) else v
                        for k, v in values.items()}
                for index, values in optimizer["state"].items()}}
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.peft is not None:
            from peft import set_peft_model_state_dict

            adapter = weights_dir / "adapter" / "adapter_model.safetensors"
            if not adapter.is_file():
                raise TrainingError(f"checkpoint {weights_dir} has no LoRA adapter (adapter/): it was not "
                                    "trained with model.lora_rank > 0")
            result = set_peft_model_state_dict(self.peft, load_file(adapter, device=str(self.device)))
            if result.unexpected_keys:
                raise TrainingError(f"checkpoint {adapter} does not match model.lora_*: unexpected "
                                    f"{result.unexpected_keys[:3]}")
            return
        tensors: dict[str, Tensor] = {}
        for shard in sorted(weights_dir.glob("*.safetensors")):
            tensors.update(load_file(shard, device="cpu" if self.sharded else str(self.device)))
        if self.sharded:
            current = self.policy.state_dict()
            missing, unexpected = [k for k in current if k not in tensors], [k for k in tensors if k not in current]
            for name, target in current.items():
                if name in tensors:
                    distributed.load_full(target, tensors[name])
        else:
            missing, unexpected = self.policy.load_state_dict(tensors, strict=False)
        # A tied output layer is saved once, under the input embedding's name.
        missing = [k for k in missing if not (k.endswith("lm_head.weight") and self.policy.config.tie_word_embeddings)]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {weights_dir} does not match the model: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")


_LOGPROBS = "grpo_sequence_logprobs"  # sharded models: sequence_logprobs as an FSDP forward method


def _logprobs(model: torch.nn.Module, batch: Packed | Segments, temperature: float,
              entropy: bool = True) -> tuple[Tensor, Tensor]:
    """`sequence_logprobs`; on a sharded model through its root's FSDP hooks (see distributed.shard),
    because it calls the base model and the output layer directly, not the root's forward."""
    forward = getattr(model, _LOGPROBS, None)
    if forward is not None:
        return forward(batch, temperature, entropy=entropy)
    return sequence_logprobs(model, batch, temperature, entropy=entropy)


# Set on a parameter whose gradient the learner's own backward functions add straight into `.grad`.
_IN_PLACE = "_grpo_grad_in_place"


def _accumulate_in_place(model: torch.nn.Module) -> None:
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
        _add_to_grad(ctx.weight, lambda out: out.zero_().index_add_(0, ids, rows),
                     lambda acc: acc.index_add_(0, ids, rows))
        return None, None, None


def _add_to_grad(weight: Tensor, first: Callable[[Tensor], Tensor], more: Callable[[Tensor], Tensor]) -> None:
    """weight.grad = first(new buffer) when it has none yet, else more(weight.grad), in place."""
    if weight.grad is None:
        weight.grad = first(torch.empty_like(weight))
    else:
        more(weight.grad)


def keep_freed_host_memory() -> bool:
    """Make glibc keep the memory a CPU learner frees, for its next micro-batch, instead of giving it
    back to the operating system. Returns whether the setting took (glibc only).

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it when freed, so each
    vocabulary-wide tensor (a logit chunk, its log-softmax, softmax and gradient: ~55 MB each for
    SmolLM2 at ~300 tokens) is page-faulted in anew, several per micro-batch. On the 2-core
    benchmark VM, filling a fresh 113 MB tensor took 20-150 ms (the more, the less of the VM's
    memory had been touched since it booted) against 3 ms for memory the process already held.
    Here allocations come from the heap (no mmap) and freed memory stays there (up to 2 GiB of it at
    the heap's top), as PyTorch's caching allocator keeps freed memory on a GPU.
    Called once the models and the rollout engine are loaded, so that their long-lived tensors keep
    their own mappings and only the loop's short-lived ones share the heap."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    # The largest threshold mallopt takes (2 GiB of free memory at the heap's top before it trims).
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _add_lora(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """Inject LoRA adapters into `model` in place (its other weights frozen); returns peft's wrapper."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("model.lora_rank > 0 needs the peft package: pip install 'grpo-cli[lora]' "
                        "(or pip install peft)") from None
    targets: str | list[str] = list(cfg.lora_target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"  # every linear layer except the output layer
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _schedule(kind: str, warmup: int, total: int):  # noqa: ANN202
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return factor
