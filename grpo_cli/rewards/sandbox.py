"""Run untrusted Python (model-written programs) in a separate, limited process.

Layers, from strongest to weakest; the strongest set that works here is probed once per
process and logged, and a warning says once which layers are missing and how to get them:
* a separate `python -I -B` process (isolated mode: no PYTHON* variables, no user site, no
  script dir on sys.path) with a minimal fresh environment;
* Linux namespaces via `unshare`: network (no network, loopback down, abstract Unix sockets
  cut off), PID (every process the program starts dies with it; /proc shows only its own),
  IPC (System V shared memory and queues it makes die with it, not left in the host's RAM)
  and mount: every mount read-only, so it can neither change the trainer's files (run dir,
  checkpoints, code) nor fill a disk, and fresh small tmpfs on /tmp, /var/tmp and /dev/shm,
  so Unix sockets and files other users left there are out of reach and whatever it writes
  vanishes with it;
* another uid. A root trainer runs the program as `nobody`, without capabilities, in a user
  namespace of its own: trainer files are read-only to it and the process limit applies
  to it alone (Linux never applies RLIMIT_NPROC to root). `nobody` cannot run an
  interpreter under /root (pyenv, conda), so the system's python3 (same version first) is
  used then: programs see the standard library, not the trainer's packages. A non-root
  trainer maps itself to root in a user namespace with no capabilities: the program can
  read whatever the trainer's user can read (there is no other uid to drop to);
* a wall-clock limit: on expiry the whole process group (its own session) is SIGKILLed;
* rlimits set by the sandbox process on itself before any untrusted code runs (`_sandbox_boot`):
  address space, CPU time, file size (also caps stdout, which goes to a file), open files,
  process count. Where the program must run as root, a pids cgroup (v1, if writable)
  bounds its processes instead. The address-space limit is per process, so a root trainer
  also puts the sandbox in a memory cgroup (v1, if writable) capping all its processes
  together: elsewhere a program that gets around the guards below can hold up to
  memory_mb per process it makes;
* the bootstrap's Python-level guards: fork/exec/subprocess, signals, sockets, DNS, ctypes.
  Deliberately hostile code can get around these (they live in its own interpreter).
Not isolated: the rest of the filesystem is readable as that uid (world-readable files;
everything, where the program runs as root), and filesystem Unix sockets outside the
private temporary directories stay reachable if their permissions allow that uid.
Results come back as plain values on a descriptor of their own; the sandbox never judges
a test (see `_sandbox_boot`). Limits are set by the child itself, not in `preexec_fn`,
which is unsafe when the trainer has threads (the code reward runs sandboxes from a pool).
"""

from __future__ import annotations

import functools
import itertools
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
_NS_FLAGS = ("--net", "--ipc", "--pid", "--fork", "--kill-child")
_PRIVATE_TMP_FLAGS = ("--mount", "--propagation", "private", "--mount-proc")
# Runs as root in the new mount namespace: every writable mount read-only, so the program
# cannot change the trainer's files or fill its disks, then private tmpfs dirs, then the
# interpreter ("$@"), as $1:$2 when given (else as is), with no capabilities. A root trainer
# adds a user namespace last, owned by that uid, so the process-count limit counts this
# sandbox only. Skipped (each remount costs a few ms): its own /proc, /sys (only root can
# write there) and the dirs the tmpfs hides. mountinfo escapes spaces as \040: printf %b.
_SETUP_SCRIPT = r"""set -e
uid=$1 gid=$2 size=$3 setpriv=$4 unshare=$5; shift 5
while read -r _ _ _ _ point options _; do
    case "$point" in /proc|/proc/*|/sys|/sys/*|/tmp|/tmp/*|/var/tmp|/var/tmp/*|/dev/shm|/dev/shm/*) continue;; esac
    case ",$options," in *,ro,*) continue;; esac
    case "$point" in *\\*) point=$(printf '%b' "$point");; esac
    mount -o remount,bind,ro "$point"
done < /proc/self/mountinfo
for dir in /tmp /var/tmp /dev/shm; do
    if [ -d "$dir" ]; then mount -t tmpfs -o "mode=1777,nosuid,nodev,size=$size,nr_inodes=4096" grpo-sandbox "$dir"; fi
done
cd /tmp
unset OLDPWD PWD
if [ -n "$uid" ]; then
    exec "$setpriv" --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- "$unshare" --user -- "$@"
fi
exec "$setpriv" --inh-caps=-all --bounding-set=-all --no-new-privs -- "$@"
"""
_CGROUP_PIDS = Path("/sys/fs/cgroup/pids")
_PROCESS_OVERHEAD = 4  # unshare, its forked child, a shell: in the cgroup besides the program
_CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
_MEMORY_OVERHEAD_MB = 64  # those processes, and its output files cached on its account


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
    """How sandboxes start here: `prefix` runs before the interpreter `python`; `uid`/`gid`
    are set by Popen itself (the fallback without a mount namespace)."""

    prefix: tuple[str, ...] = ()
    python: str = sys.executable
    uid: int | None = None
    gid: int | None = None
    net_namespace: bool = False
    pid_namespace: bool = False
    private_tmp: bool = False
    non_root: bool = True  # the program does not run as (the host's) root

    def describe(self) -> str:
        layers = [name for name, on in (("network", self.net_namespace), ("PID", self.pid_namespace),
                                        ("mount: read-only, private /tmp", self.private_tmp)) if on]
        who = "not as root" if self.non_root else "as root"
        return f"namespaces: {', '.join(layers) or 'none'}; {who}; interpreter {self.python}"

    def missing(self) -> list[str]:
        """The protections this isolation lacks, each with its consequence."""
        out = []
        if not self.non_root:
            out.append("the program runs as root: it can write any file root can, and the "
                       "process limit is not enforced (a pids cgroup bounds it only where one is writable)")
        if not self.net_namespace:
            out.append("no network namespace: only the Python-level guard stands between it and the network")
        if not self.pid_namespace:
            out.append("no PID or IPC namespace: processes that leave its process group outlive it, "
                       "and so does System V shared memory it makes")
        if not self.private_tmp:
            out.append("no mount namespace: it can write wherever its uid may, and reach Unix sockets "
                       "and files in /tmp")
        return out


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


_cgroup_ids = itertools.count()


def _cgroup(root: Path, name: str, value: int) -> Path | None:
    """A fresh cgroup (v1) under `root` with its file `name` set to `value`, where one can be made."""
    path = root / f"grpo-sandbox-{os.getpid()}-{next(_cgroup_ids)}"
    try:
        path.mkdir()
    except OSError:
        return None
    try:
        (path / name).write_text(str(value))
    except OSError:
        _remove_cgroup(path)
        return None
    return path


def _remove_cgroup(path: Path) -> None:
    # Killed processes leave the cgroup a moment after they are reaped.
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    logger.debug("could not remove sandbox cgroup %s", path)


def _run(source: str, stdin: str, steps: Sequence[Mapping[str, Any]], bindings: Mapping[str, Any],
         limits: SandboxLimits, isolation: Isolation) -> SandboxResult:
    tmp = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))  # 0700: the sandbox's uid cannot look in
    cgroups: list[Path] = []
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
        home = "/tmp" if isolation.private_tmp else str(work)
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        cmd = list(isolation.prefix)
        if isolation.private_tmp:
            cmd[cmd.index("{size}")] = str(max(limits.max_output_bytes * 4, 16 << 20))
        memory = _cgroup(_CGROUP_MEMORY, "memory.limit_in_bytes", (limits.memory_mb + _MEMORY_OVERHEAD_MB) << 20)
        pids = None if isolation.non_root else _cgroup(_CGROUP_PIDS, "pids.max",
                                                       limits.max_processes + _PROCESS_OVERHEAD)
        cgroups = [path for path in (memory, pids) if path is not None]
        if cgroups:
            cmd = ["/bin/sh", "-c", 'for g in $0; do echo $$ > "$g/cgroup.procs" || exit 1; done; exec "$@"',
                   " ".join(map(str, cgroups)), *cmd]
        user_kwargs = {}
        if isolation.uid is not None:
            user_kwargs = {"user": isolation.uid, "group": isolation.gid, "extra_groups": []}
        with open(tmp / "stdin.txt", "rb") as fin, open(tmp / "stdout.txt", "wb") as fout, \
                open(tmp / "stderr.txt", "wb") as ferr, open(spec, "rb") as fspec, \
                open(tmp / "values.jsonl", "wb") as fvalues:
            # The work dir's name in the command line lets tests find escaped processes.
            cmd += [isolation.python, "-I", "-B", "-X", "utf8", "-c", _BOOT_SOURCE.read_text(encoding="utf-8"),
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
        for path in cgroups:
            _remove_cgroup(path)
        shutil.rmtree(tmp, ignore_errors=True)


def _interpreters() -> list[str]:
    """This interpreter, then the system's python3 (same version first), for a uid that
    cannot reach this one (e.g. under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    found = [sys.executable]
    for name in (version, "python3"):
        path = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if path and os.path.realpath(path) not in map(os.path.realpath, found):
            found.append(path)
    return found


def _candidates() -> list[Isolation]:
    unshare, setpriv, mount = shutil.which("unshare"), shutil.which("setpriv"), shutil.which("mount")
    root = os.geteuid() == 0
    out: list[Isolation] = []
    ns = {"net_namespace": True, "pid_namespace": True}
    if unshare and setpriv and mount:
        if root:
            try:
                nobody = pwd.getpwnam("nobody")
                ids = (str(nobody.pw_uid), str(nobody.pw_gid))
            except KeyError:
                ids = None
            if ids:
                prefix = (unshare, *_PRIVATE_TMP_FLAGS, *_NS_FLAGS, "--", "/bin/sh", "-c", _SETUP_SCRIPT,
                          "sh", *ids, "{size}", setpriv, unshare)
                out += [Isolation(prefix, python, private_tmp=True, **ns) for python in _interpreters()]
        else:
            prefix = (unshare, "--user", "--map-root-user", *_PRIVATE_TMP_FLAGS, *_NS_FLAGS, "--",
                      "/bin/sh", "-c", _SETUP_SCRIPT, "sh", "", "", "{size}", setpriv, unshare)
            out.append(Isolation(prefix, private_tmp=True, **ns))
    if root:
        try:
            nobody = pwd.getpwnam("nobody")
            for python in _interpreters():
                if unshare:
                    out.append(Isolation((unshare, *_NS_FLAGS, "--"), python, nobody.pw_uid, nobody.pw_gid, **ns))
                out.append(Isolation((), python, nobody.pw_uid, nobody.pw_gid))
        except KeyError:
            pass
    if unshare:
        out.append(Isolation((unshare, "--user", *_NS_FLAGS, "--"), non_root=not root, **ns))
        if root:
            out.append(Isolation((unshare, *_NS_FLAGS, "--"), non_root=False, **ns))
    out.append(Isolation((), non_root=not root))
    return out


_isolation_lock = threading.Lock()


@functools.cache
def _probe() -> Isolation:
    limits = SandboxLimits(timeout=20.0)
    for candidate in _candidates():
        try:
            result = _run("import json, collections\nprint('ok')", "", [], {}, limits, candidate)
        except OSError as exc:
            logger.debug("sandbox isolation %s unavailable: %s", candidate.describe(), exc)
            continue
        if result.returncode == 0 and result.stdout.strip() == "ok":
            logger.info("code sandbox isolation: %s", candidate.describe())
            if candidate.missing():
                logger.warning(
                    "code sandbox: weaker isolation here (%s): %s. Run the trainer as a non-root user "
                    "(or as root with util-linux's unshare, setpriv and mount, user 'nobody' and a "
                    "python3 that user can run) where Linux namespaces are allowed to get them.",
                    candidate.describe(), "; ".join(candidate.missing()))
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
    (its failure ignored), {"eval": expression} or {"call": name, "args": [...]}; each of the
    last two adds its value (plain data only, else NO_VALUE) to `values`. Never raises for
    anything the program does."""
    return _run(source, stdin, steps, bindings or {}, limits, isolation())
