"""The transformers rollout engine: `generate` on the learner's own live model (nothing to sync).

What a `Sample` holds, exactly:

- `prompt_ids`: `tokenizer(prompt, add_special_tokens=False).input_ids`; prompts are left-padded
  into one batch (the padding is masked and never part of a sample), or one per room when a prompt
  near the context has less than max_new_tokens left.
- `completion_ids`: the sampled tokens up to and including the first EOS token, or up to the token
  that completed a stop string, or max_new_tokens of them, or as many as the model's context
  (max_position_embeddings) leaves after the prompt, as vLLM's max_model_len does; the padding
  `generate` puts after a finished row is dropped. A prompt that fills the context is refused.
- `logprobs`: the sampled token's log-probability under the distribution it was drawn from: log_softmax
  of the logits `generate` computed, after temperature scaling and top-k/top-p truncation, in fp32,
  as the vllm engine reports (see grpo_cli/rollout/__init__.py). Without truncation that is exactly
  log_softmax(logits / temperature), what the learner computes from a forward pass of the same
  weights. At temperature 0 (greedy): log_softmax(logits).
- `text`: the completion decoded without special tokens, cut right after the first stop string.
- `truncated`: no EOS and no stop string within max_new_tokens (or the context).

Sampling is exactly temperature / top-k / top-p (transformers' own warpers, in that order, as in
vLLM): the model's own generation_config.json defaults (repetition penalty, top-k 50, min-p...) are
not applied, as in the vllm engine; only its EOS ids are.

Seeds (the contract of grpo_cli/rollout/__init__.py): `generate` runs greedy, and the last logits
processor (`_Sampler`) draws every row's token itself, with one torch.Generator per prompt seeded
with `prompt_seed(seed, i, n)`. So a prompt's samples do not depend on its batch mates, while the
call stays one batched `generate`. Unseeded (seed=None), that seed is drawn from the global torch
RNG; seeded, the global random state is left untouched.
The model is put in eval mode for generation and its previous train/eval mode restored.
"""

from __future__ import annotations

from typing import Any

import torch

from grpo_cli.rollout import Sample, SamplingSettings, check_prompt_lengths, context_length, prompt_seed


class _LogprobRecorder:
    """A logits processor that records log_softmax(scores) of each sampled token.

    It runs after the temperature/top-k/top-p warpers and before `_Sampler`, so it sees the
    distribution the token is drawn from (the raw logits when greedy). The token sampled at step t
    is only known at step t + 1 (the last column of input_ids), so one step of log-probabilities is
    kept and gathered then; `finish` gathers the last step."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _gather(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.values.append(self.pending.gather(1, tokens[:, None].to(self.pending.device))[:, 0])
            self.pending = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._gather(last_tokens)
        return torch.stack(self.values, dim=1) if self.values else torch.zeros(len(last_tokens), 0)


class _Sampler:
    """The last logits processor: draws each row's next token, every prompt's n rows from that
    prompt's own generator, and returns scores that make greedy decoding pick exactly that token.

    The draw is the exponential race: with E_v ~ Exp(1) independent, argmax_v p_v / E_v is token v
    with probability p_v (the smallest of E_v / p_v, exponentials of rate p_v). Every step draws
    (n, vocab) values from each generator whatever the probabilities are, so a prompt's stream, and
    with it its samples, are the same whichever prompts share the batch."""

    def __init__(self, generators: list[torch.Generator], n: int) -> None:
        self.generators = generators
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (rows, vocab); 0 where top-k/top-p removed a token
        race = torch.empty_like(probs)
        for i, generator in enumerate(self.generators):  # rows [i*n, (i+1)*n) are prompt i's
            race[i * self.n:(i + 1) * self.n].exponential_(generator=generator)
        # A zero-probability token must never win, even against a draw of exactly 0 (0/0 is NaN).
        keys = torch.where(probs > 0, probs / race, -1.0)
        tokens = keys.argmax(dim=-1)
        picked = torch.full_like(scores, -float("inf"))
        return picked.scatter_(1, tokens[:, None], 0.0)


class _StopStrings:
    """A stopping criterion: a row is done once its completion text contains a stop string.

    Records, per row, how many completion tokens it had when that happened (first time only)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], prompt_len: int, rows: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len
        self.stopped_at: list[int | None] = [None] * rows
        # A stop string of k characters is at most 4k UTF-8 bytes, so at most 4k tokens even if every
        # byte is a token of its own; one more covers a token that starts mid-character.
        self.window = 4 * max(len(s) for s in stop) + 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        length = input_ids.shape[1] - self.prompt_len
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
        for row, tail in enumerate(tails):
            if self.stopped_at[row] is not None:
                done[row] = True
                continue
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stop):
                self.stopped_at[row] = length
                done[row] = True
        return done


class HFEngine:
    """`Engine` that samples with transformers `generate` from `policy`, the learner's model."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any) -> None:
        self.model = policy
        self.tokenizer = tokenizer
        eos: set[int] = set()
        model_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
        for ids in (model_eos, tokenizer.eos_token_id):
            if ids is not None:
                eos.update([ids] if isinstance(ids, int) else ids)
        if not eos:
            raise ValueError("the hf engine needs an EOS token id (none in the tokenizer or generation config)")
        self.eos_ids = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.context = context_length(getattr(policy, "config", None))  # tokens per sequence, prompt + completion (None: no limit)

    def generate(self, prompts: list[str], sampling: SamplingSettings) -> list[Sample]:
        if not prompts:
            return []
        prompt_ids = [list(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        if self.context is not None:
            check_prompt_lengths(prompts, prompt_ids, self.context, "the model's max_position_embeddings")
        seed = None
        if sampling.temperature != 0:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(1 << 62, ()))
        # Every row of one `generate` runs as many steps as the longest: a prompt near the context
        # would run past it (positions a model with learned position embeddings does not have: an
        # IndexError on CPU, a device-side assert on CUDA). So prompts are generated in groups of the
        # same room; each prompt's samples do not depend on its group. A sharded model keeps one call:
        # its ranks must make as many calls, each as many steps.
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            room = sampling.max_new_tokens if self.context is None else min(sampling.max_new_tokens,
                                                                              self.context - len(ids))
            groups.setdefault(room, []).append(i)
        if _sharded(self.model):
            groups = {max(groups): list(range(len(prompts)))}
        samples: list[Sample | None] = [None] * (len(prompts) * sampling.n)
        for max_new, indices in groups.items():
            for i, group in zip(indices, self._generate(indices, prompt_ids, sampling, seed, max_new), strict=True):
                samples[i * sampling.n:(i + 1) * sampling.n] = group
        return samples  # type: ignore[return-value]

    def _generate(self, indices: list[int], all_prompt_ids: list[list[int]], sampling: SamplingSettings,
                  seed: int | None, max_new: int) -> list[list[Sample]]:
        """The n samples of each prompt `all_prompt_ids[i]` for i in `indices`, in one batched `generate`
        of at most `max_new` steps; seed None: greedy."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        greedy = seed is None
        device = next(self.model.parameters()).device
        prompt_ids = [all_prompt_ids[i] for i in indices]
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            if ids:
                input_ids[i, width - len(ids):] = torch.tensor(ids)
                attention_mask[i, width - len(ids):] = 1

        rows = len(prompt_ids) * sampling.n  # each prompt n times in a row: [p0 x n, p1 x n, ...]
        input_ids = input_ids.repeat_interleave(sampling.n, dim=0)
        attention_mask = attention_mask.repeat_interleave(sampling.n, dim=0)
        recorder = _LogprobRecorder()
        stopper = _StopStrings(self.tokenizer, sampling.stop, width, rows) if sampling.stop else None
        processors = [] if greedy else _warpers(sampling)
        processors.append(recorder)
        if not greedy:
            generators = [torch.Generator(device=device).manual_seed(prompt_seed(seed, i, sampling.n))
                          for i in indices]
            processors.append(_Sampler(generators, sampling.n))
        # do_sample=False: generate() takes the argmax of what the processors leave, which `_Sampler` drew.
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, num_return_sequences=1,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id, use_cache=True)
        was_training = self.model.training
        model_config = getattr(self.model, "generation_config", None)
        try:
            self.model.eval()
            # generate() fills every unset option from the model's generation_config (repetition
            # penalty, min-p...): a blank one keeps sampling to exactly what `config` says.
            self.model.generation_config = GenerationConfig(eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
            with torch.no_grad():
                sequences = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
                    # A model sharded over several processes (FSDP) gathers its weights in every forward: all
                    # ranks must run as many steps, so one that is done keeps stepping until all are.
                    synced_gpus=_sharded(self.model),
                )
        finally:
            if model_config is not None:
                self.model.generation_config = model_config
            self.model.train(was_training)

        if not isinstance(sequences, torch.Tensor):
            sequences = sequences.sequences
        completions = sequences[:, width:].cpu()
        logprobs = recorder.finish(sequences[:, -1]).cpu() if completions.shape[1] else torch.zeros(rows, 0)
        if logprobs.shape != completions.shape:
            raise RuntimeError(f"recorded log-probs {tuple(logprobs.shape)} do not match the generated tokens "
                               f"{tuple(completions.shape)}")
        eos = torch.tensor(self.eos_ids)
        samples: list[list[Sample]] = [[] for _ in indices]
        for row in range(rows):
            prompt_index = indices[row // sampling.n]
            room = max_new if self.context is None else self.context - len(all_prompt_ids[prompt_index])
            ids = completions[row, :room].tolist()  # tokens past the context are not the model's to train on
            end, by_eos, by_stop = len(ids), False, False
            hits = torch.isin(completions[row, :room], eos).nonzero()
            if len(hits):
                end, by_eos = int(hits[0]) + 1, True
            if stopper is not None and stopper.stopped_at[row] is not None and stopper.stopped_at[row] <= end:
                end, by_eos, by_stop = stopper.stopped_at[row], False, True
            text = self.tokenizer.decode(ids[:end], skip_special_tokens=True)
            if by_stop:
                text = _cut_after_stop(text, sampling.stop)
            samples[row // sampling.n].append(Sample(
                prompt_index=prompt_index, prompt_ids=list(all_prompt_ids[prompt_index]), completion_ids=ids[:end], text=text,
                logprobs=logprobs[row, :end].tolist(), truncated=not (by_eos or by_stop),
            ))
        return samples

    def sleep(self) -> None:  # the model belongs to the learner
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def _warpers(sampling: SamplingSettings) -> list[Any]:
    """Temperature, then top-k, then top-p, those that are on: the order of transformers' and vLLM's samplers."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _cut_after_stop(text: str, stop: tuple[str, ...]) -> str:
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text
