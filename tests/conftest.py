"""Shared fixtures. Everything runs offline on a CPU; nothing here reaches a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers/datasets are imported: a hub look-up must fail at once, not time out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _isolate_cache() -> None:
    """Tests (and the `grpo` commands they start) cache datasets in a temporary folder, never in the
    user's ~/.cache/grpo; its models/ is the real cache's, so SmolLM2 is converted once per machine."""
    import atexit
    import shutil
    import tempfile

    from grpo_cli.models import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="grpo-test-cache-"))
    (folder / "models").symlink_to(models, target_is_directory=True)
    os.environ["GRPO_CACHE"] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # removes the link, not what it points to


_isolate_cache()


def _restore_ctrl_c() -> None:
    """Ctrl-C works in the tests even when they are started with SIGINT ignored (a shell's background
    job does that): ignored is inherited by every `grpo` the tests start, and the tests that stop a
    run with a real SIGINT (GRPO_INTERRUPT_AFTER_STEP) would see it finish instead. A Python handler
    is not inherited: the commands start with the default, and Python turns it into KeyboardInterrupt."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_restore_ctrl_c()

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once per machine (cached)."""
    from grpo_cli.models import resolve

    return Path(resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random llama with SmolLM2's real tokenizer: ~3.2M parameters, loads in under a second.

    head_dim is 64 because vLLM's CPU attention supports only some head sizes (32, 64, 80, ...).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A `grpo rollout-server` on the tiny model, one per test module: (process, "127.0.0.1:PORT")."""
    from server_process import start_server, stop_server

    log = tmp_path_factory.mktemp("server") / "output.log"
    process, address = start_server(tiny_model_dir, log, "rollout.cpu_kv_cache_mib=64")
    yield process, address
    stop_server(process)


@pytest.fixture
def grpo():
    """Run the real `grpo` command in a subprocess: grpo("config", "recipe=quickstart", cwd=...)."""
    import subprocess
    import sys

    def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout)

    return run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: skipped, with the reason shown, on a machine without it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make test` on a GPU machine to include it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
