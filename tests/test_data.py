"""Datasets and prompt templates."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from grpo_cli.data import data_fingerprint, load_prompts, load_rows, render_prompt
from grpo_cli.errors import UserError
from grpo_cli.schema import DatasetConfig

GYM = DatasetConfig(source="reasoning_gym", task="chain_sum", size=5, seed=7,
                    task_args={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})


def test_r1_zero_template_is_the_papers() -> None:
    cfg = DatasetConfig(template="r1_zero", prefill="<think>")
    assert render_prompt("What is 2+3?", cfg, None) == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with "
        "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: What is 2+3?. Assistant: <think>")


def test_chat_template_with_system_prompt_and_prefill(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DatasetConfig(template="chat", system_prompt="Be brief.", prefill="<think>")
    assert render_prompt("2+3?", cfg, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>")


# The generation prompt of DeepSeek-R1's distills (and QwQ), in the tiny model's tokens: it opens the reasoning.
_THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_a_think_the_chat_template_opens_is_scored_and_not_prefilled_twice(tiny_model_dir: Path) -> None:
    """The rewards see the template's "<think>\n" in front of each completion, as they see a prefill:
    without it `format` scored 0 on a perfect answer. A prefill "<think>" on top would repeat it."""
    from transformers import AutoTokenizer

    from grpo_cli.data import opened_answer
    from grpo_cli.rewards import build_reward_set
    from grpo_cli.rollout import Sample

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = _THINKING_TEMPLATE
    prompt = render_prompt("2+3?", DatasetConfig(template="chat"), tokenizer)
    assert prompt == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert opened_answer(prompt, "") == "<think>\n"
    assert opened_answer(prompt + "Let me", "Let me") == "<think>\nLet me"  # a prefill after the tag
    # A prefill "<think>" of its own (r1_zero, or a template that does not open it) is the prefill alone.
    r1 = render_prompt("2+3?", DatasetConfig(template="r1_zero", prefill="<think>"), None)
    assert opened_answer(r1, "<think>") == "<think>"
    assert opened_answer(r1[: -len(" <think>")], "") == ""  # "... Assistant:"
    with pytest.raises(UserError, match=r"^dataset.prefill='<think>' repeats the <think> that the model's chat "
                                        r"template already ends the prompt with; set dataset.prefill=''"):
        render_prompt("2+3?", DatasetConfig(template="chat", prefill="<think>"), tokenizer)

    rewards = build_reward_set({"format": {}})
    sample = Sample(prompt_index=0, prompt_ids=[], completion_ids=[1], text="5 </think> <answer>5</answer>",
                    logprobs=[0.0], truncated=False)
    texts, scores = rewards.score_samples([sample], [{"prompt": prompt, "problem": "2+3?", "answer": "5"}])
    assert texts == ["<think>\n5 </think> <answer>5</answer>"] and scores.total == [1.0]


def test_plain_template() -> None:
    assert render_prompt("2+3 =", DatasetConfig(template="plain", prefill=" "), None) == "2+3 = "


def test_plain_and_r1_zero_prompts_start_with_the_bos_a_tokenizer_adds(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A Llama-style tokenizer starts every text with BOS; the engines tokenise prompts without adding
    special tokens, so the prompt text carries it, once. SmolLM2's tokenizer adds none: nothing changes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<s>", "[UNK]", "2+3", "=", "User:", "Assistant:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")
    plain = DatasetConfig(template="plain", prefill=" ")
    assert render_prompt("2+3 =", plain, llama_like) == "<s>2+3 = "
    ids = llama_like(render_prompt("2+3 =", plain, llama_like), add_special_tokens=False)["input_ids"]
    assert ids == [0, 2, 3]  # one BOS, as the tokenizer itself would have put it
    assert render_prompt("2+3", DatasetConfig(template="r1_zero"), llama_like).startswith("<s>A conversation ")
    smollm2 = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt("2+3 =", plain, smollm2) == "2+3 = "


def test_reasoning_gym_rows_are_seeded_and_eval_split_differs() -> None:
    rows = load_rows(GYM)
    assert len(rows) == 5
    assert rows == load_rows(GYM)  # same seed, same problems
    assert rows[0]["problem"] == rows[0]["question"] and rows[0]["answer"] == rows[0]["answer"]
    assert rows[0]["metadata"]["source_dataset"] == "chain_sum"
    assert [r["question"] for r in load_rows(GYM, split="test")] != [r["question"] for r in rows]


def test_reasoning_gym_errors() -> None:
    with pytest.raises(UserError, match=r"task \(did you mean chain_sum or decimal_chain_sum\?\); choose one of: ab, "):
        load_rows(dataclasses.replace(GYM, task="chain_sums"))
    with pytest.raises(UserError, match=r"dataset.task=nope: not a reasoning-gym task; choose one of: .*, chain_sum, "):
        load_rows(dataclasses.replace(GYM, task="nope"))
    with pytest.raises(UserError, match="task_args for chain_sum"):
        load_rows(dataclasses.replace(GYM, task_args={"bogus": 1}))


# ----------------------------------------------------------------------------- reasoning-gym row cache
COUNTDOWN = DatasetConfig(source="reasoning_gym", task="countdown", size=6, seed=3,
                          task_args={"min_numbers": 3, "max_numbers": 4})


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty GRPO_CACHE."""
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fresh(cfg: DatasetConfig, seed: int) -> list[dict]:
    import reasoning_gym

    items = reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=seed, **cfg.task_args)
    return [dict(items[i]) for i in range(len(items))]


def _generation_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import reasoning_gym

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated, not read from the cache")

    monkeypatch.setattr(reasoning_gym, "create_dataset", fail)


def test_reasoning_gym_rows_read_back_from_the_cache_exactly(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """countdown's metadata holds tuples (difficulty ranges), which plain JSON would make lists."""
    import reasoning_gym

    first, fresh = load_rows(COUNTDOWN), _fresh(COUNTDOWN, 3)
    (file,) = (cache / "reasoning_gym").iterdir()  # and no temporary file left beside it
    assert file.name.startswith("countdown-")
    _generation_fails(monkeypatch)
    again = load_rows(COUNTDOWN)
    assert repr(again) == repr(first)  # repr tells a tuple from a list, 1 from 1.0 and True
    assert repr([{k: r[k] for k in fresh[0]} for r in again]) == repr(fresh)
    assert type(again[0]["metadata"]["difficulty"]["numbers"]) is tuple
    score = reasoning_gym.get_score_answer_fn("countdown")
    assert [score(r["answer"], r) for r in again] == [1.0] * 6  # the task's scorer reads the cached metadata
    assert load_rows(COUNTDOWN, limit=2) == again[:2]  # a limit reads the first rows of the cached set


def test_a_limit_below_the_size_generates_only_those_rows_and_caches_nothing(cache: Path) -> None:
    assert load_rows(COUNTDOWN, limit=2) == load_rows(dataclasses.replace(COUNTDOWN, size=2))[:2]
    (file,) = (cache / "reasoning_gym").iterdir()  # the size=2 set only
    assert len(file.read_text().splitlines()) == 1 + 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty"])
def test_a_damaged_cache_file_is_generated_again(cache: Path, damage: str) -> None:
    first = load_rows(COUNTDOWN)
    (file,) = (cache / "reasoning_gym").iterdir()
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:-40], "garbage": b"\x00not json", "empty": b"",
                      "flip": data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]}[damage])  # one bit of the last row
    assert repr(load_rows(COUNTDOWN)) == repr(first)
    assert file.read_bytes() == data  # written whole again


def test_the_cache_file_depends_on_all_that_makes_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpo_cli import datacache

    def path(cfg: DatasetConfig, seed: int = 3) -> Path | None:
        return datacache.RowCache(Path("/c"), cfg.task, cfg.size, seed, cfg.task_args).path

    base = path(COUNTDOWN)
    assert base == path(dataclasses.replace(COUNTDOWN, task_args={"max_numbers": 4, "min_numbers": 3}))
    others = [path(COUNTDOWN, seed=4), path(dataclasses.replace(COUNTDOWN, size=7)),
              path(dataclasses.replace(COUNTDOWN, task_args={"min_numbers": 3, "max_numbers": 5})),
              path(dataclasses.replace(COUNTDOWN, task_args={})), path(dataclasses.replace(COUNTDOWN, task="chain_sum"))]
    real = datacache._version
    monkeypatch.setattr(datacache, "_version", lambda name: "0.0.1" if name == "reasoning_gym" else real(name))
    others.append(path(COUNTDOWN))
    monkeypatch.setattr(datacache, "_version", lambda name: "0.0.1" if name == "sympy" else real(name))
    others.append(path(COUNTDOWN))
    assert len({base, *others}) == 1 + len(others)


def test_train_and_eval_splits_have_their_own_cache_files(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = load_rows(COUNTDOWN), load_rows(COUNTDOWN, split="test")
    assert len(list((cache / "reasoning_gym").iterdir())) == 2
    _generation_fails(monkeypatch)
    assert (load_rows(COUNTDOWN), load_rows(COUNTDOWN, split="test")) == (train, test)
    assert train != test


def test_encoding_keeps_every_type() -> None:
    from grpo_cli.datacache import Uncacheable, decode, encode

    value = {"t": (1, (2.5, [3, None]), "x"), 7: "int key", (1, 2): True, "~tuple": [1], "~dict": {}, "nan": -0.0,
             "big": 2**80, "s": "é\ud800\n", "l": [(), {}], "f": float("inf")}
    back = decode(json.loads(json.dumps(encode(value))))
    assert repr(back) == repr(value)
    for bad in ({1, 2}, {"a": frozenset()}, [b"x"]):
        with pytest.raises(Uncacheable):
            encode(bad)


def test_rows_the_cache_cannot_hold_are_generated_every_time(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reasoning_gym

    real = reasoning_gym.create_dataset

    def with_a_set(*args: object, **kwargs: object) -> list[dict]:
        return [{**item, "metadata": {**item["metadata"], "seen": {1, 2}}} for item in real(*args, **kwargs)]

    monkeypatch.setattr(reasoning_gym, "create_dataset", with_a_set)
    assert load_rows(COUNTDOWN)[0]["metadata"]["seen"] == {1, 2}
    assert not (cache / "reasoning_gym").exists()


def test_an_unwritable_cache_costs_only_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "file"))  # a file where the cache folder should be
    assert repr(load_rows(COUNTDOWN)) == repr(load_rows(COUNTDOWN))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_column_mapping(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "1+1", "solution": "2"}, {"problem": "2+2", "solution": "4"}])
    cfg = DatasetConfig(source="jsonl", path=str(data), problem_column="problem", answer_column="solution",
                        template="plain")
    rows = load_prompts(cfg, None)
    assert [(r["problem"], r["answer"], r["prompt"]) for r in rows] == [("1+1", "2", "1+1"), ("2+2", "4", "2+2")]


def test_the_data_fingerprint_is_the_problems_and_answers_in_order(tmp_path: Path) -> None:
    """What a checkpoint's data position refers to: a resume compares it with the data it loads."""
    import hashlib

    rows = [{"question": "1+1", "answer": "2", "level": 1}, {"question": "2+2", "answer": 4}]
    cfg = DatasetConfig(source="jsonl", path=str(_jsonl(tmp_path / "d.jsonl", rows)), template="plain")
    expected = {"rows": 2, "sha256": hashlib.sha256(b'["1+1", "2"]\n["2+2", 4]\n').hexdigest()}
    assert data_fingerprint(load_prompts(cfg, None)) == expected
    # How a row is shown (the template) and its other columns are not what the position counts.
    other_columns = _jsonl(tmp_path / "e.jsonl", [{**r, "level": 7} for r in rows])
    assert data_fingerprint(load_prompts(dataclasses.replace(cfg, path=str(other_columns), template="r1_zero"),
                                         None)) == expected
    for changed in (rows[::-1], [rows[0], {**rows[1], "answer": "4"}], rows[:1]):
        data = _jsonl(tmp_path / "f.jsonl", changed)
        assert data_fingerprint(load_rows(dataclasses.replace(cfg, path=str(data))))["sha256"] != expected["sha256"]


def test_a_column_some_json_lines_leave_out_is_none_in_them(tmp_path: Path) -> None:
    """Rewards get every column of the first row of a batch, aligned: a row without one (an optional
    field of a hand-written file) must not stop training with a KeyError at the step that draws it."""
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2", "level": 1},
                                         {"question": "2+2", "answer": "4", "source": "book"}])
    rows = load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert [(r["level"], r["source"]) for r in rows] == [(1, None), (None, "book")]


def test_missing_column_names_existing_columns(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "solution": "2"}])
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert str(caught.value) == ("dataset has no column 'answer' (dataset.answer_column); "
                                 "its columns are: question, solution")


def test_a_column_only_the_first_row_lacks_is_named_as_that_rows_gap(tmp_path: Path) -> None:
    """Only the first row's columns were looked at: a file whose first line left out its answer was
    said to have no 'answer' column at all, the columns of its other lines unnamed."""
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1"}, {"question": "2+2", "answer": "4"}])
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert str(caught.value) == ("dataset row 1 has no column 'answer' (dataset.answer_column); "
                                 "fill it in or remove that row")
    # A column no row has is still a misspelt or missing column, named with those the rows do have.
    data = _jsonl(tmp_path / "e.jsonl", [{"question": "1+1"}, {"question": "2+2", "level": 1}])
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert str(caught.value) == ("dataset has no column 'answer' (dataset.answer_column); "
                                 "its columns are: question, level")


@pytest.mark.parametrize(("rows", "message"), [
    ([{"question": "1+1", "answer": 2}, {"q": "2+2", "answer": 4}],
     "dataset row 2 has no column 'question' (dataset.problem_column); fill it in or remove that row"),
    ([{"question": "1+1", "answer": 2}, {"question": "2+2", "answer": None}],
     "dataset row 2 has null in column 'answer' (dataset.answer_column); fill it in or remove that row"),
    ([{"question": "1+1", "answer": 2}, {"question": " \n", "answer": 4}],
     "dataset row 2 has empty text in column 'question' (dataset.problem_column); fill it in or remove that row"),
    ([{"question": "1+1", "answer": 2}, {"question": [{"role": "user", "content": "1+1"}], "answer": "2"}],
     "dataset row 2: column 'question' (dataset.problem_column) holds a conversation (a list of messages), which "
     "only the model's chat template can render; set dataset.template=chat (it is r1_zero)"),
    ([{"question": {"text": "1+1"}, "answer": "2"}],
     "dataset row 1: column 'question' (dataset.problem_column) holds a dict, not text; give the problem as text, or "
     'as a list of {"role": ..., "content": ...} messages: point dataset.problem_column at such a column'),
])
def test_a_bad_row_past_the_first_is_a_user_error_naming_it(tmp_path: Path, rows: list[dict], message: str) -> None:
    """Only the first row's columns were checked: a later row without one raised KeyError, a null
    answer made the accuracy reward raise on every completion of that prompt, an empty problem under
    template plain was a prompt of no tokens (the hf engine sampled its completions from padding, and
    the learner read the first token's log-prob off that token itself), and a list of chat messages
    (under a template other than chat) became its Python repr inside the prompt."""
    data = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert str(caught.value) == message


@pytest.mark.parametrize(("problem", "fault"), [
    ([], "it is empty"),
    (["1+1"], 'message 1 is not {"role": text, "content": text}'),
    ([{"role": "user", "content": "1+1"}, {"role": "assistant"}], 'message 2 is not {"role": text, "content": text}'),
    ([{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
     "the last message is the assistant's, not the user's"),
])
def test_a_list_that_is_not_a_conversation_is_a_user_error(tmp_path: Path, problem: list, fault: str) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"question": problem, "answer": "2"}])
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data), template="chat"))
    assert str(caught.value) == (
        f"dataset row 1: column 'question' (dataset.problem_column) holds a list that is not a conversation ({fault}); "
        'give the problem as text, or as a list of {"role": ..., "content": ...} messages ending with the user\'s')


def test_a_conversational_dataset_is_rendered_by_the_chat_template(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Conversational datasets hold each prompt as messages (a system turn, few-shot turns, the
    question): with template chat the model's own template renders them, with the prefill after."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    few_shot = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2+3"}]
    own_system = [{"role": "system", "content": "Add."}, {"role": "user", "content": "4+4"}]
    data = _jsonl(tmp_path / "d.jsonl", [{"question": few_shot, "answer": "5"}, {"question": own_system, "answer": "8"},
                                         {"question": "3+3", "answer": "6"}])
    cfg = DatasetConfig(source="jsonl", path=str(data), template="chat", system_prompt="Be brief.", prefill="<a>")
    rows = load_prompts(cfg, tokenizer)
    assert rows[0]["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n"
                                 "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+3<|im_end|>\n"
                                 "<|im_start|>assistant\n<a>")
    # A conversation's own system message stands; the configured one is not added as a second.
    assert rows[1]["prompt"] == ("<|im_start|>system\nAdd.<|im_end|>\n<|im_start|>user\n4+4<|im_end|>\n"
                                 "<|im_start|>assistant\n<a>")
    assert rows[2]["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n3+3<|im_end|>\n"
                                 "<|im_start|>assistant\n<a>")  # text problems in the same file as before
    assert rows[0]["problem"] == few_shot and rows[0]["answer"] == "5"


def test_numbers_as_answers_and_null_answers_of_reasoning_gym_tasks(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": 2}, {"question": "x/2=1", "answer": 2.0}])
    assert [r["answer"] for r in load_rows(DatasetConfig(source="jsonl", path=str(data)))] == [2, 2.0]
    rush_hour = load_rows(dataclasses.replace(GYM, task="rush_hour", task_args={}, size=1))
    assert rush_hour[0]["answer"] is None  # scored by the task's own scorer from its metadata


def test_a_chat_template_that_refuses_a_system_prompt_is_a_user_error(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # How Gemma's chat template opens.
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError) as caught:
        render_prompt("1+1", DatasetConfig(template="chat", system_prompt="Be brief."), tokenizer)
    assert str(caught.value) == ("dataset.template=chat: the model's chat template refused the prompt (System role "
                                 "not supported); set dataset.system_prompt=null")
    assert render_prompt("1+1", DatasetConfig(template="chat"), tokenizer) == "1+1"


def test_jsonl_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_rows(DatasetConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1", "answer": "1"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(DatasetConfig(source="jsonl", path=str(bad)))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"question": "1", "answer": "1"}\n{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(latin1)))
    assert str(caught.value) == f"{latin1} line 2 is not UTF-8 text (byte 0xe9 at column 18); save the file as UTF-8"


def test_a_lone_surrogate_escape_in_a_json_line_is_a_user_error(tmp_path: Path) -> None:
    """JSON's \\ud83d\\ude00 escapes one emoji as a UTF-16 pair; text cut between the two (by a tool
    counting UTF-16 units) leaves half a pair, which json reads into a str no tokenizer takes: training
    stopped with a TypeError from the tokenizer when it measured the prompts."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "smile \\ud83d\\ude00 1+1", "answer": "2"}\n'
                    '{"question": "path C:\\\\ud800", "answer": "3"}\n'  # an escaped backslash, then text
                    '{"question": "cut \\ud83d", "answer": "4"}\n')
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert str(caught.value) == (f"{data}:3: holds half of a UTF-16 surrogate pair (an escape such as \\ud83d without "
                                 "its partner, as text cut in the middle of an emoji), which is no character and no "
                                 "tokenizer takes; fix or remove that text")
    data.write_text("\n".join(data.read_text().splitlines()[:2]) + "\n")
    assert [r["problem"] for r in load_rows(DatasetConfig(source="jsonl", path=str(data)))] == [
        "smile \U0001f600 1+1", "path C:\\ud800"]


def test_jsonl_with_a_byte_order_mark_and_windows_line_ends(tmp_path: Path) -> None:
    """Notepad's "UTF-8 with BOM": the first line was refused as not valid JSON."""
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"question": "caf\xc3\xa9 1+1", "answer": 2}\r\n{"question": "2+2", "answer": 4}\r\n')
    rows = load_rows(DatasetConfig(source="jsonl", path=str(data)))
    assert [(r["problem"], r["answer"]) for r in rows] == [("caf\u00e9 1+1", 2), ("2+2", 4)]


@pytest.mark.parametrize(("path", "what"), [("./no-such-data", "no such folder"), ("{tmp}/data.jsonl", "not a folder"),
                                           ("data.jsonl", "not a folder")])
def test_an_hf_path_that_names_no_local_folder_is_not_looked_up_on_the_hub(tmp_path: Path, path: str, what: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A path (./, ../, /, ~) that is no folder was passed on to the Hub: offline the error named a
    connection, online an invalid repository id. So was a relative path to a file that is there."""
    (tmp_path / "data.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    path = path.format(tmp=tmp_path)
    with pytest.raises(UserError) as caught:
        load_rows(DatasetConfig(source="hf", path=path))
    assert str(caught.value) == (f"dataset.path={path}: {what}; pass a dataset folder (save_to_disk, or data files) "
                                 "or a Hub id (org/name); a .jsonl file takes dataset=jsonl")


def test_hf_source_reads_a_local_dataset_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", [{"q": "1+2", "a": "3"}])
    _jsonl(tmp_path / "test.jsonl", [{"q": "2+2", "a": "4"}])
    cfg = DatasetConfig(source="hf", path=str(tmp_path), problem_column="q", answer_column="a")
    assert [r["answer"] for r in load_rows(cfg)] == ["3"]
    assert [r["answer"] for r in load_rows(cfg, split="test")] == ["4"]


def test_data_without_answers_has_none(tmp_path: Path) -> None:
    """dataset.answer_column=null: prompts alone, for rewards that need no reference (a length term,
    a reward model, your own function); every row's `answer` is None and no column is required."""
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Write a haiku."}, {"prompt": "Name a bird.", "answer": "x"}])
    rows = load_rows(DatasetConfig(source="jsonl", path=str(data), problem_column="prompt", answer_column=None))
    assert [(r["problem"], r["answer"]) for r in rows] == [("Write a haiku.", None), ("Name a bird.", None)]


def test_hf_source_reads_a_save_to_disk_folder(tmp_path: Path) -> None:
    """What `Dataset.save_to_disk` writes, which `load_dataset` refuses ("use load_from_disk"): a
    DatasetDict's splits, or one Dataset; a conversational prompt column comes back as messages."""
    import datasets

    conversation = [{"role": "system", "content": "Add."}, {"role": "user", "content": "1+2"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": conversation, "solution": "3"}]),
                          "test": datasets.Dataset.from_list([{"prompt": conversation, "solution": "4"}])}
                         ).save_to_disk(str(tmp_path / "dict"))
    cfg = DatasetConfig(source="hf", path=str(tmp_path / "dict"), problem_column="prompt", answer_column="solution",
                        template="chat")
    (row,) = load_rows(cfg)
    assert (row["problem"], row["answer"]) == (conversation, "3")
    assert [r["answer"] for r in load_rows(cfg, split="test")] == ["4"]
    with pytest.raises(UserError) as caught:
        load_rows(cfg, split="tset")
    assert str(caught.value) == (f"dataset {tmp_path / 'dict'} has no split 'tset' (did you mean test?); its splits "
                                 "are train, test: set dataset.split (eval.split when evaluating)")
    datasets.Dataset.from_list([{"q": "1+2", "a": "3"}]).save_to_disk(str(tmp_path / "one"))
    assert [r["answer"] for r in load_rows(DatasetConfig(source="hf", path=str(tmp_path / "one"), problem_column="q",
                                                         answer_column="a"))] == ["3"]


def test_hf_source_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset.path=nobody/no-such-dataset-xyz: cannot load it"):
        load_rows(DatasetConfig(source="hf", path="nobody/no-such-dataset-xyz"))
    _jsonl(tmp_path / "train.jsonl", [{"question": "1+2", "answer": "3"}])
    with pytest.raises(UserError, match="split=validation"):
        load_rows(DatasetConfig(source="hf", path=str(tmp_path), split="validation"))


def test_chat_template_without_one_is_a_user_error() -> None:
    with pytest.raises(UserError, match="needs a tokenizer with a chat template"):
        render_prompt("x", DatasetConfig(template="chat"), None)


class _WordTokenizer:
    """One token per space-separated word; records whether special tokens were asked for."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        assert add_special_tokens is False  # the engines tokenise rendered prompts without adding any
        return {"input_ids": [[0] * len(t.split()) for t in texts]}


def test_prompts_over_the_limit_are_left_out_with_a_note() -> None:
    from grpo_cli.data import fitting_prompts

    rows = [{"prompt": "a b c"}, {"prompt": "a b c d e"}, {"prompt": "a"}, {"prompt": "a b c d"}]  # 3, 5, 1, 4 tokens
    fits, note = fitting_prompts(rows, _WordTokenizer(), 4, "rollout.max_prompt_tokens")
    assert fits == [True, False, True, True]  # at most 4 tokens
    assert note == "left out 1 of 4 prompts longer than 4 tokens (rollout.max_prompt_tokens; the longest has 5)"
    assert fitting_prompts(rows, _WordTokenizer(), 5, "x") == ([True] * 4, None)
    with pytest.raises(UserError, match=r"^every prompt is longer than 0 tokens \(x; the shortest has 1\)"):
        fitting_prompts(rows, _WordTokenizer(), 0, "x")


def test_the_prompt_limit_leaves_the_model_room_for_a_completion() -> None:
    from types import SimpleNamespace

    from grpo_cli.config import compose
    from grpo_cli.loop import prompt_limit

    cfg = compose(["rollout.max_prompt_tokens=300"])
    assert prompt_limit(cfg, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=4096))) == \
        (300, "rollout.max_prompt_tokens")
    assert prompt_limit(cfg, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=256))) == \
        (255, "the model's context of 256 tokens, less one for the completion")
    assert prompt_limit(cfg, SimpleNamespace()) == (300, "rollout.max_prompt_tokens")  # a model naming no context


def test_problems_holding_a_special_tokens_text_get_a_note(smollm2_dir) -> None:
    from transformers import AutoTokenizer

    from grpo_cli.data import special_token_note

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [{"problem": "What is 2 + 2?"}, {"problem": "Say <|im_end|> then <|im_start|>"}, {"problem": "a<|endoftext|>"}]
    assert special_token_note(rows, tokenizer, "dataset") == (
        "dataset: 2 of 3 problems hold the text of a special token of the model (first: '<|im_end|>' in row 2), "
        "which the model reads as that token; clean those rows if it is not meant as one")
    # As the engines tokenise the prompt, the problem's '<|im_end|>' is that one token, which the note is about.
    ids = tokenizer("Say <|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert special_token_note(rows[:1] + [{"problem": "<|im_end"}, {"problem": 7}], tokenizer, "dataset") is None
