"""`grpo eval`: sample n completions per problem and report pass@k, maj@k and avg@n.

One code path with training: prompts come from `data.load_prompts` (same templates), completions
from the same rollout engine, and every completion is scored by the run's own reward set, with an
`accuracy` and a `format` term added at weight 0 when the set lacks them. So "correct" means
what the run's correctness reward means (`judge`): for a reasoning-gym task scored by the run's
`reasoning_gym` term, a full score from the task's own scorer (countdown has many right answers,
and a bare target number equals the one reference under math-verify); otherwise the `accuracy`
reward (final answer equal to the reference under math-verify). The reported reward is the one
training optimises.

Metrics per dataset (each a mean over problems, or over all completions for the rates):

- `pass@k`: the unbiased estimator `loss.pass_at_k(n, c, k)` from the c correct of n samples.
- `maj@k`: majority vote over the extracted answers of k samples, averaged over the n // k disjoint
  blocks of k consecutive samples (`majority_at_k`), so maj@1 equals avg@n. Right answers are one
  vote; so are wrong answers that are equal: of the same numeric value, or, under the `accuracy`
  judge, equal under math-verify ("(x+1)^2" and "x^2+2x+1"; `merge_votes`, at most VOTE_BUDGET_S
  of comparisons per dataset). A task's own scorer says only whether an answer is right, so under
  it other wrong answers vote by their text.
- `avg@n`: the fraction of all completions that are correct.
- `format_rate`, `len_mean` (completion tokens), `truncated_frac` (stopped by max_new_tokens).

What is evaluated: `eval.datasets`, options of conf/dataset/ (math500, aime24, ...) on split
`eval.split`, or JSON-lines files of held-out problems (data/test.jsonl, labelled by the file's stem)
read with the training dataset's columns; each asked in the prompt format of `dataset` (template,
system prompt, prefill), i.e. the format the model was trained in. When the list is empty, `dataset`
itself on split `eval.split`.

Left out on purpose: an LLM judge, and partial credit (a completion is correct or it is not).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from grpo_cli import distributed
from grpo_cli.config import (
    check_saved_config_overrides,
    compose,
    config_dir,
    eval_label,
    is_eval_file,
    resume_config,
    to_container,
)
from grpo_cli.data import load_prompts, load_rows, prompt_token_counts, special_token_note
from grpo_cli.errors import UserError
from grpo_cli.loss import pass_at_k
from grpo_cli.rewards import RewardSet, build_reward_set, shown
from grpo_cli.rewards.extract import extract_answer
from grpo_cli.rewards.mathcheck import CORRECT, default_checker
from grpo_cli.rollout import Engine, Sample, SamplingSettings
from grpo_cli.runs import atomic_write_text, check_output_dir, check_writable, fresh_dir, nearest_existing
from grpo_cli.schema import Config, DatasetConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPTS_PER_CALL = 64  # prompts per engine.generate call: paces progress (rollout.hf_max_rows bounds hf's batch)
VOTE_BUDGET_S = 300.0  # seconds of math-verify per dataset for joining equal wrong answers in maj@k


# ----------------------------------------------------------------------------- metrics (pure)
class Graded(NamedTuple):
    """One completion, scored."""

    answer: str | None  # the extracted final answer (extract.extract_answer); None when there is none
    correct: bool       # the judge (`judge`: accuracy, or a reasoning-gym task's scorer) gave 1
    formatted: bool     # the `format` reward gave 1
    tokens: int         # completion length in tokens
    truncated: bool     # stopped by max_new_tokens


_CORRECT = ("correct",)  # the vote of every correct answer: they all equal the reference, so each other

_DECIMAL = r"(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)"  # 12, 1,000, 0.5, .5, 3.
# A whole answer that is a number: a decimal, a/b, or \frac{a}{b} (\dfrac, \tfrac), signed.
_NUMBER_RE = re.compile(rf"([+-]?)(?:({_DECIMAL})(?:/({_DECIMAL}))?|\\[dt]?frac\{{({_DECIMAL})\}}\{{({_DECIMAL})\}})")


def number_value(answer: str) -> Fraction | None:
    """The exact value of an answer that is one number ("0.5", "1/2", "\\frac{1}{2}", "$-3.0$",
    "1,000"), or None for anything else (expressions, sets, text, a zero denominator)."""
    m = _NUMBER_RE.fullmatch("".join(answer.split()).strip("$"))
    if m is None:
        return None
    sign, decimal, over, frac_top, frac_bottom = m.groups()
    top, bottom = (decimal, over or "1") if decimal is not None else (frac_top, frac_bottom)
    denominator = Fraction(bottom.replace(",", ""))
    if denominator == 0:
        return None
    value = Fraction(top.replace(",", "")) / denominator
    return -value if sign == "-" else value


Vote = tuple[str, ...]
SameAnswers = Callable[[Sequence[tuple[str, str]]], list[bool]]
"""For each pair of (wrong) answers, whether they are the same answer: the vote-merging judge."""


def vote_key(g: Graded) -> Vote | None:
    """What a completion votes for before `merge_votes`; None abstains (no answer found).

    Every correct answer equals the reference under the judge, so all of them are one vote ("1/2"
    and "0.5" alike). Wrong answers must be pooled the same way, or maj@k is biased up: three
    wrong "0.5", "1/2", "\\frac{1}{2}" would lose to two right "3". So a wrong answer that is one
    number votes for its exact value (`number_value`); any other wrong answer for its text,
    whitespace-collapsed, until `merge_votes` joins texts the judge finds equal ("(x+1)^2" and
    "x^2+2x+1").
    """
    if g.correct:
        return _CORRECT
    if g.answer is None:
        return None
    value = number_value(g.answer)
    if value is not None:
        return ("number", f"{value.numerator}/{value.denominator}")
    return ("text", " ".join(g.answer.split()))


def merge_votes(groups: Sequence[Sequence[Graded]], ks: Sequence[int],
                same: SameAnswers | None) -> list[list[Vote | None]]:
    """What each completion votes for (`groups[p][i]`: problem p, sample i): `vote_key`, with the
    wrong text answers of a problem that `same` finds equal to each other, or to a wrong number of
    the problem, joined into one vote. `same=None` keeps `vote_key` (text equality).

    Per problem, the distinct wrong texts are taken in order of first appearance and each is compared
    with one representative per vote so far (the first answer of each; numbers first): it joins the
    first it equals, else starts a vote of its own. That is up to d * m + d * (d - 1) / 2 comparisons
    for d distinct texts and m distinct numbers (2,016 for 64 distinct texts), so only problems where
    joining votes can change a block's winner are merged (`_contested`). All problems advance together, one text per round,
    so each round is one batch for `same` (which may run them in parallel).
    """
    votes = [[vote_key(g) for g in group] for group in groups]
    if same is None:
        return votes
    reps: dict[int, list[tuple[str, Vote]]] = {}  # problem -> (representative answer, its vote)
    queue: dict[int, list[str]] = {}              # problem -> wrong texts still to place, in order
    for p, (group, keys) in enumerate(zip(groups, votes, strict=True)):
        if not any(_contested(keys[b * k:(b + 1) * k]) for k in ks for b in range(len(keys) // k)):
            continue
        firsts: dict[Vote, str] = {}  # each wrong vote's first answer, in order of first appearance
        for g, key in zip(group, keys, strict=True):
            if key is not None and key != _CORRECT and g.answer is not None:
                firsts.setdefault(key, g.answer)
        reps[p] = [(answer, key) for key, answer in firsts.items() if key[0] == "number"]
        queue[p] = [key[1] for key in firsts if key[0] == "text"][::-1]  # popped from the end
    joined: dict[tuple[int, str], Vote] = {}
    while queue:
        asked: list[tuple[int, str, int]] = []  # (problem, text, index of its first pair)
        pairs: list[tuple[str, str]] = []
        for p in list(queue):
            text = queue[p].pop()
            if not queue[p]:
                del queue[p]
            if reps[p]:
                asked.append((p, text, len(pairs)))
                pairs += [(rep, text) for rep, _ in reps[p]]
            else:
                reps[p].append((text, ("text", text)))
        answers = same(pairs) if pairs else []
        for p, text, start in asked:
            found = answers[start:start + len(reps[p])]
            hit = next((key for (_, key), equal in zip(reps[p], found, strict=True) if equal), None)
            if hit is None:
                reps[p].append((text, ("text", text)))
            else:
                joined[p, text] = hit
    return [[joined.get((p, key[1]), key) if key is not None and key[0] == "text" else key for key in keys]
            for p, keys in enumerate(votes)]


class MathVerifySame:
    """`SameAnswers` under math-verify, the `accuracy` judge: the first answer read as the reference,
    the second as the completion's, both as whole answers (an <answer> or \\boxed{} content), in the
    checker's worker processes (`mathcheck`: each comparison bounded by `timeout` seconds).

    Once comparisons have taken `budget` seconds in all, later pairs are answered "not the same"
    unasked and `skipped` counts them: a pathological dataset costs minutes, not hours. Measured on
    2 CPU cores: ~9 ms a comparison; 500 problems x 64 samples with many symbolic wrong answers
    needed 21,000 comparisons (190 s), with 16 samples 2,500 (20 s).
    """

    def __init__(self, budget: float = VOTE_BUDGET_S, timeout: float = 5.0, chunk: int = 256) -> None:
        self.budget, self.timeout, self.chunk = budget, timeout, chunk
        self.seconds = 0.0  # spent comparing so far
        self.compared = 0
        self.skipped = 0

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        same: list[bool] = []
        for start in range(0, len(pairs), self.chunk):
            part = pairs[start:start + self.chunk]
            if self.seconds >= self.budget:
                self.skipped += len(part)
                same += [False] * len(part)
                continue
            began = time.perf_counter()
            codes = default_checker().check([(a, b, True, True) for a, b in part], timeout=self.timeout)
            self.seconds += time.perf_counter() - began
            self.compared += len(part)
            same += [code == CORRECT for code in codes]
        return same


def _contested(block: Sequence[Vote | None]) -> bool:
    """Whether joining equal wrong votes could turn this block's majority from right to wrong: the
    right answer wins as votes stand, at least two wrong votes, one of them text, could join, and
    all the wrong votes together would reach the right answer's count."""
    counts = [key for key in block if key is not None]
    right = counts.count(_CORRECT)
    wrong = [key for key in counts if key != _CORRECT]
    return (0 < right <= len(wrong) and len(set(wrong)) > 1 and any(key[0] == "text" for key in wrong)
            and _winner(counts) == _CORRECT)


def _winner(votes: Sequence[Vote | None]) -> Vote | None:
    """The most voted of `votes` (ties: the one voted for first); None when nobody voted."""
    counts: dict[Vote, int] = {}  # insertion order = order of first vote
    for key in votes:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    most = max(counts.values())
    return next(key for key, count in counts.items() if count == most)


def majority_vote(group: Sequence[Graded], votes: Sequence[Vote | None] | None = None) -> bool:
    """Whether the majority answer of `group` is correct; False when no completion has an answer.
    `votes`: what each completion votes for (`merge_votes`), by default its `vote_key`.

    Ties go to the answer voted for first (lowest sample index): samples are drawn independently,
    so this is as fair as a coin flip, yet deterministic and reproducible from samples.jsonl.
    """
    return _winner([vote_key(g) for g in group] if votes is None else votes) == _CORRECT


def majority_at_k(group: Sequence[Graded], k: int, votes: Sequence[Vote | None] | None = None) -> float:
    """maj@k of one problem: `majority_vote` averaged over the len(group) // k disjoint blocks of k
    consecutive samples (a remainder of fewer than k is left out).

    Each block is k independent samples, so every block estimates maj@k; the first block alone would
    too, with n // k times the variance: maj@1 would be one sample's correctness while pass@1, the
    same quantity, averages all n.
    """
    votes = [vote_key(g) for g in group] if votes is None else votes
    blocks = len(group) // k
    return sum(majority_vote(group[b * k:(b + 1) * k], votes[b * k:(b + 1) * k]) for b in range(blocks)) / blocks


def summarize(groups: Sequence[Sequence[Graded]], ks: Sequence[int],
              same: SameAnswers | None = None) -> dict[str, float]:
    """The metrics of one dataset: `groups[p]` holds the n graded completions of problem p. `same`
    judges which wrong answers vote together in maj@k (`merge_votes`); None: equal text or number."""
    if not groups:
        raise ValueError("no problems to summarize")
    n = len(groups[0])
    if any(len(g) != n for g in groups):
        raise ValueError("every problem needs the same number of completions")
    flat = [g for group in groups for g in group]
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(g.correct for g in group), k) for group in groups) / len(groups)
    votes = merge_votes(groups, ks, same)
    for k in ks:
        metrics[f"maj@{k}"] = sum(majority_at_k(group, k, v) for group, v in zip(groups, votes, strict=True)) / len(groups)
    metrics[f"avg@{n}"] = sum(g.correct for g in flat) / len(flat)
    metrics["format_rate"] = sum(g.formatted for g in flat) / len(flat)
    metrics["len_mean"] = sum(g.tokens for g in flat) / len(flat)
    metrics["truncated_frac"] = sum(g.truncated for g in flat) / len(flat)
    return metrics


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """Datasets as columns, metrics as rows: stays narrow however many k values are asked for.
    Integers print as they are, `len_mean` with one decimal, rates with three."""
    labels = list(metrics)
    names = list(dict.fromkeys(name for values in metrics.values() for name in values))
    cells = [["metric", *labels]]
    for name in names:
        row = [name]
        for label in labels:
            value = metrics[label].get(name)
            row.append("-" if value is None else str(value) if isinstance(value, int)
                       else f"{value:.1f}" if name == "len_mean" else f"{value:.3f}")
        cells.append(row)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
             for row in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- what to evaluate
class EvalSet(NamedTuple):
    label: str                  # name in metrics: eval/<label>/<metric>
    dataset: DatasetConfig      # exactly as evaluated (prompt format included)
    rows: list[dict[str, Any]]  # the problems, prompts rendered (data.load_prompts)


def dataset_label(ds: DatasetConfig) -> str:
    """A short name for a dataset config: the reasoning-gym task, or the last part of the path."""
    if ds.source == "reasoning_gym":
        return ds.task
    name = Path(str(ds.path)).name
    return (Path(name).stem if ds.source == "jsonl" else name).lower()


def dataset_option(name: str) -> DatasetConfig:
    """conf/dataset/<name>.yaml as a DatasetConfig."""
    from omegaconf import OmegaConf

    path = config_dir() / "dataset" / f"{name}.yaml"
    ds: DatasetConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetConfig), OmegaConf.load(path)))
    if ds.source in ("hf", "jsonl") and not ds.path:
        fix = ("list the file itself, e.g. eval.datasets=[data/test.jsonl]" if ds.source == "jsonl" else
               f"evaluate such data as `dataset` instead: grpo eval dataset={name} dataset.path=...")
        raise UserError(f"eval.datasets: '{name}' is a template for your own data (it has no dataset.path); {fix}")
    return ds


def eval_file(path: str, training: DatasetConfig) -> DatasetConfig:
    """An `eval.datasets` entry that is a JSON-lines file, read with the training dataset's columns: a
    held-out file is most often split off the training data. A reasoning-gym run's columns are
    question / answer, the defaults of a `dataset=jsonl` file; a run on data without answers
    (answer_column null) reads the file's `answer`, since evaluation needs them."""
    return DatasetConfig(source="jsonl", path=path, problem_column=training.problem_column,
                         answer_column=training.answer_column or "answer")


def eval_datasets(cfg: Config) -> dict[str, DatasetConfig]:
    """label -> dataset to evaluate: the `eval.datasets` options and files in the prompt format of
    `dataset`, or `dataset` itself when that list is empty. Labels are unique (config.validate)."""
    if not cfg.eval.datasets:
        return {dataset_label(cfg.dataset): cfg.dataset}
    fmt = {"template": cfg.dataset.template, "system_prompt": cfg.dataset.system_prompt, "prefill": cfg.dataset.prefill}
    return {eval_label(entry): dataclasses.replace(eval_file(entry, cfg.dataset) if is_eval_file(entry)
                                                   else dataset_option(entry), **fmt)
            for entry in cfg.eval.datasets}


def load_eval_sets(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> list[EvalSet]:
    sets = []
    for label, ds in eval_datasets(cfg).items():
        if ds.answer_column is None:
            raise UserError(f"eval dataset {label}: dataset.answer_column=null, so it has no reference answers, which "
                            "pass@k and maj@k need; evaluate on data with answers (eval.datasets=[...])")
        try:
            rows = load_prompts(ds, tokenizer, split=cfg.eval.split, limit=cfg.eval.limit)
        except UserError as e:  # a JSON-lines file has no splits: name the file
            where = ds.path if ds.source == "jsonl" else f"split {cfg.eval.split}"
            raise UserError(f"eval dataset {label} ({where}): {e}") from None
        sets.append(EvalSet(label, ds, rows))
    return sets


def hold_out(sets: list[EvalSet], training: list[dict[str, Any]]) -> tuple[list[EvalSet], list[str]]:
    """The eval sets without the problems that are also training problems, and a note for each set
    that lost some. A seed or split of its own keeps two draws apart only where the task has far more
    problems than are drawn: one-digit chain sums repeat, and the quickstart's 2,000 training problems
    hold over half of the 200 of the chain_sum eval set. An evaluation of a training run then scores
    answers the model may have been rewarded for."""
    seen = {_problem_key(row) for row in training}
    kept, notes = [], []
    for eval_set in sets:
        rows = [row for row in eval_set.rows if _problem_key(row) not in seen]
        if not rows:
            raise UserError(f"eval dataset {eval_set.label}: all {len(eval_set.rows)} problems are also training "
                            "problems; evaluate on other data (eval.datasets=[...]) or hold problems out of training")
        if len(rows) < len(eval_set.rows):
            notes.append(f"eval dataset {eval_set.label}: left out {len(eval_set.rows) - len(rows)} of "
                         f"{len(eval_set.rows)} problems that are also training problems; {len(rows)} remain")
        kept.append(eval_set._replace(rows=rows))
    return kept, notes


def special_token_notes(sets: list[EvalSet], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """grpo_cli.data.special_token_note for each eval set that needs one."""
    return [note for s in sets if (note := special_token_note(s.rows, tokenizer, f"eval dataset {s.label}"))]


def hold_out_of_run(cfg: Config, sets: list[EvalSet],
                    training: list[dict[str, Any]] | None = None) -> tuple[list[EvalSet], list[str]]:
    """`hold_out` of a run's training problems, which are no test of it: `training`, the rows of the
    run in progress (trainer.eval_every), or for `grpo eval run=` its `dataset` read again. A run
    whose training data this machine cannot read (trained elsewhere, the file moved) is evaluated on
    every problem, with a note; one evaluated on its training file itself (`training_file_note`) too."""
    if training_file_note(cfg):
        return sets, []
    if training is None:
        try:
            training = load_rows(cfg.dataset)
        except UserError as e:
            return sets, [f"note: the run's training problems cannot be read ({e}), so none are left out of the "
                          "evaluation"]
    return hold_out(sets, training)


def _problem_key(row: dict[str, Any]) -> str:
    return " ".join(str(row["problem"]).split())


class EvalRewards(NamedTuple):
    """The reward set eval scores with, and the labels of the terms it reads correctness from."""

    rewards: RewardSet
    accuracy: str        # the `accuracy` term (math-verify against the reference)
    format: str          # the `format` term
    gym: str | None      # the run's `reasoning_gym` term, if it has one


def eval_reward_set(cfg: Config) -> EvalRewards:
    """The run's rewards plus `accuracy` and `format` at weight 0 where missing (the total is
    unchanged), with the labels `judge` and the format rate read."""
    terms: dict[str, dict[str, Any]] = {label: vars(term) for label, term in cfg.rewards.items()}
    labels = []
    for fn in ("accuracy", "format"):
        label = reward_label(cfg, fn)
        if label is None:
            label = fn if fn not in terms else f"{fn}_eval"
            terms[label] = {"fn": fn, "weight": 0.0, "args": {}}
        labels.append(label)
    return EvalRewards(build_reward_set(terms), labels[0], labels[1], reward_label(cfg, "reasoning_gym"))


def reward_label(cfg: Config, fn: str) -> str | None:
    """The label of the run's reward term whose function is `fn`, if it has one."""
    return next((label for label, t in cfg.rewards.items() if (t.fn or label) == fn), None)


def judge(rewards: EvalRewards, dataset: DatasetConfig) -> str:
    """The term whose score 1.0 means "correct" on `dataset`: the run's `reasoning_gym` term on a
    reasoning-gym task (the task's own scorer, as trained), else `accuracy`. Math-verify against
    the one reference cannot judge tasks with many right answers: on countdown it passes the bare
    target number, which the task's scorer gives 0.05."""
    if dataset.source == "reasoning_gym" and rewards.gym is not None:
        return rewards.gym
    return rewards.accuracy


def greedy_note(sampling: SamplingSettings) -> str | None:
    """What to tell a user who asked for several samples per problem at temperature 0."""
    if sampling.n > 1 and sampling.temperature == 0:
        return (f"note: eval.temperature=0 is greedy: the {sampling.n} samples of a problem are identical "
                "(set eval.temperature, e.g. 0.6, for pass@k / maj@k)")
    return None


def training_file_note(cfg: Config) -> str | None:
    """What to tell a user whose evaluation of a training run reads the training data: a JSON-lines
    file has no splits, so eval.split cannot keep its problems apart from training's. None once
    `eval.datasets` names what to evaluate (a held-out file, say)."""
    if cfg.eval.datasets or cfg.dataset.source != "jsonl":
        return None
    return (f"note: dataset.source=jsonl has no splits: the evaluation reads the training file {cfg.dataset.path} "
            f"itself (eval.split={cfg.eval.split} does not apply); for held-out problems list a file of other "
            "problems: eval.datasets=[data/test.jsonl]")


def sampling_settings(cfg: Config, seed: int) -> SamplingSettings:
    """Eval sampling: `eval.*`, with training's stop strings (the model learned to end there)."""
    return SamplingSettings(n=cfg.eval.n, max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                            temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, top_k=0,
                            stop=tuple(cfg.rollout.stop), seed=seed)


# ----------------------------------------------------------------------------- sampling + scoring
class SetResult(NamedTuple):
    label: str
    dataset: DatasetConfig
    problems: int
    metrics: dict[str, float]
    records: list[dict[str, Any]]  # one per completion: the lines of samples.jsonl
    warnings: list[str]


def generate(engine: Engine, prompts: list[str], sampling: SamplingSettings,
             on_progress: Callable[[int], None] | None = None) -> list[Sample]:
    """n samples per prompt, grouped by prompt in prompt order, generated PROMPTS_PER_CALL prompts at
    a time; call c gets the seed `seed + c`. An engine seeds each prompt by its index in the call, never
    by the call's other prompts (grpo_cli/rollout), so problem i's samples follow from i alone: the
    same whatever eval.limit leaves after it, and no two problems share a random stream.

    Under torchrun (evaluation during training) the calls are dealt over the ranks, call c to rank
    c % R, and the samples gathered on every rank: R times faster than each rank generating them all.
    A call's prompts and seed are those of one process, so the samples do not depend on R. Every rank
    makes as many engine calls (`own_calls`): a sharded hf engine generates in step with the others,
    and a rollout server batches the ranks' requests of one round."""
    starts = list(range(0, len(prompts), PROMPTS_PER_CALL))
    mine: dict[int, list[Sample]] = {}
    for call in own_calls(len(starts), distributed.rank(), distributed.world()):
        index = 0 if call is None else call
        start = starts[index]
        chunk = prompts[start:start + PROMPTS_PER_CALL]
        seed = None if sampling.seed is None else sampling.seed + index
        got = engine.generate(chunk, dataclasses.replace(sampling, seed=seed))
        if call is None:  # a repeat that keeps this rank in step: its samples are another rank's
            continue
        mine[call] = [dataclasses.replace(s, prompt_index=start + s.prompt_index) for s in got]
        if on_progress is not None:
            on_progress(len(chunk))
    if distributed.world() > 1:
        for part in distributed.all_gather_object(mine):
            mine.update(part)
    return [s for call in range(len(starts)) for s in mine[call]]


def own_calls(calls: int, rank: int, world: int) -> list[int | None]:
    """The calls rank `rank` of `world` makes when `calls` engine calls are dealt round-robin (call c
    to rank c % world): one a round, and None, a repeat of call 0 whose samples are dropped, where
    the last round has fewer calls than ranks."""
    rounds = -(-calls // world)
    return [c if c < calls else None for c in (r * world + rank for r in range(rounds))]


def evaluate_set(cfg: Config, engine: Engine, rewards: EvalRewards, eval_set: EvalSet,
                 sampling: SamplingSettings, on_progress: Callable[[int], None] | None = None) -> SetResult:
    """Sample, score and summarize one dataset."""
    rows = eval_set.rows
    samples = generate(engine, [r["prompt"] for r in rows], sampling, on_progress)
    # As in training, less the run's own reward functions that need a column this dataset lacks.
    scorer, left_out = rewards.rewards.for_columns(rewards.rewards.columns_of(rows))
    completions, scores = scorer.score_samples(samples, rows, eval_set.dataset.prefill)

    correct = scores.per_reward[judge(rewards, eval_set.dataset)]
    graded = [Graded(answer=extract_answer(text), correct=correct[i] == 1.0,
                     formatted=scores.per_reward[rewards.format][i] == 1.0, tokens=len(s.completion_ids),
                     truncated=s.truncated)
              for i, (text, s) in enumerate(zip(completions, samples, strict=True))]
    n = sampling.n
    # Wrong answers vote together when the judge finds them equal; a task's own scorer judges only
    # against its reference, so there they vote by equal number or text alone.
    same = MathVerifySame(VOTE_BUDGET_S) if judge(rewards, eval_set.dataset) == rewards.accuracy else None
    metrics = summarize([graded[p * n:(p + 1) * n] for p in range(len(rows))], cfg.eval.k, same)

    configured = set(cfg.rewards)
    records = []
    for i, (s, g) in enumerate(zip(samples, graded, strict=True)):
        records.append({
            "dataset": eval_set.label, "problem": s.prompt_index, "sample": i % n,
            "prompt": rows[s.prompt_index]["prompt"], "reference": str(rows[s.prompt_index]["answer"]),
            "completion": completions[i], "extracted": g.answer, "correct": g.correct, "format": g.formatted,
            "reward": scores.total[i],
            "rewards": {label: shown(values[i]) for label, values in scores.per_reward.items() if label in configured},
            "tokens": g.tokens, "truncated": g.truncated, "invalid": scores.invalid[i],
        })
    warnings = [f"{eval_set.label}: {note}" for note in left_out]
    warnings += [f"{eval_set.label}: reward {label} raised on {scores.errors[label]} completion(s): {message}"
                 for label, message in scores.first_error.items()]
    if same is not None and same.skipped:
        warnings.append(f"{eval_set.label}: maj@k: {same.skipped} of {same.skipped + same.compared} comparisons of "
                        f"wrong answers were left out after {same.seconds:.0f} s of math-verify; those answers voted "
                        "by their text (maj@k may be slightly high)")
    invalid = sum(scores.invalid)
    if invalid:  # every model scores 0 on such a problem: say which, so it can be fixed or left out
        bad = sorted({s.prompt_index for s, flagged in zip(samples, scores.invalid, strict=True) if flagged})
        which = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.append(f"{eval_set.label}: {invalid} of {len(samples)} completions could not be scored (e.g. a "
                        f"reference answer math-verify cannot parse), on {len(bad)} of {len(rows)} problems "
                        f"({which}); they count as wrong (\"invalid\" in samples.jsonl)")
    return SetResult(eval_set.label, eval_set.dataset, len(rows), metrics, records, warnings)


# ----------------------------------------------------------------------------- during training
class PeriodicEval:
    """`trainer.eval_every`: evaluate the training engine every N steps and at the last step (and, with
    `trainer.eval_before_train`, the starting weights as step 0).

    The problems are loaded once; every evaluation uses the same seed, so successive evaluations
    differ only by the weights. Completions go to samples/eval-step-NNNNNN.jsonl in the run.
    """

    def __init__(self, cfg: Config, tokenizer: PreTrainedTokenizerBase, training: list[dict[str, Any]]) -> None:
        """`training`: the run's training rows, whose problems are left out of the evaluation
        (`hold_out`; `notes` says how many) unless the evaluation reads the training file itself."""
        self.cfg = cfg
        self.sets, self.notes = hold_out_of_run(cfg, load_eval_sets(cfg, tokenizer), training)
        self.notes += special_token_notes(self.sets, tokenizer)
        self.rewards = eval_reward_set(cfg)
        self.sampling = sampling_settings(cfg, seed=cfg.seed)

    def check_prompt_lengths(self, tokenizer: PreTrainedTokenizerBase, limit: int, what: str) -> None:
        """Before training starts: an eval prompt longer than the engine takes would stop the run at
        its first evaluation (under torchrun, on the one rank whose share holds it)."""
        for eval_set in self.sets:
            lengths = prompt_token_counts([r["prompt"] for r in eval_set.rows], tokenizer)
            too_long = [n for n in lengths if n > limit]
            if too_long:
                raise UserError(f"eval dataset {eval_set.label}: {len(too_long)} of {len(lengths)} prompts have more "
                                f"than {limit} tokens ({what}; the longest has {max(too_long)}): raise the limit, or "
                                "leave the dataset out of eval.datasets")

    def due(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return every > 0 and (step % every == 0 or step == self.cfg.trainer.max_steps)

    def run(self, engine: Engine, step: int, samples_dir: Path | None, say: Callable[[str], None]) -> dict[str, float]:
        """`eval/<dataset>/<metric>` for every eval dataset, plus `time/eval`. The engine must hold
        the weights to evaluate. samples_dir None: the completions are not written."""
        start = time.perf_counter()
        engine.wake()  # on a GPU the engine sleeps while the learner trains
        try:
            results = [evaluate_set(self.cfg, engine, self.rewards, s, self.sampling) for s in self.sets]
        finally:
            engine.sleep()
        if samples_dir is not None:
            atomic_write_text(samples_dir / f"eval-step-{step:06d}.jsonl", samples_jsonl(results))
        metrics: dict[str, float] = {}
        for r in results:
            metrics.update({f"eval/{r.label}/{name}": value for name, value in r.metrics.items()})
            for line in r.warnings:
                say(f"eval: {line}")
            say(f"eval {r.label}  " + "  ".join(f"{name} {value:.3g}" for name, value in r.metrics.items()))
        metrics["time/eval"] = time.perf_counter() - start
        return metrics


# ----------------------------------------------------------------------------- grpo eval
class Target(NamedTuple):
    """What `grpo eval` evaluates and where its run lives (if it comes from one)."""

    cfg: Config          # model.name_or_path points at the checkpoint when there is one
    run: Path | None     # the training run the checkpoint belongs to
    checkpoint: Path | None


def load_target(overrides: list[str], config_dir_extra: str | Path | None) -> Target:
    """The config to evaluate with.

    `eval.run=RUN` (optionally with `eval.checkpoint=` a step number, a folder name such as
    step-000040, or a path): the run's saved config.yaml with key=value overrides on top, and the
    model from that checkpoint (the latest by default). `eval.checkpoint=FOLDER` inside a run's
    checkpoints/ means the same. Otherwise the usual composition (recipes, groups, overrides),
    with `eval.checkpoint=FOLDER` as the model when given.
    """
    run = _last_value(overrides, "eval.run")
    checkpoint = _last_value(overrides, "eval.checkpoint")
    if run is None and checkpoint is not None:
        folder = Path(checkpoint).expanduser()
        if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.yaml").is_file():
            run = str(folder.parent.parent)
    if run is None:
        cfg = compose(overrides, config_dir_extra)
        if checkpoint is None:
            return Target(cfg, None, None)
        folder = Path(checkpoint).expanduser()
        if not folder.is_dir():
            what = "a file, not a folder" if folder.exists() else "no such directory"
            raise UserError(f"checkpoint={checkpoint}: {what}; pass a checkpoint folder "
                            "(RUN/checkpoints/step-NNNNNN), a model folder, or run=RUN_DIR")
        return Target(_with_model(cfg, folder), None, folder)

    run_dir = Path(run).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"run={run}: not a run directory (no config.yaml); pass a folder `grpo train` wrote")
    if config_dir_extra is not None:
        raise UserError("--config-dir does not apply with run=: the run's saved config.yaml is used; drop --config-dir")
    check_saved_config_overrides("run", overrides, "eval.n=8",
                                 "choose other eval datasets with eval.datasets=[math500,...]")
    folder = _checkpoint_in(run_dir, checkpoint)
    cfg = resume_config(str(run_dir), [o for o in overrides if not o.startswith("eval.checkpoint=")])
    output_dir = _last_value(overrides, "output_dir")  # the run's own output_dir is where it trained
    cfg = dataclasses.replace(cfg, resume=None, output_dir=output_dir,
                              eval=dataclasses.replace(cfg.eval, run=str(run_dir), checkpoint=str(folder)))
    return Target(_with_model(cfg, folder), run_dir, folder)


def _last_value(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    return values[-1] if values and values[-1] not in ("", "null") else None


def _with_model(cfg: Config, folder: Path) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=str(folder.resolve())))


def _checkpoint_in(run_dir: Path, checkpoint: str | None) -> Path:
    from grpo_cli.checkpoint import TMP_PREFIX, checkpoint_dirs

    found = checkpoint_dirs(run_dir)
    if checkpoint is None:
        if not found:
            raise UserError(f"run={run_dir} has no complete checkpoint yet (nothing in {run_dir / 'checkpoints'}); "
                            "a run saves one every trainer.save_every steps and at its last step: evaluate it once "
                            "one is saved")
        return found[-1]
    by_name = {p.name: p for p in found}
    available = ", ".join(by_name) or "none"
    folders = run_dir / "checkpoints"
    given = Path(checkpoint).expanduser()
    # A path names that folder: never another one of the run's that has the same name.
    if len(given.parts) > 1 and given.resolve().parent != folders.resolve():
        raise UserError(f"checkpoint={checkpoint} is not in run={run_dir}'s {folders}: pass one of its checkpoints "
                        f"({available}), or drop run= to evaluate that folder")
    name = f"step-{int(checkpoint):06d}" if checkpoint.isdigit() else given.name
    if name in by_name:
        return by_name[name]
    if name.startswith(TMP_PREFIX):
        raise UserError(f"checkpoint={checkpoint}: an unfinished save (a run stopped while writing it), never "
                        f"complete; evaluate a complete checkpoint ({available})")
    if (folders / name).is_dir():  # a copy (step-000040-best) or one without its trainer_state.pt: eval needs the model
        return folders / name
    raise UserError(f"checkpoint={checkpoint}: no such checkpoint in {run_dir} (available: {available})")


def _check_checkpoint(target: Target) -> None:
    """A checkpoint or model folder that is not whole fails in one line, before vLLM reads it."""
    from grpo_cli.checkpoint import damage

    folder = target.checkpoint
    assert folder is not None
    other = "evaluate another checkpoint (checkpoint=STEP)" if target.run else "pass an intact model folder"
    if not (folder / "config.json").is_file():
        raise UserError(f"checkpoint={folder}: the folder holds no model (no config.json); pass a checkpoint "
                        "(RUN/checkpoints/step-NNNNNN) or a Hugging Face model folder")
    problem = damage(folder, trainer_state=False)
    if problem is not None:
        raise UserError(f"checkpoint {folder} is damaged: {problem}; {other}")


def output_dir(target: Target) -> Path:
    """Create the folder for the results: output_dir when given (it must be empty), else
    RUN/eval/<checkpoint>/<time> for a run's checkpoint, else runs/eval/<time>."""
    named = _named_output_dir(target.cfg)
    if named is not None:
        named.mkdir(parents=True, exist_ok=True)
        return named
    if target.run is not None and target.checkpoint is not None:
        return fresh_dir(target.run / "eval" / target.checkpoint.name)
    return fresh_dir(Path("runs") / "eval")


def _named_output_dir(cfg: Config) -> Path | None:
    return check_output_dir(cfg.output_dir) if cfg.output_dir else None


def check_output(target: Target) -> None:
    """The results' folder (`output_dir`) must be new or empty, and where it goes writable: checked
    before the work, which may take hours, not when the results are written."""
    named = _named_output_dir(target.cfg)
    if named is not None:
        where, what, fix = named, f"output_dir={target.cfg.output_dir}", "choose a writable folder"
    elif target.run is not None and target.checkpoint is not None:
        where, what = target.run / "eval", f"the results' folder (under {target.run / 'eval'})"
        fix = "set output_dir to a writable folder"
    else:
        where, what = Path("runs") / "eval", "the results' folder (under runs/eval, as no output_dir is set)"
        fix = "set output_dir to a writable folder, or run grpo from one"
    check_writable(nearest_existing(where).resolve(), what, fix)


def run_eval(target: Target, say: Callable[[str], None]) -> tuple[Path, list[SetResult]]:
    """`grpo eval`: evaluate, write results.json and samples.jsonl; returns their folder and the results."""
    import torch

    from grpo_cli.models import load_model, load_tokenizer, resolve
    from grpo_cli.rollout import make_engine, special_stops

    cfg = target.cfg
    start = time.perf_counter()
    check_output(target)  # one that already holds files, or cannot be written, fails now, not after the work
    if target.checkpoint is not None:
        _check_checkpoint(target)
    tokenizer = load_tokenizer(cfg.model)
    sets, held_out = load_eval_sets(cfg, tokenizer), []
    if target.run:
        sets, held_out = hold_out_of_run(cfg, sets)
    rewards = eval_reward_set(cfg)
    sampling = sampling_settings(cfg, seed=cfg.seed)
    special_stops(tokenizer, sampling.stop)  # a stop string that can never match: now, not after the engine starts
    say(f"evaluating {cfg.model.name_or_path} on {', '.join(f'{s.label} ({len(s.rows)})' for s in sets)}, "
        f"n={sampling.n}, temperature {sampling.temperature}")
    wandb_note = cfg.logging.wandb and ("note: grpo eval writes results.json and samples.jsonl, not to W&B "
                                        "(logging.wandb); trainer.eval_every=N logs evaluations to a run's W&B")
    for note in (greedy_note(sampling), target.run and training_file_note(cfg), *held_out,
                 *special_token_notes(sets, tokenizer), wandb_note):
        if note:
            say(note)
    policy = None
    if cfg.rollout.engine == "hf":  # generates with a model this process holds
        policy = load_model(cfg.model, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    # The engine leaves room for the eval completions, which may be longer than training's.
    rollout = dataclasses.replace(cfg.rollout, max_new_tokens=sampling.max_new_tokens)
    engine = make_engine(rollout, cfg.model, resolve(cfg.model.name_or_path), policy=policy)
    try:
        if getattr(engine, "holds_other_weights", False):  # rollout servers: nothing here pushes to them
            server, info = engine.other_weights[0]
            raise UserError(f"rollout server {server} holds other weights than {cfg.model.name_or_path} (it "
                            f"serves {info.get('model')}, weights version {info.get('weights_version')}): evaluate "
                            f"on a server started with model.name_or_path={cfg.model.name_or_path}, or with "
                            "rollout.engine=vllm")
        results = []
        for eval_set in sets:
            with _Progress(eval_set.label, len(eval_set.rows)) as advance:
                results.append(evaluate_set(cfg, engine, rewards, eval_set, sampling, advance))
            for line in results[-1].warnings:
                say(f"warning: {line}")
    finally:
        engine.close()
    out = output_dir(target)
    write_results(out, target, results, sampling, time.perf_counter() - start)
    return out, results


def write_results(out: Path, target: Target, results: list[SetResult], sampling: SamplingSettings,
                  seconds: float) -> None:
    cfg = target.cfg
    summary = {
        "model": cfg.model.name_or_path,
        "run": str(target.run) if target.run else None,
        "checkpoint": str(target.checkpoint) if target.checkpoint else None,
        "seed": sampling.seed,
        "metrics": {r.label: r.metrics for r in results},
        "datasets": {r.label: {**dataclasses.asdict(r.dataset), "eval_split": cfg.eval.split, "problems": r.problems}
                     for r in results},
        "sampling": dataclasses.asdict(sampling),
        "seconds": round(seconds, 2),
        "warnings": [line for r in results for line in r.warnings],  # also printed; kept beside the numbers
        "config": to_container(cfg),
    }
    atomic_write_text(out / "samples.jsonl", samples_jsonl(results))
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def samples_jsonl(results: list[SetResult]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for r in results for record in r.records)


class _Progress:
    """A progress bar over problems on a terminal (stderr); nothing otherwise."""

    def __init__(self, label: str, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.bar = Progress(TextColumn(f"[bold]eval {label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True, disable=not console.is_terminal)
        self.task = self.bar.add_task("", total=total)

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return lambda done: self.bar.advance(self.task, done)

    def __exit__(self, *_: object) -> None:
        self.bar.stop()
