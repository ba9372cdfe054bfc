"""Rewards written by the user: `fn: FILE.py:NAME` (a Python file) or `fn: package.module:NAME`.

    rewards:
      accuracy: {weight: 1.0}
      brevity: {fn: my_rewards.py:brevity, weight: 0.5, args: {limit: 200}}

The function takes the completions first and any dataset columns it names after them, e.g.

    def brevity(completions, answer, limit=100):
        return [1.0 if len(c) <= limit else 0.0 for c in completions]

It is called with a batch of completions (strings, the prefill put back in front) and, for each
parameter named after a column, that column aligned with them: every column of the dataset (but
one named `completions`, the name the completions are passed under), plus
`problem`, `answer`, `prompt` (the rendered prompt), `completion_tokens` and `completion_ids`
(each completion's token count and token ids). A function with `**kwargs` gets them all. A
parameter named `completions` gets the completions wherever it stands, and one named `prompts` (or
`**kwargs`, under that name) the `prompt` column, so that functions written for TRL's GRPOTrainer
(`def f(prompts, completions, completion_ids, **kwargs)`) work unchanged when they read plain
text. `args` are passed as keyword arguments on every call (and take the place of a column of the
same name). The file may import modules that lie beside it.

It returns one number per completion (an `async def` function is run to completion), or None for
a completion it does not apply to (a code reward on the math rows of a mixed dataset): that adds
nothing to the total and is left out of the reward's mean. A completion whose score raises or is
not a finite number scores 0 and is counted in `reward/<label>/errors`, as for any reward.

The code runs in the trainer's process: it is the user's own, like the config. Model output it
runs (code-execution rewards) belongs in the sandbox of the `code` reward, never here.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import suggestion

_COLUMNS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def is_custom(name: str) -> bool:
    """Whether a reward's `fn` names the user's own function (`WHERE:NAME`) rather than a built-in."""
    return ":" in name


def is_file(spec: str) -> bool:
    """Whether a custom `fn` names a Python file (else an importable module)."""
    where = spec.rpartition(":")[0]
    return where.endswith(".py") or "/" in where


class UserReward:
    """A user's function as a reward: passes it the columns it names (all of them to `**kwargs`)
    and its `args`. `required` are the columns it needs that no arg supplies."""

    def __init__(self, fn: Callable[..., Any], args: Mapping[str, Any], spec: str) -> None:
        self.fn, self.args, self.spec = fn, dict(args), spec
        params = list(inspect.signature(fn).parameters.values())
        # TRL-style functions take `completions` (and `prompts`) as keywords, anywhere in the list.
        self.by_name = any(p.name == "completions" and p.kind in _COLUMNS for p in params)
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      inspect.Parameter.VAR_POSITIONAL)
        if not self.by_name and (not params or params[0].kind not in positional):
            raise ValueError("must take the completions as its first argument, e.g. def "
                             f"{getattr(fn, '__name__', 'reward')}(completions, answer): ...")
        if self.by_name:
            rest = [p for p in params if p.name != "completions"]
        else:
            rest = params[1:] if params[0].kind is not inspect.Parameter.VAR_POSITIONAL else params
        self.takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest)
        self.named = {p.name for p in rest if p.kind in _COLUMNS}
        for key in self.args:
            if key not in self.named and not self.takes_all:
                raise ValueError(f"unknown argument {key!r}{suggestion(key, self.named)}; its parameters besides "
                                 f"the completions: {', '.join(sorted(self.named)) or 'none'}")
        self.required = {p.name for p in rest if p.kind in _COLUMNS and p.default is inspect.Parameter.empty}
        self.required -= {*self.args, "prompts"}  # `prompts` is the `prompt` column, which every row has

    def __call__(self, completions: list[str], **columns: Sequence[Any]) -> Any:
        passed = {k: v for k, v in columns.items() if (self.takes_all or k in self.named) and k not in self.args}
        wants_prompts = "prompts" in self.named or self.takes_all  # TRL passes the prompts as `prompts`
        if wants_prompts and "prompts" not in passed and "prompts" not in self.args and "prompt" in columns:
            passed["prompts"] = columns["prompt"]
        if self.by_name:
            out = self.fn(completions=completions, **passed, **self.args)
        else:
            out = self.fn(completions, **passed, **self.args)
        return asyncio.run(out) if inspect.iscoroutine(out) else out  # `async def`: e.g. a call to a judge service

    def __repr__(self) -> str:
        return f"UserReward({self.spec})"


def load(spec: str, args: Mapping[str, Any]) -> UserReward:
    """The reward `spec` (`FILE.py:NAME` or `package.module:NAME`) names, with `args`. Problems with
    the file, its import or the function raise ValueError in one line."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(f"'{spec}' is not FILE.py:FUNCTION or package.module:FUNCTION")
    module = _load_file(Path(where).expanduser()) if is_file(spec) else _load_module(where)
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items()
                         if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_"))
        raise ValueError(f"{where} has no function '{name}'{suggestion(name, defined)}")
    if not callable(fn):
        raise ValueError(f"{where}: '{name}' is not a function (it holds {fn!r:.40})")
    return UserReward(fn, args, spec)


def _load_file(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    path = path.resolve()
    # One module per file, kept: building the reward again (validation, then the run) imports it once.
    key = "grpo_user_reward_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    # The file may import modules beside it, as it would run as `python FILE.py`, from wherever grpo
    # runs (the `grpo` command puts its own folder, not the working directory, first on the path).
    # Appended, so an installed module keeps its name.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[key]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ValueError(f"importing {path} failed: {_where_it_failed(e, path)}") from None
    return module


def _load_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise ValueError(f"no module named '{e.name}' (name a file as path/to/file.py:FUNCTION, or install "
                             "the package)") from None
        raise ValueError(f"importing {name} failed: {_where_it_failed(e, None)}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised on import: name it, in one line
        raise ValueError(f"importing {name} failed: {_where_it_failed(e, None)}") from None


def _where_it_failed(e: BaseException, path: Path | None) -> str:
    """`Type: message (line N)` for an exception raised while importing user code: the line in
    `path` (or, for a module, in the last file of user code) where it was raised."""
    if isinstance(e, SyntaxError) and e.lineno:
        return f"{type(e).__name__}: {e.msg} (line {e.lineno})"
    text = str(e).splitlines()[0] if str(e) else ""
    message = f"{type(e).__name__}: {text}" if text else type(e).__name__
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if (Path(f.filename) == path if path else not f.filename.startswith("<frozen"))]
    if not frames:
        return message
    return f"{message} ({'' if path else frames[-1].filename + ', '}line {frames[-1].lineno})"
