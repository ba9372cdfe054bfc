"""Reward functions for GRPO and the registry the config refers to them by.

A reward is `fn(completions: list[str], **columns) -> list[float]`, where columns are dataset
columns aligned with the completions (extra ones are ignored). Every reward is built by a
factory in `REWARDS` that validates its arguments; `build_reward(name, **args)` builds one and
`build_reward_set(terms)` builds the weighted set described by the config:

    rewards:
      accuracy: {weight: 1.0}
      format: {weight: 0.5}
      rep: {fn: repetition_penalty, weight: 1.0, args: {ngram_size: 3, max_penalty: -1.0}}

A term's `fn` may also name the user's own function, `FILE.py:FUNCTION` or `package.module:FUNCTION`
(grpo_cli.rewards.custom).

`RewardSet.score(completions, **columns)` returns `RewardScores` (weighted total, unweighted
per-reward values, error counts, rows to skip) with faults isolated per completion.
"""

from __future__ import annotations

import inspect
import math as _math  # "math" below is this package's math-rewards module
from collections.abc import Callable, Mapping
from typing import Any

# Submodules are imported as modules (not their same-named factories: format, code) so that
# `grpo_cli.rewards.format` etc. keep meaning the module.
from . import code, custom, format, gym, language, length, math, model
from .base import FlaggedScores, RewardFn, RewardScores, RewardSet, RewardTerm, shown, suggestion

__all__ = [
    "ANSWER_REWARDS", "REWARDS", "FlaggedScores", "RewardFn", "RewardScores", "RewardSet", "RewardTerm",
    "build_reward", "build_reward_set", "shown",
]

REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": math.accuracy,
    "format": format.format,
    "tag_count": format.tag_count,
    "reasoning_steps": format.reasoning_steps,
    "repetition_penalty": length.repetition_penalty,
    "cosine_length": math.cosine_length,
    "overlong": length.overlong,
    "language_consistency": language.language_consistency,
    "reasoning_gym": gym.reasoning_gym_reward,
    "code": code.code,
    "reward_model": model.reward_model,
}

# The built-in rewards that score a completion against the row's reference `answer`.
ANSWER_REWARDS = ("accuracy", "cosine_length")

_TERM_KEYS = ("fn", "weight", "args")


def build_reward(name: str, **args: Any) -> RewardFn:
    """Build the reward registered as `name` with `args`. Unknown names, unknown or missing
    arguments and invalid values raise ValueError naming the reward and the argument. A name
    `FILE.py:FUNCTION` or `package.module:FUNCTION` is the user's own function (grpo_cli.rewards.custom)."""
    if custom.is_custom(name):
        try:
            return custom.load(name, args)
        except ValueError as exc:
            raise ValueError(f"reward {name!r}: {exc}") from None
    factory = REWARDS.get(name)
    if factory is None:
        raise ValueError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}{suggestion(name, REWARDS)}")
    params = inspect.signature(factory).parameters
    for key in args:
        if key not in params:
            accepted = ", ".join(params) or "none"
            raise ValueError(
                f"reward {name!r}: unknown argument {key!r}{suggestion(key, params)}; accepted: {accepted}"
            )
    for key, param in params.items():
        if param.default is inspect.Parameter.empty and key not in args:
            raise ValueError(f"reward {name!r}: missing required argument {key!r}")
    try:
        return factory(**args)
    except ValueError as exc:
        raise ValueError(f"reward {name!r}: {exc}") from exc


def build_reward_set(terms: Mapping[str, Mapping[str, Any] | None]) -> RewardSet:
    """Build a `RewardSet` from config terms `{label: {fn?, weight?, args?}}`; `fn` defaults to
    the label, `weight` to 1.0, `args` to {} (also when given as None). An empty term (`accuracy:` in YAML) is allowed."""
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError("rewards must be a non-empty mapping of label -> {fn, weight, args}")
    built = []
    for label, term in terms.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"reward labels must be non-empty strings, got {label!r}")
        term = {} if term is None else term
        if not isinstance(term, Mapping):
            raise ValueError(f"reward {label!r}: expected a mapping with keys fn, weight, args, got {term!r}")
        for key in term:
            if key not in _TERM_KEYS:
                raise ValueError(
                    f"reward {label!r}: unknown key {key!r}{suggestion(str(key), _TERM_KEYS)}; "
                    f"allowed: {', '.join(_TERM_KEYS)}"
                )
        # None means "default" (config dataclasses carry every key).
        fn = label if term.get("fn") is None else term["fn"]
        if not isinstance(fn, str):
            raise ValueError(f"reward {label!r}: fn must be a reward name, got {fn!r}")
        weight = 1.0 if term.get("weight") is None else term["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _math.isfinite(weight):
            raise ValueError(f"reward {label!r}: weight must be a finite number, got {weight!r}")
        args = term.get("args") or {}
        if not isinstance(args, Mapping):
            raise ValueError(f"reward {label!r}: args must be a mapping, got {args!r}")
        try:
            reward = build_reward(fn, **args)
        except ValueError as exc:
            prefix = f"reward term {label!r}: " if label != fn else ""
            raise ValueError(f"{prefix}{exc}") from exc
        built.append(RewardTerm(label=label, fn=fn, weight=float(weight), args=dict(args), reward=reward))
    return RewardSet(built)
