"""Time-bounded math-verify checks in a small pool of persistent worker processes.

Why not call math-verify here: its own timeout uses signal.alarm, which only works in the main
thread, and sympy can hang for minutes (or in C code that ignores signals, e.g. 9^(9^9)) on
adversarial model output. So checks run in `_mathverify_worker.py` processes:

* each worker is started once (lazily, on first use) and reused across steps;
* a request carries many (gold, pred) pairs and the worker answers pair by pair, so IPC is
  one write per chunk and the parent still knows which pair is running;
* soft bound: the worker interrupts a check with setitimer after `timeout` seconds;
* hard bound: if no answer comes within `timeout + grace`, the parent SIGKILLs the worker,
  scores that pair as timed out and restarts a worker for the remaining pairs.

Workers are plain `python script.py` subprocesses rather than multiprocessing children, so
they never re-import the trainer's `__main__` or the grpo_cli package. Thread-safe.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_WORKER_SCRIPT = Path(__file__).with_name("_mathverify_worker.py")

CORRECT, WRONG, GOLD_INVALID, TIMEOUT, ERROR = "1", "0", "g", "t", "e"

Pair = tuple[str, str] | tuple[str, str, bool, bool]
"""(gold, pred) or (gold, pred, gold_boxed, pred_boxed): a boxed answer is a \\boxed{} or
<answer> content, read as math-verify reads a box when nothing else parses (see the worker)."""


class _Worker:
    def __init__(self, memory_mb: int, startup_timeout: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER_SCRIPT), str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.pending: deque[int] = deque()
        self.deadline = 0.0
        self.startup_deadline = time.monotonic() + startup_timeout
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        line = self._read_line(self.startup_deadline)
        if line != "ready":
            self.kill()
            raise RuntimeError(f"math-verify worker failed to start (got {line!r}); is math-verify installed?")
        self.ready = True

    def _read_line(self, deadline: float) -> str | None:
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ)
        try:
            while b"\n" not in self.buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buffer += chunk
        finally:
            sel.close()
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def send(self, indices: Sequence[int], pairs: Sequence[Pair], timeout: float, soft: bool) -> None:
        payload = {"timeout": timeout, "soft": soft, "pairs": [list(pairs[i]) for i in indices]}
        self.pending = deque(indices)
        self.proc.stdin.write(json.dumps(payload).encode() + b"\n")
        self.proc.stdin.flush()

    def read_available(self) -> tuple[list[str], bool]:
        """Answers already sent by the worker, and whether it has exited (EOF)."""
        chunk = os.read(self.fd, 65536)
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [x.decode() for x in lines], not chunk

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class MathChecker:
    """Pool of math-verify workers. `check(pairs, timeout)` returns one code per pair:
    CORRECT, WRONG, GOLD_INVALID, TIMEOUT or ERROR."""

    def __init__(self, workers: int = 2, memory_mb: int = 4096, grace: float = 1.0,
                 startup_timeout: float = 120.0, soft_timeouts: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.n_workers = workers
        self.memory_mb = memory_mb
        self.grace = grace
        self.startup_timeout = startup_timeout
        # False: workers never interrupt themselves, only the hard kill bounds a check
        # (exercises the kill-and-replace path in tests).
        self.soft_timeouts = soft_timeouts
        self._workers: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self.timeouts = 0  # hard + soft timeouts since creation, for logging/tests
        self.restarts = 0
        _LIVE.add(self)

    def _worker(self, slot: int) -> _Worker:
        w = self._workers[slot]
        if w is None or w.proc.poll() is not None:
            if w is not None:  # died since the last call: reap it and close its pipes
                w.kill()
            w = self._workers[slot] = _Worker(self.memory_mb, self.startup_timeout)
        return w

    def _replace(self, slot: int) -> None:
        w = self._workers[slot]
        if w is not None:
            w.kill()
        self._workers[slot] = None
        self.restarts += 1

    def check(self, pairs: Sequence[Pair], timeout: float = 5.0) -> list[str]:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        n = len(pairs)
        results: list[str | None] = [None] * n
        if n == 0:
            return []
        with self._lock:
            k = min(self.n_workers, n)
            chunks = {slot: list(range(slot * n // k, (slot + 1) * n // k)) for slot in range(k)}
            active: dict[int, _Worker] = {}
            try:
                for slot in chunks:  # start missing workers in parallel: imports take ~1 s each
                    self._worker(slot)
                for slot, idx in chunks.items():
                    active[slot] = self._start(slot, idx, pairs, timeout)
                while active:
                    self._step(active, pairs, results, timeout)
            except BaseException:
                # Unread answers would be attributed to the next call's pairs: drop the workers.
                for slot in list(active):
                    self._replace(slot)
                raise
        out = [r if r is not None else ERROR for r in results]
        n_timeouts = out.count(TIMEOUT)
        if n_timeouts:
            self.timeouts += n_timeouts
            logger.warning("math-verify timed out on %d of %d checks (scored 0)", n_timeouts, n)
        return out

    def _start(self, slot: int, indices: Sequence[int], pairs, timeout: float) -> _Worker:
        w = self._worker(slot)
        w.wait_ready()
        w.send(indices, pairs, timeout, self.soft_timeouts)
        w.deadline = time.monotonic() + timeout + self.grace
        return w

    def _step(self, active: dict[int, _Worker], pairs, results: list[str | None], timeout: float) -> None:
        sel = selectors.DefaultSelector()
        try:
            for slot, w in active.items():
                sel.register(w.fd, selectors.EVENT_READ, slot)
            wait = max(0.0, min(w.deadline for w in active.values()) - time.monotonic())
            ready = [key.data for key, _ in sel.select(wait)]
        finally:
            sel.close()
        now = time.monotonic()
        for slot in list(active):
            w = active[slot]
            dead = False
            if slot in ready:
                lines, dead = w.read_available()
                for code in lines:
                    results[w.pending.popleft()] = code
                if lines:
                    w.deadline = now + timeout + self.grace
            if not w.pending:
                del active[slot]
                continue
            if dead or now >= w.deadline:
                # Stuck (or crashed, e.g. out of memory) on the pair at the head of its queue:
                # score it, replace the worker and hand the rest to the new one.
                results[w.pending.popleft()] = ERROR if dead else TIMEOUT
                rest = list(w.pending)
                self._replace(slot)
                if rest:
                    active[slot] = self._start(slot, rest, pairs, timeout)
                else:
                    del active[slot]

    def close(self) -> None:
        with self._lock:
            for slot in range(self.n_workers):
                w = self._workers[slot]
                if w is not None:
                    w.kill()
                    self._workers[slot] = None


_LIVE: weakref.WeakSet[MathChecker] = weakref.WeakSet()
_default: MathChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> MathChecker:
    """The process-wide checker shared by `accuracy` and `cosine_length` (created lazily)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathChecker(workers=max(1, min(2, os.cpu_count() or 1)))
        return _default


@atexit.register
def _close_all() -> None:
    for checker in list(_LIVE):
        checker.close()
