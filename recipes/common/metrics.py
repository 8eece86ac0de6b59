"""Scores of an evaluation: accuracy, pass@k, votes, and how well a signal separates right from wrong.

Pure functions over completions, gold answers and per-sample signal values (no model):
:func:`correctness` grades through :mod:`rewards.grading`; :func:`vote_accuracy` /
:func:`choice_vote_accuracy` are self-consistency over final answers / option letters;
:func:`separation` (Mann-Whitney AUROC, rank-biserial effect) and :func:`reliability` (accuracy per
signal quantile) describe a signal's calibration; :func:`clue_column` and :func:`selected_accuracy`
score CLUE and a verifier's pick.
"""

from __future__ import annotations

import math

import torch

from rewards import plurality
from rewards.grading import answers_match_many, clusters, final_answers, grade


def mann_whitney_auc(positive: list[float], negative: list[float]) -> float:
    """P(a random ``positive`` value exceeds a random ``negative`` one), ties counting 1/2 (U / n1 n2).

    >>> mann_whitney_auc([3.0, 2.0], [1.0, 2.0])      # (1 + 1 + 1 + 0.5) / 4
    0.875
    """
    if not positive or not negative:
        return float("nan")
    pos, neg = torch.tensor(positive, dtype=torch.float64), torch.tensor(negative, dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater) / (len(positive) * len(negative))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are right: ``1 - C(n-c, k) / C(n, k)``.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def correctness(completions: list[str], answers: list[str]) -> list[bool]:
    """Per completion, whether its final answer equals its gold answer (:func:`rewards.grading.grade`;
    a gold label that does not parse counts as wrong, and is logged)."""
    return [r == 1.0 for r in grade(list(completions), list(answers))]


def accuracy(completions: list[str], answers: list[str]) -> float:
    return sum(correctness(completions, answers)) / max(len(completions), 1)


def vote_accuracy(completions: list[str], answers: list[str], num_samples: int,
                  weights: list[float | None] | None = None) -> float:
    """Self-consistency: fraction of questions whose plurality answer over its ``num_samples``
    consecutive samples is right (answers vote together when math-verify calls them equal; the
    winning cluster's first answer is graded); with ``weights`` each sample's vote weighs that much (SC+IC;
    ``None`` weight = no vote).

    >>> vote_accuracy(["4", "5", "5", "7"], ["4", "7"], 2)    # ties go to the first sample: 4 (right), 5 (wrong)
    0.5
    >>> vote_accuracy(["4", "5", "5"], ["4"], 3), vote_accuracy(["4", "5", "5"], ["4"], 3, [0.9, 0.2, 0.3])
    (0.0, 1.0)
    """
    extracted = final_answers(list(completions))
    weights = [1.0] * len(extracted) if weights is None else [0.0 if w is None else w for w in weights]
    winners: list[str | None] = []
    for q in range(len(answers)):
        rows = list(range(q * num_samples, (q + 1) * num_samples))
        labels = clusters([extracted[i] for i in rows])
        label = plurality([labels[j] if weights[i] > 0 else None for j, i in enumerate(rows)],
                          [weights[i] for i in rows])
        winners.append(None if label is None else extracted[rows[labels.index(label)]])
    return sum(answers_match_many(winners, list(answers))) / max(len(answers), 1)


def clue_column(deltas: list[torch.Tensor], correct: list[bool], num_samples: int) -> list[float | None]:
    """CLUE's score of each sample, its centroids fit on the gold labels of the *other half* of the
    prompts (2-fold cross-fitting over prompts: the first ``ceil(Q/2)`` prompts are scored with the
    centroids of the rest and vice versa; :func:`rewards.clue.leave_group_out_scores` with the two
    halves as groups and no earlier traces). A prompt's ``num_samples`` consecutive samples stay in
    one half. ``None``: not scorable (no finite delta, or a class missing from the other half).

    Not leave-one-prompt-out: removing a prompt's own samples from the centroids shifts them away from
    that prompt in proportion to its own labels, which biases a pooled AUROC below 0.5 when there is
    no signal; with two halves the centroids that score a sample never depend on its half's labels.
    """
    from rewards.clue import leave_group_out_scores

    if not deltas:
        return []
    stacked = torch.stack([d.double() for d in deltas])
    finite = stacked.flatten(1).isfinite().all(-1).tolist()
    labels = [int(ok) if f else None for ok, f in zip(correct, finite)]
    prompts = -(-len(deltas) // num_samples)
    cut = min(-(-prompts // 2) * num_samples, len(deltas))
    groups = [list(range(cut)), list(range(cut, len(deltas)))]
    scores = leave_group_out_scores(None, torch.zeros(2, dtype=torch.float64), stacked.nan_to_num(), labels, groups)
    return [float(v) if f and math.isfinite(v) else None for v, f in zip(scores.tolist(), finite)]


def selected_accuracy(scores: list[float | None], correct: list[bool], num_samples: int) -> float:
    """Fraction of prompts whose best-scored sample (first on ties) is right; a prompt with no score counts wrong.

    >>> selected_accuracy([0.1, 0.9, None, 0.2], [False, True, True, False], 2)
    0.5
    """
    right = 0
    for q in range(0, len(scores), num_samples):
        rows = [i for i in range(q, min(q + num_samples, len(scores))) if scores[i] is not None]
        right += bool(rows) and correct[max(rows, key=lambda i: (scores[i], -i))]
    return right / max(-(-len(scores) // num_samples), 1)


def separation(values: list[float | None], correct: list[bool], prefix: str) -> dict:
    """Mean of a signal over correct and incorrect answers, its Mann-Whitney AUC (correct > incorrect)
    and rank-biserial effect size ``2 AUC - 1`` (answers without a value are left out)."""
    right = [v for v, ok in zip(values, correct) if ok and v is not None]
    wrong = [v for v, ok in zip(values, correct) if not ok and v is not None]
    auc = mann_whitney_auc(right, wrong)
    return {f"{prefix}_correct": sum(right) / len(right) if right else float("nan"),
            f"{prefix}_incorrect": sum(wrong) / len(wrong) if wrong else float("nan"),
            f"{prefix}_auc": auc, f"{prefix}_effect": 2 * auc - 1}


def reliability(values: list[float | None], correct: list[bool], bins: int = 5, hist_bins: int = 20) -> dict:
    """Accuracy per signal quantile bin (a reliability table) and a histogram of the signal for right and
    wrong answers (what ``recipes.plot`` draws).

    >>> table = reliability([0.1, 0.2, 0.3, 0.9], [False, False, True, True], bins=2)["reliability"]
    >>> [(row["count"], row["accuracy"]) for row in table]
    [(2, 0.0), (2, 1.0)]
    """
    pairs = sorted((v, ok) for v, ok in zip(values, correct) if v is not None and math.isfinite(v))
    rows = []
    for b in range(bins):
        chunk = pairs[b * len(pairs) // bins : (b + 1) * len(pairs) // bins]
        if chunk:
            rows.append({"low": chunk[0][0], "high": chunk[-1][0], "count": len(chunk),
                         "mean": sum(v for v, _ in chunk) / len(chunk),
                         "accuracy": sum(ok for _, ok in chunk) / len(chunk)})
    out: dict = {"reliability": rows}
    if pairs:
        low, high = pairs[0][0], pairs[-1][0]
        width = (high - low) / hist_bins or 1.0
        counts = {True: [0] * hist_bins, False: [0] * hist_bins}
        for v, ok in pairs:
            counts[ok][min(int((v - low) / width), hist_bins - 1)] += 1
        out["histogram"] = {"edges": [low + i * width for i in range(hist_bins + 1)], "correct": counts[True],
                            "incorrect": counts[False]}
    return out


def choice_vote_accuracy(texts: list[str], gold: list[str], num_samples: int, letters: str = "ABCD") -> float:
    """Self-consistency for multiple choice: fraction of questions whose plurality letter over their
    ``num_samples`` consecutive samples is the gold one (ties to the letter chosen first; samples
    without a choice do not vote).

    >>> choice_vote_accuracy(["Answer: C", "(B)", "Answer: C", "A good try"], ["C", "A"], 2)  # C-B tie: C; C != A
    0.5
    """
    from rewards.choice import extract_choice

    chosen = [extract_choice(t, letters) for t in texts]
    right = 0
    for q, g in enumerate(gold):
        label = plurality(chosen[q * num_samples : (q + 1) * num_samples])
        right += label is not None and label == g
    return right / max(len(gold), 1)
