"""Group rewards: a completion's worth judged against the other completions of its prompt.

TRL hands a reward the whole local batch, ordered so that the ``G`` completions of a prompt are
consecutive (``num_generations`` of them; ``per_device_train_batch_size * steps_per_generation``
is a multiple of ``G``). Groups are recognised by identical prompts in consecutive rows, so a
batch holding several prompts (or the same prompt twice in a row, which simply forms a larger
group) is handled without knowing ``G``.
"""

from __future__ import annotations

from collections import Counter
from itertools import groupby

from .answers import extract_answer, normalize_answer
from .base import Reward, completion_text


def group_rows(prompts: list) -> list[list[int]]:
    """Row indices of each group: runs of identical consecutive prompts.

    >>> group_rows(["a", "a", "b", "a"])
    [[0, 1], [2], [3]]
    """
    rows = range(len(prompts))
    return [list(g) for _, g in groupby(rows, key=lambda i: repr(prompts[i]))]


def plurality(answers: list[str | None], weights: list[float] | None = None) -> str | None:
    """The answer with the most votes (each answer's vote weighs ``weights[i]``, default 1); ties
    go to the answer seen first; ``None`` never wins.

    >>> plurality(["3", None, None, "4", "4", "3"]), plurality([None, None])
    ('3', None)
    >>> plurality(["3", "4", "4"], weights=[0.9, 0.3, 0.4])
    '3'
    """
    counts: Counter = Counter()
    for i, answer in enumerate(answers):
        if answer is not None:
            counts[answer] += 1.0 if weights is None else weights[i]
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


class MajorityVote(Reward):
    """TTRL: 1.0 when the completion's answer equals its group's plurality answer, else 0.0.

    Answers are normalised before voting (``46`` and ``46.0`` vote together). An unparseable
    answer gets 0.0 and never wins; a group with no parseable answer gets 0.0 throughout.

    >>> MajorityVote()(prompts=["q"] * 4, completions=["7", "7.0", "8", "no idea"])
    [1.0, 1.0, 0.0, 0.0]
    """

    name = "majority_vote"
    needs_whole_group = True

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        answers = [extract_answer(completion_text(c)) for c in completions]
        answers = [None if a is None else normalize_answer(a) for a in answers]
        rewards = [0.0] * len(completions)
        for rows in group_rows(prompts):
            label = plurality([answers[i] for i in rows])
            for i in rows:
                rewards[i] = float(label is not None and answers[i] == label)
        return rewards
