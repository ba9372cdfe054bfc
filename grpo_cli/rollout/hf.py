"""The transformers rollout engine: `generate` on the learner's own live model (nothing to sync).

What a `Sample` holds, exactly:

- `prompt_ids`: `tokenizer(prompt, add_special_tokens=False).input_ids`; prompts are left-padded
  into batches (the padding is masked and never part of a sample): one per room when a prompt near
  the context has less than max_new_tokens left, each cut into batches of at most max_rows rows.
- `completion_ids`: the sampled tokens up to and including the first EOS token (or special token
  named in the stop strings: `special_stops`), or up to the token that completed a stop string, or
  max_new_tokens of them, or as many as the model's context (max_position_embeddings) leaves after
  the prompt, as vLLM's max_model_len does; the padding `generate` puts after a finished row is
  dropped. A prompt that fills the context is refused.
- `logprobs`: the sampled token's log-probability under the distribution it was drawn from: log_softmax
  of the logits `generate` computed, after temperature scaling and top-k/top-p truncation, in fp32,
  as the vllm engine reports (see grpo_cli/rollout/__init__.py). Without truncation that is exactly
  log_softmax(logits / temperature), what the learner computes from a forward pass of the same
  weights. At temperature 0 (greedy): log_softmax(logits).
- `text`: the completion decoded without special tokens as it reads after the prompt (as vLLM
  decodes it), cut right after the first stop string.
- `truncated`: no EOS and no stop string within max_new_tokens (or the context).

Sampling is exactly temperature / top-k / top-p (transformers' own warpers, in that order, as in
vLLM): the model's own generation_config.json defaults (repetition penalty, top-k 50, min-p...) are
not applied, as in the vllm engine; only its EOS ids are.

Seeds (the contract of grpo_cli/rollout/__init__.py): `generate` runs greedy, and the last logits
processor draws every row's token itself (`_Sampler`), with one torch.Generator per prompt seeded
with `prompt_seed(seed, i, n)` that draws all n of its rows at each step. So a prompt's samples do
not depend on its batch mates. Unseeded (seed=None), that seed is drawn from the global torch RNG;
seeded, the global random state is left untouched.

Batches: one `generate` holds at most `max_rows` rows (rollout.hf_max_rows; every row holds its own
KV cache and a few vocabulary-sized fp32 tensors), so a call's prompts run in chunks of whole
prompts, max_rows // n of them. A prompt whose n alone is above max_rows runs in pieces of its
samples, each of which draws the prompt's whole (n, vocab) block at every step and keeps its own
rows. Either way the samples are exactly those of one big `generate` (index i is the prompt's index
in the call), up to the float rounding a batch shape can change in the model's forward.
The model is put in eval mode for generation and its previous train/eval mode restored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from grpo_cli.rollout import (
    Sample,
    SamplingSettings,
    check_prompt_lengths,
    context_length,
    prompt_seed,
    special_stops,
)


class _LogprobRecorder:
    """The last logits processor: picks each row's next token and records its log_softmax(scores).

    It runs after the temperature/top-k/top-p warpers, so it sees the distribution the token is drawn
    from (the raw logits when greedy). The token is `sampler`'s draw, returned as scores that make
    greedy decoding pick exactly it, or without a sampler (greedy) the argmax `generate` takes itself.
    Only the picked token's value is kept: no vocabulary-sized tensor outlives its step."""

    def __init__(self, sampler: _Sampler | None = None) -> None:
        self.sampler = sampler
        self.values: list[torch.Tensor] = []  # one (rows,) tensor a step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = scores.argmax(dim=-1) if self.sampler is None else self.sampler.draw(scores)
        self.values.append(torch.log_softmax(scores.float(), dim=-1).gather(1, tokens[:, None])[:, 0])
        if self.sampler is None:
            return scores
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens[:, None], 0.0)

    def finish(self, rows: int) -> torch.Tensor:
        """(rows, steps) log-probs of the tokens picked at each step."""
        return torch.stack(self.values, dim=1) if self.values else torch.zeros(rows, 0)


class _Sampler:
    """Draws each row's next token, every prompt's rows from that prompt's own generator.

    `streams` holds, in row order, one (generator, first, end) for each prompt of the batch: its
    samples first..end-1 of n are the batch's next end - first rows. The draw is the exponential
    race: with E_v ~ Exp(1) independent, argmax_v p_v / E_v is token v with probability p_v (the
    smallest of E_v / p_v, exponentials of rate p_v). Every step draws (n, vocab) values from each
    generator whatever the probabilities are and whichever of its samples the batch holds, so a
    prompt's stream, and with it its samples, are the same whichever prompts and rows share the batch."""

    def __init__(self, streams: list[tuple[torch.Generator, int, int]], n: int) -> None:
        self.streams = streams
        self.n = n

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """(rows,) token ids drawn from softmax(scores), scores (rows, vocab)."""
        probs = torch.softmax(scores.float(), dim=-1)  # (rows, vocab); 0 where top-k/top-p removed a token
        race = torch.empty_like(probs)
        row = 0
        for generator, first, end in self.streams:
            if end - first == self.n:
                race[row:row + self.n].exponential_(generator=generator)
            else:  # the same (n, vocab) draw as a whole prompt's, of which these rows are a part
                race[row:row + end - first] = torch.empty((self.n, probs.shape[1]), dtype=probs.dtype,
                                                          device=probs.device).exponential_(generator=generator)[first:end]
            row += end - first
        kept = probs > 0
        keys = probs.div_(race)  # in place: one vocabulary-sized tensor less per row
        del race
        # A zero-probability token must never win, even against a draw of exactly 0 (0/0 is NaN).
        return keys.masked_fill_(kept.logical_not_(), -1.0).argmax(dim=-1)


_CONTEXT = 8  # tokens decoded before a completion (or a stop check's window), so that its first token reads as in the text


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
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = input_ids[:, start:].tolist()
        contexts = input_ids[:, max(0, start - _CONTEXT):start].tolist()
        for row, (context, tail) in enumerate(zip(contexts, tails, strict=True)):
            if self.stopped_at[row] is not None:
                done[row] = True
                continue
            text = _decode_after(self.tokenizer, context, tail)
            if any(s in text for s in self.stop):
                self.stopped_at[row] = length
                done[row] = True
        return done


class HFEngine:
    """`Engine` that samples with transformers `generate` from `policy`, the learner's model, at most
    `max_rows` rows (prompts x samples) a `generate`."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, max_rows: int = 256) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: must be at least 1")
        self.model = policy
        self.tokenizer = tokenizer
        self.max_rows = max_rows
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
        texts, stop_ids = special_stops(self.tokenizer, sampling.stop)
        sampling = dataclasses.replace(sampling, stop=texts)
        eos_ids = sorted({*self.eos_ids, *stop_ids})  # a special token named in `stop` ends a completion as an EOS
        prompt_ids = [list(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        if self.context is not None:
            check_prompt_lengths(prompts, prompt_ids, self.context, "the model's max_position_embeddings")
        seed = None
        if sampling.temperature != 0:
            seed = sampling.seed if sampling.seed is not None else int(torch.randint(1 << 62, ()))
        # Every row of one `generate` runs as many steps as the longest: a prompt near the context
        # would run past it (positions a model with learned position embeddings does not have: an
        # IndexError on CPU, a device-side assert on CUDA). So prompts are generated in groups of the
        # same room; each prompt's samples do not depend on its group. A sharded model keeps one group:
        # its ranks must make as many calls, each as many steps (synced_gpus keeps a finished rank
        # stepping, so the room of one group is the longest).
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            room = sampling.max_new_tokens if self.context is None else min(sampling.max_new_tokens,
                                                                              self.context - len(ids))
            groups.setdefault(room, []).append(i)
        if _sharded(self.model):
            groups = {max(groups): list(range(len(prompts)))}
        calls = [(max_new, chunk) for max_new, indices in groups.items()
                 for chunk in _chunks(indices, sampling.n, self.max_rows)]
        fillers = 0
        if _sharded(self.model):
            # Every rank must make as many `generate` calls (each is collective), agreed before the first:
            # one with fewer batches (fewer prompts) makes up the difference with one-row greedy calls
            # whose samples it drops.
            from grpo_cli import distributed

            fillers = int(distributed.all_reduce([float(len(calls))], "max")[0]) - len(calls)
        samples: list[Sample | None] = [None] * (len(prompts) * sampling.n)
        for max_new, chunk in calls:
            for (i, first, _), part in zip(chunk, self._generate(chunk, prompt_ids, sampling, seed, max_new, eos_ids),
                                           strict=True):
                samples[i * sampling.n + first:i * sampling.n + first + len(part)] = part
        for _ in range(fillers):
            self._generate([(0, 0, 1)], prompt_ids, dataclasses.replace(sampling, n=1), None, 1, eos_ids)
        return samples  # type: ignore[return-value]

    def _generate(self, pieces: list[tuple[int, int, int]], all_prompt_ids: list[list[int]],
                  sampling: SamplingSettings, seed: int | None, max_new: int, eos_ids: list[int]) -> list[list[Sample]]:
        """For each piece (i, first, end): samples first..end-1 of the n of prompt `all_prompt_ids[i]`,
        all in one batched `generate` of at most `max_new` steps, each ending at any of `eos_ids`; seed
        None: greedy."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        greedy = seed is None
        device = next(self.model.parameters()).device
        row_prompts = [i for i, first, end in pieces for _ in range(first, end)]  # [p0 x n, p1 x n, ...]
        rows = len(row_prompts)
        width = max(len(all_prompt_ids[i]) for i in row_prompts)
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for row, i in enumerate(row_prompts):  # left padding: every prompt ends where generation starts
            ids = all_prompt_ids[i]
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1

        stopper = _StopStrings(self.tokenizer, sampling.stop, width, rows) if sampling.stop else None
        processors = [] if greedy else _warpers(sampling)
        sampler = None
        if not greedy:
            sampler = _Sampler([(torch.Generator(device=device).manual_seed(prompt_seed(seed, i, sampling.n)),
                                 first, end) for i, first, end in pieces], sampling.n)
        recorder = _LogprobRecorder(sampler)
        processors.append(recorder)
        # do_sample=False: generate() takes the argmax of what the processors leave, which `_Sampler` drew.
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new, num_return_sequences=1,
                                  eos_token_id=eos_ids, pad_token_id=self.pad_id, use_cache=True)
        was_training = self.model.training
        model_config = getattr(self.model, "generation_config", None)
        try:
            self.model.eval()
            # generate() fills every unset option from the model's generation_config (repetition
            # penalty, min-p...): a blank one keeps sampling to exactly what `config` says.
            self.model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=self.pad_id)
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
        logprobs = recorder.finish(rows).cpu()
        if logprobs.shape != completions.shape:
            raise RuntimeError(f"recorded log-probs {tuple(logprobs.shape)} do not match the generated tokens "
                               f"{tuple(completions.shape)}")
        eos = torch.tensor(eos_ids)
        samples: list[list[Sample]] = [[] for _ in pieces]
        piece_of = [p for p, (_, first, end) in enumerate(pieces) for _ in range(first, end)]
        for row, prompt_index in enumerate(row_prompts):
            room = max_new if self.context is None else self.context - len(all_prompt_ids[prompt_index])
            ids = completions[row, :room].tolist()  # tokens past the context are not the model's to train on
            end, by_eos, by_stop = len(ids), False, False
            hits = torch.isin(completions[row, :room], eos).nonzero()
            if len(hits):
                end, by_eos = int(hits[0]) + 1, True
            if stopper is not None and stopper.stopped_at[row] is not None and stopper.stopped_at[row] <= end:
                end, by_eos, by_stop = stopper.stopped_at[row], False, True
            text = _decode_after(self.tokenizer, all_prompt_ids[prompt_index][-_CONTEXT:], ids[:end])
            if by_stop:
                text = _cut_after_stop(text, sampling.stop)
            samples[piece_of[row]].append(Sample(
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


def _chunks(indices: list[int], n: int, max_rows: int) -> list[list[tuple[int, int, int]]]:
    """The batches of one `generate` each, at most `max_rows` rows: pieces (i, first, end), samples
    first..end-1 of prompt i's n. Whole prompts, max_rows // n a batch; a prompt whose n is above
    max_rows alone, in ceil(n / max_rows) pieces of as many samples as can be."""
    if n <= max_rows:
        per = max_rows // n
        return [[(i, 0, n) for i in indices[k:k + per]] for k in range(0, len(indices), per)]
    parts = -(-n // max_rows)
    return [[(i, n * p // parts, n * (p + 1) // parts)] for i in indices for p in range(parts)]


def _sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _decode_after(tokenizer: Any, context: list[int], ids: list[int]) -> str:
    """`ids` decoded (special tokens skipped) as they read after `context`, as vLLM's detokenizer, primed
    with the prompt, decodes a completion: a SentencePiece tokenizer (Llama 2, Mistral) drops the space
    that starts a text, which a completion's first token does not start."""
    head = tokenizer.decode(context, skip_special_tokens=True)
    whole = tokenizer.decode([*context, *ids], skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(ids, skip_special_tokens=True)


def _cut_after_stop(text: str, stop: tuple[str, ...]) -> str:
    ends = [text.find(s) + len(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text
