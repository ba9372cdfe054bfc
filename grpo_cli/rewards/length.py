"""Length and degeneration penalties: DAPO's soft `overlong` punishment and an n-gram
`repetition_penalty` (both <= 0, meant to be added to a correctness reward)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .base import RewardFn


def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def repetition_penalty(ngram_size: int = 3, max_penalty: float = -1.0) -> RewardFn:
    """(1 - unique n-grams / total n-grams) * max_penalty over lower-cased whitespace-split
    words; 0 when there are fewer words than `ngram_size`."""
    ngram_size = _int_arg("ngram_size", ngram_size, 1)
    if isinstance(max_penalty, bool) or not isinstance(max_penalty, (int, float)) or not -math.inf < max_penalty <= 0:
        raise ValueError(f"max_penalty must be a finite number <= 0, got {max_penalty!r}")
    max_penalty = float(max_penalty)

    def repetition_penalty_reward(completions: list[str], **_: Any) -> list[float]:
        scores = []
        for text in completions:
            words = text.lower().split()
            if len(words) < ngram_size:
                scores.append(0.0)
                continue
            ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
            # "+ 0.0" turns -0.0 (no repetition) into 0.0.
            scores.append((1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty + 0.0)
        return scores

    return repetition_penalty_reward


def completion_lengths(completions: Sequence[str], columns: dict[str, Any]) -> list[int]:
    """Token counts from `completion_tokens` (token id lists or counts) or `completion_length`
    (counts) when the loop provides them, else character counts."""
    for name in ("completion_tokens", "completion_length"):
        col = columns.get(name)
        if col is not None:
            return [x if isinstance(x, int) else len(x) for x in col]
    return [len(text) for text in completions]


def overlong(max_len: int = 4096, buffer: int | None = 512) -> RewardFn:
    """DAPO soft overlong punishment: 0 up to `max_len - buffer`, then linearly down to -1 at
    `max_len`, and -1 beyond. Length is in tokens when a `completion_tokens` or
    `completion_length` column is given, else in characters. `max_len` should be the
    generation limit (conf/rewards/shaped.yaml takes it from rollout.max_new_tokens): set
    above it, the penalty may never apply. `buffer=None`: the last fifth of max_len, DAPO's
    proportion (4,096 of 20,480 tokens), so the penalty fits any generation limit."""
    max_len = _int_arg("max_len", max_len, 1)
    buffer = max(1, max_len // 5) if buffer is None else _int_arg("buffer", buffer, 1)
    if buffer > max_len:
        raise ValueError(f"buffer ({buffer}) must be <= max_len ({max_len}); lower buffer, e.g. to a quarter of max_len")
    start = max_len - buffer

    def overlong_reward(completions: list[str], **columns: Any) -> list[float]:
        scores = []
        for length in completion_lengths(completions, columns):
            if length <= start:
                scores.append(0.0)
            elif length <= max_len:
                scores.append((start - length) / buffer)
            else:
                scores.append(-1.0)
        return scores

    return overlong_reward
