"""`reasoning_gym`: score answers with reasoning-gym's own per-task scorer.

Each row carries the item's `metadata` (as reasoning-gym produced it; `source_dataset` names
the task), `answer` and `question`; the entry dict is rebuilt and handed to the task's
`score_answer`. Rows whose task cannot be identified are flagged invalid, not scored 0.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from .base import FlaggedScores, RewardFn
from .extract import answer_or_text

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _scorer(task: str) -> Callable[..., float] | None:
    import reasoning_gym  # heavy import: only when this reward is used

    try:
        # Builds a default-config dataset object per call: cache it per task.
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError:
        logger.warning("reasoning_gym: unknown task %r; rows flagged invalid", task)
        return None


def _metadata(value: Any) -> dict | None:
    if isinstance(value, str):  # datasets often store nested dicts as JSON strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def reasoning_gym_reward() -> RewardFn:
    """reasoning-gym's score for the extracted answer (<answer> content, else the text after
    </think>, else the whole text, stripped). Columns: `answer`, `metadata`, `question`."""

    def reasoning_gym_score(
        completions: list[str], answer: Sequence[Any], metadata: Sequence[Any],
        question: Sequence[Any] | None = None, **_: Any,
    ) -> list[float]:
        scores, invalid = [], []
        for i, text in enumerate(completions):
            meta = _metadata(metadata[i])
            task = meta.get("source_dataset") if meta else None
            scorer = _scorer(task) if isinstance(task, str) else None
            if scorer is None:
                scores.append(0.0)
                invalid.append(True)
                continue
            entry = {"question": question[i] if question is not None else "", "answer": answer[i], "metadata": meta}
            scores.append(float(scorer(answer_or_text(text), entry)))
            invalid.append(False)
        return FlaggedScores(scores, invalid)

    # Checked before training (RewardSet.missing_columns): on data that is not reasoning-gym's (gsm8k,
    # math) every call raised for want of `metadata` and the term scored 0 all run, with a note per step.
    reasoning_gym_score.required = ("metadata",)  # type: ignore[attr-defined]
    return reasoning_gym_score
