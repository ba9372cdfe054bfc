"""The accuracy reward (math-verify with bounded time, also in threads) and reasoning-gym's scorer."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from grpo_cli.rewards import build_reward, build_reward_set
from grpo_cli.rewards.mathcheck import MathChecker, default_checker

# ----------------------------------------------------------------------------- accuracy (math-verify)

GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
MATH_GOLD = "We have $\\frac{6}{8} = \\frac{3}{4}$, so the answer is $\\boxed{\\frac{3}{4}}$."

ACCURACY_CASES = [
    # completion, gold, reward, invalid
    ("<think>half</think><answer>\\frac{1}{2}</answer>", "0.5", 1.0, False),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0, False),
    ("<answer>1/2</answer>", "\\frac{1}{2}", 1.0, False),
    ("so \\boxed{\\{2, 1\\}}", "\\{1,2\\}", 1.0, False),  # sets compare unordered
    ("<answer>\\{1, 3\\}</answer>", "\\{1,2\\}", 0.0, False),
    ("<answer>50\\%</answer>", "50\\%", 1.0, False),
    ("<answer>50</answer>", "50\\%", 1.0, False),
    ("<answer>72</answer>", GSM8K_GOLD, 1.0, False),
    ("She sold 72 clips in total.", GSM8K_GOLD, 1.0, False),  # final number
    ("work...\n#### 72", GSM8K_GOLD, 1.0, False),
    ("<answer>73</answer>", GSM8K_GOLD, 0.0, False),
    ("\\boxed{0.75}", MATH_GOLD, 1.0, False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0, False),  # nested braces, simplified
    ("<answer>1,000</answer>", "1000", 1.0, False),
    # An unmarked final answer that is a LaTeX fraction is that fraction, not its denominator.
    ("The answer is $\\frac{1}{2}$.", "0.5", 1.0, False),
    ("The answer is $\\frac{1}{2}$.", "2", 0.0, False),
    ("so we get -\\dfrac{3}{4}", "-3/4", 1.0, False),
    ("So it is $\\frac12$", "\\frac{1}{2}", 1.0, False),
    ("There are 1{,}000 ways.", "1000", 1.0, False),  # LaTeX's thousands separator
    ("\\boxed{90^\\circ}", "90", 1.0, False),  # degrees
    ("<answer>10 \\text{ cm}</answer>", "10", 1.0, False),  # a unit in \\text{}
    ("First \\boxed{3}, corrected: \\boxed{4}", "4", 1.0, False),  # the last box wins
    ("First \\boxed{3}, corrected: \\boxed{4}", "3", 0.0, False),
    ("<answer>1</answer> wait <answer>2</answer>", "2", 1.0, False),  # the last answer counts
    ("<answer>The answer is 42.</answer>", "42", 1.0, False),
    ("<answer>\\frac{1}{</answer>", "1", 0.0, False),  # malformed prediction
    ("I do not know.", "72", 0.0, False),
    ("", "72", 0.0, False),
    ("<answer>７２</answer>", "72", 0.0, False),  # full-width digits are not read as a number
    ("<answer>五</answer>", "5", 0.0, False),  # nor are CJK numerals
    ("<answer>−5</answer>", "-5", 1.0, False),  # U+2212 minus sign
    ("So the temperature is \u22125 degrees.", "5", 0.0, False),  # final number -5 (U+2212), not 5
    ("So the temperature is \u22125 degrees.", "-5", 1.0, False),
    ("The change is \u20133.", "-3", 1.0, False),  # en dash used as a minus sign
    ("Between 3\u20135 apples.", "5", 1.0, False),  # en dash range: the final number is 5
    ("<answer>-7</answer>", "#### \u22127", 1.0, False),  # U+2212 in a GSM8K-style gold
    # "\$" is a dollar sign, not a math delimiter, in completions and in golds.
    ("The total is \\boxed{\\$18}.", "#### 18", 1.0, False),
    ("<answer>\\$18</answer>", "#### 18", 1.0, False),
    ("<answer>\\$17</answer>", "#### 18", 0.0, False),
    ("<answer>The total is \\$18.</answer>", "#### 18", 1.0, False),  # prose with a dollar amount
    ("<answer>\\$1,234.50</answer>", "1234.5", 1.0, False),
    ("\\boxed{42}", "So he pays $6 \\cdot 7 = \\boxed{\\$42}$.", 1.0, False),  # MATH gold, was flagged
    ("\\boxed{\\$1.25}", "The cost is $\\boxed{\\$1.25}$.", 1.0, False),
    # Text answers: a \\text{} gold parses, and a word in the completion's box or <answer> is
    # compared as a string (math-verify's reading of a box), case-insensitively.
    ("\\boxed{\\text{Devon}}", "The winner is $\\boxed{\\text{Devon}}$.", 1.0, False),  # was flagged
    ("\\boxed{Devon}", "The winner is $\\boxed{\\text{Devon}}$.", 1.0, False),
    ("<answer>devon</answer>", "\\text{Devon}", 1.0, False),  # a MATH-500 style answer column
    ("<answer>Vedon</answer>", "The winner is $\\boxed{\\text{Devon}}$.", 0.0, False),
    ("The function is \\boxed{\\text{odd}}", "So $f$ is $\\boxed{\\text{odd}}$.", 1.0, False),
    ("<answer>odd</answer>", "\\boxed{\\text{odd}}", 1.0, False),
    ("<answer>even</answer>", "\\boxed{\\text{odd}}", 0.0, False),
    ("So the function is odd.", "\\boxed{\\text{odd}}", 0.0, False),  # no marked answer, no number
    ("<answer>yes</answer>", "\\boxed{\\text{yes}}", 1.0, False),  # (a bare gold "yes" is flagged, below)
    ("<answer>no</answer>", "\\boxed{\\text{yes}}", 0.0, False),
    ("<answer>outer <answer>5</answer></answer>", "5", 1.0, False),  # nested tags: innermost
    ("<think>\\boxed{5}</think><answer>6</answer>", "5", 0.0, False),  # <answer> beats a box in the reasoning
    ("<answer>\\boxed{5}</answer>", "5", 1.0, False),
    # Candidates: only the last box counts, and a list equals no single number.
    ("\\boxed{1} or \\boxed{2}", "1", 0.0, False),
    ("\\boxed{1} or \\boxed{2}", "2", 1.0, False),
    ("<answer>1, 2, 3, 4, 5</answer>", "2", 0.0, False),
    ("<answer>x = 1 or x = 2</answer>", "2", 0.0, False),
    ("<answer>[0, 10]</answer>", "5", 0.0, False),  # an interval holding the answer
    # The question copied (chain_sum: "... problem: 4 - 1 =") is no answer, though math-verify
    # evaluates it to 3; the value after the last "=" is.
    ("<answer>4 - 1</answer>", "3", 0.0, False),
    ("<answer>5 - 9</answer>", "-4", 0.0, False),
    ("The sum is \\boxed{1 + 5}.", "6", 0.0, False),
    ("<answer>$3 \\times 4$</answer>", "12", 0.0, False),
    ("<answer>\\frac{1}{2} + \\frac{1}{4}</answer>", "\\frac{3}{4}", 0.0, False),
    ("<answer>The answer is 4 - 1.</answer>", "3", 0.0, False),
    ("<answer>\\(4 - 1\\)</answer>", "3", 0.0, False),
    ("<answer>4 - 1 = 3</answer>", "3", 1.0, False),
    ("<answer>x = 4 - 1</answer>", "3", 0.0, False),
    ("<answer>1.5 \\times 10^{3}</answer>", "1500", 1.0, False),  # scientific notation is a value
    ("<answer>\\sqrt{2} + 1</answer>", "1 + \\sqrt{2}", 1.0, False),  # not a number: math-verify decides
    ("<answer>1 + 2</answer>", "x + 2", 0.0, False),
    # An empty <answer> is no answer: the number in the reasoning is not read in its place.
    ("<think>6 * 7 = 42</think><answer></answer>", "42", 0.0, False),
    ("<answer>42</answer>", "yes, obviously", 0.0, True),  # unparseable gold: flagged, never rewarded
    ("<answer>yes</answer>", "yes", 0.0, True),
    ("<answer>1</answer>", "", 0.0, True),
    ("<answer>1</answer>", "}{", 0.0, True),
    ("<answer>5</answer>", "\\boxed{}", 0.0, True),  # an empty box is no reference answer
]


def test_accuracy_table():
    reward = build_reward("accuracy")
    completions, golds, expected, invalid = map(list, zip(*ACCURACY_CASES, strict=True))
    out = reward(completions, answer=golds, question=["ignored"] * len(golds))
    assert list(out) == expected
    assert out.invalid == invalid
    scores = build_reward_set({"accuracy": {}}).score(completions, answer=golds)
    assert scores.invalid == invalid and scores.invalid_counts == {"accuracy": sum(invalid)}


def test_accuracy_works_from_threads_and_reuses_workers():
    reward = build_reward("accuracy")
    reward(["<answer>1</answer>"], answer=["1"])  # warm the shared pool
    pids = {w.proc.pid for w in default_checker()._workers if w is not None}
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: reward([f"<answer>{i}</answer>", "<answer>0</answer>"], answer=[str(i)] * 2),
                             range(1, 9)))
    assert [list(o) for o in outs] == [[1.0, 0.0]] * 8
    assert {w.proc.pid for w in default_checker()._workers if w is not None} == pids  # no restarts


def test_accuracy_time_bound_on_power_tower():
    reward = build_reward("accuracy", timeout=1.0)
    reward(["<answer>1</answer>"], answer=["1"])  # pool start is not part of the bound
    before = default_checker().timeouts
    start = time.monotonic()
    out = reward(["\\boxed{9^{9^{9^{9}}}}", "<answer>5</answer>"], answer=["5", "5"])
    elapsed = time.monotonic() - start
    assert list(out) == [0.0, 1.0]
    assert default_checker().timeouts == before + 1  # it really hit the bound
    assert elapsed < 1.0 + 3.0


def test_accuracy_time_bound_holds_in_worker_threads():
    # math-verify's own signal.alarm timeout cannot work outside the main thread.
    reward = build_reward("accuracy", timeout=1.0)
    reward(["<answer>1</answer>"], answer=["1"])
    before = default_checker().timeouts
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda text: reward([text], answer=["5"]),
                             ["\\boxed{9^{9^{9^{9}}}}", "<answer>5</answer>"]))
    elapsed = time.monotonic() - start
    assert [list(o) for o in outs] == [[0.0], [1.0]]
    assert default_checker().timeouts == before + 1
    assert elapsed < 1.0 + 3.0


def test_math_checker_hard_kill_replaces_stuck_worker():
    # With soft (in-worker) timeouts off, only the parent's kill bounds the check.
    checker = MathChecker(workers=1, grace=0.5, soft_timeouts=False)
    try:
        checker.check([("1", "1")], timeout=1.0)  # start the worker
        start = time.monotonic()
        codes = checker.check([("1", "1"), ("5", "9^{9^{9}}"), ("2", "2"), ("3", "4")], timeout=1.0)
        elapsed = time.monotonic() - start
        assert codes == ["1", "t", "1", "0"]  # the pairs after the stuck one are still checked
        assert checker.restarts == 1
        assert elapsed < 1.5 + 8.0  # bound + grace + a fresh worker's start

        # A worker that dies mid-check (OOM killer, segfault): that pair scores as an error
        # and the rest are checked by a replacement.
        victim = checker._workers[0].proc
        threading.Timer(0.5, victim.kill).start()
        assert checker.check([("5", "9^{9^{9}}"), ("2", "2")], timeout=30.0) == ["e", "1"]
        assert checker.restarts == 2
        # A worker that died between calls is replaced on the next call.
        checker._workers[0].proc.kill()
        checker._workers[0].proc.wait()
        assert checker.check([("\\frac{1}{2}", "0.5")], timeout=5.0) == ["1"]
    finally:
        checker.close()
    assert all(w is None for w in checker._workers)


# ----------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym():
    import reasoning_gym

    items = list(reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=1))
    completions = [
        f"<think>compute</think><answer>{items[0]['answer']}</answer>",
        "<answer>123456789</answer>",
        f"<think>compute</think> {items[2]['answer']} ",  # no tag: the text after </think>
        "<answer>1</answer>",
        "<answer>1</answer>",
        "<answer>1</answer>",
        "",  # empty completion: an empty answer
        "<think>思考</think><answer>五</answer>",  # a CJK numeral is not the number
    ]
    metadata = [items[0]["metadata"], items[1]["metadata"],
                json.dumps(items[2]["metadata"]),  # datasets may hold metadata as JSON text
                {"no_source": True}, {"source_dataset": "no_such_task"}, None,
                items[0]["metadata"], items[0]["metadata"]]
    out = build_reward("reasoning_gym")(
        completions, answer=[it["answer"] for it in items] + ["1"] * 3 + [items[0]["answer"]] * 2,
        metadata=metadata, question=[it["question"] for it in items] + ["q"] * 3 + [items[0]["question"]] * 2)
    # A wrong number gets the task's own partial credit, whatever reasoning-gym says it is.
    partial = reasoning_gym.get_score_answer_fn("basic_arithmetic")("123456789", items[1])
    assert partial < 1.0
    assert list(out) == [1.0, partial, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out.invalid == [False, False, False, True, True, True, False, False]


def test_reasoning_gym_on_data_without_its_metadata_is_refused_before_training():
    """recipe=countdown dataset=gsm8k (or rewards=reasoning_gym on hub data) trained on: every call of
    the term raised for want of `metadata`, so it scored 0 all run, with one note per step."""
    rewards = build_reward_set({"reasoning_gym": {"weight": 1.0}, "format": {"weight": 0.2}})
    gsm8k = ["answer", "problem", "prompt", "question", "completion_tokens", "completion_ids"]
    assert rewards.missing_columns(gsm8k) == (
        "rewards.reasoning_gym (reasoning_gym) needs the column 'metadata', which the dataset lacks (it has answer, "
        "completion_ids, completion_tokens, problem, prompt, question): drop the term with ~rewards.reasoning_gym, "
        "or choose data that has it")
    assert rewards.missing_columns([*gsm8k, "metadata"]) is None  # a reasoning-gym task's rows
    kept, notes = rewards.for_columns(gsm8k)  # evaluating such a run on math500: the term is left out
    assert kept.labels == ["format"] and len(notes) == 1
