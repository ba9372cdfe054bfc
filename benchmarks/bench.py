"""Speed benchmark (issue 7): `grpo train` against TRL's GRPOTrainer on identical work, back to back.

    make bench                      # BENCH_STEPS=5 measured steps per tool
    python benchmarks/bench.py --steps 1 --prompts 2 --group 4 --max-new-tokens 16   # a quick check
    python benchmarks/bench.py --gpu    # the GPU workload (recipes/bench_gpu.yaml) on a CUDA machine
    python benchmarks/bench.py --gpu --rollout hf --model DIR   # no vLLM there: both sides on HF generate
    bash benchmarks/gpu_check.sh .gpu-kit OUT   # a GPU machine with no package index (see gpu_kit.py)
    python benchmarks/bench.py --summarize benchmarks/out/<time> --no-record   # re-print a finished run

The workload is grpo's recipe benchmarks/recipes/bench_cpu.yaml (bench_gpu.yaml with --gpu) plus the
command-line overrides below; TRL gets the same model folder, the same prompts in the same order,
the same G, batch, completion length, sampling, beta, clipping, optimizer and lr, and grpo's own
reward function (trl_grpo.py says how its batch arguments were matched). In order:

  1. TRL's environment, benchmarks/.venv-trl (created on first use, trl_venv.py); on a CPU, most of
     the machine's free memory written once (touch_memory says why);
  2. grpo train: one warm-up step, S measured steps, and one more step that is not measured
     (grpo's last step pushes no weights, since nothing would use them);
  3. the ceilings (ceilings.py): raw generation of the same prompts by grpo's engine (vLLM with
     grpo's engine settings; plain transformers `generate` with --rollout hf), and a bare
     transformers forward+backward (+ reference forward, + AdamW) of the same batch;
  4. TRL's GRPOTrainer: one warm-up step and S measured steps.

Each runs in its own process; its peak RSS is that process tree's (os.wait4), and on a GPU its peak
of allocated GPU memory is reported too (torch.cuda.max_memory_allocated). Step times: grpo's
`time/step` from metrics.jsonl (rollout + reward + learner + sync); TRL's from a callback, from
on_step_begin to on_step_end. The summary is appended to benchmarks/RESULTS.md and the last line
printed is `step_time_ratio_vs_trl=<grpo median / TRL median>` (below 1: grpo is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import trl_venv  # noqa: E402

# Lines of the tools' output worth echoing live; everything goes to the log files.
ECHO = re.compile(r"^(\[\w+\]|step\s+\d|run directory|done:|error|Traceback|\w*Error)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="grpo vs TRL GRPOTrainer: seconds per step on identical work.")
    p.add_argument("--steps", type=int, default=5, help="measured steps per tool, after one warm-up step (default 5)")
    p.add_argument("--prompts", type=int, help="prompts per step (default: the recipe's)")
    p.add_argument("--group", type=int, help="G, completions per prompt (default: the recipe's)")
    p.add_argument("--max-new-tokens", type=int, help="max completion length (default: the recipe's)")
    p.add_argument("--micro-batch", type=int, help="completions per forward/backward (default: the recipe's)")
    p.add_argument("--beta", type=float, help="KL weight (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--gpu", action="store_true", help="the GPU workload: recipes/bench_gpu.yaml, bf16, CUDA")
    p.add_argument("--rollout", choices=("vllm", "hf"), default="vllm",
                   help="grpo's rollout engine, and the raw-generation ceiling measured with it (default vllm)")
    p.add_argument("--model", help="model folder or hub id instead of the recipe's (e.g. a machine with no hub access)")
    p.add_argument("--out", type=Path, help="run folder (default benchmarks/out/<time>)")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="where the summary is appended")
    p.add_argument("--no-record", action="store_true", help="print the summary only; append nothing")
    p.add_argument("--summarize", type=Path, metavar="RUN_DIR",
                   help="measure nothing: print (and append) the summary of a finished run folder")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


# ----------------------------------------------------------------------------- the workload
def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """grpo's overrides: the recipe, the command-line settings, and S + 2 steps (warm-up, S, one unmeasured)."""
    out = [f"recipe={'bench_gpu' if args.gpu else 'bench_cpu'}", f"trainer.max_steps={args.steps + 2}",
           f"output_dir={run_dir}"]
    flags = {"trainer.prompts_per_step": args.prompts, "rollout.group_size": args.group,
             "rollout.max_new_tokens": args.max_new_tokens, "trainer.micro_batch_size": args.micro_batch,
             "loss.beta": args.beta, "trainer.lr": args.lr, "model.name_or_path": args.model}
    if args.rollout != "vllm":
        out.append(f"rollout={args.rollout}")
    return out + [f"{key}={value}" for key, value in flags.items() if value is not None]


def check_comparable(cfg: Any, gpu: bool = False) -> None:
    """Settings TRL's arguments in trl_grpo.py cannot mirror: refuse rather than compare unlike work."""
    same = {"loss.agg": (cfg.loss.agg, "seq_mean_token_mean"), "loss.kl": (cfg.loss.kl, "k3"),
            "loss.adv_scale": (cfg.loss.adv_scale, "group"), "loss.ratio_level": (cfg.loss.ratio_level, "token"),
            "loss.tis_cap": (cfg.loss.tis_cap, None), "trainer.num_iterations": (cfg.trainer.num_iterations, 1),
            "trainer.lr_scheduler": (cfg.trainer.lr_scheduler, "constant"),
            "trainer.warmup_steps": (cfg.trainer.warmup_steps, 0), "rollout.stop": (list(cfg.rollout.stop), []),
            "trainer.mask_truncated": (cfg.trainer.mask_truncated, False),
            "trainer.dynamic_sampling": (cfg.trainer.dynamic_sampling, False), "model.lora_rank": (cfg.model.lora_rank, 0),
            "dataset.prefill": (cfg.dataset.prefill, ""),
            # TRL generates every step with the weights it just stepped, and loads the model's default attention.
            "rollout.sync_every": (cfg.rollout.sync_every, 1), "rollout.check_sync": (cfg.rollout.check_sync, False),
            "model.attn_implementation": (cfg.model.attn_implementation, None)}
    if cfg.model.dtype in ("bfloat16", "float16") or (cfg.model.dtype == "auto" and gpu):
        same["optimizer.master_weights"] = (cfg.optimizer.master_weights, False)  # TRL steps the half weights
    for key, (value, wanted) in same.items():
        if value != wanted:
            raise SystemExit(f"bench: {key}={value!r} has no TRL counterpart here; the benchmark needs {wanted!r}")
    n = cfg.trainer.prompts_per_step * cfg.rollout.group_size
    if n % cfg.trainer.micro_batch_size:
        raise SystemExit(f"bench: prompts x group ({n}) must be a multiple of the micro-batch size "
                         f"({cfg.trainer.micro_batch_size}), so that TRL's gradient accumulation matches")


def build_spec(cfg: Any, grpo_overrides: list[str], args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """What TRL and the ceilings need: grpo's composed settings (`cfg`, composed from `grpo_overrides`)
    and the prompts of the first S + 1 steps in the order grpo's loop takes them (the warm-up step's first)."""
    import torch

    from grpo_cli.data import load_prompts
    from grpo_cli.loop import prompt_indices
    from grpo_cli.models import load_tokenizer, resolve, torch_dtype

    device = torch.device("cuda" if args.gpu else "cpu")
    tokenizer = load_tokenizer(cfg.model)
    rows = load_prompts(cfg.dataset, tokenizer)
    P = cfg.trainer.prompts_per_step
    picked, position = [], 0
    for _ in range(args.steps + 1):  # the data stream grpo train takes (its short prompts all fit)
        indices, position = prompt_indices(position, P, [True] * len(rows), cfg.seed)
        picked += [rows[i] for i in indices]
    model = resolve(cfg.model.name_or_path)
    return {
        "repo": str(ROOT), "rollout": cfg.rollout.engine, "model": model, "model_name": cfg.model.name_or_path, "device": device.type,
        "dtype": str(torch_dtype(cfg.model.dtype, device)).removeprefix("torch."),
        "gradient_checkpointing": cfg.model.gradient_checkpointing, "cpu_matmul": cfg.model.cpu_matmul,
        "rows": [{"prompt": r["prompt"], "answer": str(r["answer"])} for r in picked],
        "steps": args.steps + 1, "prompts_per_step": P, "group_size": cfg.rollout.group_size,
        "micro_batch_size": cfg.trainer.micro_batch_size, "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p, "top_k": cfg.rollout.top_k,
        "beta": cfg.loss.beta, "clip_low": cfg.loss.clip_low, "clip_high": cfg.loss.clip_high,
        "lr": cfg.trainer.lr, "adam_betas": list(cfg.optimizer.betas), "adam_eps": cfg.optimizer.eps,
        "weight_decay": cfg.optimizer.weight_decay, "max_grad_norm": cfg.trainer.max_grad_norm,
        "seed": cfg.seed, "pad_id": tokenizer.pad_token_id,
        "rewards": {label: vars(term) for label, term in cfg.rewards.items()},
        "task": f"{cfg.dataset.source}/{cfg.dataset.task}",
        "overrides": grpo_overrides,  # grpo's config: the vLLM ceiling makes grpo's own engine
        "output_dir": str(run_dir / "trl"),
    }


# ----------------------------------------------------------------------------- running a tool
def touch_memory(share: float = 0.75) -> dict[str, float]:
    """Write once to `share` of the machine's available memory, in a process that then exits.

    On the VMs these benchmarks run on, the first write to a page of the VM's memory since it
    booted costs several times a later one (16 GiB took 22.4 s the first time, 4.8 s the second):
    grpo, measured first, would pay that for memory TRL, measured last, finds already touched.
    Touching it all beforehand gives every tool the same machine."""
    size = int(report.meminfo("MemAvailable") * share) // 4096 * 4096
    print(f"[bench] writing {size / 2**30:.1f} GiB of memory once, so that no tool pays for the machine's first "
          "touch of it", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import torch; torch.ones({size // 4}, dtype=torch.float32)"], check=True)
    return {"gib": round(size / 2**30, 1), "seconds": round(time.perf_counter() - start, 1)}


class Measured(NamedTuple):
    returncode: int
    wall_s: float
    peak_rss: int  # bytes, the largest process of the tree


def run_measured(name: str, cmd: list[str], log: Path) -> Measured:
    """Run `cmd`, echoing its key lines, all output to `log`; its own peak RSS from wait4."""
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=40)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            f.write(line)
            tail.append(line)
            if ECHO.match(line.strip()):
                print(f"  {line.rstrip()}", flush=True)
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    measured = Measured(proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024)  # Linux: KiB
    if measured.returncode != 0:
        sys.stdout.write("".join(tail))
        raise SystemExit(f"bench: {name} failed (exit {measured.returncode}); full output in {log}")
    print(f"[bench] {name}: {measured.wall_s:.0f} s, peak RSS {measured.peak_rss / 2**30:.2f} GiB", flush=True)
    return measured


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize.resolve(), None if args.no_record else args.results)
    try:
        from grpo_cli.config import compose
    except ImportError:
        raise SystemExit("bench: run it with grpo's environment: .venv/bin/python benchmarks/bench.py "
                         "(or make bench)") from None
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench: --gpu needs a CUDA GPU (and grpo installed with its cuda extra, for vLLM)")
    if args.rollout == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("bench: vLLM is not installed here; install it (make install), or measure both tools "
                             "on transformers generate with --rollout hf")
    started = datetime.now(timezone.utc)
    run_dir = (args.out or HERE / "out" / started.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    grpo_over = overrides(args, run_dir / "grpo")
    cfg = compose(grpo_over, HERE)
    check_comparable(cfg, args.gpu)
    spec = build_spec(cfg, grpo_over, args, run_dir)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    P, G = spec["prompts_per_step"], spec["group_size"]
    print(f"[bench] {spec['model_name']} {spec['dtype']} on {spec['device']}: {P} prompts x G={G}, "
          f"<= {spec['max_new_tokens']} new tokens, beta {spec['beta']}, lr {spec['lr']}, micro-batch "
          f"{spec['micro_batch_size']}; {args.steps} measured steps after 1 warm-up; output in {run_dir}", flush=True)

    trl_python, install_s = trl_venv.ensure(args.gpu)
    load_before = os.getloadavg()[0]  # before touch_memory, whose own work would show in it
    touched = None if args.gpu else touch_memory()
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"[bench] warning: load average {load_before:.1f} on {os.cpu_count()} cores: other work is running, "
              "and on a busy machine step times can be several times slower than on an idle one", flush=True)
    python = sys.executable
    rss: dict[str, int] = {}
    # `python -m grpo_cli` rather than the `grpo` script: the same program, also where grpo runs from
    # its source tree without being installed (the GPU machines, benchmarks/gpu_check.sh).
    rss["grpo"] = run_measured("grpo train", [python, "-m", "grpo_cli", "train", "--config-dir", str(HERE), *grpo_over],
                               run_dir / "grpo.log").peak_rss
    # The bare forward+backward uses the completion lengths grpo's measured steps actually had.
    measured = report.grpo_measured(run_dir / "grpo", args.steps)
    spec["completion_lengths"] = [max(1, round(r["completion/len_mean"])) for r in measured]
    spec_path.write_text(json.dumps(spec, indent=1))
    generation = ("vllm", "raw vLLM generation") if spec["rollout"] == "vllm" else ("hf", "raw HF generate")
    for mode, name in (generation, ("learner", "bare forward+backward")):
        rss[mode] = run_measured(name, [python, str(HERE / "ceilings.py"), mode, str(spec_path),
                                        str(run_dir / f"{mode}.json")], run_dir / f"{mode}.log").peak_rss
    rss["trl"] = run_measured("TRL GRPOTrainer", [str(trl_python), str(HERE / "trl_grpo.py"), str(spec_path),
                                                  str(run_dir / "trl.json")], run_dir / "trl.log").peak_rss
    run = {"steps": args.steps, "started": f"{started:%Y-%m-%d %H:%M}", "peak_rss": rss, "trl_install_s": install_s,
           "command": " ".join(["benchmarks/bench.py", *(sys.argv[1:] if argv is None else argv)]),
           "versions": report.versions(ROOT, trl_python), "machine": report.machine(args.gpu),
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "memory_touched": touched}
    (run_dir / "run.json").write_text(json.dumps(run, indent=1))
    summarize(run_dir, None if args.no_record else args.results)


def summarize(run_dir: Path, results: Path | None) -> None:
    """Print a finished run's summary, append it to `results` (unless None), and end with the ratio line."""
    r = report.load(run_dir)
    text = report.markdown(r)
    (run_dir / "summary.md").write_text(text)
    print("\n" + text, flush=True)
    if results is not None:
        report.append(results, text)
        print(f"[bench] appended to {results}", flush=True)
    print(f"step_time_ratio_vs_trl={r.ratio():.3f}", flush=True)


if __name__ == "__main__":
    main()
