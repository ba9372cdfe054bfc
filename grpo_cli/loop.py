"""`grpo train`: the GRPO algorithm, one step at a time.

Each step: take the next prompts -> sample G completions each with the rollout engine -> score
them with the rewards -> group-relative advantages -> learner update(s) -> push the new weights
into the engine -> (every trainer.eval_every steps) evaluate -> log -> checkpoint. The objective is
`grpo_cli.loss` and nothing else.

Evaluation (grpo_cli.evaluate) samples from the same engine, so the engine must hold the step's
weights: on a step the sync schedule skips (rollout.sync_every > 1, or the last step) they are
pushed first, which also makes the next rollout's weights fresher than the schedule alone would.
A wrong push raises no error, so `rollout.check_sync` checks each one (the last step's too): the
engine's log-probs of the step's first sample against the learner's, `sync/logprob_diff_max`.

Filters (trainer.*): `mask_truncated` gives completions cut off at max_new_tokens no loss (their
group still sets the advantages); `dynamic_sampling` (DAPO) keeps only groups whose rewards differ
and tops the step up with further rounds of fresh prompts, at most `max_resample` of them. Each
round's advantages come from that round's rewards, dropped groups included (loss.adv_scale=batch:
the round's std), so a kept group's advantages are what they would be without the filter. A top-up
round that finds its epoch used up starts the next one, so such a step may hold a prompt twice.

Several learner processes (`torchrun ... grpo train`, grpo_cli.distributed): each rank samples,
scores and trains on its own contiguous share of every step's prompts, with its own engine (whole
groups, so the advantages are exact); the learner makes the update that of the whole batch. Rank 0
writes the run directory; the metrics describe all ranks' completions.

Left out on purpose: a value network (GRPO has none) and rewards folded into KL (the KL term lives
in the loss).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from grpo_cli import checkpoint, distributed
from grpo_cli.data import data_fingerprint, fitting_prompts, load_prompts, special_token_note
from grpo_cli.errors import SameOnEveryRank, UserError, first_line
from grpo_cli.evaluate import PeriodicEval, greedy_note, reward_label, training_file_note
from grpo_cli.learner import (
    Learner,
    TrainingError,
    _logprobs,
    keep_freed_host_memory,
    own_mappings,
    refuse_sharded_lora,
)
from grpo_cli.logging import RunLogger, discard_wandb, start_wandb
from grpo_cli.logprobs import pack
from grpo_cli.loss import group_advantages
from grpo_cli.models import load_tokenizer, resolve
from grpo_cli.rewards import RewardScores, RewardSet, build_reward_set, shown
from grpo_cli.rollout import Engine, Sample, context_length, make_engine, sampling_from_config, special_stops
from grpo_cli.runs import check_run_dir, discard_new_run_dir, prepare_run_dir, unlock_run
from grpo_cli.schema import Config
from grpo_cli.sync import checkpoint_format, engine_logprob_diff, mixture_of_experts, push_weights


def train(cfg: Config) -> Path:
    """Run (or resume) a training run; returns its directory."""
    with _same_on_every_rank():
        check_run_dir(cfg)  # a bad output_dir, or a damaged checkpoint to resume, fails before anything loads
        if cfg.resume:
            check_resumable(Path(cfg.resume).expanduser())
        if distributed.launched_world() > 1:
            _check_several_learners(cfg, distributed.launched_world())
    device = distributed.setup()  # under torchrun: this rank's device, in the process group
    world, rank = distributed.world(), distributed.rank()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    rows = load_prompts(cfg.dataset, tokenizer)
    evaluates = cfg.trainer.eval_every or cfg.trainer.eval_before_train
    evaluation = PeriodicEval(cfg, tokenizer, rows) if evaluates else None
    rewards = build_reward_set({k: vars(v) for k, v in cfg.rewards.items()})
    lacking = rewards.missing_columns(rewards.columns_of(rows))
    with _same_on_every_rank():
        if lacking:
            raise UserError(lacking)
        special_stops(tokenizer, tuple(cfg.rollout.stop))  # a stop string that can never match: now, not at step 1
        run = _prepare_run(cfg)
    wandb_session = None
    try:
        wandb_session = start_wandb(run, cfg) if cfg.logging.wandb and distributed.is_main() else None
        if cfg.resume and distributed.is_main():
            checkpoint.remove_unfinished(run)
        learner = Learner(cfg, device, pad_id=tokenizer.pad_token_id)
        limit, limit_source = prompt_limit(cfg, learner.policy)
        fits, left_out = fitting_prompts(rows, tokenizer, limit, limit_source)
        if evaluation is not None:
            evaluation.check_prompt_lengths(tokenizer, limit, limit_source)
        start, position = 0, 0  # last finished step; prompts consumed so far
        data = {**data_fingerprint(rows), "seed": cfg.seed}  # what `position` counts in, saved with it
        data_changed = None  # a note when a resume finds other data than its checkpoint's position refers to
        latest = checkpoint.checkpoint_dirs(run)[-1:] if cfg.resume else []
        if latest:
            state = checkpoint.load(latest[0], learner)
            start = state["step"]
            position, data_changed = resume_position(state, data)
        rollout_cfg = cfg.rollout
        if evaluation is not None and cfg.rollout.engine in ("vllm", "vllm_server"):
            # Room for the evaluations' completions (eval.max_new_tokens may be longer than training's), as
            # grpo eval's engine has: else vLLM cuts them at its max_model_len and the figures differ (a
            # rollout server started with a shorter context is refused at start).
            longest = max(cfg.rollout.max_new_tokens, evaluation.sampling.max_new_tokens)
            rollout_cfg = dataclasses.replace(cfg.rollout, max_new_tokens=longest)
        engine = make_engine(rollout_cfg, cfg.model, resolve(cfg.model.name_or_path), policy=learner.policy,
                             run_dir=run)
        # The engine starts from the base weights: give it the resumed ones. Rollout servers may still
        # hold an earlier run's pushes, or another checkpoint of the model: give them this run's.
        if start or getattr(engine, "holds_other_weights", False):
            _push(engine, learner)
        logger = RunLogger(run, cfg, start, wandb_session) if distributed.is_main() else _Silent()  # rank 0 writes
    except BaseException:  # nothing trained: a new run's directory would only block the corrected command
        if wandb_session is not None:
            wandb_session.finish(exit_code=1)  # W&B's run shows as failed
        if not cfg.resume and distributed.is_main():
            discard_wandb(run)
            discard_new_run_dir(cfg, run)
        raise
    logger.message(f"run directory: {run}" + (f"  (resumed at step {start})" if start else ""))
    notes = (evaluation.notes + [greedy_note(evaluation.sampling), training_file_note(cfg)]) if evaluation else []
    if (cfg.rollout.engine == "vllm" and getattr(engine, "cuda", False) and not cfg.rollout.check_sync
            and mixture_of_experts(getattr(learner.policy, "config", None))):
        notes.append("note: weight pushes into vLLM on a GPU are tested on dense models; for a mixture-of-experts "
                     "model rollout.check_sync=true checks each push (sync/logprob_diff_max near 0)")
    for note in (data_changed, epoch_note(sum(fits), cfg), left_out, special_token_note(rows, tokenizer, "dataset"),
                 *notes):
        if note:
            logger.message(note)
    completed, completed_position = start, position  # the last step whose update finished, and its data position
    logged = start  # the last step whose metrics and samples are written: a checkpoint never goes past it
    check = cfg.rollout.check_sync and cfg.rollout.engine != "hf"  # hf samples from the learner's own weights
    sigterm = _SigtermStop(world)  # under torchrun, Ctrl-C too
    finished = False  # the W&B run of one that stops on an error (Ctrl-C included) shows as failed
    try:
        if evaluation is not None and cfg.trainer.eval_before_train and start == 0:
            # The starting weights' scores, as step 0: the baseline the run's evaluations compare with.
            logger.log(0, evaluation.run(engine, 0, run / "samples" if distributed.is_main() else None,
                                         say=logger.message))
        for step in range(start + 1, cfg.trainer.max_steps + 1):
            timer = _Timer()

            # ---------------------------------------------------------------- rollout + reward
            rounds: list[Round] = []
            while True:
                indices, position = prompt_indices(position, cfg.trainer.prompts_per_step, fits, cfg.seed)
                batch = [rows[i] for i in indices]
                # Several learners: each rank samples its own contiguous share of the prompts (whole
                # groups, so the advantages are exact), with its own seed.
                batch = batch[rank * len(batch) // world : (rank + 1) * len(batch) // world]
                seed = cfg.seed * 1_000_003 + step * 101 + len(rounds) + rank * 104_729
                rounds.append(collect(cfg, engine, rewards, batch, seed=seed, timer=timer))
                kept = sum(int(r.informative.sum()) for r in rounds)
                if (not cfg.trainer.dynamic_sampling or kept >= cfg.trainer.prompts_per_step
                        or len(rounds) > cfg.trainer.max_resample):
                    break
            first = rounds[0]  # what the step's metrics describe: the unfiltered first batch
            train_rows = training_rows(rounds, cfg)

            # ---------------------------------------------------------------- update
            with timer("learner"):
                learner.at_step(step)  # the schedule counts this step, whether or not it updates
                stats = {"update/skipped": 1.0}  # e.g. every completion truncated under mask_truncated
                if distributed.all_reduce([float(len(train_rows.samples))])[0]:  # on any rank (all must take part)
                    stats = learner.update([s.prompt_ids for s in train_rows.samples],
                                           [s.completion_ids for s in train_rows.samples],
                                           [s.logprobs for s in train_rows.samples], train_rows.advantages)
                    if device.type == "cpu":  # once the optimizer's state exists; later calls change nothing
                        keep_freed_host_memory()
            completed, completed_position = step, position

            # ---------------------------------------------------------------- sync
            checks: dict[str, float] = {}  # sync/logprob_diff_max, when rollout.check_sync
            with timer("sync"):
                # Checked pushes also follow the last step, so that every update's push is checked.
                synced = step % cfg.rollout.sync_every == 0 and (step < cfg.trainer.max_steps or check)
                if synced:
                    _push(engine, learner)
            if synced and check:
                with timer("sync_check"):
                    checks = check_sync(engine, learner, first.samples[0])

            # ---------------------------------------------------------------- eval
            eval_metrics: dict[str, float] = {}  # eval/<dataset>/<metric>, time/eval (not part of time/step)
            if evaluation is not None and evaluation.due(step):
                if not synced:  # the engine must sample with this step's weights
                    _push(engine, learner)
                    if check:
                        checks = check_sync(engine, learner, first.samples[0])
                # The ranks share the evaluation's engine calls and gather the samples; rank 0 writes.
                eval_metrics = evaluation.run(engine, step, run / "samples" if distributed.is_main() else None,
                                              say=logger.message)

            # ---------------------------------------------------------------- log
            if world > 1:  # the metrics describe every rank's completions, as one process's would
                first = merge_rounds(distributed.all_gather_object(first))
            generated, trained = distributed.all_reduce([
                float(sum(len(s.completion_ids) for r in rounds for s in r.samples)), float(train_rows.groups)])
            metrics = {**first.scores.metrics(), **_completion_metrics(cfg, first), **stats, **timer.seconds,
                       "tokens/generated": generated, "groups/trained": trained,
                       "rollout/rounds": float(len(rounds))}
            metrics["time/step"] = sum(timer.seconds.values())
            if device.type == "cuda":  # the step's peak of this process's GPU allocations (learner and engine)
                metrics["memory/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            with _whole_on_ctrl_c(world):  # the step is logged (and Ctrl-C saves it) or not at all
                logger.log(step, {**metrics, **checks, **eval_metrics})
                for label, message in first.scores.first_error.items():
                    logger.message(f"step {step}: reward {label} raised on {first.scores.errors[label]} "
                                   f"completion(s): {message}")
                logger.samples(step, _sample_records(first, cfg.logging.samples_per_step, _judge_label(cfg)))
                logged = step

            # ---------------------------------------------------------------- checkpoint
            saves = step % cfg.trainer.save_every == 0 or step == cfg.trainer.max_steps
            if saves:
                checkpoint.save(run, step, learner, tokenizer, cfg.trainer.keep_last, position, data)
            if step < cfg.trainer.max_steps and sigterm.requested(world):  # preempted: keep this step, then stop
                if not saves:
                    checkpoint.save(run, step, learner, tokenizer, cfg.trainer.keep_last, position, data)
                raise KeyboardInterrupt
            if os.environ.get("GRPO_CRASH_AFTER_STEP") == str(step):  # tests: a hard kill at a known point
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("GRPO_INTERRUPT_AFTER_STEP") == str(step):  # tests: Ctrl-C at a known point
                # To this thread: a process-wide kill may land on one of vLLM's or torch's threads, and
                # the KeyboardInterrupt then surfaces later, wherever the main thread happens to be.
                signal.raise_signal(signal.SIGINT)
        finished = True
    except KeyboardInterrupt:
        saved = (run / "checkpoints" / f"step-{completed:06d}").exists()
        # Never save a half-applied update, nor a step whose metrics are not written (stopped in its
        # eval, say): a resume would never log them. Several ranks may be stopped anywhere, out of step.
        if world == 1 and logged == completed > start and not saved and not learner.dirty:
            checkpoint.save(run, completed, learner, tokenizer, cfg.trainer.keep_last, completed_position, data)
        logger.message(f"interrupted after step {logged}; continue with: grpo train resume={run} "
                       f"({checkpoint.resume_point(run)})")
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        raise TrainingError(f"cannot write to {run} ({first_line(e)}); free space there (or make it writable), then "
                            f"resume the run: {checkpoint.resume_point(run)}") from None
    except torch.OutOfMemoryError:
        raise TrainingError("out of memory: lower trainer.micro_batch_size or rollout.max_new_tokens, set "
                            "model.gradient_checkpointing=true, or lower rollout.gpu_memory_utilization") from None
    except RuntimeError as e:
        if world > 1 and distributed.lost_peer(e):  # one line here; the failed rank printed the cause
            raise TrainingError(f"learner process {rank} stopped: another learner process failed (its error is "
                                "above; torchrun's summary names it as the root cause)") from None
        raise
    finally:
        sigterm.restore()
        logger.close(failed=not finished)
        engine.close()
        distributed.teardown()
        unlock_run(run)
    return run


def _push(engine: Engine, learner: Learner) -> None:
    """The learner's weights into the engine, under the names its checkpoint files use (checkpoint_format);
    the engine's new weights in their own mappings, not in the learner's heap (own_mappings)."""
    with own_mappings():
        push_weights(engine, checkpoint_format(learner.policy, learner.named_weights()))


@contextmanager
def _whole_on_ctrl_c(world: int) -> Iterator[None]:
    """Ctrl-C waits for the end of the block: writing a step's metrics and its samples takes
    milliseconds, and a Ctrl-C between the two left a step whose update was done but not counted as
    logged, so nothing was saved (every step since the last checkpoint lost). One process on the main
    thread only: under torchrun SIGINT already stops at the end of the step (_SigtermStop)."""
    if world > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class _SigtermStop:
    """SIGTERM (a cluster preempting the job, `kill PID`) stops the run at the end of the step under way,
    with that step saved, then as Ctrl-C does (the resume command printed); a second SIGTERM stops it at
    once. By default SIGTERM ended the process mid-step, losing every step since the last checkpoint
    without a word. Off the main thread Python cannot take signals: SIGTERM keeps its default there.

    Under torchrun Ctrl-C stops the same way: torchrun hands SIGINT to every rank, and a KeyboardInterrupt
    lands on each wherever it happens to be, so no rank could save (one may be in a collective the
    others have left): every step since the last checkpoint was lost. torchrun kills the ranks its
    --shutdown-timeout (30 s by default) after it passes a signal on: a longer step needs a longer one.
    A signal to every process of the job (Slurm's, `kill` of the whole tree) reaches a rank twice, from
    the sender and again from torchrun: a repeat within REPEAT_S seconds is that one, not a second."""

    REPEAT_S = 10.0

    def __init__(self, world: int = 1) -> None:
        self.received: float | None = None  # when the first signal came (time.monotonic)
        self.world = world
        main = threading.current_thread() is threading.main_thread()
        signals = [signal.SIGTERM] + ([signal.SIGINT] if world > 1 else [])
        self.previous = {s: signal.signal(s, self._handle) for s in signals} if main else {}
        self.note = " (torchrun stops the processes at its --shutdown-timeout, 30 s by default)" if world > 1 else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            if self.world > 1 and time.monotonic() - self.received < self.REPEAT_S:
                return  # the same signal, passed on by torchrun
            raise KeyboardInterrupt
        self.received = time.monotonic()
        # os.write: a signal handler may run in the middle of the console's own printing.
        name = signal.Signals(signum).name
        os.write(2, f"{name}: stopping at the end of this step, once it is saved (send {name} again to stop at "
                    f"once){self.note}\n".encode())

    def requested(self, world: int) -> bool:
        """Whether to stop after this step; with several learner processes, whether any rank got the
        signal (every rank calls it, in step, so they all stop at the same step)."""
        received = self.received is not None
        return bool(distributed.all_reduce([float(received)], "max")[0]) if world > 1 else received

    def restore(self) -> None:
        for signum, previous in self.previous.items():
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, previous)


def check_resumable(run: Path) -> None:
    """The checkpoint a resume starts from must be whole; if it is not, say which earlier one is."""
    found = checkpoint.checkpoint_dirs(run)
    problem = checkpoint.damage(found[-1]) if found else None
    if problem is None:
        return
    fix = (f"move it out of {found[-1].parent} to resume from {found[-2].name}, or start a new run" if len(found) > 1
           else "it is the run's only checkpoint: start a new run")
    raise UserError(f"checkpoint {found[-1]} is damaged: {problem}; {fix}")


def finished_step(cfg: Config) -> int | None:
    """The step a resumed run already reached, if that is trainer.max_steps or beyond (nothing to train)."""
    found = checkpoint.checkpoint_dirs(Path(cfg.resume).expanduser()) if cfg.resume else []
    step = checkpoint.step_of(found[-1]) if found else 0
    return step if found and step >= cfg.trainer.max_steps else None


def prompt_limit(cfg: Config, policy: torch.nn.Module) -> tuple[int, str]:
    """The longest prompt training samples from, in tokens, and the setting it comes from:
    rollout.max_prompt_tokens, or less when the model's context leaves no room for a completion."""
    context = context_length(getattr(policy, "config", None))
    if context is not None and context - 1 < cfg.rollout.max_prompt_tokens:
        return context - 1, f"the model's context of {context} tokens, less one for the completion"
    return cfg.rollout.max_prompt_tokens, "rollout.max_prompt_tokens"


# ----------------------------------------------------------------------------- several learners (torchrun)
@contextmanager
def _same_on_every_rank() -> Iterator[None]:
    """Mistakes every rank finds alike (the config, rank 0's verdict on the run directory): said once
    per node under torchrun (grpo_cli.cli), not once per GPU."""
    try:
        yield
    except SameOnEveryRank:
        raise
    except UserError as e:
        raise SameOnEveryRank(str(e)) from None


def _check_several_learners(cfg: Config, world: int) -> None:
    if cfg.trainer.prompts_per_step % world:
        raise UserError(f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} does not split over {world} learner "
                        f"processes: set it to a multiple of {world}")
    if cfg.trainer.dynamic_sampling:
        raise UserError("trainer.dynamic_sampling is not supported with several learner processes yet: "
                        "set trainer.dynamic_sampling=false or train in one process")
    refuse_sharded_lora(cfg)  # as the learner does, but before any loads and once per node, not once per GPU


def check_sync(engine: Engine, learner: Learner, probe: Sample) -> dict[str, float]:
    """`sync/logprob_diff_max` right after a push (rollout.check_sync): the engine's log-probs of the
    tokens of rank 0's `probe` against the learner's, at temperature 1 (grpo_cli.sync.engine_logprob_diff).
    The learner's side is computed in eval mode, as the engine samples: with dropout (model.lora_dropout)
    a train-mode forward differs from the pushed weights by the dropout noise, not by a bad push.
    Several learner processes: every rank calls it, in step (the sharded forward is collective)."""
    prompt_ids, completion_ids = distributed.broadcast_object((probe.prompt_ids, probe.completion_ids))
    was_training = learner.policy.training
    learner.policy.eval()
    try:
        with torch.no_grad():
            packed = pack([prompt_ids], [completion_ids], learner.pad_id, learner.device)
            expected = _logprobs(learner.policy, packed, 1.0)[0][0]  # (T,)
    finally:
        learner.policy.train(was_training)
    diff = engine_logprob_diff(engine, prompt_ids, completion_ids, expected)
    return {} if diff is None else {"sync/logprob_diff_max": diff}


def _prepare_run(cfg: Config) -> Path:
    """The run directory: rank 0 creates it (or checks it, on resume) and tells the others."""
    if distributed.world() == 1:
        return prepare_run_dir(cfg)
    run, error = None, None
    if distributed.is_main():
        try:
            run = prepare_run_dir(cfg)
        except UserError as e:
            error = str(e)
    run, error = distributed.broadcast_object((run, error))
    if error is not None:
        raise UserError(error)
    return run


class _Silent:
    """The logger of ranks other than 0: rank 0 alone writes metrics, samples and the console."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def samples(self, step: int, records: list[dict[str, Any]]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def merge_rounds(parts: list[Round]) -> Round:
    """The rounds of all ranks as one round, in rank order (what one process sampling every rank's
    prompts would hold)."""
    rows, samples, completions, advantages, informative = [], [], [], [], []
    total, invalid, per_reward, errors, first_error, invalid_counts = [], [], {}, {}, {}, {}
    for part in parts:
        samples += [dataclasses.replace(s, prompt_index=s.prompt_index + len(rows)) for s in part.samples]
        rows += part.rows
        completions += part.completions
        advantages.append(part.advantages)
        informative.append(part.informative)
        scores = part.scores
        total += scores.total
        invalid += scores.invalid
        for label, values in scores.per_reward.items():
            per_reward.setdefault(label, []).extend(values)
        for counts, into in ((scores.errors, errors), (scores.invalid_counts, invalid_counts)):
            for label, n in counts.items():
                into[label] = into.get(label, 0) + n
        for label, message in scores.first_error.items():
            first_error.setdefault(label, message)
    scores = RewardScores(total=total, per_reward=per_reward, errors=errors, first_error=first_error, invalid=invalid,
                          invalid_counts=invalid_counts)
    return Round(rows, samples, completions, scores, torch.cat(advantages), torch.cat(informative))


class Round(NamedTuple):
    """One generation round: P prompts, G completions each (grouped by prompt), and their scores."""

    rows: list[dict[str, Any]]  # P dataset rows
    samples: list[Sample]       # P * G, sample.prompt_index indexes rows
    completions: list[str]      # P * G texts as the rewards saw them (prefill put back in front)
    scores: RewardScores
    advantages: Tensor          # (P * G,)
    informative: Tensor         # (P,) bool: the group's rewards are not all equal


def collect(cfg: Config, engine: Engine, rewards: RewardSet, batch: list[dict[str, Any]], seed: int,
            timer: _Timer) -> Round:
    """Generate G completions for each prompt of `batch`, score them and turn scores into advantages."""
    with timer("rollout"):
        engine.wake()
        samples = engine.generate([r["prompt"] for r in batch], sampling_from_config(cfg.rollout, seed=seed))
        engine.sleep()
    with timer("reward"):
        completions, scores = rewards.score_samples(samples, batch, cfg.dataset.prefill)
        total = torch.tensor(scores.total, dtype=torch.float32)
        # Several learners: "batch" is every rank's rewards, as for one process sampling them all.
        batch_std = _std_over_ranks(total) if cfg.loss.adv_scale == "batch" and distributed.world() > 1 else None
        advantages = group_advantages(total, cfg.rollout.group_size, cfg.loss.adv_scale, cfg.loss.adv_eps,
                                      batch_std=batch_std)
        # A row whose reference answer cannot be checked teaches nothing: no advantage.
        advantages[torch.tensor(scores.invalid, dtype=torch.bool)] = 0.0
    grouped = advantages.view(-1, cfg.rollout.group_size)
    return Round(batch, samples, completions, scores, advantages, (grouped != 0).any(dim=1))


def _std_over_ranks(values: Tensor) -> float:
    """The sample std (ddof=1) of every rank's `values` together (each rank calls it, in step)."""
    x = values.double()
    n, total, squares = distributed.all_reduce([float(x.numel()), float(x.sum()), float((x * x).sum())])
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0


class TrainingRows(NamedTuple):
    samples: list[Sample]
    advantages: Tensor  # (N,)
    groups: int         # the groups that kept at least one completion (`groups/trained`)


def training_rows(rounds: list[Round], cfg: Config) -> TrainingRows:
    """The completions the learner trains on this step.

    Without dynamic sampling: every completion of the single round. With it: the informative
    groups of all rounds, the first `prompts_per_step` of them (all groups of the first round when
    none is informative, so the KL term still applies). `mask_truncated` then drops completions
    that hit max_new_tokens; their group's advantages were computed with them, as in DAPO.
    """
    G = cfg.rollout.group_size
    picked: list[tuple[Round, int]] = []  # (round, group index)
    for r in rounds:
        for g in range(len(r.rows)):
            if not cfg.trainer.dynamic_sampling or bool(r.informative[g]):
                picked.append((r, g))
    if cfg.trainer.dynamic_sampling:
        picked = picked[: cfg.trainer.prompts_per_step] or [(rounds[0], g) for g in range(len(rounds[0].rows))]
    samples, advantages, groups = [], [], 0
    for r, g in picked:
        before = len(samples)
        for i in range(g * G, (g + 1) * G):
            if cfg.trainer.mask_truncated and r.samples[i].truncated:
                continue
            samples.append(r.samples[i])
            advantages.append(r.advantages[i])
        groups += len(samples) > before
    return TrainingRows(samples, torch.stack(advantages) if advantages else torch.zeros(0), groups)


def epoch_note(usable: int, cfg: Config) -> str:
    """How the run's steps relate to the data: the steps in one epoch (a batch never spans two, so
    the rest of an epoch too short for one is skipped) and the epochs in trainer.max_steps."""
    per_step = cfg.trainer.prompts_per_step
    prompts = f"{usable} prompt{'s' * (usable != 1)}"
    if usable < per_step:
        return (f"data: {prompts}, fewer than the {per_step} a step takes (trainer.prompts_per_step): every "
                "step repeats some of them")
    epoch = usable // per_step
    steps = f"{epoch} step{'s' * (epoch != 1)}"
    if cfg.trainer.dynamic_sampling:  # a step's extra rounds take further prompts
        return f"data: {prompts}, {per_step} per round: an epoch is at most {steps}, fewer as dynamic sampling adds rounds"
    epochs = cfg.trainer.max_steps / epoch
    return (f"data: {prompts}, {per_step} per step: an epoch is {steps}; trainer.max_steps={cfg.trainer.max_steps} "
            f"is {epochs:.3g} epoch{'s' * (epochs != 1)}")


def prompt_indices(position: int, count: int, fits: Sequence[bool], seed: int) -> tuple[list[int], int]:
    """The next `count` rows of the data stream from `position`, and the position after them.

    The stream is the whole dataset in one seeded shuffle per epoch, epoch after epoch; `position`
    counts its entries (epoch * len(fits) + offset). Rows whose prompt does not fit (`fits[i]` False)
    are passed over where they fall, not removed, so a resume with another prompt limit changes
    which rows are skipped, never the order of the others. A batch does not straddle two epochs: the
    rest of an epoch too short for a whole batch is skipped (as a DataLoader's drop_last), so no
    batch holds a row twice, unless the dataset has fewer usable rows than one batch.

    Depends only on its arguments, so a resumed run (which saves `position`) sees exactly the data
    an uninterrupted one would.
    """
    n = len(fits)
    usable = torch.tensor(fits, dtype=torch.bool)
    whole_batches = int(usable.sum()) >= count
    indices: list[int] = []
    while len(indices) < count:
        epoch, offset = divmod(position, n)
        # Modulo 2**64, the seeds a torch.Generator takes (it reads a negative one as that, too): a large
        # seed (e.g. from `date +%s%N`) overflowed. Every seed that worked keeps its order.
        generator = torch.Generator().manual_seed((seed * 7919 + epoch) % (1 << 64))
        order = torch.randperm(n, generator=generator)[offset:]
        at = usable[order].nonzero()[:, 0]  # where this epoch's usable rows still to come stand in `order`
        if whole_batches and not indices and len(at) < count:
            position = (epoch + 1) * n  # too few left for a whole batch: on to the next epoch
            continue
        at = at[: count - len(indices)]
        indices += order[at].tolist()
        position = epoch * n + offset + int(at[-1]) + 1 if len(at) else (epoch + 1) * n
    return indices, position


def resume_position(state: dict[str, Any], data: dict[str, Any]) -> tuple[int, str | None]:
    """Where a resumed run goes on in the data stream (prompt_indices), and a note when the data changed.

    The saved position counts in the data the checkpoint was trained on (`state["data"]`: its rows'
    fingerprint and the order's seed). With the same data the run goes on exactly there. With other data
    (a file edited, dataset.size or seed overridden) the rest of the pass under way would be drawn from
    another shuffle, repeating some prompts of it and skipping others: the run starts the next pass over
    the new data instead, one not yet begun, as deterministic in the seed as any. A checkpoint from
    before fingerprints were saved goes on at its position, as it always did.
    """
    position, was = state["data_position"], state.get("data")
    if was is None or was == data:
        return position, None
    changes = []
    if was["rows"] != data["rows"]:
        changes.append(f"{was['rows']} -> {data['rows']} rows")
    elif was["sha256"] != data["sha256"]:
        changes.append(f"{data['rows']} rows, with other problems or answers")
    if was["seed"] != data["seed"]:
        changes.append(f"seed {was['seed']} -> {data['seed']}, which shuffles it")
    same_rows = (was["rows"], was["sha256"]) == (data["rows"], data["sha256"])
    what = "the training data's order" if same_rows else "the training data"
    step = state["step"]
    note = f"data: {what} changed since step {step} ({'; '.join(changes)}): starting a new pass over it at step {step + 1}"
    next_pass = -(-position // was["rows"])  # the first pass over the old data not yet begun
    return next_pass * data["rows"], note


class _Timer:
    """Seconds spent per phase of a step (`time/<phase>`), summed over repeated phases."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        key = f"time/{phase}"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start


def _completion_metrics(cfg: Config, r: Round) -> dict[str, float]:
    lengths = torch.tensor([len(s.completion_ids) for s in r.samples], dtype=torch.float32)
    groups = torch.tensor(r.scores.total, dtype=torch.float32).view(-1, cfg.rollout.group_size)
    metrics = {
        "completion/len_mean": lengths.mean().item(),
        "completion/len_max": lengths.max().item(),
        "completion/truncated_frac": sum(s.truncated for s in r.samples) / len(r.samples),
        "groups/zero_std_frac": (groups.amax(1) == groups.amin(1)).float().mean().item(),
    }
    reflecting = reflection_rate(r.completions, cfg.logging.reflection_words)
    if reflecting is not None:
        metrics["completion/reflection_rate"] = reflecting
    judge = _judge_label(cfg)
    if judge:
        correct = [value == 1.0 for value in r.scores.per_reward[judge]]
        metrics["accuracy"] = sum(correct) / len(r.samples)
        metrics.update(length_by_outcome([len(s.completion_ids) for s in r.samples], correct))
    return metrics


def reflection_pattern(words: Sequence[str]) -> re.Pattern[str] | None:
    """One regex for any of `words` (words or phrases, any case, any whitespace between the words of
    a phrase) standing whole: "wait" matches "Wait," but not "awaited". None when `words` is empty."""
    phrases = [r"\s+".join(re.escape(part) for part in w.split()) for w in words if w.split()]
    if not phrases:
        return None
    # Lookarounds rather than \b: \b needs a word character on its inner side, which "re-" would not have.
    return re.compile(rf"(?<!\w)(?:{'|'.join(phrases)})(?!\w)", re.IGNORECASE)


def reflection_rate(texts: Sequence[str], words: Sequence[str]) -> float | None:
    """The share of `texts` holding any of `words` (see `reflection_pattern`); None without words or texts."""
    pattern = reflection_pattern(words)
    if pattern is None or not texts:
        return None
    return sum(pattern.search(t) is not None for t in texts) / len(texts)


def length_by_outcome(lengths: Sequence[int], correct: Sequence[bool]) -> dict[str, float]:
    """`completion/len_correct_mean` and `completion/len_wrong_mean` (tokens); a key is left out when
    no completion of its kind exists, so the metric has no value at that step rather than a made-up one."""
    metrics: dict[str, float] = {}
    for name, want in (("correct", True), ("wrong", False)):
        picked = [n for n, ok in zip(lengths, correct, strict=True) if ok == want]
        if picked:
            metrics[f"completion/len_{name}_mean"] = sum(picked) / len(picked)
    return metrics


def _judge_label(cfg: Config) -> str | None:
    """The reward term whose full score (1.0) makes a completion right, as for `grpo eval` (evaluate.judge):
    the `reasoning_gym` term on a reasoning-gym dataset (the task's own scorer: countdown gives partial
    credit to a wrong, well-formed answer), else the `accuracy` term; None when the run has neither."""
    gym = reward_label(cfg, "reasoning_gym")
    return gym if gym is not None and cfg.dataset.source == "reasoning_gym" else reward_label(cfg, "accuracy")


def _sample_records(r: Round, limit: int, judge: str | None) -> list[dict[str, Any]]:
    records = []
    for i, sample in enumerate(r.samples[:limit]):
        row = r.rows[sample.prompt_index]
        records.append({
            "prompt": row["prompt"], "answer": None if row["answer"] is None else str(row["answer"]),
            "completion": r.completions[i], "reward": r.scores.total[i],
            "rewards": {k: shown(v[i]) for k, v in r.scores.per_reward.items()},
            "advantage": r.advantages[i].item(), "truncated": sample.truncated,
        })
        if judge is not None:  # the report filters samples by it
            records[-1]["correct"] = r.scores.per_reward[judge][i] == 1.0
    return records
