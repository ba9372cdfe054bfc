"""The one exception type for mistakes a user can fix, and helpers to word its one-line messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input (config, override, path, dataset column): the CLI prints it as one line and exits 2."""


class SameOnEveryRank(UserError):
    """A mistake every learner process of a node finds alike (the config, the run directory): under
    torchrun only the first process of each node reports it (grpo_cli.cli), not every GPU's."""


class RolloutServerError(RuntimeError):
    """A rollout server did not answer, or answered with an error: the message names the server and
    what to check. The CLI prints it as one line and exits 1."""


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.5) -> str:
    """' (did you mean a or b?)' for close matches of `word` among `options`, else ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=3, cutoff=cutoff)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def utf8_lines(path: Path, fix: str) -> Iterator[tuple[int, str]]:
    """(number, line) for each line of a text file; a line that is not UTF-8 is a UserError naming the
    file, the line and `fix`. Lines end at \\n only, as JSON lines do."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {number} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                f"{e.start + 1}); {fix}") from None
