"""The vLLM engine and weight sync on the model families people train, not only the tiny Llama:
each a 2-layer random model (head_dim 64, for vLLM's CPU attention) with SmolLM2's tokenizer.

Per family: the engine's sampled log-probs equal the learner's own (sequence_logprobs, with the
family's logit form), and after a push of weights with every tensor changed (biases, norms, fused
groups, the output layer) they equal the changed model's, so every tensor reached the engine. With LoRA on every linear layer
(and a mixture of experts' experts), after optimizer steps, the engine samples from the merged policy.

- qwen2: biases on q/k/v, tied embeddings (Qwen2.5 up to 3B).
- phi3: q/k/v and gate/up fused in the checkpoint itself, untied output layer.
- gemma2: soft-capped logits and attention, scaled embeddings, tied; vLLM's model has no lm_head.
- olmo2: run by vLLM's Transformers backend, which decorates the transformers class itself.
- qwen2_moe, qwen3_moe, mixtral: vLLM-CPU packs expert weights into its own layout after loading, and
  did not after a push (grpo_cli.sync repacks them); Qwen2-MoE has a gated shared expert; Qwen3-MoE's
  expert width (80) is one vLLM pads to a multiple of 32 (the push raised RuntimeError); Mixtral's
  weights have other names in transformers than in its checkpoint, which vLLM's model needs.

Pushes go through checkpoint_format, as the training loop's do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_rollout import perturbed  # tests/ is on sys.path (as dist_worker)

from grpo_cli.logprobs import detect_logit_form, pack, sequence_logprobs
from grpo_cli.rollout import SamplingSettings
from grpo_cli.schema import ModelConfig, RolloutConfig
from grpo_cli.sync import checkpoint_format, push_weights

PROMPTS = ["What is 2 + 3? Answer:", "Name a colour.", "The quick brown fox " * 20]
SAMPLING = SamplingSettings(n=3, max_new_tokens=12, temperature=1.0, seed=3)
ATOL = 1e-4  # vLLM vs the learner, fp32 (measured: ~2e-6)
DENSE = ["qwen2", "phi3", "gemma2", "olmo2"]
FAMILIES = [*DENSE, "qwen2_moe", "qwen3_moe", "mixtral"]


def _build(family: str, tokenizer):  # noqa: ANN001, ANN202
    import transformers as tf

    shape = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    experts = dict(num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    config = {
        "qwen2": lambda: tf.Qwen2Config(**shape, tie_word_embeddings=True),
        "phi3": lambda: tf.Phi3Config(**shape, tie_word_embeddings=False),
        "gemma2": lambda: tf.Gemma2Config(**shape, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                          query_pre_attn_scalar=64, sliding_window=64),
        "olmo2": lambda: tf.Olmo2Config(**shape, tie_word_embeddings=False),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**shape, **experts, moe_intermediate_size=128,
                                               shared_expert_intermediate_size=128),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**shape, **experts, moe_intermediate_size=80),
        "mixtral": lambda: tf.MixtralConfig(**shape, num_local_experts=4, num_experts_per_tok=2,
                                            tie_word_embeddings=False),
    }[family]()
    return tf.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, folder, the learner's fp32 model loaded before the engine starts, engine)."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.rollout.vllm import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    _build(request.param, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    detect_logit_form(model)
    engine = VLLMEngine(str(path), RolloutConfig(engine="vllm", cpu_kv_cache_mib=64),
                        ModelConfig(name_or_path=str(path), dtype="float32"))
    yield request.param, path, model, engine
    engine.close()


def logprob_error(samples, model) -> float:  # noqa: ANN001
    """max |engine log-prob - learner log-prob| over the samples' completion tokens."""
    batch = pack([s.prompt_ids for s in samples], [s.completion_ids for s in samples], 0, torch.device("cpu"))
    with torch.no_grad():
        ours = sequence_logprobs(model, batch, 1.0, entropy=False)[0]
    theirs = torch.zeros_like(ours)
    for i, s in enumerate(samples):
        theirs[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    return float((ours - theirs)[batch.mask].abs().max())


def test_engine_logprobs_equal_the_learners(family) -> None:
    """Also for models of the family loaded before and after the engine started (vLLM's Transformers
    backend changes the transformers class: the learner's OLMo-2 failed with AttributeError)."""
    name, path, model, engine = family
    from transformers import AutoModelForCausalLM

    samples = engine.generate(PROMPTS, SAMPLING)
    assert logprob_error(samples, model) < ATOL
    later = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    detect_logit_form(later)
    assert logprob_error(samples, later) < ATOL


@pytest.mark.parametrize("source", ["state_dict", "named_parameters"])
def test_push_reaches_every_tensor(family, source: str) -> None:
    """Gemma-2 (tied): vLLM's model has no lm_head and refused the pushed lm_head.weight (ValueError)."""
    name, path, model, engine = family
    noisy = perturbed(model)
    try:
        pairs = noisy.state_dict().items() if source == "state_dict" else noisy.named_parameters()
        push_weights(engine, checkpoint_format(noisy, pairs))
        samples = engine.generate(PROMPTS, SAMPLING)
        assert logprob_error(samples, noisy) < ATOL
        assert logprob_error(samples, model) > 0.1  # the change is visible at all
    finally:
        push_weights(engine, checkpoint_format(model, model.state_dict().items()))
    assert logprob_error(engine.generate(PROMPTS, SAMPLING), model) < ATOL


def test_a_mixture_of_experts_model_trains_with_the_vllm_engine_on_a_cpu(grpo, smollm2_dir: Path,
                                                                        tmp_path: Path) -> None:
    """`grpo train` on a Mixtral: after each step's push the engine scores a probe as the learner does
    (grpo used to refuse such runs; without the repack in grpo_cli.sync the probe was silently off,
    without checkpoint_format the first push raised ValueError). lr 1e-3: the weights really move
    (the tiny model's weights are ~0.02)."""
    pytest.importorskip("vllm")
    import json

    import transformers as tf

    from grpo_cli.sync import mixture_of_experts

    tokenizer = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    model = _build("mixtral", tokenizer)
    assert mixture_of_experts(model.config) and mixture_of_experts(tf.MixtralConfig(num_local_experts=8))
    assert not mixture_of_experts(tf.Qwen2Config()) and not mixture_of_experts(tf.MixtralConfig(num_local_experts=1))
    model_dir, run = tmp_path / "mixtral", tmp_path / "run"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = grpo("train", "recipe=quickstart", f"model.name_or_path={model_dir}", f"output_dir={run}",
                  "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
                  "trainer.lr=1e-3", "rollout.group_size=4", "rollout.max_new_tokens=12",
                  "rollout.cpu_kv_cache_mib=64", "rollout.check_sync=true", "dataset.size=64",
                  "+rewards.len.fn=cosine_length", "+rewards.len.args.max_len=100")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["reward/std"] > 0 and m["grad_norm"] > 0  # a real update reached the push
        assert m["rollout/logprob_diff_max"] < 1e-3
        assert m["sync/logprob_diff_max"] < ATOL


def test_a_lora_step_reaches_the_engine(family) -> None:
    """LoRA on every linear layer (Phi-3's fused qkv_proj and gate_up_proj among them; on a mixture of experts
    the experts' fused 3-D weights too, which tests/test_lora.py checks in detail), after real optimizer
    steps with lora_dropout on (off on the experts' models: peft has none for their adapters): both engines
    sample from the policy as the learner scores it in eval mode, the hf engine from the live adapted model,
    vLLM from the merged weights pushed into it as the training loop pushes them (checkpoint_format). Mixtral's
    and Qwen3-MoE's experts' adapters used to reach no push (wrapped names, unmerged)."""
    name, path, model, engine = family
    from transformers import AutoTokenizer

    from grpo_cli.config import compose
    from grpo_cli.learner import Learner
    from grpo_cli.rollout.hf import HFEngine

    dropout = 0.1 if name in DENSE else 0.0
    cfg = compose([f"model.name_or_path={path}", "model.lora_rank=4", f"model.lora_dropout={dropout}", "loss.beta=0.1",
                   "trainer.lr=1e-2", "model.gradient_checkpointing=true"])
    learner = Learner(cfg, torch.device("cpu"), pad_id=0)
    trained = [n for n, p in learner.policy.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trained)
    layers = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained}  # every linear layer but the output layer
    fused = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    if name in DENSE:
        assert layers == (fused if name == "phi3" else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"})
    else:  # the experts' adapters sit on (nested) ParamWrappers of mlp.experts
        assert {"experts", "base_layer"} <= layers
    prompts, completions = [[1, 2, 3]] * 2 + [[6, 7, 8, 9]] * 2, [[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]]
    for _ in range(2):
        learner.update(prompts, completions, [[0.0] * len(c) for c in completions], torch.tensor([1.0, -1, 0.5, -0.5]))
    samples = HFEngine(learner.policy, AutoTokenizer.from_pretrained(path)).generate(PROMPTS, SAMPLING)
    learner.policy.eval()
    assert logprob_error(samples, learner.policy) < ATOL
    try:
        push_weights(engine, checkpoint_format(learner.policy, learner.named_weights()))
        samples = engine.generate(PROMPTS, SAMPLING)
        assert logprob_error(samples, learner.policy) < ATOL
        assert logprob_error(samples, model) > 0.1  # the steps changed the policy
    finally:
        push_weights(engine, checkpoint_format(model, model.state_dict().items()))
