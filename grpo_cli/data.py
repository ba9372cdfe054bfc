"""Datasets and prompt templates: turn a dataset config into prompts with their answer columns.

Every source yields plain rows (dicts), all with the same columns (None where a JSON line leaves one
out). Each row keeps its original columns and gains three:
`problem` and `answer` (copied from the configured columns, so rewards always find `answer`; None
under dataset.answer_column=null, data without reference answers) and `prompt`, the exact text the
model continues (template applied, prefill appended).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_cli import datacache
from grpo_cli.errors import UserError, did_you_mean, first_line, utf8_lines
from grpo_cli.models import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from grpo_cli.schema import DatasetConfig

# The base-model template of DeepSeek-R1-Zero (DeepSeek-R1 paper, Table 1).
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {problem}. Assistant:"
)


def load_rows(cfg: DatasetConfig, split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """The dataset's rows with `problem` and `answer` columns added (no prompt yet); with `limit`,
    only the first `limit` (a reasoning-gym task generates no more than those)."""
    if cfg.source == "reasoning_gym":
        rows = _reasoning_gym(cfg, split or cfg.split, limit)
    else:
        rows = {"hf": _hub, "jsonl": _jsonl}[cfg.source](cfg, split or cfg.split)[:limit]
    if not rows:
        raise UserError(f"dataset {cfg.path or cfg.task}: no rows; check dataset.path / dataset.split / dataset.size")
    # JSON lines may leave a field out of some rows: the columns are those of any row. A column that
    # only the first row lacks is that row's gap (_check_row names it), not a misspelt column.
    columns = dict.fromkeys(key for row in rows for key in row)
    for column, role in ((cfg.problem_column, "problem_column"), (cfg.answer_column, "answer_column")):
        if column is not None and column not in columns:
            existing = list(columns)
            raise UserError(f"dataset has no column '{column}' (dataset.{role}); its columns are: {', '.join(existing)}"
                            f"{did_you_mean(column, existing)}")
    for number, row in enumerate(rows, 1):
        _check_row(row, number, cfg)
        row["problem"] = row[cfg.problem_column]
        row["answer"] = row[cfg.answer_column] if cfg.answer_column is not None else None
    # A field some JSON lines leave out is None there, as `datasets` reads such a file, so every row
    # has the columns rewards are passed (those of the first row of a batch).
    columns.update(dict.fromkeys(("problem", "answer")))
    for row in rows:
        if len(row) < len(columns):
            row.update({key: None for key in columns if key not in row})
    return rows


def _check_row(row: dict[str, Any], number: int, cfg: DatasetConfig) -> None:
    """A row the first row's checks let through can still lack a column or hold null in it (a hub
    dataset with gaps, a hand-written JSON-lines file): one line naming the row, not a KeyError
    from the loader nor a reward that raises on every completion of that prompt, step after step.
    A problem is text, or (dataset.template=chat) a conversation: a list of {"role", "content"}
    messages ending with the user's turn, as conversational datasets hold their prompts.
    Some reasoning-gym tasks (rush_hour, graph_color, ...) have no single answer (null): their own
    scorer checks a completion against the item's metadata."""
    checked = [(cfg.problem_column, "problem_column")]
    if cfg.source != "reasoning_gym" and cfg.answer_column is not None:
        checked.append((cfg.answer_column, "answer_column"))
    for column, role in checked:
        if row.get(column) is None:
            what = "has no" if column not in row else "has null in"
            raise UserError(f"dataset row {number} {what} column '{column}' (dataset.{role}); "
                            "fill it in or remove that row")
    problem = row[cfg.problem_column]
    if isinstance(problem, str) and not problem.strip():
        # A gap, as null is: the model would be asked nothing, and a plain prompt of no tokens at all
        # has no token to predict the first completion token from (the hf engine sampled it from padding).
        raise UserError(f"dataset row {number} has empty text in column '{cfg.problem_column}' "
                        "(dataset.problem_column); fill it in or remove that row")
    where = f"dataset row {number}: column '{cfg.problem_column}' (dataset.problem_column)"
    if isinstance(problem, list):
        fault = _conversation_fault(problem)
        if fault:
            raise UserError(f"{where} holds a list that is not a conversation ({fault}); give the problem as text, "
                            'or as a list of {"role": ..., "content": ...} messages ending with the user\'s')
        if cfg.template != "chat":
            raise UserError(f"{where} holds a conversation (a list of messages), which only the model's chat "
                            f"template can render; set dataset.template=chat (it is {cfg.template})")
    elif isinstance(problem, dict):
        raise UserError(f"{where} holds a dict, not text; give the problem as text, or as a list of "
                        '{"role": ..., "content": ...} messages: point dataset.problem_column at such a column')


def _conversation_fault(messages: list[Any]) -> str | None:
    """What keeps a list from being a conversation grpo can prompt with, else None."""
    if not messages:
        return "it is empty"
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f'message {i} is not {{"role": text, "content": text}}'
    if messages[-1]["role"] != "user":
        return f"the last message is the {messages[-1]['role']}'s, not the user's"
    return None


# A chat template that opens the reasoning itself: DeepSeek-R1's distills and QwQ end the generation
# prompt with "<think>\n". The tag then starts the model's answer, as a prefill does.
_OPENED_THINK_RE = re.compile(r"<think>\s*\Z")


def opened_answer(prompt: str, prefill: str) -> str:
    """The start of the model's answer that `prompt` already holds, which the rewards score in front of
    each completion: the prefill, after a `<think>` (and the whitespace after it) that the chat template
    wrote itself. Without that tag, `format` scored 0 a perfect "... </think> <answer>...</answer>"."""
    head = prompt[: len(prompt) - len(prefill)] if prefill and prompt.endswith(prefill) else prompt
    opened = _OPENED_THINK_RE.search(head)
    return (opened.group(0) if opened else "") + prefill


def render_prompt(problem: str | list[dict[str, str]], cfg: DatasetConfig,
                  tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The text the model continues: the problem in its template, then the assistant prefill. A
    conversation (a list of messages, template chat) is rendered as it is, after the system prompt."""
    if cfg.template == "r1_zero":
        text = R1_ZERO_TEMPLATE.format(problem=str(problem).strip())
        # The template ends "Assistant:"; a prefill such as "<think>" goes after one space.
        return _bos(tokenizer) + text + (" " + cfg.prefill if cfg.prefill else "")
    if cfg.template == "plain":
        return _bos(tokenizer) + str(problem) + cfg.prefill
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("dataset.template=chat needs a tokenizer with a chat template; this model has none: "
                        "use dataset.template=r1_zero (base models) or plain")
    conversation = isinstance(problem, list)  # a conversational dataset's messages (checked by _check_row)
    messages = [dict(m) for m in problem] if conversation else [{"role": "user", "content": str(problem)}]
    if cfg.system_prompt and messages[0]["role"] != "system":  # a conversation's own system message wins
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    from jinja2.exceptions import TemplateError

    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # e.g. Gemma's template: "System role not supported"
        hint = "; set dataset.system_prompt=null" if cfg.system_prompt else ""
        raise UserError(f"dataset.template=chat: the model's chat template refused the prompt ({first_line(e)})"
                        f"{hint}") from None
    if cfg.prefill.lstrip().startswith("<think>") and _OPENED_THINK_RE.search(rendered):
        raise UserError(f"dataset.prefill={cfg.prefill!r} repeats the <think> that the model's chat template already "
                        "ends the prompt with; set dataset.prefill='' (the rewards see the template's <think>)")
    return rendered + cfg.prefill


def _bos(tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The BOS token's text for a tokenizer that starts every text with it (Llama, Mistral, Gemma), else "".
    Prompts are tokenised with no special tokens added (the chat template writes its own), so a plain
    or r1_zero prompt carries the BOS its model was trained to see at the start in its text."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos_id is None or not tokenizer.bos_token:
        return ""
    return tokenizer.bos_token if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos_id] else ""


def load_prompts(cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase | None,
                 split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    rows = load_rows(cfg, split, limit)
    for row in rows:
        row["prompt"] = render_prompt(row["problem"], cfg, tokenizer)
    return rows


def data_fingerprint(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a saved data position (loop.prompt_indices) refers to: the row count and a hash of the rows'
    problems and answers, in order. A resume compares it with the data it loaded. The prompt template and
    the prompt limit are left out: they change how a row is shown, or whether it is passed over, never
    which row stands where."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["problem"], row["answer"]], default=str).encode())
        digest.update(b"\n")
    return {"rows": len(rows), "sha256": digest.hexdigest()}


def prompt_token_counts(prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Each prompt's length in tokens, as the engines tokenise it (no special tokens added)."""
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []


def special_token_note(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase | None,
                       what: str) -> str | None:
    """A note when problems hold the text of one of the tokenizer's special tokens (e.g. '<|im_end|>'
    in a dataset of chat logs), else None. Prompts are tokenised as one text, so the model reads
    that text as the token itself (an end of turn, a new turn's start), as it would under any
    trainer that applies the chat template as text; the note names the first such row to check."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {*(getattr(tokenizer, "all_special_tokens", None) or []), *(t.content for t in added.values() if t.special)}
    specials = sorted((t for t in texts if len(t) > 1), key=len, reverse=True)
    if not specials:
        return None
    pattern = re.compile("|".join(re.escape(t) for t in specials))
    hits = [(i, m.group()) for i, row in enumerate(rows) if (m := pattern.search(str(row["problem"])))]
    if not hits:
        return None
    number, token = hits[0]
    return (f"{what}: {len(hits)} of {len(rows)} problems hold the text of a special token of the model (first: "
            f"'{token}' in row {number + 1}), which the model reads as that token; clean those rows if it is "
            "not meant as one")


def fitting_prompts(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, limit: int,
                    what: str) -> tuple[list[bool], str | None]:
    """Which rows' prompts have at most `limit` tokens (as the engines tokenise them: no special tokens
    added), and a note on what is left out (None when nothing is). A longer prompt cannot be sampled
    from; a few of them in a large dataset should not end a run at whichever step first draws one.
    `what` names the setting behind the limit, for the note and the error when no prompt fits."""
    lengths = prompt_token_counts([r["prompt"] for r in rows], tokenizer)
    fits = [n <= limit for n in lengths]
    if not any(fits):
        raise UserError(f"every prompt is longer than {limit} tokens ({what}; the shortest has {min(lengths)}): "
                        "raise the limit or use shorter prompts")
    if all(fits):
        return fits, None
    return fits, (f"left out {fits.count(False)} of {len(rows)} prompts longer than {limit} tokens ({what}; "
                  f"the longest has {max(lengths)})")


# ----------------------------------------------------------------------------- sources
def check_task(task: str) -> None:
    """A reasoning-gym task name, checked by `grpo config` too (importing reasoning-gym takes about a second)."""
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise UserError(f"dataset.task={task}: not a reasoning-gym task{did_you_mean(task, DATASETS)}; "
                        f"choose one of: {', '.join(sorted(DATASETS))}")


def _reasoning_gym(cfg: DatasetConfig, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The task's rows, read from the dataset cache (`datacache`) when they were generated before."""
    import reasoning_gym

    check_task(cfg.task)
    # The eval split draws with a seed of its own. Where a task has few distinct problems (one-digit
    # chain sums) the two draws still share some: an evaluation of a run leaves those out (evaluate.hold_out).
    seed = cfg.seed if split == "train" else cfg.seed + 1_000_003
    cache = datacache.RowCache(cache_dir(), cfg.task, cfg.size, seed, cfg.task_args)
    rows = cache.read()
    if rows is not None:
        return rows[:limit]
    try:
        items = reasoning_gym.create_dataset(cfg.task, size=cfg.size, seed=seed, **cfg.task_args)
    except TypeError as e:
        raise UserError(f"dataset.task_args for {cfg.task}: {e}") from None
    except (ValueError, AssertionError) as e:
        raise UserError(f"dataset.task_args for {cfg.task}: invalid ({e})") from None
    # Item i is generated from (seed, i) alone, so the first `limit` are those of the whole set, and
    # `grpo eval --limit 50` on countdown does not first generate all 20,000 (a minute on a CPU).
    count = len(items) if limit is None else min(limit, len(items))
    rows = [dict(items[i]) for i in range(count)]
    if count == len(items):
        cache.write(rows)
    return rows


def _hub(cfg: DatasetConfig, split: str) -> list[dict[str, Any]]:
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # without a network, 11 lines of retry warnings would bury the error

    folder = Path(cfg.path).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _saved(folder, split)
    # A path, not a Hub id (org/name): by its start, or a file that is there (data/train.parquet), which
    # load_dataset would look up on the Hub.
    if (cfg.path.startswith(("/", "./", "../", "~")) or folder.exists()) and not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise UserError(f"dataset.path={cfg.path}: {what}; pass a dataset folder (save_to_disk, or data files) or a "
                        "Hub id (org/name); a .jsonl file takes dataset=jsonl")
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=split)
    except ValueError as e:  # most often an unknown split or configuration name
        raise UserError(f"dataset {cfg.path} (name={cfg.name}, split={split}): {first_line(e)}") from None
    except Exception as e:  # not found, no network, gated: the hub raises many types
        raise UserError(f"dataset.path={cfg.path}: cannot load it from the Hugging Face Hub or disk "
                        f"({type(e).__name__}: {first_line(e)})") from None
    return ds.to_list()


def _saved(folder: Path, split: str) -> list[dict[str, Any]]:
    """A dataset written by `save_to_disk`, which `load_dataset` refuses: a DatasetDict's `split`, or
    a single Dataset whatever the split."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # a damaged or partly copied folder
        raise UserError(f"dataset.path={folder}: cannot load this save_to_disk folder ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {folder} has no split '{split}'{did_you_mean(split, list(ds))}; its splits are "
                            f"{', '.join(ds)}: set dataset.split (eval.split when evaluating)")
        ds = ds[split]
    return ds.to_list()


# The file is read as UTF-8, so only a JSON escape (\ud800 to \udfff) can bring in a lone surrogate.
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(row: dict[str, Any]) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _jsonl(cfg: DatasetConfig, split: str) -> list[dict[str, Any]]:
    path = Path(str(cfg.path)).expanduser()
    if not path.is_file():
        raise UserError(f"dataset.path={cfg.path}: no such file; pass a .jsonl file with one JSON object per line")
    rows = []
    for number, line in utf8_lines(path, "save the file as UTF-8"):
        if number == 1:  # editors on Windows start UTF-8 files with a byte-order mark, which json refuses
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        if _SURROGATE_ESCAPE_RE.search(line) and _lone_surrogate(row):
            raise UserError(f"{path}:{number}: holds half of a UTF-16 surrogate pair (an escape such as \\ud83d "
                            "without its partner, as text cut in the middle of an emoji), which is no character and "
                            "no tokenizer takes; fix or remove that text")
        rows.append(row)
    return rows
