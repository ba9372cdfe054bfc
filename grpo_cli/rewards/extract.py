"""Pulling answers, reasoning and code out of completions and reference solutions.

Pure string functions (no math-verify, no regex backtracking blow-ups on adversarial text):
they run in the trainer process on untrusted model output, so they only ever read it.
"""

from __future__ import annotations

import re

_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
# Integers with optional thousands separators ("1,000", LaTeX's "1{,}000"), decimals, simple
# fractions ("3/4") and LaTeX fractions of numbers ("\frac{3}{4}", "\dfrac34"), whose denominator
# alone is no answer. A minus sign right after a word character is a hyphen or a subtraction
# ("2024-01", "3-5"), not a sign.
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\\[dt]?frac(?:\{\s*-?\d+(?:\.\d+)?\s*\}\{\s*\d+(?:\.\d+)?\s*\}|\d\d)"
                        r"|(?:\d+(?:(?:,|\{,\})\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?)")
_BOXED_NAMES = ("\\boxed", "\\fbox")
# An en dash (U+2013) directly before a number.
_EN_DASH_NUMBER_RE = re.compile(r"\u2013(?=\.?\d)")


def normalize_minus(text: str) -> str:
    """U+2212 MINUS SIGN becomes "-", and so does an en dash (U+2013) directly before a number
    ("it is <en dash>5", "x <en dash> 1"), unless a digit comes before it (spaces skipped): "3<en
    dash>5" and "3 <en dash> 5" are ranges, as typeset text writes them, never a negative 5."""
    text = text.replace("\u2212", "-")
    if "\u2013" not in text:
        return text

    def sign(m: re.Match[str]) -> str:
        # A bounded look back keeps text of many dashes and spaces linear.
        before = text[max(0, m.start() - 32) : m.start()].rstrip(" \t")
        return "\u2013" if before[-1:].isdigit() else "-"

    return _EN_DASH_NUMBER_RE.sub(sign, text)


def answer_tag(text: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair, or None. With nested tags that is
    the innermost pair ("<answer>a <answer>5</answer></answer>" gives "5"). Found with rfind,
    not a regex, so adversarial text with many unclosed tags stays linear."""
    last_close = text.rfind("</answer>")
    if last_close == -1:
        return None
    start = text.rfind("<answer>", 0, last_close)
    if start == -1:
        return None
    start += len("<answer>")
    return text[start : text.find("</answer>", start)]


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{...} (or \\fbox{...}); nested braces and escaped
    braces (\\{ \\}) are handled. Returns None when there is none."""
    starts: list[int] = []
    for name in _BOXED_NAMES:
        pos = text.find(name)
        while pos != -1:
            starts.append(pos + len(name))
            pos = text.find(name, pos + 1)
    # Only the last few candidates: keeps adversarial text with thousands of unclosed
    # \boxed{ from costing quadratic time.
    for start in sorted(starts, reverse=True)[:32]:
        content = _braced_at(text, start)
        if content is not None:
            return content
    return None


def _braced_at(text: str, i: int) -> str | None:
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # an escaped char, e.g. \{ in a set, never opens or closes the group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def hash_answer(text: str) -> str | None:
    """GSM8K style: what follows the last '####' on its line (thousands commas removed)."""
    matches = _HASH_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip()
    return re.sub(r"(?<=\d),(?=\d{3})", "", value) or None


def final_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1].replace("{,}", "").replace(",", "") if matches else None


def extract_answer(text: str) -> str | None:
    """The completion's final answer: last <answer> content, else last \\boxed{...}, else a
    '#### N', else the final number in the text. None if none is found, and also when the last
    <answer> is empty: the model said where its answer is and left it out, so a number in its
    reasoning is not taken instead. Minus signs are normalised first (`normalize_minus`), so
    "is <U+2212>5" gives "-5", not "5"."""
    return final_answer(text)[0]


def final_answer(text: str) -> tuple[str | None, bool]:
    """`extract_answer`'s answer, and whether it is a whole answer the model marked as one (the
    content of an <answer> or a \\boxed{}) rather than a number picked out of the text."""
    text = normalize_minus(text)
    tagged = answer_tag(text)
    if tagged is not None:  # an empty <answer> is no answer: nothing else is read in its place
        return (tagged.strip(), True) if tagged.strip() else (None, False)
    for extractor, marked in ((last_boxed, True), (hash_answer, False), (final_number, False)):
        found = extractor(text)
        if found is not None and found.strip():
            return found.strip(), marked
    return None, False


# A bare number: "72", "-4", "0.5", "1,000", "3/4", "\frac{3}{4}" (after `_layout`: no "$", "\%", spaces).
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_OPERAND = rf"(?:{_NUMBER})(?:/(?:{_NUMBER}))?|\\[dt]?frac\{{[-+]?(?:{_NUMBER})\}}\{{[-+]?(?:{_NUMBER})\}}"
_PLAIN_NUMBER_RE = re.compile(rf"[-+]?(?:{_OPERAND})")
_OPERATOR = r"[-+*\u00d7\u00b7\u00f7]|\\(?:times|cdot|div|ast)(?![A-Za-z])"
_ARITHMETIC_RE = re.compile(rf"[-+]?(?:{_OPERAND})(?:(?:{_OPERATOR})[-+]?(?:{_OPERAND}))+")
# Numbers and the operators between them, not glued to a word, a power or a LaTeX group:
# "1.5 \times 10^{3}" holds the expressions "1.5" and "3" (in braces: none), "\sqrt{2} + 1" only "1".
_NUMBER_EXPR_RE = re.compile(
    rf"(?<![\w.^{{}}\\])[-+]?(?:{_OPERAND})(?:\s*(?:{_OPERATOR})\s*[-+]?(?:{_OPERAND}))*(?![\w^{{\\]|\.\w)"
)
_LAYOUT_RE = re.compile(r"\\[,;:! ()\[\]]|\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\?[$%]|[()]|\.$"
                        r"|\\(?:text|mbox|mathrm)\s*\{[^{}]*\}")


def _layout(text: str) -> str:
    """`text` without what does not change which number it is: "$", "\\%", "\\$", \\( \\) \\[ \\],
    parentheses, \\left/\\right, LaTeX spaces, \\text{...} (a unit) and a final period."""
    return _LAYOUT_RE.sub("", text.strip())


def is_plain_number(text: str) -> bool:
    """True for a bare number ("72", "-4", "1,000", "0.5", "3/4", "\\frac{3}{4}", "\\$18", "50\\%")."""
    return _PLAIN_NUMBER_RE.fullmatch(re.sub(r"\s+", "", _layout(text))) is not None


def is_number_arithmetic(text: str) -> bool:
    """True when the last expression on numbers in `text` (after its last "=", inside its last
    \\boxed{}; the one math-verify reads) is arithmetic left unevaluated: "4 - 1", "The answer is
    2 \\times 3", "\\frac{1}{2} + \\frac{1}{4}". "4 - 1 = 3", "-4", "3/4" and "1.5 \\times 10^{3}" are
    values, not arithmetic left undone."""
    boxed = last_boxed(text)
    value = _layout((text if boxed is None else boxed).rsplit("=", 1)[-1])
    expressions = _NUMBER_EXPR_RE.findall(value)
    return bool(expressions) and _ARITHMETIC_RE.fullmatch(re.sub(r"\s+", "", expressions[-1])) is not None


def gold_answer(reference: str) -> str:
    """The answer part of a reference: after '####' (GSM8K solution), else the last
    \\boxed{...} (MATH solution), else the whole reference; minus signs normalised as in
    `extract_answer`."""
    return reference_answer(reference)[0]


def reference_answer(reference: str) -> tuple[str, bool]:
    """`gold_answer`'s answer, and whether it is the content of a \\boxed{}."""
    reference = normalize_minus(str(reference))
    if "####" in reference:
        found = hash_answer(reference)
        if found:
            return found, False
    if any(name in reference for name in _BOXED_NAMES):
        found = last_boxed(reference)
        if found is not None:
            return found.strip(), True
    return reference.strip(), False


def answer_or_text(text: str) -> str:
    """<answer> content if present, else the text after the last </think> (the whole text if
    there is none), stripped. Used where answers are free-form strings (reasoning-gym)."""
    found = answer_tag(text)
    if found is not None:
        return found.strip()
    return text.rsplit("</think>", 1)[-1].strip()


def think_text(text: str) -> str:
    """The reasoning part: between <think> and </think> when present (up to the end of the
    text when unclosed; from the start when only </think> is present), else the whole text."""
    start = text.find("<think>")
    if start != -1:
        body = text[start + len("<think>") :]
        end = body.find("</think>")
        return body if end == -1 else body[:end]
    end = text.find("</think>")
    return text if end == -1 else text[:end]


_PY_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE_RE = re.compile(r"```[^\n`]*\r?\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The program in a completion: last ```python fenced block, else the last ``` fenced
    block, else the <answer> content. None when nothing looks like code."""
    for pattern in (_PY_FENCE_RE, _ANY_FENCE_RE):
        blocks = pattern.findall(text)
        if blocks:
            return blocks[-1]
    found = answer_tag(text)
    if found is None:
        return None
    found = found.strip()
    # An <answer> may itself hold a fence without a newline after the language tag.
    found = re.sub(r"^```[ \t]*(?:python3?|py)?[ \t]*", "", found, flags=re.IGNORECASE)
    found = re.sub(r"```$", "", found).strip()
    return found or None
