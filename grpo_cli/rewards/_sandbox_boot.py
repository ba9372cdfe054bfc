"""Sandbox bootstrap: the first code run in the sandbox process
(`python -I -B -c <this file> LABEL SPEC_FD VALUES_FD`).

In the sandbox it runs as the main script. In order it:
1. reads the spec (limits, program, steps, bindings) from SPEC_FD and closes it, so the
   untrusted code cannot read it;
2. lowers its own resource limits (soft = hard, so they cannot be raised again): address
   space, CPU seconds, file size (caps stdout too), open files, no core dumps, processes;
3. disables process creation (fork/exec/spawn/system, subprocess), signals to other
   processes, sockets and DNS, and blocks `ctypes` imports;
4. execs the program with fresh globals (as __main__), then the steps in the same globals:
   statements to exec, and expressions or calls whose values it writes to VALUES_FD, one
   JSON line `[k, value]` (or `[k]` when that step failed) per value step, in order.
Step 3 is a Python-level guard against accidental or naive misuse; the hard guarantees come
from the OS (limits, process-group kill, namespaces, another uid) set up by the parent.

Nothing here decides whether a test passed: the program shares this interpreter and could
fake any verdict made in it. It only reports values, as plain data (`encode_value`), and
the trainer compares them with expected values the sandbox never sees. The trainer imports
this module for `encode_value` / `decode_value` only.
"""

import builtins
import json
import operator
import os
import resource
import sys
import traceback


def _limit(which, value):
    if value is None:
        return
    resource.setrlimit(which, (value, value))


def _blocked(*args, **kwargs):
    raise PermissionError("operation not permitted in the sandbox")


_PROCESS_CALLS = (
    "fork", "forkpty", "vfork", "system", "popen", "posix_spawn", "posix_spawnp",
    "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "kill", "killpg", "setsid", "setpgid", "setpgrp", "unshare", "setns", "pidfd_open",
)
# socket classes are replaced by subclasses that cannot be instantiated (see _lock_down), so
# library code that subclasses them (ssl, asyncio) still imports. socketpair() stays allowed:
# it only makes a connected local pair (asyncio's event loop needs one).
_SOCKET_CALLS = (
    "fromfd", "create_connection", "create_server", "getaddrinfo", "gethostbyname",
    "gethostbyname_ex", "gethostbyaddr", "getnameinfo", "dup",
)
# ctypes can make any system call. The patched modules are denied too, so deleting one from
# sys.modules and importing it again does not bring back the original functions.
_DENIED_IMPORTS = frozenset({"ctypes", "_ctypes", "posix", "_posixsubprocess", "_socket"})


class _DenyImports:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _DENIED_IMPORTS:
            raise ImportError(f"import of {name!r} is not permitted in the sandbox")
        return None


def _uncreatable(base):
    """A subclass of socket class `base` that only wraps existing descriptors (as socketpair
    does) and refuses to create sockets."""

    def __new__(cls, *args, **kwargs):
        if kwargs.get("fileno") is None and len(args) < 4:
            raise PermissionError("network access is not permitted in the sandbox")
        return base.__new__(cls, *args, **kwargs)

    return type("socket", (base,), {"__new__": __new__, "__slots__": ()})


def _lock_down():
    import _posixsubprocess
    import _socket
    import posix
    import socket

    for module in (os, posix):
        for name in _PROCESS_CALLS:
            if hasattr(module, name):
                setattr(module, name, _blocked)
    _posixsubprocess.fork_exec = _blocked
    for module in (socket, _socket):
        for name in _SOCKET_CALLS:
            if hasattr(module, name):
                setattr(module, name, _blocked)

    socket.socket = socket.SocketType = _uncreatable(socket.socket)
    _socket.socket = _socket.SocketType = _uncreatable(_socket.socket)
    sys.modules.pop("ctypes", None)
    sys.modules.pop("_ctypes", None)
    sys.meta_path.insert(0, _DenyImports)


# ----------------------------------------------------------------------------- plain values

_MAX_DEPTH = 100


def encode_value(value, depth=0):
    """`value` as JSON-able tagged data, e.g. (1, "a") -> ["t", [["i", "1"], ["s", "a"]]].
    Only plain data: None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset
    (subclasses are read through the base type, so their overrides play no part; integers
    of other types through __index__). Anything else raises TypeError."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None:
        return ["n"]
    if value is True or value is False:
        return ["b", value]
    if isinstance(value, int):
        return ["i", int.__repr__(value)]
    if isinstance(value, float):
        return ["f", float.__repr__(value)]
    if isinstance(value, str):
        return ["s", str.__str__(value)]
    if isinstance(value, bytes):
        return ["y", bytes.hex(value)]
    for base, tag in ((list, "l"), (tuple, "t"), (set, "S"), (frozenset, "F")):
        if isinstance(value, base):
            return [tag, [encode_value(item, depth + 1) for item in base.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in dict.items(value)]]
    if hasattr(type(value), "__index__"):  # numpy integers
        return ["i", int.__repr__(operator.index(value))]
    raise TypeError(f"{type(value).__name__} is not plain data")


_SCALARS = {"n": lambda x: None, "b": bool, "i": int, "f": float, "s": str, "y": bytes.fromhex}
_SCALAR_TYPES = {"n": type(None), "b": bool, "i": str, "f": str, "s": str, "y": str}
_CONTAINERS = {"l": list, "t": tuple, "S": set, "F": frozenset}
# Python's int and float hashes are not seeded: ints congruent mod 2**61 - 1 all share one,
# so a set or dict of ~30k of them (1 MB) costs seconds of the trainer's time, quadratic in
# the output limit. Honest values never have this many distinct keys sharing a hash.
_MAX_SHARED_HASH = 32


def _spread(keys):
    """`keys` as a list; raises ValueError when too many of them share one hash."""
    keys, seen = list(keys), {}
    for key in keys:
        h = hash(key)
        seen[h] = seen.get(h, 0) + 1
        if seen[h] > _MAX_SHARED_HASH:
            raise ValueError("malformed value: too many keys with the same hash")
    return keys


def decode_value(data, depth=0):
    """The inverse of `encode_value`; builds only plain Python objects. Raises ValueError
    (or TypeError) on anything malformed: the trainer decodes what a hostile program wrote."""
    if depth > _MAX_DEPTH or not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise ValueError("malformed value")
    tag = data[0]
    if tag == "n" and len(data) == 1:
        return None
    if len(data) != 2:
        raise ValueError("malformed value")
    if tag in _SCALARS and isinstance(data[1], _SCALAR_TYPES[tag]):
        return _SCALARS[tag](data[1])
    if tag in _CONTAINERS and isinstance(data[1], list):
        items = [decode_value(item, depth + 1) for item in data[1]]
        return _CONTAINERS[tag](_spread(items) if tag in ("S", "F") else items)
    if tag == "d" and isinstance(data[1], list):
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in data[1]):
            raise ValueError("malformed value")
        pairs = [(decode_value(k, depth + 1), decode_value(v, depth + 1)) for k, v in data[1]]
        _spread(key for key, _ in pairs)
        return dict(pairs)
    raise ValueError("malformed value")


# ----------------------------------------------------------------------------- running


def _run(source, filename, namespace):
    """Exec `source`; returns an exit status (0 ok, SystemExit's code, 1 on an exception)."""
    try:
        exec(compile(source, filename, "exec"), namespace)
        return 0
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report any failure of the untrusted code
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001 - e.g. stderr closed by the program
            pass
        return 1


def _value(step, namespace):
    """The value of one value step: {"eval": expression} or {"call": name, "args": [...]}
    (APPS call-based tests: a method of `Solution` when the program defines that class)."""
    if "eval" in step:
        return eval(compile(step["eval"], "<test>", "eval"), namespace)
    name, target = step["call"], namespace.get("Solution")
    function = getattr(target(), name) if isinstance(target, type) and hasattr(target, name) else namespace[name]
    return function(*step["args"])


def main():
    spec_fd, values_fd = int(sys.argv[2]), int(sys.argv[3])
    with os.fdopen(spec_fd, encoding="utf-8") as f:
        spec = json.load(f)
    write, dumps = os.write, json.dumps
    room = [spec["fsize_bytes"]]  # an over-long record would be cut by RLIMIT_FSIZE

    def report(k, value, failed):
        line = dumps([k] if failed else [k, value]) + "\n"
        if len(line) > room[0]:
            line = dumps([k]) + "\n"
        data = line.encode()
        room[0] -= len(data)
        write(values_fd, data)

    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_AS, spec.get("memory_bytes"))
    _limit(resource.RLIMIT_CPU, spec.get("cpu_seconds"))
    _limit(resource.RLIMIT_FSIZE, spec.get("fsize_bytes"))
    _limit(resource.RLIMIT_NOFILE, spec.get("max_open_files"))
    _limit(resource.RLIMIT_NPROC, spec.get("max_processes"))
    _lock_down()

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name, data in spec.get("bindings", {}).items():
        namespace[name] = decode_value(data)
    source, steps = spec["source"], spec["steps"]
    del spec
    status = _run(source, "solution.py", namespace)
    k = 0
    for step in steps:
        if "exec" in step:
            _run(step["exec"], "<test setup>", namespace)
            continue
        try:
            value, failed = encode_value(_value(step, namespace)), False
        except BaseException:  # noqa: BLE001 - a failing step fails that test only
            value, failed = None, True
        try:
            report(k, value, failed)
        except BaseException:  # noqa: BLE001 - e.g. the program closed the descriptor
            pass
        k += 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
