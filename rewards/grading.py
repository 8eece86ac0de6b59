"""Answer grading through math-verify: the one module every reward, the evaluator and the verifier use.

Three kinds of string meet here:

* a **completion** (a model's full text): :func:`final_answer` extracts its final answer with
  math-verify (a ``\\boxed{}`` first, as TRL's ``accuracy_reward`` does, then "final answer"
  anchors, then the last LaTeX or plain expression; a completion that is a bare LaTeX answer
  such as ``3\\sqrt{2}``, see :func:`bare_latex`, is read whole) and returns the extracted LaTeX
  string, or ``None`` when nothing parses;
* an **answer** (a LaTeX answer string, e.g. what :func:`final_answer` returned): parsed by
  math-verify as the content of a ``\\boxed{}``;
* a **gold label**: :func:`gold_answer` reads the answer inside it (the last ``\\boxed{}`` of a full
  solution, what follows GSM8K's last ``####``, else the whole string is a LaTeX answer).

Two answers are equal when math-verify's ``verify`` says so (numbers, fractions, radicals,
sets, intervals, equations ``x=5`` against ``5``, ``\\text{(B)}`` against ``B``...). An answer
math-verify cannot parse never matches and never wins a vote; a parse or a comparison that
runs past :data:`TIMEOUT_S` counts as a failure (``0``, never a ``1``), is logged and counted
in :data:`SKIPPED`.

Timeouts: math-verify's own timeouts call ``signal.alarm``, which raises off the main thread.
Here math-verify runs with its timeouts off, inside this module's own guard: on the main
thread (TRL's reward call; every rank of ``accelerate launch`` is its own process with its own
main thread) an interval timer (``signal.setitimer``, the previous timer is restored); on any
other thread every public function hands its whole call to one worker process (a ``python -c``
child started on first use), where it runs on that process's main thread under the same guard;
a worker that does not answer within its deadline is killed and the call scores as failed.

Parses are cached by string (:func:`functools.lru_cache`), so a vote parses each distinct
answer of a group once and a gold label is parsed once per run.

>>> final_answer("so the answer is \\\\boxed{\\\\dfrac{1}{2}}."), final_answer("no idea")
('\\\\frac{1}{2}', None)
>>> answers_match("\\\\frac12", "0.5"), answers_match("x=5", "5"), answers_match("2x", "2")
(True, True, False)
>>> clusters(["\\\\frac12", "0.5", None, "3", "1/2"])
[0, 0, None, 1, 0]

Size: one owner of "is this answer right" -- extraction, parsing, comparison, the timeout worker
and the parse cache -- so that no caller grades differently.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import pickle
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .answers import boxed_content

logger = logging.getLogger(__name__)

TIMEOUT_S = 5.0
"""Seconds one parse or one comparison may take (math-verify's own default is 5)."""

CACHE_SIZE = 1 << 16
"""Distinct strings whose parse is kept."""

SKIPPED: Counter = Counter()
"""Counts of what was skipped in this process: ``timeout``, ``error`` (math-verify raised),
``unparsed_gold``, ``worker`` (the worker process gave no answer)."""


class GradingTimeout(BaseException):
    """A parse or comparison ran past :data:`TIMEOUT_S` (a ``BaseException`` so math-verify's
    ``except Exception`` does not swallow it)."""


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def _quiet_math_verify():
    """math-verify warns once that its timeouts are off: this module supplies the guard."""
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True


@functools.lru_cache(maxsize=None)
def _ready() -> bool:
    """Import math-verify and build its parsers once, outside any time limit (on a busy machine the
    first parse, which loads sympy and the LaTeX grammar, can take longer than :data:`TIMEOUT_S`)."""
    from math_verify import parse, verify

    _quiet_math_verify()
    verify(parse("$\\frac{1}{2}$", _configs(), parsing_timeout=None), parse("$0.5$", _configs(), parsing_timeout=None),
           timeout_seconds=None)
    return True


def _raise_timeout(signum, frame):
    raise GradingTimeout()


def _guarded(fn, *args, default=None, what: str = ""):
    """``fn(*args)`` under a wall-clock limit of :data:`TIMEOUT_S` (main thread only); ``default``
    on a timeout or any error (logged)."""
    _ready()
    old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    start = _clock()
    try:
        return fn(*args)
    except GradingTimeout:
        SKIPPED["timeout"] += 1
        logger.warning("grading: %s ran past %.1fs; scored as unparsed / not equal", what or fn.__name__, TIMEOUT_S)
        return default
    except Exception as err:  # noqa: BLE001 - a grader error must never crash a training step
        SKIPPED["error"] += 1
        logger.warning("grading: %s failed (%s: %s); scored as unparsed / not equal", what or fn.__name__,
                       type(err).__name__, err)
        return default
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay > 0:  # give an outer timer (e.g. pytest-timeout) back what it had left
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (_clock() - start), 1e-3), old_interval)


def _clock() -> float:
    return time.monotonic()


def _parse(text: str):
    """math-verify's parse of ``text``: the parsed object and its LaTeX string, or ``None``."""
    from math_verify import parse

    _quiet_math_verify()
    out = parse(text, _configs(), fallback_mode="first_match", extraction_mode="first_match", parsing_timeout=None)
    if len(out) == 2 and not isinstance(out[0], str):  # [parsed, extracted string]; [string] = parse failed
        return out[0], str(out[1])
    return None


_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}|\\[A-Za-z]+")
_DELIMITED = ("$", "\\boxed", "\\fbox", "\\[", "\\(")


def bare_latex(text: str) -> bool:
    """Whether a completion is a bare LaTeX answer: it has a LaTeX command, no math delimiters and
    no words (math-verify's extraction needs ``$...$``, ``\\boxed{}`` or an anchor for LaTeX).

    >>> bare_latex("\\\\frac12"), bare_latex("3\\\\sqrt{2}."), bare_latex("so x = \\\\frac12"), bare_latex("46")
    (True, True, False, False)
    """
    return ("\\" in text and not any(d in text for d in _DELIMITED)
            and re.search(r"[A-Za-z]{2,}", _COMMAND.sub(" ", text)) is None)


_INTEGER = re.compile(r"-?\d{1,15}")
_known_answers: dict[str, object] = {}  # extracted answer string -> its parse, filled by completion parses


def _integer(text: str):
    """A plain integer (up to 15 digits) as math-verify would parse it, without its LaTeX parser."""
    import sympy

    return sympy.Integer(int(text))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_completion(text: str):
    stripped = text.strip()
    if _INTEGER.fullmatch(stripped):
        found = _integer(stripped), str(int(stripped))
    elif bare_latex(text):
        found = _guarded(_parse, "\\boxed{" + stripped.rstrip(".") + "}", what="parsing a completion")
        if found is None:
            found = _guarded(_parse, text, what="parsing a completion")
    else:
        found = _guarded(_parse, text, what="parsing a completion")
    if found is not None:  # the extracted string will be graded or voted on next: keep its parse
        if len(_known_answers) >= CACHE_SIZE:
            _known_answers.clear()
        _known_answers[found[1]] = found[0]
    return found


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_answer(answer: str):
    answer = answer.strip()
    if not answer:
        return None
    if _INTEGER.fullmatch(answer):
        return _integer(answer)
    found = _guarded(_parse, "\\boxed{" + answer + "}", what="parsing an answer")
    return None if found is None else found[0]


def _answer(answer: str):
    """The parse of an answer string (from a completion already parsed, else :func:`_parse_answer`)."""
    known = _known_answers.get(answer)
    return known if known is not None else _parse_answer(answer)


def clear_caches() -> None:
    """Forget every cached parse (benchmarks, tests)."""
    for cached in (_parse_completion, _parse_answer, _parse_gold):
        cached.cache_clear()
    _known_answers.clear()


def _verify(gold, target) -> bool:
    from math_verify import verify

    _quiet_math_verify()
    return bool(verify(gold, target, timeout_seconds=None))


def _equal(a, b) -> bool:
    """Whether two parsed answers are equal (``a`` plays math-verify's gold)."""
    import sympy

    try:
        if a == b:  # structurally identical: no need for sympy's comparisons
            return True
        if isinstance(a, sympy.Rational) and isinstance(b, sympy.Rational):  # integers and fractions: math-verify
            return False  # compares two of them exactly (only a float is rounded), and these are not equal
    except Exception:  # noqa: BLE001
        pass
    return bool(_guarded(_verify, a, b, default=False, what="comparing answers"))


def _equivalent(a, b) -> bool:
    """Symmetric equality for votes: math-verify's ``verify`` is not symmetric when one side is a
    relation (``x=5`` against ``5``), so then both directions are tried."""
    from sympy.core.relational import Relational

    if _equal(a, b):
        return True
    return (isinstance(a, Relational) or isinstance(b, Relational)) and _equal(b, a)


# ---------------------------------------------------------------- main thread, or the worker process

_worker: subprocess.Popen | None = None
_worker_lock = threading.Lock()


def _run_in_worker(name: str, args: tuple, budget: float):
    """``name(*args)`` in the worker process (started on first use), ``None`` if it gives no answer in ``budget`` s.

    The worker is a plain ``python -c`` child speaking length-prefixed pickles over its stdin and
    stdout, so, unlike multiprocessing's ``spawn``, it never re-imports the caller's ``__main__``.
    """
    global _worker
    with _worker_lock:
        try:
            if _worker is None or _worker.poll() is not None:
                root = str(Path(__file__).resolve().parent.parent)
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
                _worker = subprocess.Popen([sys.executable, "-c", "from rewards.grading import _serve; _serve()"],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            _send(_worker.stdin, (name, args))
            ok, value = _receive(_worker.stdout.fileno(), time.monotonic() + budget)
            if ok:
                return value
            logger.warning("grading: the grading worker failed on %s (%s); scoring it as failed", name, value)
        except (OSError, EOFError, TimeoutError, pickle.PickleError) as err:
            logger.warning("grading: the grading worker gave no answer to %s within %.0fs (%s: %s); restarting it",
                           name, budget, type(err).__name__, err)
            _kill_worker()
        SKIPPED["worker"] += 1
        return None


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _read_exactly(fd: int, n: int, deadline: float) -> bytes:
    chunks, left = [], n
    while left:
        wait = None if deadline == float("inf") else max(deadline - time.monotonic(), 0.0)
        if not select.select([fd], [], [], wait)[0]:
            raise TimeoutError("no answer")
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("the grading worker exited")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int, deadline: float):
    size = int.from_bytes(_read_exactly(fd, 8, deadline), "little")
    return pickle.loads(_read_exactly(fd, size, deadline))


def _serve() -> None:
    """The worker's loop: read ``(name, args)``, answer ``(True, result)`` or ``(False, error)``."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, not into the answers
    fd = sys.stdin.fileno()
    while True:
        try:
            name, args = _receive(fd, float("inf"))
        except EOFError:
            return
        try:
            answer = (True, globals()[name](*args))
        except Exception as err:  # noqa: BLE001
            answer = (False, f"{type(err).__name__}: {err}")
        _send(out, answer)


def _kill_worker():
    global _worker
    if _worker is not None and _worker.poll() is None:
        _worker.kill()
        _worker.wait()
    _worker = None


atexit.register(_kill_worker)


def _anywhere(size, failed):
    """Run the decorated function here on the main thread, else in the worker process.

    ``size(*args)`` is the number of parse/compare operations the call may need (its deadline
    in the worker is ``TIMEOUT_S`` per operation, plus a start-up allowance); ``failed(*args)``
    is what the call returns when the worker gives no answer.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            if threading.current_thread() is threading.main_thread():
                return fn(*args)
            out = _run_in_worker(fn.__name__, args, budget=60.0 + TIMEOUT_S * max(size(*args), 1))
            return failed(*args) if out is None else out

        return wrapper

    return decorate


# ---------------------------------------------------------------------------------- public functions


def gold_answer(gold: str) -> str | None:
    """The answer inside a gold label: a full solution's last ``\\boxed{}``, GSM8K's ``#### x``,
    else the string itself (a LaTeX answer).

    >>> gold_answer("She pays 3 * 24 = <<3*24=72>>72 dollars.\\n#### 72"), gold_answer("so \\\\boxed{\\\\frac{1}{2}}")
    ('72', '\\\\frac{1}{2}')
    """
    gold = str(gold)
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip() or None
    if "\\boxed" in gold or "\\fbox" in gold:
        return boxed_content(gold)
    return gold.strip() or None


@functools.lru_cache(maxsize=CACHE_SIZE)
def _parse_gold(gold: str):
    answer = gold_answer(gold)
    parsed = None if answer is None else _parse_answer(answer)
    if parsed is None:
        SKIPPED["unparsed_gold"] += 1
        logger.warning("grading: gold label %r does not parse; its rows are skipped", gold[:200])
    return parsed


@_anywhere(size=lambda texts: len(texts), failed=lambda texts: [None] * len(texts))
def final_answers(texts: Sequence[str]) -> list[str | None]:
    """:func:`final_answer` of every text."""
    out = []
    for text in texts:
        found = _parse_completion(str(text))
        out.append(None if found is None else found[1])
    return out


def final_answer(text: str) -> str | None:
    """The final answer of a completion as math-verify extracts it (LaTeX string), ``None`` if nothing parses."""
    return final_answers([text])[0]


@_anywhere(size=lambda predicted, gold: 3 * len(predicted), failed=lambda predicted, gold: [False] * len(predicted))
def answers_match_many(predicted: Sequence[str | None], gold: Sequence[str | None]) -> list[bool]:
    """:func:`answers_match` of every pair."""
    if len(predicted) != len(gold):
        raise ValueError(f"answers_match_many: {len(predicted)} answers but {len(gold)} gold labels")
    out = []
    for p, g in zip(predicted, gold):
        gold_parsed = None if g is None else _parse_gold(str(g))
        pred_parsed = None if p is None else _answer(str(p))
        out.append(gold_parsed is not None and pred_parsed is not None and _equal(gold_parsed, pred_parsed))
    return out


def answers_match(predicted: str | None, gold: str | None) -> bool:
    """Whether an answer string equals the answer of a gold label (math-verify, gold first).

    >>> answers_match("46.0", "46"), answers_match("1,000", "1000"), answers_match("\\\\frac{1}{2}", "0.5")
    (True, True, True)
    """
    return answers_match_many([predicted], [gold])[0]


@_anywhere(size=lambda texts, gold: 3 * len(texts), failed=lambda texts, gold: [0.0] * len(texts))
def grade(texts: Sequence[str], gold: Sequence[str]) -> list[float | None]:
    """Per completion, 1.0 when its final answer equals its gold label, 0.0 when not, ``None``
    when the gold label is missing or does not parse (a skip, logged once per label).

    >>> grade(["so \\\\boxed{\\\\frac12}", "0.5", "\\\\boxed{3}", "no idea"], ["\\\\boxed{0.5}", "#### 1/2", "3", "3"])
    [1.0, 1.0, 1.0, 0.0]
    """
    if len(texts) != len(gold):
        raise ValueError(f"grade: {len(texts)} completions but {len(gold)} gold labels")
    out: list[float | None] = []
    for text, g in zip(texts, gold):
        gold_parsed = None if g is None else _parse_gold(str(g))
        if gold_parsed is None:
            out.append(None)
            continue
        found = _parse_completion(str(text))
        out.append(float(found is not None and _equal(gold_parsed, found[0])))
    return out


@_anywhere(size=lambda answers: len(answers) ** 2, failed=lambda answers: [None] * len(answers))
def clusters(answers: Sequence[str | None]) -> list[int | None]:
    """Cluster id of each answer string: answers math-verify calls equal share an id.

    Greedy in order: an answer joins the first cluster whose first member it equals (either
    direction of ``verify``), else opens a new one; ids count clusters in order of appearance.
    ``None`` (and anything that does not parse) gets ``None``: it joins no cluster.

    >>> clusters(["\\\\frac12", "0.5", "1/2", "\\\\dfrac{1}{2}", "3", "3.0", "?", None])
    [0, 0, 0, 0, 1, 1, None, None]
    """
    heads: list = []
    out: list[int | None] = []
    for answer in answers:
        parsed = None if answer is None else _answer(str(answer))
        if parsed is None:
            out.append(None)
            continue
        for k, head in enumerate(heads):
            if _equivalent(head, parsed):
                out.append(k)
                break
        else:
            heads.append(parsed)
            out.append(len(heads) - 1)
    return out


def cluster_shares(labels: Sequence[int | None]) -> list[float]:
    """``size(cluster of y) / G`` for every member of one group (``None``: 0).

    >>> cluster_shares([0, 0, None, 1])
    [0.5, 0.5, 0.0, 0.25]
    """
    counts = Counter(label for label in labels if label is not None)
    n = len(labels)
    return [0.0 if label is None else counts[label] / n for label in labels]
