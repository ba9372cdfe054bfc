"""Run untrusted Python (model-written programs) in a separate, limited process.

Layers, from strongest to weakest:
* a separate `python -I -B` process (isolated mode: no PYTHON* variables, no user site, no
  script dir on sys.path) with a minimal fresh environment, in a fresh temporary working
  directory that is deleted afterwards;
* where it works here (probed once): Linux namespaces via `unshare --user --net --pid
  --fork --kill-child` (no network but loopback-down, no capabilities, own PID namespace so
  every process it starts dies with it), and, when the trainer runs as root and the
  interpreter is reachable, the uid/gid of `nobody`;
* a wall-clock limit: on expiry the whole process group (its own session) is SIGKILLed;
* rlimits set by the sandbox process on itself before any untrusted code runs (`_sandbox_boot`):
  address space, CPU time, file size (also caps stdout, which goes to a file), open files,
  process count (Linux does not enforce it for root, even inside the user namespace);
* the bootstrap's Python-level guards: fork/exec/subprocess, signals, sockets, DNS, ctypes.
  Deliberately hostile code can get around these (they live in its own interpreter).
Not isolated: the filesystem. The program can read what the trainer's user can read and write
where it can write (as `nobody` only world-accessible paths), and if it gets past the Python
guard it can reach filesystem Unix sockets, which a network namespace does not cover.
Results come back as plain values on a descriptor of their own; the sandbox never judges
a test (see `_sandbox_boot`). Limits are set by the child itself, not in `preexec_fn`,
which is unsafe when the trainer has threads (the code reward runs sandboxes from a pool).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._sandbox_boot import decode_value, encode_value

logger = logging.getLogger(__name__)

_BOOT_SOURCE = Path(__file__).with_name("_sandbox_boot.py")
_NS_FLAGS = ("--net", "--pid", "--fork", "--kill-child")


@dataclass(frozen=True)
class SandboxLimits:
    timeout: float = 5.0  # wall-clock seconds per run
    memory_mb: int = 1024  # RLIMIT_AS
    max_output_bytes: int = 1 << 20  # RLIMIT_FSIZE: stdout, reported values and any file written
    max_processes: int = 16  # RLIMIT_NPROC (threads count too)
    max_open_files: int = 64

    def __post_init__(self) -> None:
        # Finite: the CPU-time rlimit is derived from it.
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not 0 < self.timeout < math.inf:
            raise ValueError(f"timeout must be a positive finite number of seconds, got {self.timeout!r}")
        for name in ("memory_mb", "max_output_bytes", "max_processes", "max_open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


NO_VALUE = type("NoValue", (), {"__repr__": lambda self: "NO_VALUE"})()
"""Stands in `SandboxResult.values` for a step that failed, never ran, or was not reported."""


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed at the time limit
    timed_out: bool
    stdout: str
    stderr: str
    values: list[Any] = field(default_factory=list)  # one per value step, in order; NO_VALUE if none


@dataclass(frozen=True)
class Isolation:
    prefix: tuple[str, ...] = ()  # e.g. the unshare command
    uid: int | None = None
    gid: int | None = None

    def describe(self) -> str:
        user = "as nobody" if self.uid is not None else f"as uid {os.geteuid()}"
        return f"{' '.join(self.prefix) or 'no namespaces'}, {user}"


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _wait_exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for `proc` to exit without reaping it: a zombie leader keeps its pid (= the
    process-group id) reserved, so the killpg that follows can never hit a recycled pid."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _read_values(path: Path, count: int, limit: int) -> list[Any]:
    """The values the sandbox reported: complete lines `[k, value]` / `[k]` with k = 0, 1, ...
    in order. Anything else (the program writing to the descriptor itself) voids them all."""
    values = [NO_VALUE] * count
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return values
    lines = data.split(b"\n")[:-1]  # the last piece is empty or a line cut by a kill
    if len(lines) > count:
        return [NO_VALUE] * count
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, list) or record[:1] != [k] or len(record) > 2:
                raise ValueError("out of order")
            if len(record) == 2:
                values[k] = decode_value(record[1])
        except (ValueError, TypeError, RecursionError):
            return [NO_VALUE] * count
    return values


def _run(source: str, stdin: str, steps: Sequence[Mapping[str, Any]], bindings: Mapping[str, Any],
         limits: SandboxLimits, isolation: Isolation) -> SandboxResult:
    tmp = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))  # 0700: the sandbox's uid cannot look in
    try:
        work = tmp / "work"  # its working directory where /tmp is not private
        work.mkdir()
        if isolation.uid is not None:
            os.chown(work, isolation.uid, isolation.gid)
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({
            "source": source,
            "steps": list(steps),
            "bindings": {name: encode_value(value) for name, value in bindings.items()},
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "cpu_seconds": int(limits.timeout) + 1,
            "fsize_bytes": limits.max_output_bytes,
            "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes,
        }), encoding="utf-8", errors="surrogatepass")
        (tmp / "stdin.txt").write_text(stdin, encoding="utf-8", errors="surrogatepass")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        cmd = list(isolation.prefix)
        user_kwargs = {}
        if isolation.uid is not None:
            user_kwargs = {"user": isolation.uid, "group": isolation.gid, "extra_groups": []}
        with open(tmp / "stdin.txt", "rb") as fin, open(tmp / "stdout.txt", "wb") as fout, \
                open(tmp / "stderr.txt", "wb") as ferr, open(spec, "rb") as fspec, \
                open(tmp / "values.jsonl", "wb") as fvalues:
            # The work dir's name in the command line lets tests find escaped processes.
            cmd += [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOT_SOURCE.read_text(encoding="utf-8"),
                    str(work), str(fspec.fileno()), str(fvalues.fileno())]
            proc = subprocess.Popen(cmd, cwd=work, stdin=fin, stdout=fout, stderr=ferr, env=env,
                                    close_fds=True, pass_fds=(fspec.fileno(), fvalues.fileno()),
                                    start_new_session=True, **user_kwargs)
        try:
            exited = _wait_exited(proc, limits.timeout)
        finally:
            # Also on normal exit: anything the program managed to start dies with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        count = sum(1 for step in steps if "exec" not in step)
        return SandboxResult(
            returncode=proc.returncode if exited else None,
            timed_out=not exited,
            stdout=_tail(tmp / "stdout.txt", limits.max_output_bytes),
            stderr=_tail(tmp / "stderr.txt", 64 * 1024),
            values=_read_values(tmp / "values.jsonl", count, limits.max_output_bytes),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _candidates() -> list[Isolation]:
    unshare = shutil.which("unshare")
    users: list[tuple[int | None, int | None]] = []
    if os.geteuid() == 0:
        try:
            nobody = pwd.getpwnam("nobody")
            users.append((nobody.pw_uid, nobody.pw_gid))
        except KeyError:
            pass
    users.append((None, None))
    out = []
    for uid, gid in users:
        if unshare:
            out.append(Isolation((unshare, "--user", *_NS_FLAGS, "--"), uid, gid))
            if uid is None and os.geteuid() == 0:
                out.append(Isolation((unshare, *_NS_FLAGS, "--"), uid, gid))
        out.append(Isolation((), uid, gid))
    return out


_isolation_lock = threading.Lock()


@functools.cache
def _probe() -> Isolation:
    limits = SandboxLimits(timeout=20.0)
    for candidate in _candidates():
        try:
            result = _run("print('ok')", "", [], {}, limits, candidate)
        except OSError as exc:
            logger.debug("sandbox isolation %s unavailable: %s", candidate.describe(), exc)
            continue
        if result.returncode == 0 and result.stdout.strip() == "ok":
            logger.info("code sandbox isolation: %s", candidate.describe())
            return candidate
        logger.debug("sandbox isolation %s failed: %s", candidate.describe(), result.stderr[-500:])
    raise RuntimeError("cannot start a sandboxed Python process")


def isolation() -> Isolation:
    """The strongest isolation that works on this machine (probed once per process)."""
    with _isolation_lock:
        return _probe()


def run_python(source: str, *, stdin: str = "", steps: Sequence[Mapping[str, Any]] = (),
               bindings: Mapping[str, Any] | None = None,
               limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as __main__ in the sandbox with `stdin` as standard input and the plain
    values `bindings` as globals, then `steps` in its globals, in order: {"exec": statement}
    (its failure ignored) or {"eval": expression}, which adds its value (plain data only,
    else NO_VALUE) to `values`. Never raises for anything the program does."""
    return _run(source, stdin, steps, bindings or {}, limits, isolation())
