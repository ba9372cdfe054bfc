"""Checkpoints: Hugging Face model folders plus the trainer state needed to resume exactly.

checkpoints/step-000050/ holds the policy (safetensors + config + tokenizer: loadable by
`AutoModelForCausalLM.from_pretrained` and by vLLM) and trainer_state.pt (optimizer, scheduler,
RNG, step, data position and the data it refers to: data.data_fingerprint and the order's seed).
Each is written into a hidden temporary folder, flushed to disk and renamed into place, so a killed
process (or a power cut) leaves either the whole checkpoint or none of it.

With several learner processes (torchrun) every rank takes part in gathering the sharded weights
and optimizer state, and rank 0 alone writes: the checkpoint is the same as one process would
save, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpo_cli import distributed
from grpo_cli.errors import first_line
from grpo_cli.runs import fsync_dir, fsync_tree

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from grpo_cli.learner import Learner

STATE_FILE = "trainer_state.pt"
TMP_PREFIX = ".tmp-step-"  # a checkpoint being written: .tmp-step-NNNNNN-PID, renamed to step-NNNNNN when complete


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first. Only step-NNNNNN folders: a copy the user made beside
    them (step-000040-best) is theirs, never resumed from nor pruned by keep_last."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(done, key=step_of)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def damage(folder: Path, trainer_state: bool = True) -> str | None:
    """What is visibly wrong with a checkpoint (or any model folder), or None: config.json that is
    not a JSON object, a *.safetensors file shorter or longer than its header says, a trainer_state.pt
    that is not a torch archive. Reads headers only, so it runs before anything loads: the loaders'
    own errors for a damaged file are pages long (vLLM's especially)."""
    from safetensors import SafetensorError, safe_open

    config = folder / "config.json"
    if config.is_file():
        try:
            if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                return "config.json is not a JSON object"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"config.json is not valid JSON ({first_line(e)})"
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("adapter/*.safetensors")]):
        try:
            with safe_open(weights, framework="numpy"):
                pass
        except SafetensorError as e:
            return f"{weights.relative_to(folder)} is truncated or corrupt ({first_line(e)})"
    state = folder / STATE_FILE
    if trainer_state and state.is_file() and not zipfile.is_zipfile(state):  # torch.save writes a zip archive
        return f"{STATE_FILE} is truncated or corrupt (not a torch.save archive)"
    return None


def save(run: Path, step: int, learner: Learner, tokenizer: PreTrainedTokenizerBase, keep_last: int,
         data_position: int, data: dict[str, Any] | None = None) -> Path:
    from safetensors import SafetensorError

    from grpo_cli.learner import TrainingError

    final = run / "checkpoints" / f"step-{step:06d}"
    tmp = run / "checkpoints" / f"{TMP_PREFIX}{step:06d}-{os.getpid()}"
    main = distributed.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        learner.save_weights(tmp)  # sharded: every rank gathers, rank 0 writes
        learner_state = learner.state_dict()
        if main:
            tokenizer.save_pretrained(tmp)
            state = {
                "step": step,
                "data_position": data_position,
                "data": data,  # what data_position counts in (loop.resume_position); older checkpoints lack it
                "learner": learner_state,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            }
            torch.save(state, tmp / STATE_FILE)
            fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk reaches torch.save as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and not _write_failure(e):
            raise
        # torch.save's RuntimeError does not say why; a full disk is the common cause.
        full = (e.errno in (errno.ENOSPC, errno.EDQUOT) if isinstance(e, OSError)
                else not any(cause in str(e) for cause in ("Permission denied", "Read-only")))
        raise TrainingError(f"could not write checkpoint step-{step:06d} in {run / 'checkpoints'} ({first_line(e)}); "
                            f"{'free disk space there' if full else 'make it writable'}, then resume the run: "
                            f"{resume_point(run)}") from None
    if main:
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)  # the rename itself, before older checkpoints go
        for old in checkpoint_dirs(run)[:-keep_last] if keep_last > 0 else []:
            _remove(old)
    distributed.barrier()  # no rank goes on (or reads it back) before the checkpoint is complete
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder: first renamed to an unfinished one's name (at once, whole), so a kill
    while its files go leaves a folder the next resume clears (remove_unfinished), never a step-N that
    still lists as complete with some of its files gone."""
    doomed = checkpoint.with_name(f"{TMP_PREFIX}{checkpoint.name.removeprefix('step-')}-{os.getpid()}-old")
    try:
        os.replace(checkpoint, doomed)
    except OSError:
        doomed = checkpoint
    shutil.rmtree(doomed, ignore_errors=True)


def resume_point(run: Path) -> str:
    """Where `grpo train resume=RUN` continues, for messages: after its latest complete checkpoint."""
    last = checkpoint_dirs(run)[-1:]
    return f"it continues after {last[0].name}" if last else "it continues after its start (no checkpoint yet)"


def _write_failure(error: Exception) -> bool:
    """A failed write (a full disk, say) that is not an OSError: torch.save's writer reports it as a
    RuntimeError, safetensors (the model's weights) as a SafetensorError naming the I/O error."""
    text = str(error)
    if isinstance(error, RuntimeError):
        return "PytorchStreamWriter" in text or "inline_container" in text
    return "I/O error" in text


def remove_unfinished(run: Path) -> None:
    """Checkpoints a killed or failed process was still writing (named after its process id, so no
    later save replaces them): never complete, never read, only taking space."""
    for tmp in (run / "checkpoints").glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: Path, learner: Learner) -> dict[str, Any]:
    """Restore the learner from a checkpoint folder; returns its trainer state (step, data_position, data)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    learner.load_state_dict(state["learner"], path)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
