"""`grpo rollout-server`: a vLLM engine behind HTTP, for `rollout.engine=vllm_server`.

The server hosts the same `VLLMEngine` as the in-process `vllm` engine (so samples and their
log-probabilities mean exactly the same thing) and adds what a trainer in another process needs:
weight updates. One request runs on the engine at a time (a lock); /health never waits for it.
Several learner ranks (torchrun) each send their share of a step's prompts; requests that name the
same `batch` are held until all `of` of them are in (at most GATHER_S seconds) and run as one engine
call, so vLLM batches the ranks' sequences together instead of running R smaller calls in turn.

Endpoints (JSON in, JSON out; errors come back as {"error": "..."} with status 400 (a malformed or
out-of-range request), 401 (no valid token), 403 (a path outside --weights-dir), 404, 408 (a body that
did not arrive in time), 409, 411, 413 (a body over MAX_BODY_BYTES), 500, or 503 while the model is
loading or when MAX_CONNECTIONS requests are open):

    GET  /health        status (loading | ready), protocol, model, weights_version, weights_id, boot_id
                        (drawn when the process starts), dtype,
                        tied_embeddings, max_model_len, architecture (the model config's sizes),
                        world_size (GPUs of this server), cuda; without a valid token (when the server
                        has one) only status, protocol and authorized: false
    POST /generate      {prompts: [str], sampling: SamplingSettings fields, prompt_offset: int,
                         batch: {key: str, of: int} (optional)}
                        -> {samples: [Sample fields]}; prompt_offset seeds as if the prompts sat at
                        that index of a larger batch (the client splits batches across servers);
                        requests with the same batch key run together once `of` have arrived;
                        the reply names the weights the samples came from (weights_id)
    POST /logprobs      {prompt_ids, completion_ids, temperature} -> {logprobs}: the completion
                        tokens' log-probs under the current weights (checks a weight sync)
    POST /load_weights  {path, version}: shared-filesystem sync; load the safetensors file(s) at
                        path (a file or a folder, see grpo_cli.sync.read_weight_files) and push
                        them into the engine with grpo_cli.sync.push_weights

GPU only, NCCL sync: the routes and bodies of vLLM's own RL API (vllm/entrypoints/rl/online), so the
trainer drives them with vLLM's `NCCLTrainerWeightTransferEngine` (grpo_cli/rollout/vllm_server.py)
exactly as it would drive `vllm serve`; the broadcast lands in this server's workers:

    POST /init_weight_transfer_engine {init_info}     join the learner's NCCL group (blocks until all join)
    POST /start_weight_update | /update_weights {update_info} | /finish_weight_update {weight_version}
    POST /shutdown_weight_transfer_engine
    GET  /get_world_size

Between /start_weight_update and /finish_weight_update the weights are half new: /generate and
/logprobs answer 409 until the update finishes.

Access control. With a token (`grpo rollout-server --token`, or the environment variable
GRPO_ROLLOUT_TOKEN, which the trainer's client also reads) every request but GET /health must carry
`Authorization: Bearer TOKEN` (compared in constant time), the NCCL routes included; otherwise it is
answered 401. The token is not a config field, so it never lands in a run's saved config. Without a
token anyone who can reach the port can generate and push weights: the server warns at start when
it listens on a non-loopback address without one. `--weights-dir DIR` (repeatable) restricts
/load_weights to files under those folders (symlinks resolved); without it any path the server can
read is loaded, as the trainer's default sync_dir (<run dir>/weight-sync) lies wherever the run does.

Request bodies are capped at MAX_BODY_BYTES (413 beyond, unread), and a /generate at MAX_SEQUENCES
prompts x n; a body that is not a JSON object, a field of the wrong type or out of range is a 400,
never a 500.

Slow or idle clients. Each connection gets a thread, but only for a bounded time and number while
it sends its request: the request line, headers and body must arrive within READ_S of connecting,
plus a second per MiB of body (BODY_RATE), else the connection is closed (a half-sent body answered
408); the reply may then take as long as the engine needs. When more than MAX_READING connections
are sending their request, a new one closes those that received nothing for STALL_S (oldest first)
down to that number: a trainer sends its whole request at once, so a burst of learner ranks is never
cut, while clients that connect and send nothing cannot pile up threads or keep others out. At most
MAX_CONNECTIONS connections are open at once (requests being served included): one more closes the
oldest connection still sending its request (however fast: headers sent byte by byte, say), or is
answered 503 at once when all are being served. Handler threads are daemons: stopping the server
never waits for a client.

`weights_id` is drawn afresh when the server starts and whenever its weights change (a load, an NCCL
update, one that failed half way too); /generate and /logprobs reply with the id of the weights they
ran on. A client compares it with the id its own last push got back, so that a server that restarted
(back on the base weights) or took another trainer's weights is noticed, never sampled from silently;
`boot_id`, drawn once per process, tells it a restart (which it may repair by loading its last push
again) from another trainer's push.
`protocol` is bumped whenever a request or a reply changes meaning.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_cli.errors import UserError, first_line

if TYPE_CHECKING:
    from grpo_cli.rollout.vllm import VLLMEngine
    from grpo_cli.schema import Config

log = logging.getLogger("grpo.rollout_server")

# The model config's sizes in /health: a trainer checks that the server hosts its model's architecture.
ARCHITECTURE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")

PROTOCOL = 3  # the client refuses a server that speaks another (grpo_cli/rollout/vllm_server.py)
GATHER_S = 60.0  # longest a /generate waits for the other requests of its batch (learner ranks run in step)
TOKEN_ENV = "GRPO_ROLLOUT_TOKEN"  # the shared secret, read by the server (unless --token) and the trainer's client
# Largest request body read: a /generate of ~100k prompts of 600 characters; bigger is refused unread.
MAX_BODY_BYTES = 64 << 20
MAX_SEQUENCES = 1 << 18  # prompts x n of one /generate (a step of 4096 prompts x 64 per server)
MAX_KEY_CHARS = 1024  # a batch key (the client's: MASTER_ADDR:MASTER_PORT:run id:launch id#call, ~60 characters)
# Slow or idle clients (module docstring). A trainer sends its whole request at once (milliseconds).
READ_S = 10.0  # seconds from connecting to the end of a request's headers and body
BODY_RATE = 1 << 20  # bytes per second a body may take beyond READ_S (the largest body: 64 s more)
MAX_READING = 64  # connections sending their request at once; beyond it, those stalled for STALL_S are closed
STALL_S = 1.0  # a connection that received nothing for this long while sending its request is stalled
MAX_CONNECTIONS = 1024  # connections open at once (each learner rank holds one per /generate); one more gets 503


class RequestError(Exception):
    """A request the server refuses (bad body, wrong state): answered with its status and message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class RolloutServer:
    """The engine and its state; every endpoint is a method taking and returning a JSON object."""

    def __init__(self, cfg: Config, token: str | None = None, weights_dirs: Sequence[Path] = ()) -> None:
        """token: the shared secret every request but /health must carry (None: no access control);
        weights_dirs: the folders /load_weights may read from (empty: any path)."""
        self.cfg = cfg
        self.token = token or None
        self.weights_dirs = [Path(d).expanduser().resolve() for d in weights_dirs]
        self.engine: VLLMEngine | None = None
        self.lock = threading.Lock()  # one engine call at a time
        self.weights_version: int | str = 0
        self.weights_id = _new_id()  # these weights, in this process (module docstring)
        self.boot_id = _new_id()  # this process: a client tells a restarted server from another trainer's push
        self.updating = False  # between /start_weight_update and /finish_weight_update
        self.batches = Coalescer(self._generate_together, GATHER_S)
        self.counts = {"generate_requests": 0, "engine_generate_calls": 0}  # in /health: how well requests batch
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any]], dict[str, Any]]] = {
            ("GET", "/health"): self.health,
            ("POST", "/generate"): self.generate,
            ("POST", "/logprobs"): self.logprobs,
            ("POST", "/load_weights"): self.load_weights,
            ("GET", "/get_world_size"): self.world_size,
            ("POST", "/init_weight_transfer_engine"): self.init_weight_transfer_engine,
            ("POST", "/start_weight_update"): self.start_weight_update,
            ("POST", "/update_weights"): self.update_weights,
            ("POST", "/finish_weight_update"): self.finish_weight_update,
            ("POST", "/shutdown_weight_transfer_engine"): self.shutdown_weight_transfer_engine,
        }

    def load(self) -> None:
        """Start the engine (minutes for a large model; /health says `loading` meanwhile)."""
        import torch

        from grpo_cli.models import resolve
        from grpo_cli.rollout.vllm import VLLMEngine

        llm_args: dict[str, Any] = {"max_logprobs": -1}  # /logprobs at a temperature needs whole distributions
        if torch.cuda.is_available():
            llm_args["weight_transfer_config"] = {"backend": "nccl"}  # vLLM's own NCCL receiver in each worker
        # The server's GPUs are its own: sleep mode (freeing memory for a learner) has no use here.
        # Room for evaluations during training too (eval.max_new_tokens may be longer), as a trainer's
        # in-process engine leaves: else they are cut at max_model_len, or the trainer refuses the server.
        longest = max(self.cfg.rollout.max_new_tokens, self.cfg.eval.max_new_tokens or 0)
        rollout = dataclasses.replace(self.cfg.rollout, sleep_mode=False, max_new_tokens=longest)
        self.engine = VLLMEngine(resolve(self.cfg.model.name_or_path), rollout, self.cfg.model, seed=self.cfg.seed,
                                 llm_args=llm_args)

    def authorized(self, header: str | None) -> bool:
        """Whether a request's Authorization header carries the token (always, without one)."""
        if self.token is None:
            return True
        scheme, _, given = (header or "").strip().partition(" ")
        # compare_digest's time depends on the lengths only, never on where the strings differ
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    # ------------------------------------------------------------------ endpoints
    def public_health(self) -> dict[str, Any]:
        """/health for a client without the token: whether it serves, and nothing about what."""
        return {"status": "ready" if self.engine is not None else "loading", "protocol": PROTOCOL,
                "authorized": False}

    def health(self, _: dict[str, Any]) -> dict[str, Any]:
        engine = self.engine
        info: dict[str, Any] = {"status": "ready" if engine is not None else "loading", "protocol": PROTOCOL,
                                "model": self.cfg.model.name_or_path, "weights_version": self.weights_version,
                                "weights_id": self.weights_id, "boot_id": self.boot_id, "updating": self.updating,
                                **self.counts}
        if engine is not None:
            hf_config = engine.llm.llm_engine.model_config.hf_text_config
            info.update(dtype=str(engine.dtype).removeprefix("torch."), max_model_len=engine.max_model_len,
                        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                        architecture={key: getattr(hf_config, key, None) for key in ARCHITECTURE},
                        world_size=self.cfg.rollout.tensor_parallel_size, cuda=engine.cuda)
        return info

    def world_size(self, _: dict[str, Any]) -> dict[str, Any]:
        return {"world_size": self.cfg.rollout.tensor_parallel_size}

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        from grpo_cli.rollout import SamplingSettings

        prompts = _field(body, "prompts", list)
        if not all(isinstance(p, str) for p in prompts):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'prompts': expected a list of strings")
        raw = dict(_field(body, "sampling", dict))
        known = {f.name for f in dataclasses.fields(SamplingSettings)}
        if set(raw) - known:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown sampling fields {sorted(set(raw) - known)}")
        missing = sorted(f.name for f in dataclasses.fields(SamplingSettings)
                         if f.name not in raw and f.default is dataclasses.MISSING)
        if missing:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"sampling: missing fields {missing}")
        sampling = _sampling(raw, self.engine.max_model_len if self.engine is not None else None)
        if len(prompts) * sampling.n > MAX_SEQUENCES:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{len(prompts)} prompts x n={sampling.n} is more than the "
                               f"{MAX_SEQUENCES} sequences one request may ask for: send fewer prompts per request")
        offset = body.get("prompt_offset", 0)
        if not _is_int(offset) or offset < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'prompt_offset': expected an integer >= 0, got {offset!r:.40}")
        job = (prompts, sampling, offset)
        batch = body.get("batch")
        if batch is None:
            samples, weights = self._generate_together([job])[0]
        else:
            if (not isinstance(batch, dict) or not isinstance(batch.get("key"), str) or not _is_int(batch.get("of"))
                    or len(batch["key"]) > MAX_KEY_CHARS):
                raise RequestError(HTTPStatus.BAD_REQUEST, "'batch': expected {key: str (at most "
                                   f"{MAX_KEY_CHARS} characters), of: int}}")
            samples, weights = self.batches.submit(batch["key"], batch["of"], job)
        return {"samples": [dataclasses.asdict(s) for s in samples], **weights}

    def _generate_together(self, jobs: list[tuple[list[str], Any, int]]) -> list[tuple[list[Any], dict[str, Any]]]:
        """Each job's samples, and the weights they came from (read under the lock, as they ran)."""
        with self._engine() as engine:
            self.counts["generate_requests"] += len(jobs)
            self.counts["engine_generate_calls"] += any(prompts for prompts, _, _ in jobs)  # none: vLLM is not called
            weights = self._weights()
            return [(samples, weights) for samples in engine.generate_many(jobs)]

    def logprobs(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = _token_ids(body, "prompt_ids")
        completion_ids = _token_ids(body, "completion_ids")
        temperature = body.get("temperature", 1.0)
        if not _is_number(temperature) or temperature < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'temperature': expected a number >= 0, got {temperature!r:.40}")
        with self._engine() as engine:
            values = engine.prompt_logprobs(prompt_ids, completion_ids, temperature)
            return {"logprobs": values, **self._weights()}

    def load_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        from grpo_cli.sync import push_weights, read_weight_files

        path = Path(_field(body, "path", str))
        version = body.get("version", self.weights_version)
        if not (_is_int(version) and version >= 0) and not (isinstance(version, str) and len(version) <= 64):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'version': expected an integer >= 0, got {version!r:.40}")
        self._check_weights_path(path)
        if not path.exists():
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{path}: no such file or folder on this server; rollout."
                               "sync_dir must be a folder the learner and every server see at the same path")
        with self._engine() as engine:
            self.weights_id = _new_id()  # a load that fails half way leaves neither the old weights nor the new
            seconds = push_weights(engine, read_weight_files(path))
            self.weights_version = version
            reply = {**self._weights(), "seconds": seconds}
        log.info("loaded weights version %s from %s in %.2f s", self.weights_version, path, seconds)
        return reply

    # NCCL (GPU): vLLM's RL weight-transfer calls on the hosted engine, as `vllm serve` exposes them.
    def init_weight_transfer_engine(self, body: dict[str, Any]) -> dict[str, Any]:
        init_info = _field(body, "init_info", dict)
        with self._engine(cuda=True) as engine:
            engine.llm.init_weight_transfer_engine({"init_info": init_info})
        return {"message": "weight transfer initialized"}

    def start_weight_update(self, _: dict[str, Any]) -> dict[str, Any]:
        with self._engine(cuda=True, during_update=True) as engine:
            self.weights_id = _new_id()
            engine.llm.start_weight_update()
            self.updating = True
        return {"message": "weight update started"}

    def update_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        update_info = body.get("update_info")
        if not isinstance(update_info, (dict, list)):
            raise RequestError(HTTPStatus.BAD_REQUEST, "update_info: expected an object")
        with self._engine(cuda=True, during_update=True) as engine:
            if not self.updating:
                raise RequestError(HTTPStatus.CONFLICT, "/update_weights before /start_weight_update")
            try:
                engine.llm.update_weights({"update_info": update_info})  # blocks in the NCCL broadcast
            except BaseException:
                self.updating = False  # vLLM's workers end the update session on a failure
                raise
        return {"message": "weights updated"}

    def finish_weight_update(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._engine(cuda=True, during_update=True) as engine:
            engine.llm.finish_weight_update()
            if engine.llm.reset_prefix_cache() is False:  # cached prefixes hold the old weights' activations
                raise RuntimeError("vLLM could not reset its prefix cache after a weight update")
            self.updating = False
            version = body.get("weight_version")
            self.weights_version = int(version) if str(version).isdigit() else (version or self.weights_version)
            self.weights_id = _new_id()
            return self._weights()

    def shutdown_weight_transfer_engine(self, _: dict[str, Any]) -> dict[str, Any]:
        with self._engine(cuda=True, during_update=True) as engine:
            engine.llm.shutdown_weight_transfer_engine()
            self.updating = False
        return {"message": "weight transfer shut down"}

    # ------------------------------------------------------------------ helpers
    def _check_weights_path(self, path: Path) -> None:
        """Refuse a /load_weights path outside --weights-dir: the path itself, and every file a folder
        holds, with symlinks and '..' resolved (checked before its existence, which would otherwise leak)."""
        if not self.weights_dirs:
            return
        targets = [path]
        if path.is_dir() and self._inside(path):
            targets += list(path.glob("*.safetensors"))
        for target in targets:
            if not self._inside(target):
                where = " or ".join(str(d) for d in self.weights_dirs)
                raise RequestError(HTTPStatus.FORBIDDEN, f"{target} is outside this server's --weights-dir ({where}): "
                                   "set the trainer's rollout.sync_dir to a folder under it, or start the server "
                                   "with a --weights-dir that holds it")

    def _inside(self, path: Path) -> bool:
        resolved = path.expanduser().resolve()
        return any(resolved.is_relative_to(d) for d in self.weights_dirs)

    def _weights(self) -> dict[str, Any]:
        return {"weights_version": self.weights_version, "weights_id": self.weights_id}

    def _engine(self, cuda: bool = False, during_update: bool = False) -> _EngineLease:
        if self.engine is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is still loading the model")
        if cuda and not self.engine.cuda:
            raise RequestError(HTTPStatus.BAD_REQUEST, "NCCL weight sync needs a server on CUDA GPUs; on CPU use "
                               "rollout.sync_method=file")
        return _EngineLease(self, during_update)


class Coalescer:
    """Jobs submitted under the same key from several threads, run together by one `run(jobs)` call
    once `of` of them are in, or `wait_s` after the first arrived (a rank that never comes does not
    hold up the others for longer). Each submitter gets its own job's result, or the call's error."""

    class _Batch:
        def __init__(self, of: int, deadline: float) -> None:
            self.of, self.deadline = of, deadline
            self.jobs: list[Any] = []
            self.started = self.done = False
            self.results: list[Any] = []
            self.error: BaseException | None = None

    CLOSED_KEYS = 4096  # keys of batches already run, remembered so that a late job does not wait again

    def __init__(self, run: Callable[[list[Any]], list[Any]], wait_s: float) -> None:
        self.run, self.wait_s = run, wait_s
        self.cond = threading.Condition()
        self.open: dict[str, Coalescer._Batch] = {}
        self.closed: dict[str, None] = {}  # insertion-ordered: the oldest go first

    def submit(self, key: str, of: int, job: Any) -> Any:
        with self.cond:
            batch = self.open.get(key)
            if batch is None and key in self.closed:
                # Its batch ran without it: the others will not come again, so it runs alone, now.
                log.warning("batch %s: a request arrived after its batch ran; running it alone", key)
                batch = self._Batch(1, time.monotonic())
            elif batch is None:
                batch = self.open[key] = self._Batch(of, time.monotonic() + self.wait_s)
            index = len(batch.jobs)
            batch.jobs.append(job)
            self.cond.notify_all()
            while not batch.started and len(batch.jobs) < batch.of and time.monotonic() < batch.deadline:
                self.cond.wait(timeout=max(batch.deadline - time.monotonic(), 0.0))
            runs = not batch.started  # the first thread to see the batch complete (or late) runs it
            if runs:
                batch.started = True
                if self.open.get(key) is batch:
                    del self.open[key]
                    self.closed[key] = None
                    if len(self.closed) > self.CLOSED_KEYS:
                        del self.closed[next(iter(self.closed))]
                if len(batch.jobs) < batch.of:
                    log.warning("batch %s: running %d of its %d requests after %.0f s without the others",
                                key, len(batch.jobs), batch.of, self.wait_s)
        if runs:
            try:
                batch.results = self.run(batch.jobs)
            except BaseException as e:  # every submitter hears of it
                batch.error = e
            with self.cond:
                batch.done = True
                self.cond.notify_all()
        else:
            with self.cond:
                while not batch.done:
                    self.cond.wait()
        if batch.error is not None:
            raise batch.error
        return batch.results[index]


class _EngineLease:
    """The engine under the server's lock; refused while a weight update is half done."""

    def __init__(self, server: RolloutServer, during_update: bool) -> None:
        self.server, self.during_update = server, during_update

    def __enter__(self) -> VLLMEngine:
        self.server.lock.acquire()
        if self.server.updating and not self.during_update:
            self.server.lock.release()
            raise RequestError(HTTPStatus.CONFLICT, "a weight update is in progress (between /start_weight_update "
                               "and /finish_weight_update)")
        assert self.server.engine is not None
        return self.server.engine

    def __exit__(self, *_: object) -> None:
        self.server.lock.release()


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _token_ids(body: dict[str, Any], key: str) -> list[int]:
    ids = _field(body, key, list)
    if not all(_is_int(t) and 0 <= t < 1 << 31 for t in ids):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}': expected a list of token ids (integers >= 0)")
    return ids


def _sampling(raw: dict[str, Any], max_model_len: int | None) -> Any:
    """SamplingSettings from a request's `sampling`, every field checked (type and range), so that
    nothing malformed reaches vLLM. max_new_tokens beyond the engine's context is cut to it: vLLM
    stops every sequence there anyway, so the samples are the same."""
    from grpo_cli.rollout import SamplingSettings

    def bad(key: str, expected: str) -> RequestError:
        return RequestError(HTTPStatus.BAD_REQUEST, f"sampling.{key}: expected {expected}, got {raw.get(key)!r:.40}")

    if not _is_int(raw["n"]) or not 1 <= raw["n"] <= MAX_SEQUENCES:
        raise bad("n", f"an integer from 1 to {MAX_SEQUENCES}")
    if not _is_int(raw["max_new_tokens"]) or raw["max_new_tokens"] < 1:
        raise bad("max_new_tokens", "an integer >= 1")
    if not _is_number(raw["temperature"]) or raw["temperature"] < 0:
        raise bad("temperature", "a number >= 0")
    if "top_p" in raw and not (_is_number(raw["top_p"]) and 0 < raw["top_p"] <= 1):
        raise bad("top_p", "a number above 0 and at most 1")
    if "top_k" in raw and not (_is_int(raw["top_k"]) and raw["top_k"] >= 0):
        raise bad("top_k", "an integer >= 0 (0: off)")
    stop = raw.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
        raise bad("stop", "a list of strings")
    if "" in stop:  # vLLM refuses it (a 500, with a traceback in this server's log)
        raise bad("stop", "non-empty strings (an empty one would end every completion at once)")
    if raw.get("seed") is not None and not _is_int(raw["seed"]):
        raise bad("seed", "an integer or null")
    max_new_tokens = raw["max_new_tokens"] if max_model_len is None else min(raw["max_new_tokens"], max_model_len)
    return SamplingSettings(**{**raw, "stop": tuple(stop), "max_new_tokens": max_new_tokens})


def _field(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{key}': expected a {kind.__name__}, got {type(value).__name__}")
    return value


def _handler(server: RolloutServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 600  # seconds to send a reply to a client that stopped reading (requests: READ_S)
        server: _HTTPServer

        def setup(self) -> None:
            super().setup()
            self.stream = self.server.connections[self.request]
            self.rfile.close()  # the plain socket file: the request is read under its deadline instead
            self.rfile = io.BufferedReader(self.stream)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._dispatch("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            self.close_connection = True  # one request per connection
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            route = server.routes.get((method, path))
            headers: dict[str, str] = {}
            try:
                if route is None:
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no endpoint {method} {path}")
                # Before the body is read: a client without the token cannot make the server read anything.
                authorized = server.authorized(self.headers.get("Authorization"))
                if not authorized and path != "/health":
                    headers["WWW-Authenticate"] = "Bearer"
                    raise RequestError(HTTPStatus.UNAUTHORIZED, f"{method} {path} needs this server's token "
                                       f"(header 'Authorization: Bearer TOKEN'; the trainer sends ${TOKEN_ENV})")
                body = self._body()
                if body is None or not self.server.served(self.stream):
                    return  # the client went away mid-body, or was closed for a newer one: nobody to answer
                status, reply = HTTPStatus.OK, route(body) if authorized else server.public_health()
            except RequestError as e:
                status, reply = e.status, {"error": str(e)}
            except (ValueError, UserError) as e:  # UserError: e.g. a prompt too long
                status, reply = HTTPStatus.BAD_REQUEST, {"error": first_line(e)}
            except Exception as e:
                traceback.print_exc()
                status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {first_line(e)}"}
            data = json.dumps(reply).encode()
            try:
                self.connection.settimeout(self.timeout)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its time-out); nothing to tell it

        def _body(self) -> dict[str, Any] | None:
            """The request's JSON object, read only up to MAX_BODY_BYTES; None if the client stopped sending."""
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (chunked "
                                   "transfer encoding is not supported)")
            text = (self.headers.get("Content-Length") or "0").strip()
            if not (text.isascii() and text.isdigit() and len(text) <= 20):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length '{text:.40}' is not a byte count")
            length = int(text)
            if length > MAX_BODY_BYTES:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body has {length} bytes, "
                                   f"more than this server's limit of {MAX_BODY_BYTES} ({MAX_BODY_BYTES >> 20} MiB): "
                                   "send fewer prompts per request (more servers, or fewer prompts per step)")
            self.stream.deadline += length / BODY_RATE
            try:
                raw = self.rfile.read(length) if length else b""
            except TimeoutError:
                if self.stream.dropped:
                    return None
                allowed = READ_S + length / BODY_RATE
                raise RequestError(HTTPStatus.REQUEST_TIMEOUT, f"the request body ({length} bytes) did not arrive "
                                   f"within {allowed:.0f} s of connecting") from None
            except OSError:  # a reset
                return None
            if len(raw) < length:
                return None
            try:
                body = json.loads(raw) if raw else {}
            except (ValueError, RecursionError):  # RecursionError: JSON nested too deep to parse
                raise RequestError(HTTPStatus.BAD_REQUEST, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
            return body

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
            pass  # one line per request would drown the server's log

    return Handler


class _RequestStream(io.RawIOBase):
    """A connection's bytes as its handler reads the request: each read waits only until the request's
    deadline (READ_S from connecting, plus the body's time at BODY_RATE), and a connection the server
    dropped for a newer one reads as timed out. Its thread and its place are freed within that time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        now = time.monotonic()
        self.deadline = now + READ_S  # the handler adds the body's time once it knows the length
        self.received_at = now  # the last byte's arrival: a reader is stalled STALL_S after it
        self.reading = True  # until the whole request is in; it is then served, however long that takes
        self.dropped = False  # closed by the server to make room (_HTTPServer.process_request)

    def drop(self) -> None:
        self.dropped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # its handler's blocked read returns at once
        except OSError:
            pass

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if self.dropped or remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(remaining)
        count = self.sock.recv_into(buffer)
        if self.dropped:  # its socket was shut down under it: reads as the end of the stream
            raise TimeoutError("closed to make room for newer connections")
        if count:
            self.received_at = time.monotonic()
        return count


class _HTTPServer(ThreadingHTTPServer):
    """http.server's one thread per connection, bounded (module docstring, "Slow or idle clients")."""

    daemon_threads = True  # stopping never waits for a stuck client
    request_queue_size = 128  # connections the kernel holds while the accept loop is busy

    def __init__(self, address: tuple[str, int], server: RolloutServer) -> None:
        self.connections: dict[socket.socket, _RequestStream] = {}  # open ones, oldest first
        self.guard = threading.Lock()
        self.warned_at = -math.inf
        super().__init__(address, _handler(server))

    def process_request(self, request: Any, client_address: Any) -> None:
        """Runs in the accept loop: it must never block. Makes room for the new connection (module
        docstring): stalled readers beyond MAX_READING go, and at MAX_CONNECTIONS the oldest reader."""
        with self.guard:
            now = time.monotonic()
            live = [c for c in self.connections.values() if not c.dropped]
            reading = [c for c in live if c.reading]  # oldest first
            stalled = [c for c in reading if now - c.received_at >= STALL_S]
            drop = stalled[:max(len(reading) + 1 - MAX_READING, 0)]
            if len(live) - len(drop) >= MAX_CONNECTIONS:
                oldest = next((c for c in reading if c not in drop), None)
                if oldest is None:
                    self._warn(f"refused a connection: {MAX_CONNECTIONS} requests are open at once")
                    self._refuse(request)
                    return
                drop.append(oldest)
            for connection in drop:
                connection.drop()
            if drop:
                self._warn(f"closed {len(drop)} connection(s) that had not sent their request to make room for "
                           f"newer ones: more than {MAX_READING} were sending requests at once (slow or idle clients?)")
            self.connections[request] = _RequestStream(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.guard:
                self.connections.pop(request, None)

    def served(self, stream: _RequestStream) -> bool:
        """Mark a connection's request as read (no longer droppable); False if it was dropped meanwhile."""
        with self.guard:
            stream.reading = False
            return not stream.dropped

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that reset its connection is no error of ours
            super().handle_error(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        data = json.dumps({"error": f"this server has {MAX_CONNECTIONS} requests open; try again later"}).encode()
        try:
            request.settimeout(0)  # a full socket buffer must not stall the accept loop
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
        except OSError:
            pass
        self.shutdown_request(request)

    def _warn(self, message: str) -> None:
        if time.monotonic() - self.warned_at > 60:  # a flood of connections must not flood the log
            self.warned_at = time.monotonic()
            log.warning("%s (said at most once a minute)", message)


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback (only local clients can connect)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def serve(cfg: Config, host: str, port: int, say: Callable[[str], None], token: str | None = None,
          weights_dirs: Sequence[Path] = ()) -> None:
    """Bind host:port, load the engine (answering /health with `loading` meanwhile), print the ready
    line, then serve until SIGINT or SIGTERM. token, weights_dirs: access control (module docstring)."""
    for folder in weights_dirs:
        if not Path(folder).expanduser().is_dir():
            raise UserError(f"--weights-dir {folder}: no such folder; give a folder the trainer's rollout.sync_dir "
                            "lies under (it must exist before the server starts)")
    server = RolloutServer(cfg, token, weights_dirs)
    if not is_loopback(host) and server.token is None:
        say(f"warning: listening on {host} without a token: anyone who can reach this port can generate and "
            f"push weights{'' if weights_dirs else ' from any path this server can read'}; set {TOKEN_ENV} "
            "(or --token) here and in the trainer's environment"
            + ("" if weights_dirs else ", and --weights-dir to the folder of the trainer's rollout.sync_dir"))
    try:
        httpd = _HTTPServer((host, port), server)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from None
    bound_port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="rollout-server-http", daemon=True)
    thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        say(f"loading {cfg.model.name_or_path} (tensor parallel {cfg.rollout.tensor_parallel_size}); "
            f"/health answers on http://{host}:{bound_port}")
        start = time.perf_counter()
        server.load()
        # The line scripts and tests wait for: it carries the port actually bound (--port 0 picks one).
        print(f"ready: grpo rollout-server serving {cfg.model.name_or_path} on {host}:{bound_port} "
              f"(loaded in {time.perf_counter() - start:.1f} s)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        httpd.shutdown()
        httpd.server_close()
        if server.engine is not None:
            with server.lock:
                server.engine.close()
        sys.stdout.flush()
