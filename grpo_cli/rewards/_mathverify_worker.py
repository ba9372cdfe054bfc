"""math-verify worker process, run as a script by `mathcheck.MathChecker` (never imported).

Protocol (JSON lines): prints "ready" once math-verify is imported, then for every request
line {"timeout": seconds, "soft": bool, "pairs": [[gold, pred], ...]} prints one line per pair, in order and
as soon as it is known: "1" equal, "0" not equal, "g" gold answer unparseable, "t" soft
timeout, "e" error. Streaming per pair lets the parent hold an exact per-check deadline and,
if this process gets stuck in C code (huge integer powers ignore signals), kill it knowing
which pair was responsible. Exits on EOF.
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
_WORD_RE = re.compile(r"[A-Za-z]{3,}")


class _SoftTimeout(BaseException):
    """BaseException so math-verify's and sympy's `except Exception` blocks don't swallow it."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def _parse(text, parse):
    text = text.strip()
    if not text:
        return []
    # No signal-based timeout inside math-verify: we bound time ourselves (setitimer here,
    # a hard kill in the parent).
    def run(s):
        return parse(s, fallback_mode="no_fallback", parsing_timeout=None)

    if _DOLLAR_RE.search(text) or any(anchor in text for anchor in _ANCHORS) or _WORD_RE.search(_COMMAND_RE.sub(" ", text)):
        # Delimited LaTeX, or prose ("The answer is 42"): let math-verify find the math. Prose
        # must not be wrapped in $...$, where "yes" would parse as the product y*e*s. In prose
        # math-verify reads no "\$18" (it does inside $...$): then try without the currency signs.
        found = run(text)
        if not found and "\\$" in text:
            found = run(_ESCAPED_DOLLAR_RE.sub(r"\1", text))
        return found
    # A bare expression such as "\sqrt{2}" or "\{1,2\}" is only understood as LaTeX.
    return run("$" + text + "$") or run(text)


def main():
    memory_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if memory_mb > 0:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.CRITICAL)
    from math_verify import parse, verify

    @functools.lru_cache(maxsize=4096)
    def parse_gold(text):
        return tuple(_parse(text, parse))

    signal.signal(signal.SIGALRM, _on_alarm)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        # soft=False leaves the bound to the parent's hard kill alone (used by tests).
        timeout = float(request["timeout"]) if request.get("soft", True) else 0.0
        for gold, pred in request["pairs"]:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    gold_parsed = parse_gold(gold)
                    if not gold_parsed:
                        code = "g"
                    else:
                        pred_parsed = _parse(pred, parse)
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
