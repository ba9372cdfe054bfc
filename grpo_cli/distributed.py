"""Several learner processes: detecting `torchrun`, the process group, and the few collectives the
trainer needs.

`torchrun --nproc_per_node N -m grpo_cli train ...` starts N copies of `grpo train`, each with
RANK / LOCAL_RANK / WORLD_SIZE set. `setup()` joins them into one process group (gloo on CPU, NCCL
on CUDA, one GPU per process: cuda:LOCAL_RANK) over a one-dimensional device mesh that FSDP2 shards
the models across (grpo_cli/learner.py). A single process (no torchrun, or WORLD_SIZE=1) starts no
process group: every helper here is then a local no-op, so the one-process path is unchanged.

Every collective must be called by all ranks in the same order; the helpers are thin so that
each call site stays visible in the loop and the learner.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits at a collective for the others (a slow checkpoint write, an uneven
# rollout) before the run fails instead of hanging.
TIMEOUT = datetime.timedelta(minutes=60)

_mesh: Any = None  # DeviceMesh of all ranks, once setup() has run with WORLD_SIZE > 1


def launched_world() -> int:
    """WORLD_SIZE as torchrun set it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK as torchrun set it (0 without torchrun); also before setup() and after teardown()."""
    return int(os.environ.get("RANK", "0"))


def setup() -> torch.device:
    """Join the torchrun process group when there is one; returns this process's device.

    Idempotent. Without torchrun (or with one process): no process group, the device is
    cuda when there is a GPU, else cpu.
    """
    global _mesh
    cuda = torch.cuda.is_available()
    if launched_world() <= 1:
        return torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                device_id=device if cuda else None)
    if _mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    return device


def teardown() -> None:
    """Leave the process group (after the last collective of the run)."""
    global _mesh
    _mesh = None
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes the run directory and talks to the console."""
    return rank() == 0


def mesh() -> Any:
    """The device mesh of all ranks (None in a single process)."""
    return _mesh if world() > 1 else None


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum (or max, min) of a list of floats over ranks, in float64; every rank gets it."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: lists, dicts of floats)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank's process is gone (it stopped on
    its own error, or crashed). gloo notices at once ('Connection closed by peer'); torchrun then
    stops the remaining ranks, so this is what they raise in the moment before."""
    text = str(error)
    return isinstance(error, dist.DistNetworkError) or "closed by peer" in text or "reset by peer" in text


# ----------------------------------------------------------------------------- FSDP2
def shard(model: torch.nn.Module, compute_dtype: torch.dtype,
          methods: dict[str, Callable[..., Any]] | None = None) -> None:
    """Shard `model` in place over all ranks with FSDP2: each decoder layer (the classes a
    transformers model lists in `_no_split_modules`), then the root with what is left
    (embeddings, a tied or untied output layer, the final norm).

    The root's parameters are gathered only around the root's own forward, and around the
    `methods` registered here: each becomes `model.<name>(*args)` = `fn(model, *args)` with the
    root's parameters whole for the whole call, its backward included. That is how code that calls
    `model.base_model(...)` and `model.get_output_embeddings()` directly (the learner's log-probs)
    sees whole embedding and output weights, and how their gradients still reach the reduce-scatter.

    Gradients are summed over ranks, not averaged: each rank's loss is already weighted by its share
    of the global batch, so the sum is the full-batch gradient. Every forward reshards afterwards
    (the root too), so between calls only the shards are held and the same collectives run on every
    rank whatever the call. Mixed precision: computing in `compute_dtype` (bf16 on GPU) from fp32
    parameters, gradients reduced in fp32; none when `compute_dtype` is fp32 (the CPU).
    """
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mixed = None
    if compute_dtype != torch.float32:
        mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kwargs: dict[str, Any] = dict(mesh=mesh(), reshard_after_forward=True)
    if mixed is not None:
        kwargs["mp_policy"] = mixed
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum, also on gloo
    for name, fn in (methods or {}).items():
        setattr(model, name, functools.partial(fn, model))
        register_fsdp_forward_method(model, name)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_tensors(named: Iterable[tuple[str, torch.Tensor]], keep: bool = True,
                 to_cpu: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Each (name, tensor) with a sharded tensor gathered whole, one at a time: an all-gather per
    tensor, so every rank must iterate in the same order to the end. keep=False: ranks other than 0
    drop what they gather (a checkpoint: only rank 0 writes); to_cpu: moved to host memory."""
    from torch.distributed.tensor import DTensor

    keep = keep or is_main()
    for name, tensor in named:
        full = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
        if not keep:
            full = torch.empty(0)
        elif to_cpu:
            full = full.cpu()
        yield name, full


def load_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` (the same on every rank) into `target`, a shard or a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            # src_data_rank=None: every rank holds `full` and cuts its own piece, no communication.
            piece = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(piece.to_local())
        else:
            target.copy_(full)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut like the DTensor `like` (this rank's piece, as a DTensor); `full` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
