"""math-verify worker process, run as a script by `mathcheck.MathChecker` (never imported).

Protocol (JSON lines): prints "ready" once math-verify is imported, then for every request
line {"timeout": seconds, "soft": bool, "pairs": [[gold, pred, gold_boxed, pred_boxed], ...]}
(the two flags optional, default false) prints one line per pair, in order and as soon as it
is known: "1" equal, "0" not equal, "g" gold answer unparseable, "t" soft timeout, "e" error.
Streaming per pair lets the parent hold an exact per-check deadline and, if this process gets
stuck in C code (huge integer powers ignore signals), kill it knowing which pair was
responsible. Exits on EOF.

A "boxed" answer is the content of a \\boxed{} or an <answer> tag: a whole final answer. When no
other reading of it parses, it is read as math-verify reads a box (`$\\boxed{...}$`), where a
bare word such as "Devon" is the string devon rather than prose with no math in it.
"""

import sys

# Run as a script, sys.path[0] is this package directory, whose math.py / code.py would
# shadow the standard library: drop it before importing anything else.
if sys.path and sys.path[0]:
    del sys.path[0]

import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402

_ANCHORS = ("\\(", "\\[", "\\boxed", "\\fbox")
# A "$" delimits math unless escaped: "\$18" is eighteen dollars (an even run of backslashes
# before it escapes only themselves).
_DOLLAR_RE = re.compile(r"(?:^|[^\\])(?:\\\\)*\$")
_ESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\\$")
_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
# Text inside math ("\text{Devon}", "5\mbox{ cm}") is LaTeX, not prose: its words don't count.
_TEXT_ARG_RE = re.compile(r"\\(?:text(?:bf|it|rm|sf|tt|normal)?|mbox|mathrm)\s*\{[^{}]*\}")
_WORD_RE = re.compile(r"[A-Za-z]{3,}")
# Text answers are short ("Devon", "\text{(A), (C)}"); read as a box, a long run of prose costs
# seconds of sympy per completion (20 KB of words: about 4 s) and is never an answer anyway.
_MAX_BOX_FALLBACK = 100
_MAX_CACHED_PRED = 200  # characters: longer predictions are parsed afresh every time


class _SoftTimeout(BaseException):
    """BaseException so math-verify's and sympy's `except Exception` blocks don't swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _run(parse, text):
    # No signal-based timeout inside math-verify: we bound time ourselves (setitimer here,
    # a hard kill in the parent).
    return parse(text, fallback_mode="no_fallback", parsing_timeout=None)


def _parse(text, parse, boxed=False):
    text = text.strip()
    if not text:
        return []
    found = _read(text, parse)
    if not found and boxed and len(text) <= _MAX_BOX_FALLBACK:
        # Last resort for a whole answer: read it as math-verify reads a box ("Devon", "odd").
        found = _run(parse, "$\\boxed{" + text + "}$")
    return found


def _read(text, parse):
    if _DOLLAR_RE.search(text) or any(anchor in text for anchor in _ANCHORS) or _is_prose(text):
        # Delimited LaTeX, or prose ("The answer is 42"): let math-verify find the math. Prose
        # must not be wrapped in $...$, where "yes" would parse as the product y*e*s. In prose
        # math-verify reads no "\$18" (it does inside $...$): then try without the currency signs.
        found = _run(parse, text)
        if not found and "\\$" in text:
            found = _run(parse, _ESCAPED_DOLLAR_RE.sub(r"\1", text))
        return found
    # A bare expression such as "\sqrt{2}" or "\text{Devon}" is only understood as LaTeX.
    return _run(parse, "$" + text + "$") or _run(parse, text)


def _is_prose(text):
    """A word of 3+ letters outside LaTeX commands and their \\text{...} arguments."""
    return _WORD_RE.search(_COMMAND_RE.sub(" ", _TEXT_ARG_RE.sub(" ", text))) is not None


def main():
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.CRITICAL)
    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parse_gold(text, boxed):
        return tuple(_parse(text, parse, boxed))

    @functools.lru_cache(maxsize=4096)
    def parse_short(text, boxed):
        return tuple(_parse(text, parse, boxed))

    def parse_pred(text, boxed):
        # A short answer may recur: maj@k compares each wrong answer with several others (parsing
        # is two thirds of a comparison's cost). Long ones are not kept: they would fill memory.
        return list(parse_short(text, boxed)) if len(text) <= _MAX_CACHED_PRED else _parse(text, parse, boxed)

    signal.signal(signal.SIGALRM, _on_alarm)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        # soft=False leaves the bound to the parent's hard kill alone (used by tests).
        timeout = float(request["timeout"]) if request.get("soft", True) else 0.0
        for pair in request["pairs"]:
            gold, pred, gold_boxed, pred_boxed = (*pair, False, False)[:4]
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    gold_parsed = parse_gold(gold, bool(gold_boxed))
                    if not gold_parsed:
                        code = "g"
                    else:
                        pred_parsed = parse_pred(pred, bool(pred_boxed))
                        ok = bool(pred_parsed) and verify(list(gold_parsed), pred_parsed, timeout_seconds=None)
                        code = "1" if ok else "0"
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                code = "t"
            except Exception:  # noqa: BLE001 - any failure of one check scores that pair 0
                code = "e"
            out.write(code + "\n")
            out.flush()


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
