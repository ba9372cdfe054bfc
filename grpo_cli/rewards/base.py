"""Reward plumbing shared by every reward family: the reward-function type, the per-row
"invalid" flag, and `RewardSet`, which scores a batch with several weighted rewards.

`RewardSet` isolates faults: a reward that raises must not stop training, so a failing batch
call is retried one completion at a time and only the completions that still fail score 0
(counted in `errors`, first message kept in `first_error` for logging once per step).
"""

from __future__ import annotations

import difflib
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpo_cli.data import opened_answer

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float | None]]
"""`fn(completions: list[str], **columns) -> list[float | None]`; columns are lists aligned with
`completions`; unknown columns must be accepted and ignored. None scores a completion the reward
does not apply to (a code reward on a math row of a mixed dataset): it adds nothing to the total,
counts as no error, and is left out of the reward's mean (kept as NaN in `per_reward`)."""

_MAX_ERROR_CHARS = 500

# What `RewardSet.score_samples` adds to a row's columns: each completion's token count and token ids.
SAMPLE_COLUMNS = ("completion_tokens", "completion_ids")


class FlaggedScores(list):
    """A `list[float]` plus an `invalid` mask of the same length.

    A reward returns this when some rows cannot be scored because the *reference* data is
    unusable (e.g. a gold answer math-verify cannot parse). Those rows score 0.0, so callers
    that ignore the mask still get a plain list of floats; `RewardSet` turns the mask into
    `RewardScores.invalid` so the training loop can skip the rows instead of learning from a
    reward that is meaningless.
    """

    def __init__(self, values: Sequence[float], invalid: Sequence[bool] | None = None):
        super().__init__(float(v) for v in values)
        self.invalid: list[bool] = [bool(x) for x in invalid] if invalid is not None else [False] * len(self)
        if len(self.invalid) != len(self):
            raise ValueError(f"invalid mask has {len(self.invalid)} entries for {len(self)} scores")


@dataclass
class RewardScores:
    """Scores of one batch. `per_reward` is unweighted, keyed by term label; `total` is the
    weighted sum. `invalid[i]` is True when any reward flagged row i as unscorable (its
    rewards are 0 and the loop should skip it); `invalid_counts` counts flags per label."""

    total: list[float]
    per_reward: dict[str, list[float]]
    errors: dict[str, int]
    first_error: dict[str, str]
    invalid: list[bool]
    invalid_counts: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`reward/<label>` (mean), `reward/<label>/errors` (count), `reward/mean`, `reward/std`
        (population std of the total) and `reward/invalid` (rows flagged). Means and std are
        over the rows that are not invalid, since those are the rows the loop trains on."""
        valid = [i for i, bad in enumerate(self.invalid) if not bad]
        out: dict[str, float] = {}
        for label, values in self.per_reward.items():
            applies = [values[i] for i in valid if not math.isnan(values[i])]
            # NaN (logged as null) when the reward applied to none of the rows, which 0 would misstate.
            out[f"reward/{label}"] = _mean(applies) if applies or not valid else math.nan
            out[f"reward/{label}/errors"] = float(self.errors.get(label, 0))
        totals = [self.total[i] for i in valid]
        out["reward/mean"] = _mean(totals)
        out["reward/std"] = statistics.pstdev(totals) if len(totals) > 1 else 0.0
        out["reward/invalid"] = float(len(self.invalid) - len(valid))
        return out


def shown(score: float) -> float | None:
    """A per-reward score as samples files record it: None where the reward did not apply (NaN)."""
    return None if math.isnan(score) else score


def suggestion(name: str, options: Any) -> str:
    """" (did you mean 'x'?)" for the option closest to `name`, else "": rewards' messages name one."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class RewardTerm:
    """One configured reward: `label` (config key, used in metrics), registry name `fn`,
    `weight` in the total, the `args` it was built with and the built reward `reward`."""

    label: str
    fn: str
    weight: float
    args: Mapping[str, Any]
    reward: RewardFn


def _format_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    return msg if len(msg) <= _MAX_ERROR_CHARS else msg[: _MAX_ERROR_CHARS - 3] + "..."


def _as_row_values(out: Any, n: int) -> tuple[list[float], list[bool], list[str | None]]:
    """Validate a reward's output: returns values, invalid mask and a per-row error (a
    non-finite or non-numeric value is that row's error). A wrong length raises."""
    # Any sized iterable but text or a mapping: a list, a tuple, a numpy array, a 1-D tensor (as TRL takes).
    if isinstance(out, (str, bytes, Mapping)) or not (hasattr(out, "__len__") and hasattr(out, "__iter__")):
        raise TypeError(f"reward returned {type(out).__name__}, expected a list of floats")
    if len(out) != n:
        raise ValueError(f"reward returned {len(out)} scores for {n} completions")
    invalid = list(getattr(out, "invalid", None) or [False] * n)
    values: list[float] = []
    row_errors: list[str | None] = []
    for v in out:
        if v is None:  # the reward does not apply to this completion
            values.append(math.nan)
            row_errors.append(None)
            continue
        try:
            if isinstance(v, (str, bytes)):  # float("1.0") would take text for the number it spells
                raise TypeError
            f = float(v)
        except (TypeError, ValueError):
            values.append(0.0)
            row_errors.append(f"TypeError: non-numeric reward {v!r:.80}")
            continue
        if math.isfinite(f):
            values.append(f)
            row_errors.append(None)
        else:
            values.append(0.0)
            row_errors.append(f"ValueError: non-finite reward {f}")
    return values, invalid, row_errors


_MALFORMED_WARNED: set[str] = set()  # rewards already warned of a malformed batch result


def call_isolated(
    fn: RewardFn, completions: Sequence[str], columns: Mapping[str, Sequence[Any]], name: str | None = None
) -> tuple[list[float], list[bool], list[str | None]]:
    """Call `fn` on the batch; if it raises (or returns a malformed result), call it once per
    completion so only the completions that really fail get 0. Returns values, the invalid
    mask and the per-row error message (None where the row scored fine). A malformed batch
    result (wrong length, not a list) is warned of once per `name` (default: the function's)."""
    n = len(completions)
    malformed = False  # the call returned, but not one score per completion
    try:
        out = fn(list(completions), **{k: list(v) for k, v in columns.items()})
    except Exception as exc:  # noqa: BLE001 - untrusted reward code must not stop training
        failure: Exception = exc
    else:
        try:
            return _as_row_values(out, n)
        except (TypeError, ValueError) as exc:
            failure, malformed = exc, True
    if n <= 1:
        return [0.0] * n, [False] * n, [_format_error(failure)] * n
    if not malformed:
        logger.debug("reward %r failed on the batch, retrying per completion: %s", fn, failure)
    else:
        # Each completion alone may then score, so no row counts as an error: say once that the
        # function is wrong, and that every step now makes one call per completion.
        name = name or getattr(fn, "__name__", repr(fn))
        if name not in _MALFORMED_WARNED:
            _MALFORMED_WARNED.add(name)
            logger.warning("reward %s: %s; scoring one completion per call instead (slower). Return "
                           "one score (or None) per completion", name, failure)
    values, invalid, row_errors = [], [], []
    for i in range(n):
        try:
            v, inv, err = _as_row_values(fn([completions[i]], **{k: [c[i]] for k, c in columns.items()}), 1)
        except Exception as exc:  # noqa: BLE001
            v, inv, err = [0.0], [False], [_format_error(exc)]
        values += v
        invalid += inv
        row_errors += err
    return values, invalid, row_errors


def _lacking(term: RewardTerm, columns: Sequence[str]) -> list[str]:
    """The columns the term's function needs (`required`, grpo_cli.rewards.custom) that are not in `columns`."""
    return sorted(set(getattr(term.reward, "required", ())) - set(columns))


def _row_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The row columns rewards are passed: all but a dataset's own `completions`, the name the rollout's
    completions are passed under (every row has the same columns, grpo_cli.data.load_rows)."""
    return [key for key in (rows[0] if rows else ()) if key != "completions"]


class RewardSet:
    """Weighted set of rewards, built from config by `build_reward_set`."""

    def __init__(self, terms: Sequence[RewardTerm]):
        if not terms:
            raise ValueError("a reward set needs at least one reward")
        labels = [t.label for t in terms]
        if len(set(labels)) != len(labels):
            raise ValueError(f"duplicate reward labels in {labels}")
        self.terms: tuple[RewardTerm, ...] = tuple(terms)

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.terms]

    def missing_columns(self, columns: Sequence[str]) -> str | None:
        """What is wrong when a term's function needs a column that is not among `columns` (the user's
        own functions name theirs: grpo_cli.rewards.custom), else None. Called before training, so
        that a missing column is an error then, not a reward of 0 on every completion."""
        for term in self.terms:
            lacking = _lacking(term, columns)
            if lacking:
                from grpo_cli.rewards import REWARDS

                fix = (f"drop the term with ~rewards.{term.label}, or choose data that has it" if term.fn in REWARDS
                       else f"add it to the data, pass it in rewards.{term.label}.args, or give the parameter a default")
                return (f"rewards.{term.label} ({term.fn}) needs the column '{lacking[0]}', which the dataset "
                        f"lacks (it has {', '.join(sorted(columns))}): {fix}")
        return None

    def for_columns(self, columns: Sequence[str]) -> tuple[RewardSet, list[str]]:
        """This set without the terms that need a column not among `columns` (an eval dataset other
        than the training data), and a note on each term left out."""
        kept = [t for t in self.terms if not _lacking(t, columns)]
        notes = [f"reward {t.label} needs the column '{_lacking(t, columns)[0]}', which this dataset lacks: it is left "
                 "out of the reward total" for t in self.terms if t not in kept]
        return (RewardSet(kept) if notes else self), notes

    def score_samples(self, samples: Sequence[Any], rows: Sequence[Mapping[str, Any]],
                      prefill: str = "") -> tuple[list[str], RewardScores]:
        """Score rollout samples (`grpo_cli.rollout.Sample`: .text, .prompt_index, .completion_ids)
        against the dataset rows of their prompts, as training and evaluation both do: the
        assistant prefill (after a <think> the chat template opened: `data.opened_answer`) is put
        back in front of each text, every row column is aligned with the completions, and the
        SAMPLE_COLUMNS are added. Returns the scored texts and the scores."""
        # Per prompt: a chat template may open the answer itself (e.g. with "<think>\n").
        prefixes = {i: opened_answer(str(rows[i].get("prompt", "")), prefill)
                    for i in {s.prompt_index for s in samples}}
        completions = [prefixes[s.prompt_index] + s.text for s in samples]
        columns = {key: [rows[s.prompt_index][key] for s in samples] for key in _row_columns(rows)}
        columns["completion_tokens"] = [len(s.completion_ids) for s in samples]
        columns["completion_ids"] = [list(s.completion_ids) for s in samples]
        return completions, self.score(completions, **columns)

    @staticmethod
    def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
        """The columns `score_samples` passes the rewards for these rows."""
        return [*_row_columns(rows), *SAMPLE_COLUMNS]

    def score(self, completions: Sequence[str], **columns: Sequence[Any]) -> RewardScores:
        n = len(completions)
        for name, col in columns.items():
            # A misaligned column is a bug in the caller, not in a reward: fail loudly.
            if isinstance(col, (str, bytes)) or not hasattr(col, "__len__") or len(col) != n:
                got = len(col) if hasattr(col, "__len__") else type(col).__name__
                raise ValueError(f"column {name!r} must be a list aligned with {n} completions, got {got}")
        total = [0.0] * n
        invalid = [False] * n
        per_reward: dict[str, list[float]] = {}
        errors: dict[str, int] = {}
        first_error: dict[str, str] = {}
        invalid_counts: dict[str, int] = {}
        for term in self.terms:
            values, inv, row_errors = call_isolated(term.reward, completions, columns, term.label)
            messages = [e for e in row_errors if e is not None]
            errors[term.label] = len(messages)
            if messages:
                first_error[term.label] = messages[0]
            invalid_counts[term.label] = sum(inv)
            per_reward[term.label] = values
            for i in range(n):
                if not math.isnan(values[i]):  # NaN: the reward does not apply (a None score)
                    total[i] += term.weight * values[i]
                invalid[i] = invalid[i] or inv[i]
        return RewardScores(total, per_reward, errors, first_error, invalid, invalid_counts)
