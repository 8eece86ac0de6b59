"""Verifiable rewards: the completion's final answer against the gold ``answer`` column."""

from __future__ import annotations

from .answers import answers_match, extract_answer
from .base import Reward


class MathAccuracy(Reward):
    """1.0 when the final answer (last ``\\boxed{}``, else last number) equals the gold answer.

    >>> MathAccuracy()(prompts=["2+2="], completions=["4", "\\\\boxed{5}"], answer=["4", "4"])
    [1.0, 0.0]
    """

    name = "math_accuracy"

    def score(self, completion: str, answer: str | None = None, **row) -> float | None:
        if answer is None:
            raise KeyError("math_accuracy needs an 'answer' column in the dataset")
        return float(answers_match(extract_answer(completion), answer))
