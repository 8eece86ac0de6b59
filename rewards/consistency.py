"""Internal consistency (Xie et al.): do the model's intermediate layers agree with its answer?

The RLIF trainer (and the evaluator) read the policy through a logit lens at the positions that
predict the final-answer tokens (``trainers.lens``) and hand every completion these signals:

``ic_hard`` / ``ic_soft`` / ``ic_candidates`` / ``ic_calibrated`` / ``ic_calibrated_choices``
    ``(answer tokens, K)`` per-layer agreement (see ``trainers.lens`` for the modes; the
    calibrated ones are NaN at answer tokens outside their label set),
``ic_layers``
    the ``K`` layers of those columns (1-based ``hidden_states`` indices, the last layer included),
``ic_answer_found``
    ``False`` when no answer parsed and the last completion tokens were read instead.

:class:`InternalConsistency` reduces them to ``IC = mean_t sum_l w_l a_{t,l} / sum_l w_l``;
:class:`ConsistencyVote` is the label-free variant: 1 when the completion's answer is the
IC-weighted plurality answer of its group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import completion_text
from .grading import final_answers
from .group import answer_clusters, group_rows, log_vote, plurality, voted_answer
from .internal import InternalReward

LENS_SIGNALS = ("ic_hard", "ic_soft", "ic_candidates", "ic_calibrated", "ic_calibrated_choices")
"""Per-layer agreement signals of the logit lens (``ic_<mode>``)."""


def default_layers(num_layers: int) -> list[int]:
    """The upper half of the decoder layers, ``ceil(L/2) .. L`` (1-based ``hidden_states`` indices).

    Early layers of tied-embedding models mostly echo the input token, so they are left out.

    >>> default_layers(4), default_layers(3), default_layers(1)
    ([2, 3, 4], [2, 3], [1])
    """
    return list(range((num_layers + 1) // 2, num_layers + 1)) if num_layers > 1 else [1]


class InternalConsistency(InternalReward):
    """Agreement of the chosen layers' logit-lens predictions with the answer, in [0, 1].

    Args:
        mode: ``hard`` (argmax equals the final layer's), ``soft`` (probability of the emitted
            token), ``candidates`` (calibrated vote among the group's distinct answers; a unanimous
            group scores 1 by construction), or the paper's fixed-label calibration,
            ``calibrated`` (labels: the digits and ``-``) / ``calibrated_choices`` (``A``-``E``);
            answer tokens outside the label set are not scored (all outside: ``None``).
        layers: 1-based decoder layers; ``None`` = the upper half (last layer included).
        layer_weights: one weight per layer (``None`` = equal).
        require_answer: score only completions whose answer parsed (others are skipped, ``None``);
            by default the trainer's fallback positions (last completion tokens) are scored.

    >>> import torch
    >>> signals = {"ic_hard": torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), "ic_layers": [2, 3, 4],
    ...            "ic_answer_found": True}
    >>> [round(r, 4) for r in InternalConsistency()(["p"], ["c"], token_signals=[signals])]  # (2/3 + 1) / 2
    [0.8333]
    >>> InternalConsistency(layers=[2, 3], layer_weights=[3, 1]).reduce(signals)  # (3/4 + 1) / 2
    0.875
    """

    name = "internal_consistency"

    def __init__(self, mode: str = "hard", layers: Sequence[int] | None = None,
                 layer_weights: Sequence[float] | None = None, require_answer: bool = False):
        if f"ic_{mode}" not in LENS_SIGNALS:
            raise ValueError(f"{self.name}: mode must be one of {[s[3:] for s in LENS_SIGNALS]}, got {mode!r}")
        if layers is not None and not layers:
            raise ValueError(f"{self.name}: layers must be a non-empty list (or null for the upper half)")
        if layer_weights is not None:
            if layers is None or len(layer_weights) != len(layers):
                raise ValueError(f"{self.name}: layer_weights needs explicit layers, one weight per layer")
            if any(w < 0 for w in layer_weights) or not sum(layer_weights) > 0:
                raise ValueError(f"{self.name}: layer_weights must be >= 0 with a positive sum")
        self.mode, self.require_answer = mode, require_answer
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.signals = (f"ic_{mode}", "ic_layers", "ic_answer_found")

    def reduce(self, signals) -> float | None:
        if self.require_answer and not signals["ic_answer_found"]:
            return None
        values, available = signals[f"ic_{self.mode}"], list(signals["ic_layers"])
        layers = self.layers or default_layers(max(available))
        missing = [layer for layer in layers if layer not in available]
        if missing:
            raise ValueError(f"{self.name}: layers {missing} were not read by the logit lens (read: {available})")
        weights = torch.tensor(self.layer_weights or [1.0] * len(layers), dtype=torch.float64)
        columns = values[:, [available.index(layer) for layer in layers]].double()
        columns = columns[~columns.isnan().any(-1)]  # calibrated modes: tokens outside the label set
        if columns.shape[0] == 0:
            return None
        return float(((columns * weights).sum(-1) / weights.sum()).mean())


class ConsistencyVote(InternalConsistency):
    """Label-free: 1.0 when the completion's answer is its group's IC-weighted plurality answer.

    Each completion votes for its answer's cluster (answers math-verify calls equal) with weight ``IC`` (the paper's SC+IC); a
    completion without an answer, or without a finite IC, does not vote and gets 0.0. Takes the
    arguments of :class:`InternalConsistency`.

    >>> import torch
    >>> ic = lambda v: {"ic_hard": torch.tensor([[v]]), "ic_layers": [1], "ic_answer_found": True}
    >>> ConsistencyVote()(["q"] * 3, ["7", "7", "8"], token_signals=[ic(0.2), ic(0.2), ic(0.9)])
    [0.0, 0.0, 1.0]
    """

    name = "consistency_vote"
    needs_whole_group = True

    def __call__(self, prompts: list, completions: list, token_signals: list[dict] | None = None, **columns):
        weights = super().__call__(prompts, completions, token_signals=token_signals, **columns)
        answers = final_answers([completion_text(c) for c in completions])
        labels = answer_clusters(prompts, answers)
        rewards = [0.0] * len(completions)
        voted: list[str | None] = [None] * len(completions)
        for rows in group_rows(prompts):
            votes = [labels[i] if weights[i] is not None and math.isfinite(weights[i]) else None for i in rows]
            label = plurality(votes, [weights[i] or 0.0 for i in rows])
            for i in rows:
                rewards[i] = float(label is not None and labels[i] == label)
                voted[i] = voted_answer(rows, labels, answers, label)
        if callable(columns.get("log_extra")):  # the IC each vote weighed, beside the answers (TRL's table)
            columns["log_extra"](f"{self.name}/ic", list(weights))
        log_vote(self.name, columns, answers, voted)
        return rewards
