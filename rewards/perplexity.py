"""Perplexity consistency and reasoning pruning (RPC; Zhou et al. 2025, arXiv 2502.00511).

Self-consistency counts votes; internal probability ranks single paths. RPC's *perplexity
consistency* (PC) does both: an answer's score is the summed model probability of the distinct
sampled reasoning paths that reach it,

    ``S(c) = sum_{t in D, c(t) = c} p(t)``,   ``P(c) = S(c) / sum_{t in D} p(t)``,

where ``D`` is the set of *distinct* completions of the group that survive pruning (a path sampled
twice is one path: the authors key each cluster's probabilities by completion text), ``c(t)`` the
answer cluster of ``t`` (answers math-verify calls equal, :func:`rewards.grading.clusters`) and,
as in the authors' code (``compute_rpc.py``, which reads each path's ``mean_logprob``),

    ``p(t) = exp(mean_k log p(y_k | x, y_<k))``   (the inverse perplexity; ``probability="mean"``)

or, with ``probability="sequence"``, the sequence probability ``exp(sum_k log p(y_k | ...))`` of
the paper's theory (vanishes for long paths, so the authors' experiments use the mean). Paths
without an answer keep their mass in the denominator but form no cluster.

*Reasoning pruning* drops low-probability paths before the sum (their ``p`` counts as 0):

* ``{rule: weibull}`` (the authors' rule): fit a two-component Weibull mixture to the group's
  ``p`` by maximum likelihood (start ``w=0.5, (k, lam) = (1, 1), (1.5, 2)``; bounds
  ``w in [0.2, 0.8]``, ``k, lam >= 0.01``; the authors use scipy's L-BFGS-B, we use torch's
  L-BFGS on a sigmoid reparametrisation that also caps ``k, lam`` at 1000), call the component with
  the larger mean "high", and drop a path when its posterior is larger under the low component
  *and* ``p < mean(p)``. A group whose probabilities are all equal (to 1e-9, relative) is not pruned;
* ``{rule: quantile, q: 0.25}`` (a simpler, fit-free rule): drop a path when ``p`` is below the
  ``q``-quantile of the group's ``p`` (linear interpolation). The best path always survives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import completion_text
from .grading import final_answers
from .group import answer_clusters, group_rows
from .internal import InternalReward

PROBABILITIES = ("mean", "sequence")
SCORES = ("indicator", "normalized")
PRUNING_RULES = {"quantile": {"q"}, "weibull": set()}
MAX_WEIBULL = 1000.0
"""Upper bound on the fitted Weibull shapes and scales (the authors set none): a group of near-equal
probabilities otherwise drives a shape to infinity and the fit to NaN."""


def path_probability(logps: torch.Tensor, probability: str = "mean") -> float | None:
    """``exp(mean_k logp_k)`` (``mean``) or ``exp(sum_k logp_k)`` (``sequence``); ``None`` for an
    empty or non-finite path.

    >>> import torch
    >>> round(path_probability(torch.tensor([-0.5, -1.5])), 6), round(path_probability(torch.tensor([-0.5, -1.5]), "sequence"), 6)
    (0.367879, 0.135335)
    """
    values = logps.double()
    if values.numel() == 0:
        return None
    total = float(values.sum() if probability == "sequence" else values.mean())
    return math.exp(total) if math.isfinite(total) else None


def check_pruning(pruning: Any) -> dict | None:
    """The pruning option normalised to ``{"rule": ..., **params}`` (``None``: no pruning); raises
    ``ValueError`` on an unknown rule, unknown keys or ``q`` outside ``[0, 1)``.

    >>> check_pruning(None), check_pruning("weibull"), check_pruning({"rule": "quantile", "q": 0.5})
    (None, {'rule': 'weibull'}, {'rule': 'quantile', 'q': 0.5})
    """
    if pruning is None:
        return None
    if isinstance(pruning, str):
        pruning = {"rule": pruning}
    if not isinstance(pruning, dict) or pruning.get("rule") not in PRUNING_RULES:
        raise ValueError(f"pruning must be null or {{rule: one of {sorted(PRUNING_RULES)}, ...}}, got {pruning!r}")
    rule = pruning["rule"]
    extra = set(pruning) - {"rule"} - PRUNING_RULES[rule]
    if extra:
        raise ValueError(f"pruning rule {rule!r} takes {sorted(PRUNING_RULES[rule]) or 'no parameters'}, "
                         f"got {sorted(extra)}")
    out = {"rule": rule}
    if rule == "quantile":
        q = pruning.get("q", 0.25)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q < 1:
            raise ValueError(f"pruning q must be a number in [0, 1), got {q!r}")
        out["q"] = float(q)
    return out


def _weibull_log_pdf(x: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``log[(k/lam) (x/lam)^(k-1) exp(-(x/lam)^k)]`` (``(x/lam)^k`` capped at ``e^700``: finite everywhere)."""
    log_z = torch.log(x / lam)
    return torch.log(k / lam) + (k - 1) * log_z - torch.exp(torch.clamp(k * log_z, max=700.0))


def fit_weibull_mixture(p: Sequence[float], steps: int = 50) -> tuple[float, float, float, float, float]:
    """Maximum-likelihood two-component Weibull mixture ``w W(k1, lam1) + (1-w) W(k2, lam2)`` of
    positive values ``p``, with the authors' start and bounds (module docstring); the first
    component is the one with the larger mean ``lam Gamma(1 + 1/k)``. Returns ``(w, k1, lam1, k2, lam2)``."""
    x = torch.tensor(list(p), dtype=torch.float64)
    lo = torch.tensor([0.2, 0.01, 0.01, 0.01, 0.01], dtype=torch.float64)
    width = torch.tensor([0.6, *[MAX_WEIBULL - 0.01] * 4], dtype=torch.float64)

    def params(u: torch.Tensor) -> torch.Tensor:  # bounded: w in [0.2, 0.8], the rest in [0.01, MAX_WEIBULL]
        return lo + width * torch.sigmoid(u)

    u = torch.logit((torch.tensor([0.5, 1.0, 1.0, 1.5, 2.0], dtype=torch.float64) - lo) / width).requires_grad_(True)
    opt = torch.optim.LBFGS([u], max_iter=steps, max_eval=2 * steps, line_search_fn="strong_wolfe")
    best: list = [math.inf, u.detach().clone()]  # the lowest finite loss seen (L-BFGS can step into NaN on flat fits)

    def nll() -> torch.Tensor:
        opt.zero_grad()
        w, k1, l1, k2, l2 = params(u)
        both = torch.stack([torch.log(w) + _weibull_log_pdf(x, k1, l1), torch.log1p(-w) + _weibull_log_pdf(x, k2, l2)])
        loss = -torch.logsumexp(both, 0).sum()
        loss.backward()
        value = float(loss.detach())
        if math.isfinite(value) and value < best[0] and bool(torch.isfinite(u).all()):
            best[:] = [value, u.detach().clone()]
        return loss

    with torch.enable_grad():
        opt.step(nll)
    w, k1, l1, k2, l2 = (float(v) for v in params(best[1]))
    if l1 * math.gamma(1 + 1 / k1) < l2 * math.gamma(1 + 1 / k2):
        w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
    return w, k1, l1, k2, l2


def weibull_posterior_high(p: Sequence[float], w: float, k1: float, lam1: float, k2: float, lam2: float) -> list[float]:
    """Posterior probability that each ``p`` comes from the first (high) component,
    ``w f1(p) / (w f1(p) + (1-w) f2(p))`` with ``f(p) = (k/lam) (p/lam)^(k-1) exp(-(p/lam)^k)``, computed in log
    space (fitted shapes can be large); NaN where both densities vanish.

    >>> [round(v, 4) for v in weibull_posterior_high([0.5], 0.5, 2.0, 1.0, 1.0, 1.0)]  # f1 = e^-0.25, f2 = e^-0.5
    [0.5622]
    """
    x = torch.tensor(list(p), dtype=torch.float64)
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    a = math.log(w) + _weibull_log_pdf(x, t(k1), t(lam1))
    b = math.log1p(-w) + _weibull_log_pdf(x, t(k2), t(lam2))
    return torch.sigmoid(a - b).tolist()


def prune(p: Sequence[float | None], pruning: dict | None) -> list[bool]:
    """Which paths survive reasoning pruning (``None`` probabilities never survive).

    >>> prune([0.9, 0.8, 0.1, None], {"rule": "quantile", "q": 0.5})   # median of [0.9, 0.8, 0.1] = 0.8
    [True, True, False, False]
    """
    finite = [v for v in p if v is not None]
    keep = [v is not None for v in p]
    if pruning is None or len(finite) < 2:
        return keep
    if pruning["rule"] == "quantile":
        cut = float(torch.quantile(torch.tensor(finite, dtype=torch.float64), pruning["q"]))
        return [k and v >= cut for k, v in zip(keep, p)]
    mean = math.fsum(finite) / len(finite)
    if max(finite) - min(finite) <= 1e-9 * max(finite):  # nothing to separate (and no fit to make)
        return keep
    fit = fit_weibull_mixture([max(v, 1e-300) for v in finite])
    if not all(math.isfinite(v) for v in fit):  # a failed fit prunes nothing
        return keep
    high = weibull_posterior_high([max(v, 1e-300) if v is not None else 1.0 for v in p], *fit)
    # the authors' test ``p_low > p_high and p < mean``; an undefined posterior (NaN) prunes nothing
    return [k and not (h < 0.5 and v < mean) for k, v, h in zip(keep, p, high)]


def cluster_scores(labels: Sequence[int | None], p: Sequence[float | None], keys: Sequence | None = None,
                   keep: Sequence[bool] | None = None) -> tuple[dict[int, float], float]:
    """``S(c)`` per cluster and the total mass ``sum_{t in D} p(t)`` of one group's distinct kept paths.

    A path counts once per distinct ``keys`` value (default: every path is distinct); paths whose
    ``p`` is ``None`` or that are not kept add nothing; a path with label ``None`` adds only to the total.

    >>> cluster_scores([0, 0, 1, None], [0.5, 0.5, 0.3, 0.2], keys=["a", "a", "b", "c"])
    ({0: 0.5, 1: 0.3}, 1.0)
    """
    keep = [True] * len(labels) if keep is None else keep
    keys = list(range(len(labels))) if keys is None else keys
    seen: set = set()
    scores: dict[int, float] = {}
    total = 0.0
    for label, prob, key, kept in zip(labels, p, keys, keep):
        if prob is None or not kept or key in seen:
            continue
        seen.add(key)
        total += prob
        if label is not None:
            scores[label] = scores.get(label, 0.0) + prob
    return scores, total


def pc_rewards(labels: Sequence[int | None], p: Sequence[float | None], score: str = "normalized",
               keys: Sequence | None = None, keep: Sequence[bool] | None = None) -> list[float]:
    """Per path of one group: ``P(c(t)) = S(c(t)) / sum_D p`` (``normalized``) or ``1[c(t) = argmax_c S(c)]``
    (``indicator``; ties: the cluster seen first); 0 for a path without an answer or when no mass is left.

    >>> pc_rewards([0, 0, 1], [0.2, 0.2, 0.6]), pc_rewards([0, 0, 1], [0.2, 0.2, 0.6], "indicator")
    ([0.4, 0.4, 0.6], [0.0, 0.0, 1.0])
    >>> pc_rewards([0, 0, 1], [0.25, 0.25, 0.75], keys=["x", "x", "y"])  # one path sampled twice counts once
    [0.25, 0.25, 0.75]
    """
    scores, total = cluster_scores(labels, p, keys, keep)
    if not scores or total <= 0:
        return [0.0] * len(labels)
    if score == "normalized":
        return [0.0 if c is None else scores.get(c, 0.0) / total for c in labels]
    best = max(scores.values())
    winner = next(c for c in labels if c is not None and scores.get(c) == best)
    return [float(c is not None and c == winner) for c in labels]


class PerplexityConsistency(InternalReward):
    """RPC's perplexity consistency as a group reward (module docstring for the formulas).

    Args:
        score: ``normalized`` (``P(c(y))``, the answer's share of the group's probability mass) or
            ``indicator`` (1 for answers in the top-scoring cluster, TTRL-style).
        pruning: ``None``, ``{rule: weibull}`` or ``{rule: quantile, q: ...}`` (reasoning pruning).
        probability: ``mean`` (inverse perplexity, the authors' code) or ``sequence``.
        unique_paths: count a completion text sampled several times once (the paper's set of paths).

    A completion without a finite log-prob adds no mass but is still rewarded by its answer's cluster;
    one without a parseable answer gets 0.

    >>> import torch
    >>> lp = lambda *v: {"logps": torch.log(torch.tensor(v))}
    >>> r = PerplexityConsistency()(["q"] * 3, ["1/2", "0.5", "3"], token_signals=[lp(0.1), lp(0.2), lp(0.7)])
    >>> [round(v, 6) for v in r]
    [0.3, 0.3, 0.7]
    """

    name = "perplexity_consistency"
    needs_whole_group = True
    signals = ("logps",)

    def __init__(self, score: str = "normalized", pruning: Any = None, probability: str = "mean",
                 unique_paths: bool = True):
        if score not in SCORES:
            raise ValueError(f"{self.name}: score must be one of {list(SCORES)}, got {score!r}")
        if probability not in PROBABILITIES:
            raise ValueError(f"{self.name}: probability must be one of {list(PROBABILITIES)}, got {probability!r}")
        self.score, self.probability, self.unique_paths = score, probability, bool(unique_paths)
        self.pruning = check_pruning(pruning)

    def reduce(self, signals) -> float | None:
        return path_probability(signals["logps"], self.probability)

    def __call__(self, prompts: list, completions: list, token_signals: list[dict] | None = None, **columns):
        p = super().__call__(prompts, completions, token_signals=token_signals, **columns)
        texts = [completion_text(c) for c in completions]
        labels = answer_clusters(prompts, final_answers(texts))
        rewards = [0.0] * len(completions)
        for rows in group_rows(prompts):
            probs = [p[i] for i in rows]
            keys = [texts[i] for i in rows] if self.unique_paths else None
            values = pc_rewards([labels[i] for i in rows], probs, self.score, keys, prune(probs, self.pruning))
            for i, value in zip(rows, values):
                rewards[i] = value
        return rewards
