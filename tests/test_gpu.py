"""The training code path on a CUDA GPU: bf16 learner, shared-prompt log-probs, both rollout engines.

Skipped without CUDA (see conftest.py). The vLLM cases also need the `vllm` package (`make install`
on a CUDA machine installs the `cuda` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_cli.config import compose
from grpo_cli.learner import Learner
from grpo_cli.logprobs import pack, pack_segments, sequence_logprobs

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PROMPTS = [[1, 2, 3, 4, 5]] * 3 + [[6, 7]] * 3
COMPLETIONS = [[11, 12, 13], [14], [15, 16], [17, 18, 19, 20], [21], [22, 23]]


def test_bf16_learner_shares_prompts_and_steps(tiny_model_dir: Path) -> None:
    cfg = compose([f"model.name_or_path={tiny_model_dir}", "trainer.lr=1e-3", "loss.beta=0.04",
                   "rollout.max_new_tokens=4"])
    learner = Learner(cfg, CUDA, pad_id=0)
    assert next(learner.policy.parameters()).dtype == torch.bfloat16  # model.dtype=auto on a GPU
    assert all(m.dtype == torch.float32 and m.is_cuda for m in learner.masters)  # optimizer.master_weights=null
    assert not learner.share_prompts  # model.share_prompts=null: padded rows on a GPU
    with torch.no_grad():
        shared, _ = sequence_logprobs(learner.policy, pack_segments(PROMPTS, COMPLETIONS, 0, CUDA), 1.0)
        full, _ = sequence_logprobs(learner.policy, pack(PROMPTS, COMPLETIONS, 0, CUDA), 1.0)
    torch.testing.assert_close(shared, full, rtol=0, atol=0.05)  # bf16: ~3 significant digits
    before = [p.detach().clone() for p in learner.policy.parameters()]
    stats = learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                           torch.tensor([1.0, -0.5, -0.5, 0.75, -1.0, 0.25]))
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(learner.trainable, learner.masters, strict=True))


def test_gradient_checkpointing_matches_plain_backward(tiny_model_dir: Path) -> None:
    grads = []
    for checkpointing in ("false", "true"):
        cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", "loss.beta=0",
                       f"model.gradient_checkpointing={checkpointing}", "trainer.lr=0", "rollout.max_new_tokens=4"])
        learner = Learner(cfg, CUDA, pad_id=0)
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                       torch.tensor([1.0, -0.5, -0.5, 0.75, -1.0, 0.25]))
        grads.append(torch.cat([p.grad.flatten() for p in learner.policy.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_two_training_steps_on_the_gpu(tiny_model_dir: Path, tmp_path: Path, engine: str) -> None:
    if engine == "vllm":
        pytest.importorskip("vllm")
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "grpo_cli", "train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}",
         f"output_dir={run}", f"rollout={engine}", "trainer.max_steps=2", "trainer.prompts_per_step=2",
         "rollout.group_size=4", "rollout.max_new_tokens=12", "rollout.gpu_memory_utilization=0.2",
         "loss.beta=0.04", "dataset.size=64", "+rewards.len.fn=cosine_length", "+rewards.len.args.max_len=100"],
        capture_output=True, text=True, timeout=900, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # bf16 on both sides: the engine and the learner agree to bf16 precision after each sync.
    assert all(m["rollout/logprob_diff_mean"] < 0.05 for m in metrics)
    assert all(0 < m["memory/gpu_peak_gib"] < 80 for m in metrics)  # the step's peak of allocated GPU memory
    assert (run / "checkpoints" / "step-000002" / "model.safetensors").is_file()


def test_in_place_weight_gradients_equal_autograd_ones_on_the_gpu(tiny_model_dir: Path, monkeypatch) -> None:
    """The output layer's and the embedding's weight gradients, added straight into .grad (on every
    unsharded model since 2026-11-29), against autograd's, in fp32 on CUDA, over three micro-batches
    with the logits recomputed in backward (chunks of 2 tokens)."""
    from grpo_cli import learner as learner_module
    from grpo_cli import logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "logit_chunk", lambda vocab: 2)
    grads = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(learner_module, "accumulate_in_place", lambda model: None)
        cfg = compose([f"model.name_or_path={tiny_model_dir}", "model.dtype=float32", "loss.beta=0.1",
                       "trainer.micro_batch_size=2", "rollout.max_new_tokens=4", "trainer.lr=0"])
        learner = Learner(cfg, CUDA, pad_id=0)
        head = learner.policy.get_output_embeddings()
        assert getattr(head.weight, logprobs_module._IN_PLACE, False) == in_place
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                       torch.tensor([1.0, -0.5, -0.5, 0.75, -1.0, 0.25]))
        grads.append({name: p.grad.clone() for name, p in learner.policy.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("keep", [True, False])
def test_a_bf16_chunk_holds_one_fp32_vocabulary_wide_tensor_on_the_gpu(keep: bool, monkeypatch) -> None:
    """Forward and backward of one chunk of log-probs in bf16 on CUDA: the peak of allocated memory
    above the start is at most the chunk's fp32 logits, half as much again for their bf16 copy, and
    a block of rows' temporaries (tests/test_learner.py has the same on the CPU's allocator)."""
    from grpo_cli import logprobs as logprobs_module

    monkeypatch.setattr(logprobs_module, "STATS_BLOCK_BYTES", 1 << 20)
    M, V, H = 512, 49152, 896
    head = torch.nn.Linear(H, V, bias=False, device=CUDA, dtype=torch.bfloat16)
    setattr(head.weight, logprobs_module._IN_PLACE, True)
    head.weight.grad = torch.zeros_like(head.weight)
    hidden = torch.randn(M, H, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (M,), device=CUDA)

    def run() -> None:
        logp, _ = logprobs_module._chunk_logprobs(hidden, targets, head, 0.7, keep=keep)
        logp.sum().backward()
        hidden.grad = None

    run()  # once first: cuBLAS workspaces and the like are not what is measured
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    full = M * V * 4
    peak = torch.cuda.max_memory_allocated() - start
    assert full <= peak <= 1.5 * full + 4 * (1 << 20) + (8 << 20), peak / full


def test_a_bf16_embedding_gradient_takes_one_rounding_per_row_on_the_gpu() -> None:
    """A token looked up 4096 times: its row of the bf16 .grad is the fp32 sum of the rows' gradients
    rounded once (index_add_ on CUDA adds atomically, so bf16 adds one by one would round 4096 times)."""
    from grpo_cli.logprobs import accumulate_in_place

    torch.manual_seed(0)
    model = torch.nn.Module()
    embedding = torch.nn.Embedding(100, 64, device=CUDA, dtype=torch.bfloat16)
    model.get_input_embeddings, model.get_output_embeddings = lambda: embedding, lambda: None
    accumulate_in_place(model)
    ids = torch.full((4096,), 5, device=CUDA)
    rows = torch.randn(4096, 64, device=CUDA).bfloat16()
    embedding(ids).backward(rows)
    want = rows.double().sum(0)
    assert embedding.weight.grad.abs()[torch.arange(100, device=CUDA) != 5].max() == 0
    torch.testing.assert_close(embedding.weight.grad[5].double(), want, rtol=2**-8, atol=1e-3)
