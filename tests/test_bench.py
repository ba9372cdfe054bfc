"""benchmarks/bench.py's workload: the prompts it gives TRL are the ones `grpo train` takes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_trl_side_gets_grpo_trains_prompts_in_its_order(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from grpo_cli.config import compose
    from grpo_cli.data import load_prompts
    from grpo_cli.loop import prompt_indices
    from grpo_cli.models import load_tokenizer

    args = bench.parse_args(["--steps", "2"])
    cfg = compose(bench.overrides(args, tmp_path / "grpo"), bench.HERE)
    workload = bench.build_spec(cfg, args, tmp_path)
    rows = load_prompts(cfg.dataset, load_tokenizer(cfg.model))
    P, stream, position = cfg.trainer.prompts_per_step, [], 0
    for _ in range(3):  # the warm-up step and the 2 measured ones, as grpo_cli.loop.train takes them
        indices, position = prompt_indices(position, P, [True] * len(rows), cfg.seed)
        stream += [rows[i]["prompt"] for i in indices]
    assert [r["prompt"] for r in workload["rows"]] == stream
    assert len(stream) == 3 * P and (workload["steps"], workload["prompts_per_step"]) == (3, P)
