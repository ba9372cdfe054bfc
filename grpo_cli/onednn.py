"""The CPU learner's fp32 matrix products through oneDNN (`model.cpu_matmul`).

PyTorch's CPU wheels multiply fp32 matrices with MKL, which picks its kernels by the processor's
vendor: on an AMD processor it runs its AVX2 code even where the CPU has AVX-512. oneDNN, which
the same wheels carry (`torch.ops.mkldnn`), picks its kernels by instruction set. On the
benchmark's Zen 5 VM (2 cores, AVX-512; benchmarks/RESULTS.md) `F.linear` at SmolLM2-135M's
shapes (2,900 rows) ran at 202-210 GFLOP/s through MKL and at 445-464 through oneDNN, and a
forward+backward of the model's decoder took 7.3 s instead of 11.0 s.

`use_onednn` turns a model's plain fp32 nn.Linear layers into `OneDNNLinear`, whose forward and
backward (the input's and the weight's gradients) are oneDNN products; only the class changes, so
parameter names, state dicts and peft's wrapping are as before. The output layer is left to the
log-probs (grpo_cli/logprobs.py), which do its products themselves and call `product` for the two
that oneDNN does faster; the weight's gradient there stays an in-place `addmm_` into `.grad`,
which MKL does faster than oneDNN plus an add (77 vs 105 ms at 290 tokens x 49,152 words).

oneDNN builds a primitive for each shape, and both torch's oneDNN wrapper (ideep, its LRU cache:
LRU_CACHE_CAPACITY) and oneDNN itself (ONEDNN_PRIMITIVE_CACHE_CAPACITY) keep up to 1,024 of them,
each with its scratch memory: 0.7 MB for a forward product at 2,000-2,500 rows, 3.5 MB for a
weight's gradient. A learner's row count changes with every micro-batch, so at those defaults its
memory grew with every update (SmolLM2-135M, updates of random 8 x 8 batches: +0.37 GB from the
2nd to the 6th). The package sets both caches smaller on import (grpo_cli.ONEDNN_CACHES, unless
the environment already sets them), before any primitive exists; a micro-batch needs about 15,
which stay cached through its forwards and its backward. Measured over 10 such updates: memory
flat after the 3rd, within 0.06 GB of torch's own products, and updates as fast as with the
default caches (7.3 s against 7.2; 11.3 s with torch's products).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grpo_cli.errors import UserError

# Set on an output layer's weight whose products the log-probs take through oneDNN.
_MARK = "_grpo_onednn"


def available() -> bool:
    """Whether this torch build has oneDNN's linear operator."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise  # noqa: B018  (resolved lazily: raises if absent)
    except (AttributeError, RuntimeError):
        return False
    return True


def wanted(choice: str, device: torch.device, sharded: bool) -> bool:
    """Whether a learner's fp32 linear layers go through oneDNN (`model.cpu_matmul`): on an unsharded
    CPU learner (FSDP's sharded layers keep their own), unless the setting says torch's own;
    `auto` where torch has oneDNN."""
    if choice == "torch" or device.type != "cpu" or sharded:
        return False
    if available():
        return True
    if choice == "onednn":
        raise UserError("model.cpu_matmul=onednn: this torch build has no oneDNN (torch.backends.mkldnn is "
                        "unavailable); use model.cpu_matmul=auto or model.cpu_matmul=torch")
    return False


def _fits(x: Tensor, weight: Tensor) -> bool:
    """A product oneDNN takes here: fp32 on a CPU, at least one row of at least one feature."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() > 0 and weight.numel() > 0)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) through oneDNN; x (..., K), weight (N, K), either may be strided."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def product(x: Tensor, weight: Tensor, transposed: bool = True) -> Tensor:
    """x @ weight.T (transposed=False: x @ weight), through oneDNN when `weight` is marked
    (`use_onednn`) and the product fits, else torch's own. No autograd: the log-probs' functions
    have their own backward."""
    if getattr(weight, _MARK, False) and _fits(x, weight):
        return _linear(x, weight if transposed else weight.t())
    return x @ (weight.t() if transposed else weight)


class _Linear(torch.autograd.Function):
    """F.linear with oneDNN products forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.with_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = _linear(grad, weight.t()) if ctx.needs_input_grad[0] else None  # grad @ weight
        # grad.T @ x: the products run over the M rows, compute-bound, where oneDNN is the faster.
        grad_weight = _linear(rows.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        grad_bias = rows.sum(0) if ctx.with_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(torch.nn.Linear):
    """nn.Linear whose fp32 CPU products go through oneDNN (any other input: nn.Linear's own)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _fits(x, self.weight):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                        or (self.bias is not None and self.bias.requires_grad)):
            return _Linear.apply(x, self.weight, self.bias)
        return _linear(x, self.weight, self.bias)


def use_onednn(model: torch.nn.Module, output_layer: bool = False) -> int:
    """Turn `model`'s plain fp32 CPU nn.Linear layers into OneDNNLinear and mark its output
    layer's weight for `product`; returns how many layers changed. The output layer itself changes
    class only with output_layer=True (for a model's own forward, as benchmarks/ceilings.py runs
    it; the log-probs need it plain). LoRA's adapter layers are left as they are: their low-rank
    products are small, and each rank would add primitives."""
    head = model.get_output_embeddings()
    if head is not None and isinstance(getattr(head, "weight", None), Tensor):
        setattr(head.weight, _MARK, True)
    changed = 0
    for name, module in model.named_modules():
        if (type(module) is torch.nn.Linear and (output_layer or module is not head) and "lora_" not in name
                and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32):
            module.__class__ = OneDNNLinear
            changed += 1
    return changed
