"""`code`: share of an item's tests passed by the program in the completion.

The program (last ```python block, else last ``` block, else the <answer> content) runs in
`sandbox.run_python`, never in the trainer process. The `tests` column holds, per row:
* stdin/stdout tests: a list of {"input": str, "output": str} dicts, or an APPS-style dict
  {"inputs": [...], "outputs": [...]}; each test is a separate sandboxed run, passed when it
  exits 0 and its output matches (line endings and trailing whitespace ignored);
* call-based tests (APPS/TACO): {"fn_name": name, "inputs": [[args], ...], "outputs": [...]};
  the function (or a method of a `Solution` class) is called with each argument list and
  passes when its value equals the output, or the output's only element (APPS's rule);
* assert tests: statements such as "assert f(2) == 4", as a list or one string; each top-level
  assert is one test, other statements (imports, helpers) run before the asserts after them.
Either may be given as a JSON string. Rows without tests are flagged invalid.

No verdict is taken from inside the sandbox, where the program could fake it. The calls
into the program in an assert (`f(2)` above: calls of, or references to, names that are not
builtins or standard modules) run in the program's sandbox, which reports their values as
plain data; the trainer then compares them with the rest of the assert, which the sandbox
never sees: itself for `value <op> literal`, `value` and `not value`, otherwise in a second
sandbox that holds no program code. An object whose `__eq__` always says True is not plain
data, so it fails. Known gaps, where a hostile program can fake a test: an assert whose call
depends on names bound in the assert itself (`all(f(i) == i for i in ...)`) or that calls
nothing of the program runs whole in the program's interpreter (a warning names the first);
a call of a helper that is neither a builtin nor in TRUSTED_MODULES (`np.allclose(f(x), y)`,
a function defined by the tests' own statements) runs there with its arguments.
`time_budget` bounds the sandbox time of one completion; tests it leaves undone fail.
"""

from __future__ import annotations

import ast
import builtins
import json
import logging
import operator
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from .base import FlaggedScores, RewardFn
from .extract import extract_code
from .sandbox import NO_VALUE, SandboxLimits, run_python

logger = logging.getLogger(__name__)

IoTests = list[tuple[str, str]]

# Names an assert may use without calling into the program: they mean the same in the
# trainer's verifier sandbox, which imports the modules it needs.
TRUSTED_MODULES = frozenset({
    "bisect", "cmath", "collections", "functools", "heapq", "itertools", "math", "operator", "re",
    "statistics", "string",
})
_TRUSTED_NAMES = frozenset(dir(builtins)) | TRUSTED_MODULES
_VALUE_NAME = "_grpo_value_{}"


@dataclass(frozen=True)
class Check:
    """One test, decided in the trainer from the values the sandbox reported.
    `expression`: the assert's test with each call into the program replaced by the name
    _grpo_value_<k> of its value k (`values` lists those k); None for an APPS call test,
    which passes when value `values[0]` matches `expected`. `test`: as written."""

    test: str
    values: tuple[int, ...]
    expression: str | None = None
    expected: Any = None


@dataclass(frozen=True)
class ProgramTests:
    """Tests that call into the program: `steps` run in its sandbox after it (see
    `sandbox.run_python`), `checks` then decide each test outside it."""

    steps: tuple[dict[str, Any], ...]
    checks: tuple[Check, ...]


_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def parse_tests(tests: Any) -> IoTests | ProgramTests | None:
    """Normalise one row's tests to [(stdin, expected_stdout), ...] or `ProgramTests`; None
    when there are none. Raises ValueError for an unknown layout or an assert that is not
    valid Python."""
    if tests is None:
        return None
    if isinstance(tests, str):
        text = tests.strip()
        if not text:
            return None
        if text[0] in "[{":
            return parse_tests(json.loads(text))
        return _assert_tests([text])
    if isinstance(tests, dict):
        if "inputs" in tests and "outputs" in tests:
            inputs, outputs = tests["inputs"], tests["outputs"]
            if len(inputs) != len(outputs):
                raise ValueError(f"tests have {len(inputs)} inputs but {len(outputs)} outputs")
            if tests.get("fn_name"):
                return _call_tests(str(tests["fn_name"]), inputs, outputs)
            return [(_text(i), _text(o)) for i, o in zip(inputs, outputs, strict=True)] or None
        raise ValueError(f"unsupported tests layout with keys {sorted(tests)[:5]}")
    if isinstance(tests, Sequence):
        if not tests:
            return None
        if all(isinstance(t, str) for t in tests):
            return _assert_tests(tests)
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            return [(_text(t["input"]), _text(t["output"])) for t in tests]
    raise ValueError(f"unsupported tests value of type {type(tests).__name__}")


def _text(value: Any) -> str:
    if isinstance(value, list):  # some datasets store stdin as a list of lines
        return "\n".join(map(str, value))
    return str(value)


def _call_tests(fn_name: str, inputs: Sequence[Any], outputs: Sequence[Any]) -> ProgramTests | None:
    steps, checks = [], []
    for k, (args, expected) in enumerate(zip(inputs, outputs, strict=True)):
        args = list(args) if isinstance(args, (list, tuple)) else [args]
        steps.append({"call": fn_name, "args": args})
        checks.append(Check(f"{fn_name}(*{args!r}) -> {expected!r}", (k,), None, expected))
    return ProgramTests(tuple(steps), tuple(checks)) if checks else None


class _Unsplittable(Exception):
    pass


def _head(node: ast.AST) -> ast.AST:
    """The name an access chain starts from: `f` in f(x), Solution().g(x)[0], obj.attr."""
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _split(test: ast.expr, first: int) -> tuple[ast.expr, list[str]]:
    """(`test` with each call into the program replaced by the name of its value, numbered
    from `first`; those calls' sources). Raises _Unsplittable when a call uses a name bound
    inside `test` (a comprehension's, a lambda's)."""
    bound = {n.id for n in ast.walk(test) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    bound |= {a.arg for n in ast.walk(test) if isinstance(n, ast.Lambda) for a in ast.walk(n.args)
              if isinstance(a, ast.arg)}
    calls: list[str] = []

    class Replace(ast.NodeTransformer):
        def visit(self, node: ast.AST) -> ast.AST:
            head = _head(node) if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript, ast.Name)) else None
            if isinstance(head, ast.Name) and head.id not in _TRUSTED_NAMES and head.id not in bound:
                if any(isinstance(n, ast.Name) and n.id in bound for n in ast.walk(node)):
                    raise _Unsplittable
                calls.append(ast.unparse(node))
                return ast.Name(_VALUE_NAME.format(first + len(calls) - 1), ast.Load())
            return self.generic_visit(node)

    return Replace().visit(test), calls


def _assert_tests(sources: Sequence[str]) -> ProgramTests | None:
    steps: list[dict[str, Any]] = []
    checks: list[Check] = []
    for i, source in enumerate(sources):
        try:
            statements = ast.parse(source).body
        except SyntaxError as exc:
            raise ValueError(f"test {i} is not valid Python: {exc}") from exc
        for statement in statements:
            if not isinstance(statement, ast.Assert):
                steps.append({"exec": ast.unparse(statement)})
                continue
            written, whole = ast.unparse(statement), ast.unparse(statement.test)
            first = sum(1 for step in steps if "exec" not in step)
            try:
                residual, calls = _split(statement.test, first)
            except _Unsplittable:
                calls = []
            if not calls:
                _warn_once("whole", "code reward: tests like %r are checked inside the program's interpreter, "
                           "where a hostile program can fake them (see grpo_cli/rewards/code.py)", written)
                residual, calls = ast.Name(_VALUE_NAME.format(first), ast.Load()), [whole]
            steps += [{"eval": call} for call in calls]
            checks.append(Check(written, tuple(range(first, first + len(calls))), ast.unparse(residual)))
    if not checks:
        if steps:
            _warn_once("no-assert", "code reward: tests without a top-level assert cannot be scored, "
                       "rows like %r are flagged invalid", sources[0][:200])
        return None
    return ProgramTests(tuple(steps), tuple(checks))


# ----------------------------------------------------------------------------- deciding

_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
_UNKNOWN = object()


def _operand(node: ast.expr, env: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name):
        return env.get(node.id, _UNKNOWN)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _UNKNOWN


def _decide_here(check: Check, env: dict[str, Any]) -> bool | None:
    """The check's verdict from plain values, or None when it needs the verifier sandbox."""
    try:
        if check.expression is None:  # APPS: a tuple as a list; [x] also matches x
            (value,), expected = env.values(), check.expected
            value = list(value) if isinstance(value, tuple) else value
            return bool(value == expected or (isinstance(expected, list) and len(expected) == 1 and value == expected[0]))
        node, negate = ast.parse(check.expression, mode="eval").body, False
        while isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            node, negate = node.operand, not negate
        if isinstance(node, ast.Name):
            return bool(env[node.id]) != negate
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _OPS:
            left, right = _operand(node.left, env), _operand(node.comparators[0], env)
            identity = isinstance(node.ops[0], (ast.Is, ast.IsNot))
            singleton = any(x is None or x is True or x is False for x in (left, right))
            if left is _UNKNOWN or right is _UNKNOWN or (identity and not singleton):
                return None
            return bool(_OPS[type(node.ops[0])](left, right)) != negate
    except Exception:  # noqa: BLE001 - comparing what the program returned raised: failed
        return False
    return None


def _verify(checks: Sequence[Check], values: Sequence[Any], limits: SandboxLimits) -> list[bool]:
    """Evaluate `checks` in a sandbox holding no program code, only its plain values."""
    modules = sorted({n.id for c in checks for n in ast.walk(ast.parse(c.expression))
                      if isinstance(n, ast.Name) and n.id in TRUSTED_MODULES})
    bindings = {_VALUE_NAME.format(k): values[k] for c in checks for k in c.values}
    result = run_python("".join(f"import {m}\n" for m in modules), limits=limits, bindings=bindings,
                        steps=[{"eval": f"bool({c.expression})"} for c in checks])
    return [value is True for value in result.values]


def _score_calls(source: str, tests: ProgramTests, limits: SandboxLimits, deadline: float) -> float:
    result = run_python(source, steps=tests.steps, limits=_within(limits, deadline))
    passed = [False] * len(tests.checks)
    undecided = []
    for i, check in enumerate(tests.checks):
        env = {_VALUE_NAME.format(k): result.values[k] for k in check.values}
        if any(value is NO_VALUE for value in env.values()):
            continue
        verdict = _decide_here(check, env)
        if verdict is None:
            undecided.append(i)
        else:
            passed[i] = verdict
    if undecided and deadline > time.monotonic():
        verdicts = _verify([tests.checks[i] for i in undecided], result.values, _within(limits, deadline))
        for i, ok in zip(undecided, verdicts, strict=True):
            passed[i] = ok
    return sum(passed) / len(passed)


def _within(limits: SandboxLimits, deadline: float) -> SandboxLimits:
    """`limits` with the time limit cut to what is left before `deadline`."""
    return replace(limits, timeout=max(min(limits.timeout, deadline - time.monotonic()), 0.001))


def _normalise_output(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    return "\n".join(line.rstrip() for line in lines)


def score_program(source: str, tests: IoTests | ProgramTests, limits: SandboxLimits,
                  time_budget: float) -> float:
    """Share of `tests` the program `source` passes, spending at most `time_budget` seconds
    of sandbox time on them (the tests not run by then fail)."""
    deadline = time.monotonic() + time_budget
    if isinstance(tests, ProgramTests):
        return _score_calls(source, tests, limits, deadline)
    passed = 0
    for stdin, expected in tests:
        if time.monotonic() >= deadline:
            break
        result = run_python(source, stdin=stdin, limits=_within(limits, deadline))
        if result.timed_out:
            # A program that hangs on one input usually hangs on the rest: stop here so an
            # infinite loop costs one time limit, not one per test.
            break
        if result.returncode == 0 and _normalise_output(result.stdout) == _normalise_output(expected):
            passed += 1
    return passed / len(tests)


def code(timeout: float = 5.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
         max_processes: int = 16, workers: int = 2, time_budget: float | None = None) -> RewardFn:
    """Share of tests passed. `timeout`: wall seconds per sandboxed run; `memory_mb`: address
    space limit; `max_output_bytes`: cap on stdout / written files; `max_processes`:
    RLIMIT_NPROC; `workers`: completions run concurrently; `time_budget`: wall seconds of
    sandbox time per completion, over all its tests (default: twice `timeout`)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number, got {timeout!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    limits = SandboxLimits(timeout=float(timeout), memory_mb=memory_mb,
                           max_output_bytes=max_output_bytes, max_processes=max_processes)
    budget = 2 * limits.timeout if time_budget is None else time_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < float("inf"):
        raise ValueError(f"time_budget must be a positive finite number of seconds, got {time_budget!r}")

    def code_reward(completions: list[str], tests: Sequence[Any], **_: Any) -> list[float]:
        if len(tests) != len(completions):
            raise ValueError(f"'tests' has {len(tests)} entries for {len(completions)} completions")
        parsed = [parse_tests(t) for t in tests]
        jobs = {}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code-reward") as pool:
            for i, (text, row_tests) in enumerate(zip(completions, parsed, strict=True)):
                source = extract_code(text)
                if row_tests and source:
                    jobs[i] = pool.submit(score_program, source, row_tests, limits, float(budget))
            scores = [jobs[i].result() if i in jobs else 0.0 for i in range(len(completions))]
        return FlaggedScores(scores, [not t for t in parsed])

    return code_reward
