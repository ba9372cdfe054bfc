"""benchmarks/bench.py's workload: the prompts it gives TRL are the ones `grpo train` takes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

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


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize(("override", "gpu", "named"), [
    ("rollout.sync_every=2", False, "rollout.sync_every=2"),  # grpo would skip half its weight pushes
    ("rollout.check_sync=true", False, "rollout.check_sync=True"),  # an extra forward per step, inside time/step
    ("model.attn_implementation=eager", False, "model.attn_implementation='eager'"),  # TRL loads the default
    ("model.dtype=bfloat16", False, "optimizer.master_weights=None"),  # an fp32 copy TRL does not keep
    ("model.dtype=auto", True, "optimizer.master_weights=None"),  # auto is bf16 on a GPU
])
def test_settings_trl_does_not_mirror_are_refused(tmp_path: Path, override: str, gpu: bool, named: str) -> None:
    from grpo_cli.config import compose

    bench = _bench()
    args = bench.parse_args([])
    bench.check_comparable(compose(bench.overrides(args, tmp_path), bench.HERE), gpu)  # the recipe itself passes
    cfg = compose([*bench.overrides(args, tmp_path), override], bench.HERE)
    with pytest.raises(SystemExit, match=f"^bench: {re.escape(named)} has no TRL counterpart"):
        bench.check_comparable(cfg, gpu)


def test_fp32_and_the_gpu_recipe_keep_their_master_weights_setting(tmp_path: Path) -> None:
    from grpo_cli.config import compose

    bench = _bench()
    bench.check_comparable(compose(bench.overrides(bench.parse_args(["--gpu"]), tmp_path), bench.HERE), True)
    cpu = compose([*bench.overrides(bench.parse_args([]), tmp_path), "optimizer.master_weights=true"], bench.HERE)
    bench.check_comparable(cpu, False)  # fp32 weights: no master copy either way


def test_the_vllm_ceiling_makes_the_engine_grpo_train_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw generation is measured on an `LLM` made with grpo's own engine arguments (on CPU they include
    no chunked prefill and its token budget, which a hand-made copy of them lacked)."""
    import vllm

    from grpo_cli.config import compose
    from grpo_cli.models import resolve
    from grpo_cli.rollout.vllm import VLLMEngine

    made: list[dict] = []

    class Made(Exception):
        pass

    def fake_llm(**kwargs: object) -> None:
        made.append(kwargs)
        raise Made

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    bench = _bench()
    spec = importlib.util.spec_from_file_location("ceilings", REPO / "benchmarks" / "ceilings.py")
    ceilings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceilings)
    args = bench.parse_args(["--steps", "1", "--max-new-tokens", "32"])
    cfg = compose([*bench.overrides(args, tmp_path / "grpo"), "rollout.max_prompt_tokens=1000"], bench.HERE)
    workload = json.loads(json.dumps(bench.build_spec(cfg, args, tmp_path)))  # as ceilings.py reads it
    workload["overrides"].append("rollout.max_prompt_tokens=1000")
    with pytest.raises(Made):
        ceilings.vllm_ceiling(workload)
    with pytest.raises(Made):
        VLLMEngine(resolve(cfg.model.name_or_path), cfg.rollout, cfg.model)
    ceiling, grpo = made
    assert ceiling == grpo
    assert grpo["max_model_len"] == 1032 and grpo["enable_chunked_prefill"] is False
