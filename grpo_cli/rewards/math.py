"""Answer-correctness rewards for math: `accuracy` and the length-shaped `cosine_length`.

Both extract the completion's final answer (`extract.extract_answer`) and the reference's
(`extract.gold_answer`: plain answer, GSM8K '#### N' or MATH \\boxed{}) and compare them with
math-verify in time-bounded worker processes (`mathcheck`). An answer taken from a \\boxed{} or
an <answer> is a whole answer, which the checker may read as math-verify reads a box, so a
text answer such as \\text{Devon} or "odd" is compared as a string. A reference math-verify
cannot parse is flagged invalid (reward 0, `FlaggedScores.invalid`) rather than silently scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .base import FlaggedScores, RewardFn
from .extract import final_answer, is_number_arithmetic, is_plain_number, reference_answer
from .length import completion_lengths
from .mathcheck import CORRECT, GOLD_INVALID, default_checker


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_answers(completions: Sequence[str], answer: Sequence[Any], timeout: float) -> list[str]:
    """One `mathcheck` code per completion (CORRECT, WRONG, GOLD_INVALID, TIMEOUT, ERROR)."""
    if len(answer) != len(completions):
        raise ValueError(f"'answer' has {len(answer)} entries for {len(completions)} completions")
    pairs = []
    for text, ref in zip(completions, answer, strict=True):
        if ref is None:
            raise ValueError("reference 'answer' is None")
        # Empty prediction still goes to the worker so an unparseable gold gets flagged.
        gold, gold_boxed = reference_answer(str(ref))
        pred, pred_boxed = final_answer(text)
        if pred and is_number_arithmetic(pred) and is_plain_number(gold):
            pred = ""  # "4 - 1" for 3 copies the question: it is no answer (see `accuracy`)
        pairs.append((gold, pred or "", gold_boxed, pred_boxed))
    return default_checker().check(pairs, timeout=timeout)


def accuracy(timeout: float = 5.0) -> RewardFn:
    """1.0 if the final answer equals the reference `answer` column under math-verify, else 0.0.

    Which answer counts: the last <answer>...</answer>, else the last \\boxed{}, else a final
    '#### N', else the last number in the text (`extract.final_answer`); earlier ones never do,
    so "\\boxed{1} or \\boxed{2}" answers 2, and a list of candidates ("1, 2, 3") is a tuple that
    equals no single number. Where the reference is a number, an answer that is arithmetic on
    numbers left undone ("4 - 1", "2 \\times 3"; `extract.is_number_arithmetic`) scores 0 although
    math-verify evaluates it: on arithmetic tasks (chain_sum, basic_arithmetic) it is the
    question copied, and the policy would learn to copy. "4 - 1 = 3" is an answer of 3.

    `timeout`: seconds per check; the worker interrupts the check at `timeout` and is killed
    and replaced if it is still stuck one second later. Timed-out checks score 0.
    """
    timeout = _positive("timeout", timeout)

    def accuracy_reward(completions: list[str], answer: Sequence[Any], **_: Any) -> list[float]:
        codes = check_answers(completions, answer, timeout)
        return FlaggedScores([1.0 if c == CORRECT else 0.0 for c in codes], [c == GOLD_INVALID for c in codes])

    return accuracy_reward


def cosine_value(length: int, max_len: int, lo: float, hi: float) -> float:
    """hi at length 0 falling along a half cosine to lo at max_len (length clamped)."""
    c = math.cos(math.pi * min(length, max_len) / max_len)
    return lo + 0.5 * (hi - lo) * (1.0 + c)


def cosine_length(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
    timeout: float = 5.0,
    unit: str = "characters",
    exceed_penalty: float | None = None,
) -> RewardFn:
    """Correctness-aware length shaping (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
    Reasoning in LLMs"), length L clamped to `max_len`.

    Correct: from `max_value_correct` at L=0 down to `min_value_correct` at `max_len`;
    wrong: from `min_value_wrong` at L=0 up to `max_value_wrong` at `max_len`. So short correct
    answers earn most and short wrong answers are punished most (long reasoning on hard
    problems is punished less). Correctness is checked exactly as in `accuracy`.

    `unit`: "characters" (the default, as before) or "tokens", the paper's unit, taken from the
    `completion_tokens` column that training and `grpo eval` pass (or `completion_length`; bare
    texts without either are measured in characters). Characters stay the default because
    existing runs and tests rely on it: with a short generation limit most completions have the
    same token count, so only their character lengths tell them apart.

    `exceed_penalty`: when set, a completion with L >= `max_len` scores it whatever its answer
    (the paper's exceed-length penalty, -10 on its scale). It means "cut off at the length
    limit" with unit=tokens and max_len = rollout.max_new_tokens. Off by default: its value
    depends on the scale of the other four values, and it only means "cut off" in that setting.
    """
    values = {
        "min_value_wrong": min_value_wrong,
        "max_value_wrong": max_value_wrong,
        "min_value_correct": min_value_correct,
        "max_value_correct": max_value_correct,
    }
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if min_value_wrong > max_value_wrong:
        raise ValueError(f"min_value_wrong ({min_value_wrong}) must be <= max_value_wrong ({max_value_wrong})")
    if min_value_correct > max_value_correct:
        raise ValueError(
            f"min_value_correct ({min_value_correct}) must be <= max_value_correct ({max_value_correct})"
        )
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    timeout = _positive("timeout", timeout)
    if unit not in ("characters", "tokens"):
        raise ValueError(f"unit must be 'characters' or 'tokens', got {unit!r}")
    if exceed_penalty is not None and (
        isinstance(exceed_penalty, bool) or not isinstance(exceed_penalty, (int, float))
        or not math.isfinite(exceed_penalty)
    ):
        raise ValueError(f"exceed_penalty must be a finite number or null (off), got {exceed_penalty!r}")

    def cosine_length_reward(completions: list[str], answer: Sequence[Any], **columns: Any) -> list[float]:
        codes = check_answers(completions, answer, timeout)
        scores = []
        lengths = completion_lengths(completions, columns) if unit == "tokens" else [len(t) for t in completions]
        for length, code in zip(lengths, codes, strict=True):
            if code == GOLD_INVALID:
                scores.append(0.0)
            elif exceed_penalty is not None and length >= max_len:
                scores.append(float(exceed_penalty))
            elif code == CORRECT:
                scores.append(cosine_value(length, max_len, min_value_correct, max_value_correct))
            else:
                scores.append(cosine_value(length, max_len, max_value_wrong, min_value_wrong))
        return FlaggedScores(scores, [c == GOLD_INVALID for c in codes])

    return cosine_length_reward
