"""The vLLM rollout engine: an in-process `vllm.LLM` holding its own copy of the policy's weights.

What a `Sample` holds, exactly:

- `prompt_ids`: the engine's prompt tokens, which are `tokenizer(prompt, add_special_tokens=False)`
  (the prompt goes in as token ids, so vLLM adds nothing).
- `completion_ids`: the sampled tokens; the EOS token is included when the model stopped by itself,
  as is a special token named in the stop strings (`special_stops`), which ends a completion as EOS does.
  When a stop string ends a completion, the last token is the one that completed the stop string
  (it can carry characters past the stop string; `text` is cut right after the stop string).
- `logprobs`: vLLM's `processed_logprobs` of the sampled tokens: log_softmax over the logits after
  temperature scaling and after top-k/top-p truncation, in fp32. With top_k=0 and top_p=1 (no
  truncation) that is exactly log_softmax(logits / temperature), what the learner computes. With
  truncation on, it is the log-probability under the truncated, renormalised distribution the token
  was sampled from (never below the untruncated value), the behaviour policy truncated importance
  sampling needs; the hf engine reports the same. At temperature 0 (greedy, e.g. for evaluation) it
  is log_softmax(logits).
- `truncated`: vLLM's finish_reason == "length" (max_new_tokens, or the engine's max_model_len).

Engine settings: fp32 on CPU and bfloat16 on CUDA for `model.dtype=auto`; on CPU the KV cache is
bounded by `rollout.cpu_kv_cache_mib` (unbounded, vLLM takes a large share of RAM and starts slowly);
on CUDA `rollout.gpu_memory_utilization` bounds weights + KV cache and `rollout.sleep_mode` lets
`sleep` free that memory while the learner trains. max_model_len is max_new_tokens plus
rollout.max_prompt_tokens, capped by the model's own context length.

Starting the engine also generates one token: a model vLLM loads but cannot run (on CPU, an
attention head size its kernels lack) is then a one-line error at start, not a traceback mid-run.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so weight pushes need no copies
between processes. Starting it seeds the global RNGs (random, numpy, torch) and, on CPU, disables
`torch.set_num_threads`; both are undone here, so the learner's random state and thread count are
the same before and after. Unseeded requests (`seed=None`) draw from the global torch RNG.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported anywhere
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would drown the progress display

import contextlib
import dataclasses
import gc
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpo_cli.errors import UserError, first_line
from grpo_cli.models import torch_dtype
from grpo_cli.rollout import (
    Sample,
    SamplingSettings,
    check_prompt_lengths,
    context_length,
    prompt_seed,
    special_stops,
)

if TYPE_CHECKING:
    from grpo_cli.schema import ModelConfig, RolloutConfig

_CPU_BATCHED_TOKENS = 4096  # vLLM's own default token budget per engine step on CPU (vllm.LLM)


def _model_max_len(model_path: str, model_cfg: ModelConfig) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError):
        return None  # vLLM reports the problem itself, with its own words
    return context_length(config)


def _check_parallel(size: int, cuda: bool) -> None:
    """rollout.tensor_parallel_size that this machine cannot give the engine: vLLM fails with a traceback
    once the model is loaded (on CPU, an assertion about NUMA nodes)."""
    if cuda:
        count = torch.cuda.device_count()
        if size > count:
            raise UserError(f"rollout.tensor_parallel_size={size}: {count} GPU(s) visible here; set it to at most "
                            f"{count}, or make more GPUs visible (CUDA_VISIBLE_DEVICES)")
    elif size > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
        if size > nodes:  # vLLM's CPU backend binds one worker to each NUMA node
            raise UserError(f"rollout.tensor_parallel_size={size}: vLLM on a CPU runs one worker per NUMA node and "
                            f"this machine has {nodes}; set rollout.tensor_parallel_size=1 (it counts GPUs on a "
                            "GPU machine)")


class _DropChunkedPrefillWarning(logging.Filter):
    """vLLM warns that disabling chunked prefill "may cause the engine to crash or produce incorrect
    outputs" for any model that supports it; on CPU grpo disables it on purpose (see VLLMEngine), and
    tests/test_rollout.py checks the engine's samples and log-probs without it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "disabling chunked prefill" not in record.getMessage()


@contextlib.contextmanager
def _kept_process_state() -> Iterator[None]:
    """Undo what starting vLLM in-process does to the rest of the process: it seeds random, numpy
    and torch (CPU and CUDA), and on CPU it replaces `torch.set_num_threads` with a no-op (and may
    lower the thread count), which would pin the learner to whatever count was left."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


class VLLMEngine:
    """`Engine` backed by an in-process `vllm.LLM`; `llm` is public for grpo_cli.sync only."""

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig, *,
                 seed: int = 0, max_model_len: int | None = None, llm_args: dict[str, Any] | None = None) -> None:
        """`llm_args`: further `vllm.LLM` arguments (the rollout server's: max_logprobs, weight transfer)."""
        self.cuda = torch.cuda.is_available()
        _check_parallel(rollout_cfg.tensor_parallel_size, self.cuda)
        self.dtype = torch_dtype(model_cfg.dtype, torch.device("cuda" if self.cuda else "cpu"))
        self.sleep_mode = bool(self.cuda and rollout_cfg.sleep_mode)
        self.sleeping = False  # KV cache released (GPU with sleep mode only)
        self.weights_awake = True  # weights resident on the GPU (a push while asleep wakes only them)
        self.output_layer: bool | None = None  # the model has an lm_head of its own (grpo_cli.sync asks once)
        self.limit_source = "the vLLM engine's max_model_len"  # what a too-long prompt's error names
        if max_model_len is None:
            self.limit_source = "rollout.max_new_tokens + rollout.max_prompt_tokens, at most the model's context"
            max_model_len = rollout_cfg.max_new_tokens + rollout_cfg.max_prompt_tokens
            model_max = _model_max_len(model_path, model_cfg)
            if model_max is not None:
                max_model_len = min(max_model_len, model_max)
        self.max_model_len = max_model_len

        kwargs: dict[str, Any] = dict(
            model=model_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
            dtype=self.dtype, seed=seed, enforce_eager=rollout_cfg.enforce_eager, max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",  # after temperature and top-k/top-p: what the token was drawn from
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        )
        if self.cuda:
            kwargs.update(gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                          enable_sleep_mode=self.sleep_mode)
        else:
            # No chunked prefill on CPU: when a step's prompts pass its token budget, vLLM prefills one
            # in part and rewinds that request's seeded generator by an offset, which CPU generators
            # lack ("CPU Generator does not use offset": every seeded batch of >4096 prompt tokens
            # failed). Whole prompts only, so the budget must hold the longest one.
            kwargs.update(kv_cache_memory_bytes=rollout_cfg.cpu_kv_cache_mib << 20, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, _CPU_BATCHED_TOKENS))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun (several learner processes, one engine each, grpo_cli.distributed): vLLM's
            # single-process executor would put every rank's engine on GPU 0; this one takes the
            # rank's LOCAL_RANK device and joins the process group the learner already started.
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_args or {})

        with _kept_process_state():
            from vllm import LLM

            vllm_args = logging.getLogger("vllm.engine.arg_utils")
            quiet = _DropChunkedPrefillWarning()
            vllm_args.addFilter(quiet)
            try:
                self.llm = LLM(**kwargs)
            except ValueError as e:
                if "KV cache" not in str(e):
                    raise
                memory = (f"rollout.gpu_memory_utilization={rollout_cfg.gpu_memory_utilization}" if self.cuda
                          else f"rollout.cpu_kv_cache_mib={rollout_cfg.cpu_kv_cache_mib}")
                raise UserError(f"{memory} leaves the vLLM engine too little KV cache for one sequence of "
                                f"{max_model_len} tokens (rollout.max_new_tokens + rollout.max_prompt_tokens): "
                                f"raise {memory.split('=')[0]}, or lower rollout.max_new_tokens or rollout.max_prompt_tokens") from None
            finally:
                vllm_args.removeFilter(quiet)
            _give_back_transformers_classes()
            self._first_forward(model_path)
        self.tokenizer = self.llm.get_tokenizer()

    # ------------------------------------------------------------------ Engine
    def generate(self, prompts: list[str], sampling: SamplingSettings, prompt_offset: int = 0) -> list[Sample]:
        """`prompt_offset`: the index of prompts[0] in a larger batch split across engines (rollout
        servers); seeds follow the index in the whole batch, so the split does not change the samples."""
        return self.generate_many([(prompts, sampling, prompt_offset)])[0]

    def generate_many(self, batches: Sequence[tuple[list[str], SamplingSettings, int]]) -> list[list[Sample]]:
        """Several `generate(prompts, sampling, prompt_offset)` calls as one engine call, so that vLLM
        batches all their sequences together (a rollout server answering several learner ranks at once).
        Seeded prompts get the samples each call would get alone, up to the rounding a different batch
        shape can change; the samples of each call come back in its own list."""
        from vllm.inputs import TokensPrompt

        if self.sleeping:
            raise RuntimeError("the vLLM engine is asleep: call wake() before generate()")
        requests: list[Any] = []
        params: list[Any] = []
        spans: list[tuple[int, list[list[int]], int]] = []  # per call: first request, prompt ids, copies
        for prompts, sampling, offset in batches:
            prompt_ids = [list(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
            check_prompt_lengths(prompts, prompt_ids, self.max_model_len, self.limit_source)
            # vLLM refuses n > 1 at temperature 0 (greedy): then each prompt goes in n times, n=1 each.
            copies = sampling.n if sampling.temperature == 0 else 1
            spans.append((len(requests), prompt_ids, copies))
            texts, stop_ids = special_stops(self.tokenizer, sampling.stop)
            params += [self._params(dataclasses.replace(sampling, stop=texts), offset + i, sampling.n // copies, stop_ids)
                       for i in range(len(prompts)) for _ in range(copies)]
            requests += [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(copies)]
        if not requests:
            return [[] for _ in batches]
        # Seeded requests sample with their own generators, yet a step still draws from the global
        # torch RNG: fork it, so that a seeded generate() leaves the learner's random state alone.
        seeded = any(sampling.seed is not None for _, sampling, _ in batches)
        rng = torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.cuda else []) if seeded \
            else contextlib.nullcontext()
        with rng:
            outputs = self.llm.generate(requests, params, use_tqdm=False)  # outputs come in request order
        results = []
        for (prompts, sampling, _), (first, prompt_ids, copies) in zip(batches, spans, strict=True):
            samples: list[Sample] = []
            for i in range(len(prompts)):
                group = outputs[first + i * copies:first + (i + 1) * copies]
                engine_prompt = list(group[0].prompt_token_ids or prompt_ids[i])
                completions = [c for out in group for c in sorted(out.outputs, key=lambda c: c.index)]
                if len(completions) != sampling.n:
                    raise RuntimeError(f"vLLM returned {len(completions)} completions for prompt {i}, "
                                       f"expected {sampling.n}")
                for c in completions:
                    ids = list(c.token_ids)
                    samples.append(Sample(
                        prompt_index=i, prompt_ids=list(engine_prompt), completion_ids=ids, text=c.text,
                        logprobs=_sampled_logprobs(c.logprobs, ids), truncated=c.finish_reason == "length",
                    ))
            results.append(samples)
        return results

    def prompt_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> list[float]:
        """log_softmax(logits / temperature) of each completion token after prompt + the tokens before
        it, under the engine's current weights: what `generate` reports for sampled tokens, for any tokens.

        vLLM's prompt log-probs are not temperature-scaled, so a temperature other than 0 or 1 needs the
        whole distribution at each position (the engine must allow it: llm_args max_logprobs=-1); slow.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = list(prompt_ids) + list(completion_ids)
        if not prompt_ids or not completion_ids:
            raise ValueError("prompt_ids and completion_ids must both hold at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{len(ids)} tokens; the vLLM engine holds at most {self.max_model_len} tokens per sequence")
        scaled = temperature not in (0.0, 1.0)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=-1 if scaled else 0, detokenize=False)
        output = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        result = []
        for position in range(len(prompt_ids), len(ids)):
            step = output.prompt_logprobs[position]  # {token id: Logprob}, the actual token always included
            value = step[ids[position]].logprob
            if scaled:
                everything = torch.tensor([lp.logprob for lp in step.values()], dtype=torch.float64) / temperature
                value = value / temperature - torch.logsumexp(everything, 0).item()
            result.append(float(value))
        return result

    def sleep(self) -> None:
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)  # level 1: weights offloaded to host memory, KV cache dropped
            self.sleeping, self.weights_awake = True, False

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"] if self.weights_awake else None)
            self.llm.reset_prefix_cache()
            self.sleeping, self.weights_awake = False, True

    def wake_weights(self) -> None:
        """Bring back only the weights (not the KV cache) of a sleeping engine, for a weight push."""
        if self.sleeping and not self.weights_awake:
            self.llm.wake_up(tags=["weights"])
            self.weights_awake = True

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ helpers
    def _first_forward(self, model_path: str) -> None:
        """Generate one token now: some models load but cannot run here (e.g. an attention head size
        vLLM's CPU kernels lack), which otherwise shows as a traceback at the first rollout."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=[0])], SamplingParams(max_tokens=1, seed=0, detokenize=False),
                              use_tqdm=False)
        except (RuntimeError, NotImplementedError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            self.close()
            raise UserError(f"the vLLM engine loaded {model_path} but cannot run it here ({type(e).__name__}: "
                            f"{first_line(e)}): set rollout.engine=hf to sample with transformers instead") from e

    def _params(self, sampling: SamplingSettings, prompt_index: int, n: int, stop_ids: list[int]) -> Any:
        from vllm import SamplingParams

        seed = None if sampling.seed is None else prompt_seed(sampling.seed, prompt_index, sampling.n)
        return SamplingParams(
            n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k > 0 else 0,  # vLLM: 0 = off
            stop=list(sampling.stop) or None, include_stop_str_in_output=True, seed=seed,
            stop_token_ids=stop_ids or None,  # special tokens named as stop strings (special_stops); kept as EOS is
            logprobs=0,  # the sampled token's log-prob only
            skip_special_tokens=True, detokenize=True,
        )


def _give_back_transformers_classes() -> None:
    """Models vLLM runs through its Transformers backend (OLMo, OLMo-2/3, SmolLM3, Starcoder2, Phi-2,
    GPT-NeoX, ...) have their transformers decoder class decorated in place for torch.compile: its
    __init__ then needs a current vLLM config and its __call__ an attribute only vLLM's own instances
    have, so the learner's models of that class failed (AttributeError: ... 'do_not_compile', or
    "Current vLLM config is not set" when one is loaded later). vLLM's instances keep the decorated
    methods; every other instance, and any built outside vLLM's model loading, gets the class's own."""
    from vllm.compilation.decorators import TorchCompileWithNoGuardsWrapper
    from vllm.config import get_current_vllm_config_or_none

    for cls in TorchCompileWithNoGuardsWrapper.__subclasses__():
        if not cls.__module__.startswith("transformers.") or "_grpo_vllm_call" in vars(cls):
            continue
        vllm_init, vllm_call = cls.__init__, cls.__call__
        cells = dict(zip(vllm_init.__code__.co_freevars, vllm_init.__closure__ or (), strict=True))
        own_init = cells["old_init"].cell_contents if "old_init" in cells else None

        def __init__(self: Any, *args: Any, _vllm: Any = vllm_init, _own: Any = own_init, **kwargs: Any) -> None:
            if _own is None or get_current_vllm_config_or_none() is not None:  # vLLM building its model
                _vllm(self, *args, **kwargs)
            else:
                _own(self, *args, **kwargs)

        def __call__(self: Any, *args: Any, _cls: type = cls, _vllm: Any = vllm_call, **kwargs: Any) -> Any:
            if "do_not_compile" in vars(self):  # set by the decorated __init__: one of vLLM's instances
                return _vllm(self, *args, **kwargs)
            return super(_cls, self).__call__(*args, **kwargs)

        cls.__init__, cls.__call__, cls._grpo_vllm_call = __init__, __call__, vllm_call


def _sampled_logprobs(position_logprobs: Any, token_ids: list[int]) -> list[float]:
    if position_logprobs is None or len(position_logprobs) != len(token_ids):
        raise RuntimeError("vLLM returned no log-probabilities for a completion (logprobs=0 was requested)")
    return [float(step[token].logprob) for step, token in zip(position_logprobs, token_ids, strict=True)]
