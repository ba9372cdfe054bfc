"""The code reward's sandbox: time, memory, process and network containment; the trainer survives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from grpo_cli.rewards import build_reward
from grpo_cli.rewards.sandbox import SandboxLimits, isolation, run_python

# ----------------------------------------------------------------------------- code sandbox

FAST = SandboxLimits(timeout=2.0, memory_mb=512)


def _children(pid: int) -> list[tuple[int, str]]:
    """Live descendants of `pid` as (pid, cmdline), read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                frontier.append(child)
                try:
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    cmd = ""
                found.append((child, cmd))
    return found


def _sandbox_leftovers() -> list[tuple[int, str]]:
    # The shared math-verify workers are expected children of the test process. A process that
    # escaped its parent (setsid, reparented to init) is found by the sandbox dir in its command.
    found = [c for c in _children(os.getpid()) if "_mathverify_worker" not in c[1]]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "grpo-sandbox-" in cmd:
                found.append((int(entry), cmd))
    return found


@pytest.fixture
def no_leftovers():
    tmp = Path(tempfile.gettempdir())
    dirs_before = set(tmp.glob("grpo-sandbox-*"))
    yield
    deadline = time.monotonic() + 2.0
    while _sandbox_leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandbox_leftovers() == []
    assert set(tmp.glob("grpo-sandbox-*")) <= dirs_before  # working dirs deleted


def _fenced(source: str) -> str:
    return f"<think>plan</think>\n```python\n{source}\n```"


IO_TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6"}]
ASSERT_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


@pytest.mark.parametrize("program, tests, expected", [
    ("a, b = map(int, input().split())\nprint(a + b)", IO_TESTS, 1.0),
    ("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b, end='  \\r\\n')", IO_TESTS, 1.0),
    ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", IO_TESTS, 0.5),  # half correct
    ("print(5)\nraise SystemExit(3)", IO_TESTS[:1], 0.0),  # right output, non-zero exit
    ("def add(a, b):\n    return a + b", ASSERT_TESTS, 1.0),
    ("def add(a, b):\n    return 5", ASSERT_TESTS, 0.5),  # one assert of two
    ("def add(a, b):\n    return a + b\nraise ValueError('late')", ASSERT_TESTS, 1.0),  # defs survive
    ("syntax error (", ASSERT_TESTS, 0.0),
    ("def add(a, b):\n    return a + b", json.dumps(ASSERT_TESTS), 1.0),  # JSON text
    ("print(sum(map(int, input().split())))", {"inputs": ["1 2", "3 4"], "outputs": ["3", "8"]}, 0.5),
    ("def add(a, b):\n    return a + b", "assert add(1, 1) == 2\nassert add(1, 1) == 3\n", 0.5),
])
def test_code_reward_scores(program, tests, expected, no_leftovers):
    assert build_reward("code", timeout=5.0)([_fenced(program)], tests=[tests]) == [expected]


def test_code_reward_batch_without_code_or_tests(no_leftovers):
    reward = build_reward("code", timeout=5.0)
    out = reward([_fenced("print(input())"), "no code", _fenced("print(1)"),
                  "<answer>def add(a, b): return a + b</answer>", "", "<answer>   </answer>"],
                 tests=[[{"input": "x", "output": "x"}], IO_TESTS, [], ASSERT_TESTS, IO_TESTS, IO_TESTS])
    assert list(out) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert out.invalid == [False, False, True, False, False, False]  # no tests: cannot be scored


def test_infinite_loop_is_stopped_at_the_limit(no_leftovers):
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=SandboxLimits(timeout=1.0))
    elapsed = time.monotonic() - start
    assert result.timed_out and result.returncode is None
    assert 1.0 <= elapsed < 1.0 + 2.0  # killed at the limit: not before it, not long after
    reward = build_reward("code", timeout=1.0)
    start = time.monotonic()
    out = reward([_fenced("while True:\n    pass")], tests=[IO_TESTS * 3])
    elapsed = time.monotonic() - start
    assert list(out) == [0.0]
    assert elapsed < 1.0 + 2.0  # one limit, not one per test (slack for a loaded machine)


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
    "import subprocess\nsubprocess.run(['sleep', '100'])",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import os\nos.system('sleep 100')",
    "import ctypes\nctypes.CDLL(None).fork()",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '100'], {})",
])
def test_process_creation_is_contained(program, no_leftovers):
    reward = build_reward("code", timeout=2.0)
    start = time.monotonic()
    out = reward([_fenced(program + "\nprint('escaped')")], tests=[[{"input": "", "output": "escaped"}]])
    assert list(out) == [0.0]
    assert time.monotonic() - start < 2.0 + 2.0
    # Nothing it did (e.g. filling the process table) stops the next program from running.
    assert list(reward([_fenced("print('fine')")], tests=[[{"input": "", "output": "fine"}]])) == [1.0]


@pytest.mark.parametrize("program", [
    "x = bytearray(10**10)",
    "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "x = ' ' * (2 * 1024**3)",
])
def test_memory_hog_is_contained(program, no_leftovers):
    result = run_python(program + "\nprint('survived')", limits=FAST)
    assert "survived" not in result.stdout
    assert result.returncode != 0
    reward = build_reward("code", timeout=2.0, memory_mb=512)
    out = reward([_fenced(program + "\nprint('ok')")], tests=[[{"input": "", "output": "ok"}]])
    assert list(out) == [0.0]
    assert list(reward([_fenced("print('ok')")], tests=[[{"input": "", "output": "ok"}]])) == [1.0]


@pytest.fixture
def unguarded(monkeypatch, tmp_path):
    """Runs sandboxes with the bootstrap's Python-level guard switched off: stands in for a
    program that found a way around it, to test what the OS-level layers alone contain."""
    from grpo_cli.rewards import sandbox

    source = sandbox._BOOT_SOURCE.read_text()
    assert "    _lock_down()\n" in source
    boot = tmp_path / "boot_unguarded.py"
    boot.write_text(source.replace("    _lock_down()\n", "    pass\n"))
    monkeypatch.setattr(sandbox, "_BOOT_SOURCE", boot)


def test_reimporting_patched_modules_is_denied(no_leftovers):
    for module in ("posix", "_socket", "_posixsubprocess"):
        program = f"import sys\ndel sys.modules[{module!r}]\nimport {module}"
        result = run_python(program, limits=FAST)
        assert result.returncode == 1 and "not permitted in the sandbox" in result.stderr


def test_escaped_process_dies_with_the_sandbox(unguarded, no_leftovers):
    """Kernel-level containment: a child that forks and leaves the process group with setsid()
    is taken down with the sandbox by the PID namespace."""
    if not isolation().pid_namespace:
        pytest.skip(f"no PID namespace available here ({isolation().describe()})")
    program = (
        "import os\npid = os.fork()\n"
        "if pid == 0:\n    os.setsid()\n    import time\n    time.sleep(100)\n"
        "print('forked')\n"
    )
    start = time.monotonic()
    result = run_python(program, limits=FAST)
    assert result.stdout == "forked\n"  # the fork really happened
    assert time.monotonic() - start < 2.0


def test_shared_memory_dies_with_the_sandbox(unguarded, no_leftovers):
    """A System V shared-memory segment outlives the process that made it: without an IPC
    namespace each program could leave memory behind in the host until it runs out."""
    import ctypes

    if not isolation().pid_namespace:
        pytest.skip(f"no namespaces available here ({isolation().describe()})")
    key = 0x67727030 + os.getpid() % 1000
    program = (
        "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
        f"shmid = libc.shmget({key}, 1 << 20, 0o1666)\n"  # IPC_CREAT, readable by all
        "ctypes.memset(libc.shmat(shmid, None, 0), 1, 1 << 20)\nprint(shmid >= 0)\n"
    )
    libc = ctypes.CDLL(None)
    try:
        result = run_python(program, limits=FAST)
        assert result.stdout == "True\n", result.stderr[-500:]  # it made one, in its namespace
        assert libc.shmget(key, 0, 0) == -1  # and it is gone
    finally:
        if (shmid := libc.shmget(key, 0, 0)) != -1:
            libc.shmctl(shmid, 0, None)  # IPC_RMID: leave the host as it was


def test_fork_bomb_without_the_python_guard_is_contained(unguarded, no_leftovers):
    """A fork bomb bounded to 50 processes (not to hurt the test machine): killed at the time
    limit with every process it made."""
    program = (
        "import os, time\nmade = 0\nfor _ in range(50):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        continue\n"
        "    if pid == 0:\n        time.sleep(100)\n        os._exit(0)\n    made += 1\n"
        "print(made, flush=True)\nwhile True:\n    time.sleep(1)\n"
    )
    start = time.monotonic()
    result = run_python(program, limits=SandboxLimits(timeout=1.0))
    elapsed = time.monotonic() - start
    assert result.timed_out, (result.returncode, result.stdout, result.stderr[-500:])
    assert int(result.stdout) > 0  # it did fork
    assert elapsed < 1.0 + 2.0


def test_network_namespace_blocks_sockets_without_the_python_guard(unguarded, no_leftovers):
    """Kernel-level network isolation: a server listening in this process is reachable from a
    process without a network namespace, so this only passes thanks to the namespace."""
    import socket

    if not isolation().net_namespace:
        pytest.skip(f"no network namespace available here ({isolation().describe()})")
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port = server.getsockname()[1]
        program = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('CONNECTED')\nexcept OSError as e:\n    print('unreachable', e.errno)\n"
        )
        result = run_python(program, limits=FAST)
        assert result.stdout.startswith("unreachable"), result.stdout + result.stderr
    finally:
        server.close()


NETWORK_PROGRAMS = [
    "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
    "import socket\ns = socket.socket()",
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
    "import socket\nsocket.getaddrinfo('example.com', 80)",
    "import _socket\n_socket.socket()",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)",
]


@pytest.mark.parametrize("program", NETWORK_PROGRAMS)
def test_network_is_blocked(program, no_leftovers):
    wrapped = f"try:\n    exec({program!r})\n    print('CONNECTED')\nexcept BaseException as e:\n    print('blocked', type(e).__name__)"
    result = run_python(wrapped, limits=FAST)
    assert result.returncode == 0
    assert result.stdout.startswith("blocked"), result.stdout + result.stderr
    assert build_reward("code", timeout=2.0)([_fenced(program + "\nprint('net')")],
                                             tests=[[{"input": "", "output": "net"}]]) == [0.0]


TRAINER = """
import json, resource, sys
from grpo_cli.rewards import build_reward_set

LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_NPROC)
job = json.load(sys.stdin)
before = [resource.getrlimit(r) for r in LIMITS]
scores = build_reward_set(job["rewards"]).score(job["completions"], tests=job["tests"])
print(json.dumps({"total": scores.total, "errors": scores.errors,
                  "limits_unchanged": before == [resource.getrlimit(r) for r in LIMITS]}))
"""


def test_trainer_process_survives_hostile_programs(no_leftovers):
    """A trainer-like process scores hostile completions through a RewardSet, as the training
    loop does, and carries on: right scores, its own limits untouched, a clean exit."""
    hostile = [
        "while True:\n    pass",  # infinite loop
        "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",  # fork bomb
        "x = []\nwhile True:\n    x.append(bytearray(10**7))",  # memory hog
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",  # network
    ]
    # Each would then print the right output: it only scores if it got away with it.
    programs = [p + "\nprint(input()[::-1])" for p in hostile] + ["print(input()[::-1])"]
    job = {
        "rewards": {"code": {"args": {"timeout": 1.0, "memory_mb": 256}}, "format": {"weight": 0.5}},
        "completions": [f"<think>plan</think>\n<answer>\n```python\n{p}\n```\n</answer>" for p in programs],
        "tests": [[{"input": "abc", "output": "cba"}]] * len(programs),
    }
    done = subprocess.run([sys.executable, "-c", TRAINER], input=json.dumps(job), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["total"] == [0.5, 0.5, 0.5, 0.5, 1.5]  # format 0.5 each; code 1 only for the honest one
    assert report["errors"] == {"code": 0, "format": 0}
    assert report["limits_unchanged"] is True


def test_sandbox_io_limits_and_environment(no_leftovers):
    flood = run_python("while True:\n    print('x' * 1000)", limits=SandboxLimits(timeout=2.0, max_output_bytes=4096))
    assert not flood.timed_out and len(flood.stdout) == 4096  # capped by RLIMIT_FSIZE, killed at once
    env = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)", limits=FAST)
    assert env.stdout.splitlines() == ["['HOME', 'LANG', 'PATH', 'TMPDIR']", "1"]  # nothing inherited
    files = run_python("import os\nprint(sorted(os.listdir('.')))", limits=FAST)
    assert "spec.json" not in files.stdout and "program.py" not in files.stdout  # tests not readable
    unicode = run_python("print(input()[::-1])", stdin="héllo 世界\n", limits=FAST)
    assert unicode.stdout == "界世 olléh\n"


def test_sandbox_guard_keeps_ordinary_libraries_working(no_leftovers):
    program = (
        "import asyncio, ssl, subprocess, multiprocessing, threading, socket\n"
        "async def main():\n    return 'async'\n"
        "print(asyncio.run(main()))\n"  # the event loop needs a local socketpair
        "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
    )
    result = run_python(program, limits=FAST)
    assert result.stdout == "async\nthread\n", result.stderr


def test_code_runs_completions_concurrently(monkeypatch, no_leftovers):
    from grpo_cli.rewards import code as code_module

    lock, in_flight, most = threading.Lock(), [0], [0]
    real_run = code_module.run_python

    def counting_run(*args, **kwargs):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return real_run(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(code_module, "run_python", counting_run)
    sleepy = _fenced("import time\ntime.sleep(0.5)\nprint(input())")
    out = build_reward("code", timeout=5.0, workers=2)([sleepy] * 4, tests=[[{"input": "a", "output": "a"}]] * 4)
    assert list(out) == [1.0] * 4
    assert most[0] == 2  # two sandboxes at a time, never more


# ----------------------------------------------------------------------------- assert tests are judged outside the program

# A wrong program (add returns 0) fails all three: it only scores if it fakes a verdict.
FORGE_TESTS = ["assert add(2, 3) == 5", "assert add(10, 5) == 15", "assert add(1, 1) == 2"]
WRONG_ADD = "def add(a, b):\n    return 0\n"


@pytest.mark.parametrize("program", [
    WRONG_ADD,
    # what the sandbox reports comes through this descriptor: extra lines void them all
    WRONG_ADD + "import os, sys\nos.write(int(sys.argv[3]), b''.join(b'[%d, [\"b\", true]]\\n' % i for i in range(3)))",
    WRONG_ADD + "open('results.txt', 'w').write(''.join(f'{i} 1\\n' for i in range(100)))",  # the old channel
    WRONG_ADD + "import os\nos._exit(0)",
    "class A:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
    "def add(a, b):\n    return A()",
    "class A(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return A(0)",  # read as the int it is
    WRONG_ADD + "import builtins\nbuiltins.AssertionError = KeyError\nbuiltins.bool = lambda *a: True",
])
def test_assert_verdicts_cannot_be_faked(program, no_leftovers):
    assert build_reward("code", timeout=2.0)([_fenced(program)], tests=[FORGE_TESTS]) == [0.0]


def test_expected_values_never_reach_the_sandbox(no_leftovers):
    from grpo_cli.rewards.code import parse_tests

    tests = parse_tests(["assert add(2, 3) == 987654321", "assert abs(add(1, 1) - 123454321) < 1"])
    program = (
        "import gc, sys\ndef add(a, b):\n    return a + b\n"
        "seen = open('/proc/self/cmdline').read()\n"
        "f = sys._getframe()\nwhile f is not None:\n    seen += repr(f.f_locals)\n    f = f.f_back\n"
        "seen += repr([o for o in gc.get_objects() if isinstance(o, (str, list, dict, tuple))])\n"
        "needles = [''.join(['98765', '4321']), ''.join(['12345', '4321'])]  # built after the search\n"
        "print('FOUND' if any(n in seen for n in needles) else 'NOT FOUND')\n"
    )
    result = run_python(program, steps=tests.steps, limits=FAST)
    assert result.stdout == "NOT FOUND\n", result.stderr[-500:]
    assert "add(2, 3)" in str(tests.steps) and "987654321" not in str(tests.steps)


def test_values_whose_keys_share_a_hash_are_refused(no_leftovers):
    """Ints congruent mod 2**61 - 1 share one hash, so a set of ~30k of them (1 MB of output)
    took the trainer ~5 s to decode (quadratic in the output limit), while the program built
    it cheaply under a __hash__ of its own. The trainer refuses such values: the test fails."""
    from grpo_cli.rewards._sandbox_boot import decode_value

    m = (1 << 61) - 1
    same = [["i", str(m * i)] for i in range(1, 41)]  # 40 distinct ints, one hash
    for data in (["S", same], ["F", same], ["d", [[k, ["n"]] for k in same]], ["l", [["S", same]]]):
        with pytest.raises(ValueError, match="same hash"):
            decode_value(data)
    assert decode_value(["S", same[:32]]) == {m * i for i in range(1, 33)}  # up to 32 are fine
    assert decode_value(["l", same]) == [m * i for i in range(1, 41)]  # a list hashes nothing
    assert decode_value(["d", [[["i", "1"], ["s", "a"]], [["i", "2"], ["n"]]]]) == {1: "a", 2: None}
    program = ("M = (1 << 61) - 1\nclass I(int):\n    def __hash__(self):\n        return int.__hash__(self // M)\n"
               "def f():\n    return {I(M * i) for i in range(1, 41)}\n")
    assert build_reward("code", timeout=2.0)([_fenced(program)], tests=[["assert len(f()) == 40"]]) == [0.0]


AREA_TESTS = [
    "assert area(2) == 12",  # decided in the trainer
    "assert area(0) is not None",
    "assert not is_big(area(1))",
    "assert abs(area(2.5) - 18.75) < 1e-9",  # decided in a second sandbox without the program
    "import math\nassert math.isclose(area(1), 3.0)",
    "assert sorted(pair(1)) == [1, 2]",
    "assert pair(1) == [2, 1]",
]
AREA_RIGHT = "def area(r):\n    return 3 * r * r\ndef pair(x):\n    return [x + 1, x]\ndef is_big(v):\n    return v > 100"


def test_assert_forms_are_scored_like_python(no_leftovers):
    programs = [
        AREA_RIGHT,
        "def area(r):\n    return 0\ndef pair(x):\n    return (x + 1, x)\ndef is_big(v):\n    return True",
        "class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
        "    def __sub__(self, o):\n        return 0\n    def __lt__(self, o):\n        return True\n"
        "def area(r):\n    return A()\ndef pair(x):\n    return A()\ndef is_big(v):\n    return False",
    ]
    out = build_reward("code", timeout=5.0)([_fenced(p) for p in programs], tests=[AREA_TESTS] * 3)
    # wrong: only area(0) = 0 is not None and sorted((2, 1)) == [1, 2]; always-equal: only is_big
    # (its A() is not plain data, so it fails even `is not None`)
    assert list(out) == [1.0, 2 / 7, 1 / 7]


def test_asserts_beyond_the_split_still_score_with_a_warning(caplog, no_leftovers):
    from grpo_cli.rewards import code as code_module

    code_module._warned.discard("whole")
    tests = ["assert all(sq(i) == i * i for i in range(4))", "assert sq(3) == 9"]
    reward = build_reward("code", timeout=5.0)
    out = reward([_fenced("def sq(x):\n    return x * x"), _fenced("def sq(x):\n    return x + x")],
                 tests=[tests, tests])
    assert list(out) == [1.0, 0.0]
    assert [r.message for r in caplog.records if "hostile program can fake" in r.message] != []


def test_assert_rows_without_asserts_or_with_bad_python():
    from grpo_cli.rewards.code import parse_tests

    out = build_reward("code", timeout=5.0)([_fenced("x = 1")], tests=[["import math", "x = 1"]])
    assert list(out) == [0.0] and out.invalid == [True]
    with pytest.raises(ValueError, match="test 1 is not valid Python"):
        parse_tests(["assert f(1) == 1", "assert f(("])


# ----------------------------------------------------------------------------- no root powers in the sandbox

FORK_40 = (
    "import os, time\nmade = 0\nfor _ in range(40):\n    try:\n        pid = os.fork()\n"
    "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(5)\n        os._exit(0)\n    made += 1\n"
    "print(made)\n"
)


def test_a_root_trainer_runs_programs_without_root(no_leftovers):
    from grpo_cli.rewards import sandbox

    if os.geteuid() != 0 or not isolation().pid_namespace:
        pytest.skip(f"needs a root trainer where namespaces work ({isolation().describe()})")
    assert isolation().non_root, isolation().describe()
    trainer_file = sandbox.__file__  # root-owned: opening it to write changes nothing
    program = f"import os\nprint(os.geteuid())\ntry:\n    open({trainer_file!r}, 'r+')\nexcept OSError:\n    print('denied')"
    result = run_python(program, limits=FAST)
    assert result.stdout.split() == ["65534", "denied"], result.stderr[-500:]


def test_process_limit_holds_without_the_python_guard(unguarded, no_leftovers):
    if not isolation().non_root:
        pytest.skip(f"the program runs as root here ({isolation().describe()})")
    result = run_python(FORK_40, limits=SandboxLimits(timeout=2.0, max_processes=8))
    assert 0 < int(result.stdout) < 8  # the sandbox process itself counts too


def test_root_fallback_is_bounded_by_a_pids_cgroup(unguarded, no_leftovers):
    from grpo_cli.rewards import sandbox

    if os.geteuid() != 0 or not os.access(sandbox._CGROUP_PIDS, os.W_OK) or not shutil.which("unshare"):
        pytest.skip("needs root, unshare and a writable pids cgroup (v1)")
    as_root = sandbox.Isolation((shutil.which("unshare"), "--user", *sandbox._NS_FLAGS, "--"), non_root=False,
                                net_namespace=True, pid_namespace=True)
    limits = SandboxLimits(timeout=2.0, max_processes=8)
    result = sandbox._run(FORK_40, "", [], {}, limits, as_root)
    assert 0 < int(result.stdout) <= 8 + sandbox._PROCESS_OVERHEAD, result.stderr[-500:]
    assert not list(sandbox._CGROUP_PIDS.glob(f"grpo-sandbox-{os.getpid()}-*"))  # removed afterwards


def test_memory_limit_holds_over_all_its_processes(unguarded, no_leftovers):
    """The address-space limit is per process: a program that gets around the Python guard
    (pure Python can load ctypes under another name) held 3 x 300 MB under memory_mb=512."""
    from grpo_cli.rewards import sandbox

    if os.geteuid() != 0 or not os.access(sandbox._CGROUP_MEMORY, os.W_OK):
        pytest.skip("needs root and a writable memory cgroup (v1)")
    program = (
        "import ctypes, os, time\nlibc = ctypes.CDLL(None)\npids = []\nfor _ in range(3):\n"
        "    pid = libc.fork()\n    if pid == 0:\n        x = b'x' * (200 << 20)\n        time.sleep(0.5)\n"
        "        libc._exit(0)\n    pids.append(pid)\n"
        "print(sum(os.waitpid(pid, 0)[1] == 0 for pid in pids))\n"  # children that kept their 200 MB
    )
    result = run_python(program, limits=SandboxLimits(timeout=5.0, memory_mb=256))
    assert result.stdout in ("0\n", "1\n"), (result.stdout, result.stderr[-500:])
    assert not list(sandbox._CGROUP_MEMORY.glob(f"grpo-sandbox-{os.getpid()}-*"))  # removed afterwards


def test_unix_sockets_in_tmp_are_out_of_reach(unguarded, no_leftovers):
    import socket

    if not isolation().private_tmp:
        pytest.skip(f"no private /tmp here ({isolation().describe()})")
    folder = tempfile.mkdtemp(dir="/tmp")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "trainer.sock")
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(path)
        server.listen()
        os.chmod(path, 0o777)
        program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({path!r})\n" \
                  "    print('CONNECTED')\nexcept OSError as e:\n    print(type(e).__name__)"
        assert run_python(program, limits=FAST).stdout == "FileNotFoundError\n"
    finally:
        server.close()
        shutil.rmtree(folder)


def test_files_outside_the_private_tmp_are_read_only(no_leftovers):
    """A world-writable dir outside /tmp (like /run/lock) took 1.2 GB from one program in 1.5 s
    and kept it; a non-root trainer's program could rewrite its run dir, checkpoints and code."""
    if not isolation().private_tmp:
        pytest.skip(f"no mount namespace here ({isolation().describe()})")
    folder = tempfile.mkdtemp(dir=Path(__file__).parent)  # not under /tmp: that one is private
    os.chmod(folder, 0o777)
    program = (
        f"import os\nprint(os.path.isdir({folder!r}))\ntry:\n    open({folder!r} + '/left', 'w').write('x')\n"
        "    print('written')\nexcept OSError as e:\n    print(e.strerror)\n"
        "open('/tmp/scratch', 'w').write('ok')\nprint(open('/tmp/scratch').read())\n"  # its own tmp stays writable
        "open('/dev/null', 'w').write('x')\n"
    )
    try:
        result = run_python(program, limits=FAST)
        if result.stdout.startswith("False"):
            pytest.skip("the sandbox's user cannot reach the tests dir")
        assert result.stdout == "True\nRead-only file system\nok\n", result.stderr[-500:]
        assert os.listdir(folder) == []
    finally:
        shutil.rmtree(folder)


def test_weaker_isolation_is_reported_once(monkeypatch, caplog, no_leftovers):
    from grpo_cli.rewards import sandbox

    monkeypatch.setattr(sandbox, "_candidates", lambda: [sandbox.Isolation((), non_root=False)])
    sandbox._probe.cache_clear()
    try:
        for _ in range(2):
            assert run_python("print('ok')", limits=FAST).stdout == "ok\n"
    finally:
        sandbox._probe.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == sandbox.__name__]
    assert len(warnings) == 1
    assert "runs as root" in warnings[0] and "no network namespace" in warnings[0] and "non-root user" in warnings[0]


# ----------------------------------------------------------------------------- APPS / TACO call-based tests

def test_apps_call_based_tests_call_the_function(no_leftovers):
    apps = json.dumps({"fn_name": "add", "inputs": [[2, 3], [10, -4]], "outputs": [[5], [6]]})
    pairs = {"fn_name": "swap", "inputs": [[1, 2], [[3], "x"]], "outputs": [[2, 1], [["x", [3]]]]}
    programs = [
        ("def add(a, b):\n    return a + b", apps, 1.0),  # outputs hold [value]: APPS's rule
        ("class Solution:\n    def add(self, a, b):\n        return a + b", apps, 1.0),  # LeetCode style
        ("def add(a, b):\n    return a * b", apps, 0.0),
        ("class A:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return A()", apps, 0.0),
        ("def swap(a, b):\n    return (b, a)", pairs, 1.0),  # a tuple counts as a list
        ("def add(a, b):\n    return a + b", pairs, 0.0),  # no such function
    ]
    out = build_reward("code", timeout=5.0)([_fenced(p) for p, _, _ in programs], tests=[t for _, t, _ in programs])
    assert list(out) == [expected for _, _, expected in programs]
    assert out.invalid == [False] * len(programs)


# ----------------------------------------------------------------------------- time budget per completion

def test_time_budget_bounds_one_completion(no_leftovers):
    reward = build_reward("code", timeout=0.5, time_budget=1.0)
    slow_io = _fenced("import time\ntime.sleep(0.2)\nprint(input())")
    io_tests = [{"input": f"{i}\n", "output": f"{i}\n"} for i in range(10)]
    slow_calls = _fenced("import time\ndef f(x):\n    time.sleep(0.2)\n    return x")
    call_tests = [f"assert f({i}) == {i}" for i in range(10)]
    for program, tests in ((slow_io, io_tests), (slow_calls, call_tests)):
        start = time.monotonic()
        out = reward([program], tests=[tests])
        elapsed = time.monotonic() - start
        assert 0.0 < out[0] < 0.6, out  # each passes given time; only a few of 10 fit
        assert elapsed < 1.0 + 1.0


@pytest.mark.parametrize("budget", [0, -1.0, float("inf"), True, "10"])
def test_time_budget_must_be_positive_seconds(budget):
    with pytest.raises(ValueError, match="time_budget"):
        build_reward("code", time_budget=budget)
