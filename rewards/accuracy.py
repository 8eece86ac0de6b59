"""Verifiable rewards: the completion's final answer against the gold ``answer`` column."""

from __future__ import annotations

from .base import Reward, completion_text
from .grading import grade


class MathAccuracy(Reward):
    """1.0 when the completion's final answer equals the gold answer (math-verify, :mod:`rewards.grading`).

    0.0 for a wrong or unparseable answer; ``None`` (a skip, logged) when the gold label itself
    does not parse.

    >>> MathAccuracy()(prompts=["2+2="] * 3, completions=["4", "\\\\boxed{5}", "$\\\\frac{8}{2}$"], answer=["4"] * 3)
    [1.0, 0.0, 1.0]
    """

    name = "math_accuracy"

    def __call__(self, prompts: list, completions: list, answer: list | None = None, **columns) -> list[float | None]:
        if answer is None:
            raise KeyError("math_accuracy needs an 'answer' column in the dataset")
        return grade([completion_text(c) for c in completions], [None if a is None else str(a) for a in answer])
