"""One rank of the sharded-learner check in test_distributed.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR MODEL_DIR [moe]

For each case of CASES: a sharded Learner.update on this rank's rows of the fixed batch, then rank 0
writes the updated full weights (OUT_DIR/<case>.safetensors) and every rank its stats
(OUT_DIR/<case>-rank<r>.json). The `resume` case also saves a checkpoint, loads it into a fresh
learner and takes one more step with both (OUT_DIR/resume-{straight,restored}.safetensors).

`moe` (MODEL_DIR a mixture of experts): the `resume` case's step, then rank 0 writes what a weight push
sends (checkpoint_format of the gathered weights: OUT_DIR/moe-pushed.safetensors) and the gathered
weights (moe.safetensors); a checkpoint is saved and loaded into a fresh learner (moe-restored.safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

# Two groups of four completions (prompts of different lengths, completions of 1-4 tokens). In the
# first case rank 1's first micro-batch holds only one-token completions, rank 0's does not.
PROMPTS = [[1, 2, 3, 4, 5]] * 4 + [[6, 7]] * 4
COMPLETIONS = [[11, 12, 13], [14], [15, 16], [17, 18, 19, 20], [21], [22], [24, 25, 26], [27, 28]]
ADVANTAGES = [1.0, -0.5, -0.5, 0.75, -1.0, 0.25, 0.5, 0.25]
ENGINE_LOGPROBS = [[-1.0 - 0.1 * j for j in range(len(c))] for c in COMPLETIONS]

# name -> (overrides, rows of each rank). Even split = one group per rank; the uneven one makes
# rank 1 run a filler micro-batch (3 + 2 rows of 5 vs 3 rows, micro-batches of 2). No clipping in
# the first case: clipping to a norm hides a wrong overall gradient scale (e.g. averaged, not summed).
# The first and last cases share prompt passes; the second runs whole sequences, checkpointed.
CASES = {
    "token_mean": (["loss.agg=token_mean", "trainer.micro_batch_size=2", "trainer.max_grad_norm=1e9"],
                   [range(0, 4), range(4, 8)]),
    "seq_mean_token_mean": (["loss.agg=seq_mean_token_mean", "trainer.micro_batch_size=2", "trainer.num_iterations=2",
                             "model.gradient_checkpointing=true", "trainer.max_grad_norm=0.05"],
                            [range(0, 5), range(5, 8)]),
    "resume": (["loss.agg=token_mean", "trainer.micro_batch_size=3"], [range(0, 4), range(4, 8)]),
}
# optimizer.eps=1: AdamW's first steps are then ~ lr * g, so the weights show the gradient itself. With
# the usual 1e-8, entries with |g| near 1e-8 turn fp32 rounding (~1e-10) into weight noise of lr * 1e-2.
COMMON = ["loss.beta=0.1", "trainer.lr=0.1", "optimizer.eps=1.0", "rollout.max_new_tokens=4",
          "rollout.temperature=0.7", "trainer.max_steps=4"]
STEPS = 2  # the second step's loss has a KL term and a ratio away from 1; its stats are compared


def config(model_dir: str, overrides: list[str]):  # noqa: ANN201
    from grpo_cli.config import compose

    return compose([f"model.name_or_path={model_dir}", *COMMON, *overrides])


def update(learner, rows) -> dict[str, float]:  # noqa: ANN001
    rows = list(rows)
    return learner.update([PROMPTS[i] for i in rows], [COMPLETIONS[i] for i in rows],
                          [ENGINE_LOGPROBS[i] for i in rows], torch.tensor([ADVANTAGES[i] for i in rows]))


def main(out: Path, model_dir: str, moe: bool = False) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from grpo_cli import checkpoint, distributed
    from grpo_cli.learner import Learner
    from grpo_cli.sync import checkpoint_format

    device = distributed.setup()
    rank = distributed.rank()
    assert distributed.world() == 2

    def weights(learner: Learner) -> dict[str, torch.Tensor]:
        # Every rank gathers (named_weights is collective); only rank 0 writes.
        return {name: t.clone().contiguous() for name, t in learner.named_weights() if name != "lm_head.weight"}

    if moe:
        overrides, split = CASES["resume"]
        torch.manual_seed(0)
        learner = Learner(config(model_dir, overrides), device, pad_id=0)
        update(learner, split[rank])
        full = weights(learner)
        pushed = {name: t.contiguous() for name, t in checkpoint_format(learner.policy, learner.named_weights())}
        saved = checkpoint.save(out / "run", 1, learner, AutoTokenizer.from_pretrained(model_dir), keep_last=1,
                                data_position=2)
        restored = Learner(config(model_dir, overrides), device, pad_id=0)
        checkpoint.load(saved, restored)
        back = weights(restored)
        if rank == 0:
            for name, tensors in (("moe", full), ("moe-pushed", pushed), ("moe-restored", back)):
                save_file(tensors, out / f"{name}.safetensors")
    for case, (overrides, split) in ({} if moe else CASES).items():
        torch.manual_seed(0)
        learner = Learner(config(model_dir, overrides), device, pad_id=0)
        for _ in range(STEPS):
            stats = update(learner, split[rank])
        (out / f"{case}-rank{rank}.json").write_text(json.dumps(stats))
        full = weights(learner)
        if rank == 0:
            save_file(full, out / f"{case}.safetensors")
        if case == "resume":
            run = out / "run"
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            saved = checkpoint.save(run, 1, learner, tokenizer, keep_last=1, data_position=2)
            restored = Learner(config(model_dir, overrides), device, pad_id=0)
            checkpoint.load(saved, restored)
            for one in (learner, restored):
                update(one, split[rank])
            a, b = weights(learner), weights(restored)
            if rank == 0:
                save_file(a, out / "resume-straight.safetensors")
                save_file(b, out / "resume-restored.safetensors")
    distributed.barrier()
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:] == ["moe"])
