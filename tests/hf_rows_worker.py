"""One rank of the sharded hf-engine check in test_distributed.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/hf_rows_worker.py OUT_DIR MODEL_DIR

The tiny model sharded over both ranks, the hf engine at most 4 rows a `generate`; each rank samples
CALLS[rank] (prompts, n) in turn, rank 0 needing more `generate` calls in the first, rank 1 in the
second. Every rank writes OUT_DIR/rank<r>.json: its samples and the rows of each `generate` it made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

PROMPTS = ["What is 2 + 3? Answer:", "Name a colour.", "The quick brown fox", "One, two,", "Hello"]
# rank -> [(prompt indices, n), ...]: 5 prompts x 2 (rows 4, 4, 2) vs 1 x 2; then 1 x 2 vs 1 x 6 (3, 3)
CALLS = {0: [([0, 1, 2, 3, 4], 2), ([4], 2)], 1: [([3], 2), ([1], 6)]}
MAX_ROWS = 4
SEED = 11


def main(out: Path, model_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli import distributed
    from grpo_cli.rollout import SamplingSettings
    from grpo_cli.rollout.hf import HFEngine

    distributed.setup()
    rank = distributed.rank()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    distributed.shard(model, torch.float32)
    rows: list[int] = []
    original = model.generate

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rows.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counted
    engine = HFEngine(model, AutoTokenizer.from_pretrained(model_dir), max_rows=MAX_ROWS)
    samples = []
    for indices, n in CALLS[rank]:
        got = engine.generate([PROMPTS[i] for i in indices], SamplingSettings(n=n, max_new_tokens=5, temperature=1.0,
                                                                             seed=SEED))
        samples.append([(s.prompt_index, s.completion_ids, s.logprobs) for s in got])
    (out / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "samples": samples}))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
