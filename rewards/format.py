"""Format rewards: is the answer written where the task asks for it?"""

from __future__ import annotations

import re

from .base import Reward


class Format(Reward):
    """1.0 when the completion matches ``pattern`` (a regular expression, full match, DOTALL).

    The default accepts a completion whose final answer sits in a ``\\boxed{}`` with nothing
    but whitespace or a period after it. For the tiny world's bare answers use ``pattern: "-?\\d+"``.

    >>> Format()(prompts=["q", "q"], completions=["so \\\\boxed{4}.", "4"])
    [1.0, 0.0]
    >>> Format(pattern=r"-?\\d+")(prompts=["q", "q"], completions=["46", "46+1"])
    [1.0, 0.0]
    """

    name = "format"

    def __init__(self, pattern: str = r".*\\boxed\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}\s*\.?\s*"):
        self.pattern = pattern
        self._regex = re.compile(pattern, re.DOTALL)

    def __getstate__(self):
        return {"pattern": self.pattern}

    def __setstate__(self, state):
        self.__init__(**state)

    def score(self, completion: str, **row) -> float:
        return float(self._regex.fullmatch(completion.strip()) is not None)
