"""Reward transforms: reshape any reward's values before the weighted sum and TRL's group normalisation.

``{clip: [lo, hi], scale: s, shift: b}`` is the clipped linear form of IRRL (Li et al., ICML 2023,
"Internally Rewarded Reinforcement Learning", arXiv 2302.00270): their reward is
``max(0, q(y|tau) - 1/|Y|)``, linear in the internal model's probability, shifted by chance and
clipped at 0, which bounds what a noisy internal reward can do to the policy gradient. Here

    ``r' = min(max(s * r + b, lo), hi)``   (defaults ``s = 1``, ``b = 0``, no clip; ``null`` bound: open)

``rank`` replaces each value by its rank within its group (consecutive identical prompts), ties
taking the mean rank, scaled to ``[0, 1]``: ``(rank - 1) / (n - 1)`` over the group's ``n`` finite
values (0.5 when ``n = 1``). ``None`` and NaN stay as they are and are not ranked.
"""

from __future__ import annotations

import math
from typing import Any

from .base import Reward
from .group import group_rows
from .internal import InternalReward

KEYS = ("clip", "scale", "shift")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_transform(transform: Any) -> dict | str | None:
    """The transform option normalised (``None``, ``"rank"`` or ``{clip: (lo, hi), scale, shift}``);
    ``ValueError`` naming the problem otherwise.

    >>> check_transform({"clip": [0, None], "shift": -0.1})
    {'clip': (0.0, None), 'scale': 1.0, 'shift': -0.1}
    >>> check_transform("rank"), check_transform(None)
    ('rank', None)
    """
    if transform is None or transform == "rank":
        return transform
    if not isinstance(transform, dict):
        raise ValueError(f"transform must be 'rank' or a mapping with keys {list(KEYS)}, got {transform!r}")
    unknown = [k for k in transform if k not in KEYS]
    if unknown:
        raise ValueError(f"transform: unknown key(s) {unknown} (expected {list(KEYS)}, or transform: rank)")
    for key in ("scale", "shift"):
        if key in transform and not _number(transform[key]):
            raise ValueError(f"transform.{key} must be a finite number, got {transform[key]!r}")
    clip = transform.get("clip")
    if clip is not None:
        if not isinstance(clip, (list, tuple)) or len(clip) != 2 or not all(v is None or _number(v) for v in clip):
            raise ValueError(f"transform.clip must be [lo, hi] (numbers or null), got {clip!r}")
        if None not in clip and clip[0] > clip[1]:
            raise ValueError(f"transform.clip: lo ({clip[0]}) > hi ({clip[1]})")
        clip = tuple(None if v is None else float(v) for v in clip)
    return {"clip": clip, "scale": float(transform.get("scale", 1.0)), "shift": float(transform.get("shift", 0.0))}


def clipped_linear(value: float, clip: tuple | None = None, scale: float = 1.0, shift: float = 0.0) -> float:
    """``min(max(scale * value + shift, lo), hi)``; NaN stays NaN.

    >>> clipped_linear(0.75, clip=(0.0, None), shift=-0.25), clipped_linear(0.05, clip=(0.0, None), shift=-0.25)
    (0.5, 0.0)
    >>> clipped_linear(3.0, clip=(-1.0, 1.0), scale=2.0)
    1.0
    """
    out = scale * value + shift
    if clip is not None and not math.isnan(out):
        lo, hi = clip
        out = out if lo is None else max(out, lo)
        out = out if hi is None else min(out, hi)
    return out


def group_ranks(prompts: list, values: list[float | None]) -> list[float | None]:
    """Each finite value's rank within its group scaled to [0, 1] (ties: mean rank); others unchanged.

    >>> group_ranks(["a", "a", "a", "a", "b"], [0.3, None, 0.9, 0.3, 5.0])
    [0.25, None, 1.0, 0.25, 0.5]
    """
    out = list(values)
    for rows in group_rows(prompts):
        finite = sorted((values[i], i) for i in rows if values[i] is not None and math.isfinite(values[i]))
        n = len(finite)
        j = 0
        while j < n:
            k = j
            while k + 1 < n and finite[k + 1][0] == finite[j][0]:
                k += 1
            rank = (j + k) / 2  # 0-based mean rank of the tied run
            for _, i in finite[j : k + 1]:
                out[i] = rank / (n - 1) if n > 1 else 0.5
            j = k + 1
    return out


class TransformedReward(Reward):
    """``reward`` with its values transformed (module docstring); keeps the wrapped reward's name
    (TRL's metric names) and forwards ``needs_whole_group`` (``rank`` needs the whole group too),
    ``signals`` and ``layers``. Build it with :func:`with_transform`.

    >>> from rewards import MajorityVote
    >>> with_transform(MajorityVote(), {"scale": 2.0, "shift": -1.0})(["q"] * 3, ["7", "7", "8"])
    [1.0, 1.0, -1.0]
    """

    abstract = True

    def __init__(self, reward, transform: dict | str):
        self.reward, self.transform = reward, check_transform(transform)
        self.name = getattr(reward, "__name__", type(reward).__name__)
        self.needs_whole_group = bool(getattr(reward, "needs_whole_group", False)) or self.transform == "rank"

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        values = self.reward(prompts=prompts, completions=completions, **columns)
        if self.transform == "rank":
            return group_ranks(prompts, values)
        return [None if v is None else clipped_linear(float(v), **self.transform) for v in values]


class TransformedInternalReward(TransformedReward, InternalReward):
    """:class:`TransformedReward` of an internal reward (the trainer and the verifier read its ``signals``)."""

    abstract = True

    def __init__(self, reward, transform: dict | str):
        super().__init__(reward, transform)
        self.signals = tuple(reward.signals)
        if hasattr(reward, "layers"):
            self.layers = reward.layers



def with_transform(reward, transform: Any):
    """``reward`` itself when ``transform`` is ``None``, else it wrapped in a :class:`TransformedReward`."""
    if transform is None:
        return reward
    cls = TransformedInternalReward if isinstance(reward, InternalReward) else TransformedReward
    return cls(reward, transform)
