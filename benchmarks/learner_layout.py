"""The learner's two batch layouts timed on the same update: padded rows against packed rows.

    python benchmarks/learner_layout.py                      # the CPU workload (recipes/bench_cpu.yaml)
    python benchmarks/learner_layout.py --gpu --model DIR    # the GPU workload (recipes/bench_gpu.yaml)
    python benchmarks/learner_layout.py --recipe bench_gpu --model /tmp/qwen05-random --rows --memory \
        --set trainer.prompts_per_step=1 trainer.micro_batch_size=8   # the GPU workload's shapes, on the CPU

padded: one row per completion, its prompt in front, right-padded (model.share_prompts=false).
packed: rows of at most N tokens holding each prompt once followed by its completions, with a block
        mask (model.share_prompts=true; N = grpo_cli.logprobs.PACK_TOKENS, varied with --rows).
The padded layout is also timed with other logit chunks (--logit-chunk-mib: the fp32 logits of one
chunk of completion tokens, grpo_cli.logprobs.LOGIT_CHUNK_BYTES) and other blocks for the softmax
statistics (--stats-block-mib, STATS_BLOCK_BYTES), for their effect on time and memory.

The workload is one step of the benchmark recipe: its first P prompts, each with G completions of
random tokens, all --completion-len long (default: the recipe's max_new_tokens, what a step of
completions that never stop costs). For each layout a fresh Learner runs one warm-up update and
then --updates timed ones (the whole `Learner.update`: reference forward, policy forward and
backward, optimizer step); the table gives the median seconds and, on a GPU, the peak of
allocated memory. --memory adds one more update whose peak memory is read off the allocator:
on a GPU max_memory_allocated, on a CPU torch.profiler's allocation events (every tensor the
update allocates and frees, summed in order), both as the peak above what was allocated when the
update began (weights, optimizer state; the gradients are made during it). Which layout
`model.share_prompts=null` picks per device was chosen from this.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the GPU workload (bench_gpu.yaml) on CUDA")
    p.add_argument("--model", help="model folder or hub id instead of the recipe's")
    p.add_argument("--recipe", help="benchmark recipe (default: bench_gpu with --gpu, else bench_cpu)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--autograd-weight-grads", action="store_true",
                   help="the output layer's and embedding's weight gradients returned to autograd (as on a sharded "
                        "model, and before 2026-11-29 on a GPU) instead of added straight into .grad")
    p.add_argument("--memory", action="store_true",
                   help="one more update per layout, its peak memory above its start read off the allocator")
    p.add_argument("--updates", type=int, default=3, help="timed updates per layout, after one warm-up (default 3)")
    p.add_argument("--completion-len", type=int, help="tokens per completion (default: the recipe's max_new_tokens)")
    p.add_argument("--rows", type=int, nargs="*", default=[2048], help="packed row lengths to try (default 2048; none: padded only)")
    p.add_argument("--profile", action="store_true",
                   help="after each layout's timed updates, one more under torch.profiler: its top operators")
    p.add_argument("--logit-chunk-mib", type=int, nargs="*", default=[],
                   help="more logit chunk sizes to try with the padded layout (default: only LOGIT_CHUNK_BYTES)")
    p.add_argument("--stats-block-mib", type=int, nargs="*", default=[],
                   help="more block sizes for the softmax statistics to try with the padded layout (default: only "
                        "STATS_BLOCK_BYTES; larger blocks launch fewer kernels on a GPU and hold larger temporaries)")
    args = p.parse_args()

    from grpo_cli import learner as learner_module
    from grpo_cli import logprobs as logprobs_module
    from grpo_cli.config import compose
    from grpo_cli.data import load_prompts
    from grpo_cli.learner import Learner
    from grpo_cli.models import load_tokenizer

    device = torch.device("cuda" if args.gpu else "cpu")
    if args.autograd_weight_grads:
        learner_module.accumulate_in_place = lambda model: None
    recipe = args.recipe or ("bench_gpu" if args.gpu else "bench_cpu")
    base = [f"recipe={recipe}", *([f"model.name_or_path={args.model}"] if args.model else []), *args.set]
    cfg = compose(base, HERE)
    tokenizer = load_tokenizer(cfg.model)
    P, G = cfg.trainer.prompts_per_step, cfg.rollout.group_size
    length = args.completion_len or cfg.rollout.max_new_tokens
    rows = load_prompts(cfg.dataset, tokenizer)[:P]
    prompts = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    generator = torch.Generator().manual_seed(0)
    per_row = [p for p in prompts for _ in range(G)]
    completions = torch.randint(0, len(tokenizer), (P * G, length), generator=generator).tolist()
    engine_logprobs = [[-1.0] * length for _ in completions]
    advantages = torch.randn(P * G, generator=generator)

    def set_sizes(row_tokens: int, chunk: int, block: int) -> None:
        logprobs_module.PACK_TOKENS, logprobs_module.LOGIT_CHUNK_BYTES, logprobs_module.STATS_BLOCK_BYTES = (
            row_tokens, chunk, block)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    default = (logprobs_module.PACK_TOKENS, logprobs_module.LOGIT_CHUNK_BYTES, logprobs_module.STATS_BLOCK_BYTES)
    _, default_chunk, default_block = default
    variants = [("padded", "false", None, default_chunk, default_block)]
    variants += [(f"padded, logit chunk {c} MiB", "false", None, c << 20, default_block) for c in args.logit_chunk_mib]
    variants += [(f"padded, statistics blocks of {b} MiB", "false", None, default_chunk, b << 20)
                 for b in args.stats_block_mib]
    variants += [(f"packed, rows of {n}", "true", n, default_chunk, default_block) for n in args.rows]
    print(f"[layout] {cfg.model.name_or_path} on {device.type}: {P} prompts x G={G}, {length} completion tokens, "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, micro-batch "
          f"{cfg.trainer.micro_batch_size}, beta {cfg.loss.beta}", flush=True)
    table = []
    for name, share, row_tokens, chunk, block in variants:
        set_sizes(row_tokens or default[0], chunk, block)
        learner = Learner(compose(base + [f"model.share_prompts={share}"], HERE), device,
                          pad_id=tokenizer.pad_token_id)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for i in range(args.updates + 1):
            sync()
            start = time.perf_counter()
            learner.update(per_row, completions, engine_logprobs, advantages)
            sync()
            seconds.append(time.perf_counter() - start)
            print(f"[layout] {name}: update {i}{' (warm-up)' if i == 0 else ''} {seconds[-1]:.2f} s", flush=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        above = float("nan")
        if args.memory:
            learner.optimizer.zero_grad(set_to_none=True)  # the last update's gradients are freed before, not during
            update = functools.partial(learner.update, per_row, completions, engine_logprobs, advantages)
            above = peak_above_start(update, device) / 2**20
            print(f"[layout] {name}: peak {above:.0f} MiB above the update's start", flush=True)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                learner.update(per_row, completions, engine_logprobs, advantages)
                sync()
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"[layout] {name}: one update under the profiler\n"
                  f"{prof.key_averages().table(sort_by=key, row_limit=15)}", flush=True)
        table.append((name, statistics.median(seconds[1:]), min(seconds[1:]), max(seconds[1:]), peak, above))
        del learner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    set_sizes(*default)
    print("\n| layout | s/update median | min | max | peak GPU GiB | peak MiB above the update's start |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, med, lo, hi, peak, above in table:
        print(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} | {peak:.2f} | {above:.0f} |")


def peak_above_start(run: Callable[[], object], device: torch.device) -> int:
    """Bytes: the most `run()` holds allocated at once beyond what was allocated when it began."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # One event per allocation (+bytes) and per free (-bytes); a free of memory allocated before
    # the update began counts as a negative.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


if __name__ == "__main__":
    main()
