"""Several learner processes on a CPU: torchrun, gloo, FSDP2 over two ranks.

The sharded update is checked against one process training on the same batch (tests/dist_worker.py
runs the ranks, this file the single process), and `grpo train` runs end to end under torchrun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dist_worker as worker  # pytest puts tests/ on sys.path (no __init__.py there)
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _torchrun(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def sharded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The worker's results for every case of dist_worker.CASES (one torchrun for all of them)."""
    out = tmp_path_factory.mktemp("sharded")
    result = _torchrun(str(REPO / "tests" / "dist_worker.py"), str(out), str(tiny_model_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _one_process(tiny_model_dir: Path, case: str):  # noqa: ANN202
    from grpo_cli.learner import Learner

    overrides, _ = worker.CASES[case]
    torch.manual_seed(0)
    learner = Learner(worker.config(str(tiny_model_dir), overrides), torch.device("cpu"), pad_id=0)
    for _ in range(worker.STEPS):
        stats = worker.update(learner, range(len(worker.COMPLETIONS)))
    weights = {name: t for name, t in learner.named_weights() if name != "lm_head.weight"}
    return stats, weights


@pytest.mark.parametrize("case", ["token_mean", "seq_mean_token_mean"])
def test_sharded_update_equals_one_process_on_the_whole_batch(sharded: Path, tiny_model_dir: Path, case: str) -> None:
    want_stats, want = _one_process(tiny_model_dir, case)
    got = load_file(sharded / f"{case}.safetensors")
    ranks = [json.loads((sharded / f"{case}-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # global statistics, the same on every rank
    stats = ranks[0]

    assert got.keys() == want.keys()
    initial = load_file(tiny_model_dir / "model.safetensors")
    moved = max((want[n] - initial[n]).abs().max().item() for n in want)
    assert moved > 1e-3  # lr 0.1, optimizer eps 1: the weights move by ~0.1 x the gradient
    for name in want:
        # Seen: <= 2e-7 (sums over ranks in another order). A gradient averaged over the two ranks
        # instead of summed, or a micro-batch weight from local counts, is off by ~1e-3 here.
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)

    # The second step: policy != reference, so the loss carries a KL term.
    assert stats["loss"] != stats["pg_loss"]
    for key in ("loss", "pg_loss", "entropy", "rollout/logprob_diff_mean", "rollout/logprob_diff_max"):
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-5, abs=1e-7), key
    assert stats["tokens/trained"] == want_stats["tokens/trained"] == 17.0
    # One process sums 3.2M squared fp32 gradient entries in one go and lands ~5e-6 (relative) below
    # the float64 norm; the two ranks' partial sums land closer. A wrong scale would be off by 2x.
    assert stats["grad_norm"] == pytest.approx(want_stats["grad_norm"], rel=2e-5)
    assert stats["kl"] == pytest.approx(want_stats["kl"], rel=1e-5)  # a per-token mean, whatever the aggregation


def test_sharded_checkpoint_is_a_plain_model_and_resumes_exactly(sharded: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = sharded / "run" / "checkpoints" / "step-000001"
    # The tensors one process saves: the tied output layer is not written a second time.
    assert sorted(load_file(folder / "model.safetensors")) == sorted(load_file(tiny_model_dir / "model.safetensors"))
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    gathered = load_file(sharded / "resume.safetensors")
    for name, tensor in gathered.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
    # The optimizer state has one process's layout (whole tensors by parameter index): any world size resumes it.
    state = torch.load(folder / "trainer_state.pt", weights_only=False)["learner"]["optimizer"]["state"]
    embed = load_file(tiny_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert state[0]["exp_avg"].shape == embed.shape and state[0]["exp_avg"].abs().max() > 0
    # One more step from the restored learner lands exactly where the uninterrupted one does.
    straight, restored = load_file(sharded / "resume-straight.safetensors"), load_file(sharded / "resume-restored.safetensors")
    for name in straight:
        torch.testing.assert_close(restored[name], straight[name], rtol=0, atol=1e-7, msg=name)


def test_a_sharded_mixture_of_experts_pushes_saves_and_resumes(smollm2_dir: Path, tmp_path: Path) -> None:
    """Qwen3-MoE (test_families' tiny one): its experts are 3-D parameters (experts, out, in), sharded
    along the experts. Gathered whole they step as one process does; a push and a checkpoint hold them
    under the checkpoint's per-expert names; a resume stacked them back (it stopped on those names)."""
    from test_families import _build
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.learner import Learner

    model_dir = tmp_path / "qwen3_moe"
    torch.manual_seed(0)
    _build("qwen3_moe", AutoTokenizer.from_pretrained(smollm2_dir)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(model_dir)
    result = _torchrun(str(REPO / "tests" / "dist_worker.py"), str(tmp_path), str(model_dir), "moe")
    assert result.returncode == 0, result.stderr[-4000:]

    overrides, _ = worker.CASES["resume"]
    torch.manual_seed(0)
    one = Learner(worker.config(str(model_dir), overrides), torch.device("cpu"), pad_id=0)
    worker.update(one, range(len(worker.COMPLETIONS)))
    want = {name: t for name, t in one.named_weights() if name != "lm_head.weight"}
    got = load_file(tmp_path / "moe.safetensors")
    assert got.keys() == want.keys()
    assert want["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 160, 128)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert (want["model.layers.0.mlp.experts.gate_up_proj"] - initial["model.layers.0.mlp.experts.gate_up_proj"]
            ).abs().max() > 5e-5  # seen: 1.3e-4 (lr 0.1 x the gradient); a gradient off by 2x would be off by as much
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)

    stored = sorted(load_file(model_dir / "model.safetensors"))  # model.layers.0.mlp.experts.0.gate_proj.weight, ...
    assert sorted(load_file(tmp_path / "moe-pushed.safetensors")) == stored
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    assert sorted(load_file(folder / "model.safetensors")) == stored
    saved = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    restored = load_file(tmp_path / "moe-restored.safetensors")
    for name, tensor in got.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=0, msg=name)


def test_merged_rounds_hold_every_ranks_completions_in_rank_order() -> None:
    from grpo_cli.loop import Round, merge_rounds
    from grpo_cli.rewards import RewardScores
    from grpo_cli.rollout import Sample

    def part(prompt: str, totals: list[float], errors: int, message: str) -> Round:
        samples = [Sample(prompt_index=0, prompt_ids=[1], completion_ids=[2] * (k + 1), text=f"{prompt}{k}",
                          logprobs=[0.0] * (k + 1), truncated=False) for k in range(len(totals))]
        scores = RewardScores(total=totals, per_reward={"acc": totals}, errors={"acc": errors},
                              first_error={"acc": message}, invalid=[False] * len(totals), invalid_counts={"acc": 0})
        return Round([{"prompt": prompt, "answer": "1"}], samples, [s.text for s in samples], scores,
                     torch.tensor(totals) - 0.5, torch.tensor([True]))

    merged = merge_rounds([part("a", [1.0, 0.0], 1, "first"), part("b", [0.5, 0.5], 2, "second")])
    assert [r["prompt"] for r in merged.rows] == ["a", "b"]
    assert [s.prompt_index for s in merged.samples] == [0, 0, 1, 1]  # rank 1's prompt is row 1 now
    assert merged.completions == ["a0", "a1", "b0", "b1"]
    assert merged.advantages.tolist() == [0.5, -0.5, 0.0, 0.0] and merged.informative.tolist() == [True, True]
    metrics = merged.scores.metrics()
    # Over all four completions: mean 0.5; population std sqrt((0.25 + 0.25 + 0 + 0) / 4).
    assert metrics["reward/mean"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["reward/std"] == pytest.approx(0.125 ** 0.5, abs=1e-12)
    assert merged.scores.errors == {"acc": 3} and merged.scores.first_error == {"acc": "first"}


def _train_args(tiny: Path, run: Path, engine: str) -> list[str]:
    # As tests/test_train.py: random text never earns accuracy, the cosine length term varies.
    return ["-m", "grpo_cli", "train", "recipe=quickstart", f"model.name_or_path={tiny}", f"output_dir={run}",
            "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "trainer.save_every=2",
            "trainer.lr=1e-3", "rollout.group_size=4", "rollout.max_new_tokens=12", "rollout.cpu_kv_cache_mib=64",
            f"rollout.engine={engine}", "loss.beta=0.04", "dataset.size=64", "+rewards.len.fn=cosine_length",
            "+rewards.len.args.max_len=100", "trainer.eval_every=2", "eval.datasets=[chain_sum]", "eval.limit=3",
            "eval.n=2", "eval.k=[1,2]", "eval.temperature=1.0"]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_train_on_two_ranks_end_to_end(tiny_model_dir: Path, tmp_path: Path, engine: str) -> None:
    """Colocated: each rank samples its prompt with its own engine (hf: generating with the sharded
    policy in step with the other rank; vllm: its own engine, refilled after each update)."""
    run = tmp_path / "run"
    result = _torchrun(*_train_args(tiny_model_dir, run, engine))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("done: ") == 1  # rank 0 alone reports
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 alone writes
    for m in metrics:
        # Both ranks' completions: 2 prompts x 4 completions x 12 tokens (a random model never stops early).
        assert m["tokens/generated"] == 96.0 and m["tokens/trained"] == 96.0 and m["groups/trained"] == 2.0
        assert m["reward/std"] > 0
        # Each engine sampled with the weights the learner holds (step 2: after the push).
        assert m["rollout/logprob_diff_max"] < 1e-3
    assert len((run / "samples" / "step-000002.jsonl").read_text().splitlines()) > 0
    # The eval at step 2: its one engine call on rank 0, rank 1 repeating it to stay in step (the hf
    # engine's sharded generate is collective); every problem's 2 samples once, scored by rank 0.
    assert {"eval/chain_sum/pass@2", "eval/chain_sum/maj@2", "time/eval"} <= set(metrics[1])
    evals = [json.loads(line) for line in (run / "samples" / "eval-step-000002.jsonl").read_text().splitlines()]
    assert sorted((e["problem"], e["sample"]) for e in evals) == [(p, j) for p in range(3) for j in range(2)]

    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-5


@pytest.mark.parametrize(("overrides", "said"), [
    (["trainer.prompts_per_step=3"],
     "error: trainer.prompts_per_step=3 does not split over 2 learner processes: set it to a multiple of 2"),
    (["model.lora_rank=4"], "error: model.lora_rank > 0 is not supported with several learner processes (torchrun)"),
])
def test_a_mistake_under_torchrun_is_said_once_per_node(tiny_model_dir: Path, tmp_path: Path, overrides: list[str],
                                                        said: str) -> None:
    """Every rank finds it; the first process of the node alone says it (it was said once per rank)."""
    result = _torchrun("-m", "grpo_cli", "train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}",
                       f"output_dir={tmp_path / 'run'}", *overrides)
    assert result.returncode != 0
    assert result.stderr.count(said) == 1, result.stderr[-4000:]
    assert result.stderr.count("error: ") == 1


def test_rank_0s_verdict_on_the_run_directory_is_said_once(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 alone locks the run directory and hands its verdict to the others, who stop with it quietly."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    config = subprocess.run([sys.executable, "-m", "grpo_cli", "config", "recipe=quickstart",
                             f"model.name_or_path={tiny_model_dir}", "trainer.prompts_per_step=2"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    (run / "config.yaml").write_text(config.stdout)
    with (run / ".lock").open("a+") as held:  # another `grpo train` writing this run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _torchrun("-m", "grpo_cli", "train", f"resume={run}")
    assert result.returncode != 0
    assert result.stderr.count("error: resume=") == 1, result.stderr[-4000:]
    assert "another `grpo train`" in result.stderr and result.stderr.count("error: ") == 1


def test_ctrl_c_to_torchrun_saves_the_step_under_way_and_the_run_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches torchrun, which hands SIGINT to every rank. A KeyboardInterrupt in each, wherever it
    was, left no rank able to save: every step since the last checkpoint (here, all) was lost."""
    import signal
    import time

    run = tmp_path / "run"
    args = [*_train_args(tiny_model_dir, run, "hf"), "trainer.max_steps=200", "trainer.save_every=1000",
            "trainer.eval_every=0"]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                *args], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C, after step 1 logged its metrics
    _, stderr = process.communicate(timeout=300)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = steps[-1]
    assert process.returncode != 0 and 1 <= last < 200 and steps == list(range(1, last + 1))
    assert stderr.count(f"interrupted after step {last}; continue with: grpo train resume={run} (it continues after "
                        f"step-{last:06d})") == 1, stderr[-4000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{last:06d}"]
    resumed = _torchrun("-m", "grpo_cli", "train", f"resume={run}", f"trainer.max_steps={last + 1}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == \
        list(range(1, last + 2))


def test_sigterm_to_every_process_of_the_job_saves_the_step_under_way(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Slurm signals every process of a job: each rank gets SIGTERM from it and again from torchrun, which
    passes the signal on. The repeat read as a second SIGTERM ("stop at once"): the rank stopped mid-step,
    nothing was saved, and the other rank said that a learner process had failed."""
    import os
    import signal
    import time

    pids = tmp_path / "pids"
    pids.mkdir()
    slow = tmp_path / "slow.py"  # 2 s a step, so that both signals land in the same one; says its rank's pid
    slow.write_text("import os, time\n"
                    "def slow(completions, **columns):\n"
                    f"    open(os.path.join({str(pids)!r}, os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                    "    time.sleep(2)\n"
                    "    return [0.0] * len(completions)\n")
    run = tmp_path / "run"
    args = [*_train_args(tiny_model_dir, run, "hf"), "trainer.max_steps=200", "trainer.save_every=1000",
            "trainer.eval_every=0", f"+rewards.slow.fn={slow}:slow"]
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                *args], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    for r in (0, 1):
        os.kill(int((pids / str(r)).read_text()), signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
    _, stderr = process.communicate(timeout=300)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = steps[-1]
    assert 1 <= last < 200 and steps == list(range(1, last + 1))
    assert stderr.count(f"interrupted after step {last}; continue with: grpo train resume={run} (it continues after "
                        f"step-{last:06d})") == 1, stderr[-4000:]
    assert "another learner process failed" not in stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{last:06d}"]


def test_sharded_hf_engine_bounds_rows_and_keeps_ranks_in_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A sharded model's `generate` is collective: with rollout.hf_max_rows cutting each rank's prompts
    into its own number of calls, the rank with fewer makes up the difference with one-row calls
    instead of hanging. Samples as one unsharded call's."""
    import hf_rows_worker as rows_worker
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.rollout import SamplingSettings
    from grpo_cli.rollout.hf import HFEngine

    result = _torchrun(str(REPO / "tests" / "hf_rows_worker.py"), str(tmp_path), str(tiny_model_dir), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # 10 rows in 4 + 4 + 2 vs 2 and two fillers; then 2 and a filler vs 6 rows in 3 + 3
    assert ranks[0]["rows"] == [4, 4, 2, 2, 1]
    assert ranks[1]["rows"] == [2, 1, 1, 3, 3]
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                      AutoTokenizer.from_pretrained(tiny_model_dir))
    for rank, calls in rows_worker.CALLS.items():
        for (indices, n), got in zip(calls, ranks[rank]["samples"], strict=True):
            want = engine.generate([rows_worker.PROMPTS[i] for i in indices],
                                   SamplingSettings(n=n, max_new_tokens=5, temperature=1.0, seed=rows_worker.SEED))
            assert [(g[0], g[1]) for g in got] == [(s.prompt_index, s.completion_ids) for s in want]
            torch.testing.assert_close(torch.tensor([g[2] for g in got]), torch.tensor([s.logprobs for s in want]),
                                       rtol=0, atol=1e-5)
