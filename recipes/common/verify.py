"""Self-verification for self-improvement: score a model's own samples, keep or weight them, measure the gap.

A round of self-improvement samples ``N`` completions per prompt; consecutive identical prompts
form a group (as for every group reward). Pieces, each a small function:

* (the signals internal rewards read come from :func:`trainers.signals.token_signal_dicts`);
* :class:`Verifier` -- a weighted sum of reward objects (``rewards``): ``score = sum_k w_k r_k``;
* :func:`select` -- filter (``top_k`` per group, ``threshold``, ``plurality``) or ``reweight``;
* :func:`ds_weights` / :func:`ds_filter` -- IWSI's distribution-shift screen against a valid set;
* :func:`nile_filter` -- NILE's internal-consistency filtering of an existing instruction set;
* :func:`gap_metrics` -- plain vs verifier-selected accuracy (the generation-verification gap),
  kept fraction and the verifier's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rewards import InternalReward, group_rows, plurality
from rewards.grading import answers_match_many, clusters
from rewards.group import answer_clusters
from trainers.signals import signal_needs

MODES = ("top_k", "threshold", "plurality", "reweight")


class Verifier:
    """``score(y) = sum_k w_k r_k(y)`` over reward objects (text rewards and internal rewards alike).

    A completion whose weighted reward is ``None``/NaN for any reward with ``w_k != 0`` gets ``None``
    (it can be neither selected nor kept). :attr:`signals`, :attr:`lens_modes` and
    :attr:`lens_layers` say what :func:`trainers.signals.token_signal_dicts` must compute for the internal ones.

    >>> from rewards import MajorityVote
    >>> Verifier([MajorityVote()], [2.0]).score(["q"] * 3, ["7", "7", "8"])
    [2.0, 2.0, 0.0]
    """

    def __init__(self, rewards: Sequence, weights: Sequence[float]):
        if not rewards or len(rewards) != len(weights):
            raise ValueError("verifier: give one weight per reward, at least one reward")
        self.rewards, self.weights = list(rewards), [float(w) for w in weights]
        internal = [r for r in self.rewards if isinstance(r, InternalReward)]
        needs = signal_needs(self.rewards)
        self.signals = needs.signals + ("hidden_delta",) * needs.delta
        self.lens_modes = needs.lens_modes
        self.delta_layers = needs.delta_layers
        """Layers CLUE's hidden-state delta is read at (``None``: all), for ``token_signal_dicts(delta_layers=...)``."""
        self.reads_gold = any(getattr(r, "labels", None) == "gold" for r in internal if "hidden_delta" in r.signals)
        """A CLUE reward labels its centroids with the gold answers: :meth:`score` needs the ``answer`` column."""

    def lens_layers(self, model) -> list[int] | None:
        """Union of the layers the consistency rewards read (their default: the upper half)."""
        return signal_needs(self.rewards, model).lens_layers

    @property
    def internal(self) -> bool:
        return bool(self.signals or self.lens_modes)

    def state_dict(self) -> dict:
        """State of the rewards that keep one (CLUE's centroids), by position: saved with each round."""
        return {i: r.state_dict() for i, r in enumerate(self.rewards) if hasattr(r, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for i, reward_state in state.items():
            self.rewards[int(i)].load_state_dict(reward_state)

    def score(self, prompts: list, completions: list[str], token_signals: list[dict] | None = None,
              **columns) -> list[float | None]:
        totals: list[float | None] = [0.0] * len(completions)
        for reward, weight in zip(self.rewards, self.weights):
            if weight == 0:
                continue
            extra = {"token_signals": token_signals} if isinstance(reward, InternalReward) else {}
            values = reward(prompts=prompts, completions=completions, **columns, **extra)
            for i, value in enumerate(values):
                bad = value is None or not math.isfinite(value) or totals[i] is None
                totals[i] = None if bad else totals[i] + weight * value
        return totals


def select(scores: Sequence[float | None], prompts: Sequence, answers: Sequence[str | None], mode: str, *,
           top_k: int = 1, threshold: float = 0.0, min_share: float = 0.0, require_answer: bool = True) -> list[float]:
    """Per completion, its training weight: 0 (dropped) or 1 (kept) when filtering, ``>= 0`` when reweighting.

    Groups are runs of identical consecutive ``prompts``. Completions with no score (``None``), and
    with ``require_answer`` those whose answer does not parse, always get 0. Modes:

    * ``top_k``: the ``top_k`` best-scored completions of each group (ties: the earlier one);
    * ``threshold``: every completion scoring ``>= threshold``;
    * ``plurality``: completions whose answer is in the group's plurality cluster (answers that
      math-verify calls equal, :mod:`rewards.grading`), each vote
      weighing its score (use a ``majority_vote`` verifier for the plain vote), in groups where
      at least ``min_share`` of the scorable completions give that answer (a confidence filter);
    * ``reweight``: ``w = max(score, 0)`` scaled so kept weights average 1 over the group's
      scorable completions (a group whose weights are all 0 keeps nothing).

    >>> select([0.9, 0.2, 0.5, 0.7], ["a", "a", "b", "b"], ["1", "2", "3", "3"], "top_k")
    [1.0, 0.0, 0.0, 1.0]
    >>> select([1.0, 1.0, 0.0], ["a"] * 3, ["4", "4", "5"], "plurality")
    [1.0, 1.0, 0.0]
    >>> select([3.0, 1.0, None], ["a"] * 3, ["4", "5", "6"], "reweight")
    [1.5, 0.5, 0.0]
    """
    if mode not in MODES:
        raise ValueError(f"selection mode must be one of {MODES}, got {mode!r}")
    if not len(scores) == len(prompts) == len(answers):
        raise ValueError("select: scores, prompts and answers must have one entry per completion")
    ok = [s is not None and math.isfinite(s) and (not require_answer or a is not None) for s, a in zip(scores, answers)]
    keys = answer_clusters(list(prompts), list(answers)) if mode == "plurality" else [None] * len(answers)
    weights = [0.0] * len(scores)
    for rows in group_rows(list(prompts)):
        rows = [i for i in rows if ok[i]]
        if not rows:
            continue
        if mode == "top_k":
            for i in sorted(rows, key=lambda i: -scores[i])[:top_k]:  # sorted is stable: ties keep their order
                weights[i] = 1.0
        elif mode == "threshold":
            for i in rows:
                weights[i] = float(scores[i] >= threshold)
        elif mode == "plurality":
            votes = [max(scores[i], 0.0) for i in rows]
            label = plurality([keys[i] for i in rows], votes)
            share = sum(keys[i] == label for i in rows) / len(rows)
            for i in rows:
                weights[i] = float(label is not None and keys[i] == label and share >= min_share)
        else:
            raw = [max(scores[i], 0.0) for i in rows]
            total = sum(raw)
            for i, w in zip(rows, raw):
                weights[i] = w * len(rows) / total if total > 0 else 0.0
    return weights


def verifier_picks(scores: Sequence[float | None], prompts: Sequence) -> list[int | None]:
    """Per group, the row of its best-scored completion (ties: the earlier one; ``None`` if none scored)."""
    picks = []
    for rows in group_rows(list(prompts)):
        scored = [i for i in rows if scores[i] is not None and math.isfinite(scores[i])]
        picks.append(max(scored, key=lambda i: (scores[i], -i)) if scored else None)
    return picks


def gap_metrics(scores: Sequence[float | None], prompts: Sequence, answers: Sequence[str | None],
                gold: Sequence[str | None], kept: Sequence[float]) -> dict[str, float]:
    """Mind-the-Gap numbers of one round (``gold`` is used only here, never for selection).

    * ``sample_accuracy``: fraction of all samples whose answer is right (plain generation);
    * ``selected_accuracy``: fraction of groups whose best-scored sample is right (no pick = wrong);
    * ``gap`` = ``selected_accuracy - sample_accuracy`` (the generation-verification gap);
    * ``relative_gap`` = ``gap / (1 - sample_accuracy)``: the gap as a share of what plain sampling
      gets wrong, the quantity Mind the Gap's scaling result uses (NaN when every sample is right);
    * ``kept_fraction``: fraction of samples with a positive weight;
    * ``precision``: fraction of kept samples that are right (NaN when nothing is kept).

    >>> m = gap_metrics([0.9, 0.1, 0.2, 0.8], ["a", "a", "b", "b"], ["4", "5", "6", "7"], ["4", "4", "7", "7"],
    ...                 [1, 0, 0, 1])
    >>> m["sample_accuracy"], m["selected_accuracy"], m["gap"], m["relative_gap"], m["kept_fraction"], m["precision"]
    (0.5, 1.0, 0.5, 1.0, 0.5, 1.0)
    """
    correct = answers_match_many(list(answers), list(gold))
    picks = verifier_picks(scores, prompts)
    sample = sum(correct) / max(len(correct), 1)
    selected = sum(correct[i] for i in picks if i is not None) / max(len(picks), 1)
    kept_rows = [i for i, w in enumerate(kept) if w > 0]
    return {"sample_accuracy": sample, "selected_accuracy": selected, "gap": selected - sample,
            "relative_gap": (selected - sample) / (1.0 - sample) if sample < 1.0 else float("nan"),
            "kept_fraction": len(kept_rows) / max(len(kept), 1),
            "precision": sum(correct[i] for i in kept_rows) / len(kept_rows) if kept_rows else float("nan")}


def ds_weights(sample_nll: Sequence[float], valid_nll: Sequence[float]) -> list[float]:
    """DS weight (IWSI's distribution-shift estimate) of each sample against a small valid set.

    With ``l_i`` a sample's mean per-token NLL under the current model and ``l_v`` the mean of the
    same over the valid set's reference completions, ``r_i = l_i / l_v`` stands in for the
    importance ratio between the model's samples and the valid distribution, and

        ``DS_i = max(r_i, 1 / r_i) = exp(|log l_i - log l_v|)  >= 1``

    (1: the model finds the sample as surprising as the valid data; large: it is far more or far
    less surprising, either way shifted). Non-finite or non-positive NLLs get ``inf``.

    >>> [round(w, 3) for w in ds_weights([1.0, 2.0, 0.25], [1.0, 1.0])]
    [1.0, 2.0, 4.0]
    """
    if not valid_nll:
        raise ValueError("ds_weights: the valid set is empty")
    ref = sum(valid_nll) / len(valid_nll)
    if not (math.isfinite(ref) and ref > 0):
        raise ValueError(f"ds_weights: mean valid NLL must be finite and positive, got {ref}")
    return [math.exp(abs(math.log(x / ref))) if math.isfinite(x) and x > 0 else math.inf for x in sample_nll]


def ds_filter(weights: Sequence[float], ds: Sequence[float], keep_fraction: float) -> list[float]:
    """Keep the ``keep_fraction`` of currently kept samples (``weights > 0``) with the lowest DS weight.

    IWSI keeps the lowest-DS share of the self-consistency-filtered samples; the others get 0.

    >>> ds_filter([1, 1, 0, 1], [1.1, 9.0, 1.0, 1.5], keep_fraction=0.6)  # ceil(0.6 * 3) = 2 of the 3 kept
    [1, 0.0, 0, 1]
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"ds keep_fraction must be in (0, 1], got {keep_fraction}")
    kept = [i for i, w in enumerate(weights) if w > 0]
    n = math.ceil(round(keep_fraction * len(kept), 9))
    survivors = set(sorted(kept, key=lambda i: (ds[i], i))[:n])
    return [w if i in survivors or w <= 0 else 0.0 for i, w in enumerate(weights)]


def nile_filter(reference: Sequence[str | None], model_answers: Sequence[str | None], prompts: Sequence,
                require_plurality: bool = True) -> list[bool]:
    """NILE's internal-consistency filtering: keep an instruction pair when its answer agrees with the model's.

    ``reference[q]`` is the answer of the dataset's ``q``-th pair; ``model_answers`` the model's own
    samples, grouped by ``prompts`` (one group per pair, in order). A pair is kept when its answer
    equals (math-verify) the model's plurality answer (``require_plurality``; the first answer of
    the plurality cluster) or any of its samples' answers.

    >>> nile_filter(["4", "9"], ["4", "4", "5", "8", "9", "8"], ["a", "a", "a", "b", "b", "b"])
    [True, False]
    """
    groups = group_rows(list(prompts))
    if len(groups) != len(reference):
        raise ValueError(f"nile_filter: {len(reference)} pairs but {len(groups)} groups of samples")
    queries: list[tuple[int, str, str]] = []  # (pair, model answer, reference)
    for q, (ref, rows) in enumerate(zip(reference, groups)):
        if ref is None:
            continue
        own = [model_answers[i] for i in rows]
        if require_plurality:
            labels = clusters(own)
            label = plurality(labels)
            own = [] if label is None else [own[labels.index(label)]]
        queries += [(q, a, ref) for a in own if a is not None]
    out = [False] * len(reference)
    for (q, _, _), same in zip(queries, answers_match_many([a for _, a, _ in queries], [r for _, _, r in queries])):
        out[q] = out[q] or same
    return out
