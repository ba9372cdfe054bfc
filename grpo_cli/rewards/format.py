"""Structure rewards for the R1-Zero "<think>...</think><answer>...</answer>" template:
`format` (all or nothing), `tag_count` (partial credit per tag) and `reasoning_steps`.

These cheap rewards teach the template early in training, before answers are right often
enough for `accuracy` to give signal.
"""

from __future__ import annotations

import re
from typing import Any

from .base import RewardFn
from .extract import answer_tag

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Tag contents may span lines but may not contain another think/answer tag (no nesting, no
# duplicates); only whitespace is allowed outside the two blocks.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT_RE = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)

_STEP_RES = (
    re.compile(r"\bStep\s*\d+\s*:"),  # "Step 1:"
    re.compile(r"^[ \t]*\d+\.(?!\d)", re.MULTILINE),  # "1. ..." at a line start; "0.5 ..." is a number
    re.compile(r"^[ \t]*[-*][ \t]", re.MULTILINE),  # "- ..." / "* ..." bullets
    re.compile(r"\b(?:First|Second|Next|Finally),"),
)


def format() -> RewardFn:  # noqa: A001 - the config name is "format"
    """1.0 iff the text is exactly one <think>...</think> followed by one <answer>...</answer>,
    with only whitespace around and between them. Contents may be multi-line; the reasoning may
    be empty (a short problem needs none), the answer may not: "<think></think><answer></answer>"
    follows no instruction, and `accuracy` reads an empty <answer> as no answer."""

    def format_reward(completions: list[str], **_: Any) -> list[float]:
        return [1.0 if _FORMAT_RE.fullmatch(text) and answer_tag(text).strip() else 0.0 for text in completions]

    return format_reward


def tag_count() -> RewardFn:
    """0.25 for each of <think>, </think>, <answer>, </answer> that occurs exactly once."""

    def tag_count_reward(completions: list[str], **_: Any) -> list[float]:
        return [0.25 * sum(text.count(tag) == 1 for tag in _TAGS) for text in completions]

    return tag_count_reward


def count_steps(text: str) -> int:
    return sum(len(pattern.findall(text)) for pattern in _STEP_RES)


def reasoning_steps() -> RewardFn:
    """min(1, markers / 3), counting "Step N:", lines starting with "N." (not a decimal such
    as "0.5") or a "-"/"*" bullet, and the words "First,", "Second,", "Next,", "Finally,"."""

    def reasoning_steps_reward(completions: list[str], **_: Any) -> list[float]:
        return [min(1.0, count_steps(text) / 3) for text in completions]

    return reasoning_steps_reward
