"""What a run reports: one JSON line per step in metrics.jsonl, a console progress bar with the key
figures, sample completions under samples/, and Weights & Biases when asked for.

metrics.jsonl is appended a whole line at a time and flushed to disk each step; on resume, lines
past the checkpoint being resumed are dropped, and so are the samples of those steps, so the run always
tells one consistent history. With logging.log_every=N a line is written every N steps (and at the
last): the figures of that one step, not means or sums over the N.

A step's keys (grpo_cli.loop, grpo_cli.learner, grpo_cli.rewards.base). Rollout figures describe the
step's first generation round, every completion of it (under trainer.dynamic_sampling the groups kept
for training may come from later rounds); the update's figures describe the completions trained on.
- `reward/mean`, `reward/std` (population std, ddof 0; the advantages use ddof 1), `reward/<term>`
  (mean of the unweighted term), `reward/<term>/errors`, `reward/invalid` (rows a reward could not score).
- `accuracy`: share of completions the correctness term scores 1.0; `completion/len_mean`, `_max`,
  `_correct_mean`, `_wrong_mean` (tokens); `completion/truncated_frac` (stopped by max_new_tokens);
  `completion/reflection_rate`; `groups/zero_std_frac` (groups whose rewards are all equal).
- `tokens/generated`: completion tokens of every round; `rollout/rounds`; `groups/trained`: groups with a
  completion trained on; `update/skipped`: 1 when nothing was left to train on (no update figures then).
- `loss`, `pg_loss` (aggregated as loss.agg), `kl` (per-token mean of loss.kl's estimate; absent with
  loss.beta=0): on the first pass over the batch, before the step's updates. `clip_frac` (+ `_low`,
  `_high`), `ratio_mean`: per-token means over all trainer.num_iterations passes; `ratio_min`, `_max`:
  extremes over them. `entropy` (nats per token, at rollout.temperature). `grad_norm`: before clipping,
  of the step's last optimizer step; `lr`: of its first. `tokens/trained`.
- `rollout/logprob_diff_max`, `_mean`: |engine - learner| log-prob of the trained tokens;
  `sync/logprob_diff_max` (rollout.check_sync); `memory/gpu_peak_gib`.
- `time/<phase>` (seconds: rollout, reward, learner, sync, sync_check); `time/step`, their sum;
  `time/eval` and `eval/<dataset>/<metric>` on evaluation steps (grpo_cli.evaluate).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import string
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from grpo_cli.config import to_container
from grpo_cli.errors import UserError, first_line
from grpo_cli.runs import atomic_write_text, explained_write_errors
from grpo_cli.schema import Config

WANDB_STEP = "train/step"  # the x-axis of every W&B chart: the run's step (not W&B's own count of log calls)
CONSOLE_KEYS = {"reward/mean": "reward", "accuracy": "acc", "kl": "kl", "completion/len_mean": "len",
                "time/step": "s/step"}


class RunLogger:
    def __init__(self, run: Path, cfg: Config, start_step: int, wandb_session: Any = None) -> None:
        """`wandb_session`: `start_wandb`'s, with logging.wandb (started before the models load, so that a
        W&B that cannot start stops the run at once)."""
        self.run, self.cfg = run, cfg
        self.metrics_path = run / "metrics.jsonl"
        # From the start (a run killed before its first checkpoint) nothing is kept: its step-0 evaluation
        # (trainer.eval_before_train) runs and is logged again too, and was logged twice.
        kept = start_step if start_step else -1
        with explained_write_errors(run, f"resume={run}" if cfg.resume else "the run directory"):
            _truncate_after(self.metrics_path, kept)
            _drop_samples_after(run / "samples", kept)
            self.metrics_file = self.metrics_path.open("a", encoding="utf-8")
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                                 console=self.console, transient=False, disable=not self.console.is_terminal)
        self.task = self.progress.add_task("", total=cfg.trainer.max_steps, completed=start_step)
        self.progress.start()
        self.wandb = wandb_session

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if step % self.cfg.logging.log_every == 0 or step == self.cfg.trainer.max_steps:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            os.fsync(self.metrics_file.fileno())
            if self.wandb is not None:
                self.wandb.log({**metrics, WANDB_STEP: step})
        figures = "  ".join(f"{short} {metrics[key]:.3g}" for key, short in CONSOLE_KEYS.items() if key in metrics)
        self.progress.update(self.task, completed=step, description=figures)
        if figures:  # step 0 (trainer.eval_before_train) holds only the evaluation, which says its own lines
            self.progress.console.print(f"step {step:>5}  {figures}", highlight=False, soft_wrap=True)

    def samples(self, step: int, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(self.run / "samples" / f"step-{step:06d}.jsonl", lines)

    def message(self, text: str) -> None:
        # soft_wrap: a long line (a resume command with its path) stays one line, copy-pasteable.
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def close(self, failed: bool = False) -> None:
        """`failed`: the run stopped on an error or an interrupt (W&B then shows it as failed, not finished)."""
        self.progress.stop()
        try:
            self.metrics_file.close()
        except OSError:  # it flushes again the line whose write failed (a full disk): that error is reported already
            pass
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (the resumed checkpoint's); a line cut short by a kill or a
    full disk is dropped with the rest."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def _drop_samples_after(folder: Path, step: int) -> None:
    """Delete the samples (training and eval) of steps past `step`: they are the abandoned attempt's,
    from weights the resumed run threw away, and a resumed run stopped before it reaches them again
    would leave them to be shown next to its own history."""
    for file in folder.glob("*step-*.jsonl"):
        prefix, _, number = file.stem.rpartition("step-")
        if prefix in ("", "eval-") and number.isdigit() and int(number) > step:
            file.unlink()


def start_wandb(run: Path, cfg: Config) -> Any:
    """The W&B session of a run (logging.wandb), resumed when the run has one already."""
    try:
        import wandb
    except ImportError as e:  # not installed, or broken (a protobuf its version does not take, say)
        raise UserError(f"logging=wandb: wandb cannot be imported ({first_line(e)}); install it with "
                        "`pip install wandb`, or set logging=default") from None

    id_file = run / "wandb_id"
    # The W&B run id, kept in the run so that a resume continues the same W&B run. Drawn here: wandb has
    # moved its own generator between versions (wandb.util.generate_id is gone in 0.31).
    run_id = id_file.read_text().strip() if id_file.exists() else "".join(
        secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write_text(id_file, run_id)
    try:
        session = wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                             mode=cfg.logging.wandb_mode, id=run_id, resume="allow", name=run.name, dir=str(run),
                             config=to_container(cfg))
    except wandb.errors.Error as e:  # most often no API key, or no network in online mode
        raise UserError(f"logging=wandb: Weights & Biases did not start ({first_line(e)}); check the network and "
                        "`wandb login`, or set logging.wandb_mode=offline (upload later with `wandb sync`) or "
                        "logging=default") from None
    # W&B writes only at its own current or next step. A resumed run redoes the steps after its checkpoint,
    # which W&B's step has passed: given as W&B's step they would be dropped. So W&B counts its own steps
    # and every chart plots against the run's step, logged as WANDB_STEP.
    session.define_metric(WANDB_STEP)
    session.define_metric("*", step_metric=WANDB_STEP, step_sync=True)
    return session


def discard_wandb(run: Path) -> None:
    """Undo `start_wandb` for a new run that failed before its first step (with `discard_new_run_dir`):
    its wandb/ and wandb_id made output_dir "already hold files" and refused the corrected command."""
    shutil.rmtree(run / "wandb", ignore_errors=True)
    (run / "wandb_id").unlink(missing_ok=True)
