"""`language_consistency`: the share of the reasoning's letters written in the target
language's script (DeepSeek-R1 stage 2 added such a reward against language mixing).

Letters are classified by Unicode script via `unicodedata` names, so no language-id model is
needed; the price is that languages sharing a script (English vs French) are not told apart.
Math is not language, so math-heavy reasoning in, say, Chinese is not counted as Latin text:
skipped are math spans ($...$, $$...$$, \\(...\\), \\[...\\]; an escaped \\$ is a dollar sign),
LaTeX command names (\\frac, \\sqrt), lone Latin or Greek letters (variables: "设x为正数",
"the angle θ") and <think>/<answer> tags.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

from .base import RewardFn
from .extract import think_text

_LATIN = frozenset({"LATIN"})
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: _LATIN for code in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi",
                                 "pl", "cs", "ro", "hu", "tr", "vi", "id", "ms")},
    "zh": frozenset({"HAN"}),
    "ja": frozenset({"HAN", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL"}),
    **{code: frozenset({"CYRILLIC"}) for code in ("ru", "uk", "bg", "sr")},
    **{code: frozenset({"ARABIC"}) for code in ("ar", "fa", "ur")},
    "he": frozenset({"HEBREW"}),
    "el": frozenset({"GREEK"}),
    **{code: frozenset({"DEVANAGARI"}) for code in ("hi", "mr", "ne")},
    "bn": frozenset({"BENGALI"}),
    "th": frozenset({"THAI"}),
}

_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
# A Latin or Greek letter with no letter of its own script beside it is a variable, not a word.
_LONE_LETTER_RE = re.compile(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])|(?<![\u0370-\u03ff])[\u0370-\u03ff](?![\u0370-\u03ff])")
# Where math spans open; "$" only when not escaped.
_MATH_OPEN_RE = re.compile(r"\$\$|\\\[|\\\(|(?<!\\)\$")
_MATH_CLOSE = {"$$": "$$", "\\[": "\\]", "\\(": "\\)", "$": "$"}
# Template tags left inside the reasoning (nested, duplicated, an unclosed <think>) are markup,
# not Latin words.
_TAG_RE = re.compile(r"</?(?:think|answer)>")
# Name prefixes that do not start with the script's own name.
_NAME_PREFIXES = (("CJK ", "HAN"), ("IDEOGRAPHIC ", "HAN"), ("HALFWIDTH KATAKANA", "KATAKANA"),
                  ("HALFWIDTH HANGUL", "HANGUL"), ("FULLWIDTH LATIN", "LATIN"),
                  ("KATAKANA-HIRAGANA", "KATAKANA"))


@functools.lru_cache(maxsize=65536)
def script_of(ch: str) -> str | None:
    """Script of a letter (e.g. "LATIN", "HAN"), None for non-letters."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    for prefix, script in _NAME_PREFIXES:
        if name.startswith(prefix):
            return script
    return name.split(" ", 1)[0] or None


def strip_math(text: str) -> str:
    """`text` with its math spans replaced by a space. An opener without a closer is left as
    text (a cut-off formula must not hide the prose after it). Linear: once a closer is missing
    after some point, later openers of its kind are not searched again."""
    out: list[str] = []
    pos = 0  # text[pos:] is not yet copied
    missing: set[str] = set()
    for m in _MATH_OPEN_RE.finditer(text):
        if m.start() < pos or m.group() in missing:
            continue
        closer = _MATH_CLOSE[m.group()]
        end = text.find(closer, m.end())
        while closer == "$" and end != -1 and text[end - 1] == "\\":  # "\\$" inside is no closer
            end = text.find(closer, end + 1)
        if end == -1:
            missing.add(m.group())
            continue
        out.append(text[pos : m.start()])
        out.append(" ")
        pos = end + len(closer)
    out.append(text[pos:])
    return "".join(out)


def script_share(text: str, scripts: frozenset[str]) -> float:
    text = _LONE_LETTER_RE.sub(" ", _LATEX_COMMAND_RE.sub(" ", strip_math(_TAG_RE.sub(" ", text))))
    letters = [s for s in map(script_of, text) if s is not None]
    if not letters:
        return 0.0
    return sum(s in scripts for s in letters) / len(letters)


def language_consistency(language: str = "en") -> RewardFn:
    """Share of letters in the reasoning (the <think> part when present, else the whole text)
    that belong to `language`'s script(s); 0 when there are no letters."""
    if language not in LANGUAGE_SCRIPTS:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(sorted(LANGUAGE_SCRIPTS))}")
    scripts = LANGUAGE_SCRIPTS[language]

    def language_consistency_reward(completions: list[str], **_: Any) -> list[float]:
        return [script_share(think_text(text), scripts) for text in completions]

    return language_consistency_reward
