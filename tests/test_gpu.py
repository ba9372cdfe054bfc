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
