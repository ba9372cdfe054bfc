"""TRL's GRPOTrainer on the benchmark workload; runs inside TRL's own environment (benchmarks/.venv-trl).

    benchmarks/.venv-trl/bin/python benchmarks/trl_grpo.py SPEC.json RESULT.json

SPEC.json is written by bench.py from grpo's composed config (see `spec` there): the model folder,
the prompts in the order grpo's loop takes them, and every setting both trainers share. RESULT.json
gets, per optimizer step, the seconds from on_step_begin to on_step_end, the seconds inside the
model's `generate` and inside the reward, the completion tokens generated, and TRL's own logs.

How one TRL step is made to equal one grpo step (TRL 1.16 semantics, checked in its GRPOConfig):
TRL's batch sizes count completions. per_device_train_batch_size = grpo's micro_batch_size and
gradient_accumulation_steps = P*G / micro_batch_size make one optimizer step see P*G completions;
generation_batch_size is left unset, so it defaults to per_device_train_batch_size x 1 process x
steps_per_generation, and steps_per_generation defaults to gradient_accumulation_steps: one
`generate` call of P*G completions (P prompts, each repeated num_generations=G times) per optimizer
step. num_iterations=1 with steps_per_generation == gradient_accumulation_steps means TRL computes
no separate old-policy forward, as grpo does not (grpo takes the engine's log-probs). With beta > 0
both load a frozen reference model and run it forward over every completion.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["repo"])  # grpo's reward code is plain Python: both tools score with the same function

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo_cli.rewards import build_reward_set

    P, G, M = spec["prompts_per_step"], spec["group_size"], spec["micro_batch_size"]
    if (P * G) % M:
        raise SystemExit(f"prompts x group ({P * G}) must be a multiple of the micro-batch size ({M})")
    rows = spec["rows"]  # P per step, in grpo's order; shuffle_dataset=False keeps it
    assert len(rows) == P * spec["steps"], "the spec must hold exactly the prompts of every step"
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    bf16 = spec["dtype"] == "bfloat16"

    args = GRPOConfig(
        output_dir=spec["output_dir"],
        use_cpu=spec["device"] == "cpu",
        bf16=bf16, fp16=False,
        model_init_kwargs={"dtype": getattr(torch, spec["dtype"])},
        gradient_checkpointing=spec["gradient_checkpointing"],  # TRL defaults to True; grpo to False
        # ---- batch: one optimizer step = one generation of P x G completions (module docstring)
        per_device_train_batch_size=M,
        gradient_accumulation_steps=P * G // M,
        num_generations=G,
        num_iterations=1,
        shuffle_dataset=False,
        max_steps=spec["steps"],
        # ---- sampling (HF generate, TRL's default rollout)
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
        # ---- objective: GRPO's per-sequence token mean, k3 KL against the reference, group-std advantages
        loss_type="grpo",
        beta=spec["beta"],
        epsilon=spec["clip_low"], epsilon_high=spec["clip_high"],
        scale_rewards="group",
        # ---- optimizer: AdamW, constant lr, same clipping
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=spec["adam_betas"][0], adam_beta2=spec["adam_betas"][1], adam_epsilon=spec["adam_eps"],
        weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"],
        # ---- nothing else in the step
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0, seed=spec["seed"],
    )

    rewards = build_reward_set(spec["rewards"])
    step = {"reward_s": 0.0, "generate_s": 0.0, "tokens": 0}

    def reward(completions: list[str], completion_ids: list[list[int]], **columns: object) -> list[float]:
        start = time.perf_counter()
        columns = {k: v for k, v in columns.items() if isinstance(v, list)}  # drop TRL's trainer_state, log_* hooks
        scores = rewards.score(completions, **columns, completion_tokens=[len(c) for c in completion_ids])
        step["tokens"] += sum(len(c) for c in completion_ids)
        step["reward_s"] += time.perf_counter() - start
        return scores.total

    reward.__name__ = "accuracy"
    records: list[dict] = []

    cuda = spec["device"] == "cuda"

    def sync() -> None:  # GPU work is asynchronous: a step's time ends when its kernels have run
        if cuda:
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            sync()
            step.update(start=time.perf_counter(), reward_s=0.0, generate_s=0.0, tokens=0)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            sync()
            records.append({"step": state.global_step, "seconds": time.perf_counter() - step["start"],
                            "generate_s": step["generate_s"], "reward_s": step["reward_s"], "tokens": step["tokens"]})

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if records and logs:
                records[-1].setdefault("logs", {}).update({k: v for k, v in logs.items() if isinstance(v, (int, float))})

    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=args, train_dataset=dataset,
                          callbacks=[StepTimer()])
    generate = trainer.model.generate  # time TRL's rollout without changing it: an instance-level wrapper

    def timed_generate(*a: object, **kw: object) -> object:
        sync()
        start = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            sync()
            step["generate_s"] += time.perf_counter() - start

    trainer.model.generate = timed_generate
    print(f"[trl] {P} prompts x {G} per step = {P * G} completions; per_device_train_batch_size={M}, "
          f"gradient_accumulation_steps={P * G // M}, generation_batch_size={args.generation_batch_size}, "
          f"steps_per_generation={args.steps_per_generation}; {spec['steps']} steps", flush=True)
    trainer.train()
    for r in records:
        print(f"[trl] step {r['step']}: {r['seconds']:.1f} s (generate {r['generate_s']:.1f} s, "
              f"reward {r['reward_s']:.2f} s, {r['tokens']} tokens)", flush=True)
    result = {"steps": records, "generation_batch_size": args.generation_batch_size,
              "steps_per_generation": args.steps_per_generation}
    if cuda:
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
