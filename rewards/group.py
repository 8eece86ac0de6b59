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

from .base import Reward, completion_text
from .grading import clusters, final_answers


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


def answer_clusters(prompts: list, answers: list[str | None]) -> list[int | None]:
    """Cluster id of every answer within its group (:func:`group_rows`): answers math-verify calls
    equal share an id (:func:`rewards.grading.clusters`); ``None`` for an unparseable answer.

    >>> answer_clusters(["a", "a", "a", "b", "b"], ["\\\\frac12", "0.5", None, "0.5", "3"])
    [0, 0, None, 0, 1]
    """
    labels: list[int | None] = [None] * len(answers)
    for rows in group_rows(prompts):
        for i, label in zip(rows, clusters([answers[i] for i in rows])):
            labels[i] = label
    return labels


class MajorityVote(Reward):
    """TTRL: 1.0 when the completion's answer is in its group's plurality cluster, else 0.0.

    Answers vote together when math-verify calls them equal (``46``, ``46.0`` and ``\\frac{92}{2}``
    are one vote); the plurality label is a cluster (ties: the cluster seen first). An
    unparseable answer gets 0.0 and never wins; a group with no parseable answer gets 0.0 throughout.

    >>> MajorityVote()(prompts=["q"] * 4, completions=["7", "7.0", "8", "no idea"])
    [1.0, 1.0, 0.0, 0.0]
    >>> MajorityVote()(prompts=["q"] * 6, completions=["\\\\frac12", "0.5", "1/2", "\\\\dfrac{1}{2}", "3", "3"])
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    """

    name = "majority_vote"
    needs_whole_group = True

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        answers = final_answers([completion_text(c) for c in completions])
        labels = answer_clusters(prompts, answers)
        rewards = [0.0] * len(completions)
        voted: list[str | None] = [None] * len(completions)
        for rows in group_rows(prompts):
            label = plurality([labels[i] for i in rows])
            for i in rows:
                rewards[i] = float(label is not None and labels[i] == label)
                voted[i] = voted_answer(rows, labels, answers, label)
        log_vote(self.name, columns, answers, voted)
        return rewards


def voted_answer(rows: list[int], labels: list, answers: list, label) -> str | None:
    """The winning cluster's first answer among ``rows`` (``None`` when nothing won)."""
    return None if label is None else next(answers[i] for i in rows if labels[i] == label)


def log_vote(name: str, columns: dict, answers: list, voted: list) -> None:
    """Columns ``<name>/answer`` (each completion's parsed answer) and ``<name>/voted_answer`` (its group's
    winner) of TRL's completion table, through the ``log_extra`` callable TRL passes to rewards (when it does).

    >>> table = {}
    >>> log_vote("majority_vote", {"log_extra": table.__setitem__}, ["7", "8"], ["7", "7"])
    >>> table
    {'majority_vote/answer': ['7', '8'], 'majority_vote/voted_answer': ['7', '7']}
    """
    log = columns.get("log_extra")
    if callable(log):
        log(f"{name}/answer", list(answers))
        log(f"{name}/voted_answer", list(voted))


class SemanticCluster(Reward):
    """EMPO (Zhang et al. 2025): ``r = size(cluster of y) / G``, the share of its group that gives
    the same answer (clusters: answers math-verify calls equal, within the group of ``G``).

    As in the authors' math reward: an unparseable answer gets 0 and counts in ``G`` as a
    cluster of its own, and with ``zero_when_all_distinct`` (their entropy threshold: semantic
    entropy ``>= log G`` happens exactly when every answer is a cluster of its own) such a
    group gets 0 throughout.

    >>> SemanticCluster()(prompts=["q"] * 4, completions=["\\\\frac12", "0.5", "3", "no idea"])
    [0.5, 0.5, 0.25, 0.0]
    >>> SemanticCluster()(prompts=["q"] * 2, completions=["1", "2"]), SemanticCluster(False)(["q"] * 2, ["1", "2"])
    ([0.0, 0.0], [0.5, 0.5])
    """

    name = "semantic_cluster"

    def __init__(self, zero_when_all_distinct: bool = True):
        self.zero_when_all_distinct = bool(zero_when_all_distinct)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        labels = answer_clusters(prompts, final_answers([completion_text(c) for c in completions]))
        rewards = [0.0] * len(completions)
        for rows in group_rows(prompts):
            sizes = Counter(labels[i] for i in rows if labels[i] is not None)
            if self.zero_when_all_distinct and all(n == 1 for n in sizes.values()):
                continue  # every answer alone (unparseable ones are alone too): maximal entropy
            for i in rows:
                rewards[i] = 0.0 if labels[i] is None else sizes[labels[i]] / len(rows)
        return rewards
