"""The learner: the policy, its frozen reference, the optimizer and schedule, and the GRPO update.

Each micro-batch's log-probs come from grpo_cli.logprobs (completion positions only, in chunks of
the output layer). On a CPU by default (`model.share_prompts`) a micro-batch is packed into rows
that hold each prompt once before its completions; rows are ordered by prompt, then by length,
before they are cut into micro-batches, so a group stays together. On a GPU each completion gets a
right-padded row of its own (grpo_cli.logprobs says why). Gradients accumulate over micro-batches
with weights that make the sum equal the full-batch gradient for every aggregation (per-sequence
or per-token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grpo_cli import distributed, onednn
from grpo_cli.errors import UserError, first_line
from grpo_cli.logprobs import (
    Packed,
    Segments,
    accumulate_in_place,
    detect_logit_form,
    pack,
    pack_segments,
    sequence_logprobs,
    set_logit_form,
)
from grpo_cli.loss import policy_loss
from grpo_cli.models import disable_dropout, load_model, torch_dtype
from grpo_cli.schema import Config, ModelConfig


class TrainingError(RuntimeError):
    """The update cannot go on (non-finite loss, out of memory): the message says what to change."""


@dataclass
class MicroBatch:
    rows: Tensor             # (B,) indices into the step's completions
    packed: Packed | Segments
    engine_logp: Tensor      # (B, T) the rollout engine's log-probs of the same tokens
    ref_logp: Tensor | None  # (B, T) frozen reference model's log-probs (None when beta = 0)
    old_logp: Tensor | None  # (B, T) the policy that sampled, before this step's updates, without dropout
                             # (only when num_iterations > 1 or model.lora_dropout > 0; see Learner.update)
    filler: bool = False     # sharded: a stand-in so that every rank runs as many micro-batches; weight 0


def refuse_sharded_lora(cfg: Config) -> None:
    """LoRA is not sharded yet: a Learner under torchrun refuses it (grpo_cli.loop says so before any loads)."""
    if cfg.model.lora_rank > 0:
        raise UserError("model.lora_rank > 0 is not supported with several learner processes (torchrun) yet: train "
                        "LoRA in one process, or set model.lora_rank=0")


class Learner:
    """Under torchrun (grpo_cli.distributed) the policy and reference are sharded over the ranks
    with FSDP2 and each rank's `update` gets its own rows; the micro-batch weights use the global
    row and token counts and gradients are summed over ranks, so the step equals one process
    training on all the rows. Every method then must be called by all ranks together."""

    def __init__(self, cfg: Config, device: torch.device, pad_id: int) -> None:
        self.cfg, self.device, self.pad_id = cfg, device, pad_id
        if torch_dtype(cfg.model.dtype, device) == torch.float16:
            # Without loss scaling float16 gradients underflow: on a 2-layer model and 8k completion tokens,
            # 92% of the embedding's gradient entries came out 0 and an attention weight's gradient 31% off.
            raise UserError("model.dtype=float16: training needs loss scaling in float16, which grpo does not do "
                            "(small gradients round to 0); use model.dtype=bfloat16 or float32")
        self.sharded = distributed.world() > 1
        model_cfg, load_device = cfg.model, device
        if self.sharded:
            refuse_sharded_lora(cfg)
            # fp32 master weights loaded on the host; FSDP moves each rank's shard to its device and
            # computes in model.dtype (bf16 on a GPU by default).
            model_cfg, load_device = dataclasses.replace(cfg.model, dtype="float32"), torch.device("cpu")
        compute_dtype = torch_dtype(cfg.model.dtype, device)
        # `policy` is always the plain transformers model; with LoRA its linear layers carry adapters
        # (injected in place by peft, whose wrapper `peft` is kept for adapter switching and saving).
        self.policy = load_model(model_cfg, load_device)
        disable_dropout(self.policy)  # before LoRA: model.lora_dropout is the user's own choice
        form = detect_logit_form(self.policy)  # before adapters, which start as a no-op anyway
        self.peft = _add_lora(self.policy, cfg.model) if cfg.model.lora_rank > 0 else None
        if cfg.model.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.peft is not None:  # frozen embeddings: the checkpointed blocks still need an input grad
                self.policy.enable_input_require_grads()
        self.use_cache = self.policy.config.use_cache  # the model's own, for the checkpoints' config.json
        self.policy.config.use_cache = False  # the learner's forwards build no KV cache
        # Packed rows need a 4-D attention mask, which flash-attention implementations do not take.
        share = cfg.model.share_prompts
        if share is None:  # on a GPU the padded layout was faster (module docstring)
            share = self.device.type != "cuda"
        self.share_prompts = share and self.policy.config._attn_implementation in ("sdpa", "eager")
        self.policy.train()
        if not self.sharded:  # sharded gradients belong to FSDP
            accumulate_in_place(self.policy)
        # Dropout left on in the policy (the user's model.lora_dropout): the engine samples without it.
        self.dropout = self.peft is not None and cfg.model.lora_dropout > 0
        self.reference = None
        if cfg.loss.beta != 0 and self.peft is None:  # the reference only feeds the KL term; with LoRA
            # it is the same model with its adapters switched off, so no second copy is loaded
            self.reference = load_model(model_cfg, load_device).eval().requires_grad_(False)
            set_logit_form(self.reference, form)  # the same architecture
        if onednn.wanted(cfg.model.cpu_matmul, device, self.sharded):
            for model in (self.policy, self.reference):
                if model is not None:
                    onednn.use_onednn(model)
        if self.sharded:
            for model in (self.policy, self.reference):
                if model is not None:
                    distributed.shard(model, compute_dtype, {_LOGPROBS: sequence_logprobs})
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        opt = cfg.optimizer
        # fp32 master weights: the optimizer steps fp32 copies of the half-precision weights and copies
        # them back, as mixed-precision training does (Micikevicius et al., 2018). Stepped in bf16, an
        # AdamW step of ~lr (1e-6) is below half a unit in the last place of any weight above ~3e-4
        # and rounds away. Sharded weights are fp32 already.
        half = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.trainable)
        use_masters = half and not self.sharded and opt.master_weights is not False
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in self.trainable] if use_masters else None
        # Fused: one kernel over all parameters, no full-size temporaries (on SmolLM2-135M, CPU: 0.11 s a
        # step instead of 0.45 s, and ~0.5 GB less peak memory). Sharded parameters keep the default.
        self.optimizer = torch.optim.AdamW(self.masters or self.trainable, lr=cfg.trainer.lr, betas=tuple(opt.betas),
                                           eps=opt.eps, weight_decay=opt.weight_decay, fused=not self.sharded)
        # The scheduler steps with the optimizer (within a step of num_iterations, too); max_steps and
        # warmup_steps count training steps, and `at_step` puts it where each training step starts.
        iterations = cfg.trainer.num_iterations
        total = max(cfg.trainer.max_steps * iterations, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(cfg.trainer.lr_scheduler, cfg.trainer.warmup_steps * iterations, total))
        # True while an update has changed some weights but not finished: such a state is not saved.
        self.dirty = False

    # ------------------------------------------------------------------ the update
    def at_step(self, step: int) -> None:
        """Put the schedule at the start of training step `step` (from 1), whose first optimizer step is
        (step - 1) * num_iterations: a step with no update (nothing to train on) still counts, and a
        resume with another trainer.num_iterations goes on where its steps took it."""
        self.scheduler.last_epoch = (step - 1) * self.cfg.trainer.num_iterations
        self._set_lr()

    def _set_lr(self) -> None:
        """Each parameter group's lr from the schedule at the scheduler's position."""
        for group, lr_lambda in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True):
            group["lr"] = self.cfg.trainer.lr * lr_lambda(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def update(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               engine_logprobs: Sequence[Sequence[float]], advantages: Tensor) -> dict[str, float]:
        """One GRPO step on N completions: num_iterations optimizer steps over the same rollouts.

        prompts/completions: token ids per completion; engine_logprobs: the sampler's log-prob of
        each completion token; advantages: (N,). Returns the step's statistics: loss, pg_loss and kl
        of the policy before the step's updates (no kl with loss.beta=0: there is no reference model);
        the ratio and clipping statistics over all
        num_iterations (with one, the ratio is exactly 1: the old policy is the policy); lr, that of
        the step's first optimizer step. Per-token
        statistics are means over the batch's tokens, however it is cut into micro-batches.

        With model.lora_dropout > 0 the policy's forward is a dropout sample, but the policy that sampled
        (the engine's) has no dropout. So the old log-probs are computed without it, in eval mode: with
        num_iterations > 1 the ratio is then new policy (with dropout) over the policy that sampled, and
        not one dropout sample over another; and the truncated importance weight (loss.tis_cap) and
        rollout/logprob_diff_* compare the engine with the learner's copy of that same policy, so
        that they show the engine/learner mismatch, not the dropout noise. With one iteration the ratio
        stays exactly 1 (the dropout sample's own log-probs, detached).
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
        iterations = cfg.trainer.num_iterations
        totals: dict[str, float] = {}
        ratio_min, ratio_max = math.inf, -math.inf
        # Summed on the device and read once at the end: a read per micro-batch would stall a GPU.
        zero = torch.zeros((), device=self.device)
        diffs_max, diffs_sum, entropy_sum = zero, zero, zero
        grad_norm = 0.0
        # The lr this update steps with (its first step, as loss and kl describe its first pass): the
        # scheduler's value after the update would be the next step's.
        lr = self.optimizer.param_groups[0]["lr"]
        for iteration in range(iterations):
            self._zero_grad()
            for mb in batches:
                logp, entropy = _logprobs(self.policy, mb.packed, temperature)
                mask = mb.packed.mask
                # The policy that sampled, as the learner computes it (without dropout: see the docstring).
                sampled = mb.old_logp if mb.old_logp is not None else logp.detach()
                old = sampled if iterations > 1 else logp.detach()
                is_weight = None
                if cfg.loss.tis_cap is not None:  # the engine sampled; the learner's old policy is what we train
                    is_weight = torch.exp(sampled - mb.engine_logp).clamp(max=cfg.loss.tis_cap)
                loss, stats = policy_loss(
                    logp, old, advantages[mb.rows], mask, ref_logp=mb.ref_logp, beta=cfg.loss.beta,
                    clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high, agg=cfg.loss.agg,
                    max_tokens=cfg.rollout.max_new_tokens, kl=cfg.loss.kl, ratio_level=cfg.loss.ratio_level,
                    is_weight=is_weight)
                finite = math.isfinite(stats["loss"])  # already read back with the other stats
                if distributed.all_reduce([0.0 if finite else 1.0], "max")[0]:  # on any rank: all stop together
                    value = "not finite on another rank" if finite else f"{loss.item()} (not finite)"
                    raise TrainingError(f"loss is {value}{_unsaved(iteration)}. "
                                        "Lower trainer.lr or raise loss.adv_eps; the last checkpoint is intact")
                # Weighted so that summing over micro-batches (and ranks) gives the full batch's loss exactly.
                if mb.filler:
                    share = 0.0
                elif cfg.loss.agg == "token_mean":
                    share = int(mask.sum()) / max(n_tokens, 1)
                else:
                    share = len(mb.rows) / n_rows
                (loss * share).backward()
                # The loss weighted as aggregated, per-token statistics by tokens (see the docstring).
                tokens = 0 if mb.filler else int(mask.sum())
                token_share = tokens / max(n_tokens, 1)
                if tokens:
                    ratio_min, ratio_max = min(ratio_min, stats["ratio_min"]), max(ratio_max, stats["ratio_max"])
                for key in _PER_ITERATION:
                    totals[key] = totals.get(key, 0.0) + stats[key] * token_share / iterations
                if iteration == 0:
                    for key in ("loss", "pg_loss"):
                        totals[key] = totals.get(key, 0.0) + stats[key] * share
                    if cfg.loss.beta != 0:  # without a reference model there is no KL to report (not 0)
                        totals["kl"] = totals.get("kl", 0.0) + stats["kl"] * token_share
                    if not mb.filler:
                        with torch.no_grad():
                            diff = torch.where(mask, (sampled - mb.engine_logp).abs(), 0.0)
                            diffs_max = torch.maximum(diffs_max, diff.max())
                            diffs_sum = diffs_sum + diff.sum()
                            entropy_sum = entropy_sum + torch.where(mask, entropy, 0.0).sum()
            stepped = self._master_grads()
            # Sharded: the gradients are DTensors and the norm is that of the whole gradient.
            norm = torch.nn.utils.clip_grad_norm_(stepped, cfg.trainer.max_grad_norm)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
            if not math.isfinite(grad_norm):
                self._zero_grad()
                raise TrainingError(f"gradient norm is {grad_norm}{_unsaved(iteration)}. "
                                    "Lower trainer.lr; the last checkpoint is intact")
            self.dirty = True
            self.optimizer.step()
            self.scheduler.step()
            if self.masters is not None:
                self._copy(self.trainable, self.masters)
        self.dirty = False
        keys = sorted(totals)
        entropy_sum, diffs_sum, diffs_max = torch.stack([entropy_sum, diffs_sum, diffs_max]).tolist()
        summed = distributed.all_reduce([totals[k] for k in keys] + [entropy_sum, diffs_sum])
        totals = dict(zip(keys, summed, strict=False))
        entropy_sum, diffs_sum = summed[-2:]
        diffs_max, ratio_max = distributed.all_reduce([diffs_max, ratio_max], "max")
        ratio_min = distributed.all_reduce([ratio_min], "min")[0]
        if not math.isfinite(ratio_min):  # no completion tokens at all
            ratio_min = ratio_max = 1.0
        return {
            **totals,
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "grad_norm": grad_norm,
            "lr": lr,
            "entropy": entropy_sum / max(n_tokens, 1),
            "rollout/logprob_diff_max": diffs_max,
            "rollout/logprob_diff_mean": diffs_sum / max(n_tokens, 1),
            "tokens/trained": float(n_tokens),
        }

    @staticmethod
    @torch.no_grad()
    def _copy(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    def _zero_grad(self) -> None:
        # A CPU learner keeps its gradients' memory, zeroed in place: allocated anew each update, they
        # land among the heap's freed blocks and split it (keep_freed_host_memory).
        self.optimizer.zero_grad(set_to_none=self.device.type != "cpu")
        if self.masters is not None:
            for p in self.trainable:
                p.grad = None

    def _master_grads(self) -> list[Tensor]:
        """The parameters the optimizer steps, their gradients in place: with master weights, the
        policy's half-precision gradients moved to the fp32 copies (each freed once copied)."""
        if self.masters is None:
            return self.trainable
        for p, master in zip(self.trainable, self.masters, strict=True):
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        return self.masters

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
                if self.cfg.trainer.num_iterations > 1 or self.dropout:  # the ratio needs it fixed (see update)
                    old = self._sampling_logprobs(packed, temperature)
            yield MicroBatch(torch.tensor(rows, device=self.device), packed, engine.to(self.device), ref, old, filler)

    def _sampling_logprobs(self, packed: Packed | Segments, temperature: float) -> Tensor:
        """The policy's log-probs as the engine samples from it: without dropout (model.lora_dropout)."""
        if not self.dropout:
            return _logprobs(self.policy, packed, temperature, entropy=False)[0]
        self.policy.eval()
        try:
            return _logprobs(self.policy, packed, temperature, entropy=False)[0]
        finally:
            self.policy.train()

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
        base model's own names (the adapters themselves are left out), each in its base weight's dtype
        (the fp32 adapters' update rounded in: a bf16 model's checkpoint stays bf16, as the engine holds it).

        Sharded: whole tensors on every rank, each gathered as it is reached, so all ranks must
        iterate together to the end (a weight push does: each rank fills its own engine)."""
        if self.sharded:
            yield from distributed.full_tensors(self.policy.state_dict().items())
            return
        if self.peft is None:
            for name, tensor in self.policy.state_dict().items():
                yield name, tensor.detach()
            return
        from peft.tuners.lora import ParamWrapper
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Each adapter by the plain name of the weight it updates: a layer's `weight`, or for a ParamWrapper
        # (mixture-of-experts models: the experts' fused 3-D weights) the parameter it wraps. Two parameters of
        # one module are wrapped twice (mlp.experts.base_layer.base_layer.gate_up_proj).
        adapters = {f"{_unwrapped(name)}.{m.parameter_name if isinstance(m, ParamWrapper) else 'weight'}": m
                    for name, m in self.policy.named_modules() if isinstance(m, BaseTunerLayer)}
        for name, tensor in self.policy.state_dict().items():
            if ".lora_" in name:
                continue
            name = _unwrapped(name)
            if name in adapters:
                with torch.no_grad():
                    tensor = (tensor + adapters[name].get_delta_weight("default")).to(tensor.dtype)
            yield name, tensor.detach()

    def save_weights(self, folder: Path) -> None:
        """A Hugging Face model folder (merged weights with LoRA), plus adapter/ with LoRA for resuming.
        Sharded: every rank takes part, rank 0 writes the fp32 master weights."""
        self.policy.config.use_cache = self.use_cache  # a checkpoint generates like the model it came from
        try:
            self._save_weights(folder)
        finally:
            self.policy.config.use_cache = False

    def _save_weights(self, folder: Path) -> None:
        if self.sharded:
            aliases = _aliases(self.policy)
            named = [(name, t) for name, t in self.policy.state_dict().items() if name not in aliases]
            full = dict(distributed.full_tensors(named, keep=False, to_cpu=True))
            if distributed.is_main():
                self.policy.save_pretrained(folder, state_dict=full, safe_serialization=True)
            return
        if self.peft is None:
            self.policy.save_pretrained(folder, safe_serialization=True)
            return
        self.policy.save_pretrained(folder, state_dict=dict(self.named_weights()), safe_serialization=True)
        # The embeddings are never resized: without this peft looks the base model's config up at each
        # save (a Hub request for a Hub model, two warnings without a network) to check that they were not.
        self.peft.save_pretrained(folder / "adapter", save_embedding_layers=False)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and schedule, and the fp32 master weights where there are (the saved model holds
        them rounded). Sharded: the optimizer state gathered whole (complete on rank 0 only), in the
        layout one process saves, so a checkpoint resumes on any number of ranks."""
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            optimizer["state"] = {index: dict(distributed.full_tensors(sorted(values.items()), keep=False, to_cpu=True))
                                  for index, values in sorted(optimizer["state"].items())}
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
        if self.masters is not None:
            state["master_weights"] = [m.detach().cpu() for m in self.masters]
        return state

    def load_state_dict(self, state: dict[str, Any], weights_dir: Path) -> None:
        # The weights first: a checkpoint of other adapters is named, not the optimizer's size mismatch.
        self._load_weights(weights_dir)
        optimizer = state["optimizer"]
        if self.sharded:  # whole tensors in the file: each rank keeps its own piece
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer = {**optimizer, "state": {
                index: {k: distributed.shard_like(v, params[index]) if isinstance(v, Tensor) else v
                        for k, v in values.items()}
                for index, values in optimizer["state"].items()}}
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is this run's: a resume may raise trainer.max_steps (or change trainer.lr), and
        # the next step's lr comes from the schedule over the new length, not the one saved. Unchanged,
        # it is the lr that was saved. So are the optimizer's settings, which load_state_dict sets back to
        # the saved ones: a resume with optimizer.weight_decay=0.1 ran the old value under the new config.
        opt = self.cfg.optimizer
        self.scheduler.base_lrs = [self.cfg.trainer.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.trainer.lr
            group.update(betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
        self._set_lr()
        if self.masters is not None:  # the saved fp32 copies; from a run without them, the weights themselves
            self._copy(self.masters, state.get("master_weights") or self.trainable)

    def _load_weights(self, weights_dir: Path) -> None:
        from safetensors.torch import load_file

        if self.peft is not None:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            adapter = weights_dir / "adapter" / "adapter_model.safetensors"
            if not adapter.is_file():
                raise TrainingError(f"checkpoint {weights_dir} has no LoRA adapter (adapter/): it was not "
                                    "trained with model.lora_rank > 0")
            saved = load_file(adapter, device=str(self.device))
            # As saved: without the base embedding and output layer, which peft adds when either is adapted.
            wanted = get_peft_model_state_dict(self.peft, save_embedding_layers=False)
            if saved.keys() != wanted.keys():  # e.g. [all-linear] now, [q_proj,v_proj] when it trained
                raise TrainingError(f"checkpoint {weights_dir} holds adapters on {_adapted(saved)}, and "
                                    f"model.lora_target_modules={list(self.cfg.model.lora_target_modules)} puts them "
                                    f"on {_adapted(wanted)}; resume with the run's own. {_KEEP_LORA}")
            set_peft_model_state_dict(self.peft, saved)
            return
        tensors: dict[str, Tensor] = {}
        for shard in sorted(weights_dir.glob("*.safetensors")):
            tensors.update(load_file(shard, device="cpu" if self.sharded else str(self.device)))
        tensors = _model_names(self.policy, tensors)
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


def _model_names(model: torch.nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's tensors under the names and shapes of `model`'s state_dict(): the conversions
    transformers 5 applied when it loaded the model (Mixtral's block_sparse_moe.experts.<i>.w1/w3/w2 and
    Qwen-MoE's experts.<i>.gate_proj/up_proj/down_proj stacked into mlp.experts.gate_up_proj and
    down_proj), the inverse of grpo_cli.sync.checkpoint_format. save_pretrained writes the checkpoint
    names, and a resume of a mixture of experts stopped on them ("does not match the model").
    Unchanged for a model transformers loads as stored."""
    from copy import deepcopy

    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    conversions = getattr(model, "_weight_conversions", None) or []
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    if not converters and not renamings:
        return tensors
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    groups: dict[str, Any] = {}  # the model's name -> the transform that makes it from the checkpoint's tensors
    # In transformers' own loading order: the experts of a stack in their natural order (2 before 10).
    for name, tensor in sorted(tensors.items(), key=lambda item: dot_natural_key(item[0])):
        renamed, pattern = rename_source_key(name, renamings, converters)
        transform = groups.setdefault(renamed, deepcopy(by_pattern[pattern]) if pattern is not None
                                      else WeightRenaming(name, renamed))
        transform.add_tensor(renamed, name, pattern or name, tensor)
    out: dict[str, Tensor] = {}
    for renamed, transform in groups.items():
        for name, tensor in transform.convert(renamed, model=model, config=model.config).items():
            out[name] = tensor[0] if isinstance(tensor, list) else tensor
    return out


def _unwrapped(name: str) -> str:
    """A parameter or module name of the LoRA-wrapped policy as the plain model names it."""
    return re.sub(r"\.base_layer(?=\.|$)", "", name)


_KEEP_LORA = "model.lora_rank, lora_alpha and lora_target_modules stay as the run trained: start a new run to change them"


def _adapted(adapter_state: dict[str, Any] | Sequence[str]) -> str:
    """The kinds of layer an adapter state dict's keys put adapters on: 'k_proj, q_proj, v_proj' ('experts' for
    a mixture of experts' fused expert weights, whose nested adapters' keys end in experts.base_layer.lora_A...)."""
    return ", ".join(sorted({_unwrapped(key.split(".lora_")[0]).rsplit(".", 1)[-1] for key in adapter_state}))


# policy_loss's per-token statistics averaged over all of a step's iterations (ratio_min / _max: the
# extremes over all of them).
_PER_ITERATION = ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean")


def _aliases(model: torch.nn.Module) -> set[str]:
    """The names under which a parameter appears a second time (a tied output layer is the input
    embedding). save_pretrained leaves them out, but not from a state_dict passed to it: a sharded
    checkpoint of a tied model held the embedding twice (+113 MB for SmolLM2-135M). Found by parameter
    identity, the same on every rank (the state dict's DTensors are distinct objects even when tied)."""
    return ({name for name, _ in model.named_parameters(remove_duplicate=False)}
            - {name for name, _ in model.named_parameters()})


def _unsaved(iteration: int) -> str:
    """How far the update got, for an error that stops it at optimizer step `iteration` (from 0)."""
    if iteration == 0:
        return "; the weights were not updated"
    return f" at iteration {iteration + 1}, after {iteration} optimizer step(s); they are not saved"


_LOGPROBS = "grpo_sequence_logprobs"  # sharded models: sequence_logprobs as an FSDP forward method


def _logprobs(model: torch.nn.Module, batch: Packed | Segments, temperature: float,
              entropy: bool = True) -> tuple[Tensor, Tensor]:
    """`sequence_logprobs`; on a sharded model through its root's FSDP hooks (see distributed.shard),
    because it calls the base model and the output layer directly, not the root's forward."""
    forward = getattr(model, _LOGPROBS, None)
    if forward is not None:
        return forward(batch, temperature, entropy=entropy)
    return sequence_logprobs(model, batch, temperature, entropy=entropy)


@functools.cache
def _libc() -> Any:
    """glibc through ctypes, or None (another C library, or none found)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


# glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_heap_only = False  # keep_freed_host_memory took: allocations come from the heap (mallopt is process-wide)


def keep_freed_host_memory() -> bool:
    """Make glibc keep the memory a CPU learner frees, for its next micro-batch, instead of giving it
    back to the operating system. Returns whether the setting took (glibc only).

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it when freed, so each
    vocabulary-wide tensor (a logit chunk: ~55 MB for SmolLM2 at ~300 tokens) is page-faulted in
    anew, several per micro-batch. On the 2-core benchmark VM, filling a fresh 113 MB tensor took
    20-150 ms (the more, the less of the VM's memory had been touched since it booted) against 3 ms
    for memory the process already held.
    Here allocations come from the heap (no mmap) and freed memory stays there (up to 2 GiB of it at
    the heap's top), as PyTorch's caching allocator keeps freed memory on a GPU.
    Called after the first update, once the models, the engine, the optimizer's state and the
    gradients (which a CPU learner keeps, zeroed in place) exist: long-lived tensors keep their own
    mappings and only the loop's short-lived ones share the heap, which they would otherwise split
    into pieces. A weight push, which makes the engine's weights anew, runs under `own_mappings`."""
    global _heap_only
    if _heap_only:  # already set (the loop calls this after every update)
        return True
    libc = _libc()
    # The largest threshold mallopt takes (2 GiB of free memory at the heap's top before it trims).
    _heap_only = (libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0))
                  and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _heap_only


@contextmanager
def own_mappings(threshold: int = 1 << 20) -> Iterator[None]:
    """For a weight push into a CPU vLLM engine, once keep_freed_host_memory took (else nothing
    changes): the heap's free pages go back to the system first (malloc_trim), and within the block
    allocations of `threshold` bytes and more that none of the heap's free blocks can hold get their
    own mappings instead of growing the heap (glibc serves what a free block holds from it, and maps
    only the rest).

    A push makes the engine's weights anew (vLLM repacks them for its kernels) while the old ones
    still exist. In the heap those long-lived tensors landed among the learner's freed blocks, and
    each push left the heap bigger (SmolLM2, the benchmark's steps: +0.67, +0.29 and +0.23 GB over
    three pushes, its used part unchanged); mapped on top of the heap's kept free pages, they raised
    the peak instead: a 6-step benchmark run peaked at 6.18-6.23 GB either way, and at 5.75-5.79 GB
    with the heap given back first and the gradients kept (benchmarks/RESULTS.md)."""
    libc = _libc() if _heap_only else None
    if libc is None:
        yield
        return
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 0)


def _add_lora(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """Inject LoRA adapters into `model` in place (its other weights frozen); returns peft's wrapper."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("model.lora_rank > 0 needs the peft package: pip install 'grpo-cli[lora]' "
                        "(or pip install peft)") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    tied = embeddings[1] is not None and embeddings[1].weight is embeddings[0].weight
    # The output layer is a Linear too, but no place for an adapter ("all-linear" skips it).
    linear = ", ".join(sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and m is not embeddings[1]}))
    targets: str | list[str] = list(cfg.lora_target_modules)
    checkpoint_names = _expert_checkpoint_names(model)
    experts = sorted(checkpoint_names)  # a mixture of experts' fused expert weights; none for a dense model
    listed, parameters = targets != ["all-linear"], []
    if not listed and not experts:
        targets = "all-linear"  # every linear layer except the output layer
    elif listed:  # the experts' names in the checkpoint (Qwen2-MoE's gate_proj, ...) mean its fused weights
        parameters = [fused for fused, names in checkpoint_names.items() if set(names) <= set(targets)]
    else:  # a mixture of experts: see _all_linear
        targets, parameters = _all_linear(model, embeddings[1], checkpoint_names), experts
        if cfg.lora_dropout > 0:
            raise UserError(_expert_dropout(cfg, ", ".join(experts)) + ", or adapt the other layers only: "
                            f"model.lora_target_modules=[{','.join(targets)}]")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, target_parameters=parameters or None, bias="none", task_type="CAUSAL_LM")
    try:
        wrapped = get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module the model does not have (peft's NoMatchingPeftModuleError)
        problem = first_line(e).rstrip(".")
        if "ParamWrapper" in problem and "lora_dropout" in problem:  # the list named experts (peft maps Mixtral's w1..)
            raise UserError(_expert_dropout(cfg, ", ".join(experts)) + ", or leave the experts out of "
                            f"model.lora_target_modules={list(cfg.lora_target_modules)}") from None
        raise UserError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: {problem}; this model's linear "
                        f"layers are {linear} (or use [all-linear])") from None
    if listed:
        # peft stops only when no name matches: Llama's [q_proj,k_proj,v_proj,o_proj] on Phi-3 (whose q/k/v are
        # one qkv_proj) put adapters on o_proj alone, and q/k/v stayed frozen without a word.
        names = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        # peft maps some mixture of experts' checkpoint names for experts and routers (Mixtral's w1, w2, w3, gate;
        # Qwen3-MoE's gate_proj, up_proj, down_proj) onto the fused weights of transformers 5, as target_parameters
        # (and Qwen2-MoE's not: they are among `parameters` above).
        mapped = wrapped.peft_config["default"]
        converted = set(targets) - set(mapped.target_modules or ()) if mapped.target_parameters else set()
        converted |= {name for fused in parameters for name in checkpoint_names[fused]}
        unmatched = [t for t in targets if t not in converted and not any(n == t or n.endswith(f".{t}") for n in names)]
        if unmatched:
            matched = [t for t in targets if t not in unmatched]
            raise UserError(f"model.lora_target_modules={targets}: this model has no {', '.join(unmatched)} (only "
                            f"{', '.join(matched)} would get adapters); its linear layers are {linear} "
                            "(or use [all-linear])")
    if tied:
        # The merged weights (engine pushes, checkpoints) hold one tensor for both layers: an adapter on
        # either cannot be merged into it. vLLM then scored tokens 0.2-3.6 nats off the learner.
        adapted = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, BaseTunerLayer) and any(m.get_base_layer() is e for e in embeddings)})
        if adapted:
            raise UserError(f"model.lora_target_modules={list(cfg.lora_target_modules)}: this model ties its output "
                            f"layer to its input embedding (tie_word_embeddings), so an adapter on {', '.join(adapted)} "
                            "cannot be merged into the one weight they share; leave "
                            f"{' and '.join(adapted)} out (e.g. [all-linear])")
    return wrapped


def _all_linear(model: torch.nn.Module, output_layer: torch.nn.Module | None,
                checkpoint_names: dict[str, list[str]]) -> list[str]:
    """The linear layers model.lora_target_modules=[all-linear] adapts (by name, as peft matches them):
    every nn.Linear but the output layer and a mixture of experts' routers. A router (Mixtral's and
    Qwen-MoE's `gate`, Qwen2-MoE's `shared_expert_gate`) picks which experts run; models train it with a
    load-balancing loss beside the language-model loss, which the GRPO loss has none of, so an adapter on
    it could move the routing towards a few experts unchecked (and peft's own all-linear took
    shared_expert_gate, a (1, hidden) layer, but not `gate`). The experts' own weights are no nn.Linear in
    transformers 5: see _expert_checkpoint_names. Known gap: on the families peft converts from transformers 4 names
    with a shared expert (GLM-4-MoE, DeepSeek-V3, ...) peft takes shared_experts.gate_proj for the experts'
    gate_proj and drops it, so their shared experts get no adapter (peft 0.21; found on a tiny GLM-4-MoE)."""
    experts = {name for names in checkpoint_names.values() for name in names}
    # Qwen2-MoE's shared expert has the experts' checkpoint names (gate_proj, ...), which in a list mean the
    # experts too (see _add_lora): it is named with its parent (shared_expert.gate_proj), so that the list
    # [all-linear]'s dropout error suggests leaves the experts out.
    return sorted({".".join(name.split(".")[-2 if name.rsplit(".", 1)[-1] in experts else -1:])
                   for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not output_layer
                   and not re.fullmatch(r"gate|router|.*_gate", name.rsplit(".", 1)[-1])})


def _expert_checkpoint_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """A mixture of experts' fused expert weights, for peft's `target_parameters` (transformers 5 stacks each
    expert projection into one (experts, out, in) parameter, which peft adapts with lora.ParamWrapper; left
    to peft, [all-linear] adapted them on Mixtral and Qwen3-MoE but not on Qwen2-MoE), each with the names
    its experts' weights have in the checkpoint: {'experts.gate_up_proj': ['gate_proj', 'up_proj'],
    'experts.down_proj': ['down_proj']} (Mixtral's: w1, w3 and w2), as transformers writes them back on
    saving. peft maps a list of these names onto the fused weights for Mixtral and Qwen3-MoE, and for
    Qwen2-MoE not (only its shared expert, whose layers have the same names, got adapters). Empty for a
    dense model."""
    from transformers.core_model_loading import revert_weight_conversion

    names: dict[str, list[str]] = {}
    for module_name, m in model.named_modules():
        for param, p in m.named_parameters(recurse=False):
            fused = f"{module_name.rsplit('.', 1)[-1]}.{param}"
            if p.dim() == 3 and fused not in names:
                saved = revert_weight_conversion(model, {f"{module_name}.{param}": p})
                names[fused] = sorted({name.rsplit(".", 2)[-2] for name in saved})
    return names


def _expert_dropout(cfg: ModelConfig, experts: str) -> str:
    return (f"model.lora_dropout={cfg.lora_dropout}: peft cannot put dropout on the adapters of a mixture of "
            f"experts' fused expert weights ({experts}); set model.lora_dropout=0")


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
