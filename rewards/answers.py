"""Where the final answer sits in a completion: the character span the logit lens reads.

Grading (is an answer right, which answers vote together) is :mod:`rewards.grading`'s job
(math-verify). This module keeps the project's own span finder, which the logit lens needs for
token positions: the answer is the content of the last ``\\boxed{...}`` when the text has one, otherwise the last
number in the text, and :func:`find_answer` returns its character span.

>>> find_answer("so 12+34 = \\\\boxed{46}.")
Answer(text='46', start=18, end=20)
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_UNIT = re.compile(r"^(-?[\d,]*\.?\d+)(?:[a-zA-Z]{2,}\.?)+(?:\^\{?\d\}?)?$")  # a number, then a unit word


class Answer(NamedTuple):
    text: str
    start: int
    end: int


def closing_brace(text: str, opening: int) -> int | None:
    """Index of the ``}`` that closes the ``{`` at ``opening``, ``None`` if the group never closes.

    >>> closing_brace("a{b{c}}d", 1), closing_brace("{a", 0)
    (6, None)
    """
    depth = 0
    for j in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def _last_boxed(text: str) -> Answer | None:
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    end = closing_brace(text, opening)
    if end is None:  # unbalanced: the box never closed
        return None
    return Answer(text[opening + 1 : end].strip(), opening + 1, end)


def find_answer(text: str) -> Answer | None:
    """The final answer of a completion and its character span, or ``None`` if none parses."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed if boxed.text else None
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None
    m = numbers[-1]
    return Answer(m.group(0), m.start(), m.end())


def extract_answer(text: str) -> str | None:
    """The final answer of a completion as a string, or ``None`` if none parses."""
    found = find_answer(text)
    return None if found is None else found.text


def normalize_answer(answer: str) -> str:
    """Canonical string form: numbers as reduced fractions/integers, LaTeX noise removed.

    Not used for grading any more (:mod:`rewards.grading` compares answers with math-verify).
    """
    s = answer.replace("\\$", "").strip().strip("$").strip()
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,!;:]|\\left|\\right|\s+", "", s).rstrip(".")
    s = s.replace("\\%", "").replace("%", "").replace("^\\circ", "").replace("^{\\circ}", "")
    unit = _UNIT.match(s)  # "12cm", "5\\text{ apples}" (already unwrapped), "3m^2": the number
    if unit:
        s = unit.group(1)
    frac = _FRAC.match(s)
    if frac:
        s = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    num = s.replace(",", "") if re.fullmatch(r"-?[\d,]*\.?\d+(?:/-?\d+)?", s) else None
    if num is not None:
        try:
            value = Fraction(num)
        except (ValueError, ZeroDivisionError):
            return s
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return s


def boxed_content(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}`` (or ``\\fbox{}``) of ``text``, ``None`` if none.

    >>> boxed_content("so \\\\boxed{\\\\frac{1}{2}}"), boxed_content("\\\\boxed{3")
    ('\\\\frac{1}{2}', None)
    """
    boxed = _last_boxed(text)
    return None if boxed is None or not boxed.text else boxed.text

