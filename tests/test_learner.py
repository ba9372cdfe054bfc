"""The learner's log-probs and update on the tiny model, against plain full-logits computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grpo_cli import learner as learner_module
from grpo_cli import logprobs as logprobs_module
from grpo_cli.config import compose
from grpo_cli.learner import Learner
from grpo_cli.logprobs import pack, sequence_logprobs
from grpo_cli.loss import policy_loss

REPO = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
COMPLETIONS = [[11, 12], [13, 14, 15, 16], [17], [18, 19, 20]]


def _config(tiny_model_dir: Path, *overrides: str):
    return compose([f"model.name_or_path={tiny_model_dir}", "trainer.lr=1e-3", *overrides])


def _naive_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return torch.stack([logp[len(prompt) + j - 1, tok] for j, tok in enumerate(completion)])


@pytest.mark.parametrize("chunk", [2, 1024])
def test_chunked_logprobs_equal_full_logits(tiny_model_dir: Path, chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(logprobs_module, "logit_chunk", lambda vocab: chunk)
    learner = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    logp, entropy = sequence_logprobs(learner.policy, batch, temperature=0.7)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        torch.testing.assert_close(logp[i, : len(c)], _naive_logprobs(learner.policy, p, c, 0.7), rtol=0, atol=1e-5)
        assert torch.all(logp[i, len(c):] == 0) and torch.all(entropy[i, len(c):] == 0)
    assert torch.all(entropy[batch.mask] > 0)
    # The reference's pass skips the entropy (a softmax over the vocabulary per token): same log-probs.
    logp_only, no_entropy = sequence_logprobs(learner.policy, batch, temperature=0.7, entropy=False)
    torch.testing.assert_close(logp_only, logp, rtol=0, atol=0)
    assert torch.all(no_entropy == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logit_chunks_give_the_same_gradient(tiny_model_dir: Path, temperature: float,
                                                         monkeypatch) -> None:
    """Chunks of 2 tokens are recomputed in backward; one chunk of all of them is kept: same gradient."""
    grads = []
    for chunk in (2, 1024):
        monkeypatch.setattr(logprobs_module, "logit_chunk", lambda vocab, chunk=chunk: chunk)
        learner = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
        batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
        logp, _ = sequence_logprobs(learner.policy, batch, temperature=temperature)
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in learner.policy.parameters()]))
    scale = grads[1].abs().max().item()
    assert scale > 1e-2
    # fp32 logits summed in other orders: differences of ~1e-6 of the largest gradient entry.
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_sum_norm"])
def test_micro_batches_give_the_full_batch_gradient(tiny_model_dir: Path, agg: str) -> None:
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = []
    for micro in (4, 1):
        cfg = _config(tiny_model_dir, "loss.beta=0", f"loss.agg={agg}", f"trainer.micro_batch_size={micro}",
                      "rollout.max_new_tokens=4", "trainer.lr=0")  # lr 0: AdamW keeps the weights
        learner = Learner(cfg, CPU, pad_id=0)
        engine = [[0.0] * len(c) for c in COMPLETIONS]
        learner.update(PROMPTS, COMPLETIONS, engine, advantages)
        grads.append(torch.cat([p.grad.flatten() for p in learner.policy.parameters()]))
    # fp32 sums in a different order differ by ~1e-7; a wrong micro-batch weight would be off by
    # a share of the gradient itself (max |g| is ~1e-2 here).
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_gradients_are_clipped_to_max_grad_norm_and_the_norm_before_is_reported(tiny_model_dir: Path) -> None:
    """With trainer.max_grad_norm a quarter of the gradient's norm, the optimizer steps on exactly a quarter
    of the gradient (same direction), and `grad_norm` reports the norm before clipping."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]

    def run(max_norm: float) -> tuple[torch.Tensor, float]:
        cfg = _config(tiny_model_dir, "loss.beta=0.1", f"trainer.max_grad_norm={max_norm}",
                      "rollout.max_new_tokens=4", "trainer.lr=0")  # lr 0: the weights stay, the grads are kept
        learner = Learner(cfg, CPU, pad_id=0)
        stats = learner.update(PROMPTS, COMPLETIONS, engine, advantages)
        return torch.cat([p.grad.flatten() for p in learner.policy.parameters()]), stats["grad_norm"]

    full, norm = run(1e9)
    assert norm == pytest.approx(full.norm().item(), rel=1e-5) and norm > 1e-3
    clipped, reported = run(norm / 4)
    assert reported == pytest.approx(norm, rel=1e-5)  # the norm before clipping
    torch.testing.assert_close(clipped, full / 4, rtol=1e-4, atol=1e-8)
    assert clipped.norm().item() == pytest.approx(norm / 4, rel=1e-4)


def test_update_matches_policy_loss_on_the_whole_batch(tiny_model_dir: Path) -> None:
    # The full-sequence path, as the reference computes it (the shared-prompt path is checked against
    # this one in test_shared_prompts_give_the_same_gradient).
    cfg = _config(tiny_model_dir, "loss.beta=0.1", "trainer.micro_batch_size=2", "trainer.max_grad_norm=1e9",
                  "rollout.max_new_tokens=4", "trainer.lr=0", "model.share_prompts=false")
    learner = Learner(cfg, CPU, pad_id=0)
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    logp, entropy = sequence_logprobs(learner.policy, batch, cfg.rollout.temperature)
    with torch.no_grad():
        ref, _ = sequence_logprobs(learner.reference, batch, cfg.rollout.temperature)
    expected, _ = policy_loss(logp, logp.detach(), advantages, batch.mask, ref_logp=ref, beta=0.1,
                              agg=cfg.loss.agg, max_tokens=4)
    expected.backward()
    expected_grad = torch.cat([p.grad.flatten() for p in learner.policy.parameters()])
    learner.policy.zero_grad()
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    stats = learner.update(PROMPTS, COMPLETIONS, engine, advantages)
    got = torch.cat([p.grad.flatten() for p in learner.policy.parameters()])
    torch.testing.assert_close(got, expected_grad, rtol=1e-4, atol=1e-6)
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-6)
    # Fresh policy == reference, so the KL is exactly zero and the ratio exactly one.
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7) and stats["ratio_mean"] == pytest.approx(1.0)
    # The engine "saw" log-prob 0 for every token: the diff metric is the learner's |logp|.
    assert stats["rollout/logprob_diff_max"] == pytest.approx(-logp[batch.mask].min().item(), rel=1e-5)
    # The entropy is a mean over the 10 completion tokens (not over the 4 rows).
    assert stats["entropy"] == pytest.approx(entropy[batch.mask].mean().item(), rel=1e-5)


def _perturbed_reference(learner: Learner) -> None:
    """A reference model away from the policy, so that the KL is not zero."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in learner.reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def test_step_statistics_do_not_depend_on_the_micro_batch_cut(tiny_model_dir: Path) -> None:
    """The KL and clipping statistics are per-token means of the whole batch and the ratio's extremes
    are the batch's, however it is cut into micro-batches; over three iterations the ratio moves."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    runs = []
    for micro in (4, 1):
        cfg = _config(tiny_model_dir, "loss.beta=0.1", f"trainer.micro_batch_size={micro}", "rollout.max_new_tokens=4",
                      "trainer.num_iterations=3", "trainer.lr=0.05", "model.share_prompts=false")
        learner = Learner(cfg, CPU, pad_id=0)
        _perturbed_reference(learner)
        if micro == 4:  # the KL by hand: the mean over all 10 completion tokens of the k3 estimate
            batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
            with torch.no_grad():
                logp, _ = sequence_logprobs(learner.policy, batch, 1.0)
                ref, _ = sequence_logprobs(learner.reference, batch, 1.0)
            d = (ref - logp)[batch.mask]
            kl = (torch.exp(d) - d - 1).mean().item()
        runs.append(learner.update(PROMPTS, COMPLETIONS, engine, advantages))
    whole, single = runs
    assert whole["kl"] > 1e-3
    assert whole["kl"] == pytest.approx(kl, rel=1e-5) and single["kl"] == pytest.approx(kl, rel=1e-5)
    assert single["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    # Iterations 2 and 3 see the weights moved by lr 0.05: ratios away from 1, some clipped.
    assert whole["ratio_min"] < 0.8 and whole["ratio_max"] > 1.2 and whole["clip_frac"] > 0
    # The two runs' weights differ by their fp32 summation order, which AdamW's steps amplify a little
    # (ratio_min ~3e-3 differs by 0.15%); averaging the micro-batches' extremes would be off by 10x.
    for key in ("ratio_mean", "ratio_min", "ratio_max", "clip_frac", "clip_frac_low", "clip_frac_high"):
        assert single[key] == pytest.approx(whole[key], rel=1e-2, abs=1e-6), key


def test_one_iteration_reports_a_ratio_of_one(tiny_model_dir: Path) -> None:
    learner = Learner(_config(tiny_model_dir, "loss.beta=0", "trainer.micro_batch_size=2"), CPU, pad_id=0)
    stats = learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                           torch.tensor([1.0, -0.5, 0.25, -0.75]))
    assert stats["ratio_min"] == stats["ratio_max"] == stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0


def test_no_kl_is_reported_without_a_reference_model(tiny_model_dir: Path) -> None:
    """loss.beta=0 loads no reference model, so the KL to it is not measured: the step reports no `kl`
    (was: 0.0, a flat "KL to the reference model" of 0 in the console and report of every beta=0 run)."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    learner = Learner(_config(tiny_model_dir, "loss.beta=0", "trainer.micro_batch_size=2"), CPU, pad_id=0)
    assert learner.reference is None
    stats = learner.update(PROMPTS, COMPLETIONS, engine, advantages)
    assert "kl" not in stats and "loss" in stats
    with_reference = Learner(_config(tiny_model_dir, "loss.beta=0.1", "trainer.micro_batch_size=2"), CPU, pad_id=0)
    assert with_reference.update(PROMPTS, COMPLETIONS, engine, advantages)["kl"] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("share", ["false", "true"])
def test_a_micro_batch_of_empty_completions_trains(tiny_model_dir: Path, share: str) -> None:
    cfg = _config(tiny_model_dir, "loss.beta=0.1", "trainer.micro_batch_size=2", f"model.share_prompts={share}")
    learner = Learner(cfg, CPU, pad_id=0)
    prompts, completions = [[3, 4, 5]] * 2 + [[6, 7]] * 2, [[13, 14], [15], [], []]
    stats = learner.update(prompts, completions, [[0.0] * len(c) for c in completions],
                           torch.tensor([1.0, -1.0, 0.5, -0.5]))
    assert stats["tokens/trained"] == 3 and all(math.isfinite(v) for v in stats.values())


def test_non_finite_loss_stops_without_touching_weights(tiny_model_dir: Path) -> None:
    learner = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    with pytest.raises(learner_module.TrainingError, match="not finite"):
        learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                       torch.tensor([float("nan"), 0.0, 0.0, 0.0]))
    assert all(torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))


def test_schedule_warmup_then_cosine(tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir, "loss.beta=0", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=1",
                  "trainer.max_steps=3")
    learner = Learner(cfg, CPU, pad_id=0)
    lrs = []
    for _ in range(3):
        lrs.append(learner.scheduler.get_last_lr()[0])
        learner.optimizer.step()
        learner.scheduler.step()
    # warmup: (0 + 1) / (1 + 1) = 0.5; then cosine over 2 steps: 1.0 at progress 0, 0.5 at progress 1/2
    assert lrs == pytest.approx([0.5e-3, 1e-3, 0.5e-3], abs=1e-12)


def test_warmup_counts_training_steps_as_max_steps_does(tiny_model_dir: Path) -> None:
    """trainer.warmup_steps is in the unit of trainer.max_steps (a training step: num_iterations optimizer
    steps), as the schedule's length is. Was: optimizer steps, so with num_iterations=2 a warmup of 10
    steps ended after 5 training steps."""
    cfg = _config(tiny_model_dir, "loss.beta=0", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=1",
                  "trainer.max_steps=3", "trainer.num_iterations=2")
    learner = Learner(cfg, CPU, pad_id=0)
    lrs = []
    for _ in range(6):  # 3 training steps x 2 optimizer steps
        lrs.append(learner.scheduler.get_last_lr()[0])
        learner.optimizer.step()
        learner.scheduler.step()
    # warmup over 1 training step = 2 optimizer steps: (0 + 1) / 3, (1 + 1) / 3; then cosine over the
    # other 4: 0.5 * (1 + cos(pi * p)) at p = 0, 1/4, 1/2, 3/4 -> 1, 0.8535533905932737, 0.5, 0.14644660940672627
    expected = [1 / 3, 2 / 3, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]
    assert lrs == pytest.approx([1e-3 * f for f in expected], abs=1e-12)


def test_update_logs_the_lr_it_stepped_with(tiny_model_dir: Path) -> None:
    """The metric `lr` of a step is the one its update used (was: the next step's, so a warmup's first
    step showed its second step's lr and a cosine run's last step showed 0)."""
    cfg = _config(tiny_model_dir, "loss.beta=0", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=1",
                  "trainer.max_steps=3")
    learner = Learner(cfg, CPU, pad_id=0)
    logged = []
    for _ in range(3):
        used = learner.optimizer.param_groups[0]["lr"]
        logged.append(learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                                     torch.tensor([1.0, -1.0, 0.5, -0.5]))["lr"])
        assert logged[-1] == used
    assert logged == pytest.approx([0.5e-3, 1e-3, 0.5e-3], abs=1e-12)  # as test_schedule_warmup_then_cosine


# Two groups of three completions each, prompts of different lengths (the short one is padded).
GROUP_PROMPTS = [[1, 2, 3, 4, 5]] * 3 + [[6, 7]] * 3
GROUP_COMPLETIONS = [[11, 12, 13], [14], [15, 16], [17, 18, 19, 20], [21], [22, 23]]


def test_packed_segments_layout() -> None:
    """Worked by hand: each prompt once, then its completions minus their last token, back to back."""
    seg = logprobs_module.pack_segments(GROUP_PROMPTS, GROUP_COMPLETIONS, pad_id=0, device=CPU)
    assert seg.input_ids.tolist() == [[1, 2, 3, 4, 5, 11, 12, 15, 6, 7, 17, 18, 19, 22]]
    assert seg.positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 5, 0, 1, 2, 3, 4, 2]]
    # Completion token 0 is predicted at its prompt's last token (column 4 or 9), token t at token t - 1.
    assert seg.index.tolist() == [[4, 5, 6, 0], [4, 0, 0, 0], [4, 7, 0, 0], [9, 10, 11, 12], [9, 0, 0, 0],
                                  [9, 13, 0, 0]]
    allowed = seg.allowed[0]
    assert allowed[6].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]  # 12 sees prompt A, 11, itself
    assert allowed[7].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 7]     # 15 sees prompt A and itself only
    assert allowed[13].nonzero().flatten().tolist() == [8, 9, 13]            # 22 sees prompt B and itself
    assert allowed[9].nonzero().flatten().tolist() == [8, 9]                 # prompt B is causal on its own
    # A row budget of 8 tokens: prompt A's three completions fill row 0, prompt B starts row 1.
    split = logprobs_module.pack_segments(GROUP_PROMPTS, GROUP_COMPLETIONS, pad_id=0, device=CPU, row_tokens=8)
    assert split.input_ids.tolist() == [[1, 2, 3, 4, 5, 11, 12, 15], [6, 7, 17, 18, 19, 22, 0, 0]]
    assert split.index[3].tolist() == [8 + 1, 8 + 2, 8 + 3, 8 + 4]
    assert split.allowed[1, 6].nonzero().flatten().tolist() == [6]  # padding sees itself only


@pytest.mark.parametrize("row_tokens", [2048, 8])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_segment_logprobs_equal_the_full_sequence_ones(tiny_model_dir: Path, row_tokens: int,
                                                              attention: str) -> None:
    learner = Learner(_config(tiny_model_dir, "loss.beta=0", f"model.attn_implementation={attention}"), CPU,
                      pad_id=0)
    assert learner.policy.config._attn_implementation == attention
    seg = logprobs_module.pack_segments(GROUP_PROMPTS, GROUP_COMPLETIONS, pad_id=0, device=CPU, row_tokens=row_tokens)
    full = pack(GROUP_PROMPTS, GROUP_COMPLETIONS, pad_id=0, device=CPU)
    got, got_entropy = sequence_logprobs(learner.policy, seg, temperature=0.7)
    want, want_entropy = sequence_logprobs(learner.policy, full, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Entropies near log(49152) = 10.8, from hidden states that differ in the last bits: fp32 rounding.
    torch.testing.assert_close(got_entropy, want_entropy, rtol=2e-6, atol=0)
    assert torch.equal(seg.mask, full.mask)
    for i, (p, c) in enumerate(zip(GROUP_PROMPTS, GROUP_COMPLETIONS, strict=True)):
        torch.testing.assert_close(got[i, : len(c)], _naive_logprobs(learner.policy, p, c, 0.7), rtol=0, atol=1e-5)


def test_prompts_are_shared_by_default_on_a_cpu(tiny_model_dir: Path) -> None:
    # model.share_prompts=null: packed shared-prompt rows on a CPU, padded rows on a GPU (test_gpu.py).
    learner = Learner(_config(tiny_model_dir), CPU, pad_id=0)
    assert learner.cfg.model.share_prompts is None and learner.share_prompts


@pytest.mark.parametrize(("agg", "checkpointing"), [("seq_mean_token_mean", "false"), ("token_mean", "false"),
                                                    ("token_mean", "true")])
def test_shared_prompts_give_the_same_gradient(tiny_model_dir: Path, agg: str, checkpointing: str) -> None:
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.75, -1.0, 0.25])
    grads = []
    for share in ("true", "false"):
        cfg = _config(tiny_model_dir, "loss.beta=0.1", f"loss.agg={agg}", f"model.share_prompts={share}",
                      "trainer.micro_batch_size=4", "rollout.max_new_tokens=4", "trainer.lr=0",
                      f"model.gradient_checkpointing={checkpointing}")
        learner = Learner(cfg, CPU, pad_id=0)
        assert learner.share_prompts == (share == "true")
        engine = [[0.0] * len(c) for c in GROUP_COMPLETIONS]
        stats = learner.update(GROUP_PROMPTS, GROUP_COMPLETIONS, engine, advantages)
        grads.append((torch.cat([p.grad.flatten() for p in learner.policy.parameters()]), stats["loss"]))
    assert grads[0][0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-6)
    assert grads[0][1] == pytest.approx(grads[1][1], abs=1e-6)


def test_truncated_importance_weight_uses_the_engine_logprobs(tiny_model_dir: Path) -> None:
    """With loss.tis_cap the policy term of each token is weighted by min(exp(old - engine), cap)."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = {}
    for cap in ("null", "2.0"):
        cfg = _config(tiny_model_dir, "loss.beta=0", f"loss.tis_cap={cap}", "rollout.max_new_tokens=4",
                      "trainer.lr=0", "model.share_prompts=false", "trainer.max_grad_norm=1e9")
        learner = Learner(cfg, CPU, pad_id=0)
        batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
        with torch.no_grad():
            logp, _ = sequence_logprobs(learner.policy, batch, cfg.rollout.temperature)
        # The engine saw each token 1.5x as likely as the learner on row 0 (weight 1/1.5), 3x less on
        # row 1 (weight 3, capped at 2), the same on rows 2 and 3 (weight 1).
        shift = torch.tensor([math.log(1.5), -math.log(3.0), 0.0, 0.0])[:, None]
        engine = [(logp[i, : len(c)] + shift[i]).tolist() for i, c in enumerate(COMPLETIONS)]
        learner.update(PROMPTS, COMPLETIONS, engine, advantages)
        grads[cap] = torch.cat([p.grad.flatten() for p in learner.policy.parameters()])
    # Expected: the unweighted loss with advantages scaled per row by the weights (ratio is 1 on-policy,
    # so the policy term is linear in A and the weight acts as a per-row advantage scale).
    cfg = _config(tiny_model_dir, "loss.beta=0", "rollout.max_new_tokens=4", "trainer.lr=0",
                  "model.share_prompts=false", "trainer.max_grad_norm=1e9")
    learner = Learner(cfg, CPU, pad_id=0)
    learner.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS],
                   advantages * torch.tensor([1 / 1.5, 2.0, 1.0, 1.0]))
    expected = torch.cat([p.grad.flatten() for p in learner.policy.parameters()])
    assert not torch.allclose(grads["null"], expected, atol=1e-4)
    torch.testing.assert_close(grads["2.0"], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["softmax kept", "logits recomputed", "weight gradient in place", "layer with a bias",
                                  "layer with a bias, recomputed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprob_gradient_matches_autograd(temperature: float, path: str) -> None:
    """_chunk_logprobs' own backward (onehot - softmax) against autograd through log_softmax, in
    float64 (and gradcheck where the logits are recomputed): the output layer folded in with its
    softmax kept for backward, or its logits recomputed there, or its weight gradient added to an
    existing .grad; and after a layer it cannot fold in (one with a bias)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=path.startswith("layer with a bias")).double()
    hidden = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 49, 3, 7, 12])
    weights = torch.randn(6, dtype=torch.float64)  # any upstream gradient
    earlier = torch.randn(50, 8, dtype=torch.float64)  # what earlier micro-batches left in .grad
    in_place, keep = path == "weight gradient in place", not path.endswith("recomputed")
    if in_place:
        setattr(head.weight, logprobs_module._IN_PLACE, True)
        head.weight.grad = earlier.clone()

    def logprobs(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logprobs_module._chunk_logprobs(h, targets, head, temperature, keep=keep)

    logp, entropy = logprobs(hidden)
    (logp * weights).sum().backward()
    got_hidden, got_head = hidden.grad.clone(), head.weight.grad.clone() - (earlier if in_place else 0)
    hidden.grad, head.weight.grad = None, None
    setattr(head.weight, logprobs_module._IN_PLACE, False)
    logits = head(hidden) / temperature
    want = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (want * weights).sum().backward()
    torch.testing.assert_close(logp, want.detach(), rtol=0, atol=1e-12)
    probs = logits.detach().softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(got_hidden, hidden.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_head, head.weight.grad, rtol=0, atol=1e-12)
    if not keep:  # gradcheck runs backward many times through one graph; a kept softmax allows one
        assert torch.autograd.gradcheck(lambda h: logprobs(h)[0], (hidden.detach().clone().requires_grad_(True),))
    # Without a backward to come: the same log-probs and entropies.
    with torch.no_grad():
        logp_no_grad, entropy_no_grad = logprobs(hidden)
    torch.testing.assert_close(logp_no_grad, logp.detach(), rtol=0, atol=0)
    torch.testing.assert_close(entropy_no_grad, entropy, rtol=0, atol=0)


def test_a_second_backward_through_kept_softmax_is_refused() -> None:
    """Backward turns the saved softmax into the logits' gradient in place, so a second backward
    through the same graph (retain_graph) would use a gradient as a softmax: autograd refuses it."""
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(6, 8, requires_grad=True)
    logp, _ = logprobs_module._chunk_logprobs(hidden, torch.tensor([0, 3, 49, 3, 7, 12]), head, 1.0, keep=True)
    logp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def _learner_layout():
    """benchmarks/learner_layout.py, for its peak_above_start."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("learner_layout", REPO / "benchmarks" / "learner_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep", [True, False])
def test_a_chunk_holds_one_fp32_vocabulary_wide_tensor(keep: bool, dtype: torch.dtype, monkeypatch) -> None:
    """Forward and backward of one chunk (M tokens x V words) hold at most one M x V fp32 tensor,
    plus, in bf16, the bf16 logits while they are converted (half as much again), plus a block of
    rows' temporaries; the weight's gradient goes into its existing .grad."""
    monkeypatch.setattr(logprobs_module, "STATS_BLOCK_BYTES", 1 << 16)
    M, V, H = 64, 4096, 32
    head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    setattr(head.weight, logprobs_module._IN_PLACE, True)
    head.weight.grad = torch.zeros_like(head.weight)
    hidden = torch.randn(M, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (M,))

    def run() -> None:
        logp, entropy = logprobs_module._chunk_logprobs(hidden, targets, head, 0.7, keep=keep)
        logp.sum().backward()

    run()  # once first: lazily made buffers are not what is measured
    hidden.grad = None
    full = M * V * 4
    allowed = full * (1.5 if dtype == torch.bfloat16 else 1.0) + 4 * (1 << 16) + (64 << 10)
    peak = _learner_layout().peak_above_start(run, CPU)  # the CPU allocator's events, as the benchmark reads them
    assert full <= peak <= allowed, (peak / full, allowed / full)


@pytest.fixture(scope="module")
def untied_padded_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its own output layer (untied) and padding_idx 3 (a token the prompts use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tied = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = tied.config
    config.tie_word_embeddings, config.pad_token_id = False, 3
    torch.manual_seed(1)
    model = type(tied)(config)
    path = tmp_path_factory.mktemp("tiny-untied")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


@pytest.mark.parametrize("chunk", [2, 1024])
@pytest.mark.parametrize("model", ["tied", "untied, padding_idx"])
def test_in_place_weight_gradients_equal_autograd_ones(tiny_model_dir: Path, untied_padded_model_dir: Path,
                                                       model: str, chunk: int, monkeypatch) -> None:
    """On an unsharded model the output layer's and the embedding's weight gradients are added
    straight into .grad: every gradient equals plain autograd's, over several micro-batches (the
    first creates .grad), with the logits recomputed in backward (chunk 2) or not, tied or untied,
    and with no gradient for the padding_idx row."""
    path = tiny_model_dir if model == "tied" else untied_padded_model_dir
    monkeypatch.setattr(logprobs_module, "logit_chunk", lambda vocab: chunk)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.75, -1.0, 0.25])
    grads = []
    for in_place in (True, False):
        if not in_place:
            monkeypatch.setattr(learner_module, "accumulate_in_place", lambda model: None)
        cfg = compose([f"model.name_or_path={path}", "loss.beta=0.1", "trainer.micro_batch_size=2",
                       "rollout.max_new_tokens=4", "trainer.lr=0"])
        learner = Learner(cfg, CPU, pad_id=0)
        head, embedding = learner.policy.get_output_embeddings(), learner.policy.get_input_embeddings()
        assert getattr(head.weight, logprobs_module._IN_PLACE, False) == in_place
        assert getattr(embedding.weight, logprobs_module._IN_PLACE, False) == in_place
        assert (head.weight is embedding.weight) == (model == "tied")
        learner.update(GROUP_PROMPTS, GROUP_COMPLETIONS, [[0.0] * len(c) for c in GROUP_COMPLETIONS], advantages)
        grads.append({name: p.grad.clone() for name, p in learner.policy.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    embedding_grad = grads[0]["model.embed_tokens.weight"]
    assert embedding_grad.abs().max() > 1e-3
    if model != "tied":
        assert torch.all(embedding_grad[3] == 0) and embedding_grad[[1, 2, 4, 5]].abs().min() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_freed_host_memory_is_kept_for_the_next_allocation() -> None:
    """After keep_freed_host_memory() a 113 MB tensor allocated again and again soon reuses memory
    the process holds (no page faults; the second one may still take fresh memory: an aligned
    allocation asks for a little more than the first one left); by default glibc unmaps each one
    and the next faults in anew. In a subprocess: the setting is for the whole process."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the setting is glibc's")
    script = """
import resource, sys, torch
from grpo_cli.learner import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(49152, 576)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""
    pages = 49152 * 576 * 4 // 4096
    for mode, low, high in (("default", pages * 0.9, pages * 1.1), ("keep", 0, pages * 0.01)):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        assert low <= int(out.stdout) <= high, (mode, out.stdout)


def test_a_weight_push_gets_its_own_mappings_and_the_heap_gives_back_its_free_pages() -> None:
    """own_mappings, after keep_freed_host_memory: entering gives the heap's free pages back (a freed
    64 MiB tensor stays resident until then); inside, an allocation the heap's free blocks cannot
    hold is mapped on its own (glibc's mmapped bytes grow by it) instead of growing the heap; outside,
    one is not. In a subprocess: the settings are the whole process's. (An allocation that a free
    block can hold comes from it, inside or not: glibc maps only what the heap cannot serve.)"""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split(".")[:2])) < (2, 33):
        pytest.skip("glibc's settings (mallinfo2: glibc 2.33)")
    script = """
import ctypes, torch
from grpo_cli.learner import keep_freed_host_memory, own_mappings
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped():
    return libc.mallinfo2().hblkhd
def resident():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
assert keep_freed_host_memory()
base = mapped()
outside = torch.empty(1 << 25)  # 128 MiB, more than any free block: the heap grows
freed = torch.ones(1 << 24)  # 64 MiB, touched, then freed into the heap
del freed
before = resident()
with own_mappings():
    trimmed = before - resident()
    inside = torch.empty(1 << 25)  # 128 MiB: no free block holds it
    inside_mapped = mapped() - base
after = torch.empty(1 << 25)
print(inside_mapped, mapped() - base - inside_mapped, trimmed)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    inside, outside, trimmed = map(int, out.stdout.split())
    assert 128 << 20 <= inside <= 129 << 20 and outside == 0
    assert trimmed > 60 << 20


def test_a_cpu_learner_keeps_its_gradients_memory(tiny_model_dir: Path) -> None:
    """Zeroed in place between updates, not freed and made anew (keep_freed_host_memory's heap)."""
    learner = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
    args = ([[1, 2]] * 2, [[3, 4], [5]], [[-1.0, -1.0], [-1.0]], torch.tensor([1.0, -1.0]))
    learner.update(*args)
    pointers = [p.grad.data_ptr() for p in learner.trainable]
    learner.update(*args)
    assert [p.grad.data_ptr() for p in learner.trainable] == pointers


def _transformed_logits_model(kind: str) -> torch.nn.Module:
    """A one-layer float64 model whose forward scales or soft-caps its logits, with an output layer
    large enough (logits of ~10) that the transform matters."""
    import transformers as tf

    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = {
        "gemma2 softcap 2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**shape, final_logit_softcapping=2.0,
                                                                         attn_logit_softcapping=50.0)),
        "granite logits / 4": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**shape, logits_scaling=4.0)),
        "cohere logits * 0.25": lambda: tf.CohereForCausalLM(tf.CohereConfig(**shape, logit_scale=0.25)),
    }[kind]().double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    return model


@pytest.mark.parametrize("kind", ["gemma2 softcap 2", "granite logits / 4", "cohere logits * 0.25"])
def test_logprobs_follow_the_models_own_logit_transform(kind: str) -> None:
    """Log-probs and their gradient as log_softmax(model(...).logits / T) gives them, for models whose
    forward soft-caps (Gemma-2) or scales (Granite divides, Cohere multiplies) the output layer's product."""
    model = _transformed_logits_model(kind)
    expected_form = {"gemma2 softcap 2": logprobs_module.LogitForm(softcap=2.0),
                     "granite logits / 4": logprobs_module.LogitForm(scale=0.25),
                     "cohere logits * 0.25": logprobs_module.LogitForm(scale=0.25)}[kind]
    assert logprobs_module.detect_logit_form(model) == expected_form
    logprobs_module.accumulate_in_place(model)  # as the learner trains it
    prompts, completions, temperature = [[3, 4, 5], [6, 7]], [[8, 9, 10], [11, 12]], 0.7
    logp, _ = sequence_logprobs(model, pack(prompts, completions, 0, CPU), temperature)
    logp.sum().backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    naive = []
    for prompt, completion in zip(prompts, completions, strict=True):
        full = (model(input_ids=torch.tensor([prompt + completion])).logits[0] / temperature).log_softmax(-1)
        naive += [full[len(prompt) + j - 1, token] for j, token in enumerate(completion)]
    naive = torch.stack(naive)
    # Gemma-2's and Cohere's norms compute in fp32 even in a float64 model: agreement to ~1e-7, not 1e-15.
    torch.testing.assert_close(logp[logp != 0].detach(), naive.detach(), rtol=0, atol=1e-6)
    naive.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_a_model_with_unknown_logits_is_refused() -> None:
    from grpo_cli.errors import UserError

    model = _transformed_logits_model("granite logits / 4")
    forward = model.forward

    def shifted(*args, **kwargs):  # logits the config says nothing about
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.25 + torch.arange(out.logits.shape[-1], dtype=out.logits.dtype)
        return out

    model.forward = shifted
    with pytest.raises(UserError, match="model type granite: its logits are not its output layer's product"):
        logprobs_module.detect_logit_form(model)


def test_a_declared_scale_the_forward_does_not_apply_is_not_used(tiny_model_dir: Path) -> None:
    learner = Learner(_config(tiny_model_dir, "loss.beta=0.1"), CPU, pad_id=0)
    assert getattr(learner.reference, logprobs_module._FORM) == logprobs_module.LogitForm()
    learner.policy.config.logits_scaling = 4.0  # Llama's forward ignores it
    assert logprobs_module.detect_logit_form(learner.policy) == logprobs_module.LogitForm()


def test_bf16_weights_are_stepped_through_fp32_master_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """lr 1e-6 steps are below half a bf16 unit of most weights: stepped in bf16 they round away;
    the fp32 master copies keep them, the bf16 weights are the masters rounded, and a checkpoint
    keeps the masters themselves."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    moved = {}
    for masters in ("null", "false"):
        cfg = _config(tiny_model_dir, "model.dtype=bfloat16", "loss.beta=0", "trainer.lr=1e-6",
                      f"optimizer.master_weights={masters}")
        learner = Learner(cfg, CPU, pad_id=0)
        before = torch.cat([p.detach().float().flatten() for p in learner.policy.parameters()])
        for _ in range(3):
            learner.update(PROMPTS, COMPLETIONS, engine, advantages)
        stepped = learner.masters if masters == "null" else list(learner.policy.parameters())
        after = torch.cat([p.detach().float().flatten() for p in stepped])
        moved[masters] = (after != before).float().mean().item()
        if masters == "null":
            assert all(m.dtype == torch.float32 for m in learner.masters)
            for p, m in zip(learner.trainable, learner.masters, strict=True):
                assert torch.equal(p, m.to(torch.bfloat16))
            state = learner.state_dict()
            learner.save_weights(tmp_path)
            fresh = Learner(cfg, CPU, pad_id=0)
            fresh.load_state_dict(state, tmp_path)
            for m, saved in zip(fresh.masters, learner.masters, strict=True):
                assert torch.equal(m, saved)
    # Three AdamW steps move every fp32 master weight (measured: all but 1 in 3.4M), while in bf16 98%
    # of them round away (only weights within ~3e-4 of zero move).
    assert moved["null"] > 0.99 and moved["false"] < 0.05, moved


def test_float16_training_is_refused_before_the_model_loads(tiny_model_dir: Path, monkeypatch) -> None:
    """float16 gradients need loss scaling, which the learner does not do: on the tiny model with 64 x 128
    completion tokens, 92% of the embedding's non-zero fp32 gradient entries came out 0 and q_proj's
    gradient was 31% off (bfloat16: under 1%). Was: it trained on them, silently."""
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model loaded")

    monkeypatch.setattr(learner_module, "load_model", no_load)
    with pytest.raises(learner_module.UserError, match=r"^model.dtype=float16: .*use model.dtype=bfloat16 or float32$"):
        Learner(_config(tiny_model_dir, "model.dtype=float16"), CPU, pad_id=0)


def test_fp32_weights_have_no_master_copy(tiny_model_dir: Path) -> None:
    learner = Learner(_config(tiny_model_dir, "model.dtype=float32"), CPU, pad_id=0)
    assert learner.masters is None


@pytest.mark.parametrize("variant", ["defaults", "asymmetric clip, k1, token_mean, temperature 0.7",
                                     "sequence ratio, k2, seq_sum_norm", "truncated importance weight"])
def test_a_second_iteration_trains_on_the_clipped_ratio_to_the_old_policy(tiny_model_dir: Path, variant: str) -> None:
    """num_iterations=2: the second optimizer step's gradient is that of policy_loss with the policy
    after the first step and the old log-probs of the policy before it (clipping active), computed
    here on the whole batch, with the loss settings and sampling temperature of the config. On the
    first step (ratio 1, policy = reference) clip bounds, GSPO's ratio, the KL estimator (but k1) and
    a temperature of 1 look alike; the second tells each of them apart. The truncated importance weight
    is min(pi_old / pi_engine, cap) with the old policy's log-probs, not the current policy's."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]
    overrides, kw, temperature = {
        "defaults": ((), {}, 1.0),
        "asymmetric clip, k1, token_mean, temperature 0.7": (
            ("loss.clip_low=0.1", "loss.clip_high=0.3", "loss.kl=k1", "loss.agg=token_mean", "rollout.temperature=0.7"),
            {"clip_low": 0.1, "clip_high": 0.3, "kl": "k1", "agg": "token_mean"}, 0.7),
        "sequence ratio, k2, seq_sum_norm": (
            ("loss.ratio_level=sequence", "loss.kl=k2", "loss.agg=seq_sum_norm"),
            {"ratio_level": "sequence", "kl": "k2", "agg": "seq_sum_norm"}, 1.0),
        "truncated importance weight": (("loss.tis_cap=2.0",), {}, 1.0),
    }[variant]
    common = ("loss.beta=0.1", "trainer.micro_batch_size=2", "rollout.max_new_tokens=4", "trainer.lr=0.05",
              "model.share_prompts=false", "trainer.max_grad_norm=1e9", *overrides)
    twice = Learner(_config(tiny_model_dir, *common, "trainer.num_iterations=2"), CPU, pad_id=0)
    once = Learner(_config(tiny_model_dir, *common, "trainer.num_iterations=1", "trainer.max_steps=2"), CPU,
                   pad_id=0)  # max_steps=2: the same number of scheduler steps, so the same lr
    batch = pack(PROMPTS, COMPLETIONS, pad_id=0, device=CPU)
    with torch.no_grad():
        old, _ = sequence_logprobs(once.policy, batch, temperature)
        ref, _ = sequence_logprobs(once.reference, batch, temperature)
    if variant == "truncated importance weight":
        # The engine saw row 0's tokens 1.5x less likely than the old policy (weight 1.5), row 1's 3x more
        # (1/3), row 2's 4x less (4, capped at 2), row 3's the same (1).
        shift = torch.tensor([math.log(1.5), -math.log(3.0), math.log(4.0), 0.0])[:, None]
        engine = [(old[i, : len(c)] - shift[i]).tolist() for i, c in enumerate(COMPLETIONS)]
        kw = {"is_weight": torch.tensor([1.5, 1 / 3, 2.0, 1.0])[:, None].expand_as(old)}
    twice.update(PROMPTS, COMPLETIONS, engine, advantages)
    once.update(PROMPTS, COMPLETIONS, engine, advantages)  # `once` now holds the weights of iteration 2
    once.policy.zero_grad(set_to_none=True)
    logp, _ = sequence_logprobs(once.policy, batch, temperature)
    expected, stats = policy_loss(logp, old, advantages, batch.mask, ref_logp=ref, beta=0.1, max_tokens=4, **kw)
    assert stats["clip_frac"] > 0  # the clipped branch is exercised
    expected.backward()
    for (name, got), want in zip(twice.policy.named_parameters(), once.policy.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_resume_that_raises_max_steps_follows_the_new_schedule(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Cosine over 4 steps ends at lr 0; resumed with trainer.max_steps=6, the next update gets the lr
    of step 5 of a 6-step cosine, as a run that was set to 6 steps all along."""
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    engine = [[0.0] * len(c) for c in COMPLETIONS]

    def learner(steps: int) -> Learner:
        return Learner(_config(tiny_model_dir, "loss.beta=0", "trainer.lr_scheduler=cosine", "trainer.warmup_steps=0",
                               f"trainer.max_steps={steps}"), CPU, pad_id=0)

    short, long = learner(4), learner(6)
    for _ in range(4):
        short.update(PROMPTS, COMPLETIONS, engine, advantages)
        long.update(PROMPTS, COMPLETIONS, engine, advantages)
    assert short.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    state = short.state_dict()
    short.save_weights(tmp_path)
    resumed = learner(6)
    resumed.load_state_dict(state, tmp_path)
    # 1e-3 * (1 + cos(pi * 4 / 6)) / 2 = 2.5e-4
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4, rel=1e-9)
    assert resumed.optimizer.param_groups[0]["lr"] == long.optimizer.param_groups[0]["lr"]


def test_a_resume_steps_with_the_optimizer_settings_of_its_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    """torch's load_state_dict sets betas, eps and weight_decay back to the saved ones: a resume with
    optimizer.weight_decay=0.1 wrote it into config.yaml and stepped with the old 0.0."""
    saved = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
    saved.update(PROMPTS, COMPLETIONS, [[0.0] * len(c) for c in COMPLETIONS], torch.tensor([1.0, -0.5, 0.25, -0.75]))
    state = saved.state_dict()
    saved.save_weights(tmp_path)
    resumed = Learner(_config(tiny_model_dir, "loss.beta=0", "optimizer.weight_decay=0.1", "optimizer.betas=[0.5,0.9]",
                              "optimizer.eps=1e-6"), CPU, pad_id=0)
    resumed.load_state_dict(state, tmp_path)
    (group,) = resumed.optimizer.param_groups
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.1, (0.5, 0.9), 1e-6)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 1  # the saved moments and count are kept


@pytest.mark.parametrize("kind", ["gpt2 dropout modules", "llama attention_dropout", "mixtral router jitter",
                                  "phimoe sampled routing"])
def test_the_learner_trains_without_dropout(kind: str, tmp_path: Path) -> None:
    """The engine samples without dropout, so the learner's train-mode forward must be the same function:
    two forwards give the same logits, equal to eval mode's (with dropout 0.5 they would not)."""
    import transformers as tf

    from grpo_cli.config import compose

    torch.manual_seed(0)
    model = {
        "gpt2 dropout modules": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.5, embd_pdrop=0.5,
            attn_pdrop=0.5)),
        "llama attention_dropout": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, attention_dropout=0.5, attn_implementation="eager")),
        "mixtral router jitter": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5)),
        "phimoe sampled routing": lambda: tf.PhimoeForCausalLM(tf.PhimoeConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            original_max_position_embeddings=64, rope_scaling=None, router_jitter_noise=1.0)),
    }[kind]()
    model.save_pretrained(tmp_path)
    learner = Learner(compose([f"model.name_or_path={tmp_path}", "loss.beta=0"]), CPU, pad_id=0)
    assert learner.policy.training
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        first, second = (learner.policy(input_ids=ids).logits for _ in range(2))
        learner.policy.eval()
        evaluated = learner.policy(input_ids=ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, evaluated, rtol=0, atol=0)
    model.train()  # the same model as loaded: its dropout does change the output, so the test can fail
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_disable_dropout_turns_off_layerdrop() -> None:
    """OPT's LayerDrop skips whole decoder layers at random in train mode: a dropout by another name."""
    from transformers import OPTConfig, OPTForCausalLM

    from grpo_cli.models import disable_dropout

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                     layerdrop=0.5))
    disable_dropout(model)
    model.train()
    ids = torch.arange(8)[None]
    first = model(ids).logits
    assert all(torch.equal(first, model(ids).logits) for _ in range(8))
    assert model.config.layerdrop == 0.0


def test_a_checkpoint_keeps_the_models_use_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The learner turns the KV cache off for its own forwards; the saved config.json must not carry that
    into every checkpoint (a user's plain forward of the trained model would then return no cache)."""
    assert json.loads((tiny_model_dir / "config.json").read_text())["use_cache"] is True
    learner = Learner(_config(tiny_model_dir, "loss.beta=0"), CPU, pad_id=0)
    assert learner.policy.config.use_cache is False
    learner.save_weights(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
    assert learner.policy.config.use_cache is False
