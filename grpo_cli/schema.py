"""The configuration schema: one frozen dataclass per config group, the defaults of every key.

Hydra composes YAML files over it (grpo_cli.config); conf/ documents each field, and recipes overlay
them. A string field with a fixed set of values lists them in its metadata (`_choice`), which
`grpo_cli.config.validate` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": (default, *choices)})


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = _choice("auto", "float32", "bfloat16", "float16")
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    share_prompts: bool | None = None  # None: on a CPU, off on a GPU (see grpo_cli/logprobs.py)
    cpu_matmul: str = _choice("auto", "onednn", "torch")  # a CPU learner's fp32 linear layers (grpo_cli/onednn.py)
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass(frozen=True)
class DatasetConfig:
    source: str = _choice("reasoning_gym", "hf", "jsonl")
    path: str | None = None  # hf: dataset id or local dir; jsonl: file (saved as an absolute path)
    name: str | None = None  # hf: configuration name
    split: str = "train"
    task: str = "chain_sum"  # reasoning_gym task
    task_args: dict[str, Any] = field(default_factory=dict)
    size: int = 1000
    seed: int = 0
    problem_column: str = "question"
    answer_column: str | None = "answer"  # null: no reference answers (for rewards that need none)
    template: str = _choice("r1_zero", "chat", "plain")
    system_prompt: str | None = None
    prefill: str = ""


@dataclass(frozen=True)
class RewardTerm:
    fn: str | None = None  # reward function name; None = the term's own name
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = _choice("adamw")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    master_weights: bool | None = None  # fp32 copy of bf16/fp16 weights to step; None: whenever there are such


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = _choice("vllm", "hf", "vllm_server")
    group_size: int = 8
    max_new_tokens: int = 256
    max_prompt_tokens: int = 2048  # longer prompts are left out of training (and vllm's max_model_len leaves room for these)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    sync_every: int = 1
    check_sync: bool = False  # after each push: engine vs learner log-probs of a probe (sync/logprob_diff_max)
    gpu_memory_utilization: float = 0.35
    cpu_kv_cache_mib: int = 256
    enforce_eager: bool = True
    sleep_mode: bool = True
    tensor_parallel_size: int = 1  # GPUs per vLLM engine (a rollout server's)
    hf_max_rows: int = 256  # hf engine: most rows (prompts x samples) in one `generate`; more run in turns
    servers: list[str] = field(default_factory=list)  # vllm_server: host:port of each `grpo rollout-server`
    server_timeout_s: float = 600.0  # vllm_server: longest wait for one server reply, and for start-up
    sync_method: str = _choice("file", "nccl")  # vllm_server: weights through sync_dir, or NCCL (GPU)
    sync_dir: str | None = None  # vllm_server, file sync: a folder the servers can read; None = <run>/weight-sync


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 100
    prompts_per_step: int = 8
    micro_batch_size: int = 8
    lr: float = 1e-6
    lr_scheduler: str = _choice("constant", "cosine", "linear")
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    num_iterations: int = 1
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 0
    eval_before_train: bool = False
    mask_truncated: bool = False
    dynamic_sampling: bool = False
    max_resample: int = 3


@dataclass(frozen=True)
class LossConfig:
    beta: float = 0.04
    kl: str = _choice("k3", "k1", "k2")
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = _choice("seq_mean_token_mean", "token_mean", "seq_sum_norm")
    ratio_level: str = _choice("token", "sequence")
    adv_scale: str = _choice("group", "batch", "none")
    adv_eps: float = 1e-4
    tis_cap: float | None = None


# Words and phrases of a model re-checking its own work (R1-Zero's "aha moment"): matched as whole
# words, in any case, by the completion/reflection_rate metric.
REFLECTION_WORDS = ("wait", "let me check", "let me re-check", "let me recheck", "let me verify", "re-evaluate",
                    "reevaluate", "re-examine", "verify", "double-check", "double check", "however", "hmm",
                    "on second thought", "mistake")


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 1
    samples_per_step: int = 4
    reflection_words: list[str] = field(default_factory=lambda: list(REFLECTION_WORDS))
    wandb: bool = False
    wandb_project: str = "grpo"
    wandb_entity: str | None = None
    wandb_mode: str = _choice("online", "offline")


@dataclass(frozen=True)
class EvalConfig:
    n: int = 1
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    limit: int | None = None
    split: str = "test"
    # options of conf/dataset/ or .jsonl files (read with dataset.*_column, saved absolute); [] = `dataset` itself
    datasets: list[str] = field(default_factory=list)
    run: str | None = None  # grpo eval: a run directory (its latest checkpoint unless `checkpoint` says)
    checkpoint: str | None = None  # grpo eval: a step number, a step-NNNNNN name or a folder


@dataclass(frozen=True)
class Config:
    recipe: str | None = None  # filled in from the composition, not set by hand
    description: str = ""
    output_dir: str | None = None
    resume: str | None = None  # a run directory to continue
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # label -> RewardTerm. Untyped for Hydra (whose `+rewards.x.weight=1` cannot create a typed
    # dict value); `compose` turns each entry into a RewardTerm and checks its keys.
    rewards: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
