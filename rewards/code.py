"""Code rewards and graders: run a completion's program against its row's tests in a sandbox.

* :class:`CodeAccuracy` (``code_accuracy``): the fraction of the row's tests the program passes
  (``mode: fraction``) or 1.0 only when it passes all of them (``mode: all_pass``). The program is the
  last fenced ```` ```python ```` block of the completion, else the whole completion; the tests are
  the row's ``tests`` column (see :func:`rewards.sandbox.parse_tests`: stdin/stdout pairs or
  assert-style checks, as a list or its JSON).
* :func:`output_prediction_correct`: CRUXEval-O grading, the predicted output of ``f(input)`` against
  the gold output: equal as Python literals, or, when the gold is not a literal, ``assert gold == pred``
  executed after the function's code in the sandbox.

>>> extract_program("Here:\\n```python\\nprint(1)\\n```\\nand better:\\n```python\\nprint(2)\\n```")
'print(2)\\n'
>>> extract_output_prediction("[ANSWER]assert f([1, 2]) == [2, 1][/ANSWER]")
'[2, 1]'
>>> correct = output_prediction_correct
>>> correct("[2,1]", "[2, 1]"), correct("'a'", '"a"'), correct("3", "4")
(True, True, False)
"""

from __future__ import annotations

import ast
import importlib
import logging
import re
from collections.abc import Sequence
from typing import Any

from .base import Reward, completion_text
from .sandbox import LocalSandbox, Sandbox, Test, parse_tests

logger = logging.getLogger("intrinsic")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_program(text: str) -> str:
    """The last fenced code block (```` ```python ````, ```` ```py ```` or a bare fence; an unclosed
    last fence runs to the end), else the whole completion."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def extract_output_prediction(text: str) -> str:
    """The predicted output in a CRUXEval-O completion: the last line before ``[/ANSWER]`` and after the
    last ``[ANSWER]`` (else of the last code block, else of the text); of ``assert f(...) == X`` the ``X``.

    >>> extract_output_prediction("assert f(17) == 17\\n[/ANSWER]\\n\\n[PYTHON]")   # after a prompt ending in [ANSWER]
    '17'
    """
    if "[ANSWER]" in text or "[/ANSWER]" in text:  # the prompt may end in "[ANSWER]" (CRUXEval's direct prompt)
        body = text.rsplit("[ANSWER]", 1)[-1].split("[/ANSWER]", 1)[0]
    else:
        body = (_FENCE.findall(text) or [text])[-1]
    lines = [line for line in body.strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if last.startswith("assert ") and "==" in last:
        last = last.split("==", 1)[1].strip()
    return last


def _literal(text: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def output_prediction_correct(prediction: str, gold: str, code: str | None = None,
                              sandbox: Sandbox | None = None, function: str = "f") -> bool:
    """Whether a predicted output equals the gold output of ``f(input)``: as Python literals when both
    parse (``ast.literal_eval``: ``[2,1]`` equals ``[2, 1]``, ``'a'`` equals ``"a"``); when the gold is
    no literal (``set()``, ``float('inf')``), by running ``assert gold == prediction`` after ``code``
    in ``sandbox``, unless the prediction calls ``function`` (which would make the check trivial)."""
    if not prediction:
        return False
    gold_ok, gold_value = _literal(gold)
    pred_ok, pred_value = _literal(prediction)
    if gold_ok:
        return pred_ok and bool(gold_value == pred_value)  # == as CRUXEval's `assert gold == pred`: 1 == 1.0
    if code is None or sandbox is None or re.search(rf"\b{re.escape(function)}\s*\(", prediction):
        return False
    return sandbox.run(code, [Test(check=f"assert ({gold}) == ({prediction})")])[0].passed


def build_sandbox(sandbox: str | None = None, **kwargs: Any) -> Sandbox:
    """A :class:`~rewards.sandbox.LocalSandbox` (``sandbox=None``), or the :class:`Sandbox` subclass at
    dotted path ``sandbox`` (a user's remote one), built with ``kwargs``."""
    if sandbox is None:
        return LocalSandbox(**kwargs)
    module, _, attr = sandbox.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import sandbox {sandbox!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, Sandbox)):
        raise ValueError(f"sandbox {sandbox!r} is not a dotted path to a Sandbox subclass")
    return cls(**kwargs)


def program_scores(completions: Sequence[str], tests: Sequence[Any], sandbox: Sandbox, mode: str = "fraction"
                   ) -> list[float | None]:
    """Per completion: the fraction of its row's tests its program passes (``fraction``) or whether it
    passes all (``all_pass``); ``None`` for a row without usable tests (logged)."""
    if mode not in ("fraction", "all_pass"):
        raise ValueError(f"mode must be 'fraction' or 'all_pass', got {mode!r}")
    parsed: list[list[Test] | None] = []
    for i, cell in enumerate(tests):
        try:
            parsed.append(parse_tests(cell) if cell is not None else None)
        except ValueError as err:
            logger.warning("code: row %d: unusable tests (%s); scored None", i, err)
            parsed.append(None)
        if parsed[-1] == []:
            logger.warning("code: row %d has no tests; scored None", i)
            parsed[-1] = None
    runnable = [i for i, t in enumerate(parsed) if t is not None]
    results = sandbox.run_many([(extract_program(completions[i]), parsed[i]) for i in runnable])
    scores: list[float | None] = [None] * len(completions)
    for i, rs in zip(runnable, results):
        passed = sum(r.passed for r in rs)
        scores[i] = passed / len(rs) if mode == "fraction" else float(passed == len(rs))
    return scores


class CodeAccuracy(Reward):
    """Share of the row's tests the completion's program passes (``mode: fraction``), or 1.0 when it
    passes every one (``mode: all_pass``). Programs run in a sandbox (``sandbox``: dotted path to a
    :class:`~rewards.sandbox.Sandbox` subclass, default the local subprocess one), built from
    ``timeout`` (wall seconds per test), ``memory_mb``, ``workers`` and ``sandbox_kwargs``.

    >>> reward = CodeAccuracy(timeout=5)
    >>> tests = '[{"input": "2\\\\n", "output": "4\\\\n"}, {"input": "3\\\\n", "output": "6\\\\n"}]'
    >>> reward(prompts=["double", "double"], completions=["```python\\nprint(2 * int(input()))\\n```",
    ...                                                   "print(4)"], tests=[tests, tests])
    [1.0, 0.5]
    """

    name = "code_accuracy"

    def __init__(self, mode: str = "fraction", tests_column: str = "tests", timeout: float = 6.0,
                 memory_mb: int = 1024, workers: int = 4, sandbox: str | None = None,
                 sandbox_kwargs: dict | None = None):
        if mode not in ("fraction", "all_pass"):
            raise ValueError(f"mode must be 'fraction' or 'all_pass', got {mode!r}")
        self.mode, self.tests_column = mode, tests_column
        self.sandbox = sandbox
        self.sandbox_kwargs = dict(sandbox_kwargs or {})
        if sandbox is None:
            defaults = {"timeout": timeout, "memory_mb": memory_mb, "workers": workers}
            self.sandbox_kwargs = {**defaults, **self.sandbox_kwargs}
        self._box = build_sandbox(self.sandbox, **self.sandbox_kwargs)  # fails now on bad arguments

    def __getstate__(self):  # picklable: the sandbox is rebuilt where the reward lands
        return {k: v for k, v in self.__dict__.items() if k != "_box"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._box = build_sandbox(self.sandbox, **self.sandbox_kwargs)

    def __repr__(self) -> str:
        return f"CodeAccuracy(mode={self.mode!r}, tests_column={self.tests_column!r}, sandbox={self.sandbox!r})"

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float | None]:
        if self.tests_column not in columns:
            raise KeyError(f"code_accuracy needs a {self.tests_column!r} column in the dataset "
                           f"(columns: {sorted(columns)})")
        texts = [completion_text(c) for c in completions]
        return program_scores(texts, columns[self.tests_column], self._box, self.mode)


GRADERS = ("code", "output_prediction")


def grade_rows(texts: Sequence[str], rows: Sequence[dict], grader: str, sandbox: Sandbox) -> list[bool]:
    """Whether each completion is right for its row (``rows[i]``): ``code`` — its program passes every
    test in the row's ``tests``; ``output_prediction`` — its predicted output equals the row's ``output``
    for the row's ``code`` (CRUXEval-O; the ``question`` when ``code`` was mapped to it)."""
    if grader == "code":
        return [s == 1.0 for s in program_scores(texts, [r["tests"] for r in rows], sandbox, "all_pass")]
    if grader == "output_prediction":
        return [output_prediction_correct(extract_output_prediction(t), str(r["output"]),
                                          r.get("code", r.get("question")), sandbox)
                for t, r in zip(texts, rows)]
    raise ValueError(f"unknown code grader {grader!r} (one of {GRADERS})")
