"""A `grpo rollout-server` subprocess for tests (tests/test_rollout_server.py, tests/test_distributed_server.py):
started on a free loopback port with the tiny model, stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

START_TIMEOUT = 300  # seconds for the server to print its ready line (the machines are noisy)


def start_server(model_dir: Path, log: Path, *overrides: str, env: dict[str, str] | None = None, port: int = 0,
                 ) -> tuple[subprocess.Popen, str]:
    """A `grpo rollout-server` subprocess on a loopback port (0: a free one), once it printed its ready
    line: (process, "127.0.0.1:PORT"). Its output goes to `log` (a pipe left unread could block it)."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "grpo_cli", "rollout-server", f"model.name_or_path={model_dir}", "model.dtype=float32",
             *overrides, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        ready = [line for line in log.read_text().splitlines() if line.startswith("ready:")]
        if ready:
            return process, ready[0].split(" on ")[1].split()[0]
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the rollout server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
