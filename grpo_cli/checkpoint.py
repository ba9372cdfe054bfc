"""Checkpoints: Hugging Face model folders plus the trainer state needed to resume exactly.

checkpoints/step-000050/ holds the policy (safetensors + config + tokenizer: loadable by
`AutoModelForCausalLM.from_pretrained` and by vLLM) and trainer_state.pt (optimizer, scheduler,
RNG, step, data position). Each is written into a hidden temporary folder and renamed into place,
so a killed process leaves either the whole checkpoint or none of it.

With several learner processes (torchrun) every rank takes part in gathering the sharded weights
and optimizer state, and rank 0 alone writes: the checkpoint is the same as one process would
save, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpo_cli import distributed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from grpo_cli.learner import Learner

STATE_FILE = "trainer_state.pt"


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def save(run: Path, step: int, learner: Learner, tokenizer: PreTrainedTokenizerBase, keep_last: int,
         data_position: int) -> Path:
    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = run / "checkpoints" / f".tmp-step-{step:06d}-{os.getpid()}"
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    learner.save_weights(tmp)  # sharded: every rank gathers, rank 0 writes
    learner_state = learner.state_dict()
    if main:
        tokenizer.save_pretrained(tmp)
        state = {
            "step": step,
            "data_position": data_position,
            "learner": learner_state,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        torch.save(state, tmp / STATE_FILE)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()  # no rank goes on (or reads it back) before the checkpoint is complete
    return final


def load(path: Path, learner: Learner) -> dict[str, Any]:
    """Restore the learner from a checkpoint folder; returns its trainer state (step, data_position)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    learner.load_state_dict(state["learner"], path)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
