"""Rollout engines: sample G completions per prompt, with the log-probability of every sampled token.

Three engines share one interface (`Engine`):

- `vllm` (`VLLMEngine`, grpo_cli/rollout/vllm.py): an in-process vLLM engine holding its own copy
  of the weights; the learner's weights reach it through `grpo_cli.sync.push_weights`.
- `hf` (`HFEngine`, grpo_cli/rollout/hf.py): transformers `generate` on the learner's live model
  (nothing to sync), for models vLLM cannot run. Slower: every row runs to the longest one.
- `vllm_server` (`VLLMServerEngine`, grpo_cli/rollout/vllm_server.py): the client of `grpo rollout-server`
  processes (grpo_cli/rollout/server.py), each hosting a `VLLMEngine`, e.g. on other GPUs or machines.

Prompts come fully rendered (chat template applied, prefill appended) and are tokenised without
adding special tokens again, so `Sample.prompt_ids` is exactly what the model saw.

Log-probabilities (`Sample.logprobs`), the same quantity on every engine: each sampled token's
log-probability under the distribution it was drawn from, i.e. log_softmax of the logits after
temperature scaling and after top-k/top-p truncation (renormalised over the tokens kept), in fp32;
at temperature 0 (greedy), log_softmax(logits). That is the behaviour policy that truncated
importance sampling (loss.tis_cap) divides by. Without truncation (top_k=0, top_p=1, the default)
it is exactly log_softmax(logits / temperature), what the learner recomputes; with truncation on it
is higher by -log(probability mass kept) at each step, so `rollout/logprob_diff_max` then measures
the truncation as well as any engine/learner mismatch.

Seeds: with `SamplingSettings.seed` set, the samples of `prompts[i]` depend only on the seed, on i (the
prompt's index in the call), on the prompt and on the other sampling settings, never on the call's
other prompts (up to the float rounding a different batch shape can change in the model's forward).
Each engine draws prompt i's samples from its own random stream, seeded with `prompt_seed(seed, i, n)`;
the engines' samplers differ, so one seed gives different samples on vllm and on hf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from grpo_cli.errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from grpo_cli.schema import ModelConfig, RolloutConfig

__all__ = ["Engine", "Sample", "SamplingSettings", "check_prompt_lengths", "context_length", "make_engine",
           "prompt_seed", "sampling_from_config", "special_stops"]

_SEED_STRIDE = 0x9E3779B1  # spreads per-prompt seeds so that seed s and s + 1 share no streams


@dataclass(frozen=True)
class SamplingSettings:
    n: int                 # completions per prompt (G)
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0         # 0 = off
    stop: tuple[str, ...] = ()   # stop strings, KEPT in the output text (include_stop_str_in_output); one that is
                                 # a special token's text ends a completion at that token, as an EOS (special_stops)
    seed: int | None = None      # same seed + same weights + same prompt at the same index -> same samples


@dataclass(frozen=True)
class Sample:
    prompt_index: int          # index into the prompts list given to generate()
    prompt_ids: list[int]      # token ids of the prompt exactly as the engine tokenised it
    completion_ids: list[int]  # sampled token ids, including the EOS token if the model stopped by itself
    text: str                  # decoded completion text (special tokens skipped; stop string included)
    logprobs: list[float]      # engine's log-prob of each sampled token (len == len(completion_ids))
    truncated: bool            # True if it stopped because of max_new_tokens


class Engine(Protocol):
    """What the training loop and evaluation call. Engines holding their own copy of the weights
    (vllm, vllm_server) also answer `prompt_logprobs(prompt_ids, completion_ids, temperature)`: the
    log-probs of given tokens under their current weights, which checks a push (grpo_cli.sync)."""

    def generate(self, prompts: list[str], sampling: SamplingSettings) -> list[Sample]:
        """len(prompts) * n samples, grouped by prompt in prompt order: [p0s0..p0s(n-1), p1s0, ...]."""
        ...

    def sleep(self) -> None:
        """GPU: release the KV cache (and offload weights) while the learner trains; CPU: no-op."""
        ...

    def wake(self) -> None:
        """Undo `sleep`; call before the next `generate` or weight push."""
        ...

    def close(self) -> None:
        """Free the engine's memory; the engine cannot be used afterwards."""
        ...


def prompt_seed(seed: int, index: int, n: int) -> int:
    """The seed of the random stream of the prompt at `index` in a call, with n samples per prompt.

    Spaced n apart because vLLM gives the j-th of a request's n samples the seed `base + j`: prompts
    of one call never share a stream, even identical ones."""
    return (seed * _SEED_STRIDE + index * n) % (1 << 63)


def special_stops(tokenizer: Any, stop: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]]:
    """`stop` split into the stop strings a completion's text can show and the ids of the special tokens
    named by the others. The text skips special tokens, so a stop string such as "<|im_end|>" (a base
    model's turn end, not its EOS) never matched it: that token ends a completion as an EOS does, kept
    in `completion_ids` and left out of `text`. A UserError for a stop string holding a special token
    along with other text, which could never match."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {token.content: i for i, token in decoder.items() if token.special and token.content}
    texts: list[str] = []
    ids: list[int] = []
    for s in stop:
        if s in special:
            ids.append(special[s])
            continue
        held = next((t for t in special if t in s), None)
        if held is not None:
            raise UserError(f"rollout.stop: {s!r} holds the special token {held!r}, which a completion's text never "
                            f"shows (special tokens are skipped), so it would never stop one; use {held!r} on its "
                            "own: it ends a completion at that token")
        texts.append(s)
    return tuple(texts), ids


def sampling_from_config(rollout: RolloutConfig, seed: int | None = None) -> SamplingSettings:
    """The training-time sampling settings from the `rollout` config group."""
    return SamplingSettings(
        n=rollout.group_size, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
        top_p=rollout.top_p, top_k=rollout.top_k, stop=tuple(rollout.stop), seed=seed,
    )


def context_length(config: Any) -> int | None:
    """The longest sequence (prompt + completion) a model config allows, or None if it names none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_prompt_lengths(prompts: list[str], prompt_ids: list[list[int]], limit: int, what: str) -> None:
    """A UserError for the first prompt that leaves no room for a completion token within `limit`
    tokens per sequence (`what` says where the limit comes from). A longer prompt cannot be sampled
    from, and one past a model's context is not something its learner should train on."""
    for prompt, ids in zip(prompts, prompt_ids, strict=True):
        if len(ids) >= limit:
            start = " ".join(prompt.split())[:60]
            raise UserError(f"a prompt has {len(ids)} tokens ('{start}...'), but the rollout engine holds at most "
                            f"{limit} tokens per sequence, prompt and completion ({what}): shorten the dataset's "
                            "prompts or leave the long ones out")


def make_engine(rollout: RolloutConfig, model: ModelConfig, model_path: str,
                policy: torch.nn.Module | None = None, run_dir: Path | None = None) -> Engine:
    """The engine `rollout.engine` names.

    vllm: a new in-process engine loading `model_path` (a local folder or hub id); `policy` is unused.
    hf: generation on `policy`, the learner's live model (required), with the tokenizer of `model_path`.
    vllm_server: a client of the `grpo rollout-server` processes at `rollout.servers` (waits until they
    are ready); file weight syncs go to `rollout.sync_dir`, else `run_dir`/weight-sync.
    """
    if rollout.engine == "vllm_server":
        from grpo_cli.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(rollout, run_dir=run_dir, model=model, model_config=getattr(policy, "config", None))
    if rollout.engine == "vllm":
        from grpo_cli.rollout.vllm import VLLMEngine

        return VLLMEngine(model_path, rollout, model)
    if rollout.engine == "hf":
        if policy is None:
            raise ValueError("rollout.engine=hf generates with the learner's model: pass it as `policy`")
        from transformers import AutoTokenizer

        from grpo_cli.rollout.hf import HFEngine

        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
        return HFEngine(policy, tokenizer, max_rows=rollout.hf_max_rows)
    raise ValueError(f"rollout.engine={rollout.engine}: expected vllm, hf or vllm_server")
