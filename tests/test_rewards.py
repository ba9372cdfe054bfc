"""Tests for grpo_cli.rewards: every reward with hand-worked expected values, the registry and
config errors, fault isolation. Accuracy (math-verify) is in test_rewards_math.py, the code
sandbox in test_rewards_code.py.

Expected values are worked out in comments next to each case.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_cli.rewards import REWARDS, FlaggedScores, RewardScores, base, build_reward, build_reward_set
from grpo_cli.rewards.extract import (
    answer_or_text,
    extract_answer,
    extract_code,
    final_answer,
    gold_answer,
    is_number_arithmetic,
    is_plain_number,
    last_boxed,
    reference_answer,
    think_text,
)
from grpo_cli.rewards.math import cosine_value
from grpo_cli.rewards.mathcheck import default_checker

# ----------------------------------------------------------------------------- registry


def test_registry_names():
    assert sorted(REWARDS) == sorted([
        "accuracy", "format", "tag_count", "reasoning_steps", "repetition_penalty", "cosine_length",
        "overlong", "language_consistency", "reasoning_gym", "code", "reward_model",
    ])


@pytest.mark.parametrize("name, args, fragments", [
    ("acuracy", {}, ["unknown reward 'acuracy'", "known: accuracy, code,", "did you mean 'accuracy'?"]),
    ("xyz", {}, ["unknown reward 'xyz'; known:"]),
    ("repetition_penalty", {"ngram": 3}, ["reward 'repetition_penalty'", "unknown argument 'ngram'",
                                          "did you mean 'ngram_size'?", "accepted: ngram_size, max_penalty"]),
    ("repetition_penalty", {"max_penalty": 1.0}, ["reward 'repetition_penalty'", "max_penalty", "<= 0"]),
    ("repetition_penalty", {"ngram_size": 0}, ["reward 'repetition_penalty'", "ngram_size"]),
    ("overlong", {"max_len": 10, "buffer": 11}, ["reward 'overlong'", "buffer"]),
    ("overlong", {"max_len": 10, "buffer": 0}, ["reward 'overlong'", "buffer"]),
    ("cosine_length", {"max_len": 0}, ["reward 'cosine_length'", "max_len"]),
    ("cosine_length", {"min_value_correct": 2.0}, ["reward 'cosine_length'", "min_value_correct"]),
    ("cosine_length", {"unit": "words"}, ["reward 'cosine_length'", "unit", "'tokens'"]),
    ("cosine_length", {"exceed_penalty": float("nan")}, ["reward 'cosine_length'", "exceed_penalty", "finite"]),
    ("language_consistency", {"language": "xx"}, ["unknown language 'xx'", "known: ar, bg", "zh"]),
    ("reward_model", {}, ["reward 'reward_model'", "missing required argument 'model_name_or_path'"]),
    ("reward_model", {"model_name_or_path": "m", "batch_size": 0}, ["reward 'reward_model'", "batch_size"]),
    ("accuracy", {"timeout": -1}, ["reward 'accuracy'", "timeout"]),
    ("accuracy", {"timeout": float("inf")}, ["reward 'accuracy'", "timeout", "finite"]),
    ("repetition_penalty", {"max_penalty": float("-inf")}, ["reward 'repetition_penalty'", "finite"]),
    ("code", {"timeout": 0}, ["reward 'code'", "timeout"]),
    ("code", {"timeout": float("inf")}, ["reward 'code'", "timeout", "finite"]),
    ("format", {"strict": True}, ["reward 'format'", "unknown argument 'strict'", "accepted: none"]),
])
def test_build_reward_errors(name, args, fragments):
    with pytest.raises(ValueError) as info:
        build_reward(name, **args)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("terms, fragments", [
    ({}, ["non-empty mapping"]),
    ({"accuracy": {"wieght": 1.0}}, ["reward 'accuracy'", "unknown key 'wieght'", "did you mean 'weight'?"]),
    ({"accuracy": {"weight": "heavy"}}, ["reward 'accuracy'", "weight must be a finite number"]),
    ({"accuracy": {"weight": float("nan")}}, ["weight must be a finite number"]),
    ({"accuracy": {"args": [1]}}, ["args must be a mapping"]),
    ({"accuracy": 1.0}, ["expected a mapping"]),
    ({"rep": {"fn": "repetition_penalty", "args": {"max_penalty": 2}}},
     ["reward term 'rep'", "reward 'repetition_penalty'", "max_penalty"]),
    ({"rep": {"fn": "repetiton_penalty"}}, ["reward term 'rep'", "did you mean 'repetition_penalty'?"]),
    ({"formatt": {}}, ["unknown reward 'formatt'", "did you mean 'format'?"]),
])
def test_build_reward_set_errors(terms, fragments):
    with pytest.raises(ValueError) as info:
        build_reward_set(terms)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_build_reward_set_defaults_and_weights():
    rs = build_reward_set({
        "format": {"weight": 0.5},
        "tags": {"fn": "tag_count", "weight": None, "args": None},  # None = default (config dataclass)
        "rep": {"fn": "repetition_penalty", "weight": 2, "args": {"ngram_size": 2, "max_penalty": -1.0}},
        "reasoning_steps": None,
    })
    assert rs.labels == ["format", "tags", "rep", "reasoning_steps"]
    assert [t.fn for t in rs.terms] == ["format", "tag_count", "repetition_penalty", "reasoning_steps"]
    assert [t.weight for t in rs.terms] == [0.5, 1.0, 2.0, 1.0]
    good = "<think>a b a b a</think><answer>1</answer>"
    bad = "plain"
    scores = rs.score([good, bad], answer=["1", "2"], extra=[{"x": 1}, None])
    # good: format 1, tags 1, rep: words "<think>a","b","a","b","a</think><answer>1</answer>" -> bigrams
    #   (<think>a,b) (b,a) (a,b) (b,a</think>...) all 4 distinct -> 0; steps 0.
    #   total = 0.5*1 + 1 + 2*0 + 0 = 1.5.   bad: everything 0 (1 word < ngram 2).
    assert scores.per_reward == {"format": [1.0, 0.0], "tags": [1.0, 0.0], "rep": [0.0, 0.0],
                                 "reasoning_steps": [0.0, 0.0]}
    assert scores.total == [1.5, 0.0]
    assert scores.errors == {"format": 0, "tags": 0, "rep": 0, "reasoning_steps": 0}
    assert scores.first_error == {}
    assert scores.invalid == [False, False]
    m = scores.metrics()
    assert m["reward/format"] == 0.5 and m["reward/tags"] == 0.5 and m["reward/rep"] == 0.0
    assert m["reward/format/errors"] == 0.0
    assert m["reward/mean"] == 0.75 and m["reward/std"] == 0.75  # population std of [1.5, 0]
    assert m["reward/invalid"] == 0.0


def _grpo_config_rewards(*overrides: str) -> dict:
    """The `rewards` section printed by the real `grpo config` command."""
    done = subprocess.run([sys.executable, "-m", "grpo_cli", "config", *overrides],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["rewards"]


def test_cli_switches_reward_sets_and_weights():
    text = "<think>go go go go go go</think>\n<answer>4</answer>"
    assert len(text) == 51

    # r1_zero's set with the format weight overridden: accuracy 1 + 0.3 * format 1.
    terms = _grpo_config_rewards("recipe=r1_zero_math", "rewards.format.weight=0.3")
    assert list(terms) == ["accuracy", "format"]
    assert build_reward_set(terms).score([text], answer=["4"]).total == [pytest.approx(1.3, abs=1e-12)]

    # Another set, with a weight and arguments changed on the command line.
    terms = _grpo_config_rewards("recipe=r1_zero_math", "rewards=shaped", "rewards.format.weight=0.3",
                                 "rewards.overlong.args.max_len=64", "rewards.overlong.args.buffer=16")
    scores = build_reward_set(terms).score([text], answer=["4"])
    # repetition: words <think>go, go x4, go</think>, <answer>4</answer> -> 5 trigrams, 4 distinct
    #   ((go, go, go) twice): (1 - 4/5) * -1 = -0.2.  overlong: L=51 > 64 - 16 = 48: (48 - 51) / 16.
    assert scores.per_reward == {"accuracy": [1.0], "format": [1.0], "tag_count": [1.0],
                                 "repetition": [pytest.approx(-0.2, abs=1e-12)], "overlong": [-0.1875]}
    # 1 * 1 + 0.3 * 1 + 0.25 * 1 + 1 * -0.2 + 1 * -0.1875
    assert scores.total == [pytest.approx(1.1625, abs=1e-12)]

    terms = _grpo_config_rewards("recipe=r1_zero_math", "rewards=accuracy")
    assert list(terms) == ["accuracy"]
    assert build_reward_set(terms).score([text], answer=["5"]).total == [0.0]


def test_shaped_overlong_follows_the_rollout_length_limit():
    # gsm8k generates at most 512 tokens: the penalty must start in the last fifth, 512 - 102 = 410
    # tokens (a fixed max_len of 1024 started it at 768, which no completion reaches).
    terms = _grpo_config_rewards("recipe=gsm8k", "rewards=shaped")
    assert terms["overlong"]["args"] == {"max_len": 512, "buffer": None}
    overlong = build_reward_set({"overlong": terms["overlong"]})
    # 410 tokens: 0.  461: (410 - 461) / 102 = -0.5.  512 (the limit): -1.
    assert overlong.score(["x"] * 3, completion_tokens=[410, 461, 512]).total == [0.0, -0.5, -1.0]
    # The quickstart's 48 tokens (a fixed buffer of 256 was refused: larger than max_len): buffer 9,
    # from 39 tokens on; 45: (39 - 45) / 9 = -2/3.
    terms = _grpo_config_rewards("recipe=quickstart", "rewards=shaped")
    assert terms["overlong"]["args"] == {"max_len": 48, "buffer": None}
    overlong = build_reward_set({"overlong": terms["overlong"]})
    assert overlong.score(["x"] * 3, completion_tokens=[39, 45, 48]).total == [0.0, pytest.approx(-2 / 3), -1.0]


# ----------------------------------------------------------------------------- fault isolation


def _flaky(completions, **_):
    out = []
    for text in completions:
        if "boom" in text:
            raise RuntimeError(f"cannot score {text!r}")
        out.append(float(len(text)))
    return out


def test_fault_isolation_per_completion(monkeypatch, caplog):
    calls = []

    def flaky(completions, **columns):
        calls.append(len(completions))
        return _flaky(completions, **columns)

    def nan_reward(completions, **_):
        return [float("nan") if c == "bb" else 1.0 for c in completions]

    def wrong_length(completions, **_):
        return [1.0]  # right only when called with one completion

    def flags(completions, gold, **_):
        return FlaggedScores([1.0] * len(completions), [g is None for g in gold])

    monkeypatch.setitem(REWARDS, "flaky", lambda: flaky)
    monkeypatch.setitem(REWARDS, "nan", lambda: nan_reward)
    monkeypatch.setitem(REWARDS, "short", lambda: wrong_length)
    monkeypatch.setitem(REWARDS, "flags", lambda: flags)
    monkeypatch.setattr(base, "_MALFORMED_WARNED", set())
    rs = build_reward_set({"flaky": {"weight": 2.0}, "nan": {}, "short": {}, "flags": {}})
    scores = rs.score(["a", "boom", "bb", "ccc"], gold=["x", "y", None, "z"])
    assert calls == [4, 1, 1, 1, 1]  # whole batch, then one call per completion
    assert scores.per_reward["flaky"] == [1.0, 0.0, 2.0, 3.0]
    assert scores.errors["flaky"] == 1
    assert scores.first_error["flaky"] == "RuntimeError: cannot score 'boom'"
    assert scores.per_reward["nan"] == [1.0, 1.0, 0.0, 1.0] and scores.errors["nan"] == 1
    assert "non-finite" in scores.first_error["nan"]
    assert scores.per_reward["short"] == [1.0] * 4 and scores.errors["short"] == 0
    assert scores.invalid == [False, False, True, False] and scores.invalid_counts["flags"] == 1
    # total = 2*flaky + nan + short + flags
    assert scores.total == [2 + 1 + 1 + 1, 0 + 1 + 1 + 1, 4 + 0 + 1 + 1, 6 + 1 + 1 + 1]
    # The wrong length is no row's error (each completion alone scores), so it is a warning, once per
    # reward: the function is wrong, and every step now calls it once per completion.
    malformed = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert malformed == ["reward short: reward returned 1 scores for 4 completions; scoring one completion "
                         "per call instead (slower). Return one score (or None) per completion"]
    rs.score(["a", "b"], gold=["x", "y"])
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    m = scores.metrics()
    assert m["reward/flaky/errors"] == 1.0 and m["reward/nan/errors"] == 1.0
    # Means skip the invalid row 2: flaky over rows 0, 1, 3 = (1 + 0 + 3) / 3
    assert m["reward/flaky"] == pytest.approx(4 / 3)
    assert m["reward/mean"] == pytest.approx((5 + 3 + 9) / 3)
    assert m["reward/invalid"] == 1.0


def test_a_text_score_is_an_error_not_a_number(monkeypatch):
    """"1.0" is text a reward returned by mistake (a label, a judge's raw reply), not the number 1."""
    monkeypatch.setitem(REWARDS, "text", lambda: lambda completions, **_: ["1.0", 0.5])
    scores = build_reward_set({"text": {}}).score(["a", "b"])
    assert scores.per_reward["text"] == [0.0, 0.5] and scores.errors["text"] == 1
    assert scores.first_error["text"] == "TypeError: non-numeric reward '1.0'"


def test_an_array_of_scores_is_taken_as_a_list(monkeypatch):
    """A numpy array or a tensor of scores, as TRL's GRPOTrainer takes them; a dict or one number is no list."""
    import numpy as np
    import torch

    monkeypatch.setitem(REWARDS, "array", lambda: lambda completions, **_: np.array([0.5, 1.0]))
    monkeypatch.setitem(REWARDS, "tensor", lambda: lambda completions, **_: torch.tensor([0.25, 2.0]))
    monkeypatch.setitem(REWARDS, "mapping", lambda: lambda completions, **_: {0: 1.0, 1: 1.0})
    scores = build_reward_set({"array": {}, "tensor": {}, "mapping": {}}).score(["a", "b"])
    assert scores.per_reward["array"] == [0.5, 1.0] and scores.errors["array"] == 0
    assert scores.per_reward["tensor"] == [0.25, 2.0] and scores.errors["tensor"] == 0
    assert scores.per_reward["mapping"] == [0.0, 0.0] and scores.errors["mapping"] == 2
    assert scores.first_error["mapping"] == "TypeError: reward returned dict, expected a list of floats"


def test_a_dataset_column_named_completions_is_not_passed_for_the_completions(monkeypatch):
    """A dataset may hold a `completions` column (sampled answers, say): rewards are called with the
    rollout's completions under that name, so the column is left out rather than clash with them."""
    from types import SimpleNamespace

    monkeypatch.setitem(REWARDS, "sees", lambda: lambda completions, **columns: [float(c == "a") for c in completions])
    rewards = build_reward_set({"sees": {}})
    rows = [{"problem": "p", "answer": "a", "completions": ["x", "y"]}]
    samples = [SimpleNamespace(text=t, prompt_index=0, completion_ids=[1]) for t in ("a", "b")]
    completions, scores = rewards.score_samples(samples, rows)
    assert completions == ["a", "b"] and scores.per_reward["sees"] == [1.0, 0.0]
    assert "completions" not in rewards.columns_of(rows)


def test_a_none_score_means_the_reward_does_not_apply(monkeypatch):
    """A mixed dataset: the `code` rows' reward returns None on the `math` rows, and the reverse.
    None adds nothing to the total, is no error, and is left out of that reward's mean; a reward
    that applies to no row has a NaN mean (logged as null), not a 0 it never scored."""
    def for_kind(kind, score):
        return lambda completions, kinds, **_: [score if k == kind else None for k in kinds]

    monkeypatch.setitem(REWARDS, "code_only", lambda: for_kind("code", 0.5))
    monkeypatch.setitem(REWARDS, "math_only", lambda: for_kind("math", 1.0))
    monkeypatch.setitem(REWARDS, "poem_only", lambda: for_kind("poem", 1.0))
    rs = build_reward_set({"code": {"fn": "code_only", "weight": 2.0}, "math": {"fn": "math_only"},
                           "poem": {"fn": "poem_only"}})
    scores = rs.score(["a", "b", "c"], kinds=["code", "math", "math"])
    assert scores.total == [1.0, 1.0, 1.0]  # 2 * 0.5 on the code row, 1 on the math rows
    assert scores.errors == {"code": 0, "math": 0, "poem": 0}
    nan = pytest.approx(float("nan"), nan_ok=True)
    assert scores.per_reward["code"] == [0.5, nan, nan]
    m = scores.metrics()
    assert (m["reward/code"], m["reward/math"], m["reward/mean"]) == (0.5, 1.0, 1.0)  # means over the rows that apply
    assert math.isnan(m["reward/poem"])
    from grpo_cli.rewards import shown

    assert [shown(v) for v in scores.per_reward["code"]] == [0.5, None, None]  # as samples files record them


def test_reward_raising_on_everything_scores_zero():
    rs = build_reward_set({"accuracy": {}})  # no `answer` column: raises on every completion
    scores = rs.score(["<answer>1</answer>", "2"])
    assert scores.total == [0.0, 0.0] and scores.errors == {"accuracy": 2}
    assert scores.first_error["accuracy"].startswith("TypeError")


def test_misaligned_column_is_a_caller_bug():
    rs = build_reward_set({"format": {}})
    with pytest.raises(ValueError, match="column 'answer'"):
        rs.score(["a", "b"], answer=["1"])


def test_reward_scores_metrics_empty():
    scores = RewardScores(total=[], per_reward={"a": []}, errors={"a": 0}, first_error={}, invalid=[])
    assert scores.metrics() == {"reward/a": 0.0, "reward/a/errors": 0.0, "reward/mean": 0.0,
                                "reward/std": 0.0, "reward/invalid": 0.0}


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last tag wins
    ("<answer>a<answer>b</answer>", "b"),  # duplicated opening tag: innermost content
    ("<answer>a <answer>5</answer></answer>", "5"),  # nested: the innermost pair
    ("so \\boxed{\\frac{1}{2}} and \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces inside
    ("\\boxed{5} then \\boxed{unclosed", "5"),  # an unbalanced last box is skipped
    ("Natalia sold 48 clips.\n#### 1,072", "1072"),
    ("I got 3 apples and then 7.5 pears.", "7.5"),
    ("total: -1,234 units", "-1234"),
    ("ratio 3/4", "3/4"),
    # A LaTeX fraction is one number, not its denominator; {,} is LaTeX's thousands separator.
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("so we get -\\dfrac{3}{4}", "-\\dfrac{3}{4}"),
    ("So it is $\\tfrac12$", "\\tfrac12"),
    ("There are 1{,}000 ways", "1000"),
    ("so the result is -7", "-7"),
    ("between 3-5 items", "5"),  # a hyphen is not a minus sign
    ("So the temperature is \u22125 degrees.", "-5"),  # U+2212 MINUS SIGN is a minus
    ("The change is \u20133.", "-3"),  # an en dash before a number, no digit before it: a minus
    ("(\u2013.5)", "-.5"),
    ("between 3\u20135 items", "5"),  # an en dash between numbers is a range, not -5
    ("pages 3 \u2013 5", "5"),  # also with spaces around it
    ("#### \u22127", "-7"),
    ("no digits here", None),
    ("", None),
    ("<answer>   </answer> 9", None),  # an empty <answer> is no answer, nothing is read instead
    ("<think>so 42</think><answer></answer>", None),
    ("<answer></answer> \\boxed{7}", None),
    ("<answer>unclosed 5", "5"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("reference, expected", [
    ("72", "72"),
    ("She has 3 + 4 = 7 left.\n#### 7", "7"),
    ("#### 1,000", "1000"),
    ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("  \\frac{1}{2} ", "\\frac{1}{2}"),
    ("She is 7 years younger.\n#### \u22127", "-7"),  # U+2212 in golds too
    ("So $x = \\boxed{\u22122}$.", "-2"),
    ("\u20134", "-4"),
])
def test_gold_answer(reference, expected):
    assert gold_answer(reference) == expected


@pytest.mark.parametrize("text, expected", [
    ("<answer> odd </answer>", ("odd", True)),  # marked as the answer: <answer> or \\boxed{}
    ("so \\boxed{\\text{Devon}}.", ("\\text{Devon}", True)),
    ("work\n#### 7", ("7", False)),  # picked out of the text
    ("it is 7 apples", ("7", False)),
    ("nothing", (None, False)),
])
def test_final_answer_says_whether_it_was_marked(text, expected):
    assert final_answer(text) == expected


@pytest.mark.parametrize("reference, expected", [
    ("So $\\boxed{\\text{Devon}}$.", ("\\text{Devon}", True)),
    ("#### 72", ("72", False)),
    ("\\text{Devon}", ("\\text{Devon}", False)),
])
def test_reference_answer_says_whether_it_was_boxed(reference, expected):
    assert reference_answer(reference) == expected


def test_last_boxed_and_think_text():
    assert last_boxed("\\boxed {a{b}c}") == "a{b}c"
    assert last_boxed("\\fbox{3}") == "3"
    assert last_boxed("none") is None
    assert think_text("<think>why</think><answer>1</answer>") == "why"
    assert think_text("prefill reasoning</think><answer>1</answer>") == "prefill reasoning"
    assert think_text("<think>never closed") == "never closed"
    assert think_text("no tags") == "no tags"
    assert answer_or_text("<think>x</think>  yes ") == "yes"
    assert answer_or_text("<answer> A </answer>") == "A"


@pytest.mark.parametrize("text, expected", [
    ("4 - 1", True), ("5-9", True), ("-4 + -1", True), ("1 + 5.", True), ("(4 - 1)", True),
    ("$3 \\times 4$", True), ("3 \\cdot 4", True), ("12 \u00f7 4", True), ("1,000 - 1", True),
    ("\\frac{1}{2} + \\frac{1}{4}", True), ("\\boxed{2 + 2}", True), ("x = 4 - 1", True),
    ("4 - 1 \\text{ apples}", True), ("The answer is 4 - 1", True), ("It is 4 - 1.", True), ("4 - 1 apples", True),
    ("\\(4 - 1\\)", True), ("3-5 items", True), ("so 2 \u00d7 3", True),
    ("4 - 1 = 3", False), ("-4", False), ("3/4", False), ("\\frac{3}{4}", False), ("1,000", False),
    ("1.5 \\times 10^{3}", False), ("2^{10}", False), ("\\sqrt{2} + 1", False), ("x + 1", False),
    ("(1, -2)", False), ("4 - 1 is 3", False), ("2x + 1", False), ("3 + 2^{2}", False), ("", False), ("2 \\timesx 3", False),
])
def test_is_number_arithmetic(text, expected):
    assert is_number_arithmetic(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("72", True), ("-4", True), ("0.5", True), (".5", True), ("1,000", True), ("3/4", True),
    ("\\frac{3}{4}", True), ("-\\dfrac{1}{2}", True), ("\\$18", True), ("50\\%", True), (" 7. ", True),
    ("x", False), ("(1, 2)", False), ("\\sqrt{2}", False), ("1 + 2", False), ("", False), ("\\text{Devon}", False),
])
def test_is_plain_number(text, expected):
    assert is_plain_number(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("```py\na=1\n```\n```python\nb=2\n```", "b=2\n"),  # last python block
    ("```python\nx=1\n```\n```\ny=2\n```", "x=1\n"),  # a python block beats a plain one
    ("```\nplain()\n```", "plain()\n"),
    ("<answer>print(2)</answer>", "print(2)"),
    ("<answer>```python print(3)```</answer>", "print(3)"),
    ("no code at all", None),
])
def test_extract_code(text, expected):
    assert extract_code(text) == expected


# ----------------------------------------------------------------------------- format rewards


@pytest.mark.parametrize("text, expected", [
    ("<think>reasoning</think><answer>42</answer>", 1.0),
    ("\n <think>\nline 1\nline 2\n</think>\n\n<answer>\n42\n</answer>\n", 1.0),
    ("<think></think><answer>7</answer>", 1.0),  # an empty reasoning is still the format
    ("<think></think><answer></answer>", 0.0),  # an empty answer is not
    ("<think>so 42</think><answer> \n </answer>", 0.0),
    ("<think>思考</think><answer>答え</answer>", 1.0),
    ("<think>a</think>text<answer>1</answer>", 0.0),  # text between the blocks
    ("intro <think>a</think><answer>1</answer>", 0.0),  # text before
    ("<think>a</think><answer>1</answer> outro", 0.0),  # text after
    ("<answer>1</answer><think>a</think>", 0.0),  # wrong order
    ("<think>a<think>b</think></think><answer>1</answer>", 0.0),  # nested
    ("<think>a</think><think>b</think><answer>1</answer>", 0.0),  # duplicated think
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # duplicated answer
    ("<think>a <answer>x</answer></think><answer>1</answer>", 0.0),  # tag inside think
    ("<think>a</think>", 0.0),
    ("<think>a<answer>1</answer>", 0.0),
    ("", 0.0),
])
def test_format(text, expected):
    assert build_reward("format")([text]) == [expected]


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think><answer>1</answer>", 1.0),
    ("<think>a</think>", 0.5),
    ("<think><think>a</think><answer>1</answer>", 0.75),  # <think> twice: no credit for it
    ("</answer>", 0.25),
    ("", 0.0),
    ("<THINK>a</THINK>", 0.0),  # tags are case-sensitive
    ("<think>外<think>内</think></think><answer>答</answer>", 0.5),  # nested think: both think tags twice
    ("<answer>1</answer><answer>2</answer>", 0.0),  # duplicated answer, no think
    ("<think a</think>", 0.25),  # malformed opening tag: only </think> counts
])
def test_tag_count(text, expected):
    assert build_reward("tag_count")([text]) == [expected]


@pytest.mark.parametrize("text, expected", [
    ("Step 1: add. Step 2: multiply. Step 3: done.", 1.0),  # 3 markers -> 3/3
    ("Step 1: add.", 1 / 3),
    ("1. first\n2. second", 2 / 3),  # two numbered lines
    ("- a\n* b\n- c\n- d", 1.0),  # 4 bullets, capped at 1
    ("First, x. Next, y.", 2 / 3),
    ("Finally, done", 1 / 3),
    ("**bold** and -5 and 3.5", 0.0),  # "**" is no bullet, "-5" has no space, "3.5" not at line start
    ("first, lowercase", 0.0),
    ("", 0.0),
    ("Step 1: 加\nStep 2: 减\n- 乘", 1.0),  # 2 "Step N:" + 1 bullet, unicode content
    ("Second, ü", 1 / 3),
    ("0.5 is half\n1.5 is more", 0.0),  # decimals at a line start are not numbered steps
    ("10. tenth", 1 / 3),  # multi-digit numbered line
    ("<think>1. a\n2. b\n3. c</think>", 2 / 3),  # "1." follows the tag, so not at a line start
])
def test_reasoning_steps(text, expected):
    assert build_reward("reasoning_steps")([text]) == [pytest.approx(expected)]


# ----------------------------------------------------------------------------- length rewards


@pytest.mark.parametrize("text, n, max_penalty, expected", [
    ("a b a b a", 2, -1.0, -0.5),  # ab ba ab ba: 2 unique of 4 -> (1 - 0.5) * -1
    ("A a A a", 1, -1.0, -0.75),  # lower-cased: a a a a -> 1 unique of 4 -> -0.75
    ("x y x y", 2, -0.5, -1 / 6),  # xy yx xy: 2 of 3 -> (1/3) * -0.5
    ("a b c", 3, -1.0, 0.0),  # one trigram, all unique
    ("a b", 3, -1.0, 0.0),  # fewer words than n
    ("", 1, -1.0, 0.0),
    ("dup dup dup dup", 2, -2.0, -4 / 3),  # 3 identical bigrams: (1 - 1/3) * -2
    ("  spaced \n\t out  spaced out ", 2, -1.0, -1 / 3),  # (spaced,out)(out,spaced)(spaced,out): 2 of 3
    ("é ü é ü", 2, -1.0, -1 / 3),
])
def test_repetition_penalty(text, n, max_penalty, expected):
    out = build_reward("repetition_penalty", ngram_size=n, max_penalty=max_penalty)([text])
    assert out == [pytest.approx(expected)]
    assert math.copysign(1.0, out[0]) == 1.0 or out[0] < 0  # no -0.0 for "no repetition"


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (6, 0.0),  # max_len - buffer = 6
    (7, -0.25), (8, -0.5), (10, -1.0),  # (6 - L) / 4
    (11, -1.0), (500, -1.0),
])
def test_overlong(length, expected):
    reward = build_reward("overlong", max_len=10, buffer=4)
    assert reward(["x" * length]) == [expected]  # characters when no token column
    assert reward(["ignored"], completion_tokens=[length]) == [expected]  # token counts
    assert reward(["ignored"], completion_tokens=[list(range(length))]) == [expected]  # token ids
    assert reward(["世" * length]) == [expected]  # characters, not UTF-8 bytes


def test_cosine_value_worked_numbers():
    # correct: lo=0.5, hi=1.0. L=25 of 100: 0.5 + 0.25 * (1 + cos(pi/4)) = 0.9267766952966369
    assert cosine_value(25, 100, 0.5, 1.0) == pytest.approx(0.9267766952966369)
    assert cosine_value(0, 100, 0.5, 1.0) == 1.0
    assert cosine_value(50, 100, 0.5, 1.0) == pytest.approx(0.75)
    assert cosine_value(100, 100, 0.5, 1.0) == pytest.approx(0.5)
    assert cosine_value(1000, 100, 0.5, 1.0) == pytest.approx(0.5)  # clamped
    # wrong: lo=max_value_wrong=-0.5, hi=min_value_wrong=-1.0: short wrong answers punished most
    assert cosine_value(0, 100, -0.5, -1.0) == -1.0
    assert cosine_value(50, 100, -0.5, -1.0) == pytest.approx(-0.75)
    assert cosine_value(100, 100, -0.5, -1.0) == pytest.approx(-0.5)


RIGHT = "<answer>5</answer>"  # 18 characters
COSINE_CASES = [
    # completion (its length L in characters), gold, reward, invalid. max_len=100, defaults:
    # correct 0.5 + 0.25 * (1 + cos(pi L/100)); wrong -0.5 - 0.25 * (1 + cos(pi L/100)).
    (RIGHT + " " * 32, "5", 0.75, False),  # L=50 correct: cos = 0
    (RIGHT + " " * 82, "5", 0.5, False),  # L=100 correct: cos = -1
    (RIGHT + " " * 200, "5", 0.5, False),  # L=218, clamped to 100
    ("<answer>6</answer>" + " " * 32, "5", -0.75, False),  # L=50 wrong
    ("<answer>6</answer>" + " " * 7, "5", -0.9267766952966369, False),  # L=25 wrong: -0.5 - 0.25(1 + sqrt(2)/2)
    ("", "5", -1.0, False),  # L=0, no answer: a short wrong answer is punished most
    (RIGHT + "世" * 32, "5", 0.75, False),  # L=50 in characters (the UTF-8 bytes would be 114)
    ("<answer>4</answer><answer>5</answer>" + " " * 39, "5", 0.5732233047033631, False),
    # ^ duplicated tags, the last counts; L=75 correct: 0.5 + 0.25(1 - sqrt(2)/2)
    ("<answer>\\frac{5}{</answer>" + " " * 74, "5", -0.5, False),  # malformed LaTeX, L=100 wrong
    ("\\boxed{9^{9^{9^{9}}}}" + " " * 79, "5", -0.5, False),  # math-verify times out: wrong, L=100
    (RIGHT, "no math here at all", 0.0, True),  # unparseable gold: 0 and flagged
]


def test_cosine_length_table():
    reward = build_reward("cosine_length", max_len=100, timeout=1.0)
    completions, golds, expected, invalid = map(list, zip(*COSINE_CASES, strict=True))
    reward([RIGHT], answer=["5"])  # start the shared pool before counting timeouts
    before = default_checker().timeouts
    out = reward(completions, answer=golds)
    assert default_checker().timeouts == before + 1  # the power tower really hit the bound
    assert out == [pytest.approx(e, abs=1e-12) for e in expected]
    assert out.invalid == invalid


def test_cosine_length_in_tokens_with_the_exceed_penalty():
    fifty_chars = RIGHT + " " * 32  # correct, 50 characters
    wrong = "<answer>6</answer>" + " " * 32  # wrong, 50 characters
    golds = ["5", "5", "5", "5"]
    texts = [fifty_chars, fifty_chars, wrong, fifty_chars]
    tokens = [100, 50, 25, list(range(50))]  # token counts, or the token ids themselves
    # Characters (the default) ignore the token column: L=50, correct 0.75, wrong -0.75.
    by_chars = build_reward("cosine_length", max_len=100)(texts, answer=golds, completion_tokens=tokens)
    assert by_chars == [pytest.approx(v, abs=1e-12) for v in (0.75, 0.75, -0.75, 0.75)]
    # Tokens, max_len=100: correct L=100 -> 0.5; correct L=50 -> 0.75; wrong L=25 ->
    # -0.5 - 0.25 (1 + cos(pi/4)) = -0.9267766952966369; 50 token ids -> 0.75.
    by_tokens = build_reward("cosine_length", max_len=100, unit="tokens")
    assert by_tokens(texts, answer=golds, completion_tokens=tokens) == [
        pytest.approx(v, abs=1e-12) for v in (0.5, 0.75, -0.9267766952966369, 0.75)]
    # The exceed-length penalty replaces the score of any completion with L >= max_len (cut off at
    # the limit), right or wrong; below it nothing changes. An unscorable gold stays 0 and flagged.
    exceed = build_reward("cosine_length", max_len=100, unit="tokens", exceed_penalty=-2.0)
    out = exceed([fifty_chars, fifty_chars, wrong, wrong, RIGHT], answer=["5", "5", "5", "5", "no math here at all"],
                 completion_tokens=[100, 99, 150, 50, 100])
    # correct L=99: 0.5 + 0.25 (1 + cos(0.99 pi)) = 0.5 + 0.25 (1 - cos(0.01 pi)) = 0.5001233599...
    assert out == [-2.0, pytest.approx(0.5 + 0.25 * (1 - math.cos(0.01 * math.pi)), abs=1e-12), -2.0,
                   pytest.approx(-0.75, abs=1e-12), 0.0]
    assert out.invalid == [False, False, False, False, True]


# ----------------------------------------------------------------------------- any text


_TAGGY = st.lists(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{",
                                  "#### ", "```python\n", "```", "\n", " ", "a", "1", "-", "世", "\\",
                                  "+", "=", "$", ",", ".5", "^", "(", ")", "\\frac{", "\\times", "\\text{"]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _TAGGY.map("".join)))
def test_cheap_rewards_accept_any_text(text):
    for name, args, lo, hi in [("format", {}, 0, 1), ("tag_count", {}, 0, 1), ("reasoning_steps", {}, 0, 1),
                               ("repetition_penalty", {}, -1, 0), ("language_consistency", {}, 0, 1),
                               ("overlong", {"max_len": 20, "buffer": 5}, -1, 0)]:
        (value,) = build_reward(name, **args)([text])
        assert lo <= value <= hi and math.isfinite(value)
    for extract in (extract_answer, extract_code, last_boxed, think_text, answer_or_text, gold_answer,
                    is_number_arithmetic, is_plain_number):
        extract(text)


# ----------------------------------------------------------------------------- language


@pytest.mark.parametrize("language, text, expected", [
    ("en", "hello world", 1.0),
    ("en", "hello 世界", 5 / 7),  # 5 Latin letters, 2 Han
    ("zh", "你好ab", 0.5),
    ("zh", "<think>答案是 \\frac{1}{2}</think><answer>x</answer>", 1.0),  # LaTeX commands skipped
    ("ja", "ひらがなカタカナ漢字", 1.0),
    ("ja", "ラーメン", 1.0),  # the prolonged sound mark counts as Katakana
    ("ko", "안녕하세요 hi", 5 / 7),
    ("ru", "привет, world", 6 / 11),
    ("ar", "مرحبا", 1.0),
    ("fr", "déjà vu", 1.0),  # accented Latin letters are Latin
    ("en", "Ｈｅｌｌｏ", 1.0),  # full-width Latin
    ("en", "<think>hello</think><answer>你好</answer>", 1.0),  # only the reasoning counts
    ("en", "reasoning</think><answer>你好</answer>", 1.0),  # prefilled <think> not in the text
    ("zh", "<think>你好<answer>答</answer>", 1.0),  # unclosed think: tag names are not Latin text
    ("zh", "<think>你<think>好</think></think><answer>x</answer>", 1.0),  # nested think
    ("zh", "<think>你好 ok</think>", 0.5),  # 2 Han, 2 Latin
    # Math is not language: lone Latin/Greek letters (variables) and math spans are skipped.
    ("zh", "<think>设x为正数，则x的平方加y的平方等于r的平方，所以答案是</think><answer>5</answer>", 1.0),
    # ^ 22 Han; x, x, y, r are variables (it was 22 / 26)
    ("zh", "<think>我们计算$\\frac{ab}{cd} + xy$的值</think>", 1.0),  # 6 Han, the $...$ span skipped (was 6 / 12)
    ("en", "The area is π r^2 and the angle θ is small", 1.0),  # 27 Latin; r, π, θ skipped (was 28 / 30)
    ("zh", "你好\\(ab\\)世界\\[cd\\]$$ef$$", 1.0),  # \(...\), \[...\], $$...$$
    ("zh", "价格是\\$5 or \\$3元", 4 / 6),  # "\$" is a dollar sign, no span: 4 Han, "or" 2 Latin
    ("zh", "你好 $x + yy", 2 / 4),  # an unclosed "$" hides nothing: 2 Han, x lone, "yy" 2 Latin
    ("en", "123 + 456 = 579 !", 0.0),  # no letters
    ("en", "", 0.0),
])
def test_language_consistency(language, text, expected):
    assert build_reward("language_consistency", language=language)([text]) == [pytest.approx(expected)]


# ----------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "what", "is", "2", "+", "?", "4", "5", "the", "answer", "<think>",
             "</think>", "user:", "assistant:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(config).eval()
    plain = tmp_path_factory.mktemp("rm_plain")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    chat = tmp_path_factory.mktemp("rm_chat")
    model.save_pretrained(chat)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(chat)
    return plain, chat


def _manual_scores(path, texts, add_special_tokens=True):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
            out.append(model(**ids).logits[0, 0].item())
    return out


PROMPTS = ["what is 2 + 2 ?", "what is 2 + 2 ?", "the answer ?", "what is 2 + 2 ?", "what is 2 + 2 ?"]
# Includes an empty completion and one of unicode words (unknown to the vocabulary: [UNK]).
COMPLETIONS = [" 4", " <think> 2 + 2 </think> the answer is 4 4 4", " 5", "", " 答案 是 4"]


def test_reward_model_matches_manual_forward(tiny_reward_model):
    plain, chat = tiny_reward_model
    expected = _manual_scores(plain, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    assert len(set(expected)) == 5  # the cases differ, so the check means something
    for batch_size in (1, 2, 8):  # padding inside a batch must not change a score
        reward = build_reward("reward_model", model_name_or_path=str(plain), batch_size=batch_size, device="cpu")
        assert reward(COMPLETIONS, prompt=PROMPTS, answer=["4"] * 3) == pytest.approx(expected, abs=1e-5)


def test_reward_model_uses_chat_template(tiny_reward_model):
    _, chat = tiny_reward_model
    texts = [f"user: {p} assistant: {c} " for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    expected = _manual_scores(chat, texts, add_special_tokens=False)
    reward = build_reward("reward_model", model_name_or_path=str(chat), batch_size=3, device="cpu")
    assert len(set(expected)) == 5
    assert reward(COMPLETIONS, prompt=PROMPTS) == pytest.approx(expected, abs=1e-5)


def test_reward_model_with_a_chat_template_sees_the_problem_not_the_policys_prompt(tiny_reward_model):
    """In training `prompt` is the policy's rendered prompt (its own chat template, system prompt and
    special tokens); wrapping that again in the reward model's template would score a conversation
    nobody had. The user turn is the row's `problem`."""
    plain, chat = tiny_reward_model
    rendered = [f"<|im_start|>user {p} <|im_end|> <|im_start|>assistant" for p in PROMPTS]
    expected = _manual_scores(chat, [f"user: {p} assistant: {c} " for p, c in zip(PROMPTS, COMPLETIONS, strict=True)],
                              add_special_tokens=False)
    reward = build_reward("reward_model", model_name_or_path=str(chat), batch_size=3, device="cpu")
    wrapped = reward(COMPLETIONS, prompt=rendered)  # what it scored before: the rendered prompt as the user turn
    assert wrapped != pytest.approx(expected, abs=1e-3)  # so the check below means something
    assert reward(COMPLETIONS, prompt=rendered, problem=PROMPTS) == pytest.approx(expected, abs=1e-5)
    # A conversational dataset's problem is its messages: the completion answers that conversation.
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
    expected_conv = _manual_scores(chat, [f"system: Be brief. user: {p} assistant: {c} "
                                          for p, c in zip(PROMPTS, COMPLETIONS, strict=True)], add_special_tokens=False)
    assert expected_conv != pytest.approx(expected, abs=1e-3)
    assert reward(COMPLETIONS, prompt=rendered, problem=conversations) == pytest.approx(expected_conv, abs=1e-5)
    # Without a chat template the reward model reads the text as the policy saw it: prompt + completion.
    expected_plain = _manual_scores(plain, [p + c for p, c in zip(rendered, COMPLETIONS, strict=True)])
    reward = build_reward("reward_model", model_name_or_path=str(plain), batch_size=3, device="cpu")
    assert reward(COMPLETIONS, prompt=rendered, problem=PROMPTS) == pytest.approx(expected_plain, abs=1e-5)
    assert reward(COMPLETIONS, prompt=rendered, problem=conversations) == pytest.approx(expected_plain, abs=1e-5)


def _save_tiny_classifier(path, architecture="seq", tokenizer_kwargs=None, **config_kwargs):
    """A tiny random classifier (or causal LM, architecture="causal"; BERT, "bert") with a word-level
    tokenizer over the fixture's words plus "[EOS]", saved to `path`; returns `path`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    words = ["[PAD]", "[UNK]", "[BOS]", "what", "is", "2", "+", "?", "4", "5", "the", "answer", "[EOS]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]",
                                        **(tokenizer_kwargs or {"pad_token": "[PAD]"}))
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_labels=1)
    if architecture == "bert":
        model = BertForSequenceClassification(BertConfig(**sizes, **config_kwargs))
    else:
        cls = LlamaForCausalLM if architecture == "causal" else LlamaForSequenceClassification
        model = cls(LlamaConfig(**sizes, num_key_value_heads=2, max_position_embeddings=64, **config_kwargs))
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_reward_model_pads_with_the_models_pad_token(tmp_path):
    """The classifier reads each row's score at its last token that is not the *model's* pad id
    (config.pad_token_id). A tokenizer without a pad token was given its eos as pad: a short row
    padded with eos was read at a pad position, so its score depended on what it was batched with."""
    path = _save_tiny_classifier(tmp_path / "rm", tokenizer_kwargs={"eos_token": "[EOS]"}, pad_token_id=0)
    texts = ["what is 2 + 2 ? 4", "what is 2 + 2 ? the answer is 4 4 4 4 4 4"]
    expected = _manual_scores(path, texts)  # one at a time: no padding
    reward = build_reward("reward_model", model_name_or_path=str(path), batch_size=2, device="cpu")
    assert reward([" 4", " the answer is 4 4 4 4 4 4"], prompt=["what is 2 + 2 ?"] * 2) == pytest.approx(
        expected, abs=1e-5)


def test_reward_model_caps_max_length_at_the_models_positions(tmp_path):
    """A BERT-style classifier has 16 learned positions; the default max_length (4096) let a longer
    text through and the forward raised, so every long completion scored 0 as an error. Such a text
    is cut from the left to the model's 16 positions, as an explicit max_length=16 would."""
    path = _save_tiny_classifier(tmp_path / "bert", architecture="bert", max_position_embeddings=16, pad_token_id=0)
    completion = " the answer is" + " 4" * 20  # 6 + 23 = 29 tokens
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = tokenizer("what is 2 + 2 ?" + completion, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 29
    with torch.no_grad():
        expected = model(input_ids=ids[:, -16:]).logits[0, 0].item()
    reward = build_reward("reward_model", model_name_or_path=str(path), batch_size=2, device="cpu")
    assert reward([completion, " 4"], prompt=["what is 2 + 2 ?"] * 2)[0] == pytest.approx(expected, abs=1e-5)


def test_reward_model_path_errors(tmp_path):
    """A local path that is no folder, a folder without a model, and a model that is no classifier
    (AutoModelForSequenceClassification loads a causal LM with a *random* score head, so every reward
    would be noise) fail when the reward is built, in one line."""
    with pytest.raises(ValueError, match=r"no such folder"):
        build_reward("reward_model", model_name_or_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"no model \(no config.json\)"):
        build_reward("reward_model", model_name_or_path=str(tmp_path))
    causal = _save_tiny_classifier(tmp_path / "lm", architecture="causal")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM, not a sequence-classification model"):
        build_reward("reward_model", model_name_or_path=str(causal))


def test_reward_model_without_its_head_weights_raises_on_load(tmp_path):
    """A checkpoint whose config does not name its architecture (a Hub id cannot be checked before it
    loads) is checked on load: a head missing from the checkpoint raises, and the load is not retried
    for each completion."""
    import json

    causal = _save_tiny_classifier(tmp_path / "lm", architecture="causal")
    config = json.loads((causal / "config.json").read_text())
    del config["architectures"]
    (causal / "config.json").write_text(json.dumps(config))
    reward = build_reward("reward_model", model_name_or_path=str(causal), device="cpu")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"lacks score.weight"):
            reward([" 4"], prompt=["what is 2 + 2 ?"])
