"""The user's own reward functions: `fn: FILE.py:FUNCTION` or `fn: package.module:FUNCTION`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from grpo_cli.rewards import build_reward, build_reward_set

USER_REWARDS = '''
def brevity(completions, answer, limit=5):
    return [1.0 if len(c) <= limit else 0.0 for c in completions]

def seen(completions, **columns):
    return [float(len(columns)) for _ in completions]

def matches(completions, answer, *, bonus):
    return [1.0 + bonus if c == a else 0.0 for c, a in zip(completions, answer)]

def trl_style(prompts, completions, completion_ids, **kwargs):
    return [float(p == "q" and c == "a" and ids == [7] and set(kwargs) == {"prompt", "answer"})
            for p, c, ids in zip(prompts, completions, completion_ids)]

async def judged(completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]

def crash(completions, answer):
    return [1.0 / (c != "bad") for c in completions]

NOT_A_FUNCTION = 3
'''


def _write(folder: Path, text: str, name: str = "my_rewards.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_a_function_gets_the_columns_it_names_and_its_args(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    columns = {"answer": ["ab", "x"], "problem": ["p", "q"], "completion_tokens": [3, 9]}
    # brevity names only `answer` (and `limit`): the other columns are not passed, which it would refuse.
    assert build_reward(f"{path}:brevity")(["ab", "abcdefg"], **columns) == [1.0, 0.0]
    assert build_reward(f"{path}:brevity", limit=1)(["ab", "a"], **columns) == [0.0, 1.0]
    assert build_reward(f"{path}:seen")(["a", "b"], **columns) == [3.0, 3.0]  # **columns: all of them
    assert build_reward(f"{path}:matches", bonus=0.5)(["ab", "y"], **columns) == [1.5, 0.0]


def test_a_function_written_for_trl_gets_completions_and_prompts_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    reward = build_reward(f"{path}:trl_style")
    # `prompts` comes from the `prompt` column every row has.
    assert reward.required == {"completion_ids"}  # which training passes (RewardSet.score_samples)
    assert reward(["a", "b"], prompt=["q", "q"], answer=["1"] * 2, completion_ids=[[7], [7]]) == [1.0, 0.0]
    # A TRL function reading kwargs["prompts"] finds them there too.
    _write(tmp_path, "def f(completions, **kwargs):\n    return [float(p == 'q') for p in kwargs['prompts']]\n", "kw.py")
    assert build_reward(f"{tmp_path / 'kw.py'}:f")(["a", "b"], prompt=["q", "r"]) == [1.0, 0.0]


def test_an_async_function_is_run_to_completion(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    assert build_reward(f"{path}:judged")(["1", "3"], answer=["1", "2"]) == [1.0, 0.0]


def test_an_arg_takes_the_place_of_the_column_of_its_name(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    reward = build_reward(f"{path}:matches", answer=["z", "z"], bonus=0.0)
    assert reward(["z", "ab"], answer=["ab", "ab"]) == [1.0, 0.0]


def test_in_a_reward_set_a_completion_that_raises_scores_zero_and_is_counted(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    rewards = build_reward_set({"mine": {"fn": f"{path}:crash", "weight": 2.0}, "accuracy": {}})
    scores = rewards.score(["ok", "bad", "ok"], answer=["1", "2", "3"])
    assert scores.per_reward["mine"] == [1.0, 0.0, 1.0]
    assert scores.total == [2.0, 0.0, 2.0]
    assert scores.errors["mine"] == 1 and scores.first_error["mine"] == "ZeroDivisionError: float division by zero"


def test_a_package_module_names_its_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "teamrewards").mkdir()
    (tmp_path / "teamrewards" / "__init__.py").write_text("")
    _write(tmp_path / "teamrewards", USER_REWARDS, "scoring.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_reward("teamrewards.scoring:brevity")(["abc"], answer=["1"]) == [1.0]


def test_a_file_is_imported_once(tmp_path: Path) -> None:
    path = _write(tmp_path, "CALLS = []\nCALLS.append(1)\ndef f(completions):\n    return [float(len(CALLS))] * len(completions)\n")
    build_reward(f"{path}:f")
    assert build_reward(f"{path}:f")(["a"]) == [1.0]  # validation, then the run: the module body ran once


def test_a_file_imports_the_modules_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As `python my_rewards.py` would: wherever grpo runs from (here a directory without the helper).
    (tmp_path / "rw").mkdir()
    _write(tmp_path / "rw", "SCALE = 0.25\n", "grpo_test_scale_helper.py")
    path = _write(tmp_path / "rw", "import grpo_test_scale_helper\n\ndef f(completions):\n"
                                   "    return [grpo_test_scale_helper.SCALE] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    assert build_reward(f"{path}:f")(["a", "b"]) == [0.25, 0.25]


@pytest.mark.parametrize(("text", "fn", "message"), [
    (USER_REWARDS, "nope.py:brevity", "no such file: nope.py"),
    (USER_REWARDS, "{path}:brevty", "{path} has no function 'brevty' (did you mean 'brevity'?)"),
    (USER_REWARDS, "{path}:NOT_A_FUNCTION", "{path}: 'NOT_A_FUNCTION' is not a function (it holds 3)"),
    (USER_REWARDS, "{path}:", "'{path}:' is not FILE.py:FUNCTION or package.module:FUNCTION"),
    ("def f():\n    return []\n", "{path}:f", "must take the completions as its first argument, e.g. def f(completions, "
                                             "answer): ..."),
    ("def f(*, answer):\n    return []\n", "{path}:f", "must take the completions as its first argument"),
    ("x = 1\ndef f(completions:\n    return []\n", "{path}:f", "importing {path} failed: SyntaxError: '(' was never "
                                                              "closed (line 2)"),
    ("import math\n\nmath.sqrt(-1)\n", "{path}:f", "importing {path} failed: ValueError: math domain error (line 3)"),
    ("import no_such_package_here\n", "{path}:f", "importing {path} failed: ModuleNotFoundError: No module named "
                                                  "'no_such_package_here' (line 1)"),
    (USER_REWARDS, "no_such_package_here.rewards:f", "no module named 'no_such_package_here' (name a file as "
                                                     "path/to/file.py:FUNCTION, or install the package)"),
])
def test_what_is_wrong_with_a_user_function_is_one_line(tmp_path: Path, text: str, fn: str, message: str) -> None:
    path = _write(tmp_path, text)
    fn, message = fn.format(path=path), message.format(path=path)
    with pytest.raises(ValueError) as raised:
        build_reward(fn)
    assert str(raised.value).startswith(f"reward '{fn}': {message}")
    assert "\n" not in str(raised.value)


def test_an_unknown_arg_is_refused_unless_the_function_takes_any(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    with pytest.raises(ValueError, match=r"unknown argument 'limt' \(did you mean 'limit'\?\); its parameters besides "
                                         r"the completions: answer, limit$"):
        build_reward(f"{path}:brevity", limt=3)
    build_reward(f"{path}:seen", anything=1)


def test_a_missing_column_is_named_before_training(tmp_path: Path) -> None:
    path = _write(tmp_path, USER_REWARDS)
    rewards = build_reward_set({"accuracy": {}, "short": {"fn": f"{path}:matches", "args": {"bonus": 1}}})
    assert rewards.missing_columns(["answer", "problem"]) is None
    assert rewards.missing_columns(["problem", "prompt"]) == (
        f"rewards.short ({path}:matches) needs the column 'answer', which the dataset lacks (it has problem, prompt): "
        "add it to the data, pass it in rewards.short.args, or give the parameter a default")
    given = build_reward_set({"short": {"fn": f"{path}:matches", "args": {"bonus": 1, "answer": ["1"]}}})
    assert given.missing_columns(["problem"]) is None


def test_the_config_keeps_the_files_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grpo_cli.config import compose

    (tmp_path / "rw").mkdir()
    _write(tmp_path / "rw", USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    cfg = compose(["recipe=quickstart", "+rewards.short.fn=rw/my_rewards.py:brevity", "+rewards.pkg.fn=os.path:join"])
    assert cfg.rewards["short"].fn == f"{tmp_path / 'rw' / 'my_rewards.py'}:brevity"
    assert cfg.rewards["pkg"].fn == "os.path:join"  # a module, not a file: as given


def test_grpo_config_refuses_a_missing_reward_file_in_one_line(grpo, tmp_path: Path) -> None:
    result = grpo("config", "recipe=quickstart", "+rewards.mine.fn=rewards/mine.py:score", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: rewards.mine (rewards/mine.py:score): no such file: rewards/mine.py"


def test_a_run_trains_on_a_user_reward_and_refuses_a_missing_column(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    _write(tmp_path, '''
        def chars(completions, answer, scale=1.0):
            return [scale * len(c) for c in completions]

        def graded(completions, difficulty):
            return [0.0] * len(completions)
    ''')
    args = ["train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "trainer.max_steps=1",
            "trainer.prompts_per_step=2", "rollout=hf", "rollout.group_size=2", "rollout.max_new_tokens=6",
            "dataset.size=16"]
    result = grpo(*args, "output_dir=run", "+rewards.chars.fn=my_rewards.py:chars", "+rewards.chars.args.scale=0.5",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step-000001.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:  # the quickstart's accuracy term plus ours, scored on each completion
        assert s["rewards"]["chars"] == 0.5 * len(s["completion"])
        assert s["reward"] == pytest.approx(s["rewards"]["accuracy"] + 0.5 * len(s["completion"]))
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["reward/chars"] == pytest.approx(sum(0.5 * len(s["completion"]) for s in samples) / 4)
    assert metrics["reward/chars/errors"] == 0.0

    missing = grpo(*args, "output_dir=run2", "+rewards.g.fn=my_rewards.py:graded", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith(
        f"error: rewards.g ({tmp_path / 'my_rewards.py'}:graded) needs the column 'difficulty', which the dataset lacks")
    assert not (tmp_path / "run2").exists()  # refused before the run directory is made


def test_prompts_without_answers_train_on_a_user_reward(grpo, tiny_model_dir: Path, tmp_path: Path) -> None:
    """As TRL's own first example: a dataset of prompts alone (dataset.answer_column=null) and a
    length reward of the user's; the samples say there is no answer."""
    _write(tmp_path, '''
        def short(completions, limit=20):
            return [-abs(len(c) - limit) / limit for c in completions]
    ''')
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write about {w}."}) + "\n"
                                                    for w in ("cats", "rain", "hills", "sea")))
    result = grpo("train", "recipe=quickstart", f"model.name_or_path={tiny_model_dir}", "output_dir=run",
                  "dataset=jsonl", "dataset.path=prompts.jsonl", "dataset.problem_column=prompt",
                  "dataset.answer_column=null", "~rewards.accuracy", "+rewards.short.fn=my_rewards.py:short",
                  "trainer.max_steps=1", "trainer.prompts_per_step=2", "rollout=hf", "rollout.group_size=2",
                  "rollout.max_new_tokens=6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step-000001.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["answer"] for s in samples} == {None}
    for s in samples:
        assert s["rewards"] == {"short": pytest.approx(-abs(len(s["completion"]) - 20) / 20)}
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" not in metrics  # no answers, so no accuracy metric
