"""CLUE (Liang et al. 2025, arXiv:2510.01591): verification by nearest centroid of hidden-state deltas.

Each trace is summarised by its *hidden-state delta* over the reasoning, one row per layer
(read by ``trainers.clue`` in the one no-grad pass; signal ``hidden_delta``, ``(K, H)``)::

    dh = h(end of reasoning) - h(start of reasoning)          in R^{K x H}

and judged by its layer-averaged Euclidean distance to the centroid of past *successful* traces
and to that of past *failed* ones (no trainable parameter):

    d(dh, c) = (1/K) sum_k || dh_k - c_k ||_2
    score    = d(dh, c_fail) - d(dh, c_success)          (> 0: nearer to success; the paper's
                                                          classifier is 1[score > 0])

Centroids are running means per class (:class:`Centroids`): with sums ``S_c`` and counts ``n_c``,
a batch of labelled deltas updates ``S_c <- g S_c + sum_{i: y_i = c} dh_i``,
``n_c <- g n_c + #{i: y_i = c}`` and ``c_c = S_c / n_c`` (``g = decay``; ``g = 1`` is the plain
mean of every trace seen so far, ``g < 1`` forgets old traces geometrically, for a drifting policy).

:class:`Clue` (reward / verifier ``clue``) scores each group of a batch (the completions of one
prompt) *leaving that group out*: with the centroids the update would give from the earlier
batches and the batch's *other* groups (:func:`leave_group_out_scores`), then adds the whole
batch. No trace is ever scored by a centroid holding its own label, or its group's (whose
pseudo-labels depend on it). Labels are the group's majority vote (pseudo-labels: in the plurality
answer cluster = success, as TTRL's reward) or, with ``labels: gold``, correctness against the
``answer`` column. The evaluator's held-out column is the same function with no earlier batches:
leave-one-prompt-out over the evaluation set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from .base import completion_text
from .grading import final_answers, grade
from .group import answer_clusters, group_rows, plurality
from .internal import InternalReward

logger = logging.getLogger("intrinsic")

__all__ = ["Centroids", "Clue", "clue_score", "layer_distance", "leave_group_out_scores", "update_centroids",
           "vote_labels"]


def layer_distance(deltas: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """Layer-averaged Euclidean distance ``d(dh, c) = (1/K) sum_k ||dh_k - c_k||_2``.

    ``deltas`` ``(..., K, H)``, ``centroid`` ``(K, H)``; returns ``(...)`` in float64.

    >>> dh = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])           # one trace, K = 2 layers, H = 2
    >>> layer_distance(dh, torch.zeros(2, 2)).tolist()          # (5 + 0) / 2
    [2.5]
    """
    return (deltas.double() - centroid.double()).norm(dim=-1).mean(-1)


def clue_score(deltas: torch.Tensor, success: torch.Tensor, failure: torch.Tensor) -> torch.Tensor:
    """``d(dh, c_fail) - d(dh, c_success)`` (:func:`layer_distance`): positive when nearer to success.

    >>> s, f = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    >>> clue_score(torch.tensor([[[0.5, 0.0]], [[-2.0, 0.0]]]), s, f).tolist()   # (1.5 - 0.5), (1 - 3)
    [1.0, -2.0]
    """
    return layer_distance(deltas, failure) - layer_distance(deltas, success)


def update_centroids(sums: torch.Tensor, counts: torch.Tensor, deltas: torch.Tensor, labels: Sequence[int | None],
                     decay: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The online rule: ``S_c <- decay * S_c + sum_{i: y_i = c} dh_i``, ``n_c <- decay * n_c + #{i: y_i = c}``.

    ``sums`` ``(2, K, H)`` and ``counts`` ``(2,)`` (class 0 = failure, 1 = success), ``deltas``
    ``(N, K, H)``, ``labels`` one of ``0``, ``1``, ``None`` (not used) per trace. Returns new
    tensors (float64); the centroid of class ``c`` is ``S_c / n_c``.

    >>> sums, counts = torch.zeros(2, 1, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> sums, counts = update_centroids(sums, counts, torch.tensor([[[2.0]], [[4.0]], [[9.0]]]), [1, 1, None])
    >>> (sums[1] / counts[1]).item(), counts.tolist()
    (3.0, [0.0, 2.0])
    >>> sums, counts = update_centroids(sums, counts, torch.tensor([[[6.0]]]), [1], decay=0.5)
    >>> (sums[1] / counts[1]).item()                           # (0.5 * 6 + 6) / (0.5 * 2 + 1)
    4.5
    """
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    sums, counts = sums.double() * decay, counts.double() * decay
    for c in (0, 1):
        rows = [i for i, y in enumerate(labels) if y == c]
        if rows:
            sums[c] += deltas[rows].double().sum(0)
            counts[c] += len(rows)
    return sums, counts


def leave_group_out_scores(sums: torch.Tensor | None, counts: torch.Tensor, deltas: torch.Tensor,
                           labels: Sequence[int | None], groups: Sequence[Sequence[int]], decay: float = 1.0,
                           min_count: float = 1.0) -> torch.Tensor:
    """:func:`clue_score` of every trace with the centroids of the update *without its group*.

    With ``B_c`` the sum (and ``m_c`` the count) of the batch's class-``c`` deltas and ``B_c^g``,
    ``m_c^g`` those of group ``g``, a trace of group ``g`` is scored with
    ``c_c = (decay S_c + B_c - B_c^g) / (decay n_c + m_c - m_c^g)``; NaN where a class holds fewer
    than ``min_count`` traces. ``sums`` ``None`` (nothing seen yet) counts as zeros.

    >>> x = torch.tensor([[[1.0]], [[3.0]], [[-1.0]], [[0.0]]])
    >>> leave_group_out_scores(None, torch.zeros(2), x, [1, 0, 1, 0], [[0, 1], [2, 3]]).tolist()
    [-1.0, -1.0, 2.0, 2.0]

    (Group ``[0, 1]`` is scored with the other group's centroids, success ``-1`` and failure ``0``:
    ``|1 - 0| - |1 + 1| = -1``, ``|3 - 0| - |3 + 1| = -1``; group ``[2, 3]`` with success ``1`` and
    failure ``3``: ``|-1 - 3| - |-1 - 1| = 2``, ``|0 - 3| - |0 - 1| = 2``.)
    """
    shape = deltas.shape[1:]
    past_sums = torch.zeros(2, *shape, dtype=torch.float64) if sums is None else sums.double()
    base_sums, base_counts = update_centroids(past_sums, counts, deltas, labels, decay)
    out = torch.full(deltas.shape[:1], float("nan"), dtype=torch.float64)
    for rows in groups:
        own = update_centroids(torch.zeros(2, *shape, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                               deltas, [labels[i] if i in rows else None for i in range(len(labels))])
        left_sums, left_counts = base_sums - own[0], base_counts - own[1]
        if bool((left_counts >= min_count).all()):
            success, failure = left_sums[1] / left_counts[1], left_sums[0] / left_counts[0]
            out[list(rows)] = clue_score(deltas[list(rows)], success, failure)
    return out


def vote_labels(prompts: list, completions: list) -> list[int | None]:
    """Pseudo-labels from each group's majority vote: 1 in the plurality answer cluster, 0 otherwise
    (an unparseable answer included), ``None`` throughout a group with no parseable answer.

    >>> vote_labels(["q"] * 4 + ["r"], ["7", "7.0", "8", "no idea", "none"])
    [1, 1, 0, 0, None]
    """
    labels = answer_clusters(prompts, final_answers([completion_text(c) for c in completions]))
    out: list[int | None] = [None] * len(completions)
    for rows in group_rows(prompts):
        winner = plurality([labels[i] for i in rows])
        if winner is not None:
            for i in rows:
                out[i] = int(labels[i] == winner)
    return out


class Centroids:
    """Success / failure centroids of hidden-state deltas, updated online (:func:`update_centroids`).

    ``state_dict()`` / ``load_state_dict()`` save and restore them (sums, counts, layers, decay).

    >>> c = Centroids()
    >>> c.ready
    False
    >>> c.update(torch.tensor([[[1.0, 0.0]], [[-1.0, 0.0]]]), [1, 0], layers=[2])
    >>> c.ready, c.score(torch.tensor([[[0.5, 0.0]]])).tolist()
    (True, [1.0])
    """

    def __init__(self, decay: float = 1.0, min_count: float = 1.0):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not min_count > 0:
            raise ValueError(f"min_count must be > 0, got {min_count}")
        self.decay, self.min_count = float(decay), float(min_count)
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(2, dtype=torch.float64)
        self.layers: list[int] | None = None

    @property
    def ready(self) -> bool:
        """Both classes hold at least ``min_count`` (decayed) traces."""
        return self.sums is not None and bool((self.counts >= self.min_count).all())

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_success, c_fail)``, each ``(K, H)``."""
        if self.sums is None:
            raise RuntimeError("no centroid yet")
        return self.sums[1] / self.counts[1], self.sums[0] / self.counts[0]

    def _check_layers(self, deltas: torch.Tensor, layers: Sequence[int] | None) -> None:
        layers = None if layers is None else [int(layer) for layer in layers]
        if self.sums is not None and (tuple(self.sums.shape[1:]) != tuple(deltas.shape[1:]) or
                                      (layers is not None and self.layers is not None and layers != self.layers)):
            raise ValueError(f"clue: hidden deltas of shape {tuple(deltas.shape[1:])} (layers {layers}) do not match "
                             f"the centroids' {tuple(self.sums.shape[1:])} (layers {self.layers})")

    def score(self, deltas: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """:func:`clue_score` of ``(N, K, H)`` deltas (NaN everywhere until :attr:`ready`)."""
        if not self.ready:
            return torch.full(deltas.shape[:1], float("nan"), dtype=torch.float64)
        self._check_layers(deltas, layers)
        success, failure = self.means()
        return clue_score(deltas, success, failure)

    def update(self, deltas: torch.Tensor, labels: Sequence[int | None], layers: Sequence[int] | None = None) -> None:
        """Add labelled ``(N, K, H)`` deltas (label ``None``: left out) to the running means."""
        self._check_layers(deltas, layers)
        if self.sums is None:
            if not any(y is not None for y in labels):
                return
            self.sums = torch.zeros(2, *deltas.shape[1:], dtype=torch.float64)
            self.layers = None if layers is None else [int(layer) for layer in layers]
        self.sums, self.counts = update_centroids(self.sums, self.counts, deltas, labels, self.decay)

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts, "layers": self.layers, "decay": self.decay,
                "min_count": self.min_count}

    def load_state_dict(self, state: dict) -> None:
        self.sums = None if state["sums"] is None else state["sums"].double()
        self.counts = state["counts"].double()
        self.layers, self.decay, self.min_count = state["layers"], float(state["decay"]), float(state["min_count"])


class Clue(InternalReward):
    """CLUE's nearest-centroid score of each trace's hidden-state delta (module docstring).

    Args:
        labels: where the centroids' labels come from: ``vote`` (the group's majority answer,
            label-free) or ``gold`` (correctness against the ``answer`` column).
        binary: the paper's classifier ``1[score > 0]`` instead of the margin ``score``.
        decay: forgetting factor ``g`` of the running means (1: plain running mean).
        min_count: traces each class needs (decayed count) before anything is scored; until then
            every completion is skipped (``None``).
        layers: 1-based decoder layers of the delta (``hidden_states`` indices, the last one final-normed);
            ``None``: every layer (the paper).

    The centroids live in :attr:`centroids` and persist across calls (``state_dict`` /
    ``load_state_dict`` save and restore them). Each group of a call is scored with the centroids
    of earlier calls and of the call's other groups (:func:`leave_group_out_scores`), then every
    labelled trace of the call joins them.

    >>> import torch
    >>> r = Clue()
    >>> sig = lambda *v: {"hidden_delta": torch.tensor([list(v)]), "hidden_delta_layers": [1]}
    >>> r(["q"] * 3, ["7", "7", "8"], token_signals=[sig(1.0, 0.0), sig(1.0, 0.2), sig(-1.0, 0.0)])  # no centroid yet
    [None, None, None]
    >>> [round(x, 3) for x in r(["q"] * 2, ["3", "4"], token_signals=[sig(0.9, 0.1), sig(-1.0, 0.1)])]
    [1.803, -1.9]

    (Centroids after the first call: success ``(1, 0.1)``, failure ``(-1, 0)``; ``1.903 - 0.1`` and ``0.1 - 2``.)
    """

    name = "clue"
    needs_whole_group = True
    signals = ("hidden_delta", "hidden_delta_layers")

    def __init__(self, labels: str = "vote", binary: bool = False, decay: float = 1.0, min_count: float = 1.0,
                 layers: Sequence[int] | None = None):
        if labels not in ("vote", "gold"):
            raise ValueError(f"labels must be 'vote' or 'gold', got {labels!r}")
        if layers is not None and (not layers or any(int(layer) < 1 for layer in layers)):
            raise ValueError(f"layers must be a non-empty list of 1-based layers (or null for all), got {layers!r}")
        self.labels, self.binary = labels, bool(binary)
        self.layers = None if layers is None else sorted({int(layer) for layer in layers})
        self.centroids = Centroids(decay, min_count)

    def state_dict(self) -> dict:
        return self.centroids.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.centroids.load_state_dict(state)

    def _deltas(self, token_signals: list[dict]) -> tuple[torch.Tensor | None, list[bool], list[int] | None]:
        """``(N, K, H)`` deltas of the chosen layers, which rows are finite, the layers."""
        rows, layers = [], None
        for signals in token_signals:
            delta, read = signals.get("hidden_delta"), signals.get("hidden_delta_layers")
            if delta is None or read is None:
                rows.append(None)
                continue
            read = list(read)
            wanted = self.layers or read
            missing = [layer for layer in wanted if layer not in read]
            if missing:
                raise ValueError(f"{self.name}: layers {missing} were not read (read: {read})")
            rows.append(delta[[read.index(layer) for layer in wanted]].double())
            layers = wanted
        shape = next((r.shape for r in rows if r is not None), None)
        if shape is None:
            return None, [False] * len(rows), None
        stacked = torch.stack([r if r is not None else torch.full(shape, math.nan, dtype=torch.float64) for r in rows])
        finite = stacked.flatten(1).isfinite().all(-1).tolist()
        return stacked, finite, layers

    def labels_of(self, prompts: list, completions: list, answer: list | None = None) -> list[int | None]:
        """Each trace's label for the centroid update (``vote`` or ``gold``)."""
        if self.labels == "vote":
            return vote_labels(list(prompts), list(completions))
        if answer is None:
            raise ValueError(f"{self.name}: labels='gold' needs the data's 'answer' column")
        return [None if g is None else int(g) for g in grade([completion_text(c) for c in completions], list(answer))]

    def __call__(self, prompts: list, completions: list, token_signals: list[dict] | None = None,
                 answer: list | None = None, **columns) -> list[float | None]:
        if token_signals is None:
            raise RuntimeError(f"reward {self.name!r} reads the policy's hidden states: train it with "
                               "trainers.RLIFTrainer (or pass token_signals=...)")
        if len(token_signals) != len(completions):
            raise ValueError(f"{self.name}: {len(token_signals)} token_signals for {len(completions)} completions")
        deltas, finite, layers = self._deltas(token_signals)
        if deltas is None:
            return [None] * len(completions)
        labels = [y if ok else None for y, ok in zip(self.labels_of(prompts, completions, answer), finite)]
        c = self.centroids
        c._check_layers(deltas, layers)
        scores = leave_group_out_scores(c.sums, c.counts, deltas.nan_to_num(), labels, group_rows(list(prompts)),
                                        c.decay, c.min_count)
        c.update(deltas, labels, layers)
        out: list[float | None] = []
        for s, ok in zip(scores.tolist(), finite):
            if not ok or not math.isfinite(s):
                out.append(None)
            else:
                out.append(float(s > 0) if self.binary else float(s))
        if not any(v is not None for v in out):
            logger.info("%s: no success and failure centroids outside the groups yet (counts fail/success %s): "
                        "batch not scored", self.name, c.counts.tolist())
        return out
