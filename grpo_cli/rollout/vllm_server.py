"""The `vllm_server` rollout engine: the client of one or more `grpo rollout-server` processes.

Each server hosts the in-process `VLLMEngine` (grpo_cli/rollout/server.py), so a `Sample` means
exactly what it means for `rollout.engine=vllm`. `generate` splits the prompts into contiguous
chunks, one per server (data parallel; a prompt's G completions stay on one server), sends them at
the same time and puts the samples back in prompt order. Seeds follow a prompt's index in the whole
batch, so the samples do not depend on how many servers there are.

Every request carries `Authorization: Bearer $GRPO_ROLLOUT_TOKEN` when that variable is set (a
server started with a token refuses requests without it; the token stays out of the run's config).
Every HTTP call waits at most `rollout.server_timeout_s` for its reply; a refused connection, a
time-out, a dropped connection or an error reply raises `RolloutServerError`, whose one-line message
names the server. Creating the engine waits (up to that time-out) until every server reports ready,
then checks that each speaks this grpo's protocol and hosts the trainer's model: its architecture, dtype
and a context long enough for rollout.max_prompt_tokens + max_new_tokens.

Every /generate and /logprobs reply names the weights it ran on (`weights_id`, drawn by the server
whenever its weights change); a reply whose id is not the one this client's last push got back is a
`RolloutServerError`: the server restarted (back on its base weights) or another trainer pushed to it,
and samples from other weights than the learner's must never be trained on silently. One case is
recovered (`_recover`): with file sync and one trainer process, a server that restarted (a new
`boot_id` in its /health, weights_version 0, the same model as at start-up) gets the last push's
folder loaded again (before any push: its base weights are the run's), with a warning, and the
request is sent once more; a second mismatch, a missing folder, NCCL sync or several learner ranks
stop the run as before.

Weights reach the servers through grpo_cli.sync.push_weights: `rollout.sync_method=file` writes
safetensors into `rollout.sync_dir` (default <run dir>/weight-sync), which every server then loads;
`nccl` (CUDA) broadcasts from this process into the servers' workers with vLLM's own
`NCCLTrainerWeightTransferEngine`, streamed in packed buckets (`broadcast_weights` below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_cli.errors import RolloutServerError, UserError
from grpo_cli.rollout import Sample, SamplingSettings

if TYPE_CHECKING:
    import torch

    from grpo_cli.schema import ModelConfig, RolloutConfig

_HINT = "is `grpo rollout-server` running there? (rollout.servers)"
# What must not change when a server restarts for this run to carry on with it (_recover).
_SAME_AFTER_RESTART = ("protocol", "model", "dtype", "tied_embeddings", "max_model_len", "architecture", "cuda",
                       "world_size")

log = logging.getLogger("grpo.rollout")


@dataclasses.dataclass(frozen=True)
class Server:
    host: str
    port: int

    @classmethod
    def parse(cls, address: str) -> Server:
        text = str(address).strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"rollout.servers: '{address}' is not host:port (e.g. 127.0.0.1:8000)")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def call(server: Server, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    """One JSON request; every failure becomes a `RolloutServerError` that names the server."""
    from grpo_cli.rollout.server import MAX_BODY_BYTES, TOKEN_ENV

    data = None if body is None else json.dumps(body).encode()
    if data is not None and len(data) > MAX_BODY_BYTES:  # the server would refuse it unread
        raise _failure(server, path, f"cannot take a request of {len(data)} bytes (at most {MAX_BODY_BYTES >> 20} MiB)",
                       "send fewer prompts per request: more servers, or fewer prompts per step")
    headers = {"Content-Type": "application/json"} if data else {}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except ConnectionRefusedError:
        raise _failure(server, path, "refused the connection", _HINT) from None
    except TimeoutError:
        raise _failure(server, path, f"did not answer within {timeout:g} s", "is it stuck, or is the work too "
                       "large for the time-out? (rollout.server_timeout_s)") from None
    except (ConnectionError, http.client.HTTPException) as e:
        raise _failure(server, path, f"dropped the connection ({type(e).__name__})",
                       "did it crash or get killed? See its log") from None
    except OSError as e:
        raise _failure(server, path, f"cannot be reached ({e.strerror or e})", _HINT) from None
    finally:
        conn.close()
    try:
        reply = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        reply = {"error": raw[:200].decode(errors="replace")}
    if response.status == 401:
        raise _failure(server, path, *_token_advice())
    if response.status != 200:
        message = reply.get("error", "") if isinstance(reply, dict) else ""
        raise _failure(server, path, f"answered {response.status}", message)
    return reply


def _token_advice() -> tuple[str, str]:
    """(what happened, the fix) for a server that refused this process's token, or its lack of one."""
    from grpo_cli.rollout.server import TOKEN_ENV

    if os.environ.get(TOKEN_ENV):
        return "refused this process's token", f"set {TOKEN_ENV} to the token the server was started with"
    return "requires a token", f"set {TOKEN_ENV} in the trainer's environment to the server's token"


def _failure(server: Server, path: str, what: str, advice: str) -> RolloutServerError:
    error = RolloutServerError(f"rollout server {server} {what} on {path}: {advice}")
    error.what = what  # type: ignore[attr-defined]  (the start-up wait quotes it)
    return error


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `count` items in at most `parts` contiguous chunks, sizes differing by <= 1."""
    parts = max(1, min(parts, count))
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for i in range(parts):
        end = start + base + (i < extra)
        ranges.append((start, end))
        start = end
    return ranges


def _remove_leftover_pushes(folder: Path) -> None:
    """The pushes a killed run left in its own sync folder (<run dir>/weight-sync): a whole copy of the
    weights each, which close() never got to remove, one more on every crash of a resumed run. The
    servers read a push only while it is loaded, so none of them is still needed."""
    if folder.is_dir():
        for old in [*folder.glob("weights-v*"), *folder.glob(".weights-v*")]:
            shutil.rmtree(old, ignore_errors=True)


class VLLMServerEngine:
    """`Engine` over `grpo rollout-server` processes (see the module docstring)."""

    def __init__(self, rollout_cfg: RolloutConfig, run_dir: Path | None = None, model: ModelConfig | None = None,
                 model_config: Any = None) -> None:
        """model: the trainer's model settings, model_config: its HF config (the learner's `config`);
        given, the servers must host that model, in that dtype."""
        from grpo_cli.rollout.server import ARCHITECTURE, PROTOCOL

        self.servers = [Server.parse(a) for a in rollout_cfg.servers]
        if not self.servers:
            raise UserError("rollout.engine=vllm_server needs rollout.servers, e.g. rollout.servers=[127.0.0.1:8000]")
        self.timeout = float(rollout_cfg.server_timeout_s)
        self.sync_method = rollout_cfg.sync_method
        self._sync_dir = Path(rollout_cfg.sync_dir).expanduser() if rollout_cfg.sync_dir else None
        self._run_dir = run_dir
        self.sync_folders: list[Path] = []  # written by grpo_cli.sync, removed on close
        self.last_push: tuple[Path, int] | None = None  # (folder, version) of the last file push (_recover)
        self._temp_dir: Path | None = None
        self._nccl: Any = None  # vLLM's NCCLTrainerWeightTransferEngine once the group is formed
        if self._sync_dir is None and run_dir is not None and os.environ.get("RANK", "0") == "0":
            _remove_leftover_pushes(self._sync_dir_default())
        self._nccl_broken = False
        # Under torchrun, each rank's share of a step's prompts goes to every server as one request
        # tagged with the launch (its rendezvous address, the same on every rank and node) and the call's
        # number: a server runs the ranks' requests with the same tag as one engine call.
        # The tag ends with an id rank 0 draws for this launch: a resumed run (or torchrun's restart)
        # reusing the same MASTER_PORT numbers its calls from 1 again, and must not meet its predecessor's.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.batch_tag = None
        if self.world > 1:
            from grpo_cli import distributed

            launch = distributed.broadcast_object(uuid.uuid4().hex[:12]) if distributed.world() > 1 else ""
            self.batch_tag = (f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:"
                              f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{launch}")
        self.calls = 0

        self.info = self.wait_until_ready()
        first = self.info[0]
        if model_config is not None and hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        for server, info in zip(self.servers, self.info, strict=True):
            if info.get("protocol") != PROTOCOL:
                raise UserError(f"rollout server {server} speaks protocol {info.get('protocol')}, this grpo "
                                f"{PROTOCOL}: run the same grpo version on the servers and the trainer")
            if (info.get("model"), info.get("dtype")) != (first.get("model"), first.get("dtype")):
                raise UserError(f"rollout servers {self.servers[0]} and {server} host different models "
                                f"({first.get('model')} {first.get('dtype')}, {info.get('model')} {info.get('dtype')}): "
                                "start every server with the same model.* settings")
            arch = info.get("architecture") or {}
            if model_config is not None:
                ours = {key: getattr(model_config, key, None) for key in ARCHITECTURE}
                differ = [f"{key} {arch.get(key)} there, {ours[key]} here" for key in ARCHITECTURE
                          if ours[key] is not None and arch.get(key) is not None and arch[key] != ours[key]]
                if differ:
                    raise UserError(f"rollout server {server} hosts {info.get('model')}, another model than this "
                                    f"run's ({'; '.join(differ)}): start it with this run's model.name_or_path")
            if model is not None:
                import torch

                from grpo_cli.models import torch_dtype

                wanted = str(torch_dtype(model.dtype, torch.device("cuda" if info.get("cuda") else "cpu")))
                if f"torch.{info.get('dtype')}" != wanted:
                    raise UserError(f"rollout server {server} runs its model in {info.get('dtype')}, but this run's "
                                    f"model.dtype={model.dtype} means {wanted.removeprefix('torch.')} there: start "
                                    f"it with model.dtype={model.dtype}")
            # As the in-process engine: room for the longest prompt and completion, within the model's context.
            needed = rollout_cfg.max_prompt_tokens + rollout_cfg.max_new_tokens
            if arch.get("max_position_embeddings"):
                needed = min(needed, int(arch["max_position_embeddings"]))
            if int(info.get("max_model_len", 0)) < needed:
                raise UserError(f"rollout server {server} holds at most {info.get('max_model_len')} tokens per "
                                f"sequence, not enough for rollout.max_prompt_tokens={rollout_cfg.max_prompt_tokens} "
                                f"+ {rollout_cfg.max_new_tokens} new tokens (rollout.max_new_tokens, or eval.max_new_tokens "
                                "when longer): start it with the run's rollout.max_prompt_tokens, rollout.max_new_tokens "
                                "and eval.max_new_tokens")
            if self.sync_method == "nccl" and not info.get("cuda"):
                raise UserError(f"rollout.sync_method=nccl: rollout server {server} runs on CPU; use "
                                "rollout.sync_method=file")
        self.dtype = _torch_dtype(str(first["dtype"]))
        self.tied = bool(first.get("tied_embeddings"))
        # Continue the servers' numbering: a version names one set of weights on every server.
        self.weights_version = max(_version(i.get("weights_version")) for i in self.info)
        self.weights_ids = {s: str(i.get("weights_id")) for s, i in zip(self.servers, self.info, strict=True)}
        # The servers holding weights the trainer's must replace before the first rollout, with their
        # /health: an earlier run's pushes, or another checkpoint of the same architecture.
        self.other_weights = [(s, i) for s, i in zip(self.servers, self.info, strict=True)
                              if _version(i.get("weights_version")) > 0
                              or (model is not None and i.get("model") != model.name_or_path)]

    @property
    def holds_other_weights(self) -> bool:
        """Whether some server holds other weights than the model's (loop.py then pushes at start)."""
        return bool(self.other_weights)

    # ------------------------------------------------------------------ Engine
    def generate(self, prompts: list[str], sampling: SamplingSettings) -> list[Sample]:
        if not prompts and self.batch_tag is None:
            return []
        settings = {**dataclasses.asdict(sampling), "stop": list(sampling.stop)}
        chunks = split_evenly(len(prompts), len(self.servers))
        if self.batch_tag is not None:
            # Every server must hear from every rank, even with no prompts for it (a rank whose call has
            # fewer prompts than there are servers): a server missing one waits GATHER_S for it.
            chunks += [(len(prompts), len(prompts))] * (len(self.servers) - len(chunks))
        requests = [(self.servers[i], {"prompts": prompts[a:b], "sampling": settings, "prompt_offset": a})
                    for i, (a, b) in enumerate(chunks)]
        self.calls += 1
        if self.batch_tag is not None:  # every learner rank makes the same calls in the same order
            for _, body in requests:
                body["batch"] = {"key": f"{self.batch_tag}#{self.calls}", "of": self.world}
        replies = self._fan_out("/generate", requests)
        lost = [i for i, ((server, _), reply) in enumerate(zip(requests, replies, strict=True))
                if not self._holds_ours(server, reply)]
        if lost and all(self._recover(server, "/generate", reply)
                        for server, reply in {requests[i][0]: replies[i] for i in lost}.items()):
            for i, reply in zip(lost, self._fan_out("/generate", [requests[i] for i in lost]), strict=True):
                replies[i] = reply  # checked below: a second mismatch stops the run
        samples: list[Sample] = []
        for (start, end), (server, _), reply in zip(chunks, requests, replies, strict=True):
            self._check_weights(server, "/generate", reply)
            part = [Sample(**{**s, "prompt_index": s["prompt_index"] + start}) for s in reply["samples"]]
            if len(part) != (end - start) * sampling.n:
                raise RolloutServerError(f"rollout server returned {len(part)} samples for {end - start} prompts "
                                         f"x {sampling.n}")
            samples += part
        return samples

    def sleep(self) -> None:
        """Nothing to free here: the servers' GPUs are their own."""

    def wake(self) -> None:
        """See `sleep`."""

    def close(self) -> None:
        for folder in self.sync_folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.sync_folders = []
        for folder in (self._temp_dir, self._sync_dir_default()):
            if folder is not None:
                # Only when empty; under torchrun every rank closes, and another may have removed it first.
                with contextlib.suppress(OSError):
                    folder.rmdir()
        if self._nccl is not None and not self._nccl_broken:
            try:
                self._post_all("/shutdown_weight_transfer_engine", {})
            except RolloutServerError:
                pass  # the servers are going away too; nothing left to release
            self._nccl.shutdown()
        self._nccl = None

    # ------------------------------------------------------------------ servers
    def health(self) -> list[dict[str, Any]]:
        return self._post_all("/health", None, method="GET")

    def wait_until_ready(self) -> list[dict[str, Any]]:
        """Every server's /health once all report ready; waits up to the time-out for them to come up."""
        deadline = time.monotonic() + self.timeout
        info: dict[Server, dict[str, Any]] = {}
        last: dict[Server, str] = {}
        while True:
            for server in self.servers:
                if server in info:
                    continue
                try:
                    reply = call(server, "GET", "/health", None, min(10.0, max(0.5, deadline - time.monotonic())))
                except RolloutServerError as e:
                    if server not in last and os.environ.get("RANK", "0") == "0":  # not silent for the whole wait
                        log.warning("waiting up to %g s (rollout.server_timeout_s) for rollout server %s (%s): start "
                                    "it with `grpo rollout-server`, or fix rollout.servers", self.timeout, server,
                                    getattr(e, "what", e))
                    last[server] = getattr(e, "what", str(e))
                    continue
                if reply.get("authorized") is False:
                    raise UserError(str(_failure(server, "/health", *_token_advice())))
                if reply.get("status") == "ready":
                    info[server] = reply
                else:
                    last[server] = "still loading the model"
            if len(info) == len(set(self.servers)):
                return [info[s] for s in self.servers]
            if time.monotonic() >= deadline:
                missing = [s for s in self.servers if s not in info]
                raise RolloutServerError(
                    f"rollout server {missing[0]} was not ready within {self.timeout:g} s (last try: "
                    f"{last[missing[0]]})"
                    + (f", nor {len(missing) - 1} other(s)" if len(missing) > 1 else "")
                    + f": start it with `grpo rollout-server ... --host {missing[0].host} --port {missing[0].port}`, "
                    "or fix rollout.servers / raise rollout.server_timeout_s")
            time.sleep(0.5)

    def load_weights(self, folder: Path, version: int) -> None:
        """Every server loads the safetensors in `folder` (a path they share with this process)."""
        folder = Path(folder).resolve()
        replies = self._post_all("/load_weights", {"path": str(folder), "version": version})
        self.weights_version = version
        self.last_push = (folder, version)
        self.took_weights(replies)

    def took_weights(self, replies: list[dict[str, Any]]) -> None:
        """Record the weights each server holds after a push (its reply's weights_id)."""
        self.weights_ids = {s: str(r.get("weights_id")) for s, r in zip(self.servers, replies, strict=True)}

    def _holds_ours(self, server: Server, reply: dict[str, Any]) -> bool:
        return str(reply.get("weights_id")) == self.weights_ids.get(server)

    def _recover(self, server: Server, path: str, reply: dict[str, Any]) -> bool:
        """Give a server that answered `path` with other weights (`reply`) this run's again, if it only
        restarted: file sync, this process the only pusher, its /health showing a new boot_id, base
        weights (version 0, the id of `reply`: nobody pushed since) and the model it hosted at start-up.
        Then the last push's folder is loaded into it again (before any push, the base weights are the
        run's own, if they were at start-up). False when any of that fails: the caller stops the run."""
        if self.sync_method != "file" or self.world > 1:  # under torchrun only rank 0 knows the last push
            return False
        before = self.info[self.servers.index(server)]
        try:
            health = call(server, "GET", "/health", None, self.timeout)
        except RolloutServerError:
            return False
        restarted = (health.get("status") == "ready" and health.get("boot_id") not in (None, before.get("boot_id"))
                     and _version(health.get("weights_version")) == 0
                     and str(health.get("weights_id")) == str(reply.get("weights_id"))
                     and all(health.get(key) == before.get(key) for key in _SAME_AFTER_RESTART))
        if not restarted:
            return False
        if self.last_push is None:
            if _version(before.get("weights_version")) != 0:  # it held other weights at start-up
                return False
            weights_id, what = str(health.get("weights_id")), "its base weights are this run's (nothing pushed yet)"
        else:
            folder, version = self.last_push
            if not folder.is_dir():
                return False
            try:
                loaded = call(server, "POST", "/load_weights", {"path": str(folder), "version": version}, self.timeout)
            except RolloutServerError as e:
                log.warning("rollout server %s restarted; loading this run's weights into it again failed: %s", server, e)
                return False
            weights_id, what = str(loaded.get("weights_id")), f"loaded this run's weights version {version} again"
        log.warning("rollout server %s restarted (back on its base weights): %s; sending %s again", server, what, path)
        self.weights_ids[server] = weights_id
        self.info = [health if s == server else i for s, i in zip(self.servers, self.info, strict=True)]
        return True

    def _check_weights(self, server: Server, path: str, reply: dict[str, Any]) -> None:
        if not self._holds_ours(server, reply):
            raise RolloutServerError(
                f"rollout server {server} answered {path} with other weights (version {reply.get('weights_version')}) "
                f"than this run's version {self.weights_version}: it restarted, or another trainer pushed to it. "
                "Serve one run per server; resume the run (grpo train resume=RUN_DIR) to push its weights again")

    def prompt_logprobs(self, prompt_ids: list[int], completion_ids: list[int], temperature: float = 1.0,
                        server: int = 0) -> list[float]:
        """The completion tokens' log-probs under server `server`'s current weights (checks a sync;
        `VLLMEngine.prompt_logprobs` on that server)."""
        body = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "temperature": temperature}
        reply = call(self.servers[server], "POST", "/logprobs", body, self.timeout)
        if not self._holds_ours(self.servers[server], reply) and self._recover(self.servers[server], "/logprobs", reply):
            reply = call(self.servers[server], "POST", "/logprobs", body, self.timeout)
        self._check_weights(self.servers[server], "/logprobs", reply)
        return reply["logprobs"]

    def sync_dir(self) -> Path:
        """rollout.sync_dir, else <run dir>/weight-sync, else a temporary folder (one machine only)."""
        folder = self._sync_dir or self._sync_dir_default()
        if folder is None:
            if self._temp_dir is None:
                self._temp_dir = Path(tempfile.mkdtemp(prefix="grpo-weight-sync-"))
            folder = self._temp_dir
        return folder

    def _sync_dir_default(self) -> Path | None:
        return self._run_dir / "weight-sync" if self._run_dir is not None else None

    def _post_all(self, path: str, body: dict[str, Any] | None, method: str = "POST") -> list[dict[str, Any]]:
        return self._fan_out(path, [(s, body) for s in self.servers], method)

    def _fan_out(self, path: str, requests: list[tuple[Server, dict[str, Any] | None]],
                 method: str = "POST") -> list[dict[str, Any]]:
        """The requests sent at once, one thread each; the replies in order, or the first failure."""
        if len(requests) == 1:
            server, body = requests[0]
            return [call(server, method, path, body, self.timeout)]
        pool = ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="rollout-server")
        try:
            futures = [pool.submit(call, server, method, path, body, self.timeout) for server, body in requests]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # a failure is reported without waiting for the rest

    # ------------------------------------------------------------------ NCCL (GPU)
    def broadcast_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        """Send the weights from this process's GPU to every server's workers with vLLM's NCCL weight
        transfer: packed into GPU buffers of `bucket_bytes`, two in flight, loaded by each worker inside
        vLLM's layerwise reload (so fused q/k/v and gate/up are always completed). The first call forms
        the NCCL group (this process rank 0, then each server's workers). Waits at most the time-out."""
        import torch

        if not torch.cuda.is_available():
            raise UserError("rollout.sync_method=nccl needs the learner on a CUDA GPU; use rollout.sync_method=file")
        if self._nccl_broken:
            raise RolloutServerError("the NCCL weight-sync group broke in an earlier push; restart the servers")
        # vLLM's sender needs every name and shape before the first byte, so the whole model is read
        # first: staged in host memory in the servers' dtype (GPU memory holds only the packed buffers).
        pairs = [(name, t.detach().to(dtype=self.dtype).to("cpu")) for name, t in named_tensors]
        names = {name for name, _ in pairs}
        if self.tied and "lm_head.weight" not in names:  # as push_weights: the output layer is the embedding
            pairs += [("lm_head.weight", t) for name, t in pairs if name.endswith("embed_tokens.weight")][:1]
        source = _PairsSource(pairs, self.dtype)
        version = self.weights_version + 1
        if self._nccl is None:
            self._nccl = self._run_with_timeout("forming the NCCL weight-sync group",
                                                lambda: self._init_nccl(source, bucket_bytes))
        self._nccl.source = source
        self._nccl.client.version = version
        self._run_with_timeout("the NCCL weight broadcast", self._nccl.send_weights)
        self.weights_version = version

    def _init_nccl(self, source: Any, bucket_bytes: int) -> Any:
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )

        world_sizes = [int(i.get("world_size", 1)) for i in self.info]
        address = _local_address_towards(self.servers[0])
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a free port for the rendezvous store
            s.bind((address, 0))
            port = s.getsockname()[1]
        init_info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=1 + sum(world_sizes),
                                        rank=0, packed=True, packed_buffer_size_bytes=bucket_bytes,
                                        packed_num_buffers=2)
        client = _FanOutSyncClient(self, world_sizes)
        return NCCLTrainerWeightTransferEngine.trainer_init(init_info, client=client, source=source)

    def _run_with_timeout(self, what: str, fn: Callable[[], Any]) -> Any:
        """NCCL calls cannot be interrupted: run `fn` in a daemon thread and stop waiting after the
        time-out (the group is then unusable: later pushes fail at once)."""
        import torch

        result: dict[str, Any] = {}
        device = torch.cuda.current_device()  # a new thread starts on device 0

        def target() -> None:
            try:
                torch.cuda.set_device(device)
                result["value"] = fn()
            except BaseException as e:  # handed to the waiting thread
                result["error"] = e

        thread = threading.Thread(target=target, name="nccl-weight-sync", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if thread.is_alive() or "error" in result:
            self._nccl_broken = True
        if thread.is_alive():
            raise RolloutServerError(
                f"{what} with rollout servers {', '.join(map(str, self.servers))} did not finish within "
                f"{self.timeout:g} s: is every server alive, and can each reach this machine's NCCL port? "
                "(rollout.server_timeout_s)")
        if "error" in result:
            error = result["error"]
            if isinstance(error, RolloutServerError):
                raise error
            raise RolloutServerError(f"{what} with rollout servers {', '.join(map(str, self.servers))} failed: "
                                     f"{type(error).__name__}: {error}") from error
        return result.get("value")


class _FanOutSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over all servers at once: the same calls as its own
    `HTTPVLLMWeightSyncClient`, but to every server concurrently (their workers meet in the same NCCL
    calls), each server's workers taking the NCCL ranks after the previous server's."""

    def __init__(self, engine: VLLMServerEngine, world_sizes: list[int]) -> None:
        self.engine, self.world_sizes = engine, world_sizes
        self.version: int | None = None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offset, requests = int(init_info["rank_offset"]), []
        for server, size in zip(self.engine.servers, self.world_sizes, strict=True):
            requests.append((server, {"init_info": {**init_info, "rank_offset": offset}}))
            offset += size
        self.engine._fan_out("/init_weight_transfer_engine", requests)

    def start_weight_update(self) -> None:
        self.engine._post_all("/start_weight_update", {})

    def update_weights(self, update_info: Any) -> None:
        self.engine._post_all("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.version
        replies = self.engine._post_all("/finish_weight_update",
                                        {"weight_version": None if version is None else str(version)})
        self.engine.took_weights(replies)

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine._post_all("/shutdown_weight_transfer_engine", {})


class _PairsSource:
    """A vLLM `WeightSource` (structurally: metadata() and iteration) over (name, tensor) pairs this
    process holds whole; each tensor goes to the GPU in the servers' dtype as the broadcast reaches it."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        self.pairs, self.dtype = pairs, dtype

    def metadata(self) -> list[Any]:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, self.dtype, tuple(t.shape)) for name, t in self.pairs]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self.pairs:
            yield name, t.to(device="cuda", dtype=self.dtype).contiguous()


def _local_address_towards(server: Server) -> str:
    """This machine's address on the route to `server` (what the servers' workers dial for NCCL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((server.host, server.port))  # UDP: no packet is sent
        return s.getsockname()[0]


def _version(value: Any) -> int:
    return int(value) if str(value).isdigit() else 0


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RolloutServerError(f"rollout server reported an unknown dtype '{name}'")
    return dtype
